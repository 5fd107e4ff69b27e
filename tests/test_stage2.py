"""train-student from the cache (issue: stage two)."""
from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from civt_cache import CacheMismatchError, load_manifest
from civt_cache.loader.batches import EpochSource, StudentBatches, epoch_plan, shard_order, shards_plan, steps_per_epoch
from civt_cache.loader.soft_targets import mixed_targets, pseudo_logits
from civt_cache.models.civt import coadvise_student
from civt_cache.models.teachers import build_teacher, teacher_logits
from civt_cache.stages.cache_teachers import CacheJob, cache_teachers
from civt_cache.stages.train_student import StudentJob, train_student
from civt_cache.train.losses import LossWeights, coadvise_loss, kd_term
from civt_cache.views import records as V
from civt_cache.views.recipe import Recipe

from .conftest import run_cli, student_items

RECIPE = Recipe(img_size=32, crop_scale=(0.35, 1.0))


@pytest.fixture(scope="module")
def full_cache(digits, tmp_path_factory) -> tuple[Path, list[str]]:
    """Cache of the val split with k = number of classes (10), two random teachers."""
    d = tmp_path_factory.mktemp("s2")
    torch.manual_seed(1)
    torch.save(timm.create_model("resnet10t", num_classes=10).state_dict(), d / "conv.pth")
    torch.save(timm.create_model("rednet26", num_classes=10).state_dict(), d / "inv.pth")
    specs = [f"conv=resnet10t:{d / 'conv.pth'}", f"inv=rednet26:{d / 'inv.pth'}"]
    cache_teachers(CacheJob(digits["val"], specs, d / "cache", epochs=2, epochs_per_unit=2, topk=10,
                            recipe=RECIPE, workers=0))
    return d / "cache", specs


def student_job(digits, cache: Path, out: Path, **kw) -> StudentJob:
    base = dict(model="civt_micro", epochs=2, teachers="both", recipe=RECIPE, batch_size=32, lr=1e-3,
                warmup_epochs=0.5, workers=0, drop_path=0.1, device="cpu")
    return StudentJob(manifest=digits["val"], val_manifest=digits["val"], out=out, cache=cache,
                      **{**base, **kw})


def test_soft_targets_exact_at_full_k_and_mass_preserved() -> None:
    torch.manual_seed(0)
    full = torch.randn(4, 10) * 3
    lse = torch.logsumexp(full, 1)
    top = full.topk(10)
    torch.testing.assert_close(pseudo_logits(top.values - lse[:, None], top.indices, 10).softmax(1),
                               full.softmax(1))
    top3 = full.topk(3)
    p = pseudo_logits(top3.values - lse[:, None], top3.indices, 10).softmax(1)
    torch.testing.assert_close(p.gather(1, top3.indices), full.softmax(1).gather(1, top3.indices))
    torch.testing.assert_close(p.sum(1), torch.ones(4))
    r = pseudo_logits(top3.values - lse[:, None], top3.indices, 10, renormalize=True).softmax(1)
    assert (r > 0).sum(1).tolist() == [3] * 4


