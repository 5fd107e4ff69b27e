"""The batch plan of stage two: every rank the same steps, for any shard sizes, ranks and
loader workers, each sample at most once, every sample but under a batch per rank each epoch,
and reads close to one per shard."""
from __future__ import annotations

import random

import numpy as np
import pytest

from civt_cache.loader.batches import (
    EpochSource,
    StudentBatches,
    batch_loader,
    planned_steps,
    shard_order,
    shards_plan,
)
from civt_cache.loader.plan import epoch_coverage, epoch_steps, rank_plan, worker_steps
from civt_cache.data.manifest import load_manifest
from civt_cache.errors import RankError
from civt_cache.views.recipe import Recipe

#: ImageNet-1k's training set in the pipeline's shards: 1,024 of 1,250 and one of 1,167.
IMAGENET_COUNTS = [1250] * 1024 + [1167]


def _check_rank(counts: list[int], order: list[int], rank: int, world: int, batch: int,
                workers: int, seen: set[tuple[int, int]]) -> int:
    """Check one rank's plan, adding its samples to ``seen`` (no sample twice across ranks);
    return its shard reads (a worker opening a shard counts one)."""
    plan = rank_plan(counts, order, rank, world, batch, workers)
    assert plan.steps == epoch_steps(counts, world, batch)
    for b in plan.batches:
        assert sum(stop - start for _, start, stop in b) == batch
        for shard, start, stop in b:
            assert 0 <= start < stop <= counts[shard]
            span = {(shard, i) for i in range(start, stop)}
            assert not span & seen
            seen |= span
    reads = 0
    for w in range(max(1, workers)):
        reads += len({s for step in worker_steps(plan.steps, 0, w, workers) for s, _, _ in plan.batches[step]})
    return reads


def _check_epoch(counts: list[int], order: list[int], world: int, batch: int, workers: int) -> int:
    """Every rank of an epoch: together they train every sample but under one batch per rank
    (the stream's last), each once; returns the epoch's shard reads."""
    seen: set[tuple[int, int]] = set()
    reads = sum(_check_rank(counts, order, r, world, batch, workers, seen) for r in range(world))
    trained, total = epoch_coverage(counts, world, batch)
    assert len(seen) == trained and total - trained < world * batch
    return reads


def test_uneven_shards_any_ranks_and_workers_give_every_rank_the_same_steps_and_every_sample() -> None:
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 40)
        counts = [rng.randint(1, 300) for _ in range(n)]
        world, workers, batch = rng.randint(1, 16), rng.randint(0, 8), rng.randint(1, 200)
        order = rng.sample(range(n), n)
        if sum(counts) >= world * batch:
            _check_epoch(counts, order, world, batch, workers)


@pytest.mark.parametrize("ranks,shards,batch", [(2, 5, 16), (64, 1000, 128), (8, 1025, 128), (3, 7, 50)])
def test_no_rank_count_drops_whole_shards(ranks, shards, batch) -> None:
    """Shares of whole shards dropped a rank count's remainder of every epoch (2 ranks on 5
    shards of 240 trained 896 of 1,200 samples at batch 16; 64 ranks on 1,000 equal shards 4%):
    shared samples lose under one batch per rank."""
    counts = [240 if shards == 5 else 1250] * shards
    trained, total = epoch_coverage(counts, ranks, batch)
    assert total - trained < ranks * batch
    reads = _check_epoch(counts, list(range(shards)), ranks, batch, 1) if total < 20_000 else None
    assert reads is None or reads <= shards + ranks


@pytest.mark.parametrize("ranks,workers", [(8, 8), (16, 8), (32, 8)])
def test_imagenet_numbers_give_equal_steps_on_every_rank_in_all_300_epochs(ranks, workers) -> None:
    """The paper's job: 1,281,167 samples, shards of 1,250, batch 128 per rank. The steps are
    counted from each rank's plan; the DataLoader's turn order over the workers covers each
    planned step once; reads stay within two extra shards per worker of one per shard."""
    counts = IMAGENET_COUNTS
    for epoch in range(300):
        order = shard_order(0, epoch, len(counts))
        steps = set()
        for rank in range(ranks):
            plan = rank_plan(counts, order, rank, ranks, 128, workers)
            steps.add(plan.steps)
            made = sorted(s for w in range(workers) for s in worker_steps(plan.steps, 0, w, workers))
            assert made == list(range(plan.steps))
        assert len(steps) == 1, (epoch, steps)
    reads = _check_epoch(counts, order, ranks, 128, workers)
    assert len(counts) <= reads <= len(counts) + 2 * ranks * workers + ranks


def test_a_resumed_epoch_gives_the_remaining_steps_in_order_for_any_worker_count() -> None:
    for steps, skip in [(10, 0), (10, 3), (7, 7), (13, 12)]:
        for workers in range(0, 6):
            got = sorted(s for w in range(max(1, workers)) for s in worker_steps(steps, skip, w, workers))
            assert got == list(range(skip, steps))


@pytest.mark.parametrize("workers,batch", [(2, 17), (3, 40), (3, 64)])
def test_the_dataloader_yields_exactly_the_plan_with_uneven_shards(digits, workers, batch) -> None:
    """The val split's shards hold 256 and 103 samples: real DataLoader workers, batch sizes
    that leave a remainder per worker, and the plan's steps come out in order, whole."""
    m = load_manifest(digits["val"])
    assert len({s.num_samples for s in m.shards}) > 1
    recipe = Recipe(img_size=16)
    plan = shards_plan(m, [1, 0], batch, workers)
    assert plan.steps == m.num_samples // batch
    direct = [b.rows[:b.size] for b in StudentBatches(m, recipe, 0, plan, EpochSource(0))]
    data = StudentBatches(m, recipe, 0, plan, EpochSource(0), skip=1)
    got = [b.rows[:b.size] for _, b in planned_steps(batch_loader(data, workers), data, 0)]
    assert got == direct[1:] and len(direct) == plan.steps
    rows = np.concatenate(direct)
    assert len(set(rows.tolist())) == len(rows) == plan.steps * batch


def test_a_loader_that_runs_short_is_an_error_naming_the_rank_not_a_shorter_epoch(digits) -> None:
    m = load_manifest(digits["val"])
    plan = shards_plan(m, [0, 1], 32)
    data = StudentBatches(m, Recipe(img_size=16), 0, plan, EpochSource(0))
    short = list(data)[:5]
    with pytest.raises(RankError, match=rf"rank 1 of 2: its loader gave 5 batch\(es\) in epoch 3 "
                                        rf"where the plan has {plan.steps}"):
        list(planned_steps(short, data, 2, rank=1, world=2))
