"""Teachers from ``NAME=ARCH:CHECKPOINT``: any timm classifier (ours included), weights from a
local file in any layout ``checkpoints`` accepts, in eval mode, plus the one function that runs a
teacher on a batch of views (bf16 autocast + channels_last on GPU).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from civt_cache.distributed import device_autocast, device_layout
from civt_cache.errors import ConfigError
from civt_cache.fsutil import sha256_file
from civt_cache.models.checkpoints import classifier_name, load_checkpoint_file, match_layout, recorded_img_size
from civt_cache.views.recipe import IMAGENET_MEAN, IMAGENET_STD


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
    img_size: int | None = None  # what it was trained at, where its file says (``recorded_img_size``)
    classes: list[str] | None = None  # the class names it was trained on, where its checkpoint says
    img_size_from: str = ""  # where its file records ``img_size`` ("" when it does not)

    def identity(self) -> dict[str, Any]:
        """What a cache stores to recognise this teacher later (and to find its file again:
        ``verify`` reruns it from ``checkpoint`` unless told where the file moved)."""
        return {"name": self.name, "arch": self.arch, "checkpoint_sha256": self.sha256,
                "checkpoint": str(Path(self.checkpoint).resolve()),
                "num_classes": self.num_classes, "mean": list(self.mean), "std": list(self.std)}


#: ``FILE:ema`` takes a checkpoint's EMA weights (timm train.py's ``state_dict_ema``).
EMA_SUFFIX = ":ema"


def checkpoint_file(ckpt: str) -> tuple[str, bool]:
    """The file of a teacher's ``CKPT`` and whether its EMA weights are asked for. A folder is a
    Hugging Face-style export (timm's ``save_for_hf`` or ``push_to_hub``): its
    ``model.safetensors``, described by the ``config.json`` beside it."""
    path, ema = (ckpt[: -len(EMA_SUFFIX)], True) if ckpt.endswith(EMA_SUFFIX) else (ckpt, False)
    return (str(Path(path) / "model.safetensors"), ema) if Path(path).is_dir() else (path, ema)


def checkpoint_sha256(ckpt: str) -> str:
    """What identifies a teacher's weights: its file's sha256, marked when the EMA weights are
    used (one file holds both sets, and a cache of one must not pass for the other)."""
    path, ema = checkpoint_file(ckpt)
    return sha256_file(path) + ("+ema" if ema else "")


def parse_teacher_spec(spec: str) -> tuple[str, str, str]:
    """``NAME=ARCH:CKPT`` (or ``ARCH:CKPT``, named after the arch) -> (name, arch, ckpt);
    ``CKPT`` may end in ``:ema`` (``checkpoint_file``)."""
    name, _, rest = spec.partition("=") if "=" in spec.split(":", 1)[0] else ("", "", spec)
    arch, sep, ckpt = rest.partition(":")
    if not sep or not arch or not ckpt:
        raise ConfigError(f"teacher {spec!r}: expected NAME=ARCH:CHECKPOINT, e.g. conv=regnety_006:r.pth")
    return name or arch, arch, ckpt


def build_teacher(spec: str, device: torch.device | str = "cpu") -> Teacher:
    """Build and load a teacher from ``NAME=ARCH:CKPT``, in eval mode on ``device``."""
    name, arch, ckpt = parse_teacher_spec(spec)
    path, ema = checkpoint_file(ckpt)
    sd, meta = load_checkpoint_file(path, ema)
    if "arch" in meta and meta["arch"] != arch:
        raise ConfigError(f"{ckpt}: checkpoint is for arch {meta['arch']!r}, not {arch!r}")
    probe = create_teacher_model(arch, 1)
    sd = match_layout(sd, probe, ckpt)
    head_weight = sd.get(f"{classifier_name(probe)}.weight")
    num_classes = int(meta.get("num_classes", head_weight.shape[0] if head_weight is not None else 0))
    if num_classes <= 0:
        raise ConfigError(f"{ckpt}: cannot tell the number of classes (no weight for "
                          f"{arch}'s classifier {classifier_name(probe)!r})")
    model = create_teacher_model(arch, num_classes)
    try:
        model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ConfigError(f"{ckpt}: does not fit {arch}: {str(e).splitlines()[-1].strip()}") from None
    mean = tuple(meta.get("mean", model.pretrained_cfg.get("mean", IMAGENET_MEAN)))
    std = tuple(meta.get("std", model.pretrained_cfg.get("std", IMAGENET_STD)))
    classes = meta.get("classes")
    img_size, img_size_from = recorded_img_size(meta)
    return Teacher(name, arch, str(ckpt), checkpoint_sha256(ckpt), model.eval().to(device), num_classes,
                   mean, std, img_size,  # type: ignore[arg-type]
                   [str(c) for c in classes] if isinstance(classes, list) else None, img_size_from)


def create_teacher_model(arch: str, num_classes: int) -> nn.Module:
    """``timm.create_model`` without weights; an unknown name is a user error, not a crash."""
    try:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes)
    except RuntimeError as e:
        raise ConfigError(f"unknown architecture {arch!r} ({e})") from None


@torch.no_grad()
def teacher_logits(teacher: Teacher, views: torch.Tensor, view_mean: tuple[float, ...],
                   view_std: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """Full float32 logits of ``teacher`` on a batch of views normalised with the recipe's
    mean/std (re-normalised to the teacher's own when they differ)."""
    x = views.to(device, non_blocking=True)
    if tuple(teacher.mean) != tuple(view_mean) or tuple(teacher.std) != tuple(view_std):
        vm, vs, tm, ts = _channel_constants((tuple(view_mean), tuple(view_std), tuple(teacher.mean),
                                             tuple(teacher.std)), str(device))
        x = ((x * vs + vm) - tm) / ts
    x = device_layout(x, device)
    with device_autocast(device):
        return teacher.model(x).float()


@functools.lru_cache(maxsize=64)
def _channel_constants(values: tuple[tuple[float, ...], ...], device: str) -> tuple[torch.Tensor, ...]:
    """Per-channel constants as [1, 3, 1, 1] tensors on ``device``, made once: a teacher run on
    every batch would otherwise copy four tiny tensors to the GPU per batch."""
    return tuple(torch.tensor(v, device=device).view(1, 3, 1, 1) for v in values)
