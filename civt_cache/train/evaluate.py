"""Evaluation of a model on a validation manifest (all ranks, one result), the forward passes
that give a model's heads by name, and ``eval`` of a saved checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from civt_cache.data.manifest import DataManifest, class_difference, load_manifest
from civt_cache.distributed import DistInfo, all_reduce_sum, device_autocast, device_layout, distributed_session
from civt_cache.errors import ConfigError, ManifestError
from civt_cache.loader.batches import ValBatches, batch_loader, val_views
from civt_cache.models.checkpoints import load_checkpoint_file
from civt_cache.models.teachers import EMA_SUFFIX, build_teacher, checkpoint_file
from civt_cache.progress import Progress
from civt_cache.stopping import check_stop
from civt_cache.views.engine import EVAL_CROP_PCT
from civt_cache.views.recipe import Recipe


@torch.no_grad()
def evaluate(model: nn.Module, manifest: DataManifest, recipe: Recipe, info: DistInfo,
             heads_of: Callable[[nn.Module, torch.Tensor], dict[str, torch.Tensor]],
             batch_size: int, workers: int) -> dict[str, float]:
    """Top-1 (and top-5) in percent of every named output and the mean cross-entropy of the
    first (the model's prediction), over the whole validation set (shards split across ranks,
    counts summed)."""
    was_training = model.training
    model.eval()
    shards = list(range(len(manifest.shards)))[info.rank::info.world_size]
    loader = batch_loader(ValBatches(manifest, shards, batch_size), min(workers, len(shards)))
    # rank 0 shows the whole val set, its own share's progress scaled to it (the ranks go at one
    # pace), so a bar never ends at "250/250" of 300 images
    own = sum(manifest.shards[s].num_samples for s in shards)
    bar = Progress(manifest.num_samples, f"evaluate {manifest.name}", "images", info.is_main, leave=False)
    # every rank sums the same vector, also a rank with no val shard (more ranks than shards):
    # the heads' names come from one dummy view, not from this rank's data
    with device_autocast(info.device):
        names = list(heads_of(model, torch.zeros(1, 3, recipe.img_size, recipe.img_size, device=info.device)))
    counts = [0.0] * (2 * len(names))
    n, loss = 0, 0.0  # summed cross-entropy of the model's prediction (the first output)
    seen = 0
    for images, image_names, labels in loader:
        check_stop()
        seen += len(labels)
        bar.update(manifest.num_samples * seen // max(own, 1) - bar.n)
        x = val_views(images, image_names, recipe, info.device)
        y = torch.from_numpy(labels).to(info.device)
        x = device_layout(x, info.device)
        with device_autocast(info.device):
            outs = heads_of(model, x)
        for i, name in enumerate(names):
            top5 = outs[name].float().topk(min(5, outs[name].shape[1]), dim=1).indices
            counts[2 * i] += float((top5[:, 0] == y).sum())
            counts[2 * i + 1] += float((top5 == y[:, None]).any(1).sum())
        loss += float(F.cross_entropy(outs[names[0]].float(), y, reduction="sum"))
        n += len(y)
    bar.close()
    total = all_reduce_sum(info, [float(n), loss, *counts])
    model.train(was_training)
    out = {"val_loss": total[1] / max(total[0], 1)}
    for i, name in enumerate(names):
        out[f"val_top1{name}"] = 100.0 * total[2 + 2 * i] / max(total[0], 1)
        out[f"val_top5{name}"] = 100.0 * total[3 + 2 * i] / max(total[0], 1)
    return out


def civt_heads(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Named outputs evaluated for CivT: the mean (the model's prediction) and each head."""
    m = model.module if isinstance(model, DistributedDataParallel) else model
    m = getattr(m, "_orig_mod", m)
    cls_head, conv_head, inv_head = m.forward_heads(x)
    return {"": (cls_head + conv_head + inv_head) / 3, "_cls": cls_head, "_conv": conv_head,
            "_inv": inv_head}


def plain_logits(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The one named output of a plain classifier."""
    return {"": model(x)}


def evaluate_checkpoint(manifest_path: Path | str, arch: str | None, checkpoint: Path, img_size: int | None,
                        device: str = "auto", batch_size: int = 128, ema: bool = False,
                        log: Callable[[str], None] | None = None) -> dict[str, float]:
    """Top-1/top-5 of a checkpoint (a file, or a Hugging Face folder as ``--teacher`` takes) on
    a manifest (for CivT: each head and their mean); ``arch`` None: the one the checkpoint
    records (ours and timm's train.py record it); ``ema``: its EMA weights. The image size is
    ``img_size``, else the one the checkpoint records (``recorded_img_size``), else the model
    cfg's; ``log`` hears which, and the crop."""
    if arch is None:  # read from the file only then: build_teacher reads it (once) below
        arch = load_checkpoint_file(checkpoint_file(str(checkpoint))[0], ema)[1].get("arch")
        if not isinstance(arch, str):
            raise ConfigError(f"{checkpoint}: records no architecture; give --arch")
    with distributed_session(device) as info:
        teacher = build_teacher(f"{arch}:{checkpoint}{EMA_SUFFIX if ema else ''}", info.device)
        size, source = ((img_size, "--img-size") if img_size else
                        (teacher.img_size, f"{checkpoint}: {teacher.img_size_from}") if teacher.img_size
                        else (teacher.model.pretrained_cfg.get("input_size", (3, 224, 224))[-1],
                              f"{arch}'s default cfg; the checkpoint records no size"))
        if log is not None:
            log(f"eval: {arch} at {size} px ({source}): short side resized to {int(size / EVAL_CROP_PCT)}, "
                f"centre crop {size} (crop_pct {EVAL_CROP_PCT})")
        recipe = Recipe(img_size=int(size), mean=teacher.mean, std=teacher.std)
        heads = civt_heads if hasattr(teacher.model, "forward_heads") else plain_logits
        manifest = load_manifest(manifest_path)
        require_model_classes(checkpoint, teacher.num_classes, teacher.classes, manifest, manifest_path)
        return evaluate(teacher.model, manifest, recipe, info, heads, batch_size, 0)


def require_model_classes(checkpoint: Path | str, num_classes: int, classes: list[str] | None,
                          manifest: DataManifest, manifest_path: Path | str) -> None:
    """Refuse to score a model on a manifest of other classes: another count than its head's,
    or (where the checkpoint names its classes) other names or order."""
    if num_classes != manifest.num_classes:
        raise ManifestError(f"{manifest_path}: lists {manifest.num_classes} classes, but {checkpoint} "
                            f"predicts {num_classes}; evaluate on a manifest made with the training "
                            "manifest's --classes")
    diff = class_difference(classes, manifest.classes) if classes is not None else None
    if diff is not None:
        raise ManifestError(f"{manifest_path}: its classes do not match those {checkpoint} was trained on "
                            f"({diff})")
