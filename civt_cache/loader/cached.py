"""Views and soft targets from a cache, for any training loop.

``train-student`` is one training loop; people who train with their own (Lightning,
accelerate, timm's train.py) need the same batches: ``CachedBatches`` yields, for one epoch of
one rank, the finished views, the mixed label targets and each cached teacher's target logits,
on the device, exactly as ``train-student`` sees them (same order, records and targets).
``open_student_cache`` is the check both make first: a cache that does not fit the data,
recipe, teachers or epochs is refused with the reason, never read.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from civt_cache.cache.scan import scan_cache
from civt_cache.cache.store import CacheStore
from civt_cache.data.manifest import DataManifest, load_manifest
from civt_cache.distributed import pick_device
from civt_cache.errors import CacheMismatchError, ConfigError, CorruptUnitError
from civt_cache.loader.batches import (
    EpochSource,
    StudentBatches,
    batch_inputs,
    batch_loader,
    epoch_plan,
    planned_steps,
)
from civt_cache.models.teachers import Teacher, build_teacher, checkpoint_sha256, parse_teacher_spec, teacher_logits
from civt_cache.views.recipe import Recipe

Batch = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


def open_student_cache(cache: Path | str, manifest: DataManifest, manifest_path: Path | str, recipe: Recipe,
                       names: Sequence[str], epochs: int, view_seed: int | None = None,
                       cycle_cache: bool = False, teacher_specs: Sequence[str] = (),
                       log: Callable[[str], None] = print) -> CacheStore:
    """Open ``cache`` for training ``epochs`` epochs on ``manifest`` with teachers ``names``
    (``check_student_cache``)."""
    store = CacheStore.open(cache)
    check_student_cache(store, manifest, manifest_path, recipe, names, epochs, view_seed, cycle_cache,
                        teacher_specs, log)
    return store


def check_student_cache(store: CacheStore, manifest: DataManifest, manifest_path: Path | str,
                        recipe: Recipe, names: Sequence[str], epochs: int, view_seed: int | None = None,
                        cycle_cache: bool = False, teacher_specs: Sequence[str] = (),
                        log: Callable[[str], None] = print) -> None:
    """Refuse a cache that does not fit the data, recipe, teachers or epochs asked for."""
    cache, s = store.root, store.spec
    diffs = s.data_differences(manifest.fingerprint(), f"{manifest.name} ({manifest_path})", recipe)
    if diffs:
        raise CacheMismatchError(f"{cache}: does not fit the training asked for: " + "; ".join(diffs))
    if view_seed is not None and view_seed != s.seed:
        raise CacheMismatchError(f"{cache}: views cached with seed {s.seed}, --view-seed "
                                 f"{view_seed} asked (the cache's views are replayed as cached)")
    if epochs > s.epochs and not cycle_cache:
        raise CacheMismatchError(
            f"{cache}: holds {s.epochs} epoch(s) of views, training asks for {epochs}. "
            f"The paper draws fresh views every epoch: grow the cache to {epochs} epochs "
            f"(cache-teachers --epochs {epochs} computes only the new ones), or replay the "
            "cached ones with --cycle-cache")
    stored = store.teachers()
    for name in names:
        if name not in stored:
            raise CacheMismatchError(f"{cache}: no teacher {name!r} in the cache (has {sorted(stored)})")
    for spec in teacher_specs:
        name, arch, ckpt = parse_teacher_spec(spec)
        if name in stored and (stored[name]["arch"] != arch or stored[name]["checkpoint_sha256"] != checkpoint_sha256(ckpt)):
            raise CacheMismatchError(f"{cache}: teacher {name!r} was cached from "
                                     f"{stored[name]['arch']} sha256 {stored[name]['checkpoint_sha256'][:12]}, "
                                     f"not {arch}:{ckpt}")
    needed = {e % s.epochs for e in range(epochs)}
    blocks = sorted({e // s.epochs_per_unit for e in needed})
    # the records (a listing and the index) and one listing per array: a lost object is refused
    # here, before any step, not when its epoch comes (its read would also refuse it)
    scan = scan_cache(store, [(shard, b) for b in blocks for shard in range(s.num_shards)])
    for unit in scan.units:
        gone = [(c, why) for c, why in unit.lost.items() if c in ("views", *names)]
        if gone:
            component, why = gone[0]
            raise CorruptUnitError(f"{cache}: unit (shard {unit.shard}, block {unit.block}) {component}: {why}",
                                   "Rerun `civt-cache cache-teachers` with the cache's settings to "
                                   "recompute it (`civt-cache inspect` lists what is damaged)")
    for why in scan.unreadable:
        log(why)
    incomplete = {e for u in scan.incomplete(names) for e in store.block_epochs(u.block) if e in needed}
    if incomplete:
        raise CacheMismatchError(f"{cache}: cached epochs {sorted(incomplete)} are not complete for "
                                 f"teachers {list(names)}; run `civt-cache cache-teachers` with the same "
                                 "settings to finish them (or `civt-cache inspect` to see what is missing)")
    if epochs > s.epochs:
        log(f"--cycle-cache: training for {epochs} epochs on a cache of {s.epochs}: epoch e "
            f"replays cached epoch e mod {s.epochs}")


def cached_epoch_source(store: CacheStore, epoch: int, names: Sequence[str]) -> EpochSource:
    """Training epoch ``epoch`` read from ``store``: its records, seed and teachers' targets of
    cached epoch ``epoch mod E``."""
    return EpochSource(epoch, store.spec.seed, store.root, epoch % store.spec.epochs, tuple(names))


class TargetSource:
    """Where a batch's teacher targets come from: the cache (read with the batch's bytes, after
    ``open_student_cache``'s checks) or the teachers themselves, run live on the batch's views
    (``online``); and the seed of the views (a cache's own, else ``view_seed``)."""

    def __init__(self, names: Sequence[str], online: bool, teacher_specs: Sequence[str], cache: Path | str | None,
                 manifest: DataManifest, manifest_path: Path | str, recipe: Recipe, epochs: int,
                 cycle_cache: bool, view_seed: int, view_seed_asked: bool, device: torch.device,
                 log: Callable[[str], None]) -> None:
        self.names = tuple(names)
        self.live: dict[str, Teacher] = {}
        self.store: CacheStore | None = None
        if self.names and online:
            specs = {parse_teacher_spec(s)[0]: s for s in teacher_specs}
            missing = [n for n in self.names if n not in specs]
            if missing:
                raise ConfigError(f"--online needs --teacher {missing[0]}=ARCH:CKPT for {list(missing)}")
            self.live = {n: build_teacher(specs[n], device) for n in self.names}
        elif self.names:
            if cache is None:
                raise ConfigError(f"--teachers {'/'.join(self.names)} needs --cache CACHE (or --online "
                                  "with --teacher specs)")
            self.store = open_student_cache(cache, manifest, manifest_path, recipe, self.names, epochs,
                                            view_seed if view_seed_asked else None, cycle_cache,
                                            teacher_specs, log)
        self.view_seed = self.store.spec.seed if self.store else view_seed

    def source(self, epoch: int) -> EpochSource:
        if self.store is None:
            return EpochSource(epoch, self.view_seed, None, epoch, ())
        return cached_epoch_source(self.store, epoch, self.names)

    def cache_epoch(self, epoch: int) -> int | None:
        """The cached epoch training epoch ``epoch`` replays (None without a cache)."""
        return self.source(epoch).cache_epoch if self.store else None

    def targets(self, x: torch.Tensor, cached: dict[str, torch.Tensor], recipe: Recipe,
                device: torch.device) -> dict[str, torch.Tensor]:
        """The step's teacher targets: the cached ones, or the live teachers' on ``x``."""
        if not self.live:
            return cached
        return {n: teacher_logits(t, x, recipe.mean, recipe.std, device) for n, t in self.live.items()}


class CachedBatches:
    """One epoch of one rank's training batches from ``manifest`` and ``cache``: iterating
    yields ``(views, label_targets, teacher_targets)`` on ``device``, i.e. float32 views
    [B, 3, S, S] (normalised; channels_last on a GPU), timm's mixed and smoothed label targets
    [B, C], and ``{teacher: dense target logits [B, C]}``. ``len`` is the number of batches
    (every rank gets the same, as DDP needs). ``seed`` orders the data as ``train-student
    --seed`` does; the views are the cache's own (its recipe and seed: ``.recipe``)."""

    def __init__(self, manifest: str | Path, cache: str | Path, batch_size: int, epoch: int = 0,
                 seed: int = 0, rank: int = 0, world_size: int = 1, workers: int = 2,
                 device: str | torch.device = "auto", teachers: Sequence[str] | None = None,
                 label_smoothing: float = 0.1, renormalize: bool = False) -> None:
        self.manifest = load_manifest(manifest)
        self.store = CacheStore.open(cache)
        self.recipe = self.store.spec.recipe
        self.teachers = tuple(teachers) if teachers is not None else tuple(sorted(self.store.teachers()))
        check_student_cache(self.store, self.manifest, manifest, self.recipe, self.teachers, epoch + 1,
                            cycle_cache=True, log=lambda msg: None)
        self.batch_size, self.epoch, self.seed = batch_size, epoch, seed
        self.rank, self.world_size, self.workers = rank, world_size, workers
        self.device = device if isinstance(device, torch.device) else pick_device(device)
        self.label_smoothing, self.renormalize = label_smoothing, renormalize

        self.plan = epoch_plan(self.manifest, seed, epoch, rank, world_size, batch_size, workers)

    def __len__(self) -> int:
        return self.plan.steps

    def __iter__(self) -> Iterator[Batch]:
        source = cached_epoch_source(self.store, self.epoch, self.teachers)
        data = StudentBatches(self.manifest, self.recipe, self.seed, self.plan, source,
                              views_in_workers=self.device.type == "cpu")
        loader = batch_loader(data, self.workers, torch.Generator().manual_seed(self.seed + self.epoch))
        for _, batch in planned_steps(loader, data, self.epoch, self.rank, self.world_size):
            yield batch_inputs(batch, self.recipe, self.manifest.num_classes, self.label_smoothing,
                               self.device, self.renormalize)
