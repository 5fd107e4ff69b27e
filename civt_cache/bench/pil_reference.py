"""The PIL/timm reference of what a record renders: a view built one image at a time with
Pillow and timm's RandAugment ops, as civt-cache did before the batched view engine: the
yardstick the tests hold every engine op against, and the "PIL path" ``bench views`` times.
Nothing else uses it."""
from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data import auto_augment as taa
from torchvision.transforms import InterpolationMode

from civt_cache.views.ops import erase_noise
from civt_cache.views.recipe import RA_MAX_OPS, Recipe
from civt_cache.views.records import (
    CROP,
    ERASE,
    ERASE_SEED,
    FLIP,
    LAM,
    LAM_ONE,
    MAG_SCALE,
    MIX_BOX,
    MIX_CUTMIX,
    MIX_MIXUP,
    MIX_MODE,
    MIX_NONE,
    PARTNER,
    RA,
    RA_OPS,
)


def decode_rgb(image: bytes) -> Image.Image:
    """The single decode used by every stage."""
    with Image.open(io.BytesIO(image)) as im:
        return im.convert("RGB")


def _ra_args(name: str, magnitude: float, sign: int) -> tuple:
    """timm's level-to-argument rules for the increasing op set, with the sign made explicit."""
    level = magnitude / taa._LEVEL_DENOM
    if name == "Rotate":
        return (sign * 30.0 * level,)
    if name in ("ShearX", "ShearY"):
        return (sign * 0.3 * level,)
    if name in ("TranslateXRel", "TranslateYRel"):
        return (sign * 0.45 * level,)
    if name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                "SharpnessIncreasing"):
        return (max(0.1, 1.0 + sign * 0.9 * level),)
    if name == "PosterizeIncreasing":  # 0 bits at magnitude 10 (see _op)
        return taa._posterize_increasing_level_to_arg(magnitude, {})
    fn = taa.LEVEL_TO_ARG[name]
    return fn(magnitude, {}) if fn is not None else ()


def render_base(image: Image.Image, rec: np.ndarray, recipe: Recipe) -> torch.Tensor:
    """Crop, flip, RandAugment, normalise, erase: the unmixed view [3, S, S] float32."""
    s = recipe.img_size
    x, y, w, h = (int(v) for v in rec[CROP])
    img = TF.resized_crop(image, y, x, h, w, [s, s], InterpolationMode.BICUBIC, antialias=True)
    if rec[FLIP]:
        img = TF.hflip(img)
    fill = tuple(int(round(255 * m)) for m in recipe.mean)
    for op, mag in rec[RA].reshape(RA_MAX_OPS, 2):
        if op >= 0:
            name = RA_OPS[op]
            args = _ra_args(name, abs(int(mag)) / MAG_SCALE, -1 if mag < 0 else 1)
            if name == "PosterizeIncreasing" and args[0] == 0:
                img = Image.new("RGB", img.size)  # Pillow < 12's posterize(img, 0); >= 12 refuses it
            else:
                img = taa.NAME_TO_OP[name](img, *args, fillcolor=fill, resample=Image.BICUBIC)
    t = TF.pil_to_tensor(img).float().div_(255.0)
    t = TF.normalize(t, list(recipe.mean), list(recipe.std), inplace=True)
    ex, ey, ew, eh = (int(v) for v in rec[ERASE])
    if ew > 0:
        t[:, ey:ey + eh, ex:ex + ew] = erase_noise(int(rec[ERASE_SEED]), (ex, ey, ew, eh),
                                                   recipe.img_size, t.device)
    return t


def mix_views(own: torch.Tensor, partner: torch.Tensor, rec: np.ndarray) -> torch.Tensor:
    """Combine a row's base view with its partner's as the record says."""
    mode = int(rec[MIX_MODE])
    if mode == MIX_MIXUP:
        lam = float(rec[LAM]) / LAM_ONE
        return own * lam + partner * (1.0 - lam)
    if mode == MIX_CUTMIX:
        x0, y0, x1, y1 = (int(v) for v in rec[MIX_BOX])
        out = own.clone()
        out[:, y0:y1, x0:x1] = partner[:, y0:y1, x0:x1]
        return out
    return own


def apply_records(images: dict[int, Image.Image], records: dict[int, np.ndarray],
                  rows: Sequence[int], recipe: Recipe) -> torch.Tensor:
    """THE view function: views [len(rows), 3, S, S] of ``rows``, given decoded images and
    records for those rows and their partners. Each base view is built once and reused when it
    is also a partner, which is why stages hand in whole groups of rows."""
    base: dict[int, torch.Tensor] = {}

    def get(r: int) -> torch.Tensor:
        if r not in base:
            base[r] = render_base(images[r], records[r], recipe)
        return base[r]

    out = []
    for r in rows:
        rec = records[r]
        out.append(mix_views(get(r), get(int(rec[PARTNER])), rec)
                   if rec[MIX_MODE] != MIX_NONE else get(r))
    return torch.stack(out)


def eval_view(image: bytes, recipe: Recipe, crop_pct: float = 0.875) -> torch.Tensor:
    """Validation view: resize the short side to S / crop_pct, centre-crop S, normalise."""
    s = recipe.img_size
    img = decode_rgb(image)
    img = TF.resize(img, int(math.floor(s / crop_pct)), InterpolationMode.BICUBIC, antialias=True)
    img = TF.center_crop(img, [s, s])
    t = TF.pil_to_tensor(img).float().div_(255.0)
    return TF.normalize(t, list(recipe.mean), list(recipe.std), inplace=True)
