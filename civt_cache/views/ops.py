"""The ops of a view after crop + resize, each on a whole batch at once.

Every op comes as a pair: a host half that turns the batch's records into per-sample numbers
(NumPy arrays, sent with the rest of the batch in one transfer, ``transfer.to_device``) and a
device half that runs a fixed number of tensor ops on the batch, whatever its size: no Python
loop over samples and no read of a device value. Pixel values stay on the 0..255 integer grid
between ops, rounded or truncated where PIL rounds or truncates (PIL, through timm's RandAugment
ops, is the reference the tests hold every op against):

- RandAugment, one op slot at a time: the batch is permuted once so that each op's samples are
  one contiguous slice (geometric ops together), each op runs once on its slice, and the batch
  is permuted back. The five geometric ops are ONE inverse-affine warp (``grid_sample``, per-
  sample matrices) with PIL's pixel-centre convention, edge taps clamped and the mean colour
  outside; its bicubic kernel is a = -0.75 where Pillow's transform uses a = -1 (0.5-0.8 levels
  mean absolute difference, at a tenth of the cost of gathering 16 taps). Colour ops are PIL's
  blends with its degenerate images and truncation; equalize is PIL's histogram LUT, batched;
  sharpness blends with PIL's smoothing filter;
- random erasing: normal noise from a counter-based hash of (erase seed, pixel), the same
  numbers on every device, for all erased views at once;
- Mixup / CutMix with the partner's base view from the same batch.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from civt_cache.views.recipe import RA_MAX_OPS
from civt_cache.views.records import (
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
    RA,
    RA_OPS,
)
from civt_cache.views.transfer import DeviceArrays

_LEVEL_DENOM = 10.0  # timm's RandAugment magnitude scale
_GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
_GEOMETRIC_IDS = np.array([RA_OPS.index(n) for n in _GEOMETRIC])
_ENHANCERS = ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing")
Groups = list[tuple[str, int, int]]  # (op name or "geometric", start, stop) in a slot's order


# ---- flip ----------------------------------------------------------------------------------------
def flip_params(recs: np.ndarray) -> dict[str, np.ndarray]:
    return {"flip": np.flatnonzero(recs[:, FLIP])}


def flip(v: torch.Tensor, p: DeviceArrays) -> torch.Tensor:
    idx = p["flip"]
    if idx.numel():
        v[idx] = v[idx].flip(-1)
    return v


# ---- RandAugment --------------------------------------------------------------------------------
def randaugment_params(recs: np.ndarray, s: int) -> tuple[dict[str, np.ndarray], list[Groups]]:
    """Per slot: the order that makes each op's samples contiguous, each sample's argument in
    that order (factor, posterize step, solarize threshold or addend) and the geometric ops'
    PIL AFFINE matrices; with the slices (groups) the device half runs."""
    ra = recs[:, RA].reshape(len(recs), RA_MAX_OPS, 2)
    arrays: dict[str, np.ndarray] = {}
    groups: list[Groups] = []
    for k in range(RA_MAX_OPS):
        ops, mags = ra[:, k, 0], ra[:, k, 1]
        key = np.where(np.isin(ops, _GEOMETRIC_IDS), -1, ops)  # geometric ops first, together
        order = np.flatnonzero(ops >= 0)
        order = order[np.argsort(key[order], kind="stable")]
        level = np.abs(mags[order]) / MAG_SCALE / _LEVEL_DENOM  # timm: magnitude / _LEVEL_DENOM
        sign = np.where(mags[order] < 0, -1.0, 1.0)
        names = [RA_OPS[o] for o in ops[order]]
        slot: Groups = []
        for i, name in enumerate(names):
            label = "geometric" if name in _GEOMETRIC else name
            if slot and slot[-1][0] == label:
                slot[-1] = (label, slot[-1][1], i + 1)
            else:
                slot.append((label, i, i + 1))
        geo = [i for i, n in enumerate(names) if n in _GEOMETRIC]
        arrays[f"ra{k}_order"] = order
        arrays[f"ra{k}_arg"] = _op_arguments(names, level, sign)
        arrays[f"ra{k}_affine"] = np.array([_affine_matrix(names[i], level[i], sign[i], s) for i in geo],
                                           np.float64).reshape(len(geo), 6)
        groups.append(slot)
    return arrays, groups


def _op_arguments(names: list[str], level: np.ndarray, sign: np.ndarray) -> np.ndarray:
    """Each sample's argument by timm's level-to-argument rules (0 where the op takes none)."""
    arg = np.zeros(len(names))
    for i, name in enumerate(names):
        if name in _ENHANCERS:
            arg[i] = max(0.1, 1.0 + sign[i] * 0.9 * level[i])
        elif name == "PosterizeIncreasing":
            # timm's bits = 4 - int(4 level): 0 bits at magnitude 10, a black image, as Pillow
            # before 12 (which co-advise ran) gives; keeping b bits of a level floors to 2^(8 - b)
            arg[i] = 2.0 ** (8 - (4 - int(level[i] * 4)))
        elif name == "SolarizeIncreasing":
            arg[i] = 256 - min(256, int(level[i] * 256))
        elif name == "SolarizeAdd":
            arg[i] = min(128, int(level[i] * 110))
    return arg


def randaugment(v: torch.Tensor, p: DeviceArrays, groups: list[Groups], fill: torch.Tensor) -> torch.Tensor:
    """Each op slot in turn: permute, run each op on its slice, permute back."""
    for k, slot in enumerate(groups):
        if not slot:
            continue
        order = p[f"ra{k}_order"]
        sub = v[order]
        arg = p[f"ra{k}_arg"].float()
        for name, a, b in slot:
            if name == "geometric":
                sub[a:b] = _warp_affine(sub[a:b], p[f"ra{k}_affine"].float(), fill)
            else:
                sub[a:b] = _colour_op(name, sub[a:b], arg[a:b].view(-1, 1, 1, 1))
        v[order] = sub
    return v


def _affine_matrix(name: str, level: float, sign: float, s: int) -> np.ndarray:
    """PIL's AFFINE data (output pixel centre -> input point) of timm's geometric ops on an
    S x S image, with timm's level-to-argument rules and our explicit sign."""
    if name == "Rotate":  # Image.rotate(deg): about the centre, counter-clockwise
        a = -math.radians(sign * 30.0 * level)
        c, sn = round(math.cos(a), 15), round(math.sin(a), 15)
        m = [c, sn, 0.0, -sn, c, 0.0]
        m[2] = m[0] * (-s / 2) + m[1] * (-s / 2) + s / 2
        m[5] = m[3] * (-s / 2) + m[4] * (-s / 2) + s / 2
        return np.array(m)
    if name == "ShearX":
        return np.array([1.0, sign * 0.3 * level, 0.0, 0.0, 1.0, 0.0])
    if name == "ShearY":
        return np.array([1.0, 0.0, 0.0, sign * 0.3 * level, 1.0, 0.0])
    if name == "TranslateXRel":
        return np.array([1.0, 0.0, sign * 0.45 * level * s, 0.0, 1.0, 0.0])
    return np.array([1.0, 0.0, 0.0, 0.0, 1.0, sign * 0.45 * level * s])  # TranslateYRel


