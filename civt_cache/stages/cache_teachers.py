"""Stage one, ``cache-teachers``: run every teacher once over the augmented views of a data set
and store their top-k logits plus the exact view records in the cache.

Pipeline per process: DataLoader workers read a unit's shard (checksum verified on the same
read), sample or read back its records, and hand it over one pair group (``views.PAIR_GROUP``
rows) at a time as encoded bytes plus the records of every epoch of the unit. The main thread
decodes the group once on the device and builds each epoch's views from it with the view engine,
runs the teachers (bf16 autocast + channels_last on GPU, fp32 on CPU) and takes top-k on the
device; a writer thread writes the unit's chunks and commits it, so the device never waits on
the disk. Memory is bounded by a group, never by a shard. Units are split over torchrun ranks
statically (unit index modulo world size) or claimed with claim files (``--claim``, for several
nodes on one shared filesystem).
"""
from __future__ import annotations

import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from civt_cache.cache.spec import CacheSpec, check_alignment
from civt_cache.cache.store import CacheStore, committed_components
from civt_cache.config import MAX_BATCH, MAX_EPOCHS, MAX_WORKERS, require
from civt_cache.data.manifest import DataManifest, load_manifest
from civt_cache.data.shards import read_shard, sample_name
from civt_cache.distributed import DistInfo, barrier, init_distributed, shutdown
from civt_cache.errors import CacheMismatchError, NonFiniteError
from civt_cache.models.teachers import Teacher, build_teacher, parse_teacher_spec, teacher_logits
from civt_cache.progress import Progress
from civt_cache.views.engine import EncodedImage, render_encoded, worker_image
from civt_cache.views.recipe import Recipe
from civt_cache.views.records import PAIR_GROUP, image_size, sample_shard_records


@dataclass
class CacheJob:
    """Everything ``cache-teachers`` needs; built from flags and/or a pipeline TOML."""

    manifest: Path
    teachers: list[str]
    out: Path
    epochs: int = 1
    epochs_per_unit: int = 1
    topk: int = 10
    seed: int = 0
    recipe: Recipe = field(default_factory=Recipe)
    batch_size: int = 256
    workers: int = 2
    device: str = "auto"
    compile: bool = False
    claim: bool = False
    run_id: str = ""
    repair: bool = False  # check every committed unit's checksums first; redo the damaged ones
    threads: int = 0  # intra-op threads; 0: OMP_NUM_THREADS if set, else cores less workers

    def __post_init__(self) -> None:
        if isinstance(self.teachers, str):
            self.teachers = [self.teachers]
        require("cache-teachers",
                teacher=(self.teachers, bool(self.teachers), "given at least once (NAME=ARCH:CHECKPOINT)"),
                epochs=(self.epochs, 1 <= self.epochs <= MAX_EPOCHS, f"in 1..{MAX_EPOCHS}"),
                epochs_per_unit=(self.epochs_per_unit, 1 <= self.epochs_per_unit <= MAX_EPOCHS,
                                 f"in 1..{MAX_EPOCHS}"),
                topk=(self.topk, self.topk >= 1, ">= 1"),
                out=(str(self.out), not Path(self.out).exists() or Path(self.out).is_dir(),
                     "a folder (that path is a file)"),
                batch_size=(self.batch_size, 1 <= self.batch_size <= MAX_BATCH, f"in 1..{MAX_BATCH}"),
                workers=(self.workers, 0 <= self.workers <= MAX_WORKERS, f"in 0..{MAX_WORKERS}"),
                threads=(self.threads, 0 <= self.threads <= MAX_WORKERS, f"in 0..{MAX_WORKERS} (0: auto)"),
                device=(self.device, self.device in ("auto", "cpu", "cuda"), "auto, cpu or cuda"))
        for spec in self.teachers:
            parse_teacher_spec(spec)


@dataclass
class GroupViews:
    """One pair group of one unit as a worker hands it over: encoded images, and the records of
    each of the unit's epochs for those rows (partners always inside the group)."""

    shard: int
    block: int
    group: int
    num_groups: int
    rows: list[int]
    images: list[EncodedImage]
    names: list[str]            # shard path and key of each image, for errors
    records: np.ndarray         # [epochs of the block, rows, NUM_FIELDS]
    keys: list[str]
    labels: np.ndarray
    new_views: bool             # records were sampled now (not read back from the cache)


