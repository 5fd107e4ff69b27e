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
