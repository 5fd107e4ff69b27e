"""Stage two's data: per shard, one read of the shard and one read of its (shard, epoch) cache
block, then in-memory lookups. Loader workers hand over whole batches of encoded image bytes,
records and cached top-k (no pixels: ``StudentBatch``); ``batch_views`` builds the views on the
training device with the view engine. (Training on the CPU, the workers run the engine
themselves, in parallel with the step.)

Order: shards per epoch in a permutation keyed by (seed, epoch), one stream of samples shared
out to ranks in equal parts (``loader.plan``);
inside a shard, the records' mixing order (``views.records.mix_order``, partners side by side)
in blocks of the recipe's ``mix_batch``, the whole blocks in an order keyed by (seed, epoch,
shard) and a partial one last, so that batches cut along blocks (``loader.plan``) hold one
Mixup/CutMix draw each in ``batch`` mode. A batch carries the base images of its rows and of
any partner outside it (an odd one out's partner, a pair cut by a batch's end), so every mixed
view finds its partner's base view in its own batch. Which samples form each step of each rank is planned
from the manifest's counts (``loader.plan``): every rank runs the same steps whatever the shard
sizes and worker counts, so DDP ranks never wait on each other. Without a cache the
records are sampled on the fly from the same (seed, epoch, row) keys, so online teachers see
exactly the views a cache would hold.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from civt_cache.cache.store import CacheStore
from civt_cache.data.manifest import DataManifest
from civt_cache.distributed import device_layout
from civt_cache.errors import RankError
from civt_cache.loader.plan import RankPlan, epoch_coverage, epoch_steps, rank_plan, worker_steps
from civt_cache.loader.soft_targets import mixed_targets, pseudo_logits
from civt_cache.loader.units import ShardRead
from civt_cache.processes import worker_init
from civt_cache.views.engine import EncodedImage, decoded_in_budget, eval_views, render_encoded
from civt_cache.views.recipe import Recipe
from civt_cache.views.records import LAM, LAM_ONE, PARTNER, _rng, mix_order
from civt_cache.views.transfer import to_device

_STREAM_SHARDS, _STREAM_ORDER = 0x5348, 0x4F52


def shard_order(seed: int, epoch: int, num_shards: int) -> list[int]:
    return _rng(seed, epoch, _STREAM_SHARDS).permutation(num_shards).tolist()


def epoch_plan(manifest: DataManifest, seed: int, epoch: int, rank: int, world: int, batch_size: int,
               workers: int) -> RankPlan:
    """This rank's batch plan for an epoch (``loader.plan``): shards in the epoch's keyed
    order, their samples shared by the ranks, the same step count on every rank."""
    counts = _counts(manifest)
    return rank_plan(counts, shard_order(seed, epoch, len(counts)), rank, world, batch_size, workers)


def steps_per_epoch(manifest: DataManifest, world: int, batch_size: int) -> int:
    """Steps every rank runs in an epoch (``loader.plan.epoch_steps``), the same in every
    epoch: known before any shard is read, so the schedule counts them up front."""
    return epoch_steps(_counts(manifest), world, batch_size)


def coverage_line(manifest: DataManifest, world: int, batch_size: int) -> str:
    """What a run says of its epochs (``loader.plan.epoch_coverage``): how many of the epoch's
    samples it trains, so a dropped remainder is never silent."""
    trained, total = epoch_coverage(_counts(manifest), world, batch_size)
    return (f"each epoch trains {trained:,} of its {total:,} samples ({trained // (world * batch_size):,} steps x "
            f"{batch_size} x {world} rank(s)); its last {total - trained:,}, under a batch per rank, wait for "
            "the next epoch's order")


def shards_plan(manifest: DataManifest, shards: list[int], batch_size: int, workers: int = 1) -> RankPlan:
    """One process's plan over the given shards in the given order (tests, benchmarks, one's
    own loop over a few shards)."""
    return rank_plan(_counts(manifest), shards, 0, 1, batch_size, workers)


def _counts(manifest: DataManifest) -> list[int]:
    """Each shard's sample count: all a batch plan needs of the data."""
    return [s.num_samples for s in manifest.shards]


