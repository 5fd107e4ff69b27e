"""Stage two's batch plan: which samples form step ``i`` of each rank in an epoch, made from the
manifest's sample counts alone, before any shard is read.

Why a plan: DDP ranks meet in a collective on every step, so every rank must run exactly the
same number of steps, whatever the shard sizes, the number of ranks and the number of loader
workers. Letting each loader worker cut its own shards into batches loses each worker's last
partial batch, so a rank yields fewer batches than counted, unevenly across ranks, and the
ranks wait on each other for ever at the end of an epoch. The plan makes the count a fact:

- the epoch's shards, in the epoch's order, make one stream of samples; every rank runs
  ``steps`` = the epoch's samples // (ranks x batch size) and takes the next ``steps`` x batch
  size samples of the stream, so ranks share samples, not whole shards: a shard on the border of
  two ranks' shares is split between them, and the epoch trains every sample but the stream's
  last ``samples mod (ranks x batch size)``, under one batch per rank (``epoch_coverage``);
- a rank's step ``i`` is made by its loader worker ``i mod W``. Each worker owns the rank's
  shard segments ``w, w + W, ...`` and cuts them into whole batches for as many of its own steps as they
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


def epoch_steps(counts: Sequence[int], world: int, batch_size: int) -> int:
    """Steps every rank runs in an epoch: the epoch's samples shared by the ranks, in whole
    batches."""
    return sum(counts) // (world * batch_size)


def epoch_coverage(counts: Sequence[int], world: int, batch_size: int) -> tuple[int, int]:
    """(samples trained, samples in the epoch): the stream's last ``samples mod (world x
    batch_size)`` samples, under one batch per rank, wait for the next epoch's order."""
    return epoch_steps(counts, world, batch_size) * world * batch_size, sum(counts)


def rank_segments(counts: Sequence[int], order: Sequence[int], rank: int, share: int) -> list[Segment]:
    """Rank ``rank``'s share of the stream of samples of the shards in ``order`` (an epoch's:
    all of them): the segments of the ``share`` (steps x batch size) samples from ``rank x
    share`` on."""
    low, high = rank * share, (rank + 1) * share
    segments: list[Segment] = []
    offset = 0
    for shard in order:
        start, stop = max(low, offset), min(high, offset + counts[shard])
        if start < stop:
            segments.append((shard, start - offset, stop - offset))
        offset += counts[shard]
        if offset >= high:
            break
    return segments


def rank_plan(counts: Sequence[int], order: Sequence[int], rank: int, world: int, batch_size: int,
              workers: int) -> RankPlan:
    """Rank ``rank``'s batches for an epoch whose shards come in ``order`` (``counts[s]``: shard
    ``s``'s samples), laid out for ``workers`` loader workers (0 counts as 1)."""
    w_count = max(1, workers)
    steps = epoch_steps([counts[s] for s in order], world, batch_size)
    segments = rank_segments(counts, order, rank, steps * batch_size)
    slots = [len(range(w, steps, w_count)) for w in range(w_count)]
    own: list[list[Batch]] = []
    pool: list[Segment] = []
    for w in range(w_count):
        stream = _aligned(segments[w::w_count], batch_size)
        total = sum(stop - start for _, start, stop in stream)
        whole = min(slots[w], total // batch_size)
        batches, rest = _cut(stream, whole, batch_size)
        own.append(batches)
        pool.extend(rest)
    pooled, _ = _cut(pool, steps - sum(len(b) for b in own), batch_size)
    owned, spare = [iter(b) for b in own], iter(pooled)
    return RankPlan(tuple(next(owned[i % w_count], None) or next(spare) for i in range(steps)))


def _aligned(stream: list[Segment], batch_size: int) -> list[Segment]:
    """The segments reordered so that each segment's whole batches come first, starting at
    multiples of ``batch_size`` of its shard's positions (where the mixing blocks start: a rank's
    share may begin mid-shard), and its head and tail (the positions before and after them, each
    under a batch) wait with the other pieces until they fill whole batches, which come next;
    the last pieces end the stream. Cut in order, every batch is then either ``batch_size``
    consecutive positions of one shard, from a multiple of ``batch_size``, or made of pieces."""
    out: list[Segment] = []
    tails: list[Segment] = []
    for shard, start, stop in stream:
        first = min(stop, -(-start // batch_size) * batch_size)
        cut = first + (stop - first) // batch_size * batch_size
        if first > start:
            tails.append((shard, start, first))
        if cut > first:
            out.append((shard, first, cut))
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
