"""Small filesystem helpers shared by every stage: atomic writes and checksums.

Every file another process may read (manifests, commit records, checkpoints) is written to a
temporary file in the same directory and renamed into place, so a reader sees either the old
file or the complete new one, never a torn write, even when the writer is killed.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from civt_cache.errors import ConfigError

_CHUNK = 1 << 20
#: A URL's scheme (``s3://``, ``gs://``, ``https://``, WebDataset's ``pipe:``), checked on the
#: text as given (``pathlib`` would collapse ``s3://b/k`` into the folder ``s3:/b/k``); a
#: teacher's ``ARCH:/abs/file.pth`` is not one.
_URL = re.compile(r"^(?:[A-Za-z][A-Za-z0-9+.-]*://|pipe:)")


def refuse_url(text: str, where: str, allowed: tuple[str, ...] = ()) -> None:
    """Refuse a URL where a filesystem path is needed, in one line (a URL taken as a path would
    silently become a local folder named ``s3:``); URLs of the ``allowed`` schemes pass."""
    m = _URL.match(text)
    if m and text.split("://", 1)[0].lower() not in allowed:
        raise ConfigError(f"{where}: {text!r} is a URL; shards may be read from s3://, gs:// and "
                          "https:// URLs (listed in a manifest, or given to scan-shards), but "
                          "manifests and caches are files on a local or shared filesystem")


def _process_umask() -> int:
    """The umask this process was started with (read once: setting it is the only way to read it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: Mode of every file this tool creates: what ``open()`` would give (0644 under the usual umask
#: 022), so a cache, manifest or run written by one user can be read by another. ``mkstemp``
#: alone would create 0600 files.
FILE_MODE = 0o666 & ~_process_umask()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file in the same directory, fsync, rename)."""
    atomic_write_with(path, lambda f: f.write(data))


def atomic_write_with(path: str | Path, writer: Callable[[Any], Any]) -> None:
    """Open a temp file beside `path`, let `writer` fill it, then rename it over `path`.

    On any error (including a full disk) the temp file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block, waiting for
    any other holder; the lock goes with the process if it dies."""
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Serialise `obj` as indented JSON and write it atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, streamed so large shards and checkpoints never sit in memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes | memoryview) -> str:
    """Hex sha256 of an in-memory buffer."""
    return hashlib.sha256(data).hexdigest()


def canonical_sha256(obj: Any) -> str:
    """Fingerprint of a JSON-serialisable object, independent of key order and whitespace."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())


def create_beside(final: Path, build: Callable[[Path], None]) -> bool:
    """Build a directory tree at a temp path beside ``final`` and rename it into place.
    Returns False if another process created ``final`` first (its version is kept)."""
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
            return True
        except OSError:
            if final.exists():
                return False
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