@dataclass
class EpochSource:
    """Where one epoch's records and teacher targets come from."""

    epoch: int                  # training epoch (orders the data)
    view_seed: int = 0          # seed of records sampled on the fly (a cache holds its own)
    cache: Path | str | None = None   # None: sample records on the fly; str: an s3:// or gs:// cache
    cache_epoch: int = 0        # cached epoch replayed (cycles when training outlasts the cache)
    teachers: tuple[str, ...] = ()


@dataclass
class StudentBatch:
    """One training batch as a worker hands it over: bytes, records and targets, no pixels.
    ``rows``/``images``/``records`` list every base view the batch needs: its ``size`` output
    rows first, then partners from outside the batch."""

    rows: list[int]
    images: list[EncodedImage]
    names: list[str]
    records: np.ndarray                 # [len(rows), NUM_FIELDS]
    labels: np.ndarray                  # [size]
    partner_labels: np.ndarray
    lam: np.ndarray                     # float32
    teachers: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]  # top-k logprobs, indices, lse
    views: torch.Tensor | None = None   # built in the worker (CPU training only), else None

    @property
    def size(self) -> int:
        return len(self.labels)


def batch_views(batch: StudentBatch, recipe: Recipe, device: torch.device) -> torch.Tensor:
    """The batch's finished views [size, 3, S, S] on ``device``, from its bytes and records."""
    return next(render_encoded(batch.images, [batch.records], batch.rows, recipe, device, batch.names,
                               outputs=range(batch.size)))


