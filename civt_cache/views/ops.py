"""The ops of a view after crop + resize, each on a whole batch at once.

Every op comes as a pair: a host half that turns the batch's records into per-sample numbers
(NumPy arrays, sent with the rest of the batch in one transfer, ``transfer.to_device``) and a
device half that runs a fixed number of tensor ops on the batch, whatever its size: no Python
loop over samples and no read of a device value. Pixel values stay on the 0..255 integer grid
between ops, rounded or truncated where PIL rounds or truncates (PIL, through timm's RandAugment
ops, is the reference the tests hold every op against):

- RandAugment, one op slot at a time, in place: the slot's samples are gathered once so that
  each op's samples are one contiguous slice (geometric ops together), each op writes its
  result over its slice, and they are put back. The five geometric ops are inverse-affine
  warps (per-sample matrices; one batched warp per kind: rotations over 16 taps, shears and
  translations along one axis over 4) computed as Pillow's transform computes it: pixel centres, its
  cubic kernel (a = -1) over 16 clamped taps, truncation, the mean colour outside (``torch``'s
  ``grid_sample`` would be cheaper, but its kernel is a = -0.75 and it rounds: 0.4-0.7 levels
  off, with a bias). Colour ops are PIL's blends with its degenerate images and truncation;
  equalize is PIL's histogram LUT, batched; sharpness blends with PIL's smoothing filter;
- random erasing: normal noise from a counter-based hash of (erase seed, pixel), the same
  numbers on every device, for all erased views at once;
- Mixup / CutMix with the partner's base view from the same batch, as one weighted ``lerp``.
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
#: Which of a warp's tap axes a geometric op needs: a shear or translation along x leaves every
#: output row on an input row (its vertical cubic weights are exactly 0, 1, 0, 0), along y every
#: column on a column; only a rotation needs all 16 taps. Each kind is one batched warp
#: (``_warp_affine``), so a translation costs 4 taps where it cost 16, with the very same sums.
_WARP_KIND = {"Rotate": "warp_xy", "ShearX": "warp_x", "TranslateXRel": "warp_x", "ShearY": "warp_y",
              "TranslateYRel": "warp_y"}
_KIND_FIRST = {"warp_xy": -3, "warp_x": -2, "warp_y": -1}  # the slot's sort key: warps first, by kind
_GEOMETRIC_KEY = {RA_OPS.index(n): _KIND_FIRST[k] for n, k in _WARP_KIND.items()}
_ENHANCERS = ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing")
Groups = list[tuple[str, int, int]]  # (op name or warp kind, start, stop) in a slot's order


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
        key = np.array([_GEOMETRIC_KEY.get(int(o), int(o)) for o in ops])  # warps first, by kind
        order = np.flatnonzero(ops >= 0)
        order = order[np.argsort(key[order], kind="stable")]
        level = np.abs(mags[order]) / MAG_SCALE / _LEVEL_DENOM  # timm: magnitude / _LEVEL_DENOM
        sign = np.where(mags[order] < 0, -1.0, 1.0)
        names = [RA_OPS[o] for o in ops[order]]
        slot: Groups = []
        for i, name in enumerate(names):
            label = _WARP_KIND.get(name, name)
            if slot and slot[-1][0] == label:
                slot[-1] = (label, slot[-1][1], i + 1)
            else:
                slot.append((label, i, i + 1))
        geo = [i for i, n in enumerate(names) if n in _WARP_KIND]
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


def randaugment(v: torch.Tensor, p: DeviceArrays, groups: list[Groups], fill: torch.Tensor,
                scratch: torch.Tensor, warp_kinds: bool = True) -> torch.Tensor:
    """Each op slot in turn, in place: gather the slot's samples in op order into ``scratch``
    (one copy), each op writes its result over its slice, scatter them back (one copy).
    ``warp_kinds``: one warp per kind (the fewest taps: a CPU's choice); else one warp over all
    of a slot's geometric samples (the fewest launches: a GPU's), the same numbers either way."""
    for k, slot in enumerate(groups):
        if not slot:
            continue
        order = p[f"ra{k}_order"]
        sub = torch.index_select(v, 0, order, out=scratch[:order.numel()])
        arg = p[f"ra{k}_arg"].float()
        for name, a, b in (slot if warp_kinds else _one_warp(slot)):
            part = sub[a:b]
            if name in _KIND_FIRST:  # the warps come first in the slot: their matrices are rows a..b
                _warp_affine(part, p[f"ra{k}_affine"][a:b].float(), fill, out=part, along=name[5:])
            else:
                _colour_op(name, part, arg[a:b].view(-1, 1, 1, 1), out=part)
        v.index_copy_(0, order, sub)
    return v


def _one_warp(slot: Groups) -> Groups:
    """A slot's groups with its warps (first in it, by kind) as one warp over all 16 taps."""
    warps = [g for g in slot if g[0] in _KIND_FIRST]
    return ([("warp_xy", warps[0][1], warps[-1][2])] if warps else []) + slot[len(warps):]


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