def test_cached_step_equals_online_step(digits, full_cache) -> None:
    cache, specs = full_cache
    m = load_manifest(digits["val"])
    items = student_items(StudentBatches(m, RECIPE, 0, shards_plan(m, [0], 24), EpochSource(1, 0, cache, 1, ("conv", "inv"))),
                          RECIPE)[:24]
    online_items = student_items(StudentBatches(m, RECIPE, 0, shards_plan(m, [0], 24), EpochSource(1)), RECIPE)[:24]  # re-sampled
    x = torch.stack([it["view"] for it in items])
    assert torch.equal(x, torch.stack([it["view"] for it in online_items]))
    torch.manual_seed(0)
    student = coadvise_student("civt_micro", num_classes=10, drop_path_rate=0.0)
    target = mixed_targets(torch.tensor([it["label"] for it in items]),
                           torch.tensor([it["partner_label"] for it in items]),
                           torch.tensor([it["lam"] for it in items]), 10, 0.1)
    heads = student(x)
    cached = {n: pseudo_logits(torch.stack([it[f"t_{n}"][0] for it in items]),
                               torch.stack([it[f"t_{n}"][1] for it in items]), 10) for n in ("conv", "inv")}
    live = {n: teacher_logits(build_teacher(s), x, RECIPE.mean, RECIPE.std, torch.device("cpu"))
            for n, s in zip(("conv", "inv"), specs)}
    loss_cached, _ = coadvise_loss(heads, target, cached, LossWeights())
    loss_online, _ = coadvise_loss(heads, target, live, LossWeights())
    # the cache stores log-probabilities as float16: agreement to ~1e-3 of the loss
    torch.testing.assert_close(loss_cached, loss_online, rtol=2e-3, atol=2e-3)


def test_a_teacher_with_its_own_normalisation_costs_no_transfer_per_batch() -> None:
    """Re-normalising views for a teacher trained with other mean/std gives the formula's
    numbers, and after the first batch sends nothing to the device but the views."""
    from civt_cache.bench.op_counts import count_ops
    from civt_cache.models.teachers import Teacher

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4)).eval()
    teacher = Teacher("t", "mlp", "-", "-", model, 4, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    x, cpu = torch.randn(2, 3, 8, 8), torch.device("cpu")
    mean, std = torch.tensor(RECIPE.mean).view(1, 3, 1, 1), torch.tensor(RECIPE.std).view(1, 3, 1, 1)
    want = model(((x * std + mean) - 0.5) / 0.25)
    assert torch.equal(teacher_logits(teacher, x, RECIPE.mean, RECIPE.std, cpu), want.detach())
    counts = count_ops(lambda: teacher_logits(teacher, x, RECIPE.mean, RECIPE.std, cpu))
    assert counts.transfers == 1 and counts.reads == 0, counts  # the views' own .to(device)


def test_schedule_is_the_official_cosine_over_all_steps() -> None:
    """co-advise's script (Swin's build_scheduler on timm 0.3's CosineLRScheduler) runs the
    cosine over every step, warmup included; the paper's run: 8 x 128, 300 epochs of 1,251
    steps, 20 warmup epochs, lr 5e-4 x 1024 / 512, min 1e-5, warmup from 1e-6."""
    from civt_cache.train.optim import optimizer_and_schedule

    per_epoch, base, low, start = 1251, 1e-3, 1e-5, 1e-6
    total, warmup = 300 * per_epoch, 20 * per_epoch

    def official(t: int) -> float:
        if t < warmup:
            return start + t * (base - start) / warmup
        return low + 0.5 * (base - low) * (1 + math.cos(math.pi * t / total))

    optimizer, schedule = optimizer_and_schedule(torch.nn.Linear(2, 2), "adamw", base, 0.05, total,
                                                 warmup, low)
    for epoch in (0, 0.5, 10, 19.9, 20, 50, 100, 200, 299, 300):
        t = int(epoch * per_epoch)
        schedule.step_update(t)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(official(t), rel=1e-9), epoch
    schedule.step_update(200 * per_epoch)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2.575e-4, rel=1e-3)  # not 3.52e-4


def test_ranks_get_disjoint_samples_and_equal_steps(digits) -> None:
    m = load_manifest(digits["train"])
    for epoch in range(3):
        plans = [epoch_plan(m, 0, epoch, r, 2, 64, 2) for r in range(2)]
        parts = [{(shard, i) for batch in p.batches for shard, a, b in batch for i in range(a, b)} for p in plans]
        assert not parts[0] & parts[1]
        assert len(parts[0] | parts[1]) > m.num_samples - 2 * 64
        assert plans[0].steps == plans[1].steps == steps_per_epoch(m, 2, 64) > 0
    assert shard_order(0, 0, 6) != shard_order(0, 1, 6)  # reshuffled per epoch


