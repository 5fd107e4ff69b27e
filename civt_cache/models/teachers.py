"""Teachers from ``ARCH:CHECKPOINT``: any timm model (ours included), weights from a local file.

Accepted files: ``.safetensors``, or ``.pth``/``.pt`` holding a plain state dict or one wrapped
as ``{"state_dict"|"model"|"model_state": ...}`` (DDP ``module.`` prefixes and official mmcls
RedNet keys are mapped). The checkpoints ``train-teacher`` writes also carry the number of
classes, image size and normalisation; for others the class count is read off the classifier.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from ..errors import ConfigError
from ..fsutil import sha256_file
from .rednet import remap_mmcls_keys

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_WRAPPERS = ("state_dict", "model", "model_state", "state_dict_ema")


@dataclass
class Teacher:
    """A loaded teacher and the facts a cache records about it."""

    name: str
    arch: str
    checkpoint: str
    sha256: str
    model: nn.Module
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def identity(self) -> dict[str, Any]:
        """What a cache stores to recognise this teacher later."""
        return {"name": self.name, "arch": self.arch, "checkpoint_sha256": self.sha256,
                "num_classes": self.num_classes, "mean": list(self.mean), "std": list(self.std)}


def parse_teacher_spec(spec: str) -> tuple[str, str, str]:
    """``NAME=ARCH:CKPT`` (or ``ARCH:CKPT``, named after the arch) -> (name, arch, ckpt)."""
    name, _, rest = spec.partition("=") if "=" in spec.split(":", 1)[0] else ("", "", spec)
    arch, sep, ckpt = rest.partition(":")
    if not sep or not arch or not ckpt:
        raise ConfigError(f"teacher {spec!r}: expected NAME=ARCH:CHECKPOINT, e.g. conv=regnety_006:r.pth")
    return name or arch, arch, ckpt


def load_checkpoint_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, metadata) from any accepted checkpoint file; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: checkpoint file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path)), {}
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign files fail in many library-specific ways
        raise ConfigError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: checkpoint holds a {type(raw).__name__}, not a state dict")
    meta = {k: v for k, v in raw.items() if not isinstance(v, (dict, torch.Tensor))}
    for key in _WRAPPERS:
        if isinstance(raw.get(key), dict):
            raw = raw[key]
            break
    sd = {k.removeprefix("module."): v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise ConfigError(f"{path}: no tensors found in checkpoint")
    return remap_mmcls_keys(sd), meta


def build_teacher(spec: str, device: torch.device | str = "cpu") -> Teacher:
    """Build and load a teacher from ``NAME=ARCH:CKPT``, in eval mode on ``device``."""
    name, arch, ckpt = parse_teacher_spec(spec)
    sd, meta = load_checkpoint_file(ckpt)
    if "arch" in meta and meta["arch"] != arch:
        raise ConfigError(f"{ckpt}: checkpoint is for arch {meta['arch']!r}, not {arch!r}")
    try:
        probe = timm.create_model(arch, pretrained=False, num_classes=1)
    except RuntimeError as e:
        raise ConfigError(f"teacher {name}: unknown architecture {arch!r} ({e})") from None
    head_key = next((k for k in sd if k.endswith(".weight") and k.rsplit(".", 1)[0]
                     == _classifier_name(probe)), None)
    num_classes = int(meta.get("num_classes", sd[head_key].shape[0] if head_key else 0))
    if num_classes <= 0:
        raise ConfigError(f"{ckpt}: cannot tell the number of classes (no classifier weights)")
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ConfigError(f"{ckpt}: does not fit {arch}: {str(e).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise ConfigError(f"{ckpt}: does not fit {arch}: missing {missing[:4]}, "
                          f"unexpected {unexpected[:4]}")
    mean = tuple(meta.get("mean", model.pretrained_cfg.get("mean", IMAGENET_MEAN)))
    std = tuple(meta.get("std", model.pretrained_cfg.get("std", IMAGENET_STD)))
    return Teacher(name, arch, str(ckpt), sha256_file(ckpt), model.eval().to(device), num_classes,
                   mean, std)  # type: ignore[arg-type]


def _classifier_name(model: nn.Module) -> str:
    """Dotted name of the module ``get_classifier()`` returns (e.g. 'fc', 'head.fc')."""
    head = model.get_classifier()  # type: ignore[operator]
    return next(n for n, m in model.named_modules() if m is head)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPU; plain fp32 on CPU (where autocast is slower and less exact)."""
    return torch.bfloat16 if device.type == "cuda" else None


@torch.no_grad()
def teacher_logits(teacher: Teacher, views: torch.Tensor, view_mean: tuple[float, ...],
                   view_std: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """Full float32 logits of ``teacher`` on a batch of views normalised with the recipe's
    mean/std (re-normalised to the teacher's own when they differ)."""
    x = views.to(device, non_blocking=True)
    if tuple(teacher.mean) != tuple(view_mean) or tuple(teacher.std) != tuple(view_std):
        vm, vs = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (view_mean, view_std))
        tm, ts = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (teacher.mean, teacher.std))
        x = ((x * vs + vm) - tm) / ts
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    dtype = autocast_dtype(device)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        return teacher.model(x).float()