def _warp_affine(v: torch.Tensor, mats: torch.Tensor, fill: torch.Tensor, out: torch.Tensor,
                 along: str = "xy") -> torch.Tensor:
    """One batched inverse-affine warp [G, 3, S, S] with per-sample matrices [G, 6], as Pillow's
    ``Image.transform(AFFINE, BICUBIC, fillcolor)`` computes it, into ``out`` (which may be
    ``v``): an output pixel whose centre maps outside the image gets ``fill`` ([1, 3, 1, 1]);
    inside, Pillow's cubic (a = -1) over the 4 x 4 taps around the point, edge taps clamped,
    the sum clipped to 0..255 and truncated. The taps come as four row gathers of four
    neighbouring columns each, whatever G is. ``along`` "x" (or "y"): every sample's matrix
    keeps rows on rows (columns on columns), whose other-axis weights are exactly 0, 1, 0, 0;
    the taps of weight 0 are left out, which changes no bit of the sums."""
    g, c, h, w = v.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=v.device, dtype=torch.float32) + 0.5,
                            torch.arange(w, device=v.device, dtype=torch.float32) + 0.5, indexing="ij")
    m = mats.view(g, 6, 1, 1)
    xin = (m[:, 0] * xs + m[:, 1] * ys + m[:, 2]).view(g, h * w)
    yin = (m[:, 3] * xs + m[:, 4] * ys + m[:, 5]).view(g, h * w)
    inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
    x0, y0 = torch.floor(xin - 0.5), torch.floor(yin - 0.5)
    taps = torch.arange(-1, 3, device=v.device)
    xtaps, ytaps = (taps if "x" in along else taps[1:2]), (taps if "y" in along else taps[1:2])
    cols = (x0.long().unsqueeze(-1) + xtaps).clamp_(0, w - 1)                   # [G, HW, 4 or 1]
    rows = (y0.long().unsqueeze(-1) + ytaps).clamp_(0, h - 1) * w
    flat, nx = v.reshape(g, c, h * w), len(xtaps)
    wx = _cubic_weights(xin - 0.5 - x0).unsqueeze(1) if "x" in along else None   # [G, 1, HW, 4]
    wy = _cubic_weights(yin - 0.5 - y0) if "y" in along else None                # [G, HW, 4]
    acc = torch.zeros((g, c, h * w), device=v.device) if wy is not None else None
    for j in range(len(ytaps)):
        idx = (rows[..., j:j + 1] + cols).view(g, 1, h * w * nx).expand(g, c, h * w * nx)
        row = flat.gather(2, idx).view(g, c, h * w, nx)
        row = (row * wx).sum(-1) if wx is not None else row.view(g, c, h * w)
        if acc is not None:
            acc.addcmul_(row, wy[:, None, :, j])
        else:  # one row of weight 1: the sum is the row itself (0 + row, bit for bit)
            acc = row
    warped = acc.clamp_(0, 255).floor_().view(g, c, h, w)
    return torch.where(inside.view(g, 1, h, w), warped, fill, out=out)


def _cubic_weights(d: torch.Tensor) -> torch.Tensor:
    """The four tap weights [..., 4] of Pillow's cubic convolution (a = -1) at fraction ``d``."""
    d2, d3 = d * d, d * d * d
    return torch.stack((2 * d2 - d - d3, 1 - 2 * d2 + d3, d + d2 - d3, d3 - d2), dim=-1)


