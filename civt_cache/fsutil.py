"""Small filesystem helpers shared by every stage: atomic writes and checksums.

Every file another process may read (manifests, commit records, checkpoints) is written to a
temporary file in the same directory and renamed into place, so a reader sees either the old
file or the complete new one, never a torn write, even when the writer is killed.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from civt_cache.errors import ConfigError

_CHUNK = 1 << 20
#: A URL's scheme (``s3://``, ``gs://``, ``https://``, WebDataset's ``pipe:``), checked on the
#: text as given (``pathlib`` would collapse ``s3://b/k`` into the folder ``s3:/b/k``); a
#: teacher's ``ARCH:/abs/file.pth`` is not one.
_URL = re.compile(r"^(?:[A-Za-z][A-Za-z0-9+.-]*://|pipe:)")


def is_url(value: object) -> bool:
    """Whether ``value`` is text that names a URL (which must never become a Path)."""
    return isinstance(value, str) and _URL.match(value) is not None


def refuse_url(text: str, where: str, allowed: tuple[str, ...] = ()) -> None:
    """Refuse a URL where a filesystem path is needed, in one line (a URL taken as a path would
    silently become a local folder named ``s3:``); URLs of the ``allowed`` schemes pass."""
    scheme = "pipe" if text.startswith("pipe:") else text.split("://", 1)[0].lower()
    if is_url(text) and scheme not in allowed:
        raise ConfigError(f"{where}: {text!r} is a URL here; URLs may name shards and manifests "
                          "(s3://, gs://, https://, file://, pipe:), caches and make-shards' output "
                          "(s3://, gs://), but checkpoints, pipelines and run folders are files")
    if is_url(text) and scheme not in ("pipe", "file") and not url_host(text):
        raise ConfigError(f"{where}: {text!r} names no bucket or host; give it whole, e.g. "
                          f"{text.split('://', 1)[0].lower()}://BUCKET/PATH")


def folder_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be the folder a command writes into, or None (a URL, a folder, or a
    free name). A dangling or self-looping symbolic link reads as "not there" to ``exists``, and
    making the folder then fails with FileExistsError: it is named here instead."""
    if is_url(path):
        return None
    p = Path(path)
    if p.is_symlink() and not p.exists():
        return "a symbolic link to nothing (dangling, or a loop)"
    if p.exists() and not p.is_dir():
        return "a file"
    return None


def url_host(text: str) -> str:
    """The bucket (or host) of a URL: what stands between ``://`` and the next ``/``."""
    return text.split("://", 1)[1].split("/", 1)[0] if "://" in text else ""


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
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        full = out_of_space(e, path)
        if full is not None:
            raise full from None
        raise


def out_of_space(e: BaseException, path: str | Path) -> OSError | None:
    """A full disk met while writing ``path``, said as one ``OSError`` that names the file and
    the space left (the CLI prints it in one line), or None for any other error. Writers
    report it many ways: ``OSError`` ENOSPC / EDQUOT, often without a file name, or torch.save's
    ``RuntimeError`` of its zip writer ("unexpected pos", "file write failed")."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        code = e.errno
    elif isinstance(e, RuntimeError) and any(k in str(e) for k in ("unexpected pos", "file write failed",
                                                                     "No space left")):
        code = errno.ENOSPC
    else:
        return None
    try:
        free = shutil.disk_usage(Path(path).parent).free
        left = f"{free / 1e6:,.1f} MB left on its file system"
    except OSError:
        left = "free space unknown"
    return OSError(code, f"{os.strerror(code)}; {left}", str(path))


def json_bytes(obj: Any) -> bytes:
    """``obj`` as the indented JSON every file of this tool is written in."""
    return (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Serialise `obj` as indented JSON and write it atomically."""
    atomic_write_bytes(path, json_bytes(obj))


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
