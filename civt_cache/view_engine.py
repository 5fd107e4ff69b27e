"""The view engine: a batch of (encoded image, record) in, a batch of finished views out, on the
device that consumes them. Stage one, stage two, ``verify``, online teachers and evaluation all
build their views here; nothing else renders an augmentation.

Why on the device and in batches: one CPU core decodes and augments ~190 ImageNet JPEGs/s, a
GPU trains a DeiT-Ti on ~7,800 img/s. So loader workers only move bytes (``worker_image``); the
device decodes them in one call (``torchvision.io.decode_jpeg`` on a list: nvJPEG on CUDA,
libjpeg-turbo on CPU) and applies every op to the whole batch with per-sample parameters.
The code is device-agnostic torch: the CPU tests exercise exactly what runs on a GPU.

What a record renders is defined by PIL (the reference the tests hold every op against: timm's
RandAugment ops on uint8 images), so pixel values stay on the 0..255 integer grid between ops,
rounded or truncated where PIL rounds or truncates. Per op:

- crop + resize: per image (sizes differ), ``F.interpolate(bicubic, antialias=True)``, PIL's
  antialiased bicubic filter (uint8 kernel on CPU, float on CUDA);
- flip, normalisation, mixing: batched tensor ops;
- RandAugment, one op slot at a time: the five geometric ops as ONE batched inverse-affine warp
  (``grid_sample``, per-sample grids) with PIL's pixel-centre convention, edge taps clamped and
  the mean colour outside; its bicubic kernel is a = -0.75 where Pillow's transform uses a = -1:
  measured 0.5-0.8 levels mean absolute difference, 47-50 dB, at a tenth of the cost of
  gathering the 16 taps ourselves; colour ops as per-sample blends with PIL's degenerate images and
  truncation; equalize and sharpness from kornia (they take per-sample factors and follow
  PIL); autocontrast, posterize (0 bits at magnitude 10: black, as co-advise's Pillow gave),
  solarize, invert on the integer levels (kornia has no PIL-style autocontrast, and its
  contrast/brightness/saturation are not PIL's blends);
- random erasing: normal noise from a counter-based hash of (erase seed, pixel), the same
  numbers on every device;
- Mixup / CutMix with the partner's base view from the same batch.
"""
from __future__ import annotations

import io
import math
from typing import Iterator, Sequence

import kornia.enhance
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from .errors import BadImageError, OutOfMemoryError
from .imageio import check_image_size, pixels_from_env, to_rgb
from .recipe import RA_MAX_OPS, Recipe
from .views import CROP, ERASE, ERASE_SEED, FLIP, LAM, LAM_ONE, MAG_SCALE, MIX_BOX, MIX_CUTMIX, \
    MIX_MIXUP, MIX_MODE, PARTNER, RA, RA_OPS

EncodedImage = bytes | torch.Tensor  # JPEG bytes for the device, or uint8 [3, H, W] pixels
_LEVEL_DENOM = 10.0  # timm's RandAugment magnitude scale
_GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


