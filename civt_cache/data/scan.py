"""``scan-shards``: a manifest for WebDataset shards made elsewhere, every sample checked and
the label spread over the shards recorded (``data.spread``), so shards written class by class are
warned of here and refused by both stages later."""
from __future__ import annotations

import glob
import io
import warnings
from collections import Counter
from pathlib import Path
from typing import Sequence

from braceexpand import braceexpand

from civt_cache.data.manifest import (
    MAX_CLASSES,
    MAX_SHARD_BYTES,
    DataManifest,
    ShardInfo,
    check_label_key,
    class_difference,
)
from civt_cache.data.remote import expand_remote, remote_scheme
from civt_cache.data.shards import iter_tar_samples, read_shard_bytes, unpacked
from civt_cache.data.spread import FIX, LabelSpread
from civt_cache.data.writer import listed_path
from civt_cache.errors import ShardError
from civt_cache.fsutil import sha256_bytes
from civt_cache.progress import Progress


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
                                       label_key, classes):
            n += 1
            counts[sample.label] += 1
            max_label = max(max_label, sample.label)
        if n == 0:
            raise ShardError(f"{path}: holds no samples")
        label_counts.append(counts)
        where = str(path) if remote else listed_path(Path(path), manifest_path)
        shards.append(ShardInfo(where, n, len(data), sha256_bytes(data)))
        bar.update(1)
    bar.close()
    if classes is None:
        classes = [str(i) for i in range(max_label + 1)]
    spread = LabelSpread.of(label_counts, len(classes))
    manifest = DataManifest(name=name, classes=classes, shards=shards, source=f"scan:{pattern}",
                            label_key=label_key, label_spread=spread)
    manifest.save(manifest_path)
    warning = spread.sorted_message([str(p) for p in paths], [s.num_samples for s in shards])
    if warning:
        warnings.warn(f"{warning}\nBoth stages refuse them; {FIX} (recommended).", ShardOrderWarning,
                      stacklevel=2)
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
    """Shards whose samples are grouped by class (``data.spread``)."""
