"""Pieces shared by ``train-student`` and ``train-teacher``: optimiser and schedule from timm's
factories, evaluation, checkpoints, metrics files and the curves plot."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch.nn.parallel import DistributedDataParallel
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn

from .distributed import DistInfo, all_reduce_sum, init_distributed
from .fsutil import atomic_write_json, atomic_write_with
from .manifest import DataManifest, load_manifest
from .models.teachers import build_teacher
from .progress import Progress
from .recipe import Recipe
from .student_data import ValBatches, batch_loader, val_views


def optimizer_and_schedule(model: nn.Module, opt: str, lr: float, weight_decay: float,
                           total_steps: int, warmup_steps: int, min_lr: float,
                           momentum: float = 0.9) -> tuple[torch.optim.Optimizer, CosineLRScheduler]:
    """timm's optimizer factory (no decay on norms, biases and ``no_weight_decay()`` params)
    and a per-step cosine schedule with linear warmup, as co-advise's training script (Swin's
    ``build_scheduler``) builds it: the cosine runs over all steps, warmup included
    (``warmup_prefix=False``), so after warmup the rate is already ``cos(pi t / T)`` of the way
    down, never a fresh cosine that starts after the warmup."""
    kwargs = {"momentum": momentum} if opt.lower() in ("sgd", "momentum") else {}
    optimizer = create_optimizer_v2(model, opt, lr=lr, weight_decay=weight_decay, **kwargs)
    schedule = CosineLRScheduler(optimizer, t_initial=max(total_steps, 1), lr_min=min_lr,
                                 warmup_t=warmup_steps, warmup_lr_init=min(1e-6, lr),
                                 warmup_prefix=False, t_in_epochs=False)
    return optimizer, schedule


@torch.no_grad()
def evaluate(model: nn.Module, manifest: DataManifest, recipe: Recipe, info: DistInfo,
             heads_of: Callable[[nn.Module, torch.Tensor], dict[str, torch.Tensor]],
             batch_size: int, workers: int) -> dict[str, float]:
    """Top-1 (and top-5) in percent of every named output, over the whole validation set
    (shards split across ranks, counts summed)."""
    was_training = model.training
    model.eval()
    shards = list(range(len(manifest.shards)))[info.rank::info.world_size]
    loader = batch_loader(ValBatches(manifest, shards, batch_size), min(workers, len(shards)))
    bar = Progress(sum(manifest.shards[s].num_samples for s in shards), f"evaluate {manifest.name}",
                   "images", info.is_main, leave=False)
    names: list[str] = []
    counts: list[float] = []
    n = 0
    for images, image_names, labels in loader:
        bar.update(len(labels))
        x = val_views(images, image_names, recipe, info.device)
        y = torch.from_numpy(labels).to(info.device)
        if info.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=info.device.type == "cuda"):
            outs = heads_of(model, x)
        if not names:
            names = list(outs)
            counts = [0.0] * (2 * len(names))
        for i, name in enumerate(names):
            top5 = outs[name].float().topk(min(5, outs[name].shape[1]), dim=1).indices
            counts[2 * i] += float((top5[:, 0] == y).sum())
            counts[2 * i + 1] += float((top5 == y[:, None]).any(1).sum())
        n += len(y)
    bar.close()
    total = all_reduce_sum(info, [float(n), *counts])
    model.train(was_training)
    out = {}
    for i, name in enumerate(names):
        out[f"val_top1{name}"] = 100.0 * total[1 + 2 * i] / max(total[0], 1)
        out[f"val_top5{name}"] = 100.0 * total[2 + 2 * i] / max(total[0], 1)
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


def evaluate_checkpoint(manifest_path: Path, arch: str, checkpoint: Path, img_size: int | None,
                        device: str = "auto", batch_size: int = 128) -> dict[str, float]:
    """Top-1/top-5 of a checkpoint on a manifest (for CivT: each head and their mean)."""
    info = init_distributed(device)
    teacher = build_teacher(f"{arch}:{checkpoint}", info.device)
    size = img_size or teacher.img_size or teacher.model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    recipe = Recipe(img_size=int(size), mean=teacher.mean, std=teacher.std)
    heads = civt_heads if hasattr(teacher.model, "forward_heads") else plain_logits
    return evaluate(teacher.model, load_manifest(manifest_path), recipe, info, heads, batch_size, 0)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomic torch.save: a crash mid-write never leaves a broken checkpoint behind."""
    atomic_write_with(path, lambda f: torch.save(state, f))


def append_metrics(run_dir: Path, row: dict[str, Any]) -> list[dict[str, Any]]:
    """Rewrite metrics.jsonl with ``row`` replacing any rows of the same or later epoch (a
    resumed run redoes them), atomically; returns all rows."""
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []
    rows = [r for r in rows if r["epoch"] < row["epoch"]] + [row]
    atomic_write_with(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows).encode()))
    return rows


def plot_curves(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Training loss and validation top-1 per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    epochs = [r["epoch"] + 1 for r in rows]
    a.plot(epochs, [r["train_loss"] for r in rows], marker="o")
    a.set(xlabel="epoch", ylabel="train loss", title="loss")
    for key in sorted(k for k in rows[-1] if k.startswith("val_top1")):
        b.plot(epochs, [r[key] for r in rows], marker="o", label=key.replace("val_top1", "top-1 ").strip())
    b.set(xlabel="epoch", ylabel="val top-1 (%)", title="validation")
    b.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write_with(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def write_results(run_dir: Path, results: dict[str, Any]) -> None:
    atomic_write_json(run_dir / "results.json", results)


def tensorboard_writer(run_dir: Path) -> Any:
    """A TensorBoard ``SummaryWriter`` on ``RUN/tb`` (``--log tensorboard``)."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run_dir / "tb"))


def log_scalars(writer: Any, row: dict[str, Any]) -> None:
    """Every number of an epoch's metrics row as a TensorBoard scalar at that epoch."""
    for key, value in row.items():
        if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
            writer.add_scalar(key, value, row["epoch"])
    writer.flush()


def write_args(run_dir: Path, settings: dict[str, Any]) -> None:
    """The run's merged settings (defaults, pipeline, flags) as ``args.yaml``, as timm's
    train.py writes them: what was run, readable without this tool."""
    import yaml

    atomic_write_with(run_dir / "args.yaml",
                      lambda f: f.write(yaml.safe_dump(settings, sort_keys=False).encode()))


def write_summary(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    """``summary.csv``: one line per epoch with every metric, as timm's train.py keeps it."""
    import csv
    import io

    columns = list(dict.fromkeys(k for r in rows for k in r))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_with(run_dir / "summary.csv", lambda f: f.write(text.getvalue().encode()))


def save_if_best(run_dir: Path, rows: list[dict[str, Any]], state: Callable[[], dict[str, Any]],
                 metric: str = "val_top1") -> bool:
    """Write ``model_best.pt`` (weights, epoch, metric) when the last row has the best ``metric``
    so far; ``state`` is called only then."""
    if rows[-1][metric] < max(r[metric] for r in rows):
        return False
    save_checkpoint(run_dir / "model_best.pt", {**state(), "epoch": rows[-1]["epoch"],
                                                metric: rows[-1][metric]})
    return True
