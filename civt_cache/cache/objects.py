"""Where a cache lives: a folder, or a prefix in object storage (``s3://bucket/cache``,
``gs://bucket/cache``). Everything a cache stores is an object under one root, and the cache
needs only these operations from the storage, so one protocol serves both:

- ``read`` / ``write`` a whole object (a write replaces it whole: temp file + rename on a disk, one
  PUT in a bucket, so a reader never sees half an object);
- ``create``: write an object only if its name is free, and say whether this call made it (an
  exclusive hard link of a finished temp file on a disk; a conditional PUT, ``If-None-Match: *``,
  on S3; a generation precondition on GCS). Commit records, leases and the cache's own metadata
  are made this way: no rename of a shared name, no lock;
- ``delete``, ``listing`` (names under a prefix with a version stamp each: one request per
  1,000 names in a bucket), and the zarr v3 store for the arrays (``LocalStore`` /
  ``FsspecStore``).

Object stores take the endpoint and credentials from the standard environment
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...; ``GOOGLE_APPLICATION_CREDENTIALS``). Transient
errors are retried with backoff (``data.remote.with_retries``) and then named.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from civt_cache.data.remote import CACHE_SCHEMES, remote_scheme, with_retries
from civt_cache.errors import CacheMismatchError
from civt_cache.fsutil import FILE_MODE, atomic_write_bytes, out_of_space


def cache_location(text: str | Path) -> str | Path:
    """A cache location as given: a URL stays text (a Path would fold ``s3://b`` into ``s3:/b``),
    anything else is a Path. A URL of another scheme is refused in one line."""
    if isinstance(text, Path):
        return text
    scheme = remote_scheme(text)
    if scheme is None:
        return Path(text)
    if scheme not in CACHE_SCHEMES:
        raise CacheMismatchError(f"{text}: a cache must be a folder or an s3:// / gs:// prefix "
                                 f"(a {scheme}:// server can neither list nor take writes)")
    return text.rstrip("/")


class CacheRoot:
    """The objects of one cache, named by keys relative to its root (``progress/s000000-b0000.json``)."""

    def __init__(self, location: str | Path) -> None:
        self.location = cache_location(location)
        self.local = isinstance(self.location, Path)
        self._fs: Any = None
        self._fs_pid = 0
        if self.local:
            self.scheme, self.base = "", str(self.location)
        else:
            self.scheme, _, self.base = str(self.location).partition("://")

    @property
    def fs(self) -> Any:
        """This process's fsspec filesystem of the store (None for a folder). Made in the
        process that uses it: an s3fs / gcsfs client holds an event loop and connections that
        a forked loader worker must not share (s3fs refuses: "not fork-safe"), so a root
        handed to a worker makes its own there."""
        if self.local:
            return None
        if self._fs is None or self._fs_pid != os.getpid():
            import fsspec

            self._fs = fsspec.filesystem(self.scheme, **self._options())
            self._fs_pid = os.getpid()
        return self._fs

    def __str__(self) -> str:
        return str(self.location)

    def name(self, key: str) -> str | Path:
        """What to print (and, on a disk, open) for ``key``."""
        return self.location / key if isinstance(self.location, Path) else f"{self.location}/{key}"

    def _remote(self, key: str) -> str:
        return f"{self.base}/{key}"

    def retry(self, what: str, key: str, call: Any) -> Any:
        """``call()`` on the object ``key``: in a bucket, transient errors are retried with
        backoff, then named; a disk's errors (full, read-only) are not transient: raised as they
        are, a full disk with the object's file named (zarr's writes do not name it)."""
        if self.local:
            try:
                return call()
            except (OSError, RuntimeError) as e:
                full = out_of_space(e, self.name(key))
                if full is not None:
                    raise full from None
                raise
        return with_retries(what, str(self.name(key)), call, error=CacheMismatchError)

    def read(self, key: str) -> bytes | None:
        """The object's bytes, or None when there is no such object."""
        if self.local:
            try:
                return Path(self.name(key)).read_bytes()
            except (FileNotFoundError, NotADirectoryError):
                return None

        def get() -> bytes | None:
            try:
                return self.fs.cat_file(self._remote(key))
            except FileNotFoundError:
                return None
        return self.retry("read", key, get)

    def exists(self, key: str) -> bool:
        if self.local:
            return Path(self.name(key)).is_file()
        return bool(self.retry("stat", key, lambda: self.fs.exists(self._remote(key))))

    def write(self, key: str, data: bytes) -> None:
        """Replace the object whole (readers see the old bytes or the new, never a mix)."""
        if self.local:
            atomic_write_bytes(self.name(key), data)
        else:
            self.retry("write", key, lambda: self.fs.pipe_file(self._remote(key), data))

    def create(self, key: str, data: bytes) -> bool:
        """Write the object only if ``key`` is free; True when this call created it. Exactly one
        of any number of racing creators gets True, and nobody sees it half-written."""
        if not self.local:
            def put() -> bool:
                try:
                    self.fs.pipe_file(self._remote(key), data, mode="create")
                    return True
                except FileExistsError:
                    return False
            return bool(self.retry("conditional create", key, put))
        final = Path(self.name(key))
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".new")
        try:
            try:  # the temp file whole first: a full disk fails here, before the key is touched
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            except OSError as e:
                full = out_of_space(e, final)
                if full is not None:
                    raise full from None
                raise
            os.chmod(tmp, FILE_MODE)
            try:
                os.link(tmp, final)
                return True
            except FileExistsError:
                return False
            except OSError:  # no hard links here (some network filesystems): O_EXCL create, then write;
                try:  # a reader meanwhile sees a short file (commit records and leases parse or wait)
                    out = os.open(final, os.O_CREAT | os.O_EXCL | os.O_WRONLY, FILE_MODE)
                except FileExistsError:
                    return False
                with os.fdopen(out, "wb") as f:
                    f.write(data)
                return True
        finally:
            os.unlink(tmp)

    def delete(self, key: str) -> None:
        """Remove the object if it is there."""
        if self.local:
            Path(self.name(key)).unlink(missing_ok=True)
            return

        def rm() -> None:
            try:
                self.fs.rm_file(self._remote(key))
            except FileNotFoundError:
                pass
        self.retry("delete", key, rm)

    def listing(self, prefix: str) -> dict[str, Any]:
        """Every object under the folder ``prefix`` (recursively), by key relative to the root,
        as (stamp, size); the stamp changes whenever the object is rewritten (ETag / generation
        in a bucket; mtime and inode on a disk): one request per 1,000 names in a bucket."""
        prefix = prefix.rstrip("/")
        if self.local:
            base, out = Path(self.name(prefix)), {}
            for dirpath, _, files in os.walk(base):
                for f in files:
                    if f.startswith("."):
                        continue  # temp files of writes in flight
                    full = Path(dirpath) / f
                    try:
                        st = full.stat()
                    except FileNotFoundError:
                        continue
                    out[full.relative_to(self.location).as_posix()] = (f"{st.st_mtime_ns}-{st.st_ino}", st.st_size)
            return out

        def find() -> dict[str, Any]:
            try:
                return self.fs.find(self._remote(prefix), detail=True)
            except FileNotFoundError:
                return {}
        found, cut = self.retry("list", prefix, find), len(self.base) + 1
        return {name[cut:]: (str(info.get("ETag") or info.get("etag") or info.get("generation")),
                             int(info.get("size", 0)))
                for name, info in found.items() if info.get("type", "file") == "file"}

    def zarr_store(self, read_only: bool) -> Any:
        """zarr v3's own store for this root."""
        from zarr.storage import FsspecStore, LocalStore

        if self.local:
            return LocalStore(self.base, read_only=read_only)
        return FsspecStore.from_url(str(self.location), read_only=read_only, storage_options=self._options())

    def _options(self) -> dict[str, Any]:
        """The filesystem's options: no listings cache (other processes add teachers and objects
        while this one runs); on S3, whole-object reads in one GET. s3fs otherwise asks each
        object's size first (a HEAD; a HEAD and a listing when the object is missing) to split
        large reads: three requests instead of one for a cache's small objects."""
        return {"use_listings_cache": False, **({"max_concurrency": 1} if self.scheme == "s3" else {})}
