"""Building datasets: ``make-shards`` (ImageFolder, a manifest's shards or built-in digits ->
shuffled WebDataset shards and their manifest).

Shards are first written under temporary names and only renamed into place, followed by the
manifest, once every shard is complete. A bad image or a full disk therefore leaves any earlier
dataset of the same name untouched and never produces a manifest that claims unwritten shards.
Shards for a bucket (``s3://``, ``gs://``) are written to a local temporary folder one at a time,
each uploaded (and its local copy removed) as soon as it is complete; the manifest still comes
last, so it never lists a shard that is not there.

Memory does not grow with the data: images are encoded by a pool of processes through a window
of at most ``ENCODE_WINDOW`` per process in flight and a quarter of ``--max-memory-mb`` of their
bytes, written as they come, and a manifest's
shards are shuffled through files on disk (``data.reshard``), never held in memory.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
import tempfile
from collections import Counter, deque
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from civt_cache.data.imageio import check_image_size, to_rgb
from civt_cache.data.manifest import DataManifest, ShardInfo
from civt_cache.data.remote import upload_file
from civt_cache.data.spread import LabelSpread
from civt_cache.errors import BadImageError, ConfigError
from civt_cache.fsutil import out_of_space, sha256_file
from civt_cache.stopping import check_stop, ignore_stop_signals, say_kept
from civt_cache.progress import Progress

JPEG_QUALITY = 95
#: make-shards' memory bound (``--max-memory-mb``): a few ImageNet shards' worth, far under any
#: training machine's memory.
DEFAULT_MAX_MEMORY_MB = 2048
#: Images in flight per encoding process: enough to keep every process busy while the parent
#: writes, few enough that memory is a few images per process whatever the data's size.
ENCODE_WINDOW = 16


@dataclass(frozen=True)
class SourceItem:
    """One input sample: a stable key, its label, where it came from, and its raw bytes loader."""

    key: str
    label: int
    origin: str  # a file path or a description, used in error messages and `skipped`
    data: bytes | None = None  # in-memory sources; files are read lazily in the workers


def encode_rgb_jpeg(data: bytes, origin: str) -> tuple[bytes, bool]:
    """Return (JPEG bytes, kept_as_is). RGB JPEGs are kept byte for byte; others are decoded,
    converted to RGB and encoded once at quality 95. Raises BadImageError naming ``origin``."""
    if not data:
        raise BadImageError(f"{origin}: empty file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            check_image_size(im.size, origin)
            im.load()  # full decode: catches truncated files that open() alone accepts
            if im.format == "JPEG" and im.mode == "RGB":
                return data, True
            rgb = to_rgb(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImageError(f"{origin}: cannot decode image ({type(e).__name__}: {e})") from None
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue(), False


def _encode_item(item: SourceItem) -> tuple[bytes, bool] | BadImageError:
    """Worker body: read and encode one item; a bad image or unreadable file (broken link,
    link loop, permission, I/O error) is returned, not raised, so the parent decides between
    stopping and skipping."""
    try:
        data = item.data if item.data is not None else Path(item.origin).read_bytes()
        return encode_rgb_jpeg(data, item.origin)
    except BadImageError as e:
        return e
    except OSError as e:
        return BadImageError(f"{item.origin}: cannot read file ({e.strerror or e})")


def file_key(relpath: str) -> str:
    """Stable, unique, dot-free key for a file: a hash of its path relative to the source root."""
    return "f" + hashlib.blake2b(relpath.encode(), digest_size=8).hexdigest()


def image_folder_items(root: Path, names: list[str] | None = None) -> tuple[list[str], list[SourceItem]]:
    """Classes and one item per file below their folders (hidden files ignored). The classes are
    ``names`` (a ``--classes`` file: every split numbered alike, also one that lacks a class's
    folder), else the sorted folder names."""
    if not root.is_dir():
        raise ConfigError(f"{root}: not a directory (expected one folder per class)")
    folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise ConfigError(f"{root}: no class folders found (expected one folder per class, each holding its images)")
    classes = folders if names is None else names
    unknown = sorted(set(folders) - set(classes))
    if unknown:
        raise ConfigError(f"{root}: class folder(s) {unknown[:3]} are not among the {len(classes)} --classes names")
    items: list[SourceItem] = []
    held = set(folders)
    for label, cls in enumerate(classes):
        if cls not in held:
            continue
        for dirpath, dirnames, filenames in os.walk(root / cls):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in sorted(filenames):
                if fn.startswith("."):
                    continue
                path = Path(dirpath) / fn
                items.append(SourceItem(file_key(str(path.relative_to(root))), label, str(path)))
    keys = {it.key for it in items}
    if len(keys) != len(items):
        raise ConfigError(f"{root}: key collision between file paths (hash clash)")
    return classes, items


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0
    return info


def listed_path(path: Path, manifest_path: Path | str) -> str:
    """How a manifest lists a local shard: relative to a manifest file's folder, absolute for a
    manifest in a bucket."""
    if isinstance(manifest_path, str):
        return str(path.resolve())
    return os.path.relpath(path.resolve(), manifest_path.resolve().parent)


class _ShardSink:
    """The shards being written: tar files under temporary names in ``folder``. A complete shard
    bound for a ``bucket`` is uploaded at once (its local copy removed); local ones are renamed
    into place only by ``finish``, once every shard is complete."""

    def __init__(self, folder: Path, name: str, bucket: str | None) -> None:
        self.folder, self.name, self.bucket = folder, name, bucket
        self.partials: list[tuple[Path, Path, int]] = []  # (temp path, final path, samples)
        self.uploaded: dict[Path, ShardInfo] = {}  # shards already in the bucket
        self.writer: tarfile.TarFile | None = None
        self.labels: list[Counter] = []  # each shard's label counts: the manifest's label spread

    def add(self, key: str, jpeg: bytes, label: int, shard_size: int) -> None:
        if self.writer is None or self.partials[-1][2] == shard_size:
            self.close()
            final = self.folder / f"{self.name}-{len(self.partials):06d}.tar"
            self.partials.append((self.folder / f".{final.name}.partial", final, 0))
            self.writer = tarfile.open(self.partials[-1][0], "w", format=tarfile.USTAR_FORMAT)
            self.labels.append(Counter())
        self.labels[-1][label] += 1
        try:
            for ext, payload in (("jpg", jpeg), ("cls", str(label).encode())):
                self.writer.addfile(_tarinfo(f"{key}.{ext}", len(payload)), io.BytesIO(payload))
        except OSError as e:  # a full disk: named with the shard's final name and the space left
            full = out_of_space(e, self.partials[-1][1])
            if full is not None:
                raise full from None
            raise
        tmp, final, n = self.partials[-1]
        self.partials[-1] = (tmp, final, n + 1)

    def close(self, complete: bool = True) -> None:
        """Close the shard being written; a complete one bound for a bucket goes there now."""
        if self.writer is None:
            return
        tmp, final, n = self.partials[-1]
        try:
            self.writer.close()
        except OSError as e:
            full = out_of_space(e, final)
            if full is not None:
                raise full from None
            raise
        finally:
            self.writer = None
        if self.bucket and complete and n:
            url = f"{self.bucket.rstrip('/')}/{final.name}"
            self.uploaded[final] = ShardInfo(url, n, tmp.stat().st_size, sha256_file(tmp))
            upload_file(str(tmp), url)
            tmp.unlink()

    def finish(self, manifest_path: Path | str) -> list[ShardInfo]:
        """Every shard in place, as the manifest lists them."""
        self.close()
        shards = []
        for tmp, final, n in self.partials:
            if final in self.uploaded:
                shards.append(self.uploaded[final])
                continue
            os.replace(tmp, final)
            shards.append(ShardInfo(listed_path(final, manifest_path), n, final.stat().st_size,
                                    sha256_file(final)))
        return shards

    def discard(self) -> None:
        """After an error: no partial shard is kept (nor uploaded), also when closing the one
        being written fails again (a full disk fails its last flush too)."""
        try:
            self.close(complete=False)
        except OSError:
            pass
        finally:
            self.writer = None
            for tmp, _, _ in self.partials:
                tmp.unlink(missing_ok=True)


def write_shards(items: Sequence[SourceItem], classes: list[str], out_dir: Path | str, name: str,
                 shard_size: int, seed: int, source: str, manifest_path: Path | str,
                 skip_bad: bool = False, workers: int = 0, max_memory_mb: int = DEFAULT_MAX_MEMORY_MB) -> DataManifest:
    """Shuffle ``items`` with ``seed``, write them as shards of ``shard_size`` (into a folder or
    an s3:// / gs:// prefix) and the manifest (a file or a URL).

    See the module docstring for the all-or-nothing guarantee.
    """
    order = np.random.default_rng(seed).permutation(len(items))
    return write_stream((items[i] for i in order), len(items), classes, out_dir, name, shard_size, seed, source,
                        manifest_path, skip_bad, workers, max_memory_mb)


def write_stream(stream: Iterable[SourceItem], total: int, classes: list[str], out_dir: Path | str, name: str,
                 shard_size: int, seed: int, source: str, manifest_path: Path | str,
                 skip_bad: bool = False, workers: int = 0, max_memory_mb: int = DEFAULT_MAX_MEMORY_MB) -> DataManifest:
    """Write ``total`` items, in the order ``stream`` gives them (already shuffled), as shards of
    ``shard_size`` and their manifest; a quarter of ``max_memory_mb`` bounds the images in
    flight to the encoding processes (their bytes, and as much again for their results)."""
    if shard_size < 1:
        raise ConfigError(f"make-shards: --shard-size {shard_size}: must be >= 1")
    say_kept(lambda: f"make-shards publishes the shards of {name} and their manifest once all are written, so "
                     "nothing of them is kept (no partial shard is left); the same command starts again")
    bucket = out_dir if isinstance(out_dir, str) else None
    folder = Path(tempfile.mkdtemp(prefix="civt-shards-")) if bucket else Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    workers = workers or min(8, os.cpu_count() or 1)
    skipped: list[dict[str, str]] = []
    counts = {"jpeg_as_is": 0, f"reencoded_jpeg_q{JPEG_QUALITY}": 0}
    sink = _ShardSink(folder, name, bucket)
    pool = ProcessPoolExecutor(workers, initializer=ignore_stop_signals) if workers > 1 and total > 64 else None
    try:
        bar = Progress(total, f"make-shards {name}", "images")
        for item, result in windowed(_encode_item, stream, pool, ENCODE_WINDOW * workers, max_memory_mb * 2**18,
                                     item_bytes):
            check_stop()
            bar.update(1)
            if isinstance(result, BadImageError):
                if not skip_bad:
                    raise result
                skipped.append({"file": item.origin, "reason": str(result)})
                continue
            jpeg, as_is = result
            counts["jpeg_as_is" if as_is else f"reencoded_jpeg_q{JPEG_QUALITY}"] += 1
            sink.add(item.key, jpeg, item.label, shard_size)
        bar.close()
        if not sink.partials:
            raise BadImageError(f"{source}: no readable images")
        shards = sink.finish(manifest_path)
    except BaseException:
        sink.discard()
        raise
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
        if bucket:
            shutil.rmtree(folder, ignore_errors=True)
    manifest = DataManifest(name=name, classes=classes, shards=shards, source=source, seed=seed,
                            encoding=counts, skipped=skipped,
                            label_spread=LabelSpread.of(sink.labels, len(classes)))
    manifest.save(manifest_path)
    return manifest


def windowed(fn: Callable, items: Iterable, pool: Executor | None, window: int, max_bytes: int = 0,
             size: Callable[[Any], int] = lambda item: 0) -> Iterator[tuple]:
    """``(item, fn(item))`` in the items' order, at most ``window`` items and about ``max_bytes``
    of them (``size``; 0: no byte bound; one item always goes) in flight in ``pool`` (in this
    process without one). ``Executor.map`` would submit every item at once: a million file
    names and their results held until written."""
    if pool is None:
        yield from ((item, fn(item)) for item in items)
        return
    pending: deque = deque()
    held = 0
    for item in items:
        nbytes = size(item)
        while pending and (len(pending) >= window or (max_bytes and held + nbytes > max_bytes)):
            head, future, done = pending.popleft()
            held -= done
            yield head, future.result()
        pending.append((item, pool.submit(fn, item), nbytes))
        held += nbytes
    while pending:
        head, future, _ = pending.popleft()
        yield head, future.result()


def item_bytes(item: SourceItem) -> int:
    """An item's encoded size before it is read (its file's size), for the encoding window."""
    if item.data is not None:
        return len(item.data)
    try:
        return os.stat(item.origin).st_size
    except OSError:
        return 0  # the worker reads it and reports the error with the file's name


def iter_in_memory(images: Iterable[tuple[str, int, bytes]], origin: str) -> Iterator[SourceItem]:
    """Adapt (key, label, encoded bytes) triples of a built-in source to SourceItems."""
    for key, label, data in images:
        yield SourceItem(key, label, f"{origin}:{key}", data)

