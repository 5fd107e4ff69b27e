"""Building datasets: ``make-shards`` (ImageFolder or built-in digits -> WebDataset shards) and
``scan-shards`` (a manifest for shards made elsewhere).

Shards are first written under temporary names and only renamed into place, followed by the
manifest, once every shard is complete. A bad image or a full disk therefore leaves any earlier
dataset of the same name untouched and never produces a manifest that claims unwritten shards.
Shards for a bucket (``s3://``, ``gs://``) are written to a local temporary folder one at a time,
each uploaded (and its local copy removed) as soon as it is complete; the manifest still comes
last, so it never lists a shard that is not there.
"""
from __future__ import annotations

import glob
import hashlib
import io
import os
import shutil
import tarfile
import tempfile
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from braceexpand import braceexpand
from PIL import Image

from civt_cache.data.imageio import check_image_size, to_rgb
from civt_cache.data.manifest import (
    MAX_CLASSES,
    MAX_SHARD_BYTES,
    DataManifest,
    ShardInfo,
    check_label_key,
    class_difference,
)
from civt_cache.data.remote import expand_remote, remote_scheme, upload_file
from civt_cache.data.shards import iter_tar_samples, read_shard_bytes, unpacked
from civt_cache.errors import BadImageError, ConfigError, ShardError
from civt_cache.fsutil import sha256_bytes, sha256_file
from civt_cache.progress import Progress

JPEG_QUALITY = 95



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


def image_folder_items(root: Path) -> tuple[list[str], list[SourceItem]]:
    """Classes (sorted folder names) and one item per file below them (hidden files ignored)."""
    if not root.is_dir():
        raise ConfigError(f"{root}: not a directory (expected one folder per class)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ConfigError(f"{root}: no class folders found (expected one folder per class, each holding its images)")
    items: list[SourceItem] = []
    for label, cls in enumerate(classes):
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


def _listed_path(path: Path, manifest_path: Path | str) -> str:
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

    def add(self, key: str, jpeg: bytes, label: int, shard_size: int) -> None:
        if self.writer is None or self.partials[-1][2] == shard_size:
            self.close()
            final = self.folder / f"{self.name}-{len(self.partials):06d}.tar"
            self.partials.append((self.folder / f".{final.name}.partial", final, 0))
            self.writer = tarfile.open(self.partials[-1][0], "w", format=tarfile.USTAR_FORMAT)
        for ext, payload in (("jpg", jpeg), ("cls", str(label).encode())):
            self.writer.addfile(_tarinfo(f"{key}.{ext}", len(payload)), io.BytesIO(payload))
        tmp, final, n = self.partials[-1]
        self.partials[-1] = (tmp, final, n + 1)

    def close(self, complete: bool = True) -> None:
        """Close the shard being written; a complete one bound for a bucket goes there now."""
        if self.writer is None:
            return
        self.writer.close()
        self.writer = None
        tmp, final, n = self.partials[-1]
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
            shards.append(ShardInfo(_listed_path(final, manifest_path), n, final.stat().st_size,
                                    sha256_file(final)))
        return shards

    def discard(self) -> None:
        """After an error: no partial shard is kept (nor uploaded)."""
        self.close(complete=False)
        for tmp, _, _ in self.partials:
            tmp.unlink(missing_ok=True)


def write_shards(items: Sequence[SourceItem], classes: list[str], out_dir: Path | str, name: str,
                 shard_size: int, seed: int, source: str, manifest_path: Path | str,
                 skip_bad: bool = False, workers: int = 0) -> DataManifest:
    """Shuffle ``items`` with ``seed``, write them as shards of ``shard_size`` (into a folder or
    an s3:// / gs:// prefix) and the manifest (a file or a URL).

    See the module docstring for the all-or-nothing guarantee.
    """
    if shard_size < 1:
        raise ConfigError(f"make-shards: --shard-size {shard_size}: must be >= 1")
    bucket = out_dir if isinstance(out_dir, str) else None
    folder = Path(tempfile.mkdtemp(prefix="civt-shards-")) if bucket else Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(seed).permutation(len(items))
    shuffled = [items[i] for i in order]
    workers = workers or min(8, os.cpu_count() or 1)
    skipped: list[dict[str, str]] = []
    counts = {"jpeg_as_is": 0, f"reencoded_jpeg_q{JPEG_QUALITY}": 0}
    sink = _ShardSink(folder, name, bucket)
    pool = ProcessPoolExecutor(workers) if workers > 1 and len(items) > 64 else None
    try:
        encoded: Iterable = (pool.map(_encode_item, shuffled, chunksize=16) if pool
                             else map(_encode_item, shuffled))
        bar = Progress(len(shuffled), f"make-shards {name}", "images")
        for item, result in zip(shuffled, encoded):
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
                            encoding=counts, skipped=skipped)
    manifest.save(manifest_path)
    return manifest


def expand_shard_pattern(pattern: str) -> list[Path]:
    """A directory (all ``*.tar`` in it, sorted), a brace pattern, or a glob, in stable order."""
    p = Path(pattern)
    if p.is_dir():
        paths = sorted(p.glob("*.tar"))
    elif "{" in pattern:
        paths = [Path(s) for s in braceexpand(pattern)]
        missing = [str(x) for x in paths if not x.exists()]
        if missing:
            raise ShardError(f"{pattern}: {len(missing)} shard(s) missing, e.g. {missing[0]}")
    else:
        paths = [Path(s) for s in sorted(glob.glob(pattern))]
    if not paths:
        raise ShardError(f"{pattern}: matches no shard files")
    return paths


