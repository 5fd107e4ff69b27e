"""Stage two's data: per shard, one read of the shard and one read of its (shard, epoch) cache
block, then in-memory lookups; views rebuilt through ``views.apply_records``.

Order: shards per epoch in a permutation keyed by (seed, epoch), dealt to ranks round-robin;
inside a shard, samples in a keyed permutation with each mixing partner right after its row, so
a partner's base view is built once. Every rank runs ``steps_per_epoch`` steps (the smallest
rank's share, whole batches; the rest is dropped), so DDP ranks never wait on each other.
Without a cache the records are sampled on the fly from the same (seed, epoch, row) keys, so
online teachers see exactly the views a cache would hold.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from .cache_store import CacheStore, check_alignment
from .errors import CacheMismatchError
from .manifest import DataManifest
from .recipe import Recipe
from .shards import read_shard
from .views import LAM, LAM_ONE, PARTNER, _rng, apply_records, decode_rgb, eval_view, \
    image_size, sample_shard_records

_STREAM_SHARDS, _STREAM_ORDER = 0x5348, 0x4F52


def shard_order(seed: int, epoch: int, num_shards: int) -> list[int]:
    return _rng(seed, epoch, _STREAM_SHARDS).permutation(num_shards).tolist()


def rank_shards(manifest: DataManifest, seed: int, epoch: int, rank: int, world: int) -> list[int]:
    """This rank's shards for an epoch, in order."""
    return shard_order(seed, epoch, len(manifest.shards))[rank::world]


def steps_per_epoch(manifest: DataManifest, seed: int, epoch: int, world: int, batch_size: int) -> int:
    """Steps every rank runs this epoch: the smallest rank share, in whole batches."""
    order = shard_order(seed, epoch, len(manifest.shards))
    shares = [sum(manifest.shards[s].num_samples for s in order[r::world]) for r in range(world)]
    return min(shares) // batch_size


class _LazyImages(dict):
    """Decodes an image the first time a view needs it."""

    def __init__(self, samples: list, base: int) -> None:
        super().__init__()
        self.samples, self.base = samples, base

    def __missing__(self, row: int) -> Image.Image:
        self[row] = img = decode_rgb(self.samples[row - self.base].image)
        return img


@dataclass
class EpochSource:
    """Where one epoch's records and teacher targets come from."""

    epoch: int                  # training epoch (orders the data)
    view_seed: int = 0          # seed of records sampled on the fly (a cache holds its own)
    cache: Path | None = None   # None: sample records on the fly
    cache_epoch: int = 0        # cached epoch replayed (cycles when training outlasts the cache)
    teachers: tuple[str, ...] = ()


class StudentViews(IterableDataset):
    """Yields per-sample dicts: row, view, label, partner_label, lam, and per cached teacher its
    top-k logits / indices / lse. DataLoader workers split this rank's shards. ``seed`` orders
    the samples; the views come from ``source`` (the cache's records, or its ``view_seed``)."""

    def __init__(self, manifest: DataManifest, recipe: Recipe, seed: int, shards: list[int],
                 source: EpochSource, skip_samples: list[int] | None = None) -> None:
        self.manifest, self.recipe, self.seed = manifest, recipe, seed
        self.shards, self.source = shards, source
        self.skip_samples = skip_samples  # per DataLoader worker, for resuming mid-epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        skip = self.skip_samples[wid] if self.skip_samples else 0
        store = CacheStore.open(self.source.cache) if self.source.cache else None
        for shard in self.shards[wid::nw]:
            samples = read_shard(self.manifest, shard)  # sha256 on the same read
            base = self.manifest.shard_base(shard)
            rows = list(range(base, base + len(samples)))
            teacher_out: dict[str, tuple[np.ndarray, ...]] = {}
            if store is not None:
                block = self.source.cache_epoch // store.spec.epochs_per_unit
                record = store.unit_record(shard, block)
                if record is None:
                    raise CacheMismatchError(f"{self.source.cache}: unit (shard {shard}, block {block}) "
                                             "is not committed; run cache-teachers to finish it")
                recs, hashes, cached_labels, teacher_out = store.read_epoch(
                    shard, self.source.cache_epoch, record, list(self.source.teachers))
                check_alignment(self.source.cache, self.manifest, shard, samples, hashes, cached_labels)
            else:
                sizes = [image_size(s.image) for s in samples]
                recs = sample_shard_records(self.recipe, self.source.view_seed, self.source.epoch,
                                            shard, rows, sizes)
            images = _LazyImages(samples, base)
            records = dict(zip(rows, recs))
            labels = [s.label for s in samples]
            for pos in self._order(shard, recs, base):
                if skip > 0:
                    skip -= 1
                    continue
                row = base + pos
                rec = recs[pos]
                item = {"row": row, "view": apply_records(images, records, [row], self.recipe)[0],
                        "label": labels[pos], "partner_label": labels[int(rec[PARTNER]) - base],
                        "lam": float(rec[LAM]) / LAM_ONE}
                for name, (lg, idx, lse) in teacher_out.items():
                    item[f"t_{name}"] = (torch.from_numpy(lg[pos]), torch.from_numpy(idx[pos]),
                                         torch.tensor(lse[pos]))
                yield item

    def _order(self, shard: int, recs: np.ndarray, base: int) -> list[int]:
        """Keyed permutation of positions with each partner placed right after its row."""
        perm = _rng(self.seed, self.source.epoch, shard, _STREAM_ORDER).permutation(len(recs))
        seen, order = set(), []
        for pos in perm.tolist():
            for p in (pos, int(recs[pos, PARTNER]) - base):
                if p not in seen:
                    seen.add(p)
                    order.append(p)
        return order


class ValViews(IterableDataset):
    """Validation views (resize + centre crop) of a manifest's shards, split over workers."""

    def __init__(self, manifest: DataManifest, recipe: Recipe, shards: list[int]) -> None:
        self.manifest, self.recipe, self.shards = manifest, recipe, shards

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for shard in self.shards[wid::nw]:
            for s in read_shard(self.manifest, shard):
                yield eval_view(s.image, self.recipe), s.label


def worker_skips(skip_batches: int, batch_size: int, workers: int) -> list[int]:
    """Samples each DataLoader worker must skip so that the first ``skip_batches`` batches of
    an epoch are not produced again (the DataLoader takes batches from workers round-robin)."""
    w = max(workers, 1)
    return [batch_size * max(0, -(-(skip_batches - i) // w)) for i in range(w)]
