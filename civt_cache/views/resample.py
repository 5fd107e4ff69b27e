"""Pillow's antialiased bicubic resize, for a whole batch of differently sized crops at once.

Why not ``F.interpolate``: it takes one size per call, so crops of different boxes cost one call
(a dozen launches) per image, and its CUDA kernel is float, a level away from the PIL
reference. Here the batch is one separable pass in two stages, as Pillow's ``ImagingResample``
does it (``libImaging/Resample.c``):

- coefficient tables per sample and output position, computed on the host exactly as Pillow
  computes them (double precision, its support, bounds, normalisation and rounding to 22-bit
  fixed point), so they are the same numbers on every device;
- a horizontal pass over the rows the vertical pass will read, then the vertical pass, each an
  integer multiply-accumulate over the taps (one gather per tap for the whole batch), rounded
  and clipped to 0..255 between the passes as Pillow's 8-bit path is.

Integer arithmetic makes the result bit-exact to Pillow on any device, and independent of the
batch (padding taps weigh zero). Launches: about 3 per tap and pass, a tap being one source
pixel under the filter (9 for a 2x downscale), however many images. ``resample`` says which kernel runs where.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from civt_cache.views.transfer import to_device

PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed point for 8-bit images
_SUPPORT = 2.0  # bicubic
_A = -0.5  # Pillow's bicubic parameter


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's bicubic_filter, the same double operations in the same order."""
    x = np.abs(x)
    near = ((_A + 2.0) * x - (_A + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * _A
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def coefficients(in_size: np.ndarray, out_size: np.ndarray, first: np.ndarray,
                 count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pillow's ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` for resizing ``in_size`` to
    ``out_size`` pixels (per sample), at output positions ``first .. first + count``: the first
    input pixel under each output's filter [N, count], how many it covers [N, count], and the
    fixed-point weights [N, count, K] (K the batch's widest filter, zero past each one's)."""
    in_f = np.asarray(in_size, np.float64)
    scale = in_f / np.asarray(out_size, np.float64)
    filterscale = np.maximum(scale, 1.0)
    support = _SUPPORT * filterscale
    k = int(np.ceil(support).max()) * 2 + 1
    center = (np.asarray(first)[:, None] + np.arange(count) + 0.5) * scale[:, None]
    xmin = np.maximum(np.trunc(center - support[:, None] + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(center + support[:, None] + 0.5), in_f[:, None]).astype(np.int64) - xmin
    taps = np.arange(k)
    w = _bicubic(((taps + xmin[..., None]) - center[..., None] + 0.5) * (1.0 / filterscale)[:, None, None])
    w = np.where(taps < xmax[..., None], w, 0.0)
    total = np.zeros_like(center)
    for j in range(k):  # summed in order, as Pillow sums (np.sum would pair them)
        total = total + w[..., j]
    w = np.where(total[..., None] != 0.0, w / np.where(total == 0.0, 1.0, total)[..., None], w)
    one = float(1 << PRECISION_BITS)
    fixed = np.where(w < 0, np.trunc(-0.5 + w * one), np.trunc(0.5 + w * one)).astype(np.int64)
    return xmin, xmax, fixed


def resample(images: Sequence[torch.Tensor], boxes: np.ndarray, out_sizes: np.ndarray,
             windows: np.ndarray, size: int, kernel: str | None = None,
             flips: np.ndarray | None = None) -> torch.Tensor:
    """``images[i]`` (uint8 [3, H, W], one device) cropped to ``boxes[i]`` (x, y, w, h), resized
    to ``out_sizes[i]`` (width, height) by Pillow's bicubic filter, of which the S x S window at
    ``windows[i]`` (left, top) is returned, mirrored left-right where ``flips[i]``: uint8
    [N, 3, S, S], in whichever memory layout the kernel writes (channels-last for Pillow's). A
    crop-and-resize is window (0, 0) of an S x S output; a centre crop after a resize is its
    window. The flip is nearly free here (the gather kernel reverses its column tables, Pillow
    mirrors the small resized view), where a flip of finished views is three passes over them.

    Two kernels give the same bytes: ``"gather"``, the batched tensor program above (what a GPU
    runs: ~3 launches per tap, none per image), and ``"pillow"``, Pillow itself per image, which
    is what a CPU runs by default: on one core it resizes ~700 ImageNet crops/s where the
    tensor program, memory-bound on int32 gathers, manages ~40. The tests hold the gather kernel
    to Pillow bit for bit on the CPU, so the CPU's results are the GPU's."""
    n = len(images)
    boxes = np.asarray(boxes, np.int64).reshape(n, 4)
    out_sizes = np.asarray(out_sizes, np.int64).reshape(n, 2)
    windows = np.asarray(windows, np.int64).reshape(n, 2)
    flips = np.zeros(n, bool) if flips is None else np.asarray(flips, bool).reshape(n)
    kernel = kernel or ("pillow" if images[0].device.type == "cpu" else "gather")
    if kernel == "pillow":
        return _pillow(images, boxes, out_sizes, windows, size, flips)
    if kernel == "gather":
        return _gather(images, boxes, out_sizes, windows, size, flips)
    raise ValueError(f"unknown resize kernel {kernel!r}")


def _flat_view(img: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """A 1-D view of an image's pixels and the (channel, row, column) strides into it, without a
    copy whatever its layout (nvJPEG gives planar CHW, libjpeg interleaved HWC seen as CHW)."""
    order = sorted(range(3), key=lambda d: -img.stride(d))
    dense = img.permute(order)
    if not dense.is_contiguous():
        img = img.contiguous()
        dense = img
    return dense.reshape(-1), tuple(img.stride())


def _pillow(images: Sequence[torch.Tensor], boxes: np.ndarray, out_sizes: np.ndarray,
            windows: np.ndarray, s: int, flips: np.ndarray) -> torch.Tensor:
    out = torch.empty((len(images), s, s, 3), dtype=torch.uint8)
    pixels = out.numpy()
    for i, img in enumerate(images):
        x, y, w, h = (int(v) for v in boxes[i])
        left, top = (int(v) for v in windows[i])
        crop = Image.fromarray(img[:, y:y + h, x:x + w].permute(1, 2, 0).numpy())
        resized = crop.resize((int(out_sizes[i, 0]), int(out_sizes[i, 1])), Image.BICUBIC)
        if resized.size != (s, s) or left or top:
            resized = resized.crop((left, top, left + s, top + s))
        if flips[i]:  # Pillow mirrors in C; a reversed NumPy copy of 3-byte pixels is 4x slower
            resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels[i] = np.asarray(resized)
    return out.permute(0, 3, 1, 2)  # channels-last: the consumer's float copy transposes it in passing


def _gather(images: Sequence[torch.Tensor], boxes: np.ndarray, out_sizes: np.ndarray,
            windows: np.ndarray, s: int, flips: np.ndarray) -> torch.Tensor:
    n, device = len(images), images[0].device
    flats, strides = zip(*(_flat_view(img) for img in images))
    strides = np.array(strides, np.int64)  # per image (channel, row, column) strides
    offsets = np.concatenate([[0], np.cumsum([f.numel() for f in flats])[:-1]]).astype(np.int64)

    xmin, _, wh = coefficients(boxes[:, 2], out_sizes[:, 0], windows[:, 0], s)
    xmin[flips], wh[flips] = xmin[flips, ::-1], wh[flips, ::-1]  # output columns right to left
    ymin, ycount, wv = coefficients(boxes[:, 3], out_sizes[:, 1], windows[:, 1], s)
    first = ymin[:, 0]  # rows of the crop the vertical pass reads: first .. first + rows
    rows = ymin[:, -1] + ycount[:, -1] - first
    r = int(rows.max())
    row = np.minimum(np.arange(r), rows[:, None] - 1)  # padding rows repeat the last (unused)
    src_row = boxes[:, 1, None] + first[:, None] + row  # [N, R]
    row_start = (offsets[:, None, None] + np.arange(3)[None, :, None] * strides[:, 0, None, None]
                 + (src_row * strides[:, 1, None])[:, None, :] + (boxes[:, 0] * strides[:, 2])[:, None, None])
    plane = r * s
    tmp_row = (np.arange(n)[:, None, None] * 3 * plane + np.arange(3)[None, :, None] * plane
               + ((ymin - first[:, None]) * s)[:, None, :])
    p = to_device({"row_start": row_start, "col": xmin * strides[:, 2, None], "tap": strides[:, 2],
                   "wh": wh, "tmp_row": tmp_row, "wv": wv}, device)

    kh, kv = wh.shape[-1], wv.shape[-1]
    flat = torch.cat([*flats, torch.zeros(3 * kh, dtype=torch.uint8, device=device)]).to(torch.int32)
    index_type = torch.int32 if flat.numel() < 2 ** 31 else torch.int64
    src = (p["row_start"].unsqueeze(-1) + p["col"].view(n, 1, 1, s)).to(index_type)
    tap = p["tap"].to(index_type).view(n, 1, 1, 1)
    half = 1 << (PRECISION_BITS - 1)
    # horizontal pass into a buffer with kv spare rows, read (with weight 0) past the last row
    buf = torch.full((n * 3 * plane + kv * s,), half, dtype=torch.int32, device=device)
    tmp = buf[:n * 3 * plane].view(n, 3, r, s)
    weights = p["wh"].to(torch.int32)
    for k in range(kh):
        at = src if k == 0 else torch.add(src, tap, alpha=k)
        tmp.addcmul_(flat.index_select(0, at.view(-1)).view(n, 3, r, s), weights[:, :, k].view(n, 1, 1, s))
    buf.bitwise_right_shift_(PRECISION_BITS).clamp_(0, 255)
    # vertical pass over the clipped rows
    dst = (p["tmp_row"].unsqueeze(-1) + torch.arange(s, device=device)).to(index_type).view(-1)
    acc = torch.full((n, 3, s, s), half, dtype=torch.int32, device=device)
    weights = p["wv"].to(torch.int32)
    for k in range(kv):
        acc.addcmul_(buf[k * s:].index_select(0, dst).view(n, 3, s, s), weights[:, :, k].view(n, 1, s, 1))
    return acc.bitwise_right_shift_(PRECISION_BITS).clamp_(0, 255).to(torch.uint8)
