"""The steps the built-in demos share (``demo.py``, ``topk_study.py``): shards and teachers made
once and reused, caches rebuilt only when an older civt-cache made them, students reused only
when trained exactly as asked, and the figure each comparison is made on."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from civt_cache.cache.spec import SCHEMA_VERSION, stored_versions
from civt_cache.config import build_config
from civt_cache.data.digits import BUILT_IN
from civt_cache.data.manifest import default_manifest_path, load_manifest
from civt_cache.data.writer import write_shards
from civt_cache.models.teachers import checkpoint_sha256, parse_teacher_spec
from civt_cache.stages.cache_teachers import CacheJob, cache_teachers
from civt_cache.stages.train_student import StudentJob, job_record, train_student
from civt_cache.stages.train_teacher import TeacherJob, train_teacher
from civt_cache.views.records import VIEWS_VERSION

LAST_EPOCHS = 3  # a student's figure: the mean val top-1 of its last epochs


@dataclass
class Prepared:
    manifests: dict[str, Path]  # {"train": ..., "val": ...}
    teacher_lines: list[str]  # each teacher's recorded held-out top-1
    n_val: int


def prepare(cfg: dict[str, Any], pipeline: Path) -> Prepared:
    """The pipeline's built-in data as shards (``[data] src``, ``name``) and its teachers trained
    on the recipe's views; each is made only when missing or made from other settings. Prints
    each teacher's held-out top-1."""
    data = cfg["data"]
    name = data.get("name", data.get("src", "digits"))
    splits, origin = BUILT_IN[data.get("src", "digits")]
    manifests = {s: default_manifest_path(f"{name}-{s}") for s in ("train", "val")}

    def built(path: Path) -> bool:  # committed manifests, but the shards may not exist yet
        if not path.exists():
            return False
        m = load_manifest(path)
        return all(m.shard_path(i).exists() for i in range(len(m.shards)))

    if not all(built(p) for p in manifests.values()):
        for split, (classes, items) in splits().items():
            write_shards(items, classes, Path(data["shards"]), f"{name}-{split}", data["shard_size"], 0,
                         origin, manifests[split])
    for t in cfg["teachers"].values():
        key = {"teacher": t, "recipe": cfg["recipe"], "manifest": json.loads(manifests["train"].read_text())}
        key_file = Path(t["checkpoint"]).with_suffix(".demo_key.json")
        if not (Path(t["checkpoint"]).exists() and same_key(key_file, key)):  # other settings: retrained
            job = build_config(TeacherJob, {"teachers": {**{k: v for k, v in t.items() if k != "checkpoint"},
                                                         "out": t["checkpoint"]}, "recipe": cfg["recipe"]},
                               "teachers", {"manifest": str(manifests["train"]),
                                            "val_manifest": str(manifests["val"]),
                                            "img_size": cfg["recipe"]["img_size"]}, pipeline)
            train_teacher(job)
            key_file.write_text(json.dumps(key, sort_keys=True))
    n_val = load_manifest(manifests["val"]).num_samples
    lines = [f"teacher {n} ({t['arch']}, {t['epochs']} epochs on the {t.get('views', 'plain')} views): "
             f"val top-1 {_recorded_top1(Path(t['checkpoint'])):.1f}% on the {n_val} clean held-out images"
             for n, t in cfg["teachers"].items()]  # trained now or before: each file records it
    print("\n".join(lines))
    return Prepared(manifests, lines, n_val)


def make_cache(job: CacheJob) -> None:
    """``cache-teachers`` for ``job``, after removing a cache an older civt-cache made (other
    schema or views version: it would be refused)."""
    stale = stored_versions(job.out)
    if stale not in (None, (SCHEMA_VERSION, VIEWS_VERSION)):
        print(f"{job.out}: made with (schema, views version) {stale}, rebuilding it for "
              f"{(SCHEMA_VERSION, VIEWS_VERSION)}")
        shutil.rmtree(job.out)
    cache_teachers(job)


def student_rows(job: StudentJob, teacher_specs: list[str]) -> list[dict]:
    """The metrics rows of ``job``'s student: trained now, or reused when its run folder holds a
    finished run of exactly these settings, teachers and views version."""
    key = {"views_version": VIEWS_VERSION, "schema_version": SCHEMA_VERSION, "job": job_record(job),
           "teachers": {spec: checkpoint_sha256(parse_teacher_spec(spec)[2]) for spec in teacher_specs}}
    if not finished(job.out, key):  # a run of other settings, teachers or views is redone
        shutil.rmtree(job.out, ignore_errors=True)
        train_student(job)
        (job.out / "demo_key.json").write_text(json.dumps(key, sort_keys=True))
    return [json.loads(line) for line in (job.out / "metrics.jsonl").read_text().splitlines()]


def _recorded_top1(checkpoint: Path) -> float:
    """The held-out top-1 that ``train-teacher`` recorded in its checkpoint."""
    return float(torch.load(checkpoint, map_location="cpu", weights_only=True)["val_top1"])


def finished(out: Path, key: dict) -> bool:
    """A finished run (results.json) trained exactly as ``key`` says."""
    return (out / "results.json").exists() and same_key(out / "demo_key.json", key)


def same_key(path: Path, key: dict) -> bool:
    """``path`` holds ``key``: what its output was made from."""
    try:
        return json.loads(path.read_text()) == json.loads(json.dumps(key))
    except (OSError, ValueError):
        return False


def figure(seeds_rows: list[list[dict]]) -> tuple[float, float]:
    """A student's figure and its spread: the mean val top-1 of its last epochs averaged over
    seeds, and the std over seeds (with one seed, the std of those last epochs: the
    epoch-to-epoch swing)."""
    last = np.array([[r["val_top1"] for r in rows[-LAST_EPOCHS:]] for rows in seeds_rows])
    means = last.mean(1)
    return float(means.mean()), float(means.std() if len(means) > 1 else last[0].std())


def compare(a: list[list[dict]], b: list[list[dict]]) -> tuple[float, float]:
    """Figure of a minus figure of b, and the spread it must exceed to count: the root sum of
    squares of their spreads."""
    (ma, sa), (mb, sb) = figure(a), figure(b)
    return ma - mb, float(np.hypot(sa, sb))


def pm(values: list[float]) -> str:
    """Mean, and +- std when there are several values."""
    mean = f"{np.mean(values):.1f}"
    return mean if len(values) == 1 else f"{mean} +- {np.std(values):.1f}"
