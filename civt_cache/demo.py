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
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from civt_cache.cache.spec import SCHEMA_VERSION, stored_versions
from civt_cache.config import build_config, load_pipeline
from civt_cache.data.digits import digits_items
from civt_cache.data.manifest import default_manifest_path, load_manifest
from civt_cache.data.writer import write_shards
from civt_cache.models.teachers import checkpoint_sha256, parse_teacher_spec
from civt_cache.stages.cache_teachers import CacheJob, cache_teachers
from civt_cache.stages.train_student import StudentJob, job_record, train_student
from civt_cache.stages.train_teacher import TeacherJob, train_teacher
from civt_cache.stages.verify import inspect_cache
from civt_cache.views.records import VIEWS_VERSION

RUNS = [("none", False), ("conv", False), ("inv", False), ("both", False), ("both", True)]
LAST_EPOCHS = 3


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

    manifests = {s: default_manifest_path(f"digits-{s}") for s in ("train", "val")}
    def built(path: Path) -> bool:  # committed manifests, but the shards may not exist yet
        if not path.exists():
            return False
        m = load_manifest(path)
        return all(m.shard_path(i).exists() for i in range(len(m.shards)))

    if not all(built(p) for p in manifests.values()):
        for split, (classes, items) in digits_items().items():
            write_shards(items, classes, Path(cfg["data"]["shards"]), f"digits-{split}",
                         cfg["data"]["shard_size"], 0, "sklearn.datasets.load_digits (32x32 RGB)",
                         manifests[split])
    for name, t in cfg["teachers"].items():
        key = {"teacher": t, "recipe": cfg["recipe"], "manifest": json.loads(manifests["train"].read_text())}
        key_file = Path(t["checkpoint"]).with_suffix(".demo_key.json")
        if not (Path(t["checkpoint"]).exists() and _same_key(key_file, key)):  # other settings: retrained
            job = build_config(TeacherJob, {"teachers": {**{k: v for k, v in t.items() if k != "checkpoint"},
                                                         "out": t["checkpoint"]}, "recipe": cfg["recipe"]},
                               "teachers", {"manifest": str(manifests["train"]),
                                            "val_manifest": str(manifests["val"]),
                                            "img_size": cfg["recipe"]["img_size"]}, args.pipeline)
            train_teacher(job)
            key_file.write_text(json.dumps(key, sort_keys=True))
    n_val = load_manifest(manifests["val"]).num_samples
    teacher_lines = [f"teacher {name} ({t['arch']}, {t['epochs']} epochs on the {t.get('views', 'plain')} views): "
                     f"val top-1 {_recorded_top1(Path(t['checkpoint'])):.1f}% on the {n_val} clean held-out digits"
                     for name, t in cfg["teachers"].items()]  # trained now or before: each file records it
    print("\n".join(teacher_lines))
    if args.prepare:
        return
    cache_job = build_config(CacheJob, cfg, "cache", {}, args.pipeline)
    stale = stored_versions(cache_job.out)
    if stale not in (None, (SCHEMA_VERSION, VIEWS_VERSION)):  # the demo's own, from an older civt-cache
        print(f"{cache_job.out}: made with (schema, views version) {stale}, rebuilding it for "
              f"{(SCHEMA_VERSION, VIEWS_VERSION)}")
        shutil.rmtree(cache_job.out)
    cache_teachers(cache_job)
    on_views = ["teachers on the cached views (those the students train on):",
                *(line.strip() for line in inspect_cache(cache_job.out).splitlines() if "top-1 " in line)]
    print("\n".join(on_views))
    teacher_lines += on_views
    base = build_config(StudentJob, cfg, "student", {}, args.pipeline)
    specs = cfg["cache"]["teachers"]
    runs: dict[str, list[list[dict]]] = {}
    for seed in args.seeds:
        for teachers, online in RUNS:
            label = f"{teachers}{' (online)' if online else ''}"
            out = (args.out / f"seed{seed}" if len(args.seeds) > 1 else args.out) / \
                f"{teachers}{'-online' if online else ''}"
            job = replace(base, teachers=teachers, online=online, teacher=specs if online else [],
                          cache=None if online or teachers == "none" else base.cache, out=out,
                          seed=seed, view_seed=cache_job.seed)  # every row: the cache's views
            key = {"views_version": VIEWS_VERSION, "schema_version": SCHEMA_VERSION, "job": job_record(job),
                   "teachers": {spec: checkpoint_sha256(parse_teacher_spec(spec)[2]) for spec in specs}}
            if not _finished(out, key):  # a run of other settings, teachers or views is redone
                shutil.rmtree(out, ignore_errors=True)
                train_student(job)
                (out / "demo_key.json").write_text(json.dumps(key, sort_keys=True))
            rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            runs.setdefault(label, []).append(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    table = [_summary(label, seeds_rows) for label, seeds_rows in runs.items()]
    (args.out / "table.json").write_text(json.dumps(table, indent=2))
    lines = teacher_lines + [""] + _table(table, args.seeds, n_val) + ["", _claims(runs)]
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    _plot(runs, args.out / "demo.png", args.seeds)
    print("\n".join(lines))
    print(f"demo finished in {time.perf_counter() - t0:.0f}s; table and plot in {args.out}/")


def _recorded_top1(checkpoint: Path) -> float:
    """The held-out top-1 that ``train-teacher`` recorded in its checkpoint."""
    return float(torch.load(checkpoint, map_location="cpu", weights_only=True)["val_top1"])


def _finished(out: Path, key: dict) -> bool:
    """A finished run (results.json) trained exactly as ``key`` says."""
    return (out / "results.json").exists() and _same_key(out / "demo_key.json", key)


def _same_key(path: Path, key: dict) -> bool:
    """``path`` holds ``key``: what its output was made from."""
    try:
        return json.loads(path.read_text()) == json.loads(json.dumps(key))
    except (OSError, ValueError):
        return False


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


def _pm(values: list[float]) -> str:
    mean = f"{np.mean(values):.1f}"
    return mean if len(values) == 1 else f"{mean} +- {np.std(values):.1f}"


def _table(table: list[dict], seeds: list[int], n_val: int) -> list[str]:
    what = "one seed" if len(seeds) == 1 else f"mean +- std over seeds {', '.join(map(str, seeds))}"
    lines = [f"| student (civt_micro, digits; {what}; val: {n_val} digits, one = {100 / n_val:.2f} points) "
             f"| val top-1 % final epoch | mean of last "
             f"{LAST_EPOCHS} epochs | cls / conv / inv head % (final) | train s | img/s |",
             "|---|---|---|---|---|---|"]
    for r in table:
        heads = np.mean(np.array(r["heads"]), axis=0)
        lines.append(f"| {r['student']} | {_pm(r['final'])} | {_pm(r['last3'])} | "
                     f"{heads[0]:.1f} / {heads[1]:.1f} / {heads[2]:.1f} | {r['train_seconds']:.0f} | "
                     f"{r['img_per_s']:.0f} |")
    return lines


def _claims(runs: dict[str, list[list[dict]]]) -> str:
    """Which of co-advise's claims the table shows, at its own spread. A student's figure is the
    mean val top-1 of its last epochs, averaged over seeds; its spread is the std over seeds, or
    with one seed the std of those last epochs (the epoch-to-epoch swing). Two figures differ
    when their difference exceeds the root sum of squares of their spreads."""
    def figure(label: str) -> tuple[float, float]:
        last = np.array([[r["val_top1"] for r in rows[-LAST_EPOCHS:]] for rows in runs[label]])
        means = last.mean(1)
        return float(means.mean()), float(means.std() if len(means) > 1 else last[0].std())

    def compare(a: str, b: str) -> tuple[float, float]:
        (ma, sa), (mb, sb) = figure(a), figure(b)
        return ma - mb, float(np.hypot(sa, sb))

    if not {"none", "conv", "inv", "both", "both (online)"} <= set(runs):
        return ""
    said = []
    diff, spread = compare("both", "none")
    said.append(f"both > none {'holds' if diff > spread else 'does not hold'} ({diff:+.1f} +- {spread:.1f})")
    best = max(("conv", "inv"), key=lambda label: figure(label)[0])
    diff, spread = compare("both", best)
    verdict = "holds" if diff > spread else "cannot be told apart" if diff >= -spread else "does not hold"
    said.append(f"both >= best single ({best}): {verdict} ({diff:+.1f} +- {spread:.1f})")
    diff, spread = compare("both", "both (online)")
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