def test_mismatching_caches_refused(digits, full_cache, tmp_path) -> None:
    cache, specs = full_cache
    with pytest.raises(CacheMismatchError, match="views cached with seed 0, --view-seed 3"):
        train_student(student_job(digits, cache, tmp_path / "r", view_seed=3))
    with pytest.raises(CacheMismatchError, match="view recipe differs.*erase_prob"):
        train_student(student_job(digits, cache, tmp_path / "r", recipe=replace(RECIPE, erase_prob=0.0)))
    with pytest.raises(CacheMismatchError, match="data manifest: cache built for .digits-val.*asked for .digits-train"):
        train_student(replace(student_job(digits, cache, tmp_path / "r"), manifest=digits["train"]))
    other = tmp_path / "other.pth"
    torch.save(timm.create_model("resnet10t", num_classes=10).state_dict(), other)
    with pytest.raises(CacheMismatchError, match="teacher 'conv' was cached from"):
        train_student(student_job(digits, cache, tmp_path / "r", teacher=[f"conv=resnet10t:{other}"]))


def test_incomplete_cache_refused_with_what_to_run(digits, full_cache, tmp_path) -> None:
    cache, _ = full_cache
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(cache, partial)
    (partial / "progress" / "s000001-b0000.json").unlink()
    with pytest.raises(CacheMismatchError, match=r"epochs \[0, 1\] are not complete.*cache-teachers"):
        train_student(student_job(digits, partial, tmp_path / "r"))


