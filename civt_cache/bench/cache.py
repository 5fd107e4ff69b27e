"""``civt-cache bench cache``: views/s of the full stage one (read shards, decode, build views,
teachers, write zarr) against the teachers' forward pass alone on pre-built views of the first
unit, measured side by side in one run, plus the cache's bytes per view and peak memory.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from civt_cache.bench.probes import PeakMemory, sync
from civt_cache.cache.store import CacheStore
from civt_cache.data.manifest import load_manifest
from civt_cache.distributed import pick_device
from civt_cache.loader.units import UnitReader
from civt_cache.models.teachers import build_teacher, teacher_logits
from civt_cache.stages.cache_teachers import CacheJob, cache_teachers
from civt_cache.views.engine import render_encoded


def measure_cache(job: CacheJob, out: Path | None = None) -> dict[str, Any]:
    """Full stage one (one epoch, all shards) vs teachers alone; bytes per view; peak memory.
    The one-epoch cache is written to ``out`` (kept) or to a temporary folder."""
    device = pick_device(job.device)
    manifest = load_manifest(job.manifest)
    with tempfile.TemporaryDirectory() as tmp:
        one = replace(job, epochs=1, epochs_per_unit=1, out=out or Path(tmp) / "cache")
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            summary = cache_teachers(one)
            full = summary["views"] / (time.perf_counter() - t0)
        store = CacheStore.open(one.out)
        chunks = sum(store.disk_bytes(chunks_only=True).values())
        files = sum(store.disk_bytes().values())
        first = {(0, 0): store.unit_record(0, 0)}
        group = next(iter(UnitReader(manifest, one.out, list(first), first, [], store.spec)))
        views = next(render_encoded(group.images, group.records[:1], group.rows, job.recipe, device,
                                    group.names))  # pre-built on the device, outside the timing
    teachers = [build_teacher(t, device) for t in job.teachers]
    batches = [views[i:i + job.batch_size] for i in range(0, len(views), job.batch_size)]
    for t in teachers:  # warm-up: allocator, cuDNN algorithm choice
        teacher_logits(t, batches[0], job.recipe.mean, job.recipe.std, device)
    sync(device)
    t0 = time.perf_counter()
    for chunk in batches:
        for t in teachers:
            teacher_logits(t, chunk, job.recipe.mean, job.recipe.std, device).topk(job.topk, dim=1)
    sync(device)
    alone = len(views) / (time.perf_counter() - t0)
    return {"device": str(device), "data": manifest.name, "views": summary["views"],
            "teachers": len(teachers), "topk": job.topk, "img_size": job.recipe.img_size,
            "batch_size": job.batch_size, "workers": job.workers, "full_views_per_s": full,
            "teachers_alone_views_per_s": alone, "teachers_alone_views": len(views),
            "bytes_per_view": chunks / summary["views"], "file_bytes_per_view": files / summary["views"],
            "peak_rss": mem.rss, "peak_shm": mem.shm}


def format_cache(r: dict[str, Any]) -> str:
    return (f"bench cache on {r['device']} ({r['data']}, {r['views']} views, {r['teachers']} teachers, "
            f"k={r['topk']}, {r['img_size']}px, batch {r['batch_size']}, {r['workers']} workers)\n"
            f"  full stage one:   {r['full_views_per_s']:8.1f} views/s (wall clock incl. start-up)\n"
            f"  teachers alone:   {r['teachers_alone_views_per_s']:8.1f} views/s (pre-built views "
            f"of the first unit, {r['teachers_alone_views']} views)\n"
            f"  ratio full / teachers alone: {r['full_views_per_s'] / r['teachers_alone_views_per_s']:.2f}\n"
            f"  bytes per view: {r['bytes_per_view']:.1f} in chunks (records + all teachers), "
            f"{r['file_bytes_per_view']:.1f} with metadata and commit records\n"
            f"  peak memory: {r['peak_rss'] / 2**20:.0f} MiB RSS (process tree), "
            f"{r['peak_shm'] / 2**20:.1f} MiB /dev/shm")


def bench_cache(job: CacheJob) -> str:
    return format_cache(measure_cache(job))