# ---- bytes in ---------------------------------------------------------------------------------
def worker_image(data: bytes, where: str) -> EncodedImage:
    """What a loader worker hands over for one image: colour JPEGs as their bytes (decoded on
    the device), anything else (PNG, WebP, grayscale or CMYK JPEG) as uint8 pixels decoded
    here with PIL, which is rare and small in the data sets this tool is for."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            check_image_size(im.size, where)
            if im.format == "JPEG" and im.mode == "RGB":
                return data
            rgb = np.asarray(to_rgb(im))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadImageError(f"{where}: image does not decode ({e})") from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def decode_images(items: Sequence[EncodedImage], device: torch.device,
                  names: Sequence[str] | None = None) -> list[torch.Tensor]:
    """uint8 [3, H, W] images on ``device``: JPEG bytes in one batched decode, pixels moved.
    A JPEG that does not decode is named (``names``, e.g. shard and key); running out of memory
    is said as such, never blamed on an image. Callers that may hold many large images decode
    through ``decoded_in_budget``."""
    out: list[torch.Tensor | None] = [None] * len(items)
    jpeg = [i for i, x in enumerate(items) if isinstance(x, (bytes, bytearray))]
    if jpeg:
        data = [torch.frombuffer(bytearray(items[i]), dtype=torch.uint8) for i in jpeg]
        try:
            decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except (RuntimeError, MemoryError) as e:
            if _out_of_memory(e):
                raise _memory_error(items, device, names) from None
            decoded = [_decode_one(d, items[i], device, names[i] if names else f"image {i}")
                       for d, i in zip(data, jpeg)]
        for i, img in zip(jpeg, decoded):
            out[i] = img
    for i, x in enumerate(items):
        if out[i] is None:
            out[i] = x.to(device, non_blocking=True)
    return out  # type: ignore[return-value]


def _decode_one(data: torch.Tensor, item: EncodedImage, device: torch.device, name: str) -> torch.Tensor:
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except (RuntimeError, MemoryError) as e:
        if _out_of_memory(e):
            raise _memory_error([item], device, [name]) from None
        raise BadImageError(f"{name}: JPEG does not decode ({str(e).splitlines()[0]})") from None


def _out_of_memory(e: BaseException) -> bool:
    text = str(e)
    return (isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in text
            or "can't allocate memory" in text or "Cannot allocate memory" in text)


def _memory_error(items: Sequence[EncodedImage], device: torch.device,
                  names: Sequence[str] | None) -> OutOfMemoryError:
    pixels = sum(encoded_pixels(x) for x in items)
    first = f", e.g. {names[0]}" if names else ""
    return OutOfMemoryError(f"out of memory on {device} decoding {len(items)} image(s) of "
                            f"{pixels:,} pixels in all{first}: lower the decode budget "
                            f"(--decode-budget, now {decode_budget(device):,} pixels) or the "
                            "per-image limit (--max-image-pixels), or free memory")


# ---- memory: decoded pixels bounded by a budget -----------------------------------------------
#: Environment variable (set by ``civt-cache --decode-budget``, inherited by workers and ranks)
#: of the decoded pixels one decode pass may hold, whatever the number of images.
BUDGET_ENV = "CIVT_DECODE_BUDGET_PIXELS"
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # JPEG start-of-frame


def decode_budget(device: torch.device) -> int:
    """Decoded pixels one pass may hold: ``CIVT_DECODE_BUDGET_PIXELS``, else 64 Mpx on a CPU
    (~200 MB of RGB: a batch of 256 ImageNet images is ~50 Mpx) and 1/64 of a GPU's memory at
    ~16 bytes per pixel (decode, crop and float views), e.g. 78 Mpx on an 80 GB card."""
    value = pixels_from_env(BUDGET_ENV)
    if value is not None:
        return value
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 64 // 16
    return 64 << 20


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's start-of-frame marker, without decoding (a few µs, where
    PIL's header parse takes ~70); None when the markers do not lead to one."""
    i, n = 2, len(data)
    if data[:2] != b"\xff\xd8":
        return None
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in _SOF_MARKERS and i + 9 <= n:
            return (data[i + 7] << 8) | data[i + 8], (data[i + 5] << 8) | data[i + 6]
        i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return None


def encoded_pixels(item: EncodedImage) -> int:
    """Pixels ``item`` decodes to, from its header (JPEG bytes) or its shape (pixels)."""
    if isinstance(item, torch.Tensor):
        return int(item.shape[-1] * item.shape[-2])
    size = jpeg_size(item)
    if size is None:
        try:
            with Image.open(io.BytesIO(item)) as im:
                size = im.size
        except (OSError, ValueError, Image.DecompressionBombError):
            return 0  # the decode names it
    return size[0] * size[1]


def decoded_in_budget(items: Sequence[EncodedImage], device: torch.device,
                      names: Sequence[str] | None = None,
                      budget: int | None = None) -> Iterator[tuple[list[int], list[torch.Tensor]]]:
    """Decode ``items`` in consecutive groups whose decoded pixels fit ``budget`` (default
    ``decode_budget``); yields (positions, images). An image alone over the budget is decoded
    alone (the per-image limit bounds it), so memory is bounded by pixels, not image counts."""
    budget = decode_budget(device) if budget is None else budget
    group: list[int] = []
    total = 0
    for i, item in enumerate(items):
        pixels = encoded_pixels(item)
        if group and total + pixels > budget:
            yield group, decode_images([items[j] for j in group], device,
                                       [names[j] for j in group] if names else None)
            group, total = [], 0
        group.append(i)
        total += pixels
    if group:
        yield group, decode_images([items[j] for j in group], device,
                                   [names[j] for j in group] if names else None)