def _gray(v: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L: (19595 R + 38470 G + 7471 B + 2^15) >> 16, exact in float32."""
    return torch.floor((19595 * v[:, 0:1] + 38470 * v[:, 1:2] + 7471 * v[:, 2:3] + 32768) / 65536)


def _blend(degenerate: torch.Tensor, v: torch.Tensor, factor: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """PIL's Image.blend: degenerate + f (image - degenerate), clipped and truncated."""
    return torch.floor((degenerate + factor * (v - degenerate)).clamp_(0, 255), out=out)


def _colour_op(name: str, v: torch.Tensor, arg: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """One non-geometric op on its slice, into ``out`` (which may be ``v``: every op reads a
    pixel before it writes it); ``arg`` [B, 1, 1, 1] from ``_op_arguments``."""
    if name == "AutoContrast":
        lo = v.amin(dim=(2, 3), keepdim=True)
        hi = v.amax(dim=(2, 3), keepdim=True)
        scale = 255.0 / (hi - lo).clamp(min=1)
        return torch.where(hi > lo, torch.trunc(v * scale - lo * scale).clamp_(0, 255), v, out=out)
    if name == "Equalize":
        return out.copy_(_equalize(v))
    if name == "Invert":
        return torch.neg(v, out=out).add_(255.0)
    if name == "PosterizeIncreasing":
        return torch.mul(torch.floor(v / arg), arg, out=out)
    if name == "SolarizeIncreasing":
        return torch.where(v < arg, v, 255.0 - v, out=out)
    if name == "SolarizeAdd":
        return torch.where(v < 128, (v + arg).clamp_(max=255), v, out=out)
    if name == "ColorIncreasing":
        return _blend(_gray(v).expand_as(v), v, arg, out)
    if name == "ContrastIncreasing":
        mean = torch.floor(_gray(v).double().mean(dim=(1, 2, 3)) + 0.5).float()
        return _blend(mean.view(-1, 1, 1, 1).expand_as(v), v, arg, out)
    if name == "BrightnessIncreasing":  # a black degenerate: 0 + f (v - 0) is f v, exactly
        return torch.floor(torch.mul(v, arg).clamp_(0, 255), out=out)
    if name == "SharpnessIncreasing":
        return _blend(_smooth(v), v, arg, out)
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
    look-up table PIL builds from it (identity when one level or a zero step); int64 levels."""
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
    return lut.view(-1).gather(0, flat).view_as(v)


# ---- random erasing ------------------------------------------------------------------------------
_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x < 2^32 in int64, split in 16-bit halves so nothing overflows;
    in place on ``x`` (every op after the first in this hash works in place: a fresh tensor per
    op costs its allocation, on a CPU more than the op)."""
    hi = torch.mul(x, c >> 16).bitwise_and_(0xFFFF).bitwise_left_shift_(16)
    return x.mul_(c & 0xFFFF).add_(hi).bitwise_and_(_MASK32)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (lowbias32): counter -> well-mixed bits, exact on any device."""
    x = x & _MASK32
    x ^= x >> 16
    x = _mul32(x, 0x7FEB352D)
    x ^= x >> 15
    x = _mul32(x, 0x846CA68B)
    x ^= x >> 16
    return x


def _normal(key: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Standard normal numbers from (hashed seed, pixel index): Box-Muller on two hashed 24-bit
    uniforms, sqrt(-2 log u1) cos(2 pi u2)."""
    u1 = (_hash32(key ^ (2 * idx)) >> 8).float().add_(0.5).div_(16777216.0)
    u2 = (_hash32(key ^ (2 * idx + 1)) >> 8).float().add_(0.5).div_(16777216.0)
    return u1.log_().mul_(-2.0).sqrt_().mul_(u2.mul_(2.0 * math.pi).cos_())


def erase_noise(seed: int, box: tuple[int, int, int, int], size: int, device: torch.device) -> torch.Tensor:
    """The noise [3, h, w] of one erase box (x, y, w, h) of an S x S view, keyed by (erase seed,
    pixel index in the view): the PIL reference's erasing, one view at a time."""
    x, y, w, h = box
    ar = lambda n, off: torch.arange(off, off + n, device=device, dtype=torch.int64)
    idx = (ar(3, 0).view(3, 1, 1) * size + ar(h, y).view(1, h, 1)) * size + ar(w, x).view(1, 1, w)
    return _normal(_hash32(torch.tensor(seed, dtype=torch.int64, device=device)), idx)


def erase_params(recs: np.ndarray) -> dict[str, np.ndarray]:
    """The erased views' positions, box sizes and origins, seeds and where each box's pixels
    start in a flat list of all boxes' pixels (its size is known here, so the device never
    reports it)."""
    at = np.flatnonzero(recs[:, ERASE][:, 2] > 0)
    x, y, w, h = recs[at][:, ERASE].astype(np.int64).T
    return {"erase_at": at, "erase_x": x, "erase_y": y, "erase_w": w, "erase_hw": w * h,
            "erase_seed": recs[at, ERASE_SEED].astype(np.int64),
            "erase_start": np.concatenate([[0], np.cumsum(3 * w * h)]).astype(np.int64)}


def erase(v: torch.Tensor, p: DeviceArrays) -> torch.Tensor:
    """Random erasing of every erased view at once: each pixel of the boxes' flat list finds its
    box (``searchsorted``), takes the box's numbers (one row gather each), finds its channel,
    row and column, and gets its keyed noise."""
    start = p["erase_start"]
    if start.numel() <= 1:
        return v
    total = int(p.host("erase_start")[-1])
    s = v.shape[-1]
    t = torch.arange(total, device=v.device)
    box = torch.searchsorted(start[1:], t, right=True)
    per_box = {"start": start[:-1], "w": p["erase_w"], "hw": p["erase_hw"],
               "origin": p["erase_y"] * s + p["erase_x"], "key": _hash32(p["erase_seed"]),
               "view": p["erase_at"] * (3 * s * s)}
    b = {name: values.index_select(0, box) for name, values in per_box.items()}
    local = t - b["start"]
    channel = local // b["hw"]
    rem = local - channel * b["hw"]
    row = rem // b["w"]
    idx = (channel * s + row) * s + (rem - row * b["w"]) + b["origin"]
    v.view(-1).index_put_((b["view"] + idx,), _normal(b["key"], idx))
    return v


# ---- mixing --------------------------------------------------------------------------------------
def mix_params(recs: np.ndarray, own_at: list[int], partner_at: list[int]) -> dict[str, np.ndarray]:
    """Each view's base row and its partner's (its own when unmixed), and its weight of its own
    row: Mixup's lam, 1 for CutMix (0 inside the box, ``mix_box``, empty for the rest) and for an
    unmixed view."""
    mode = recs[:, MIX_MODE]
    mixup, cut = mode == MIX_MIXUP, mode == MIX_CUTMIX
    own = np.asarray(own_at, np.int64)
    return {"own": own, "partner": np.where(mixup | cut, np.asarray(partner_at, np.int64), own),
            "lam": np.where(mixup, recs[:, LAM] / LAM_ONE, 1.0),
            "mix_box": np.where(cut[:, None], recs[:, MIX_BOX], 0).astype(np.int64)}


def mix(base: torch.Tensor, p: DeviceArrays, out: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """The views [B, 3, S, S] from rows of ``base``, written into ``out``: Mixup lam own +
    (1 - lam) partner, CutMix the partner inside the box, the rest their own base view. All
    are one ``lerp(partner, own, weight)`` whose per-pixel weight is lam, or 0 inside a CutMix
    box and 1 elsewhere (a lerp at weight 0 or 1 is exactly its start or its end): two row
    gathers (own, partner) into ``scratch`` ([2, >= B, ...]) and one pass writing ``out``; the
    own rows are read in place when they are consecutive rows of ``base``, as the stages
    order them."""
    if (p.host("lam") == 1.0).all() and not p.host("mix_box").any():  # nothing mixed: the lerp is own
        return torch.index_select(base, 0, p["own"], out=out)
    n, s = out.shape[0], out.shape[-1]
    rows = p.host("own")
    first = int(rows[0])
    if (rows == np.arange(first, first + n)).all():  # stage two's and stage one's order
        own = base[first:first + n]
    else:
        own = torch.index_select(base, 0, p["own"], out=scratch[0][:n])
    partner = torch.index_select(base, 0, p["partner"], out=scratch[1][:n])
    b = p["mix_box"].view(-1, 4, 1, 1)
    ar = torch.arange(s, device=out.device)
    inside = ((ar.view(1, 1, -1) >= b[:, 0]) & (ar.view(1, 1, -1) < b[:, 2])
              & (ar.view(1, -1, 1) >= b[:, 1]) & (ar.view(1, -1, 1) < b[:, 3]))
    weight = torch.where(inside, 0.0, p["lam"].float().view(-1, 1, 1))
    return torch.lerp(partner, own, weight.unsqueeze(1), out=out)
