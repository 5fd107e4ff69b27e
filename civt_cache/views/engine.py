"""The view engine: a batch of (encoded image, record) in, a batch of finished views out, on the
device that consumes them. Stage one, stage two, ``verify``, online teachers and evaluation all
build their views here; nothing else renders an augmentation.

Why on the device and in batches: one CPU core decodes and augments ~190 ImageNet JPEGs/s, a
GPU trains a DeiT-Ti on ~7,800 img/s. So loader workers only move bytes (``worker_image``); the
device decodes them in one call (``torchvision.io.decode_jpeg`` on a list: nvJPEG on CUDA,
libjpeg-turbo on CPU) and builds the views of the whole batch with a fixed number of tensor
ops, whatever its size: every per-sample number (records, coefficient tables, factors, boxes,
indices) reaches the device in one transfer (``transfer``), and nothing reads a device value.
The code is device-agnostic torch: the CPU tests exercise exactly what runs on a GPU (the one
exception, the CPU's resize kernel, gives the same bytes and is tested against the other).

What a record renders is defined by PIL (the reference the tests hold every op against: timm's
RandAugment ops on uint8 images). The ops:

- crop + resize + flip: Pillow's antialiased bicubic resize, bit-exact on every device
  (``resample``);
- RandAugment, normalisation, erasing and Mixup/CutMix (``ops``), in place on the batch's
  float tensor.
"""
from __future__ import annotations

import io
import math
import threading
import warnings
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from civt_cache.data.imageio import check_image_size, pixels_from_env, to_rgb
from civt_cache.errors import BadImageError, OutOfMemoryError
from civt_cache.views.ops import erase, erase_params, mix, mix_params, randaugment, randaugment_params
from civt_cache.views.recipe import Recipe
from civt_cache.views.records import CROP, FLIP, PARTNER
from civt_cache.views.resample import resample
from civt_cache.views.transfer import DeviceArrays, to_device

EncodedImage = bytes | torch.Tensor  # JPEG bytes for the device, or uint8 [3, H, W] pixels


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
        data = [_bytes_tensor(items[i]) for i in jpeg]
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


def _bytes_tensor(data: bytes | bytearray) -> torch.Tensor:
    """The encoded bytes as a uint8 tensor without a copy (the decoder only reads them; torch
    warns about a read-only buffer, which is why the warning is silenced here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=torch.uint8)


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
    (stage one builds every epoch of a unit from one decode): each image is decoded once per
    pass, in groups whose pixels fit the decode budget, and cropped for every record set of the
    pass before the next group is decoded, so memory holds one group of full images and the
    uint8 crops of the pass. A pass takes as many record sets as their crops fit in the decode
    budget (at least one), so memory is bounded by the budget, not by the number of sets (stage
    one's epochs per unit: 30 sets of 256 rows at 224 px would hold 1.2 GB of crops); more sets
    than fit cost one more decode per pass. Yields each record set's views in turn (one set of
    float views alive at a time)."""
    sets = [np.asarray(r, dtype=np.int64) for r in records]
    plans = [_Plan.of(r, rows, outputs) for r in sets]
    crops = [len(plan.needed) * recipe.img_size ** 2 for plan in plans]  # pixels each set's crops hold
    budget, start = decode_budget(device), 0
    while start < len(sets):
        stop = start + 1
        while stop < len(sets) and sum(crops[start:stop + 1]) <= budget:
            stop += 1
        yield from _render_pass(items, sets[start:stop], plans[start:stop], recipe, device, names)
        start = stop


def _render_pass(items: Sequence[EncodedImage], sets: list[np.ndarray], plans: list["_Plan"], recipe: Recipe,
                 device: torch.device, names: Sequence[str] | None) -> Iterator[torch.Tensor]:
    """One pass of ``render_encoded``: the images its sets need decoded once, cropped for each."""
    s = recipe.img_size
    wanted = sorted(set().union(*(plan.needed for plan in plans)))
    needed = [set(plan.needed) for plan in plans]
    parts: list[list[torch.Tensor]] = [[] for _ in plans]
    for positions, images in decoded_in_budget([items[j] for j in wanted], device,
                                               [names[j] for j in wanted] if names else None):
        for recs, need, part in zip(sets, needed, parts):
            take = [k for k, p in enumerate(positions) if wanted[p] in need]
            if take:  # groups come in row order, so their crops concatenate in plan.needed order
                part.append(crop_resize([images[k] for k in take], recs[[wanted[positions[k]] for k in take]], s))
    for part, recs, plan in zip(parts, sets, plans):
        yield _render(part[0] if len(part) == 1 else torch.cat(part), recs, plan, recipe)


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
    """Each image's record crop, resized to S x S and flipped where the record says: uint8
    [N, 3, S, S] (the first ops of a view)."""
    n = len(images)
    return resample(images, recs[:, CROP], np.full((n, 2), s), np.zeros((n, 2)), s,
                    kernel="gather" if _gpu_stream[0] else None, flips=recs[:, FLIP] != 0)


#: Pixels per pass on a CPU: 16 views at 224 px, whose float views (10 MB) stay in cache across
#: the dozen passes where a whole batch would be fetched from memory by each (measured 2-3x
#: faster); smaller views go more to a pass (a whole batch of 32 px views is one), so their
#: passes are not all per-op overhead. Per-view results do not depend on the pass (see the
#: batch-independence test).
_CPU_CHUNK_PIXELS = 16 * 224 * 224
_gpu_stream = [False]


