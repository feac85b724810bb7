"""Files that are whole or absent: written under a temporary name beside the target,
flushed to disk, renamed into place, and the directory flushed too (never a half-written
output; a file that looks saved survives a power loss).

A write killed before its rename leaves its temporary (``.<name>.<random>.part``) behind;
:func:`remove_stale_temporaries` removes those of given targets, for a writer to call when
it starts (no write of its own is under way then)."""
import fnmatch
import logging
import os
import tempfile

__all__ = ["atomic_write", "fsync_directory", "remove_stale_temporaries", "temporary_pattern"]

logger = logging.getLogger(__name__)

_SUFFIX = ".part"


def temporary_pattern(basename_pattern: str) -> str:
    """The glob pattern of :func:`atomic_write`'s temporaries for targets whose base names
    match ``basename_pattern`` (itself a glob pattern, e.g. ``model_*.pth``)."""
    return f".{basename_pattern}.*{_SUFFIX}"


def fsync_directory(directory: str) -> None:
    """Flush a directory's entries (a rename into it) to disk. Where directories cannot be
    opened (Windows), nothing is done."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def atomic_write(path, write, binary=True):
    """Call ``write(f)`` on a temporary file in ``path``'s directory, then rename it to
    ``path`` (mode 0644) and flush the directory. On any error the temporary file is
    removed and ``path`` is left as it was."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=_SUFFIX)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_directory(directory)


def remove_stale_temporaries(directory: str, basename_patterns) -> int:
    """Remove the temporaries :func:`atomic_write` left in ``directory`` for targets whose
    base names match any of ``basename_patterns`` (writes killed before their rename).
    Only for a writer that owns these targets and has no write under way. Returns how many
    files were removed (logged with the bytes freed)."""
    try:
        names = os.listdir(directory)
    except OSError:  # absent, or not a local directory
        return 0
    patterns = [temporary_pattern(p) for p in basename_patterns]
    removed, freed = 0, 0
    for name in names:
        if not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        path = os.path.join(directory, name)
        try:
            size = os.path.getsize(path)
            os.remove(path)
        except OSError:  # gone meanwhile, or not ours to remove
            continue
        removed += 1
        freed += size
    if removed:
        logger.info(
            "Removed %d temporary file(s) of interrupted writes in %s (%.1f MB)", removed, directory, freed / 2**20
        )
    return removed