# ---- views -------------------------------------------------------------------------------------
def render_views(images: Sequence[torch.Tensor], records: np.ndarray, rows: Sequence[int],
                 recipe: Recipe, outputs: Sequence[int] | None = None) -> torch.Tensor:
    """THE view function. ``images[i]`` (uint8 [3, H, W], on the device) is the image of global
    row ``rows[i]`` and ``records[i]`` its record; returns the finished views [N, 3, S, S]
    (float32, normalised) of the positions ``outputs`` (default: all). Every base view is built
    once; a mixed view takes its partner's base view from this batch, so the partner's row must
    be among ``rows``."""
    recs = np.asarray(records, dtype=np.int64)
    plan = _Plan.of(recs, rows, outputs)
    crops = crop_resize([images[j] for j in plan.needed], recs[plan.needed], recipe.img_size)
    return _render(crops, recs, plan, recipe)


def render_encoded(items: Sequence[EncodedImage], records: Sequence[np.ndarray],
                   rows: Sequence[int], recipe: Recipe, device: torch.device,
                   names: Sequence[str] | None = None,
                   outputs: Sequence[int] | None = None) -> Iterator[torch.Tensor]:
    """``render_views`` from encoded images, for one or several record sets of the same rows
    (stage one builds every epoch of a unit from one decode): each image is decoded once, in
    groups whose pixels fit the decode budget, and cropped for every record set before the next
    group is decoded, so memory holds one group of full images and the small uint8 crops. Yields
    each record set's views in turn (one set of float views alive at a time)."""
    s = recipe.img_size
    sets = [np.asarray(r, dtype=np.int64) for r in records]
    plans = [_Plan.of(r, rows, outputs) for r in sets]
    wanted = sorted(set().union(*(plan.needed for plan in plans)))
    crops = [torch.empty((len(plan.needed), 3, s, s), dtype=torch.uint8, device=device) for plan in plans]
    slots = [{p: i for i, p in enumerate(plan.needed)} for plan in plans]
    for positions, images in decoded_in_budget([items[j] for j in wanted], device,
                                               [names[j] for j in wanted] if names else None):
        for recs, slot, out in zip(sets, slots, crops):
            take = [(k, wanted[p]) for k, p in enumerate(positions) if wanted[p] in slot]
            if take:
                at = torch.as_tensor([slot[row] for _, row in take], device=device)
                out[at] = crop_resize([images[k] for k, _ in take], recs[[row for _, row in take]], s)
    for c, recs, plan in zip(crops, sets, plans):
        yield _render(c, recs, plan, recipe)


class _Plan:
    """Which base views a batch needs: its ``outputs``, their mixing partners' positions, and
    the sorted union of both (``needed``), each built once."""

    def __init__(self, outputs: list[int], partners: list[int]) -> None:
        self.outputs, self.partners = outputs, partners
        self.needed = sorted(set(outputs) | set(partners))

    @classmethod
    def of(cls, recs: np.ndarray, rows: Sequence[int], outputs: Sequence[int] | None) -> "_Plan":
        outputs = list(range(len(rows))) if outputs is None else list(outputs)
        position = {int(r): i for i, r in enumerate(rows)}
        try:
            partners = [position[int(p)] for p in recs[outputs, PARTNER]]
        except KeyError as e:
            raise ValueError(f"row {rows[outputs[0]]}'s mixing partner {e.args[0]} is not in the "
                             "batch") from None
        return cls(outputs, partners)


def crop_resize(images: Sequence[torch.Tensor], recs: np.ndarray, s: int) -> torch.Tensor:
    """Each image's record crop, resized to S x S: uint8 [N, 3, S, S] (the first op of a view)."""
    return torch.stack([_resized_crop(img, *(int(c) for c in rec[CROP]), s) for img, rec in zip(images, recs)])


