"""Shards and manifests in object storage or on a web server (``s3://``, ``gs://``, ``https://``), read through
fsspec (s3fs, gcsfs, its HTTP filesystem), which take the endpoint and credentials from the
standard environment every tool of those stores reads (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``; ``GOOGLE_APPLICATION_CREDENTIALS``).

A shard is read whole with one request, as a local one is, and its sha256 is taken from those
bytes: never a second read. Transient failures (timeouts, connection resets, 5xx, throttling)
are retried with backoff, then reported naming the object; a missing object is reported at once.
"""
from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from typing import TypeVar

from braceexpand import braceexpand

from civt_cache.errors import CivtError, ConfigError, ManifestError, ShardError
from civt_cache.fsutil import url_host

#: Schemes shards may be read from, as WebDataset users write them: object stores, https,
#: ``file://`` and ``pipe:COMMAND`` (a shell command whose output is the shard; it runs only
#: with PIPE_ENV=1, since a manifest from elsewhere could name any command). Anything else
#: with ``://`` is refused.
REMOTE_SCHEMES = ("s3", "gs", "gcs", "http", "https", "file", "pipe")
PIPE_ENV = "CIVT_ALLOW_PIPE"
#: Where a cache may live besides a folder (https is read-only and cannot list: no cache's home).
CACHE_SCHEMES = ("s3", "gs", "gcs")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
RETRIES = 4
T = TypeVar("T")


def remote_scheme(text: str) -> str | None:
    """The scheme of a URL this module reads (``s3``...), else None."""
    if text.startswith("pipe:"):
        return "pipe"
    m = _SCHEME.match(text)
    return m.group(1).lower() if m and m.group(1).lower() in REMOTE_SCHEMES else None


def require_pipe_allowed(url: str) -> None:
    """Refuse a ``pipe:`` URL unless PIPE_ENV=1: checked when a manifest's shards are first
    looked at, before a command creates anything, and again where the command runs."""
    if os.environ.get(PIPE_ENV) != "1":
        raise ConfigError(f"{url}: a pipe: URL runs a shell command; set {PIPE_ENV}=1 to allow it")


def _pipe_bytes(url: str, limit: int) -> bytes:
    """The output of a ``pipe:`` URL's command (run by webdataset's ``gopen``, as WebDataset
    runs it), at most ``limit`` bytes; a command that fails is an error naming it."""
    import webdataset

    require_pipe_allowed(url)
    try:
        with webdataset.gopen(url, "rb") as stream:
            parts, held = [], 0
            while held < limit:
                part = stream.read(min(1 << 24, limit - held))
                if not part:
                    break
                parts.append(part)
                held += len(part)
        return b"".join(parts)
    except Exception as e:  # gopen reports a command's exit status as a plain exception
        raise ShardError(f"{url}: the command failed ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _fs(url: str):  # noqa: ANN202  (an fsspec filesystem)
    import fsspec

    return fsspec.filesystem(remote_scheme(url) or "file")


def _transient(e: BaseException) -> bool:
    """Worth another try: the network or the service (I/O errors, timeouts, throttling, 5xx),
    not the request (missing and denied objects never get here: ``with_retries`` names them)."""
    if isinstance(e, IsADirectoryError):
        return False
    text = f"{type(e).__name__} {e}".lower()
    return isinstance(e, OSError) or any(
        k in text for k in ("timeout", "throttl", "slowdown", "503", "500", "502", "504", "connection"))


def with_retries(what: str, url: str, call: Callable[[], T], delay: float = 0.5,
                 error: type[Exception] = ManifestError) -> T:
    """``call()``, retried with exponential backoff on transient errors; then one ``error`` that
    names the object and what failed."""
    for attempt in range(RETRIES):
        try:
            return call()
        except CivtError:  # already says what is wrong (a chunk that does not decode)
            raise
        except FileNotFoundError:
            raise error(f"{url}: {missing_what(url)}") from None
        except PermissionError as e:
            raise error(f"{url}: access denied ({e})") from None
        except Exception as e:  # noqa: BLE001 - the filesystems raise many kinds
            if not _transient(e) or attempt == RETRIES - 1:
                tries = f" after {attempt + 1} tries" if attempt else ""
                raise error(f"{url}: {what} failed{tries} ({type(e).__name__}: {e})") from None
            time.sleep(delay * 2 ** attempt)
    raise AssertionError("unreachable")


def missing_what(url: str) -> str:
    """What is missing when an object of ``url`` is not found: its bucket (one more request,
    made only then), or the object."""
    scheme = remote_scheme(url)
    if scheme in CACHE_SCHEMES:
        bucket = f"{scheme}://{url_host(url)}"
        try:
            if not _fs(bucket).exists(bucket):
                return f"the bucket {bucket} does not exist (or these credentials cannot see it)"
        except Exception:  # noqa: BLE001 - the check is a courtesy: the object is missing either way
            pass
    return "no such object"


def remote_size(url: str) -> int:
    """The object's size in bytes (one metadata request; a pipe: URL's output is read)."""
    if remote_scheme(url) == "pipe":
        return len(_pipe_bytes(url, 1 << 62))
    return int(with_retries("stat", url, lambda: _fs(url).info(url)["size"]))


def read_remote(url: str, limit: int) -> bytes:
    """At most ``limit`` bytes of the object from its start, in one request."""
    if remote_scheme(url) == "pipe":
        return _pipe_bytes(url, limit)
    if remote_scheme(url) == "file":
        path = url[len("file://"):]
        return with_retries("read", url, lambda: read_local(path, limit))
    return with_retries("read", url, lambda: _fs(url).cat_file(url, start=0, end=limit))


def read_local(path: str | os.PathLike, limit: int) -> bytes:
    """At most ``limit`` bytes of a local file; read(n) allocates n bytes first, so never more
    than the file holds."""
    with open(path, "rb") as f:
        return f.read(min(limit, os.fstat(f.fileno()).st_size + 1))


def write_remote(url: str, data: bytes) -> None:
    """Write the object whole, in one request (a reader sees the old object or the new one)."""
    with_retries("write", url, lambda: _fs(url).pipe_file(url, data))


def upload_file(local: str, url: str) -> None:
    """Copy a finished local file to the object ``url`` (multipart when large)."""
    with_retries("upload", url, lambda: _fs(url).put_file(local, url))


def expand_remote(pattern: str) -> list[str]:
    """Shard URLs of a brace pattern (``s3://b/train-{000000..000127}.tar``, each checked to
    exist) or a glob (``s3://b/train-*.tar``), in stable order."""
    scheme = remote_scheme(pattern)
    if scheme == "pipe":  # a command: its brace pattern names the shards, nothing can list them
        return list(braceexpand(pattern))
    if "{" in pattern:
        urls = list(braceexpand(pattern))
        missing = [u for u in urls if not with_retries("stat", u, lambda u=u: _fs(u).exists(u))]
        if missing:
            raise ShardError(f"{pattern}: {len(missing)} shard(s) missing, e.g. {missing[0]}")
    else:
        found = with_retries("list", pattern, lambda: _fs(pattern).glob(pattern))
        urls = sorted(u if _SCHEME.match(u) else f"{scheme}://{u}" for u in found)
    if not urls:
        raise ShardError(f"{pattern}: matches no shard files")
    return urls
