"""Stage one's writing side: a thread that writes each finished unit's chunks and commits it,
so the device never waits on the disk or the bucket, and a thread that keeps the leases of the
units being computed alive (``--claim``). Kept apart from the stage so the stage reads as its
pipeline: read, view, teach, hand over."""
from __future__ import annotations

import queue
import sys
import threading
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from civt_cache.cache.leases import Lease, Leases
from civt_cache.cache.store import CacheStore


class WrittenUnit(Protocol):
    """What the writer needs of a finished unit's last group (``loader.units.UnitGroup``)."""

    shard: int
    block: int
    prior: dict[str, Any] | None
    lease: Lease | None


class UnitWriter(threading.Thread):
    """Writes finished units and commits them; errors surface in the main thread. Under a lease
    a unit is written only while the lease is still ours, and the lease is let go after the
    commit."""

    def __init__(self, store: CacheStore, leases: Leases | None, renewer: LeaseRenewer) -> None:
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

    def _write(self, item: WrittenUnit, acc: dict[str, Any]) -> None:
        shard, block, lease = item.shard, item.block, item.lease
        if lease is not None and not (self.leases and self.leases.holds(lease)):
            tqdm.write(f"cache-teachers: unit (shard {shard}, block {block}): its lease was taken "
                       "over while this process stalled; leaving the unit to its new holder", file=sys.stderr)
            self.renewer.drop(lease)
            return
        prior = item.prior
        views, teachers = self._write_objects(item, acc)
        if self.committed == 0:
            self.store.check_still_made_for_me()
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

    def _write_objects(self, item: WrittenUnit, acc: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
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


class LeaseRenewer(threading.Thread):
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
