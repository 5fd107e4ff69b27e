"""Views: sampling explicit per-view parameter records, and the one function that applies them.

A record is a fixed vector of ``NUM_FIELDS`` int32 values (the layout below) that fully
determines a view given the source image and the recipe: crop box in source pixels, flip,
RandAugment ops with signed magnitudes, random-erasing box and noise seed, mixing partner row,
mixing mode, lambda (fixed point) and CutMix box. Records are what the cache stores, and views
are always built *from the stored integer form*, so stage one, stage two and ``verify`` build
bit-identical tensors.

Records come from a counter-based generator keyed by (seed, epoch, row): no process-global RNG,
so they do not depend on worker count, rank count, batch size or order. Mixing partners pair
up inside a shard through a permutation keyed by (seed, epoch, shard).

Image operations are torchvision's (resized crop, flip) and timm's RandAugment ops, called with
explicit arguments; only the mapping of magnitude to argument (with an explicit sign) is ours.
"""
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

from .recipe import RA_MAX_OPS, Recipe

# ---- record layout (int32) ------------------------------------------------------------------
CROP = slice(0, 4)          # x, y, w, h in source pixels
FLIP = 4                    # 0/1
RA = slice(5, 5 + 2 * RA_MAX_OPS)  # pairs (op index or -1, signed magnitude x100)
ERASE = slice(13, 17)       # x, y, w, h in output pixels (w == 0: no erasing)
ERASE_SEED = 17
PARTNER = 18                # global row of the mixing partner (itself when unmixed)
MIX_MODE = 19               # 0 none, 1 mixup, 2 cutmix
LAM = 20                    # lambda * LAM_ONE (weight of this row's own image and label)
MIX_BOX = slice(21, 25)     # CutMix box x0, y0, x1, y1 in output pixels
NUM_FIELDS = 25
LAM_ONE = 1 << 20           # fixed point: lam = value / 2**20 is exact in float32
MAG_SCALE = 100
MIX_NONE, MIX_MIXUP, MIX_CUTMIX = 0, 1, 2

RA_OPS: tuple[str, ...] = tuple(taa._RAND_INCREASING_TRANSFORMS)
_STREAM_VIEW, _STREAM_PAIRS = 0x5649, 0x5041  # separate counter streams for views and pairs


def _rng(*key: int) -> np.random.Generator:
    """Counter-based generator (Philox) keyed by integers; no global state."""
    return np.random.Generator(np.random.Philox(np.random.SeedSequence([int(k) for k in key])))


# ---- sampling --------------------------------------------------------------------------------
def _sample_crop(rng: np.random.Generator, w: int, h: int, recipe: Recipe) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop parameter rule (10 tries, then a centre crop)."""
    if not recipe.random_resized_crop:
        return 0, 0, w, h
    area = w * h
    lo, hi = math.log(recipe.crop_ratio[0]), math.log(recipe.crop_ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*recipe.crop_scale)
        aspect = math.exp(rng.uniform(lo, hi))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1)), cw, ch
    ratio = w / h
    if ratio < recipe.crop_ratio[0]:
        cw, ch = w, int(round(w / recipe.crop_ratio[0]))
    elif ratio > recipe.crop_ratio[1]:
        cw, ch = int(round(h * recipe.crop_ratio[1])), h
    else:
        cw, ch = w, h
    return (w - cw) // 2, (h - ch) // 2, cw, ch


def _sample_erase(rng: np.random.Generator, size: int) -> tuple[int, int, int, int, int]:
    """timm's RandomErasing box rule (area 2%-33%, aspect 0.3-3.3, 10 tries) plus a noise seed."""
    area = size * size
    lo, hi = math.log(0.3), math.log(1 / 0.3)
    for _ in range(10):
        target = rng.uniform(0.02, 1 / 3) * area
        aspect = math.exp(rng.uniform(lo, hi))
        eh, ew = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if ew < size and eh < size:
            top, left = int(rng.integers(0, size - eh + 1)), int(rng.integers(0, size - ew + 1))
            return left, top, ew, eh, int(rng.integers(0, 2**31 - 1))
    return 0, 0, 0, 0, 0