def _warp_affine(v: torch.Tensor, mats: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """One batched inverse-affine warp [G, 3, S, S] with per-sample matrices [G, 6], as PIL's
    ``Image.transform(AFFINE, BICUBIC, fillcolor)``: an output pixel whose centre maps outside
    the image gets ``fill`` ([1, 3, 1, 1]); inside, bicubic taps clamped at the edges."""
    g, c, h, w = v.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=v.device, dtype=torch.float32) + 0.5,
                            torch.arange(w, device=v.device, dtype=torch.float32) + 0.5, indexing="ij")
    m = mats.view(g, 6, 1, 1)
    xin = m[:, 0] * xs + m[:, 1] * ys + m[:, 2]
    yin = m[:, 3] * xs + m[:, 4] * ys + m[:, 5]
    grid = torch.stack((2 * xin / w - 1, 2 * yin / h - 1), dim=-1)
    out = F.grid_sample(v, grid, mode="bicubic", padding_mode="border", align_corners=False)
    inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
    return torch.where(inside[:, None], out.round().clamp(0, 255), fill)


def _gray(v: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L: (19595 R + 38470 G + 7471 B + 2^15) >> 16, exact in float32."""
    return torch.floor((19595 * v[:, 0:1] + 38470 * v[:, 1:2] + 7471 * v[:, 2:3] + 32768) / 65536)


def _blend(degenerate: torch.Tensor, v: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's Image.blend: degenerate + f (image - degenerate), clipped and truncated."""
    return torch.floor((degenerate + factor * (v - degenerate)).clamp(0, 255))


def _colour_op(name: str, v: torch.Tensor, arg: torch.Tensor) -> torch.Tensor:
    """One non-geometric op on its slice; ``arg`` [B, 1, 1, 1] from ``_op_arguments``."""
    if name == "AutoContrast":
        lo = v.amin(dim=(2, 3), keepdim=True)
        hi = v.amax(dim=(2, 3), keepdim=True)
        scale = 255.0 / (hi - lo).clamp(min=1)
        return torch.where(hi > lo, torch.trunc(v * scale - lo * scale).clamp(0, 255), v)
    if name == "Equalize":
        return _equalize(v)
    if name == "Invert":
        return 255.0 - v
    if name == "PosterizeIncreasing":
        return torch.floor(v / arg) * arg
    if name == "SolarizeIncreasing":
        return torch.where(v < arg, v, 255.0 - v)
    if name == "SolarizeAdd":
        return torch.where(v < 128, (v + arg).clamp(max=255), v)
    if name == "ColorIncreasing":
        return _blend(_gray(v).expand_as(v), v, arg)
    if name == "ContrastIncreasing":
        mean = torch.floor(_gray(v).double().mean(dim=(1, 2, 3)) + 0.5).float()
        return _blend(mean.view(-1, 1, 1, 1).expand_as(v), v, arg)
    if name == "BrightnessIncreasing":
        return _blend(torch.zeros_like(v), v, arg)
    if name == "SharpnessIncreasing":
        return _blend(_smooth(v), v, arg)
    raise ValueError(f"unknown RandAugment op {name!r}")


def _smooth(v: torch.Tensor) -> torch.Tensor:
    """PIL's ImageFilter.SMOOTH (3 x 3, centre 5, the rest 1, over 13), rounded, the border
    unchanged: the degenerate image of ImageEnhance.Sharpness."""
    kernel = torch.ones((3, 1, 3, 3), device=v.device)
    kernel[:, :, 1, 1] = 5.0
    out = v.clone()
    out[:, :, 1:-1, 1:-1] = torch.floor(F.conv2d(v, kernel / 13.0, groups=3) + 0.5).clamp(0, 255)
    return out


def _equalize(v: torch.Tensor) -> torch.Tensor:
    """PIL's ImageOps.equalize for a batch: per image and channel a 256-bin histogram, and the
    look-up table PIL builds from it (identity when one level or a zero step)."""
    b = v.shape[0]
    levels = v.to(torch.int64) + 256 * torch.arange(3 * b, device=v.device).view(b, 3, 1, 1)
    flat = levels.view(-1)
    hist = torch.zeros(3 * b * 256, dtype=torch.int64, device=v.device)
    hist = hist.scatter_add_(0, flat, torch.ones_like(flat)).view(3 * b, 256)
    bins = torch.arange(256, device=v.device)
    used = hist > 0
    last = hist.gather(1, (bins * used).amax(dim=1, keepdim=True))  # count of the top level
    step = (hist.sum(dim=1, keepdim=True) - last) // 255
    lut = (step // 2 + hist.cumsum(dim=1) - hist) // step.clamp(min=1)
    identity = (used.sum(dim=1, keepdim=True) <= 1) | (step == 0)
    lut = torch.where(identity, bins, lut.clamp(max=255))
    return lut.view(-1).gather(0, flat).view_as(v).to(v.dtype)


# ---- random erasing ------------------------------------------------------------------------------
_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x < 2^32 in int64, split in 16-bit halves so nothing overflows."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (lowbias32): counter -> well-mixed bits, exact on any device."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _normal(key: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Standard normal numbers from (hashed seed, pixel index): Box-Muller on two hashed 24-bit
    uniforms."""
    u1 = ((_hash32(key ^ (2 * idx)) >> 8).float() + 0.5) / 16777216.0
    u2 = ((_hash32(key ^ (2 * idx + 1)) >> 8).float() + 0.5) / 16777216.0
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)


def erase_noise(seed: int, box: tuple[int, int, int, int], size: int, device: torch.device) -> torch.Tensor:
    """The noise [3, h, w] of one erase box (x, y, w, h) of an S x S view, keyed by (erase seed,
    pixel index in the view): the PIL reference's erasing, one view at a time."""
    x, y, w, h = box
    ar = lambda n, off: torch.arange(off, off + n, device=device, dtype=torch.int64)
    idx = (ar(3, 0).view(3, 1, 1) * size + ar(h, y).view(1, h, 1)) * size + ar(w, x).view(1, 1, w)
    return _normal(_hash32(torch.tensor(seed, dtype=torch.int64, device=device)), idx)


def erase_params(recs: np.ndarray) -> dict[str, np.ndarray]:
    """The erased views' positions, boxes, seeds and where each box's pixels start in a flat
    list of all boxes' pixels (its size is known here, so the device never reports it)."""
    at = np.flatnonzero(recs[:, ERASE][:, 2] > 0)
    boxes = recs[at][:, ERASE].astype(np.int64)
    pixels = 3 * boxes[:, 2] * boxes[:, 3]
    return {"erase_at": at, "erase_box": boxes, "erase_seed": recs[at, ERASE_SEED].astype(np.int64),
            "erase_start": np.concatenate([[0], np.cumsum(pixels)]).astype(np.int64)}


def erase(v: torch.Tensor, p: DeviceArrays) -> torch.Tensor:
    """Random erasing of every erased view at once: each pixel of the boxes' flat list finds its
    box (``searchsorted``), its channel, row and column, and gets its keyed noise."""
    start = p["erase_start"]
    if start.numel() <= 1:
        return v
    total = int(p.host("erase_start")[-1])
    s = v.shape[-1]
    t = torch.arange(total, device=v.device)
    box = torch.searchsorted(start[1:], t, right=True)
    x, y, w, h = p["erase_box"].unbind(1)
    local = t - start[box]
    wb, hwb = w[box], (w * h)[box]
    rem = local % hwb
    idx = ((local // hwb) * s + rem // wb + y[box]) * s + rem % wb + x[box]
    noise = _normal(_hash32(p["erase_seed"])[box], idx)
    v.view(-1).index_put_((p["erase_at"][box] * (3 * s * s) + idx,), noise)
    return v


# ---- mixing --------------------------------------------------------------------------------------
def mix_params(recs: np.ndarray, own_at: list[int], partner_at: list[int]) -> dict[str, np.ndarray]:
    mode = recs[:, MIX_MODE]
    mixup, cut = np.flatnonzero(mode == MIX_MIXUP), np.flatnonzero(mode == MIX_CUTMIX)
    return {"own_at": np.asarray(own_at, np.int64), "partner_at": np.asarray(partner_at, np.int64),
            "mixup": mixup, "lam": recs[mixup, LAM] / LAM_ONE,
            "cut": cut, "cut_box": recs[cut][:, MIX_BOX].astype(np.int64)}


def mix(base: torch.Tensor, p: DeviceArrays, out: torch.Tensor) -> torch.Tensor:
    """The views [B, 3, S, S] of rows ``own_at`` of ``base``, written into ``out``: Mixup lam own
    + (1 - lam) partner (``lerp``), CutMix the partner inside the box, each only on its own
    views."""
    out = torch.index_select(base, 0, p["own_at"], out=out)
    mixup = p["mixup"]
    if mixup.numel():
        lam = p["lam"].float().view(-1, 1, 1, 1)
        out[mixup] = torch.lerp(base[p["partner_at"][mixup]], out[mixup], lam)
    cut = p["cut"]
    if cut.numel():
        b = p["cut_box"].view(-1, 4, 1, 1)
        ar = torch.arange(out.shape[-1], device=out.device)
        inside = ((ar.view(1, 1, -1) >= b[:, 0]) & (ar.view(1, 1, -1) < b[:, 2])
                  & (ar.view(1, -1, 1) >= b[:, 1]) & (ar.view(1, -1, 1) < b[:, 3]))[:, None]
        out[cut] = torch.where(inside, base[p["partner_at"][cut]], out[cut])
    return out
