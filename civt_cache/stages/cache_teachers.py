"""Stage one, ``cache-teachers``: run every teacher once over the augmented views of a data set
and store their top-k logits plus the exact view records in the cache.

Pipeline per process: DataLoader workers read units (``loader.units.UnitReader``) and hand each
over one pair group at a time as encoded bytes plus the records of every epoch of the unit. The
main thread decodes the group once on the device and builds each epoch's views from it with the
view engine, runs the teachers (bf16 autocast + channels_last on GPU, fp32 on CPU) and takes
top-k on the device; a writer thread writes the unit's chunks and commits it, so the device
never waits on the disk. Memory is bounded by a group, never by a shard. Units are split over
torchrun ranks statically (unit index modulo world size) or, with ``--claim``, taken one at a
time under leases (``cache.leases``) by any number of processes on any nodes sharing the cache.
"""
from __future__ import annotations

import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from civt_cache.cache.leases import LEASE_SECONDS, Lease, Leases, this_process, unit_needs
from civt_cache.cache.objects import cache_location
from civt_cache.cache.scan import scan_cache
from civt_cache.cache.spec import CacheSpec
from civt_cache.cache.store import CacheStore
from civt_cache.config import MAX_BATCH, MAX_EPOCHS, MAX_WORKERS, require
from civt_cache.data.manifest import load_training_manifest
from civt_cache.distributed import DistInfo, barrier, device_layout, distributed_session
from civt_cache.errors import CacheMismatchError, NonFiniteError
from civt_cache.fsutil import is_url
from civt_cache.loader.units import UnitGroup, UnitReader
from civt_cache.models.teachers import Teacher, build_teacher, parse_teacher_spec, teacher_logits
from civt_cache.progress import Progress
from civt_cache.views.engine import render_encoded
from civt_cache.views.recipe import Recipe


@dataclass
class CacheJob:
    """Everything ``cache-teachers`` needs; built from flags and/or a pipeline TOML."""

    manifest: Path | str  # a file, or an s3:// gs:// https:// URL
    teachers: list[str]
    out: Path | str  # a folder, or an s3:// / gs:// prefix
    epochs: int = 1
    epochs_per_unit: int = 1
    topk: int = 10
    seed: int = 0
    recipe: Recipe = field(default_factory=Recipe)
    batch_size: int = 256
    workers: int = 2
    device: str = "auto"
    compile: bool = False
    claim: bool = False  # take units one at a time under leases (several processes, any nodes)
    lease_seconds: float = LEASE_SECONDS
    repair: bool = False  # check every committed unit's checksums first; redo the damaged ones
    threads: int = 0  # intra-op threads; 0: OMP_NUM_THREADS if set, else cores less workers
    allow_sorted_shards: bool = False  # cache shards sorted by class (``data.spread``) deliberately

    def __post_init__(self) -> None:
        if isinstance(self.teachers, str):
            self.teachers = [self.teachers]
        require("cache-teachers",
                teacher=(self.teachers, bool(self.teachers), "given at least once (NAME=ARCH:CHECKPOINT)"),
                epochs=(self.epochs, 1 <= self.epochs <= MAX_EPOCHS, f"in 1..{MAX_EPOCHS}"),
                epochs_per_unit=(self.epochs_per_unit, 1 <= self.epochs_per_unit <= MAX_EPOCHS,
                                 f"in 1..{MAX_EPOCHS}"),
                topk=(self.topk, self.topk >= 1, ">= 1"),
                out=(str(self.out), is_url(self.out) or not Path(self.out).exists() or Path(self.out).is_dir(),
                     "a folder (that path is a file)"),
                batch_size=(self.batch_size, 1 <= self.batch_size <= MAX_BATCH, f"in 1..{MAX_BATCH}"),
                workers=(self.workers, 0 <= self.workers <= MAX_WORKERS, f"in 0..{MAX_WORKERS}"),
                threads=(self.threads, 0 <= self.threads <= MAX_WORKERS, f"in 0..{MAX_WORKERS} (0: auto)"),
                lease_seconds=(self.lease_seconds, 1 <= self.lease_seconds <= 86400, "in 1..86400"),
                device=(self.device, self.device in ("auto", "cpu", "cuda"), "auto, cpu or cuda"))
        self.out = cache_location(self.out)  # an unknown scheme is refused here, in one line
        for spec in self.teachers:
            parse_teacher_spec(spec)


