"""Leases on a cache's units: which process computes a unit now, and until when.

``cache-teachers --claim`` lets any number of processes (torchrun ranks on several nodes, a SLURM
array, pods started apart) fill one cache: each takes the next free unit when it is ready for
one. A unit is taken with a lease, one small JSON file ``leases/sSSSSSS-bBBBB.gGGGG.json``
(owner, expiry) created only if that name does not exist yet; the holder renews the expiry while
it computes the unit and deletes the lease after the unit's commit record is written. A lease
that has expired, or whose owner is a process of this host that no longer runs, is taken over
by anyone by creating the next generation's file, so exactly one process wins a takeover and a
crashed node's units are finished by the others or by any rerun.

Only two operations are needed from the storage (``cache.objects``), an exclusive create and a
plain overwrite of one's own object: no rename of a shared name, no lock (in a bucket the
exclusive create is a conditional PUT, ``If-None-Match: *``). A holder whose lease was taken over while it stalled
finds that out when it renews or before it writes, and leaves the unit to the new holder.
"""
from __future__ import annotations

import json
import math
import os
import re
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from civt_cache.cache.objects import CacheRoot
from civt_cache.cache.store import CacheStore

#: Seconds a lease lasts unless renewed; holders renew it every third of that.
LEASE_SECONDS = 300.0
_NAME = re.compile(r"^leases/s(\d{6})-b(\d{4})\.g(\d{4,})\.json$")


def this_process() -> str:
    """A lease owner: host and process id (a DataLoader worker claims for its main process)."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class Lease:
    """Generation ``generation`` of the lease on unit (shard, block): held by ``owner`` until
    ``expires`` (seconds since the epoch)."""

    shard: int
    block: int
    generation: int
    owner: str
    expires: float

    def takeable(self, now: float) -> bool:
        """Expired, or held by a process of this host that has ended (a rerun after a crash
        need not wait out the lease)."""
        if now >= self.expires:
            return True
        host, _, pid = self.owner.rpartition(":")
        if host != socket.gethostname() or not pid.isdigit():
            return False
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False


class Leases:
    """The leases of the cache at ``root``, as seen and taken by ``owner``."""

    def __init__(self, root: CacheRoot | str | Path, owner: str, seconds: float = LEASE_SECONDS) -> None:
        self.objects = root if isinstance(root, CacheRoot) else CacheRoot(root)
        self.owner, self.seconds = owner, seconds

    @staticmethod
    def _key(shard: int, block: int, generation: int) -> str:
        return f"leases/s{shard:06d}-b{block:04d}.g{generation:04d}.json"

    def _read(self, key: str) -> Lease | None:
        """The lease in ``key`` (a name ``_NAME`` matches); None when it was released meanwhile.
        An object that does not parse (or whose ``expires`` is not a finite time) blocks its unit
        for one lease from when it was first seen, then is taken over."""
        m = _NAME.match(key)
        assert m is not None, key
        shard, block, generation = (int(g) for g in m.groups())
        data = self.objects.read(key)
        if data is None:
            return None
        try:
            parsed = json.loads(data)
            expires = float(parsed["expires"])
            if not math.isfinite(expires):  # NaN would never expire (NaN >= now is False): unreadable
                raise ValueError(f"expires {expires}")
            return Lease(shard, block, generation, str(parsed["owner"]), expires)
        except (ValueError, KeyError, TypeError):
            first = _unreadable_since.setdefault((str(self.objects), key), time.time())
            return Lease(shard, block, generation, "unreadable", first + self.seconds)

    def _keys(self, prefix: str = "") -> list[str]:
        """Lease keys starting with ``leases/`` + ``prefix``, by (shard, block, generation): a
        unit's newest generation last (by number: ``g10000`` after ``g9999``)."""
        keys = [k for k in self.objects.listing("leases") if k.startswith(f"leases/{prefix}") and _NAME.match(k)]
        return sorted(keys, key=lambda k: tuple(int(g) for g in _NAME.match(k).groups()))

    def all(self) -> dict[tuple[int, int], Lease]:
        """The current (newest generation) lease of every leased unit: one listing."""
        out: dict[tuple[int, int], Lease] = {}
        for key in self._keys():
            if (lease := self._read(key)) is not None:
                out[(lease.shard, lease.block)] = lease
        return out

    def current(self, shard: int, block: int) -> Lease | None:
        """The unit's newest lease, or None when nobody holds or held it."""
        for key in reversed(self._keys(f"s{shard:06d}-b{block:04d}.")):
            if (lease := self._read(key)) is not None:
                return lease
        return None

    def acquire(self, shard: int, block: int) -> Lease | None:
        """Take the unit: a new lease when it has none, or the next generation over a takeable
        one; None when another process holds it (or won the race for it)."""
        now = time.time()
        cur = self.current(shard, block)
        if cur is not None and not cur.takeable(now):
            return None
        lease = Lease(shard, block, cur.generation + 1 if cur else 0, self.owner, now + self.seconds)
        return lease if self.objects.create(self._key(shard, block, lease.generation), self._body(lease)) else None

    @staticmethod
    def _body(lease: Lease) -> bytes:
        return json.dumps({"owner": lease.owner, "expires": lease.expires}).encode()

    def holds(self, lease: Lease) -> bool:
        """Whether ``lease`` is still its unit's newest, ours, and not taken over."""
        cur = self.current(lease.shard, lease.block)
        return cur is not None and (cur.generation, cur.owner) == (lease.generation, lease.owner)

    def renew(self, lease: Lease) -> Lease | None:
        """Push the expiry ``seconds`` ahead; None when the lease was lost to another process."""
        if not self.holds(lease):
            return None
        renewed = Lease(**{**asdict(lease), "expires": time.time() + self.seconds})
        self.objects.write(self._key(lease.shard, lease.block, lease.generation), self._body(renewed))
        return renewed

    def release(self, lease: Lease) -> None:
        """Delete the unit's lease objects up to ours (after its commit, or when giving it up)."""
        for g in range(lease.generation, -1, -1):
            self.objects.delete(self._key(lease.shard, lease.block, g))


#: When this process first saw each unparseable lease object (a stamp no storage needs to give).
_unreadable_since: dict[tuple[str, str], float] = {}


def unit_needs(record: dict[str, Any] | None, teachers: Sequence[str]) -> list[str]:
    """The teachers a unit still needs given its commit record: all of them until its views
    are committed (every teacher's targets rest on them), else those not committed yet."""
    if not record or not record.get("views"):
        return list(teachers)
    return [t for t in teachers if t not in record["teachers"]]


def claim_units(store: CacheStore, leases: Leases, candidates: Sequence[tuple[int, int]],
                teachers: Sequence[str]) -> Iterator[tuple[tuple[int, int], dict[str, Any] | None, Lease]]:
    """The units of ``candidates`` that still need work and are free, each under a lease taken
    only when the caller asks for the next one (so a process takes a unit when it is ready to
    compute it), with the unit's commit record read after the lease was taken. Units other
    processes hold are passed over; the caller waits for them (``cache-teachers`` does, until
    each is committed or its lease can be taken over)."""
    for unit in candidates:
        if not unit_needs(store.unit_record(*unit), teachers):
            continue
        lease = leases.acquire(*unit)
        if lease is None:
            continue
        record = store.unit_record(*unit)  # committed between the look and the lease?
        if not unit_needs(record, teachers):
            leases.release(lease)
            continue
        yield unit, record, lease
