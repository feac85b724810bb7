"""
Checkpoint downloads that are fetched once, verified, cached, and safe under concurrency.

- **Cache**: ``$EQLOSSES_D2_CACHE``, else ``~/.torch/eqlosses_d2`` (beside fvcore's
  ``~/.torch/fvcore_cache`` and iopath's ``~/.torch/iopath_cache``). A checkpoint lives at
  ``<cache>/<model-zoo name>/<file name of its URL>``.
- **Verified before it is visible**: bytes go to ``<cache path>.part``; only when the whole
  file hashes to the manifest's digest is it renamed into place (an atomic rename in the
  same directory). On a mismatch the ``.part`` file is deleted and :class:`ChecksumError`
  says what was expected and what came. Nothing reads a ``.part`` file but the hash.
- **Verified on use**: a cached file is hashed again each time it is resolved (about half
  a second per 200 MB, next to reading it whole to load it). We chose this over a sidecar
  record of size + mtime + digest, which trusts whatever damaged or replaced the file
  without changing those. A cached file that no longer matches is deleted and fetched again.
- **Resumable**: a transfer cut short continues where it stopped with an HTTP ``Range``
  request (also across processes: the ``.part`` file stays); a server that ignores
  ``Range`` sends the whole file again. A resumed download that fails verification is
  started over once from the beginning before giving up.
- **Concurrent processes** (Detectron2 starts one per GPU): the fetch runs under iopath's
  ``file_lock`` (portalocker: an exclusive lock on a file beside the cache path), as
  iopath's own HTTP downloads for Detectron2 do, so one process downloads while the others
  wait and then find the verified file (a network filesystem must support such locks). A cached, verified file is used without the lock
  and without any network access (offline use).
- **Progress**: a tqdm bar on stderr (redrawn every 10 s at most when stderr is not a
  terminal).
"""
import hashlib
import http.client
import logging
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.request

from .manifest import Checksum, ModelZooError

__all__ = ["CACHE_ENV", "ChecksumError", "DownloadError", "cache_dir", "fetch", "file_digest", "verify_file"]

logger = logging.getLogger(__name__)

CACHE_ENV = "EQLOSSES_D2_CACHE"
_CHUNK = 1 << 20
_TIMEOUT_S = 60
_ATTEMPTS_WITHOUT_PROGRESS = 5
_USER_AGENT = "eqlosses_d2-model-zoo"


class DownloadError(ModelZooError):
    """The file could not be fetched (unreachable, HTTP error, repeated interruptions)."""


class ChecksumError(ModelZooError):
    """A downloaded file does not hash to what the manifest says; it was deleted."""


def cache_dir() -> str:
    """Where verified checkpoints are kept (created on first download)."""
    path = os.environ.get(CACHE_ENV) or os.path.join("~", ".torch", "eqlosses_d2")
    return os.path.abspath(os.path.expanduser(path))


def file_digest(path: str, algorithms=("sha256",)) -> dict:
    """{algorithm: hexdigest} of a file, every algorithm in one pass."""
    hashes = {}
    for name in algorithms:
        try:
            hashes[name] = hashlib.new(name, usedforsecurity=False)  # MD5 on FIPS systems
        except TypeError:  # Python < 3.9
            hashes[name] = hashlib.new(name)
    with open(path, "rb") as f:
        while True:
            block = f.read(_CHUNK)
            if not block:
                break
            for h in hashes.values():
                h.update(block)
    return {name: h.hexdigest() for name, h in hashes.items()}


def verify_file(path: str, checksum: Checksum):
    """(True, digest) when the file hashes to ``checksum``, else (False, digest)."""
    digest = file_digest(path, (checksum.algorithm,))[checksum.algorithm]
    return checksum.matches(digest), digest


def _cached_and_valid(path, checksum, label, warn=True):
    """True for a cached file that verifies; a mismatching one is reported (not removed:
    that happens under the lock)."""
    if not os.path.isfile(path):
        return False
    ok, digest = verify_file(path, checksum)
    if ok:
        return True
    if warn:
        logger.warning(
            "%s: the cached file %s is corrupt (expected %s, got %s %s): fetching it again",
            label, path, checksum.describe(), checksum.algorithm, digest,
        )
    return False


def fetch(url: str, path: str, checksum: Checksum, label: str = "", force: bool = False) -> str:
    """
    Make ``path`` a verified copy of ``url`` and return it: the cached file when it verifies
    (no network access), else a fresh download, verified before it is renamed into place.

    Args:
        label: names the file in messages (the model-zoo name).
        force: fetch again even if a verified copy is cached.
    """
    from iopath.common.file_io import file_lock

    label = label or url
    if not force and _cached_and_valid(path, checksum, label):
        return path
    with file_lock(path):
        # another process may have fetched it while this one waited for the lock
        if not force and _cached_and_valid(path, checksum, label, warn=False):
            return path
        if os.path.exists(path):
            os.remove(path)  # corrupt (or --force)
        _download_verified(url, path, checksum, label)
    return path