class _Writer(threading.Thread):
    """Writes finished units and commits them; errors surface in the main thread. Under a lease
    a unit is written only while the lease is still ours, and the lease is let go after the
    commit."""

    def __init__(self, store: CacheStore, leases: Leases | None, renewer: _Renewer) -> None:
        super().__init__(daemon=True)
        self.store, self.leases, self.renewer = store, leases, renewer
        self.q, self.error, self.committed = queue.Queue(maxsize=4), None, 0

    def run(self) -> None:
        while (job := self.q.get()) is not None:
            if self.error is None:
                try:
                    self._write(*job)
                except BaseException as e:  # reported by put()/finish()
                    self.error = e

    def _write(self, item: UnitGroup, acc: dict[str, Any]) -> None:
        shard, block, lease = item.shard, item.block, item.lease
        if lease is not None and not (self.leases and self.leases.holds(lease)):
            tqdm.write(f"cache-teachers: unit (shard {shard}, block {block}): its lease was taken "
                       "over while this process stalled; leaving the unit to its new holder", file=sys.stderr)
            self.renewer.drop(lease)
            return
        prior = item.prior
        views, teachers = self._write_objects(item, acc)
        first = self.store.commit_unit(shard, block, len(acc["keys"]), views, teachers, prior is not None)
        if first is not None and (first.get("views") != views or any(
                first["teachers"].get(n) != sums for n, sums in teachers.items())):
            # another process committed it meanwhile (took the lease over while this one stalled)
            # with other bytes, and ours may have landed over its objects: ours go again, last
            tqdm.write(f"cache-teachers: unit (shard {shard}, block {block}) was committed by another "
                       "process meanwhile with other bytes; writing this process's again", file=sys.stderr)
            views, teachers = self._write_objects(item, acc)
            self.store.commit_unit(shard, block, len(acc["keys"]), views, teachers, True)
        self.committed += 1
        if lease is not None and self.leases is not None:
            self.renewer.drop(lease)
            self.leases.release(lease)

    def _write_objects(self, item: UnitGroup, acc: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Write the unit's new components; their checksums beside those already committed."""
        shard, block, prior = item.shard, item.block, item.prior
        views = prior["views"] if prior else {}
        teachers = dict(prior["teachers"]) if prior else {}
        if acc["new_views"]:
            views = self.store.write_views(shard, block, acc["keys"], acc["labels"], acc["records"])
        for name, parts in acc["teachers"].items():
            teachers[name] = self.store.write_teacher(name, shard, block, np.stack(parts["logits"]),
                                                      np.stack(parts["indices"]), np.stack(parts["lse"]))
        return views, teachers

    def check(self) -> None:
        """Raise the error a write met, if any."""
        if self.error is not None:
            raise self.error

    def put(self, job: tuple) -> None:
        self.check()
        self.q.put(job)

    def finish(self) -> None:
        self.q.put(None)
        self.join()
        if self.error is not None:
            raise self.error


class _Renewer(threading.Thread):
    """Renews the leases of the units this process is computing, every third of a lease."""

    def __init__(self, leases: Leases | None) -> None:
        super().__init__(daemon=True)
        self.leases, self.held, self.lock, self.stop = leases, {}, threading.Lock(), threading.Event()

    def hold(self, lease: Lease | None) -> None:
        if lease is not None:
            with self.lock:
                self.held.setdefault((lease.shard, lease.block), lease)

    def drop(self, lease: Lease) -> None:
        with self.lock:
            self.held.pop((lease.shard, lease.block), None)

    def run(self) -> None:
        while self.leases is not None and not self.stop.wait(self.leases.seconds / 3):
            with self.lock:
                for unit, lease in list(self.held.items()):
                    renewed = self.leases.renew(lease)
                    if renewed is None:  # taken over: the writer will not commit it
                        del self.held[unit]
                    else:
                        self.held[unit] = renewed

    def close(self) -> list[Lease]:
        """Stop renewing; the leases still held (units not committed: an error stopped them)."""
        self.stop.set()
        with self.lock:
            return list(self.held.values())


@dataclass
class Plan:
    """What this process may do: the units that need work (its static share, or all of them
    when units are claimed) with the commit record of each (None: nothing committed)."""

    records: dict[tuple[int, int], dict[str, Any] | None]
    notes: list[str]  # units redone because their record or chunks were found damaged

    @property
    def units(self) -> list[tuple[int, int]]:
        return list(self.records)


def plan_units(store: CacheStore, teacher_names: list[str], info: DistInfo, claim: bool,
               repair: bool = False) -> Plan:
    """Units this process should (try to) do. Static split: the canonical unit index modulo
    world size. Committed components whose chunk files are missing (or, with ``repair``, that
    fail their checksums) are un-committed first, so exactly they are recomputed."""
    mine = [u for i, u in enumerate(store.units()) if claim or i % info.world_size == info.rank]
    scan = scan_cache(store, mine)
    plan = Plan({}, list(scan.unreadable))
    for unit in scan.units:
        damaged = dict(unit.lost)
        if repair and unit.record is not None and not damaged:
            damaged = store.check_unit(unit.shard, unit.block, unit.record)
        rec = unit.record
        if damaged:
            store.uncommit(unit.shard, unit.block, list(damaged))
            plan.notes += [f"unit (shard {unit.shard}, block {unit.block}) {c}: {why}; recomputing"
                           for c, why in damaged.items()]
            rec = store.unit_record(unit.shard, unit.block)
        if unit_needs(rec, teacher_names):
            plan.records[unit.unit] = rec
    return plan


def cache_teachers(job: CacheJob) -> dict[str, Any]:
    """Run stage one; returns a summary (units done, views/s). Safe to rerun at any point."""
    with distributed_session(job.device, job.threads, job.workers) as info:
        return _run(job, info)


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
        t.model = device_layout(t.model, info.device)
    if info.is_main:  # a fresh index before the others scan: each reads it, not every record
        store.commits.all(save_index=True)
    barrier(info)
    return store, teachers


def _run(job: CacheJob, info: DistInfo) -> dict[str, Any]:
    manifest = load_training_manifest(job.manifest, job.allow_sorted_shards, lambda msg: tqdm.write(
        f"cache-teachers: {msg}", file=sys.stderr) if info.is_main else None)  # before the cache is made
    store, teachers = _open(job, manifest, info)
    names = [t.name for t in teachers]
    plan = plan_units(store, names, info, job.claim, job.repair)
    for note in plan.notes:
        tqdm.write(f"cache-teachers: {note}", file=sys.stderr)
    leases = Leases(store.objects, this_process(), job.lease_seconds) if job.claim else None
    renewer = _Renewer(leases)
    renewer.start()
    writer = _Writer(store, leases, renewer)
    writer.start()
    units, start, done = plan.units, time.perf_counter(), 0
    bar = Progress(sum(manifest.shards[s].num_samples * len(store.block_epochs(b)) for s, b in units),
                   f"cache-teachers (rank 0 of {info.world_size})" if info.distributed else "cache-teachers",
                   "views", enabled=info.is_main)
    try:
        while units:
            loader = UnitReader(manifest, store.root, units, plan.records, names, store.spec, leases,
                                info).loader(min(job.workers, len(units)), pin_memory=info.device.type == "cuda")
            done += _compute(job, info, store, teachers, loader, writer, renewer, bar)
            if leases is None:
                break
            # the rest is held by others: wait until committed or takeable (return only when all are)
            units = [u for u in units if unit_needs(store.unit_record(*u), names)]
            if units:
                writer.check()  # a failed write would leave its unit leased by us for ever
                time.sleep(min(5.0, leases.seconds / 4))
    finally:
        bar.close()
        try:
            writer.finish()
        finally:
            for lease in renewer.close():  # units an error stopped: free for anyone at once
                leases.release(lease)  # type: ignore[union-attr]
    elapsed = time.perf_counter() - start
    barrier(info)
    if info.is_main:  # the next start-up reads every record in a request or two
        store.commits.all(save_index=True)
    return {"units": writer.committed, "views": done, "seconds": elapsed,
            "views_per_s": done / elapsed if elapsed > 0 else 0.0, "rank": info.rank}


def _compute(job: CacheJob, info: DistInfo, store: CacheStore, teachers: list[Teacher], loader: DataLoader,
             writer: _Writer, renewer: _Renewer, bar: Progress) -> int:
    """Run the teachers on every group the loader brings; each finished unit goes to the
    writer. Returns the number of views done."""
    pending: dict[tuple[int, int], dict[str, Any]] = {}
    done = 0

    def settle(item: UnitGroup, results: list[tuple[int, Teacher]], wait: Callable[[], list]) -> int:
        """A group's top-k, once on the host: checked finite, added to its unit, which is handed
        to the writer when this was its last group."""
        unit = (item.shard, item.block)
        outs: dict[str, list[tuple[np.ndarray, ...]]] = {n: [] for n in item.needs}
        for (j, t), (*top, finite) in zip(results, wait()):
            if not finite.all():
                raise NonFiniteError(_non_finite(t, item, store.block_epochs(item.block)[j], finite))
            outs[t.name].append(tuple(top))
        for name, per_epoch in outs.items():
            pending[unit]["teachers"][name].append(per_epoch)
        if item.group == item.num_groups - 1:
            writer.put((item, _unit_arrays(pending.pop(unit))))
        n = item.records.shape[0] * item.records.shape[1]  # epochs x rows
        bar.update(n)
        return n

    in_flight = None  # the previous group, its results still on their way to the host
    for item in loader:
        renewer.hold(item.lease)
        unit = (item.shard, item.block)
        acc = pending.setdefault(unit, {"groups": [], "new_views": item.new_views,
                                        "teachers": {n: [] for n in item.needs}})
        acc["groups"].append((item.keys, item.labels, item.records))  # not the bytes
        results, tops = [], []
        epoch_views = render_encoded(item.images, item.records, item.rows, job.recipe,
                                     info.device, item.names)  # decoded once for all epochs
        for j, views in enumerate(epoch_views):
            for t in teachers:
                if t.name in item.needs:
                    results.append((j, t))
                    tops.append(_top_k(t, views, job, info.device))
        # this group is queued on the device: only now wait for the previous one's results,
        # so the device runs this group's views and teachers while the host takes those
        if in_flight is not None:
            done += settle(*in_flight)
        in_flight = (item, results, _to_host(tops, info.device))
    if in_flight is not None:
        done += settle(*in_flight)
    return done


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


def _non_finite(teacher: Teacher, item: UnitGroup, epoch: int, finite: np.ndarray) -> str:
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
