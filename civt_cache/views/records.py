"""Views as data: sampling the explicit per-view parameter records that ``view_engine`` renders.

A record is a fixed vector of ``NUM_FIELDS`` int32 values (the layout below) that fully
determines a view given the source image and the recipe: crop box in source pixels, flip,
RandAugment ops with signed magnitudes, random-erasing box and noise seed, mixing partner row,
mixing mode, lambda (fixed point) and CutMix box. Records are what the cache stores, and views
are always built *from the stored integer form*, so stage one, stage two and ``verify`` build
identical tensors.

Records come from a counter-based generator keyed by (seed, epoch, row): no process-global RNG,
so they do not depend on worker count, rank count, batch size or order. Each shard and epoch has
a *mixing order* (``mix_order``), a permutation keyed by (seed, epoch, shard) in which positions
2k and 2k + 1 are partners, as timm pairs a batch with its flip: partners are drawn afresh every
epoch from the whole shard (from groups of ``PAIR_GROUP`` positions in larger shards, which
bounds what stage one holds: it decodes a group once and renders all of a unit's epochs from it).
Mixup/CutMix draws follow timm's ``mode``: ``elem`` one per view, ``pair`` one per pair,
``batch`` one per block of ``mix_batch`` consecutive positions of the mixing order, and stage
two cuts its batches along those blocks, so a batch shares one draw as timm's per-GPU batch does.

``VIEWS_VERSION`` names what a record means (sampling rules and the engine's rendering); it is
part of every cache's identity, so a cache whose records this code would render differently is
refused rather than paired with other pixels.
"""
from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np
from PIL import Image

from civt_cache.data.imageio import check_image_size
from civt_cache.errors import BadImageError
from civt_cache.views.recipe import RA_MAX_OPS, Recipe

VIEWS_VERSION = 5  # 1: PIL on CPU workers, pairs over a whole shard; 2: the batched view engine;
# 3: posterize at magnitude 10 keeps 0 bits (black), as timm and Pillow of co-advise's time did;
# 4: resize bit-exact to Pillow on every device, equalize as PIL's histogram LUT;
# 5: geometric ops as Pillow's affine (cubic a = -1, truncation), Mixup modes, partners per shard
#: Positions of a shard inside which mixing partners are drawn: a whole shard of up to 2,048
#: samples (ImageNet's are 1,250). Stage one holds a group's crops for every epoch of a unit.
PAIR_GROUP = 2048

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
MIX = slice(19, 25)         # one Mixup/CutMix draw: mode, lambda, box
NUM_FIELDS = 25
LAM_ONE = 1 << 20           # fixed point: lam = value / 2**20 is exact in float32
MAG_SCALE = 100
MIX_NONE, MIX_MIXUP, MIX_CUTMIX = 0, 1, 2

#: What a stored RandAugment op index means: the order of timm's increasing op set (``inc1``) as
#: co-advise sampled from it, written out here because it defines stored data. Never read it
#: from timm at run time: a timm release that reorders its private list would make every cache
#: replay other ops. Changing this table changes what records mean: bump VIEWS_VERSION with it.
RA_OPS: tuple[str, ...] = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)
_STREAM_VIEW, _STREAM_PAIRS, _STREAM_MIX = 0x5649, 0x5041, 0x4D58  # separate counter streams


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
            mag = min(max(float(rng.normal(spec.magnitude, spec.magnitude_std))
                          if spec.magnitude_std > 0 else spec.magnitude, 0.0), 10.0)
            sign = -1 if rng.random() < 0.5 else 1
            if applied:
                ra[k] = (op, sign * int(round(mag * MAG_SCALE)))
    rec[RA] = ra.reshape(-1)
    if rng.random() < recipe.erase_prob:
        box = _sample_erase(rng, recipe.img_size)
        rec[ERASE], rec[ERASE_SEED] = box[:4], box[4]
    rec[PARTNER], rec[MIX_MODE], rec[LAM] = row, MIX_NONE, LAM_ONE
    if recipe.mix_mode == "elem":
        rec[MIX] = _sample_mix(rng, recipe)
    return rec


