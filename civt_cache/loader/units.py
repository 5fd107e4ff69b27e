"""Stage one's reader of units: a unit's shard (checksum verified on the same read), its view
records (sampled from the image headers, or read back checked when they are committed) and its
samples, handed over one pair group at a time as encoded bytes, so memory is bounded by a group.

Units come from a fixed list (a static split) or, with ``leases``, are claimed one at a time
when a worker is free for the next (``cache.leases.claim_units``): then the only writes are the
lease files; the cache's data is written by the stage.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from civt_cache.cache.leases import Lease, Leases, claim_units, unit_needs
from civt_cache.cache.spec import CacheSpec
from civt_cache.cache.store import CacheStore
from civt_cache.data.manifest import DataManifest
from civt_cache.data.shards import read_shard, sample_name
from civt_cache.distributed import DistInfo
from civt_cache.errors import CacheMismatchError
from civt_cache.processes import worker_init
from civt_cache.views.engine import EncodedImage, worker_image
from civt_cache.views.recipe import Recipe
from civt_cache.views.records import PAIR_GROUP, image_size, sample_shard_records


class ShardRead:
    """One shard of a manifest as every reader needs it (stage one's units, stage two's batches,
    validation, ``verify``): its samples, read whole with the sha256 checked on that read, their
    global rows and names (shard file + key, for errors), and on demand each sample's bytes for
    the device, the records sampled from the image headers, or the cached ones, checked to be
    this shard's (key hashes and labels)."""

    def __init__(self, manifest: DataManifest, shard: int) -> None:
        self.manifest, self.shard = manifest, shard
        self.samples = read_shard(manifest, shard, verify=True)
        self.path = manifest.shard_path(shard)
        self.base = manifest.shard_base(shard)
        self.rows = list(range(self.base, self.base + len(self.samples)))
        self.names = [sample_name(self.path, s) for s in self.samples]
        self.labels = np.array([s.label for s in self.samples], np.int64)

    def image(self, pos: int) -> EncodedImage:
        """What a loader worker hands over for sample ``pos`` (``views.engine.worker_image``)."""
        return worker_image(self.samples[pos].image, self.names[pos])

    def sampled_records(self, recipe: Recipe, seed: int, epochs: Iterable[int]) -> np.ndarray:
        """The records of these epochs for every row, [epochs, n, F], from the image headers."""
        sizes = [image_size(s.image, n) for s, n in zip(self.samples, self.names)]
        return np.stack([sample_shard_records(recipe, seed, e, self.shard, self.rows, sizes) for e in epochs])

    def cached_records(self, store: CacheStore, block: int, record: dict[str, Any]) -> np.ndarray:
        """A committed unit's records [epochs of the block, n, F], checked, of this very shard."""
        recs = store.read_unit_views(self.shard, block, record)[0]
        store.check_samples(self.shard, block, record, self.manifest, self.samples)
        return recs

    def cached_epoch(self, store: CacheStore, epoch: int, teachers: list[str]) -> tuple[
            np.ndarray, dict[str, tuple[np.ndarray, ...]]]:
        """One cached epoch of this shard, checked: records [n, F] and each teacher's targets."""
        block = epoch // store.spec.epochs_per_unit
        record = store.unit_record(self.shard, block)
        if record is None:
            raise CacheMismatchError(f"{store.root}: unit (shard {self.shard}, block {block}) is not "
                                     "committed; run cache-teachers to finish it")
        recs, out = store.read_epoch(self.shard, epoch, record, teachers)
        store.check_samples(self.shard, block, record, self.manifest, self.samples)
        return recs, out


@dataclass
class UnitGroup:
    """One pair group of one unit as a worker hands it over: encoded images, and the records of
    each of the unit's epochs for those rows (partners always inside the group), with what the
    unit still needs and the lease it is computed under."""

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
    prior: dict[str, Any] | None  # the unit's commit record when it was read (None: nothing)
    needs: list[str]            # teachers still to run on it
    lease: Lease | None         # held while it is computed (--claim), else None

    @property
    def new_views(self) -> bool:
        """The records were sampled now (not read back from the cache)."""
        return not (self.prior and self.prior.get("views"))


class UnitReader(IterableDataset):
    """Yields UnitGroup for ``units`` (each still needing some of ``teachers``). Static split:
    each DataLoader worker takes every k-th unit, whose commit record is ``records[unit]``.
    With ``leases``: every worker walks all units from its own offset and claims each when it
    gets to it; ``info`` (this rank) spreads the offsets over all processes."""

    def __init__(self, manifest: DataManifest, store_root: Path | str, units: list[tuple[int, int]],
                 records: dict[tuple[int, int], dict[str, Any] | None], teachers: list[str], spec: CacheSpec,
                 leases: Leases | None = None, info: DistInfo | None = None) -> None:
        self.manifest, self.store_root, self.units = manifest, store_root, units
        self.records, self.teachers, self.spec = records, teachers, spec
        self.leases, self.info = leases, info

    def _todo(self) -> Iterator[tuple[tuple[int, int], dict[str, Any] | None, Lease | None]]:
        worker = get_worker_info()
        w, nw = (worker.id, worker.num_workers) if worker else (0, 1)
        if self.leases is None:
            for unit in self.units[w::nw]:
                yield unit, self.records.get(unit), None
            return
        rank, world = (self.info.rank, self.info.world_size) if self.info else (0, 1)
        start = (rank * nw + w) * len(self.units) // (world * nw)
        order = self.units[start:] + self.units[:start]
        yield from claim_units(CacheStore.open(self.store_root), self.leases, order, self.teachers)

    def loader(self, workers: int, pin_memory: bool = False) -> DataLoader:
        """A DataLoader over this reader: whole groups as they come (no collation), from workers
        that end with this process (``processes.worker_init``)."""
        return DataLoader(self, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                          worker_init_fn=worker_init() if workers else None)

    def __iter__(self) -> Iterator[UnitGroup]:
        store = None
        for (shard, block), record, lease in self._todo():
            shard_read = ShardRead(self.manifest, shard)
            if record and record.get("views"):
                store = store or CacheStore.open(self.store_root)
                recs = shard_read.cached_records(store, block, record)
            else:
                recs = shard_read.sampled_records(self.spec.recipe, self.spec.seed, self.spec.block_epochs(block))
            needs = unit_needs(record, self.teachers)
            n = len(shard_read.samples)
            num_groups = -(-n // PAIR_GROUP)
            for g in range(num_groups):
                part = range(g * PAIR_GROUP, min((g + 1) * PAIR_GROUP, n))
                yield UnitGroup(shard, block, g, num_groups, shard_read.rows[part.start:part.stop],
                                 [shard_read.image(i) for i in part], shard_read.names[part.start:part.stop],
                                 recs[:, part.start:part.stop],
                                 [shard_read.samples[i].key for i in part],
                                 shard_read.labels[part.start:part.stop].astype(np.int32), record, needs, lease)
