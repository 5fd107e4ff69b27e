"""``civt-cache bench cache|student``: side-by-side throughput ratios measured in one run.

cache:   views/s of the full stage one (read shards, decode, build views, teachers, write
         zarr) against the teachers' forward pass alone on the same pre-built view batches,
         plus bytes per view on disk.
student: student training img/s from the cache, against plain training (no distillation) and
         online co-advising (teachers run live), same student, batch and steps.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from .cache_store import CacheStore
from .distributed import pick_device
from .manifest import load_manifest
from .models.teachers import build_teacher, teacher_logits
from .stage1 import CacheJob, UnitViews, cache_teachers
from .stage2 import StudentJob, train_student


def bench_cache(job: CacheJob) -> str:
    """Full stage one vs teacher-only forward on the same views (one epoch, all shards)."""
    device = pick_device(job.device)
    manifest = load_manifest(job.manifest)
    with tempfile.TemporaryDirectory() as tmp:
        one = replace(job, epochs=1, epochs_per_unit=1, out=Path(tmp) / "cache")
        t0 = time.perf_counter()
        summary = cache_teachers(one)
        full = summary["views"] / (time.perf_counter() - t0)
        store = CacheStore.open(one.out)
        sizes = store.disk_bytes()
        per_view = sum(sizes.values()) / summary["views"]
        units = [(s, 0) for s in range(len(manifest.shards))]
        batches = [item.views for item in UnitViews(manifest, one.out, units, {u for u in units},
                                                     job.recipe, job.seed, 1, 1)]
    teachers = [build_teacher(t, device) for t in job.teachers]
    n, t0 = 0, time.perf_counter()
    for views in batches:
        for i in range(0, len(views), job.batch_size):
            chunk = views[i:i + job.batch_size]
            for t in teachers:
                full_logits = teacher_logits(t, chunk, job.recipe.mean, job.recipe.std, device)
                full_logits.topk(job.topk, dim=1)
            n += len(chunk)
    if device.type == "cuda":
        torch.cuda.synchronize()
    teacher_only = n / (time.perf_counter() - t0)
    return (f"bench cache on {device} ({manifest.name}, {summary['views']} views, "
            f"{len(teachers)} teachers, k={job.topk}, {job.recipe.img_size}px, batch {job.batch_size}, "
            f"{job.workers} workers)\n"
            f"  full stage one:   {full:8.1f} views/s (wall clock incl. start-up)\n"
            f"  teachers alone:   {teacher_only:8.1f} views/s (same views, pre-built)\n"
            f"  ratio full/teacher-only: {full / teacher_only:.2f}  (target >= 0.8)\n"
            f"  bytes per view on disk: {per_view:.1f}  (target <= 100 for 2 teachers at k=10)")


def bench_student(job: StudentJob, teacher_specs: list[str], steps: int) -> str:
    """img/s of plain, from-cache and online training for ``steps`` steps each."""
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        modes = {"plain (no distillation)": dict(teachers="none", cache=None),
                 "from cache (both teachers)": dict(teachers="both"),
                 "online (both teachers live)": dict(teachers="both", online=True, cache=None,
                                                     teacher=teacher_specs)}
        for name, change in modes.items():
            run = replace(job, **change, out=Path(tmp) / name.split()[0], max_steps=steps, epochs=max(job.epochs, 2))
            warm = replace(run, max_steps=2, out=Path(tmp) / "warm")
            train_student(warm)  # imports, first-iteration allocations
            t0 = time.perf_counter()
            train_student(run)
            rates[name] = steps * job.batch_size / (time.perf_counter() - t0)
    plain = rates["plain (no distillation)"]
    lines = [f"bench student ({job.model}, batch {job.batch_size}, {steps} steps each, "
             f"{job.recipe.img_size}px, {job.workers} workers)"]
    lines += [f"  {k:28s} {v:8.1f} img/s  ({v / plain:.2f}x plain)" for k, v in rates.items()]
    lines.append("  target: from cache >= 0.95x plain")
    return "\n".join(lines)
