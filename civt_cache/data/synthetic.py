"""Synthetic data shaped like ImageNet, for benchmarks anyone can run without the data set.

What costs time in both stages is shaped by the files, not by their content: JPEG decode scales
with pixels and bytes, crops with the source size, the cache with the class count. So the
images here have ImageNet's shape: 1000 classes, short side 333-500 px at a 4:3 (or 3:4)
aspect, about 100 KB each (a smooth colour field plus grain, JPEG quality 90), written as
shards of 1,250 like the usual ImageNet WebDataset layout. Their labels are random, so nothing
here says anything about accuracy.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from civt_cache.data.manifest import DataManifest
from civt_cache.data.writer import SourceItem, iter_in_memory, write_shards

IMAGENET_CLASSES = 1000
IMAGENET_SHARD_SIZE = 1250
SHORT_SIDE = (333, 500)
JPEG_QUALITY = 90
_CELL = 8      # px per cell of the smooth colour field
_GRAIN = 10.0  # std of the per-pixel grain, in 8-bit levels (sets the JPEG size, ~100 KB)


def photo_like_jpeg(rng: np.random.Generator) -> bytes:
    """One JPEG of ImageNet's typical size and bytes (see the module docstring)."""
    short = int(rng.integers(SHORT_SIDE[0], SHORT_SIDE[1] + 1))
    long = int(round(short * 4 / 3))
    w, h = (long, short) if rng.random() < 0.75 else (short, long)  # most photos are landscape
    field = rng.integers(0, 256, (h // _CELL + 1, w // _CELL + 1, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(field).resize((w, h), Image.BICUBIC), dtype=np.float32)
    pixels = np.clip(smooth + rng.normal(0.0, _GRAIN, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def imagenet_like_items(samples: int, seed: int = 0) -> tuple[list[str], list[SourceItem]]:
    """Class names and ``samples`` in-memory items with random labels over 1000 classes."""
    rng = np.random.default_rng(seed)
    classes = [f"n{c:08d}" for c in range(IMAGENET_CLASSES)]
    triples = [(f"synth{i:08d}", int(rng.integers(IMAGENET_CLASSES)), photo_like_jpeg(rng))
               for i in range(samples)]
    return classes, list(iter_in_memory(triples, "synthetic-imagenet"))


def write_imagenet_like(out_dir: Path, samples: int, seed: int = 0, workers: int = 0) -> DataManifest:
    """Shards of 1,250 synthetic ImageNet-shaped samples and their manifest, in ``out_dir``."""
    classes, items = imagenet_like_items(samples, seed)
    return write_shards(items, classes, out_dir / "shards", "synthetic-imagenet",
                        IMAGENET_SHARD_SIZE, seed, "civt_cache.synthetic (ImageNet-shaped)",
                        out_dir / "synthetic-imagenet.json", workers=workers)
