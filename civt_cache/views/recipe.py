"""The view recipe: which augmentations make a training view, and with what parameters.

The default is co-advise's (DeiT's) recipe. A recipe is part of a cache's identity: a cache
built with one recipe refuses to train with another. Every part can be switched off.
"""
from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from civt_cache.errors import ConfigError
from civt_cache.fsutil import canonical_sha256

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RA_MAX_OPS = 4
MIX_MODES = ("batch", "pair", "elem")
#: Largest view side: 8x the paper's 224, and a batch of views still fits a GPU. Larger values
#: are typos that would allocate hundreds of GB before failing.
MAX_IMG_SIZE = 2048


@dataclass(frozen=True)
class RandAugmentSpec:
    """timm's ``rand-mM-nN-mstdS-incI-pP`` grammar, parsed."""

    magnitude: float = 9.0
    num_ops: int = 2
    magnitude_std: float = 0.5
    increasing: bool = True
    prob: float = 0.5

    @classmethod
    def parse(cls, text: str) -> "RandAugmentSpec":
        parts = text.split("-")
        if parts[0] != "rand":
            raise ConfigError(f"randaugment {text!r}: must start with 'rand'")
        values: dict[str, Any] = {"magnitude": 10.0, "num_ops": 2, "magnitude_std": 0.0,
                                  "increasing": False, "prob": 0.5}
        names = {"m": "magnitude", "n": "num_ops", "mstd": "magnitude_std", "inc": "increasing",
                 "p": "prob"}
        for part in parts[1:]:
            m = re.fullmatch(r"([a-z]+)([\d.]+)", part)
            if not m or m.group(1) not in names:
                raise ConfigError(f"randaugment {text!r}: unknown part {part!r}")
            key = names[m.group(1)]
            values[key] = (bool(int(m.group(2))) if key == "increasing"
                           else int(m.group(2)) if key == "num_ops" else float(m.group(2)))
        spec = cls(**values)
        if not 0 <= spec.num_ops <= RA_MAX_OPS:
            raise ConfigError(f"randaugment {text!r}: at most {RA_MAX_OPS} ops")
        if not spec.increasing:
            raise ConfigError(f"randaugment {text!r}: only the increasing op set (inc1) is supported")
        return spec


@functools.lru_cache(maxsize=64)
def _parsed_ra(text: str) -> RandAugmentSpec:
    """``RandAugmentSpec.parse``, once per text: every sampled record asks for it (the spec is
    frozen, so one object serves them all)."""
    return RandAugmentSpec.parse(text)


@dataclass(frozen=True)
class Recipe:
    """All parameters that shape a view. Zero probabilities / alphas switch parts off."""

    img_size: int = 224
    random_resized_crop: bool = True
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    randaugment: str = "rand-m9-mstd0.5-inc1"  # "" switches it off
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    erase_prob: float = 0.25
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    mix_prob: float = 1.0
    mix_switch_prob: float = 0.5
    mix_mode: str = "batch"   # timm's Mixup mode: one draw per "batch", "pair" or "elem" (view)
    mix_batch: int = 128      # views that share a draw in "batch" mode: the per-GPU batch

    def __post_init__(self) -> None:
        if not 8 <= self.img_size <= MAX_IMG_SIZE:
            raise ConfigError(f"recipe img_size {self.img_size}: must be between 8 and {MAX_IMG_SIZE} "
                              "pixels (--img-size)")
        for name in ("hflip", "erase_prob", "mix_prob", "mix_switch_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"recipe {name} must be a probability, got {getattr(self, name)}")
        for name in ("crop_scale", "crop_ratio"):
            low_high = tuple(getattr(self, name))
            if len(low_high) != 2 or not all(isinstance(v, (int, float)) and 0 < v < float("inf") for v in low_high) \
                    or low_high[0] > low_high[1]:
                raise ConfigError(f"recipe {name} {list(low_high)}: must be [low, high] with 0 < low <= high "
                                  "(timm's order)")
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ConfigError("recipe mixup_alpha / cutmix_alpha must be >= 0")
        if self.mix_mode not in MIX_MODES:
            raise ConfigError(f"recipe mix_mode {self.mix_mode!r}: one of {', '.join(MIX_MODES)} (timm's Mixup modes)")
        if self.mix_batch < 2 or self.mix_batch % 2:
            raise ConfigError(f"recipe mix_batch {self.mix_batch}: an even number of views >= 2 "
                              "(a block holds whole pairs)")
        self.ra_spec()  # validate early

    def ra_spec(self) -> RandAugmentSpec | None:
        return _parsed_ra(self.randaugment) if self.randaugment else None

    @property
    def mixing(self) -> bool:
        return self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "Recipe":
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ConfigError(f"recipe: unknown keys {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})

    def fingerprint(self) -> str:
        return canonical_sha256(self.to_json())
