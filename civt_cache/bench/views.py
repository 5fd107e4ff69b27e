"""``bench views``: the view engine against the PIL path it replaced, per CPU core (and on the
GPU when there is one), and what one batch costs a GPU in launches, transfers and device reads,
counted on the CPU (``op_counts``)."""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from civt_cache.bench.op_counts import count_ops
from civt_cache.bench.probes import sync
from civt_cache.data.synthetic import photo_like_jpeg
from civt_cache.distributed import pick_device
from civt_cache.loader.batches import shard_sequence
from civt_cache.views.engine import gpu_op_stream, render_encoded, worker_image
from civt_cache.views.recipe import Recipe
from civt_cache.views.records import PARTNER, image_size, mix_order, sample_shard_records

PIL_BATCH = "PIL path per batch, 1 CPU core"
PIL_ROW = "PIL path per row, 1 CPU core"


def measure_views(samples: int, img_size: int = 224, batch: int = 64, device: str = "auto",
                  repeats: int = 5, count_batches: tuple[int, ...] = (256, 512)) -> dict[str, Any]:
    """Views/s of the PIL path and of the engine on one CPU thread, and of the engine on the
    GPU (if any), on the same ImageNet-shaped JPEGs, records and stage-two batches; best of
    ``repeats``. The PIL path is timed both ways it ran before the engine: per batch, each
    base view built once (stage one's way, and the fastest a PIL path gets), and per row,
    each mixed view building its partner's base view again (stage two's per-sample data set)."""
    from civt_cache.bench import pil_reference as ref

    recipe = Recipe(img_size=img_size, mix_batch=batch)  # one Mixup/CutMix draw per batch
    rng = np.random.default_rng(0)
    jpegs = [photo_like_jpeg(rng) for _ in range(samples)]
    recs = sample_shard_records(recipe, 0, 0, 0, list(range(samples)), [image_size(j) for j in jpegs])
    batches = _batches(recs, batch)

    def pil_path(per_row: bool) -> Any:
        def run() -> None:
            for rows, size in batches:
                images = {r: ref.decode_rgb(jpegs[r]) for r in rows}
                records = {r: recs[r] for r in rows}
                for part in ([[r] for r in rows[:size]] if per_row else [rows[:size]]):
                    ref.apply_records(images, records, part, recipe)
        return run

    def engine(dev: torch.device) -> Any:
        def run() -> None:
            for rows, size in batches:
                next(render_encoded([worker_image(jpegs[r], str(r)) for r in rows], [recs[rows]], rows,
                                    recipe, dev, outputs=range(size)))
            sync(dev)
        return run

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return samples / min(times)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rates = {PIL_BATCH: best(pil_path(per_row=False)), PIL_ROW: best(pil_path(per_row=True)),
                 "engine, 1 CPU core": best(engine(torch.device("cpu")))}
    finally:
        torch.set_num_threads(threads)
    gpu = pick_device(device)
    if gpu.type == "cuda":
        engine(gpu)()  # warm-up: nvJPEG handles, kernels
        rates[f"engine, {torch.cuda.get_device_name(gpu)}"] = best(engine(gpu))
    return {"samples": samples, "img_size": img_size, "batch": batch, "rates": rates,
            "counts": _count_engine(jpegs, recipe, count_batches)}


def _batches(recs: np.ndarray, batch: int) -> list[tuple[list[int], int]]:
    """Stage two's batches over one shard's rows (``shard_sequence``: partners side by side): a
    batch's ``batch`` output rows, then the partners it needs from outside it
    (``StudentBatch``); with its number of outputs."""
    order = shard_sequence(mix_order(0, 0, 0, len(recs)), batch, np.random.default_rng(0))
    batches = []
    for i in range(0, len(order), batch):
        part = order[i:i + batch]
        batches.append((part + sorted({int(recs[p, PARTNER]) for p in part} - set(part)), len(part)))
    return batches


def _count_engine(jpegs: list[bytes], recipe: Recipe, batches: tuple[int, ...] = (256, 512)) -> dict[str, Any]:
    """Launches, host-to-device transfers and device reads of one engine batch (decode
    included) of each size, counted on the CPU running a GPU's op stream (``op_counts``), with
    a decode budget that holds the batch's images in one decode group (as a GPU's does: 1/64 of
    its memory), and the largest batch once more in two groups: what each group more costs.
    Sizes are whole pair groups, so every partner is in the batch."""
    import os

    from civt_cache.views.engine import BUDGET_ENV, encoded_pixels

    counts, saved = {}, os.environ.get(BUDGET_ENV)
    try:
        for n in batches:
            rows = list(range(n))
            batch = [jpegs[r % len(jpegs)] for r in rows]
            recs = sample_shard_records(recipe, 1, 0, 0, rows, [image_size(j) for j in batch])
            items = [worker_image(j, str(r)) for r, j in zip(rows, batch)]
            pixels = sum(encoded_pixels(x) for x in items)
            for groups in ((1, 2) if n == max(batches) else (1,)):
                os.environ[BUDGET_ENV] = str(pixels // groups + 1)
                with gpu_op_stream():
                    counts[f"{n} views, {groups} decode group{'s' if groups > 1 else ''}"] = count_ops(
                        lambda: next(render_encoded(items, [recs], rows, recipe, torch.device("cpu"))))
    finally:
        if saved is None:
            os.environ.pop(BUDGET_ENV, None)
        else:
            os.environ[BUDGET_ENV] = saved
    return counts


def format_views(r: dict[str, Any]) -> str:
    batch, row = r["rates"][PIL_BATCH], r["rates"][PIL_ROW]
    lines = [f"bench views ({r['samples']} ImageNet-shaped JPEGs, co-advise recipe, every view mixed, "
             f"{r['img_size']}px, batches of {r['batch']}; decode included)"]
    lines += [f"  {k:34s} {v:9.1f} views/s  ({v / batch:.2f}x the PIL path per batch, {v / row:.2f}x "
              "per row, per core)" for k, v in r["rates"].items()]
    lines.append("  per batch, as a GPU runs it (counted on the CPU): kernel launches, host-to-device "
                 "transfers, device reads")
    lines += [f"  {n:>26s}: {c.launches:6d} launches {c.transfers:3d} transfers {c.reads:3d} reads"
              for n, c in r["counts"].items()]
    return "\n".join(lines)


def bench_views(samples: int, img_size: int = 224, batch: int = 64, device: str = "auto",
                repeats: int = 5) -> str:
    return format_views(measure_views(samples, img_size, batch, device, repeats))