def _render(crops: torch.Tensor, recs: np.ndarray, plan: _Plan, recipe: Recipe) -> torch.Tensor:
    """The views of ``plan.outputs`` from the crops of ``plan.needed`` (in that order)."""
    device = crops.device
    needed, outputs, partners = plan.needed, plan.outputs, plan.partners
    out_recs = recs[outputs]
    s, step = recipe.img_size, _chunk(device)
    base = torch.empty((len(needed), 3, s, s), device=device)
    for i in range(0, len(needed), step):
        part = needed[i:i + step]
        base[i:i + len(part)] = _base_views(crops[i:i + len(part)], recs[part], recipe)
    at = {p: i for i, p in enumerate(needed)}
    own_at = torch.as_tensor([at[o] for o in outputs], device=device)
    partner_at = torch.as_tensor([at[p] for p in partners], device=device)
    out = torch.empty((len(outputs), 3, s, s), device=device)
    for i in range(0, len(outputs), step):
        j = slice(i, i + step)
        out[j] = _mix(base[own_at[j]], base[partner_at[j]], out_recs[j])
    return out


def _chunk(device: torch.device) -> int:
    """Views per pass of the ops. On a GPU the whole batch (one launch per op is what is fast);
    on CPU 16, whose float views (10 MB at 224 px) stay in cache across the dozen passes where a
    batch of 128 (77 MB) would be fetched from memory by each (measured 1.5x faster)."""
    return 16 if device.type == "cpu" else 1 << 30


def _base_views(crops: torch.Tensor, recs: np.ndarray, recipe: Recipe) -> torch.Tensor:
    """Flip, RandAugment, normalise, erase the crops: unmixed views [M, 3, S, S]."""
    v = crops.float()
    flip = torch.as_tensor(np.flatnonzero(recs[:, FLIP]), device=v.device)
    v[flip] = v[flip].flip(-1)
    v = _randaugment(v, recs, tuple(float(round(255 * m)) for m in recipe.mean))
    return _erase(normalize_levels(v, recipe), recs)


def _resized_crop(img: torch.Tensor, x: int, y: int, w: int, h: int, s: int) -> torch.Tensor:
    """PIL's antialiased bicubic resize of a crop, as uint8 [3, S, S]."""
    return _resize(img[:, y:y + h, x:x + w], (s, s))