def _sample_mix(rng: np.random.Generator, recipe: Recipe) -> np.ndarray:
    """One Mixup/CutMix draw as timm's ``Mixup`` makes it: the fields MIX (mode, lam, CutMix box)."""
    out = np.zeros(MIX.stop - MIX.start, np.int32)
    out[LAM - MIX.start] = LAM_ONE
    if not (recipe.mixing and rng.random() < recipe.mix_prob):
        return out
    cutmix = recipe.cutmix_alpha > 0 and (recipe.mixup_alpha <= 0 or rng.random() < recipe.mix_switch_prob)
    if cutmix:
        lam = rng.beta(recipe.cutmix_alpha, recipe.cutmix_alpha)
        s = recipe.img_size
        cut = int(s * math.sqrt(1.0 - lam))
        cy, cx = int(rng.integers(0, s)), int(rng.integers(0, s))
        # the box's half sides are cut // 2 each, as timm's rand_bbox of co-advise's time
        # (timm 0.3-0.4) computed them; later timm keeps odd sizes whole. Kept on purpose.
        y0, y1 = (min(max(v, 0), s) for v in (cy - cut // 2, cy + cut // 2))
        x0, x1 = (min(max(v, 0), s) for v in (cx - cut // 2, cx + cut // 2))
        out[MIX_BOX.start - MIX.start:] = (x0, y0, x1, y1)
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (s * s)  # timm's correct_lam
        out[0] = MIX_CUTMIX
    else:
        lam = rng.beta(recipe.mixup_alpha, recipe.mixup_alpha)
        out[0] = MIX_MIXUP
    out[LAM - MIX.start] = int(round(lam * LAM_ONE))
    return out


def mix_order(seed: int, epoch: int, shard: int, n: int) -> np.ndarray:
    """A shard's n positions in the epoch's mixing order: a keyed permutation of each group of
    ``PAIR_GROUP`` consecutive positions, the groups one after the other. Positions 2k and
    2k + 1 of a group's part are partners (an odd one out pairs with its group's first)."""
    parts = [start + _rng(seed, epoch, shard, g, _STREAM_PAIRS).permutation(min(PAIR_GROUP, n - start))
             for g, start in enumerate(range(0, n, PAIR_GROUP))]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def pair_rows(seed: int, epoch: int, shard: int, rows: Sequence[int]) -> dict[int, int]:
    """Each row's mixing partner in one shard and epoch (``rows``: the shard's rows in order)."""
    order = mix_order(seed, epoch, shard, len(rows))
    partner: dict[int, int] = {}
    for start in range(0, len(rows), PAIR_GROUP):
        group = [rows[i] for i in order[start:start + PAIR_GROUP]]
        for a in range(0, len(group) - 1, 2):
            partner[group[a]], partner[group[a + 1]] = group[a + 1], group[a]
        if len(group) % 2:
            partner[group[-1]] = group[0]
    return partner


def sample_shard_records(recipe: Recipe, seed: int, epoch: int, shard: int, rows: Sequence[int],
                         sizes: Sequence[tuple[int, int]]) -> np.ndarray:
    """Records [len(rows), NUM_FIELDS] for one shard and epoch, with partners and the Mixup/CutMix
    draws of the recipe's ``mix_mode``. ``rows`` are every row of the shard in order, ``sizes``
    their images' (width, height)."""
    recs = np.stack([sample_record(recipe, seed, epoch, r, w, h) for r, (w, h) in zip(rows, sizes)])
    if recipe.mix_mode != "elem":
        order = mix_order(seed, epoch, shard, len(rows))
        size = 2 if recipe.mix_mode == "pair" else recipe.mix_batch
        for k, start in enumerate(range(0, len(rows), size)):
            recs[order[start:start + size], MIX] = _sample_mix(_rng(seed, epoch, shard, k, _STREAM_MIX), recipe)
    partners = pair_rows(seed, epoch, shard, rows)
    mixed = recs[:, MIX_MODE] != MIX_NONE
    recs[mixed, PARTNER] = [partners[r] for r, m in zip(rows, mixed) if m]
    return recs


# ---- what the engine needs from an encoded image --------------------------------------------
def image_size(image: bytes, where: str = "image") -> tuple[int, int]:
    """(width, height) from the image header alone: sampling a record needs the size, not the
    pixels. An unreadable header is an error naming ``where`` (shard and key)."""
    try:
        with Image.open(io.BytesIO(image)) as im:
            size = im.size
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadImageError(f"{where}: image does not decode ({e})") from None
    return check_image_size(size, where)