def batch_inputs(batch: StudentBatch, recipe: Recipe, num_classes: int, smoothing: float,
                 device: torch.device, renormalize: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """What a training step consumes, on ``device``: the views (channels_last on GPU), timm's
    mixed, smoothed label targets and each cached teacher's dense target logits. The batch's
    numbers travel in one transfer."""
    x = batch.views.to(device) if batch.views is not None else batch_views(batch, recipe, device)
    x = device_layout(x, device)
    arrays = {"labels": batch.labels, "partners": batch.partner_labels, "lam": batch.lam}
    for name, (logprobs, indices, _) in batch.teachers.items():
        arrays.update({f"{name}.logprobs": logprobs, f"{name}.indices": indices})
    p = to_device(arrays, device)
    target = mixed_targets(p["labels"], p["partners"], p.as_sent("lam"), num_classes, smoothing)
    return x, target, {name: pseudo_logits(p.as_sent(f"{name}.logprobs"), p[f"{name}.indices"],
                                           num_classes, renormalize) for name in batch.teachers}


def _as_is(item: Any) -> Any:
    return item


def batch_loader(dataset: IterableDataset, workers: int,
                 generator: torch.Generator | None = None) -> DataLoader:
    """A DataLoader over a data set whose items are already batches (``StudentBatches``,
    ``ValBatches``): no collation, so numpy arrays travel pickled, not as shared-memory
    tensors."""
    return DataLoader(dataset, batch_size=None, collate_fn=_as_is, num_workers=workers,
                      generator=generator, worker_init_fn=worker_init() if workers else None)


class StudentBatches(IterableDataset):
    """Yields the ``StudentBatch`` of each step of a rank's epoch plan (``loader.plan``), from
    step ``skip`` on (a run resumed mid-epoch). DataLoader worker ``j`` of ``W`` makes steps
    ``skip + j, skip + j + W, ...``, which is the order the DataLoader takes them in, so the
    loader yields exactly the plan's steps in order, whatever the worker count. A worker keeps a
    shard open from its first step that needs it to its last, then lets it go. ``seed`` orders
    the samples; the views come from ``source`` (the cache's records, or its ``view_seed``).

    ``views_in_workers``: when training runs on the CPU, the CPU that consumes the views is
    the workers' as much as the main process's, so workers build them (the same engine) in
    parallel with the training step, as timm's loader does; on a GPU they stay bytes."""

    def __init__(self, manifest: DataManifest, recipe: Recipe, seed: int, plan: RankPlan,
                 source: EpochSource, skip: int = 0, views_in_workers: bool = False) -> None:
        self.manifest, self.recipe, self.seed = manifest, recipe, seed
        self.plan, self.source, self.skip = plan, source, skip
        self.views_in_workers = views_in_workers

    def __len__(self) -> int:
        return self.plan.steps - self.skip

    def __iter__(self) -> Iterator[StudentBatch]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        in_worker = self.views_in_workers and info is not None
        steps = worker_steps(self.plan.steps, self.skip, wid, nw)
        last_use: dict[int, int] = {}
        for step in steps:
            for shard, _, _ in self.plan.batches[step]:
                last_use[shard] = step
        store = CacheStore.open(self.source.cache) if self.source.cache else None
        open_shards: dict[int, _OpenShard] = {}
        for step in steps:
            samples = []
            for shard, start, stop in self.plan.batches[step]:
                if shard not in open_shards:
                    open_shards[shard] = _OpenShard(self.manifest, shard, store, self.source, self.recipe,
                                                    self.seed)
                samples.extend(open_shards[shard].samples(start, stop))
            batch = _make_batch(samples)
            if in_worker:
                batch.views = batch_views(batch, self.recipe, torch.device("cpu"))
                batch.images = []
            yield batch
            for shard in [s for s in open_shards if last_use[s] == step]:
                del open_shards[shard]


def planned_steps(loader: Iterable[StudentBatch], dataset: StudentBatches, epoch: int, rank: int = 0,
                  world: int = 1) -> Iterator[tuple[int, StudentBatch]]:
    """``(step, batch)`` for every step of ``dataset``'s plan from its ``skip``, taken from
    ``loader`` (a DataLoader over ``dataset``). A loader that ends before the plan does is an
    error raised at once, never a shorter epoch: under DDP the other ranks would wait for this
    rank's next step for ever."""
    it = iter(loader)
    for step in range(dataset.skip, dataset.plan.steps):
        try:
            batch = next(it)
        except StopIteration:
            raise RankError(f"rank {rank} of {world}: its loader gave {step - dataset.skip} batch(es) in "
                            f"epoch {epoch + 1} where the plan has {dataset.plan.steps - dataset.skip} "
                            f"(steps {dataset.skip + 1}..{dataset.plan.steps}); stopped so that no rank "
                            "waits for a step that never comes") from None
        if batch.size != sum(stop - start for _, start, stop in dataset.plan.batches[step]):
            raise RankError(f"rank {rank} of {world}: epoch {epoch + 1} step {step + 1} holds "
                            f"{batch.size} samples where the plan has another count")
        yield step, batch


class _OpenShard:
    """One shard as a stage-two worker holds it: read once, its epoch's records and cached
    targets, its stage-two order, and each image's bytes prepared once on first use."""

    def __init__(self, manifest: DataManifest, shard: int, store: CacheStore | None, source: EpochSource,
                 recipe: Recipe, seed: int) -> None:
        self.read = read = ShardRead(manifest, shard)
        self.teacher_out: dict[str, tuple[np.ndarray, ...]] = {}
        if store is not None:
            self.recs, self.teacher_out = read.cached_epoch(store, source.cache_epoch, list(source.teachers))
        else:
            self.recs = read.sampled_records(recipe, source.view_seed, [source.epoch])[0]
        view_seed, view_epoch = (store.spec.seed, source.cache_epoch) if store else (source.view_seed, source.epoch)
        mixing = mix_order(view_seed, view_epoch, shard, len(self.recs))
        self.order = shard_sequence(mixing, recipe.mix_batch, _rng(seed, source.epoch, shard, _STREAM_ORDER))
        self.images: dict[int, tuple[EncodedImage, str]] = {}

    def image(self, pos: int) -> tuple[EncodedImage, str]:
        if pos not in self.images:
            self.images[pos] = self.read.image(pos), self.read.names[pos]
        return self.images[pos]

    def samples(self, start: int, stop: int) -> Iterator[dict[str, Any]]:
        """Positions ``start..stop`` of the order, each with its own and its partner's
        bytes, record and label."""
        read, recs, base = self.read, self.recs, self.read.base
        for pos in self.order[start:stop]:
            ppos = int(recs[pos, PARTNER]) - base
            yield {"row": base + pos, "image": self.image(pos), "record": recs[pos],
                   "label": int(read.labels[pos]), "partner_row": base + ppos,
                   "partner_image": self.image(ppos), "partner_record": recs[ppos],
                   "partner_label": int(read.labels[ppos]),
                   "teachers": {n: tuple(a[pos] for a in arrays) for n, arrays in self.teacher_out.items()}}


def shard_sequence(mixing: np.ndarray, block: int, rng: np.random.Generator) -> list[int]:
    """Stage two's order of a shard's positions: the whole ``block``-sized blocks of its mixing
    order in an order drawn from ``rng``, each block's positions in mixing order (partners side
    by side), then the partial block."""
    whole = len(mixing) // block
    blocks = [mixing[b * block:(b + 1) * block] for b in rng.permutation(whole)] + [mixing[whole * block:]]
    return np.concatenate(blocks).tolist()


def _make_batch(samples: list[dict[str, Any]]) -> StudentBatch:
    rows = [s["row"] for s in samples]
    images = [s["image"] for s in samples]
    records = [s["record"] for s in samples]
    inside = set(rows)
    for s in samples:  # a partner cut off by the batch's end travels along
        if s["partner_row"] not in inside:
            inside.add(s["partner_row"])
            rows.append(s["partner_row"])
            images.append(s["partner_image"])
            records.append(s["partner_record"])
    names = list(samples[0]["teachers"])
    return StudentBatch(
        rows, [im for im, _ in images], [n for _, n in images], np.stack(records),
        np.array([s["label"] for s in samples], np.int64),
        np.array([s["partner_label"] for s in samples], np.int64),
        np.array([float(s["record"][LAM]) / LAM_ONE for s in samples], np.float32),
        {n: tuple(np.stack([s["teachers"][n][i] for s in samples]) for i in range(3)) for n in names})


class ValBatches(IterableDataset):
    """Validation batches (encoded images, labels) of a manifest's shards, split over workers;
    ``batch_views``' counterpart ``eval_views`` resizes and centre-crops them on the device."""

    def __init__(self, manifest: DataManifest, shards: list[int], batch_size: int) -> None:
        self.manifest, self.shards, self.batch_size = manifest, shards, batch_size

    def __iter__(self) -> Iterator[tuple[list[EncodedImage], list[str], np.ndarray]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        images, names, labels = [], [], []
        for shard in self.shards[wid::nw]:
            read = ShardRead(self.manifest, shard)
            for pos in range(len(read.samples)):
                images.append(read.image(pos))
                names.append(read.names[pos])
                labels.append(read.labels[pos])
                if len(labels) == self.batch_size:
                    yield images, names, np.array(labels, np.int64)
                    images, names, labels = [], [], []
        if labels:
            yield images, names, np.array(labels, np.int64)


def val_views(images: list[EncodedImage], names: list[str], recipe: Recipe,
              device: torch.device) -> torch.Tensor:
    """Validation views of a ``ValBatches`` item, built on ``device``."""
    return torch.cat([eval_views(decoded, recipe)
                      for _, decoded in decoded_in_budget(images, device, names)])
