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
from typing import Any, Iterator

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from civt_cache.cache.leases import Lease, Leases, claim_units, unit_needs
from civt_cache.cache.spec import check_alignment
from civt_cache.cache.store import CacheStore
from civt_cache.data.manifest import DataManifest
from civt_cache.data.shards import read_shard, sample_name
from civt_cache.distributed import DistInfo
from civt_cache.views.engine import EncodedImage, worker_image
from civt_cache.views.recipe import Recipe
from civt_cache.views.records import PAIR_GROUP, image_size, sample_shard_records


@dataclass
class GroupViews:
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


class UnitViews(IterableDataset):
    """Yields GroupViews for ``units`` (each still needing some of ``teachers``). Static split:
    each DataLoader worker takes every k-th unit, whose commit record is ``records[unit]``.
    With ``leases``: every worker walks all units from its own offset and claims each when it
    gets to it; ``info`` (this rank) spreads the offsets over all processes."""

    def __init__(self, manifest: DataManifest, store_root: Path, units: list[tuple[int, int]],
                 records: dict[tuple[int, int], dict[str, Any] | None], teachers: list[str], recipe: Recipe,
                 seed: int, epochs_per_unit: int, total_epochs: int, leases: Leases | None = None,
                 info: DistInfo | None = None) -> None:
        self.manifest, self.store_root, self.units = manifest, store_root, units
        self.records, self.teachers, self.recipe, self.seed = records, teachers, recipe, seed
        self.b, self.total_epochs, self.leases, self.info = epochs_per_unit, total_epochs, leases, info

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

    def __iter__(self) -> Iterator[GroupViews]:
        store = None
        for (shard, block), record, lease in self._todo():
            samples = read_shard(self.manifest, shard, verify=True)
            path = self.manifest.shard_path(shard)
            rows = [self.manifest.row_of(shard, i) for i in range(len(samples))]
            epochs = range(block * self.b, min((block + 1) * self.b, self.total_epochs))
            if record and record.get("views"):
                store = store or CacheStore.open(self.store_root)
                recs, hashes, stored_labels = store.read_unit_views(shard, block, record)
                check_alignment(self.store_root, self.manifest, shard, samples, hashes, stored_labels)
            else:
                sizes = [image_size(s.image, sample_name(path, s)) for s in samples]
                recs = np.stack([sample_shard_records(self.recipe, self.seed, e, shard, rows, sizes)
                                 for e in epochs])
            needs = unit_needs(record, self.teachers)
            num_groups = -(-len(samples) // PAIR_GROUP)
            for g in range(num_groups):
                part = slice(g * PAIR_GROUP, (g + 1) * PAIR_GROUP)
                names = [sample_name(path, s) for s in samples[part]]
                yield GroupViews(shard, block, g, num_groups, rows[part],
                                 [worker_image(s.image, n) for s, n in zip(samples[part], names)],
                                 names, recs[:, part], [s.key for s in samples[part]],
                                 np.array([s.label for s in samples[part]], np.int32),
                                 record, needs, lease)