class UnitViews(IterableDataset):
    """Yields GroupViews items for a list of units; each worker takes every k-th unit. Units
    whose views are committed (``view_records`` holds their progress record) replay the stored
    records, read checked; the others sample theirs from the image headers."""

    def __init__(self, manifest: DataManifest, store_root: Path, units: list[tuple[int, int]],
                 view_records: dict[tuple[int, int], dict[str, Any]], recipe: Recipe, seed: int,
                 epochs_per_unit: int, total_epochs: int) -> None:
        self.manifest, self.store_root, self.units = manifest, store_root, units
        self.view_records, self.recipe, self.seed = view_records, recipe, seed
        self.b, self.total_epochs = epochs_per_unit, total_epochs

    def __iter__(self) -> Iterator[GroupViews]:
        info = get_worker_info()
        mine = self.units[info.id::info.num_workers] if info else self.units
        replay = any(u in self.view_records for u in mine)
        store = CacheStore.open(self.store_root) if replay else None
        for shard, block in mine:
            samples = read_shard(self.manifest, shard, verify=True)
            path = self.manifest.shard_path(shard)
            rows = [self.manifest.row_of(shard, i) for i in range(len(samples))]
            record = self.view_records.get((shard, block))
            epochs = range(block * self.b, min((block + 1) * self.b, self.total_epochs))
            if record is not None:
                assert store is not None
                recs, hashes, stored_labels = store.read_unit_views(shard, block, record)
                check_alignment(self.store_root, self.manifest, shard, samples, hashes, stored_labels)
            else:
                sizes = [image_size(s.image, sample_name(path, s)) for s in samples]
                recs = np.stack([sample_shard_records(self.recipe, self.seed, e, shard, rows, sizes)
                                 for e in epochs])
            num_groups = -(-len(samples) // PAIR_GROUP)
            for g in range(num_groups):
                part = slice(g * PAIR_GROUP, (g + 1) * PAIR_GROUP)
                names = [sample_name(path, s) for s in samples[part]]
                yield GroupViews(shard, block, g, num_groups, rows[part],
                                 [worker_image(s.image, n) for s, n in zip(samples[part], names)],
                                 names, recs[:, part], [s.key for s in samples[part]],
                                 np.array([s.label for s in samples[part]], np.int32),
                                 record is None)


class _Writer(threading.Thread):
    """Writes finished units and commits them; errors surface in the main thread."""

    def __init__(self, store: CacheStore) -> None:
        super().__init__(daemon=True)
        self.store, self.q, self.error = store, queue.Queue(maxsize=4), None

    def run(self) -> None:
        while (job := self.q.get()) is not None:
            if self.error is None:
                try:
                    self._write(*job)
                except BaseException as e:  # reported by put()/finish()
                    self.error = e

    def _write(self, shard: int, block: int, acc: dict[str, Any], prior: dict[str, Any] | None) -> None:
        views = prior["views"] if prior else {}
        teachers = dict(prior["teachers"]) if prior else {}
        if acc["new_views"]:
            views = {"sha256": self.store.write_views(shard, block, acc["keys"], acc["labels"],
                                                      acc["records"])}
        for name, parts in acc["teachers"].items():
            teachers[name] = {"sha256": self.store.write_teacher(
                name, shard, block, np.stack(parts["logits"]), np.stack(parts["indices"]),
                np.stack(parts["lse"]))}
        self.store.commit_unit(shard, block, len(acc["keys"]), views, teachers)

    def put(self, job: tuple) -> None:
        if self.error is not None:
            raise self.error
        self.q.put(job)

    def finish(self) -> None:
        self.q.put(None)
        self.join()
        if self.error is not None:
            raise self.error


@dataclass
class Plan:
    """What this process does: its units, the progress record of each (None: nothing of it is
    committed), and the teachers each unit still needs."""

    units: list[tuple[int, int]]
    records: dict[tuple[int, int], dict[str, Any] | None]
    needs: dict[tuple[int, int], list[str]]
    notes: list[str]  # units redone because their record or chunks were found damaged

    @property
    def view_records(self) -> dict[tuple[int, int], dict[str, Any]]:
        return {u: r for u, r in self.records.items() if r and r.get("views")}


def plan_units(store: CacheStore, teacher_names: list[str], info: DistInfo, claim: bool,
               repair: bool = False) -> Plan:
    """Units this process should (try to) do. Static split: the canonical unit index modulo
    world size. Committed components whose chunk files are missing (or, with ``repair``, that
    fail their checksums) are un-committed first, so exactly they are recomputed."""
    plan = Plan([], {}, {}, [])
    for i, (shard, block) in enumerate(store.units()):
        if not claim and i % info.world_size != info.rank:
            continue
        rec = store.unit_record(shard, block)
        if (shard, block) in store.unreadable:
            plan.notes.append(store.unreadable[(shard, block)])
        if rec is not None:
            damaged = store.missing_chunks(shard, block, committed_components(rec))
            if repair and not damaged:
                damaged = store.check_unit(shard, block, rec)
            if damaged:
                store.uncommit(shard, block, list(damaged))
                plan.notes += [f"unit (shard {shard}, block {block}) {c}: {why}; recomputing"
                               for c, why in damaged.items()]
                rec = store.unit_record(shard, block)
        missing = [t for t in teacher_names if not rec or t not in rec["teachers"]]
        if missing or not rec or not rec.get("views"):
            plan.units.append((shard, block))
            plan.records[(shard, block)] = rec
            plan.needs[(shard, block)] = missing if rec and rec.get("views") else list(teacher_names)
    return plan


def cache_teachers(job: CacheJob) -> dict[str, Any]:
    """Run stage one; returns a summary (units done, views/s). Safe to rerun at any point."""
    info = init_distributed(job.device, job.threads, job.workers)
    try:
        return _run(job, info)
    finally:
        shutdown(info)


def _open(job: CacheJob, manifest: Any, info: DistInfo) -> tuple[CacheStore, list[Teacher]]:
    """The teachers (built before any file is made), and the cache made, opened or grown to
    more epochs, with their entries."""
    spec = CacheSpec.for_manifest(manifest, job.recipe, job.seed, job.epochs, job.epochs_per_unit,
                                  job.topk)
    teachers = [build_teacher(t, info.device) for t in job.teachers]
    if len({t.name for t in teachers}) != len(teachers):
        raise CacheMismatchError("two teachers share a name; name them NAME=ARCH:CKPT")
    store = CacheStore.create_or_open(job.out, spec)
    for t in teachers:
        store.ensure_teacher(t.identity())
        if job.compile:
            t.model = torch.compile(t.model)
        if info.device.type == "cuda":
            t.model = t.model.to(memory_format=torch.channels_last)
    barrier(info)
    return store, teachers


def _run(job: CacheJob, info: DistInfo) -> dict[str, Any]:
    manifest = load_manifest(job.manifest)
    store, teachers = _open(job, manifest, info)
    spec = store.spec
    plan = plan_units(store, [t.name for t in teachers], info, job.claim, job.repair)
    for note in plan.notes:
        tqdm.write(f"cache-teachers: {note}", file=sys.stderr)
    units, needs = plan.units, plan.needs
    if job.claim:
        run_id = job.run_id or os.environ.get("TORCHELASTIC_RUN_ID", "") or "default"
        units = [u for u in units if store.claim(run_id, *u)]
    n_views = sum(manifest.shards[s].num_samples * len(store.block_epochs(b)) for s, b in units)
    loader = DataLoader(
        UnitViews(manifest, store.root, units, plan.view_records, job.recipe, job.seed,
                  spec.epochs_per_unit, spec.epochs),
        batch_size=None, num_workers=min(job.workers, len(units)),
        pin_memory=info.device.type == "cuda", persistent_workers=False)
    writer = _Writer(store)
    writer.start()
    pending: dict[tuple[int, int], dict[str, Any]] = {}
    start, done = time.perf_counter(), 0
    bar = Progress(n_views, f"cache-teachers (rank 0 of {info.world_size})" if info.distributed
                   else "cache-teachers", "views", enabled=info.is_main)

    def settle(item: GroupViews, results: list[tuple[int, Teacher]], wait: Callable[[], list]) -> int:
        """A group's top-k, once on the host: checked finite, added to its unit, which is handed
        to the writer when this was its last group."""
        unit = (item.shard, item.block)
        outs: dict[str, list[tuple[np.ndarray, ...]]] = {n: [] for n in needs[unit]}
        for (j, t), (*top, finite) in zip(results, wait()):
            if not finite.all():
                raise NonFiniteError(_non_finite(t, item, store.block_epochs(item.block)[j], finite))
            outs[t.name].append(tuple(top))
        for name, per_epoch in outs.items():
            pending[unit]["teachers"][name].append(per_epoch)
        if item.group == item.num_groups - 1:
            writer.put((item.shard, item.block, _unit_arrays(pending.pop(unit)), store.unit_record(*unit)))
        n = item.records.shape[0] * item.records.shape[1]  # epochs x rows
        bar.update(n)
        return n

    in_flight = None  # the previous group, its results still on their way to the host
    try:
        for item in loader:
            unit = (item.shard, item.block)
            acc = pending.setdefault(unit, {"groups": [], "new_views": item.new_views,
                                            "teachers": {n: [] for n in needs[unit]}})
            acc["groups"].append((item.keys, item.labels, item.records))  # not the bytes
            results, tops = [], []
            epoch_views = render_encoded(item.images, item.records, item.rows, job.recipe,
                                         info.device, item.names)  # decoded once for all epochs
            for j, views in enumerate(epoch_views):
                for t in teachers:
                    if t.name in needs[unit]:
                        results.append((j, t))
                        tops.append(_top_k(t, views, job, info.device))
            # this group is queued on the device: only now wait for the previous one's results,
            # so the device runs this group's views and teachers while the host takes those
            if in_flight is not None:
                done += settle(*in_flight)
            in_flight = (item, results, _to_host(tops, info.device))
        if in_flight is not None:
            done += settle(*in_flight)
    finally:
        bar.close()
        writer.finish()
    elapsed = time.perf_counter() - start
    barrier(info)
    return {"units": len(units), "views": done, "seconds": elapsed,
            "views_per_s": done / elapsed if elapsed > 0 else 0.0, "rank": info.rank}


def _top_k(teacher: Teacher, views: torch.Tensor, job: CacheJob,
           device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k log-probabilities (float32, logit - lse), their indices, the log-sum-exp and
    whether each view's logits were all finite, of one group-epoch of views, in teacher
    batches; on the device (``_to_host`` brings a group's back at once)."""
    logprobs, indices, lse, finite = [], [], [], []
    for i in range(0, len(views), job.batch_size):
        full = teacher_logits(teacher, views[i:i + job.batch_size], job.recipe.mean, job.recipe.std,
                              device)
        top = full.topk(job.topk, dim=1)
        total = torch.logsumexp(full, dim=1)
        logprobs.append(top.values - total[:, None])
        indices.append(top.indices)
        lse.append(total)
        finite.append(torch.isfinite(full).all(dim=1))
    return tuple(torch.cat(x) for x in (logprobs, indices, lse, finite))  # type: ignore[return-value]


def _to_host(results: list[tuple[torch.Tensor, ...]], device: torch.device) -> Callable[[], list[tuple[np.ndarray, ...]]]:
    """Start bringing device tensors to the host; the returned function waits for them (only
    them: the copies go to pinned buffers behind the work that makes them, and an event marks
    their end) and gives NumPy arrays."""
    if device.type != "cuda":
        return lambda: [tuple(t.numpy() for t in r) for r in results]
    host = [tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True) for t in r)
            for r in results]
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(device))

    def wait() -> list[tuple[np.ndarray, ...]]:
        copied.synchronize()
        return [tuple(t.numpy() for t in r) for r in host]
    return wait


