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

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from civt_cache.cache.leases import LEASE_SECONDS, Leases, this_process, unit_needs
from civt_cache.cache.objects import cache_location
from civt_cache.cache.scan import scan_cache
from civt_cache.cache.spec import CacheSpec
from civt_cache.cache.create import create_or_open
from civt_cache.cache.store import CacheStore
from civt_cache.cache.unit_writer import LeaseRenewer, UnitWriter
from civt_cache.config import MAX_BATCH, MAX_EPOCHS, MAX_WORKERS, require
from civt_cache.data.manifest import load_training_manifest
from civt_cache.distributed import DistInfo, barrier, device_layout, distributed_session
from civt_cache.errors import CacheMismatchError, NonFiniteError
from civt_cache.fsutil import folder_problem
from civt_cache.loader.units import UnitGroup, UnitReader
from civt_cache.models.teachers import Teacher, build_teacher, parse_teacher_spec, teacher_logits
from civt_cache.progress import Progress
from civt_cache.stopping import check_stop, say_kept
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
        problem = folder_problem(self.out)  # why --out cannot be the folder written into, if it cannot
        require("cache-teachers",
                teacher=(self.teachers, bool(self.teachers), "given at least once (NAME=ARCH:CHECKPOINT)"),
                epochs=(self.epochs, 1 <= self.epochs <= MAX_EPOCHS, f"in 1..{MAX_EPOCHS}"),
                epochs_per_unit=(self.epochs_per_unit, 1 <= self.epochs_per_unit <= MAX_EPOCHS,
                                 f"in 1..{MAX_EPOCHS}"),
                topk=(self.topk, self.topk >= 1, ">= 1"),
                out=(str(self.out), problem is None, f"a folder (that path is {problem})"),
                batch_size=(self.batch_size, 1 <= self.batch_size <= MAX_BATCH, f"in 1..{MAX_BATCH}"),
                workers=(self.workers, 0 <= self.workers <= MAX_WORKERS, f"in 0..{MAX_WORKERS}"),
                threads=(self.threads, 0 <= self.threads <= MAX_WORKERS, f"in 0..{MAX_WORKERS} (0: auto)"),
                lease_seconds=(self.lease_seconds, 1 <= self.lease_seconds <= 86400, "in 1..86400"),
                device=(self.device, self.device in ("auto", "cpu", "cuda"), "auto, cpu or cuda"))
        self.out = cache_location(self.out)  # an unknown scheme is refused here, in one line
        for spec in self.teachers:
            parse_teacher_spec(spec)


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
    for t in teachers:
        if t.num_classes != manifest.num_classes:
            raise CacheMismatchError(f"teacher {t.name!r} ({t.checkpoint}) predicts {t.num_classes} classes, "
                                     f"the data has {manifest.num_classes} ({job.manifest})")
    identities = [t.identity() for t in teachers]
    if info.is_main:  # made (or made again) by one process, then opened by the others
        store = create_or_open(job.out, spec, identities, lambda msg: tqdm.write(f"cache-teachers: {msg}",
                                                                                 file=sys.stderr), job.repair)
    barrier(info)
    if not info.is_main:
        store = create_or_open(job.out, spec, identities)
    for t in teachers:
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
    total = len(store.units())
    if info.is_main and len(plan.units) < total:
        share = total if job.claim or not info.distributed else f"rank 0's share of {total}"
        tqdm.write(f"cache-teachers: {len(plan.units)} unit(s) of {share} left to compute; the others are "
                   "committed", file=sys.stderr)
    leases = Leases(store.objects, this_process(), job.lease_seconds) if job.claim else None
    renewer = LeaseRenewer(leases)
    renewer.start()
    writer = UnitWriter(store, leases, renewer)
    writer.start()
    say_kept(lambda: "" if not info.is_main else (
        f"{writer.committed} unit(s) committed by {'rank 0' if info.distributed else 'this process'} are kept, "
        f"with every unit committed before; the same command continues with the units left"))
    units, start, done, said = plan.units, time.perf_counter(), 0, 0
    views_of = {(s, b): manifest.shards[s].num_samples * len(store.block_epochs(b)) for s, b in units}
    ours: set[tuple[int, int]] = set()  # units this process computed (counted as it goes)
    bar = Progress(sum(views_of.values()),
                   f"cache-teachers (rank 0 of {info.world_size})" if info.distributed else "cache-teachers",
                   "views", enabled=info.is_main)
    try:
        while units:
            loader = UnitReader(manifest, store.root, units, plan.records, names, store.spec, leases,
                                info).loader(min(job.workers, len(units)), pin_memory=info.device.type == "cuda")
            done += _compute(job, info, store, teachers, loader, writer, renewer, bar, ours)
            if leases is None:
                break
            # the rest is held by others: wait until committed or takeable (return only when all are)
            records = store.commits.all()  # each record read once in this process, not once a round
            before, units = units, [u for u in units if unit_needs(records.get(u), names)]
            finished = set(before) - set(units)
            bar.update(sum(views_of[u] for u in finished - ours))  # others' units: the bar ends at 100%
            ours -= finished
            if units:
                writer.check()  # a failed write would leave its unit leased by us for ever
                if len(units) != said:  # said when the count changes, not every round
                    said = len(units)
                    tqdm.write(f"cache-teachers: {_waiting_line(leases, units)}", file=sys.stderr)
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


def _waiting_line(leases: Leases, units: list[tuple[int, int]]) -> str:
    """What a claiming process says while the units left are held by others, so a wait is
    never silent: how many, and who holds the first and for how long."""
    lease = leases.current(*units[0])
    held = (f"unit (shard {units[0][0]}, block {units[0][1]}) is leased by {lease.owner} for "
            f"{max(0.0, lease.expires - time.time()):.0f} s more" if lease is not None else
            f"unit (shard {units[0][0]}, block {units[0][1]}) is being released")
    return (f"waiting for {len(units)} unit(s) other processes are computing: {held}; a unit whose "
            "lease runs out is taken over")


def _compute(job: CacheJob, info: DistInfo, store: CacheStore, teachers: list[Teacher], loader: DataLoader,
             writer: UnitWriter, renewer: LeaseRenewer, bar: Progress, ours: set[tuple[int, int]]) -> int:
    """Run the teachers on every group the loader brings; each finished unit goes to the
    writer (and into ``ours``). Returns the number of views done."""
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
            ours.add(unit)
        n = item.records.shape[0] * item.records.shape[1]  # epochs x rows
        bar.update(n)
        return n

    in_flight = None  # the previous group, its results still on their way to the host
    for item in loader:
        check_stop()
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