def scan_shards(pattern: str, name: str, manifest_path: Path | str,
                classes: list[str] | None = None, like: DataManifest | None = None,
                label_key: str = "cls") -> DataManifest:
    """Count and check every sample of existing shards and write their manifest. ``like``: the
    manifest of another split of the same data (the training one): its classes are used when
    ``classes`` is not given, and a split holding fewer of them, or other names, is warned of
    (``ClassesWarning``): a val split numbered on its own would score against the wrong names."""
    check_label_key(label_key, "--label-key")
    if classes is None and like is not None:
        classes = like.classes
    remote = remote_scheme(pattern) is not None
    paths: Sequence[Path | str] = expand_remote(pattern) if remote else expand_shard_pattern(pattern)
    shards, max_label, label_counts = [], -1, []
    bar = Progress(len(paths), f"scan-shards {name}", "shards")
    for path in paths:
        data = read_shard_bytes(path, MAX_SHARD_BYTES + 1)  # one read: samples and sha256
        n, counts = 0, Counter()
        tar = unpacked(data, str(path))
        for sample in iter_tar_samples(io.BytesIO(tar), str(path), len(classes) if classes else MAX_CLASSES,
                                       label_key):
            n += 1
            counts[sample.label] += 1
            max_label = max(max_label, sample.label)
        if n == 0:
            raise ShardError(f"{path}: holds no samples")
        label_counts.append(counts)
        where = str(path) if remote else _listed_path(Path(path), manifest_path)
        shards.append(ShardInfo(where, n, len(data), sha256_bytes(data)))
        bar.update(1)
    bar.close()
    if classes is None:
        classes = [str(i) for i in range(max_label + 1)]
    manifest = DataManifest(name=name, classes=classes, shards=shards, source=f"scan:{pattern}",
                            label_key=label_key)
    manifest.save(manifest_path)
    warning = class_sorted_warning(paths, label_counts)
    if warning:
        warnings.warn(warning, ShardOrderWarning, stacklevel=2)
    if like is not None:
        held = len(set().union(*label_counts))
        diff = class_difference(like.classes, classes)
        if diff is not None:
            warnings.warn(f"{manifest_path}: its classes differ from {like.name}'s ({diff})", ClassesWarning,
                          stacklevel=2)
        elif held < like.num_classes:
            warnings.warn(f"{manifest_path}: holds samples of {held} of {like.name}'s {like.num_classes} "
                          "classes", ClassesWarning, stacklevel=2)
    return manifest


class ClassesWarning(UserWarning):
    """A split whose classes do not cover, or do not match, another split's."""


class ShardOrderWarning(UserWarning):
    """Shards whose samples are grouped by class (see ``class_sorted_warning``)."""


def class_sorted_warning(paths: Sequence[Path | str], label_counts: Sequence[Counter]) -> str | None:
    """A warning when most shards hold far fewer classes than shuffled data would.

    Shards made by other tools are often written class by class. Stage two reads a shard at a
    time and pairs Mixup/CutMix partners inside a shard (docs/cache-format.md), so such shards give
    single-class batches and single-class mixing partners. A shard of n samples drawn from the
    data's label distribution p would hold sum_c 1 - (1 - p_c)^n classes on average; a shard with
    less than half of that counts as sorted."""
    total = Counter()
    for counts in label_counts:
        total.update(counts)
    n_all = sum(total.values())
    if len(total) < 2:
        return None
    spread = []
    for path, counts in zip(paths, label_counts):
        n = sum(counts.values())
        expected = sum(1.0 - (1.0 - c / n_all) ** n for c in total.values())
        spread.append((path, n, len(counts), expected, max(counts.values()) / n))
    sorted_like = [row for row in spread if row[2] < 0.5 * row[3]]
    if 2 * len(sorted_like) < len(spread):
        return None
    lines = [f"{len(sorted_like)} of {len(spread)} shards look sorted by class: batches and "
             "Mixup/CutMix partners (paired inside a shard) would be nearly single-class. "
             "Rewrite them shuffled: `civt-cache make-shards MANIFEST OUT_DIR --name NAME` (recommended). Label spread:"]
    lines += [f"  {os.path.basename(str(p))}: {n} samples, {k} classes (about {e:.0f} if shuffled), largest class "
              f"{100 * top:.0f}%" for p, n, k, e, top in spread[:8]]
    if len(spread) > 8:
        lines.append(f"  ... and {len(spread) - 8} more shards")
    return "\n".join(lines)


def manifest_items(manifest: DataManifest) -> list[SourceItem]:
    """Every sample of a manifest's shards (each read once, its sha256 checked) as items to
    write anew: ``make-shards MANIFEST OUT`` rewrites shards made elsewhere (e.g. sorted by
    class) shuffled. The encoded images are held in memory until written, so a data set over
    half of this machine's memory is refused with its size."""
    from civt_cache.data.shards import read_shard

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    size = sum(s.bytes for s in manifest.shards)
    if size > memory // 2:
        raise ConfigError(f"{manifest.location}: {size / 2**30:.1f} GiB of shards; rewriting holds them in memory, "
                          f"more than half of this machine's {memory / 2**30:.1f} GiB")
    items = []
    for shard in range(len(manifest.shards)):
        path = manifest.shard_path(shard)
        items += [SourceItem(s.key, s.label, f"{path}: sample {s.key!r}", s.image) for s in read_shard(manifest, shard)]
    return items


def iter_in_memory(images: Iterable[tuple[str, int, bytes]], origin: str) -> Iterator[SourceItem]:
    """Adapt (key, label, encoded bytes) triples of a built-in source to SourceItems."""
    for key, label, data in images:
        yield SourceItem(key, label, f"{origin}:{key}", data)

