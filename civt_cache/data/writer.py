"""Building datasets: ``make-shards`` (ImageFolder or built-in digits -> WebDataset shards) and
``scan-shards`` (a manifest for shards made elsewhere).

Shards are first written under temporary names and only renamed into place, followed by the
manifest, once every shard is complete. A bad image or a full disk therefore leaves any earlier
dataset of the same name untouched and never produces a manifest that claims unwritten shards.
"""
from __future__ import annotations

import glob
import hashlib
import io
import os
import tarfile
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
from civt_cache.data.manifest import MAX_CLASSES, MAX_SHARD_BYTES, DataManifest, ShardInfo
from civt_cache.data.remote import expand_remote, remote_scheme
from civt_cache.data.shards import iter_tar_samples, read_shard_bytes
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


def write_shards(items: Sequence[SourceItem], classes: list[str], out_dir: Path, name: str,
                 shard_size: int, seed: int, source: str, manifest_path: Path,
                 skip_bad: bool = False, workers: int = 0) -> DataManifest:
    """Shuffle ``items`` with ``seed``, write them as shards of ``shard_size`` and the manifest.

    See the module docstring for the all-or-nothing guarantee.
    """
    if shard_size < 1:
        raise ConfigError(f"make-shards: --shard-size {shard_size}: must be >= 1")
    out_dir.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(seed).permutation(len(items))
    shuffled = [items[i] for i in order]
    workers = workers or min(8, os.cpu_count() or 1)
    skipped: list[dict[str, str]] = []
    counts = {"jpeg_as_is": 0, f"reencoded_jpeg_q{JPEG_QUALITY}": 0}
    partials: list[tuple[Path, Path, int]] = []  # (temp path, final path, samples)
    writer: tarfile.TarFile | None = None
    in_shard = 0

    def close_current() -> None:
        nonlocal writer
        if writer is not None:
            writer.close()
            writer = None

    def open_next() -> None:
        nonlocal writer, in_shard
        final = out_dir / f"{name}-{len(partials):06d}.tar"
        tmp = out_dir / f".{final.name}.partial"
        partials.append((tmp, final, 0))
        writer = tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT)
        in_shard = 0

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
            if writer is None or in_shard == shard_size:
                close_current()
                open_next()
            assert writer is not None
            for ext, payload in (("jpg", jpeg), ("cls", str(item.label).encode())):
                writer.addfile(_tarinfo(f"{item.key}.{ext}", len(payload)), io.BytesIO(payload))
            in_shard += 1
            tmp, final, _ = partials[-1]
            partials[-1] = (tmp, final, in_shard)
        bar.close()
        close_current()
        if not partials:
            raise BadImageError(f"{source}: no readable images")
        shards = []
        for tmp, final, n in partials:
            os.replace(tmp, final)
            shards.append(ShardInfo(os.path.relpath(final, manifest_path.resolve().parent), n,
                                    final.stat().st_size, sha256_file(final)))
    except BaseException:
        close_current()
        for tmp, _, _ in partials:
            tmp.unlink(missing_ok=True)
        raise
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
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


def scan_shards(pattern: str, name: str, manifest_path: Path,
                classes: list[str] | None = None) -> DataManifest:
    """Count and check every sample of existing shards and write their manifest."""
    remote = remote_scheme(pattern) is not None
    paths: Sequence[Path | str] = expand_remote(pattern) if remote else expand_shard_pattern(pattern)
    shards, max_label, label_counts = [], -1, []
    bar = Progress(len(paths), f"scan-shards {name}", "shards")
    for path in paths:
        data = read_shard_bytes(path, MAX_SHARD_BYTES + 1)  # one read: samples and sha256
        n, counts = 0, Counter()
        for sample in iter_tar_samples(io.BytesIO(data), str(path), len(classes) if classes else MAX_CLASSES):
            n += 1
            counts[sample.label] += 1
            max_label = max(max_label, sample.label)
        if n == 0:
            raise ShardError(f"{path}: holds no samples")
        label_counts.append(counts)
        where = str(path) if remote else os.path.relpath(Path(path).resolve(), manifest_path.resolve().parent)
        shards.append(ShardInfo(where, n, len(data), sha256_bytes(data)))
        bar.update(1)
    bar.close()
    if classes is None:
        classes = [str(i) for i in range(max_label + 1)]
    manifest = DataManifest(name=name, classes=classes, shards=shards, source=f"scan:{pattern}")
    manifest.save(manifest_path)
    warning = class_sorted_warning(paths, label_counts)
    if warning:
        warnings.warn(warning, ShardOrderWarning, stacklevel=2)
    return manifest


class ShardOrderWarning(UserWarning):
    """Shards whose samples are grouped by class (see ``class_sorted_warning``)."""


def class_sorted_warning(paths: Sequence[Path | str], label_counts: Sequence[Counter]) -> str | None:
    """A warning when most shards hold far fewer classes than shuffled data would.

    Shards made by other tools are often written class by class. Stage two reads a shard at a
    time and pairs Mixup/CutMix partners inside a shard (DESIGN.md), so such shards give
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
             "Rewrite them shuffled with `civt-cache make-shards` (recommended). Label spread:"]
    lines += [f"  {os.path.basename(str(p))}: {n} samples, {k} classes (about {e:.0f} if shuffled), largest class "
              f"{100 * top:.0f}%" for p, n, k, e, top in spread[:8]]
    if len(spread) > 8:
        lines.append(f"  ... and {len(spread) - 8} more shards")
    return "\n".join(lines)


def iter_in_memory(images: Iterable[tuple[str, int, bytes]], origin: str) -> Iterator[SourceItem]:
    """Adapt (key, label, encoded bytes) triples of a built-in source to SourceItems."""
    for key, label, data in images:
        yield SourceItem(key, label, f"{origin}:{key}", data)

