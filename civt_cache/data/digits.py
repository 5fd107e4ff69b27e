"""The built-in demo source: scikit-learn's bundled handwritten digits (1,797 real 8x8 scans).

Images are upscaled to 32x32 RGB so that the real pipeline (JPEG shards, RandomResizedCrop,
RandAugment, teachers with strided stems) has something meaningful to work on, and split into
train/val with a fixed permutation, so every checkout builds byte-identical shards.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from civt_cache.data.writer import SourceItem, iter_in_memory

DIGITS_SIZE = 32
VAL_FRACTION = 0.4  # 719 held-out digits: one sample is 0.14 points of top-1
SPLIT_SEED = 20220619  # fixed: the split is part of the dataset, not of a run


def digits_items(val_fraction: float = VAL_FRACTION) -> dict[str, tuple[list[str], list[SourceItem]]]:
    """{'train': (classes, items), 'val': (classes, items)} for the digits data set; the held-out
    fraction is the demo's unless asked otherwise (the tests keep a smaller world)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    classes = [str(c) for c in range(10)]
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(data.target))
    n_val = int(round(len(perm) * val_fraction))
    splits = {"val": perm[:n_val], "train": perm[n_val:]}
    out = {}
    for split, idx in splits.items():
        triples = []
        for i in sorted(idx.tolist()):
            gray = np.clip(data.images[i] * (255.0 / 16.0) + 0.5, 0, 255).astype(np.uint8)
            im = Image.fromarray(gray, "L").resize((DIGITS_SIZE, DIGITS_SIZE), Image.BICUBIC)
            buf = io.BytesIO()
            im.convert("RGB").save(buf, format="PNG")
            triples.append((f"digits{i:05d}", int(data.target[i]), buf.getvalue()))
        out[split] = (classes, list(iter_in_memory(triples, "sklearn-digits")))
    return out
