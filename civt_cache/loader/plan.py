"""Stage two's batch plan: which samples form step ``i`` of each rank in an epoch, made from the
manifest's sample counts alone, before any shard is read.

Why a plan: DDP ranks meet in a collective on every step, so every rank must run exactly the
same number of steps, whatever the shard sizes, the number of ranks and the number of loader
workers. Letting each loader worker cut its own shards into batches loses each worker's last
partial batch, so a rank yields fewer batches than counted, unevenly across ranks, and the
ranks wait on each other for ever at the end of an epoch. The plan makes the count a fact:

- the epoch's shard order is dealt to ranks round-robin; every rank runs ``steps`` =
  the smallest rank's samples // batch size (the rest of the larger ranks is dropped);
- a rank's step ``i`` is made by its loader worker ``i mod W``. Each worker owns the rank's
  shards ``w, w + W, ...`` and cuts them into whole batches for as many of its own steps as they
  fill: each shard's batches start at multiples of the batch size of its order, where its
  mixing blocks start (``loader.batches``), and the shards' tails are gathered into batches of
  their own between them; what is left of every worker (its last partial batch, or whole batches beyond its
  steps) is pooled, in worker order, and cut into the batches of the steps still unfilled. So a
  worker reads its own shards and, at most, the last shard or two of another worker: the reads
  stay about one per shard per epoch, and no sample is lost to a worker's remainder.

A batch is a tuple of segments ``(shard, start, stop)``: positions ``start..stop`` of the shard's
stage-two sample order (``loader.batches``; each sample's mixing partner follows it), so the plan
needs the counts only and the worker that reads the shard resolves the positions.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

#: (shard, start, stop): positions start..stop-1 of a shard's stage-two order.
Segment = tuple[int, int, int]
Batch = tuple[Segment, ...]


@dataclass(frozen=True)
class RankPlan:
    """One rank's epoch: ``batches[i]`` is step ``i`` (cheapest for the loader worker ``i mod W``
    of the W it was laid out for)."""

    batches: tuple[Batch, ...]

    @property
    def steps(self) -> int:
        return len(self.batches)


def epoch_steps(counts: Sequence[int], order: Sequence[int], world: int, batch_size: int) -> int:
    """Steps every rank runs in an epoch with this shard ``order``: the smallest rank's share,
    in whole batches."""
    return min(sum(counts[s] for s in order[r::world]) for r in range(world)) // batch_size


def rank_plan(counts: Sequence[int], order: Sequence[int], rank: int, world: int, batch_size: int,
              workers: int) -> RankPlan:
    """Rank ``rank``'s batches for an epoch whose shards come in ``order`` (``counts[s]``: shard
    ``s``'s samples), laid out for ``workers`` loader workers (0 counts as 1)."""
    w_count = max(1, workers)
    steps = epoch_steps(counts, order, world, batch_size)
    shards = list(order[rank::world])
    slots = [len(range(w, steps, w_count)) for w in range(w_count)]
    own: list[list[Batch]] = []
    pool: list[Segment] = []
    for w in range(w_count):
        stream = _aligned([(s, 0, counts[s]) for s in shards[w::w_count]], batch_size)
        total = sum(stop - start for _, start, stop in stream)
        whole = min(slots[w], total // batch_size)
        batches, rest = _cut(stream, whole, batch_size)
        own.append(batches)
        pool.extend(rest)
    pooled, _ = _cut(pool, steps - sum(len(b) for b in own), batch_size)
    owned, spare = [iter(b) for b in own], iter(pooled)
    return RankPlan(tuple(next(owned[i % w_count], None) or next(spare) for i in range(steps)))


def _aligned(stream: list[Segment], batch_size: int) -> list[Segment]:
    """The segments reordered so that each shard's whole batches come first, starting at its
    position 0, and its tail (the rest, under a batch) waits with the other tails until they
    fill whole batches, which come next; the last tails end the stream. Cut in order, every
    batch is then either ``batch_size`` consecutive positions of one shard or made of tails."""
    out: list[Segment] = []
    tails: list[Segment] = []
    for shard, start, stop in stream:
        cut = start + (stop - start) // batch_size * batch_size
        if cut > start:
            out.append((shard, start, cut))
        if stop > cut:
            tails.append((shard, cut, stop))
        held = sum(b - a for _, a, b in tails)
        need = held // batch_size * batch_size
        while need:
            t_shard, a, b = tails.pop(0)
            take = min(need, b - a)
            out.append((t_shard, a, a + take))
            if a + take < b:
                tails.insert(0, (t_shard, a + take, b))
            need -= take
    return out + tails


def _cut(stream: list[Segment], count: int, batch_size: int) -> tuple[list[Batch], list[Segment]]:
    """The first ``count`` batches of ``batch_size`` samples of a stream of segments, and the
    segments left after them."""
    batches: list[Batch] = []
    current: list[Segment] = []
    need = batch_size
    i = 0
    stream = list(stream)
    while len(batches) < count:
        shard, start, stop = stream[i]
        take = min(need, stop - start)
        current.append((shard, start, start + take))
        need -= take
        if start + take == stop:
            i += 1
        else:
            stream[i] = (shard, start + take, stop)
        if need == 0:
            batches.append(tuple(current))
            current, need = [], batch_size
    return batches, stream[i:]


def worker_steps(plan_steps: int, skip: int, worker: int, workers: int) -> range:
    """The steps loader worker ``worker`` of ``workers`` makes, in order, for an epoch resumed at
    step ``skip``: the DataLoader takes one item from each worker in turn, starting at worker 0,
    so step ``skip + j`` must come from worker ``j mod workers``."""
    return range(skip + worker, plan_steps, max(1, workers))
