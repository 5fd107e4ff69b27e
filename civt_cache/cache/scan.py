"""One scan of a cache's units: what is committed, what lost a chunk file, who holds a lease,
what is missing. Stage one plans from it, stage two checks a cache with it before training, and
``inspect`` / ``verify --full`` report it, so all of them agree on what "complete" means.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from civt_cache.cache.commits import committed_components
from civt_cache.cache.leases import Lease, Leases
from civt_cache.cache.store import CacheStore


@dataclass
class UnitState:
    """One unit as found: its commit record (None: nothing committed, or unreadable), committed
    components whose chunk files are gone (-> why), and its lease when one is held."""

    shard: int
    block: int
    record: dict[str, Any] | None
    lost: dict[str, str] = field(default_factory=dict)
    lease: Lease | None = None

    @property
    def unit(self) -> tuple[int, int]:
        return self.shard, self.block

    def has(self, component: str) -> bool:
        """Committed and all its chunk files there (``views`` or a teacher's name)."""
        r = self.record
        if r is None or component in self.lost:
            return False
        return bool(r.get("views")) if component == "views" else component in r["teachers"]

    def complete(self, teachers: Iterable[str]) -> bool:
        return self.has("views") and all(self.has(t) for t in teachers)


@dataclass
class CacheScan:
    units: list[UnitState]
    unreadable: list[str]  # commit records that did not parse: their units count as not committed

    def incomplete(self, teachers: Iterable[str]) -> list[UnitState]:
        names = list(teachers)
        return [u for u in self.units if not u.complete(names)]

    def missing_lines(self, teachers: Iterable[str], limit: int = 20) -> list[str]:
        """One line per incomplete unit: what it lacks, and who holds it (lease owner, time left)."""
        names, now, out = list(teachers), time.time(), []
        for u in self.incomplete(names):
            line = (f"unit (shard {u.shard}, block {u.block}) lacks "
                    + ", ".join(c for c in ["views", *names] if not u.has(c)))
            if u.lease is not None:
                left = u.lease.expires - now
                line += (f"; leased by {u.lease.owner}, " + (f"{left:.0f} s left" if left > 0 else "expired"))
            out.append(line)
        return out[:limit] + ([f"... and {len(out) - limit} more"] if len(out) > limit else [])

    def lost(self) -> list[str]:
        return [f"unit (shard {u.shard}, block {u.block}) {c}: {why}" for u in self.units
                for c, why in u.lost.items()]


def scan_cache(store: CacheStore, units: Iterable[tuple[int, int]] | None = None,
               chunks: bool = True, leases: bool = False) -> CacheScan:
    """The commit record of each of ``units`` (default all, in canonical order), read at once
    (``Commits.all``: a listing and the index); with
    ``chunks`` every committed component's objects are looked up in one listing per array
    (zarr reads a missing object as fill values, so a lost one must be found before anything
    trusts the record); with ``leases`` the current lease of each unit not committed."""
    held = Leases(store.objects, owner="").all() if leases else {}
    records = store.commits.all()
    present = store.chunk_keys() if chunks else set()
    out = CacheScan([], [])
    for shard, block in (store.units() if units is None else units):
        rec = records.get((shard, block))
        lost = store.lost_chunks(shard, block, committed_components(rec), present) if chunks and rec else {}
        out.units.append(UnitState(shard, block, rec, lost, held.get((shard, block))))
        if (shard, block) in store.unreadable:
            out.unreadable.append(store.unreadable[(shard, block)])
    return out