def sample_record(recipe: Recipe, seed: int, epoch: int, row: int, src_w: int, src_h: int) -> np.ndarray:
    """The record of (seed, epoch, row) for a source image of the given size; partner = itself
    until ``pair_rows`` assigns one."""
    rng = _rng(seed, epoch, row, _STREAM_VIEW)
    rec = np.zeros(NUM_FIELDS, np.int32)
    rec[CROP] = _sample_crop(rng, src_w, src_h, recipe)
    rec[FLIP] = int(rng.random() < recipe.hflip)
    ra = rec[RA].reshape(RA_MAX_OPS, 2)
    ra[:, 0] = -1
    spec = recipe.ra_spec()
    if spec is not None:
        for k, op in enumerate(rng.integers(0, len(RA_OPS), spec.num_ops)):
            applied = rng.random() < spec.prob
            mag = float(np.clip(rng.normal(spec.magnitude, spec.magnitude_std)
                                if spec.magnitude_std > 0 else spec.magnitude, 0.0, 10.0))
            sign = -1 if rng.random() < 0.5 else 1
            if applied:
                ra[k] = (op, sign * int(round(mag * MAG_SCALE)))
    rec[RA] = ra.reshape(-1)
    if rng.random() < recipe.erase_prob:
        box = _sample_erase(rng, recipe.img_size)
        rec[ERASE], rec[ERASE_SEED] = box[:4], box[4]
    rec[PARTNER], rec[MIX_MODE], rec[LAM] = row, MIX_NONE, LAM_ONE
    if recipe.mixing and rng.random() < recipe.mix_prob:
        cutmix = recipe.cutmix_alpha > 0 and (recipe.mixup_alpha <= 0
                                              or rng.random() < recipe.mix_switch_prob)
        if cutmix:
            lam = rng.beta(recipe.cutmix_alpha, recipe.cutmix_alpha)
            s = recipe.img_size
            cut = int(s * math.sqrt(1.0 - lam))
            cy, cx = int(rng.integers(0, s)), int(rng.integers(0, s))
            y0, y1 = np.clip([cy - cut // 2, cy + cut // 2], 0, s)
            x0, x1 = np.clip([cx - cut // 2, cx + cut // 2], 0, s)
            rec[MIX_BOX] = (x0, y0, x1, y1)
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (s * s)  # timm's correct_lam
            rec[MIX_MODE] = MIX_CUTMIX
        else:
            lam = rng.beta(recipe.mixup_alpha, recipe.mixup_alpha)
            rec[MIX_MODE] = MIX_MIXUP
        rec[LAM] = int(round(lam * LAM_ONE))
    return rec


def pair_rows(seed: int, epoch: int, shard: int, rows: Sequence[int]) -> dict[int, int]:
    """Mixing partners for one shard and epoch: consecutive rows of a keyed permutation pair up
    (an odd one out pairs with the first)."""
    perm = _rng(seed, epoch, shard, _STREAM_PAIRS).permutation(len(rows))
    order = [rows[i] for i in perm]
    partner = {}
    for a in range(0, len(order) - 1, 2):
        partner[order[a]], partner[order[a + 1]] = order[a + 1], order[a]
    if len(order) % 2:
        partner[order[-1]] = order[0]
    return partner


def sample_shard_records(recipe: Recipe, seed: int, epoch: int, shard: int, rows: Sequence[int],
                         sizes: Sequence[tuple[int, int]]) -> np.ndarray:
    """Records [len(rows), NUM_FIELDS] for one shard and epoch, partners assigned."""
    recs = np.stack([sample_record(recipe, seed, epoch, r, w, h) for r, (w, h) in zip(rows, sizes)])
    partners = pair_rows(seed, epoch, shard, rows)
    mixed = recs[:, MIX_MODE] != MIX_NONE
    recs[mixed, PARTNER] = [partners[r] for r, m in zip(rows, mixed) if m]
    return recs


# ---- applying -------------------------------------------------------------------------------
def decode_rgb(image: bytes) -> Image.Image:
    """The single decode used by every stage."""
    with Image.open(io.BytesIO(image)) as im:
        return im.convert("RGB")


def image_size(image: bytes) -> tuple[int, int]:
    """(width, height) from the image header alone: sampling a record needs the size, not the
    pixels."""
    with Image.open(io.BytesIO(image)) as im:
        return im.size


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
    if name == "PosterizeIncreasing":  # Pillow >= 12 refuses 0 bits (magnitude 10): keep 1
        return (max(1, taa._posterize_increasing_level_to_arg(magnitude, {})[0]),)
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
            img = taa.NAME_TO_OP[name](img, *_ra_args(name, abs(int(mag)) / MAG_SCALE,
                                                      -1 if mag < 0 else 1),
                                       fillcolor=fill, resample=Image.BICUBIC)
    t = TF.pil_to_tensor(img).float().div_(255.0)
    t = TF.normalize(t, list(recipe.mean), list(recipe.std), inplace=True)
    ex, ey, ew, eh = (int(v) for v in rec[ERASE])
    if ew > 0:
        g = torch.Generator().manual_seed(int(rec[ERASE_SEED]))
        t[:, ey:ey + eh, ex:ex + ew] = torch.empty((3, eh, ew)).normal_(generator=g)
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


def mixed_targets(labels: torch.Tensor, partner_labels: torch.Tensor, lam: torch.Tensor,
                  num_classes: int, smoothing: float) -> torch.Tensor:
    """timm's mixup target: lam * smooth(onehot(y)) + (1 - lam) * smooth(onehot(y_partner))."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    a = torch.full((labels.shape[0], num_classes), off).scatter_(1, labels[:, None], on)
    b = torch.full((labels.shape[0], num_classes), off).scatter_(1, partner_labels[:, None], on)
    lam = lam[:, None].float()
    return lam * a + (1.0 - lam) * b


def record_lams(records: np.ndarray) -> torch.Tensor:
    """Lambda of each record as float32 (1.0 for unmixed views)."""
    return torch.from_numpy(records[..., LAM].astype(np.float64) / LAM_ONE).float()


def eval_view(image: bytes, recipe: Recipe, crop_pct: float = 0.875) -> torch.Tensor:
    """Validation view: resize the short side to S / crop_pct, centre-crop S, normalise."""
    s = recipe.img_size
    img = decode_rgb(image)
    img = TF.resize(img, int(math.floor(s / crop_pct)), InterpolationMode.BICUBIC, antialias=True)
    img = TF.center_crop(img, [s, s])
    t = TF.pil_to_tensor(img).float().div_(255.0)
    return TF.normalize(t, list(recipe.mean), list(recipe.std), inplace=True)
