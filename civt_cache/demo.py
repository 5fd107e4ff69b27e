"""``make demo`` / ``make reproduce``: the whole co-advise workflow on the digits that ship with
scikit-learn.

Shards and manifests -> two teachers (a ResNet conv net and RedNet-26) -> the teacher cache (k =
the number of classes, so cached targets equal the online ones up to fp16) -> civt_micro students
with no distillation, conv only, involution only and both from the cache, and both computed
online -> a table and a plot of val top-1 per epoch of every student. Every student replays the
cache's views, so the rows differ only in their targets. ``--seeds`` trains each student once
per seed (the cache serves them all) and reports mean +- std; val accuracy is reported at the
final epoch and as the mean of the last 3 epochs, which the last-epoch wobble moves less.
Each step is skipped when its output already exists, so a rerun only redoes what is missing.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from civt_cache.config import build_config, load_pipeline
from civt_cache.demo_steps import LAST_EPOCHS, compare, figure, make_cache, pm, prepare, student_rows
from civt_cache.stages.cache_teachers import CacheJob
from civt_cache.stages.train_student import StudentJob
from civt_cache.stages.verify import inspect_cache

RUNS = [("none", False), ("conv", False), ("inv", False), ("both", False), ("both (online)", True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pipeline", type=Path, default=Path("pipelines/demo.toml"))
    parser.add_argument("--out", type=Path, default=Path("runs/digits"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="student seeds")
    parser.add_argument("--prepare", action="store_true",
                        help="only make the shards and train the teachers (what `make cache-teachers` needs)")
    args = parser.parse_args()
    cfg = load_pipeline(args.pipeline)
    t0 = time.perf_counter()
    prepared = prepare(cfg, args.pipeline)
    if args.prepare:
        return
    cache_job = build_config(CacheJob, cfg, "cache", {}, args.pipeline)
    make_cache(cache_job)
    on_views = ["teachers on the cached views (those the students train on):",
                *(line.strip() for line in inspect_cache(cache_job.out).splitlines() if "top-1 " in line)]
    print("\n".join(on_views))
    base = build_config(StudentJob, cfg, "student", {}, args.pipeline)
    specs = cfg["cache"]["teachers"]
    runs: dict[str, list[list[dict]]] = {}
    for seed in args.seeds:
        for label, online in RUNS:
            teachers = label.split()[0]
            out = (args.out / f"seed{seed}" if len(args.seeds) > 1 else args.out) / \
                f"{teachers}{'-online' if online else ''}"
            job = replace(base, teachers=teachers, online=online, teacher=specs if online else [],
                          cache=None if online or teachers == "none" else base.cache, out=out,
                          seed=seed, view_seed=cache_job.seed)  # every row: the cache's views
            runs.setdefault(label, []).append(student_rows(job, specs))
    args.out.mkdir(parents=True, exist_ok=True)
    table = [_summary(label, seeds_rows) for label, seeds_rows in runs.items()]
    (args.out / "table.json").write_text(json.dumps(table, indent=2))
    lines = prepared.teacher_lines + on_views + [""] + _table(table, args.seeds, prepared.n_val) + ["", _claims(runs)]
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    _plot(runs, args.out / "demo.png", args.seeds)
    print("\n".join(lines))
    print(f"demo finished in {time.perf_counter() - t0:.0f}s; table and plot in {args.out}/")


def _summary(label: str, seeds_rows: list[list[dict]]) -> dict:
    """Per student: each seed's final and last-3-epoch val top-1, the final heads, speed."""
    last = [rows[-1] for rows in seeds_rows]
    return {"student": label,
            "final": [r["val_top1"] for r in last],
            "last3": [float(np.mean([r["val_top1"] for r in rows[-LAST_EPOCHS:]]))
                      for rows in seeds_rows],
            "heads": [[r[f"val_top1_{h}"] for h in ("cls", "conv", "inv")] for r in last],
            "train_seconds": float(np.mean([sum(r["train_seconds"] for r in rows)
                                            for rows in seeds_rows])),
            "img_per_s": float(np.mean([r["img_per_s"] for r in last]))}


def _table(table: list[dict], seeds: list[int], n_val: int) -> list[str]:
    what = "one seed" if len(seeds) == 1 else f"mean +- std over seeds {', '.join(map(str, seeds))}"
    lines = [f"| student (civt_micro, digits; {what}; val: {n_val} digits, one = {100 / n_val:.2f} points) "
             f"| val top-1 % final epoch | mean of last "
             f"{LAST_EPOCHS} epochs | cls / conv / inv head % (final) | train s | img/s |",
             "|---|---|---|---|---|---|"]
    for r in table:
        heads = np.mean(np.array(r["heads"]), axis=0)
        lines.append(f"| {r['student']} | {pm(r['final'])} | {pm(r['last3'])} | "
                     f"{heads[0]:.1f} / {heads[1]:.1f} / {heads[2]:.1f} | {r['train_seconds']:.0f} | "
                     f"{r['img_per_s']:.0f} |")
    return lines


def _claims(runs: dict[str, list[list[dict]]]) -> str:
    """Which of co-advise's claims the table shows, at its own spread (``demo_steps.figure``):
    two figures differ when their difference exceeds the root sum of squares of their spreads."""
    if not {"none", "conv", "inv", "both", "both (online)"} <= set(runs):
        return ""
    said = []
    diff, spread = compare(runs["both"], runs["none"])
    said.append(f"both > none {'holds' if diff > spread else 'does not hold'} ({diff:+.1f} +- {spread:.1f})")
    best = max(("conv", "inv"), key=lambda label: figure(runs[label])[0])
    diff, spread = compare(runs["both"], runs[best])
    verdict = "holds" if diff > spread else "cannot be told apart" if diff >= -spread else "does not hold"
    said.append(f"both >= best single ({best}): {verdict} ({diff:+.1f} +- {spread:.1f})")
    diff, spread = compare(runs["both"], runs["both (online)"])
    said.append(f"cache = online {'holds' if abs(diff) <= spread else 'does not hold'} "
                f"({diff:+.1f} +- {spread:.1f})")
    return f"Claims, on the mean of the last {LAST_EPOCHS} epochs at this spread: " + "; ".join(said) + "."


def _plot(runs: dict[str, list[list[dict]]], path: Path, seeds: list[int]) -> None:
    """Val top-1 per epoch of every student on one figure (the band spans the seeds); the
    online run is dashed so its overlap with the cached one stays visible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, seeds_rows in runs.items():
        acc = np.array([[r["val_top1"] for r in rows] for rows in seeds_rows])
        epochs = np.arange(1, acc.shape[1] + 1)
        line, = ax.plot(epochs, acc.mean(0), marker="o", label=label,
                        linestyle="--" if "online" in label else "-")
        if len(seeds_rows) > 1:
            ax.fill_between(epochs, acc.min(0), acc.max(0), color=line.get_color(), alpha=0.15)
    what = f"seed {seeds[0]}" if len(seeds) == 1 else f"mean, band: min..max of {len(seeds)} seeds"
    ax.set(xlabel="epoch", ylabel="val top-1 (%)", title=f"civt_micro students, digits ({what})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
