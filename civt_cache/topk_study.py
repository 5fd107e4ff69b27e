"""``make demo-classes``: does storing only the top-k cost the student accuracy, where k is smaller
than the classes? On the 100 classes of handwritten digit pairs (``pipelines/digit-pairs.toml``).

Shards and two teachers as in the demo -> one cache per k (the same teachers, views and seed, so
the caches differ only in how much of each softmax they keep) -> ``verify`` on each: KL(full
softmax || stored target) and the mass outside the top-k, measured by rebuilding views and
rerunning the teachers -> civt_micro students co-advised from each cache and from the teachers
run online (their full softmax), over the same seeds and epochs, all replaying the same views.
The table says, per k, what the cache keeps and the student's val top-1 against online's, and at
which k cache = online holds within the spread over seeds. Reruns reuse what exists.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from civt_cache.config import build_config, load_pipeline
from civt_cache.data.manifest import load_manifest
from civt_cache.demo_steps import LAST_EPOCHS, compare, make_cache, pm, prepare, student_rows
from civt_cache.stages.cache_teachers import CacheJob
from civt_cache.stages.train_student import StudentJob
from civt_cache.stages.verify import verify_cache

ONLINE = "online (full softmax)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pipeline", type=Path, default=Path("pipelines/digit-pairs.toml"))
    parser.add_argument("--out", type=Path, default=Path("runs/digit-pairs"))
    parser.add_argument("--topk", type=int, nargs="+", default=[1, 5, 10, 100], help="k of each cache")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="student seeds")
    parser.add_argument("--verify-samples", type=int, default=256,
                        help="views rebuilt per cache to measure what its top-k keeps")
    args = parser.parse_args()
    cfg = load_pipeline(args.pipeline)
    t0 = time.perf_counter()
    prepared = prepare(cfg, args.pipeline)
    base_cache = build_config(CacheJob, cfg, "cache", {}, args.pipeline)
    kept: dict[int, dict[str, dict[str, float]]] = {}
    for k in args.topk:
        job = cache_at(base_cache, k)
        make_cache(job)
        checked = verify_cache(job.out, None, [], args.verify_samples, 0, "cpu")
        print(checked.report)
        kept[k] = checked.targets.summary()
    base = build_config(StudentJob, cfg, "student", {}, args.pipeline)
    specs = cfg["cache"]["teachers"]
    runs: dict[str, list[list[dict]]] = {}
    for seed in args.seeds:
        for k in [*args.topk, None]:
            label = ONLINE if k is None else f"cache, k = {k}"
            job = replace(base, teachers="both", online=k is None, teacher=specs if k is None else [],
                          cache=None if k is None else cache_at(base_cache, k).out, seed=seed,
                          view_seed=base_cache.seed, out=args.out / f"seed{seed}" / ("online" if k is None else f"k{k}"))
            runs.setdefault(label, []).append(student_rows(job, specs))
    lines = prepared.teacher_lines + [""] + table(kept, runs, args.seeds, prepared.n_val,
                                                          load_manifest(prepared.manifests["train"]).num_classes)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    (args.out / "table.json").write_text(json.dumps({"kept": {str(k): v for k, v in kept.items()},
                                                     "runs": runs}, indent=1))
    print("\n".join(lines))
    print(f"finished in {time.perf_counter() - t0:.0f}s; table in {args.out}/table.md")


def cache_at(job: CacheJob, k: int) -> CacheJob:
    """The pipeline's cache job at top-``k``: its own folder (the pipeline's when k is its k)."""
    if k == job.topk:
        return job
    out = Path(str(job.out))
    return replace(job, topk=k, out=out.with_name(f"{out.name}-k{k}"))


def table(kept: dict[int, dict[str, dict[str, float]]], runs: dict[str, list[list[dict]]],
          seeds: list[int], n_val: int, num_classes: int) -> list[str]:
    """Per k: KL and tail mass of each teacher, the students' val top-1 against online's, and
    the sentence saying at which k cache = online holds within the spread."""
    teachers = sorted(next(iter(kept.values())))
    head = (f"| targets (k of {num_classes} classes) | "
            + " | ".join(f"{t}: KL mean / p99 (nats) | {t}: mass outside top-k mean / p99" for t in teachers)
            + f" | val top-1 % final | mean of last {LAST_EPOCHS} | - online (+- spread) |")
    lines = [f"students: civt_micro, both teachers, {len(seeds)} seeds ({', '.join(map(str, seeds))}), "
             f"mean +- std; val: {n_val} pairs, one = {100 / n_val:.2f} points",
             head, "|" + "---|" * (head.count("|") - 1)]
    holds = []
    for label, seeds_rows in runs.items():
        k = None if label == ONLINE else int(label.rsplit(" ", 1)[1])
        final = [rows[-1]["val_top1"] for rows in seeds_rows]
        last = [float(np.mean([r["val_top1"] for r in rows[-LAST_EPOCHS:]])) for rows in seeds_rows]
        cells = ([f"{kept[k][t]['kl_mean']:.4f} / {kept[k][t]['kl_p99']:.4f} | "
                  f"{kept[k][t]['tail_mean']:.4f} / {kept[k][t]['tail_p99']:.4f}" for t in teachers]
                 if k is not None else ["0 | 0" for _ in teachers])
        if k is None:
            versus = "-"
        else:
            diff, spread = compare(seeds_rows, runs[ONLINE])
            versus = f"{diff:+.1f} +- {spread:.1f}"
            if abs(diff) <= spread:
                holds.append(k)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {pm(final)} | {pm(last)} | {versus} |")
    ks = [int(label.rsplit(' ', 1)[1]) for label in runs if label != ONLINE]
    fails = [k for k in ks if k not in holds]
    lines += ["", f"cache = online holds within the spread at k = {', '.join(map(str, holds)) or 'none'}"
              + (f"; not at k = {', '.join(map(str, fails))}" if fails else "") + "."]
    return lines


if __name__ == "__main__":
    main()