def _download_verified(url, path, checksum, label):
    part = path + ".part"
    for attempt in (1, 2):
        resumed = _transfer(url, part, label)
        ok, digest = verify_file(part, checksum)
        if ok:
            break
        os.remove(part)
        if resumed and attempt == 1:
            logger.warning("%s: the resumed download of %s failed verification: downloading it again", label, url)
            continue
        raise ChecksumError(
            f"{label}: checksum mismatch for {url}: expected {checksum.describe()}, got {checksum.algorithm} "
            f"{digest}; the downloaded file was deleted"
        )
    if checksum.kind != "sha256":
        sha256 = file_digest(part)["sha256"]
        logger.info("%s: MD5 prefix %s verified; the file's sha256 is %s", label, checksum.value, sha256)
    os.chmod(part, 0o644)
    os.replace(part, path)
    logger.info("%s: saved the verified file %s", label, path)


class _Interrupted(Exception):
    """A transfer stopped early in a way that a retry (resuming) may fix."""


def _transfer(url, part, label):
    """Bring ``part`` to the whole remote file, resuming what is there. Returns True when
    bytes from an earlier attempt were kept (the result then needs care on mismatch)."""
    os.makedirs(os.path.dirname(os.path.abspath(part)), exist_ok=True)
    kept_earlier = os.path.isfile(part) and os.path.getsize(part) > 0
    failures = 0
    while True:
        before = os.path.getsize(part) if os.path.isfile(part) else 0
        try:
            _transfer_once(url, part, before, label)
            return kept_earlier
        except _Interrupted as e:
            after = os.path.getsize(part) if os.path.isfile(part) else 0
            failures = 0 if after > before else failures + 1
            if failures >= _ATTEMPTS_WITHOUT_PROGRESS:
                raise DownloadError(
                    f"{label}: the download of {url} keeps failing ({e}); {after} bytes kept in {part}, "
                    f"a later attempt resumes there"
                ) from None
            kept_earlier = kept_earlier or after > 0
            delay = min(0.5 * 2 ** failures, 8.0)
            logger.warning("%s: download interrupted at %d bytes (%s): resuming in %.1f s", label, after, e, delay)
            time.sleep(delay)


def _transfer_once(url, part, offset, label):
    headers = {"User-Agent": _USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and offset:
            return  # nothing after `offset`: the file is complete (verification decides)
        if e.code >= 500 or e.code == 429:
            raise _Interrupted(f"HTTP {e.code} {e.reason}") from None
        raise DownloadError(f"{label}: HTTP {e.code} {e.reason} from {url}") from None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, (socket.timeout, TimeoutError, ConnectionResetError, ConnectionAbortedError)):
            raise _Interrupted(str(reason)) from None
        raise DownloadError(
            f"{label}: cannot reach {url} ({reason}); without network, a verified copy must be in the "
            f"cache ({cache_dir()}, ${CACHE_ENV})"
        ) from None
    except (socket.timeout, TimeoutError, ConnectionError, http.client.HTTPException) as e:
        raise _Interrupted(f"{type(e).__name__}: {e}") from None
    with response:
        if response.status == 206:
            start, total = _content_range(response.headers.get("Content-Range", ""))
            if start != offset:
                raise DownloadError(f"{label}: {url} answered a request for bytes {offset}- with bytes {start}-")
            mode = "ab"
        else:
            if offset:
                logger.info("%s: the server does not resume downloads: starting again", label)
            offset, mode = 0, "wb"
            total = None
        length = response.headers.get("Content-Length")
        end = offset + int(length) if length is not None else total
        if offset:
            logger.info("%s: resuming the download of %s at %d bytes", label, url, offset)
        else:
            logger.info("%s: downloading %s", label, url)
        received = offset
        with open(part, mode) as f, _progress(end, offset, os.path.basename(part)[: -len(".part")]) as bar:
            try:
                while True:
                    block = response.read(_CHUNK)
                    if not block:
                        break
                    f.write(block)
                    received += len(block)
                    bar.update(len(block))
            except (socket.timeout, TimeoutError, ConnectionError, http.client.HTTPException) as e:
                raise _Interrupted(f"{type(e).__name__} after {received} bytes") from None
            finally:
                f.flush()
                os.fsync(f.fileno())
        if end is not None and received < end:
            raise _Interrupted(f"connection closed after {received} of {end} bytes")


def _content_range(value):
    match = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", value.strip())
    if not match:
        raise _Interrupted(f"unreadable Content-Range {value!r}")
    total = None if match.group(3) == "*" else int(match.group(3))
    return int(match.group(1)), total


def _progress(total, initial, name):
    """A tqdm bar on stderr, as fvcore's and iopath's downloads show (redrawn at most every
    10 s when stderr is not a terminal, so that logs stay readable); a no-op without tqdm."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoProgress()
    interactive = getattr(sys.stderr, "isatty", lambda: False)()
    return tqdm(
        total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=name, file=sys.stderr,
        mininterval=0.1 if interactive else 10.0, dynamic_ncols=interactive,
    )


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n):
        pass