def _non_finite(teacher: Teacher, item: GroupViews, epoch: int, finite: np.ndarray) -> str:
    """Which teacher gave NaN or infinite logits, for which unit and views (shard file, key)."""
    bad = np.flatnonzero(~finite)
    return (f"teacher {teacher.name!r} ({teacher.arch}, {teacher.checkpoint}) gave NaN or infinite "
            f"logits for {len(bad)} view(s) of unit (shard {item.shard}, block {item.block}), epoch "
            f"{epoch}, e.g. row {item.rows[bad[0]]} = {item.names[bad[0]]}; nothing of this unit was "
            "stored. Check the teacher's weights (`civt-cache eval`)")


def _unit_arrays(acc: dict[str, Any]) -> dict[str, Any]:
    """A finished unit's groups joined along rows: what the writer stores ([epoch, row, ...])."""
    keys, labels, records = zip(*acc["groups"])
    epochs = records[0].shape[0]
    return {"keys": [k for group in keys for k in group],
            "labels": np.concatenate(labels),
            "records": np.concatenate(records, axis=1),
            "new_views": acc["new_views"],
            "teachers": {name: {part: [np.concatenate([per_group[j][p] for per_group in out])
                                       for j in range(epochs)]
                                for p, part in enumerate(("logits", "indices", "lse"))}
                         for name, out in acc["teachers"].items()}}