@contextmanager
def gpu_op_stream() -> Iterator[None]:
    """Inside the block a CPU runs the op stream a GPU runs (the gather resize kernel, whole
    batches), so that ``op_counts`` counts a GPU's launches and transfers on any machine."""
    _gpu_stream[0] = True
    try:
        yield
    finally:
        _gpu_stream[0] = False


def _render(crops: torch.Tensor, recs: np.ndarray, plan: _Plan, recipe: Recipe) -> torch.Tensor:
    """The views of ``plan.outputs`` from the crops of ``plan.needed`` (in that order): base
    views (RandAugment, normalise, erase), then mixing, each pass a fixed number of ops
    on the whole batch (on a GPU; in cache-sized chunks on a CPU) with its per-sample numbers
    sent in one transfer."""
    device = crops.device
    side = crops.shape[-1]
    step = max(1, _CPU_CHUNK_PIXELS // (side * side)) if device.type == "cpu" and not _gpu_stream[0] else 1 << 30
    needed = recs[plan.needed]
    outs = recs[plan.outputs]
    # each pass writes its rows of the batch's tensors (no copy joins the passes) and gathers
    # rows into two scratch tensors, all in one workspace: no tensor of the size of a pass is
    # made per op
    chunk = min(step, max(len(needed), len(outs)))
    ws = _workspace((len(needed) + 2 * chunk) * 3 * side * side, device).view(-1, 3, side, side)
    base, scratch = ws[:len(needed)], ws[len(needed):].view(2, chunk, 3, side, side)
    views = torch.empty((len(outs), 3, side, side), device=device)
    for i in range(0, len(needed), step):
        _base_views(crops[i:i + step], needed[i:i + step], recipe, base[i:i + step], scratch[0])
    at = {p: i for i, p in enumerate(plan.needed)}
    own, partner = [at[o] for o in plan.outputs], [at[q] for q in plan.partners]
    for i in range(0, len(outs), step):
        mix(base, to_device(mix_params(outs[i:i + step], own[i:i + step], partner[i:i + step]), device),
            views[i:i + step], scratch)
    return views


#: A CPU keeps each thread's per-batch working tensors (base views and scratch, never returned)
#: between batches, up to this many float32 values (1 GiB): a fresh 77 MB tensor costs its page
#: faults, 20-40 ms per 128 views at 224 px, more than some of the ops that fill it. A GPU's
#: caching allocator already reuses its blocks, so there the tensors are allocated per batch.
_WORKSPACE_MAX = 1 << 28
_workspaces = threading.local()


def _workspace(numel: int, device: torch.device) -> torch.Tensor:
    """``numel`` float32 values for one batch's internal tensors: on a CPU the calling thread's
    kept buffer (grown when too small), elsewhere or when larger than the cap a fresh tensor."""
    if device.type != "cpu" or numel > _WORKSPACE_MAX:
        return torch.empty(numel, device=device)
    buf = getattr(_workspaces, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = _workspaces.buf = torch.empty(numel)
    return buf[:numel]


def _base_views(crops: torch.Tensor, recs: np.ndarray, recipe: Recipe, out: torch.Tensor,
                scratch: torch.Tensor) -> None:
    """The unmixed views [M, 3, S, S] of the (flipped) crops, built in ``out``: one copy makes
    them float (and contiguous, whatever the crops' layout), then RandAugment (gathering into
    ``scratch``, at least M rows), normalisation and erasing run in place."""
    ra, groups = randaugment_params(recs, recipe.img_size)
    p = to_device({**ra, **erase_params(recs), **_normalize_params(recipe)}, crops.device)
    randaugment(out.copy_(crops), p, groups, p["fill"].float().view(1, 3, 1, 1), scratch,
                warp_kinds=crops.device.type == "cpu" and not _gpu_stream[0])
    erase(_normalize(out, p, out=out), p)


def _normalize_params(recipe: Recipe) -> dict[str, np.ndarray]:
    """0..255 levels -> (x / 255 - mean) / std as x * scale + shift; the RandAugment fill (the
    mean colour)."""
    return {"norm_scale": np.array([1.0 / (255.0 * s) for s in recipe.std]),
            "norm_shift": np.array([-m / s for m, s in zip(recipe.mean, recipe.std)]),
            "fill": np.array([float(round(255 * m)) for m in recipe.mean])}


def _normalize(v: torch.Tensor, p: DeviceArrays, out: torch.Tensor | None = None) -> torch.Tensor:
    return torch.addcmul(p["norm_shift"].float().view(1, 3, 1, 1), v, p["norm_scale"].float().view(1, 3, 1, 1),
                         out=out)


#: timm's (and DeiT's) evaluation crop: the short side resized to S / 0.875, the centre S kept.
EVAL_CROP_PCT = 0.875


def eval_views(images: Sequence[torch.Tensor], recipe: Recipe, crop_pct: float = EVAL_CROP_PCT) -> torch.Tensor:
    """Validation views: short side resized to S / crop_pct (torchvision's rounding), centre
    crop S, normalised; the resize computes only the centre window."""
    s = recipe.img_size
    short = int(math.floor(s / crop_pct))
    sizes, windows, boxes = [], [], []
    for img in images:
        h, w = img.shape[-2:]
        nh, nw = (int(short * h / w), short) if w <= h else (short, int(short * w / h))
        sizes.append((nw, nh))
        windows.append((int(round((nw - s) / 2.0)), int(round((nh - s) / 2.0))))
        boxes.append((0, 0, w, h))
    crops = resample(images, np.array(boxes), np.array(sizes), np.array(windows), s)
    views = torch.empty(crops.shape, device=crops.device).copy_(crops)
    return _normalize(views, to_device(_normalize_params(recipe), crops.device), out=views)
