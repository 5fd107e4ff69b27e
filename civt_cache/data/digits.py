"""The built-in sources: scikit-learn's bundled handwritten digits (1,797 real 8x8 scans), as
the demo's 10 classes (``digits``) and as 100 classes of two digits side by side
(``digit-pairs``, the class is the pair), where a teacher's top-10 is a real cut of its classes.

Images are upscaled to 32x32 RGB so that the real pipeline (JPEG shards, RandomResizedCrop,
RandAugment, teachers with strided stems) has something meaningful to work on. The scans are
split into train/val with a fixed permutation, so every checkout builds byte-identical shards,
and a pair is made of two scans of one split only: no scan is both trained on and held out.
"""
from __future__ import annotations

import io
from typing import Callable

import numpy as np
from PIL import Image

from civt_cache.data.writer import SourceItem, iter_in_memory

DIGITS_SIZE = 32
VAL_FRACTION = 0.4  # 719 held-out digits: one sample is 0.14 points of top-1
SPLIT_SEED = 20220619  # fixed: the split is part of the dataset, not of a run
PAIRS_PER_CLASS = {"train": 24, "val": 10}  # 2,400 training pairs; 1,000 held out (0.1 points)
PAIRS_SEED = 20220620

Splits = dict[str, tuple[list[str], list[SourceItem]]]


def _scans(val_fraction: float) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(8x8 images on 0..16, labels, {'train': indices, 'val': indices}) of the fixed split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(data.target))
    n_val = int(round(len(perm) * val_fraction))
    return data.images, data.target, {"val": np.sort(perm[:n_val]), "train": np.sort(perm[n_val:])}


def _png(gray: np.ndarray, size: tuple[int, int]) -> bytes:
    """An 8x8 scan (0..16) resized bicubically to ``size`` (width, height), as RGB PNG bytes."""
    levels = np.clip(gray * (255.0 / 16.0) + 0.5, 0, 255).astype(np.uint8)
    return _encode(Image.fromarray(levels, "L").resize(size, Image.BICUBIC))


def _encode(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def digits_items(val_fraction: float = VAL_FRACTION) -> Splits:
    """{'train': (classes, items), 'val': (classes, items)} for the digits data set; the held-out
    fraction is the demo's unless asked otherwise (the tests keep a smaller world)."""
    images, target, splits = _scans(val_fraction)
    classes = [str(c) for c in range(10)]
    out = {}
    for split, idx in splits.items():
        triples = [(f"digits{i:05d}", int(target[i]), _png(images[i], (DIGITS_SIZE, DIGITS_SIZE)))
                   for i in idx.tolist()]
        out[split] = (classes, list(iter_in_memory(triples, "sklearn-digits")))
    return out


def digit_pairs_items(per_class: dict[str, int] | None = None) -> Splits:
    """{'train': ..., 'val': ...} of the 100-class task: class ``10 a + b`` (named "ab") is a scan
    of digit a beside a scan of digit b, each squeezed to half the width. Every class has the
    same number of pairs per split, each pair two scans drawn at random from that split."""
    images, target, splits = _scans(VAL_FRACTION)
    per_class = per_class or PAIRS_PER_CLASS
    rng = np.random.default_rng(PAIRS_SEED)
    classes = [f"{a}{b}" for a in range(10) for b in range(10)]
    half = (DIGITS_SIZE // 2, DIGITS_SIZE)
    out = {}
    for split in ("train", "val"):
        idx = splits[split]
        by_digit = [idx[target[idx] == d] for d in range(10)]
        triples = []
        for n in range(per_class[split]):
            for c in range(100):
                a, b = int(rng.choice(by_digit[c // 10])), int(rng.choice(by_digit[c % 10]))
                pair = Image.new("L", (DIGITS_SIZE, DIGITS_SIZE))
                for x, scan in ((0, a), (DIGITS_SIZE // 2, b)):
                    pair.paste(Image.open(io.BytesIO(_png(images[scan], half))).convert("L"), (x, 0))
                triples.append((f"pair{c:02d}-{n:03d}-{a:04d}-{b:04d}", c, _encode(pair)))
        out[split] = (classes, list(iter_in_memory(triples, "sklearn-digit-pairs")))
    return out


#: ``make-shards SRC`` for these names (and a pipeline's ``[data] src``): (the splits, the
#: origin each manifest records).
BUILT_IN: dict[str, tuple[Callable[[], Splits], str]] = {
    "digits": (digits_items, "sklearn.datasets.load_digits (32x32 RGB)"),
    "digit-pairs": (digit_pairs_items, "sklearn.datasets.load_digits, two scans side by side (32x32 RGB)"),
}