def _metrics(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_train_cycles_cache_and_resume_after_kill_reproduces(digits, full_cache, tmp_path) -> None:
    cache, _ = full_cache
    ref = student_job(digits, cache, tmp_path / "ref", epochs=3, cycle_cache=True)
    res = train_student(ref)
    rows = _metrics(tmp_path / "ref")
    assert [r["cache_epoch"] for r in rows] == [0, 1, 0]  # 3 epochs on a 2-epoch cache
    assert set(res) >= {"val_top1", "val_top1_cls", "val_top1_conv", "val_top1_inv"}
    assert (tmp_path / "ref" / "curves.png").stat().st_size > 1000
    # killed mid-epoch (SIGKILL right after a step checkpoint), then resumed
    run = tmp_path / "killed"
    args = [sys.executable, "-m", "civt_cache.cli", "train-student", "--pipeline",
            str(Path(__file__).parent / "data" / "tiny.toml"), "--manifest", str(digits["val"]),
            "--val-manifest", str(digits["val"]), "--cache", str(cache), "--model", "civt_micro",
            "--epochs", "3", "--batch-size", "32", "--lr", "1e-3", "--workers", "0",
            "--device", "cpu", "--out", str(run), "--checkpoint-every", "5", "--cycle-cache"]
    proc = subprocess.Popen(args + ["--fresh"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = run / "last.pth.tar"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = torch.load(ckpt, weights_only=True)
    assert (state["epoch"], state["step"]) != (3, 0)  # really interrupted
    subprocess.run(args + ["--resume"], check=True, capture_output=True)
    got = _metrics(run)
    assert [r["epoch"] for r in got] == [0, 1, 2]
    for a, b in zip(rows, got):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert a["val_top1"] == pytest.approx(b["val_top1"])


def test_ddp_two_processes_on_cpu(digits, full_cache, tmp_path) -> None:
    cache, _ = full_cache
    run = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", "29533", "-m", "civt_cache.cli", "train-student",
                           "--pipeline", str(Path(__file__).parent / "data" / "tiny.toml"),
                           "--manifest", str(digits["val"]), "--val-manifest", str(digits["val"]),
                           "--cache", str(cache), "--model", "civt_micro", "--epochs", "1",
                           "--batch-size", "16", "--workers", "0", "--device", "cpu", "--out", str(run)],
                          capture_output=True, text=True)  # ranks inherit conftest's thread pin
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = _metrics(run)[0]
    m = load_manifest(digits["val"])
    assert row["steps"] == steps_per_epoch(m, 2, 16) > 0
    assert 0.0 <= row["val_top1"] <= 100.0
    state = torch.load(run / "last.pth.tar", weights_only=True)
    assert state["world_size"] == 2 and len(state["ranks"]) == 2  # each rank's own state
    assert not torch.equal(state["ranks"][0]["rng_cpu"], state["ranks"][1]["rng_cpu"])  # own seeds


def test_renormalized_targets_give_a_finite_loss_and_gradient() -> None:
    torch.manual_seed(0)
    full = torch.randn(6, 10) * 4
    top = full.topk(3)
    target = pseudo_logits(top.values - torch.logsumexp(full, 1)[:, None], top.indices, 10,
                           renormalize=True)
    assert torch.isinf(target).any()  # the classes outside the top-k get no mass
    student = torch.randn(6, 10, requires_grad=True)
    for t in (1.0, 3.0):
        loss = kd_term(student, target, t)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
        p = torch.softmax(target / t, 1)
        expected = (p * (torch.log(p.clamp_min(1e-30)) - torch.log_softmax(student / t, 1))).sum(1).mean() * t * t
        torch.testing.assert_close(loss, expected)
        student.grad = None


def test_more_epochs_than_cached_refused_without_cycle_cache(digits, full_cache, tmp_path) -> None:
    cache, _ = full_cache
    with pytest.raises(CacheMismatchError, match=r"holds 2 epoch\(s\) of views, training asks for 3.*--cycle-cache"):
        train_student(student_job(digits, cache, tmp_path / "r", epochs=3))
    proc = run_cli("train-student", "--manifest", str(digits["val"]), "--val-manifest", str(digits["val"]),
                   "--cache", str(cache), "--model", "civt_micro", "--epochs", "5",
                   "--pipeline", str(Path(__file__).parent / "data" / "tiny.toml"),
                   "--out", str(tmp_path / "cli"), check=False)
    assert proc.returncode == 2 and "training asks for 5" in proc.stderr
    assert not (tmp_path / "cli" / "last.pth.tar").exists()


def test_one_cache_serves_students_of_any_seed(digits, full_cache, tmp_path) -> None:
    """The views belong to the cache: students with other seeds replay the same views with the
    same targets, in another order, from another initialisation."""
    cache, _ = full_cache
    m = load_manifest(digits["val"])
    by_seed = {}
    for seed in (0, 7):
        items = student_items(StudentBatches(m, RECIPE, seed, shards_plan(m, [0], 16), EpochSource(1, 0, cache, 1, ("conv", "inv"))),
                              RECIPE)
        by_seed[seed] = items
    a, b = by_seed[0], by_seed[7]
    order_a, order_b = [it["row"] for it in a], [it["row"] for it in b]
    assert order_a != order_b and sorted(order_a) == sorted(order_b)
    lookup = {it["row"]: it for it in b}
    for it in a:
        other = lookup[it["row"]]
        assert torch.equal(it["view"], other["view"]) and it["label"] == other["label"]
        for name in ("t_conv", "t_inv"):
            assert all(torch.equal(x, y) for x, y in zip(it[name], other[name]))
    results = {}
    for seed in (0, 7):
        run = tmp_path / f"s{seed}"
        train_student(student_job(digits, cache, run, seed=seed, max_steps=2, epochs=2))
        results[seed] = torch.load(run / "last.pth.tar", weights_only=True)
    w0, w7 = (results[s]["state_dict"]["pos_embed"] for s in (0, 7))
    assert not torch.equal(w0, w7)
    assert results[7]["job"]["seed"] == 7


def test_benchmarks_measure_every_mode_side_by_side(digits, full_cache) -> None:
    """bench student/views run every mode of their comparison in one call (rates, not timings,
    are what they print; nothing here asserts a speed)."""
    from civt_cache.bench.student import format_student, measure_student
    from civt_cache.bench.views import format_views, measure_views

    cache, specs = full_cache
    r = measure_student(student_job(digits, cache, Path("unused"), batch_size=16), specs, steps=2)
    assert set(r["rates"]) == {"plain (no distillation)", "from cache (both teachers)",
                               "online (both teachers live)", "pre-built device batches (limit)",
                               "timm create_loader (plain)"}
    assert all(v > 0 for v in r["rates"].values())
    assert "x the limit" in format_student(r)
    v = measure_views(samples=6, img_size=48, batch=4, device="cpu", repeats=1, count_batches=(8,))
    assert set(v["rates"]) == {"PIL path per batch, 1 CPU core", "PIL path per row, 1 CPU core",
                               "engine, 1 CPU core"}
    assert "x the PIL path per batch" in format_views(v)


def test_cached_batches_for_ones_own_loop(digits, full_cache) -> None:
    """The public loader yields train-student's very batches (views, label targets, teacher
    targets) on the device; the public engine steps rebuild its views from the shard's bytes."""
    import civt_cache
    from civt_cache.data.shards import read_shard
    from civt_cache.loader.batches import batch_inputs

    cache, _ = full_cache
    m = load_manifest(digits["val"])
    loader = civt_cache.CachedBatches(digits["val"], cache, 32, epoch=1, seed=3, workers=0, device="cpu")
    assert loader.recipe == RECIPE and len(loader) == steps_per_epoch(m, 1, 32)
    got = list(loader)
    assert len(got) == len(loader)
    source = EpochSource(1, 0, cache, 1, ("conv", "inv"))
    data = StudentBatches(m, RECIPE, 3, epoch_plan(m, 3, 1, 0, 1, 32, 0), source)
    first = next(iter(data))
    x, y, t = batch_inputs(first, RECIPE, 10, 0.1, torch.device("cpu"))
    assert torch.equal(got[0][0], x) and torch.equal(got[0][1], y)
    assert t.keys() == got[0][2].keys() == {"conv", "inv"}
    assert all(torch.equal(t[n], got[0][2][n]) for n in t)
    # the engine's public steps: the shard's records, decode, render
    shard = m.locate(first.rows[0])[0]
    samples = read_shard(m, shard)
    start = first.rows[0] - m.locate(first.rows[0])[1]
    rows = list(range(start, start + len(samples)))
    images = [s.image for s in samples]
    recs = civt_cache.sample_records(RECIPE, 0, 1, shard, rows, [V.image_size(b) for b in images])
    mine = [i for i, r in enumerate(rows) if r in first.rows]
    assert np.array_equal(recs[mine], first.records[[first.rows.index(rows[i]) for i in mine]])
    outs = [i for i in mine if first.rows.index(rows[i]) < first.size]
    views = civt_cache.render_views(civt_cache.decode_images(images, torch.device("cpu")), recs, rows, RECIPE, outs)
    assert torch.equal(views, x[[first.rows.index(rows[i]) for i in outs]])


def test_prefetch_and_loss_reads_cannot_change_a_result(digits, full_cache, tmp_path) -> None:
    """Building the next batch ahead and reading the loss every step or every 20 give the very
    same weights and losses."""
    cache, _ = full_cache
    runs = {}
    for name, kw in (("ahead", dict(prefetch=True, log_every=20)), ("series", dict(prefetch=False, log_every=1))):
        train_student(student_job(digits, cache, tmp_path / name, epochs=1, **kw))
        runs[name] = (torch.load(tmp_path / name / "last.pth.tar", weights_only=True)["state_dict"], _metrics(tmp_path / name))
    (a, rows_a), (b, rows_b) = runs["ahead"], runs["series"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert rows_a[0]["train_loss"] == rows_b[0]["train_loss"]
