"""``make demo``: the whole co-advise workflow on the digits that ship with scikit-learn.

Shards and manifests -> two teachers (a ResNet conv net and RedNet-26) -> the teacher cache ->
civt_micro students with no distillation, conv only, involution only and both from the cache,
and both computed online -> a table (accuracy, wall time, img/s) and a plot in runs/digits/.
Each step is skipped when its output already exists, so a rerun only redoes what is missing.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from .digits import digits_items
from .manifest import default_manifest_path, load_manifest
from .pipeline import build_config, load_pipeline
from .shard_writer import write_shards
from .stage1 import CacheJob, cache_teachers
from .stage2 import StudentJob, train_student
from .train_teacher import TeacherJob, train_teacher

RUNS = [("none", False), ("conv", False), ("inv", False), ("both", False), ("both", True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pipeline", type=Path, default=Path("pipelines/demo.toml"))
    parser.add_argument("--out", type=Path, default=Path("runs/digits"))
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
    img = cfg["recipe"]["img_size"]
    for name, t in cfg["teachers"].items():
        if not Path(t["checkpoint"]).exists():
            res = train_teacher(TeacherJob(manifests["train"], manifests["val"], t["arch"],
                                           Path(t["checkpoint"]), t["epochs"], img, batch_size=64,
                                           workers=1))
            print(f"teacher {name} ({t['arch']}): val top-1 {res['val_top1']:.1f}%")
    cache_teachers(build_config(CacheJob, cfg, "cache", {}, args.pipeline))
    base = build_config(StudentJob, cfg, "student", {}, args.pipeline)
    specs = cfg["cache"]["teachers"]
    table = []
    for teachers, online in RUNS:
        label = f"{teachers}{' (online)' if online else ''}"
        out = args.out / f"{teachers}{'-online' if online else ''}"
        job = replace(base, teachers=teachers, online=online, teacher=specs if online else [],
                      cache=None if online or teachers == "none" else base.cache, out=out)
        if not (out / "results.json").exists():
            train_student(job)
        res = json.loads((out / "results.json").read_text())
        table.append({"student": label, "val_top1": res["val_top1"], "val_top1_cls": res["val_top1_cls"],
                      "val_top1_conv": res["val_top1_conv"], "val_top1_inv": res["val_top1_inv"],
                      "train_seconds": res["train_seconds"], "img_per_s": res["img_per_s"]})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.json").write_text(json.dumps(table, indent=2))
    lines = ["| student (civt_micro, digits) | val top-1 % (mean of heads) | cls / conv / inv head % "
             "| train time s | img/s |", "|---|---|---|---|---|"]
    lines += [f"| {r['student']} | {r['val_top1']:.1f} | {r['val_top1_cls']:.1f} / {r['val_top1_conv']:.1f}"
              f" / {r['val_top1_inv']:.1f} | {r['train_seconds']:.0f} | {r['img_per_s']:.0f} |" for r in table]
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    _plot(table, args.out / "demo.png")
    print("\n".join(lines))
    print(f"demo finished in {time.perf_counter() - t0:.0f}s; table and plot in {args.out}/")


def _plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    names = [r["student"] for r in table]
    a.bar(names, [r["val_top1"] for r in table])
    a.set(ylabel="val top-1 (%)", title="accuracy")
    b.bar(names, [r["img_per_s"] for r in table], color="tab:orange")
    b.set(ylabel="train img/s", title="training speed")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
