"""What a run writes beside its checkpoints, as timm's train.py does: ``metrics.jsonl`` (one row
per epoch), ``summary.csv``, ``args.yaml`` (the merged settings), ``results.json``, the curves
plot, optional TensorBoard scalars, and the best checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

from civt_cache.fsutil import atomic_write_json, atomic_write_with


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


#: summary.csv's first columns, as timm's train.py writes them (from our metric names)
TIMM_COLUMNS = {"epoch": "epoch", "train_loss": "train_loss", "eval_loss": "val_loss", "eval_top1": "val_top1",
                "eval_top5": "val_top5", "lr": "lr"}


def write_summary(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    """``summary.csv``: one line per epoch, timm's train.py columns first (``eval_top1`` is our
    ``val_top1``, ...; epochs count from 0 as timm's), then every metric of ours."""
    import csv
    import io

    ours = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in TIMM_COLUMNS.values()]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=[*TIMM_COLUMNS, *ours])
    writer.writeheader()
    for r in rows:
        writer.writerow({**{col: r.get(key, "") for col, key in TIMM_COLUMNS.items()}, **{k: r.get(k, "") for k in ours}})
    atomic_write_with(run_dir / "summary.csv", lambda f: f.write(text.getvalue().encode()))


def save_epoch_weights(run_dir: Path, rows: list[dict[str, Any]], state: Callable[[], dict[str, Any]],
                       history: int, metric: str = "val_top1") -> None:
    """The weights of the epoch just ended, as timm's ``CheckpointSaver`` keeps them:
    ``checkpoint-N.pth.tar`` while epoch N is among the ``history`` best by ``metric`` (the
    one pushed out is deleted) and ``model_best.pth.tar`` when it is the best so far. Each holds
    ``state_dict`` (and ``state_dict_ema``), so timm's ``load_checkpoint`` reads them. ``state``
    is called only when something is written."""
    epoch, value = rows[-1]["epoch"], rows[-1][metric]
    ranked = sorted(rows, key=lambda r: (-r[metric], r["epoch"]))
    kept = {r["epoch"] for r in ranked[:history]}
    best = ranked[0]["epoch"] == epoch
    if epoch not in kept and not best:
        return
    payload = {**state(), "epoch": epoch, "metric": value, metric: value}
    if epoch in kept:
        save_checkpoint(run_dir / f"checkpoint-{epoch}.pth.tar", payload)
    for old in run_dir.glob("checkpoint-*.pth.tar"):
        number = old.name[len("checkpoint-"):-len(".pth.tar")]
        if number.isdigit() and int(number) not in kept:
            old.unlink(missing_ok=True)
    if best:
        save_checkpoint(run_dir / "model_best.pth.tar", payload)
