"""Files that are whole or absent: written under a temporary name beside the target,
flushed to disk, then renamed into place (never a half-written output)."""
import os
import tempfile

__all__ = ["atomic_write"]


def atomic_write(path, write, binary=True):
    """Call ``write(f)`` on a temporary file in ``path``'s directory, then rename it to
    ``path`` (mode 0644). On any error the temporary file is removed and ``path`` is left
    as it was."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".part")
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