def _resize(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Antialiased bicubic resize of a uint8 image. On CPU torch's uint8 kernel (written to match
    PIL's, and 4-5x faster than the float one); elsewhere the float kernel, rounded."""
    if img.device.type == "cpu":
        return F.interpolate(img.unsqueeze(0), size=size, mode="bicubic", antialias=True,
                             align_corners=False)[0]
    out = F.interpolate(img.unsqueeze(0).float(), size=size, mode="bicubic", antialias=True,
                        align_corners=False)[0]
    return out.round_().clamp_(0, 255).to(torch.uint8)


def normalize_levels(v: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """0..255 levels -> (x / 255 - mean) / std."""
    scale = torch.tensor([1.0 / (255.0 * s) for s in recipe.std], device=v.device).view(1, 3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(recipe.mean, recipe.std)], device=v.device).view(1, 3, 1, 1)
    return torch.addcmul(shift, v, scale)


def eval_views(images: Sequence[torch.Tensor], recipe: Recipe, crop_pct: float = 0.875) -> torch.Tensor:
    """Validation views: short side resized to S / crop_pct (torchvision's rounding), centre
    crop S, normalised."""
    s = recipe.img_size
    short = int(math.floor(s / crop_pct))
    out = []
    for img in images:
        h, w = img.shape[-2:]
        nh, nw = (int(short * h / w), short) if w <= h else (short, int(short * w / h))
        r = _resize(img, (nh, nw))
        top, left = int(round((nh - s) / 2.0)), int(round((nw - s) / 2.0))
        out.append(r[:, top:top + s, left:left + s])
    return normalize_levels(torch.stack(out).float(), recipe)


# ---- RandAugment -------------------------------------------------------------------------------
def _randaugment(v: torch.Tensor, recs: np.ndarray, fill: tuple[float, ...]) -> torch.Tensor:
    """Apply each op slot in turn; inside a slot every sample's op runs on its sub-batch."""
    ra = recs[:, RA].reshape(len(recs), RA_MAX_OPS, 2)
    for k in range(RA_MAX_OPS):
        ops, mags = ra[:, k, 0], ra[:, k, 1]
        if (ops < 0).all():
            continue
        level = np.abs(mags) / MAG_SCALE / _LEVEL_DENOM  # timm: magnitude / _LEVEL_DENOM
        sign = np.where(mags < 0, -1.0, 1.0)
        names = np.array([RA_OPS[o] if o >= 0 else "" for o in ops])
        geo = np.flatnonzero(np.isin(names, _GEOMETRIC))
        if len(geo):
            mats = np.stack([_affine_matrix(names[i], level[i], sign[i], v.shape[-1]) for i in geo])
            idx = torch.as_tensor(geo, device=v.device)
            v[idx] = _warp_affine(v[idx], torch.as_tensor(mats, dtype=torch.float32, device=v.device), fill)
        for name in set(names.tolist()) - set(_GEOMETRIC) - {""}:
            sel = np.flatnonzero(names == name)
            idx = torch.as_tensor(sel, device=v.device)
            v[idx] = _colour_op(name, v[idx], level[sel], sign[sel])
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


def _warp_affine(v: torch.Tensor, mats: torch.Tensor, fill: tuple[float, ...]) -> torch.Tensor:
    """One batched inverse-affine warp [G, 3, S, S] with per-sample matrices [G, 6], as PIL's
    ``Image.transform(AFFINE, BICUBIC, fillcolor)``: an output pixel whose centre maps outside
    the image gets ``fill``; inside, bicubic taps clamped at the edges (``grid_sample``)."""
    g, c, h, w = v.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=v.device, dtype=torch.float32) + 0.5,
                            torch.arange(w, device=v.device, dtype=torch.float32) + 0.5, indexing="ij")
    m = mats.view(g, 6, 1, 1)
    xin = m[:, 0] * xs + m[:, 1] * ys + m[:, 2]
    yin = m[:, 3] * xs + m[:, 4] * ys + m[:, 5]
    grid = torch.stack((2 * xin / w - 1, 2 * yin / h - 1), dim=-1)
    out = F.grid_sample(v, grid, mode="bicubic", padding_mode="border", align_corners=False)
    inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
    fill_t = torch.tensor(fill, device=v.device).view(1, c, 1, 1)
    return torch.where(inside[:, None], out.round().clamp(0, 255), fill_t)


