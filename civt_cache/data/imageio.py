"""Pixels from PIL, shared by the shard writer and the view engine: every mode to 8-bit RGB by
its real range, and the per-image pixel limit checked from the header before anything decodes.

Why one place: a 16-bit PNG converted with PIL's ``convert("RGB")`` is clipped at 255 (a mid-grey
image becomes white), and an image's header can declare 9000x9000 pixels in 780 bytes; both must
be handled the same way wherever an image is opened.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from civt_cache.errors import BadImageError, ConfigError

#: Environment variable (set by ``civt-cache --max-image-pixels``, inherited by loader workers
#: and torchrun ranks) of the largest width x height an input image may declare.
MAX_PIXELS_ENV = "CIVT_MAX_IMAGE_PIXELS"
#: PIL's own decompression-bomb warning threshold: ImageNet's largest images are ~10x smaller.
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def pixels_from_env(name: str) -> int | None:
    """A positive pixel count set in the environment variable ``name`` (None when unset)."""
    raw = os.environ.get(name, "")
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: must be a whole number of pixels") from None
    if value < 1:
        raise ConfigError(f"{name}={raw!r}: must be >= 1")
    return value


def max_image_pixels() -> int:
    """The per-image pixel limit in force (``CIVT_MAX_IMAGE_PIXELS``, default PIL's)."""
    return pixels_from_env(MAX_PIXELS_ENV) or DEFAULT_MAX_PIXELS


def check_image_size(size: tuple[int, int], where: str) -> tuple[int, int]:
    """``size`` (width, height) if it is within the pixel limit; else a one-line refusal naming
    ``where`` (shard and key, or file), before any pixel is decoded."""
    w, h = size
    limit = max_image_pixels()
    if w < 1 or h < 1:
        raise BadImageError(f"{where}: image declares {w}x{h} pixels")
    if w * h > limit:
        raise BadImageError(f"{where}: image declares {w}x{h} = {w * h:,} pixels, over the "
                            f"per-image limit of {limit:,} (raise it with --max-image-pixels)")
    return size


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB. Transparency is composited on white; 16- and 32-bit integer
    modes (16-bit PNG and TIFF open as ``I;16`` or ``I``) are scaled from 0..65535, float images
    (``F``) from 0..1, each rounded; palette, CMYK, grey and the rest by PIL's conversion."""
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if im.mode in _SIXTEEN_BIT or im.mode == "F":
        scale = 255.0 / 65535.0 if im.mode in _SIXTEEN_BIT else 255.0
        arr = np.asarray(im, dtype=np.float64) * scale
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return im.convert("RGB")