def _gray(v: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L: (19595 R + 38470 G + 7471 B + 2^15) >> 16, exact in float32."""
    return torch.floor((19595 * v[:, 0:1] + 38470 * v[:, 1:2] + 7471 * v[:, 2:3] + 32768) / 65536)


def _blend(degenerate: torch.Tensor, v: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's Image.blend: degenerate + f (image - degenerate), clipped and truncated."""
    return torch.floor((degenerate + factor.view(-1, 1, 1, 1) * (v - degenerate)).clamp(0, 255))


def _colour_op(name: str, v: torch.Tensor, level: np.ndarray, sign: np.ndarray) -> torch.Tensor:
    """One non-geometric op on its sub-batch, per-sample arguments from timm's level rules."""
    def per_sample(values: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(values, dtype=torch.float32, device=v.device)

    def factor() -> torch.Tensor:  # the *Increasing enhancers (a host-to-device copy: only theirs)
        return per_sample(np.maximum(0.1, 1.0 + sign * 0.9 * level))

    if name == "AutoContrast":
        lo = v.amin(dim=(2, 3), keepdim=True)
        hi = v.amax(dim=(2, 3), keepdim=True)
        scale = 255.0 / (hi - lo).clamp(min=1)
        return torch.where(hi > lo, torch.trunc(v * scale - lo * scale).clamp(0, 255), v)
    if name == "Equalize":
        return (kornia.enhance.equalize(v / 255.0) * 255.0).round()
    if name == "Invert":
        return 255.0 - v
    if name == "PosterizeIncreasing":
        # timm's bits = 4 - int(4 level): 0 bits at magnitude 10, a black image, as Pillow before
        # 12 (which co-advise ran) gives; keeping b bits of a level is flooring to 2^(8 - b)
        step = per_sample(2.0 ** (8 - (4 - (level * 4).astype(np.int64)))).view(-1, 1, 1, 1)
        return torch.floor(v / step) * step
    if name == "SolarizeIncreasing":
        thresh = per_sample(256 - np.minimum(256, (level * 256).astype(np.int64))).view(-1, 1, 1, 1)
        return torch.where(v < thresh, v, 255.0 - v)
    if name == "SolarizeAdd":
        add = per_sample(np.minimum(128, (level * 110).astype(np.int64))).view(-1, 1, 1, 1)
        return torch.where(v < 128, (v + add).clamp(max=255), v)
    if name == "ColorIncreasing":
        return _blend(_gray(v).expand_as(v), v, factor())
    if name == "ContrastIncreasing":
        mean = torch.floor(_gray(v).double().mean(dim=(1, 2, 3)) + 0.5).float()
        return _blend(mean.view(-1, 1, 1, 1).expand_as(v), v, factor())
    if name == "BrightnessIncreasing":
        return _blend(torch.zeros_like(v), v, factor())
    if name == "SharpnessIncreasing":
        return torch.floor(kornia.enhance.sharpness(v / 255.0, factor()) * 255.0 + 1e-3)
    raise ValueError(f"unknown RandAugment op {name!r}")


# ---- erasing and mixing ------------------------------------------------------------------------
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


def erase_noise(seed: int, box: tuple[int, int, int, int], size: int, device: torch.device) -> torch.Tensor:
    """Standard normal noise [3, h, w] for the erase box (x, y, w, h) of an S x S view, keyed by
    (erase seed, pixel index in the view): the same numbers on every device and in every batch
    (Box-Muller on two hashed 24-bit uniforms)."""
    x, y, w, h = box
    ar = lambda n, off: torch.arange(off, off + n, device=device, dtype=torch.int64)
    idx = (ar(3, 0).view(3, 1, 1) * size + ar(h, y).view(1, h, 1)) * size + ar(w, x).view(1, 1, w)
    key = _hash32(torch.tensor(seed, dtype=torch.int64, device=device))
    u1 = ((_hash32(key ^ (2 * idx)) >> 8).float() + 0.5) / 16777216.0
    u2 = ((_hash32(key ^ (2 * idx + 1)) >> 8).float() + 0.5) / 16777216.0
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)


def _box_mask(boxes: np.ndarray, size: int, device: torch.device) -> torch.Tensor:
    """[N, 1, S, S] mask of boxes given as (x0, y0, x1, y1)."""
    b = torch.as_tensor(boxes, device=device).view(-1, 4, 1, 1)
    ar = torch.arange(size, device=device)
    inx = (ar.view(1, 1, -1) >= b[:, 0]) & (ar.view(1, 1, -1) < b[:, 2])
    iny = (ar.view(1, -1, 1) >= b[:, 1]) & (ar.view(1, -1, 1) < b[:, 3])
    return (inx & iny)[:, None]


def _erase(v: torch.Tensor, recs: np.ndarray) -> torch.Tensor:
    """Random erasing: each erased view's box (a few % to a third of it) gets its own noise."""
    for i in np.flatnonzero(recs[:, ERASE][:, 2] > 0):
        x, y, w, h = (int(c) for c in recs[i, ERASE])
        v[i, :, y:y + h, x:x + w] = erase_noise(int(recs[i, ERASE_SEED]), (x, y, w, h), v.shape[-1], v.device)
    return v


def _mix(own: torch.Tensor, partner: torch.Tensor, recs: np.ndarray) -> torch.Tensor:
    """Mixup: lam own + (1 - lam) partner (``lerp``, exact at lam = 1); CutMix: the partner
    inside the box."""
    mode = recs[:, MIX_MODE]
    lam = np.where(mode == MIX_MIXUP, recs[:, LAM] / LAM_ONE, 1.0)
    lam_t = torch.as_tensor(lam, dtype=torch.float32, device=own.device).view(-1, 1, 1, 1)
    out = torch.lerp(partner, own, lam_t)
    cut = np.flatnonzero(mode == MIX_CUTMIX)
    if len(cut):
        idx = torch.as_tensor(cut, device=own.device)
        inside = _box_mask(recs[cut][:, MIX_BOX], own.shape[-1], own.device)
        out[idx] = torch.where(inside, partner[idx], out[idx])
    return out
