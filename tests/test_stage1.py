"""cache-teachers, the cache, inspect and verify (issue: stage one)."""
from __future__ import annotations

import json
import os
import shutil
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
import zarr

from civt_cache import CacheMismatchError, ManifestError, load_manifest
from civt_cache.cache.layout import unpack_targets
from civt_cache.cache.store import CacheStore
from civt_cache.data.shards import read_shard
from civt_cache.loader.batches import EpochSource, StudentBatches, shards_plan
from civt_cache.loader.units import UnitReader
from civt_cache.stages.cache_teachers import CacheJob, cache_teachers
from civt_cache.stages.verify import inspect_cache, verify_cache
from civt_cache.views.engine import decode_images, render_views
from civt_cache.views.recipe import Recipe
from civt_cache.views.records import PAIR_GROUP, PARTNER, pair_rows, sample_record, sample_shard_records

from .conftest import run_cli, student_items

RECIPE = Recipe(img_size=32, crop_scale=(0.35, 1.0))


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, str]:
    """Small random-weight teachers (a conv net and RedNet-26) saved as checkpoints."""
    d = tmp_path_factory.mktemp("teachers")
    torch.manual_seed(0)
    torch.save(timm.create_model("resnet10t", num_classes=10).state_dict(), d / "conv.pth")
    torch.save({"state_dict": timm.create_model("rednet26", num_classes=10).state_dict()}, d / "inv.pth")
    return {"conv": f"conv=resnet10t:{d / 'conv.pth'}", "inv": f"inv=rednet26:{d / 'inv.pth'}"}


def job(manifest: Path, out: Path, teacher_specs: list[str], **kw) -> CacheJob:
    base = dict(epochs=2, epochs_per_unit=1, topk=5, recipe=RECIPE, workers=0, batch_size=64)
    return CacheJob(manifest=manifest, teachers=teacher_specs, out=out, **{**base, **kw})


def arrays(root: Path) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(root), mode="r")
    return {name: a[...] for name, a in g.members(max_depth=None) if isinstance(a, zarr.Array)}


@pytest.fixture(scope="module")
def reference(digits, teachers, tmp_path_factory) -> Path:
    """An uninterrupted single-process cache of the val split (2 shards), both teachers."""
    out = tmp_path_factory.mktemp("ref") / "cache"
    cache_teachers(job(digits["val"], out, [teachers["conv"], teachers["inv"]]))
    return out


def test_records_independent_of_order_and_grouping() -> None:
    rows = list(range(100, 140))
    sizes = [(30 + r % 7, 28 + r % 5) for r in rows]
    a = sample_shard_records(RECIPE, 7, 3, 1, rows, sizes)
    single = np.stack([sample_record(RECIPE, 7, 3, r, *s) for r, s in zip(rows, sizes)])
    assert np.array_equal(a[:, :18], single[:, :18])  # everything but the partner assignment
    b = sample_shard_records(RECIPE, 7, 3, 1, rows, sizes)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, sample_shard_records(RECIPE, 8, 3, 1, rows, sizes))


def test_cache_contents_inspect_and_verify(reference, digits, teachers) -> None:
    a = arrays(reference)
    m = load_manifest(digits["val"])
    assert a["teachers/conv/targets"].shape == (2, m.num_rows, 2 * 5 + 1)  # log-probs, indices, lse
    n0 = m.shards[0].num_samples
    logprobs, indices, lse = unpack_targets(a["teachers/conv/targets"][:, :n0])
    assert (np.diff(logprobs, axis=2) <= 0).all()  # top-k descending
    assert np.array_equal(logprobs, logprobs.astype(np.float16).astype(np.float32))  # float16 values
    assert ((indices >= 0) & (indices < m.num_classes)).all() and (indices.min(2) != indices.max(2)).all()
    assert (logprobs <= 0).all() and np.isfinite(lse).all()
    samples = a["views/samples"][0, :n0]
    assert samples[:, 1].tolist() == [s.label for s in read_shard(m, 0)]
    report = inspect_cache(reference)
    assert "units: 4 in all; views committed in 4; conv in 4, inv in 4" in report
    bpv = float(report.split("bytes per view: ")[1].split()[0])
    assert bpv < 100
    checked = verify_cache(reference, digits["val"], [teachers["conv"], teachers["inv"]], 6, 0, "cpu")
    assert checked.ok, checked.report
    for name, loss in checked.targets.summary().items():  # top-5 of 10: a real cut
        assert loss["views"] == 6 and 0 < loss["kl_mean"] <= loss["kl_p99"], (name, loss)
        assert 0 < loss["tail_mean"] <= loss["tail_p99"] < 1, (name, loss)
    assert "stored top-5 of 10 against each teacher's full softmax" in checked.report


def _stage_one_views(m, root: Path, committed: dict) -> tuple:
    """The first group stage one hands over for unit (1, 1) and the views it builds of it."""
    group = next(iter(UnitReader(m, root, [(1, 1)], committed, [], CacheStore.open(root).spec)))
    images = decode_images(group.images, torch.device("cpu"), group.names)
    return group, render_views(images, group.records[0], group.rows, RECIPE)


def test_stage_two_rebuilds_the_same_view_tensors(reference, digits) -> None:
    m = load_manifest(digits["val"])
    committed = {(1, 1): CacheStore.open(reference).unit_record(1, 1)}
    group, views = _stage_one_views(m, reference, committed)
    assert group.num_groups == 1 and len(group.rows) == m.shards[1].num_samples
    fresh, fresh_views = _stage_one_views(m, reference, {})  # records re-sampled
    assert np.array_equal(fresh.records, group.records)
    assert torch.equal(fresh_views, views)
    # stage two yields in its own (keyed) order, in batches of 7 that cut pairs: match by row
    ds = StudentBatches(m, RECIPE, 0, shards_plan(m, [1], 7), EpochSource(1, 0, reference, 1, ("conv",)))
    items = student_items(ds, RECIPE)
    assert len(items) == 7 * (len(group.rows) // 7)
    position = {r: i for i, r in enumerate(group.rows)}
    for it in items:
        assert torch.equal(it["view"], views[position[it["row"]]])  # bit for bit


def test_views_built_in_cpu_workers_are_the_same(reference, digits) -> None:
    """CPU training lets the loader workers run the engine: same views as the main process's."""
    from civt_cache.loader.batches import batch_loader, batch_views

    m = load_manifest(digits["val"])
    source = EpochSource(1, 0, reference, 1, ("conv",))
    plan = shards_plan(m, [0, 1], 16, workers=2)
    main = list(StudentBatches(m, RECIPE, 0, plan, source))
    workers = list(batch_loader(StudentBatches(m, RECIPE, 0, plan, source, views_in_workers=True), 2))
    assert len(workers) == len(main) == plan.steps
    for b, w in zip(main, workers):  # the plan's order, whichever process made them
        assert w.rows == b.rows
        assert w.images == [] and torch.equal(w.views, batch_views(b, RECIPE, torch.device("cpu")))


def test_a_batch_never_splits_a_pair(reference, digits) -> None:
    m = load_manifest(digits["val"])
    for size in (7, 16, 33):
        ds = StudentBatches(m, RECIPE, 3, shards_plan(m, [0, 1], size), EpochSource(1, 0, reference, 1, ("conv",)))
        for batch in ds:
            at = {r: i for i, r in enumerate(batch.rows)}
            partners = batch.records[:batch.size, PARTNER].tolist()
            assert set(partners) <= set(batch.rows)
            # extra base views: only the pairs cut by the batch's two ends, and the partner of
            # an odd one out of a pair group (whose partner is paired with another row)
            odd = sum(batch.records[at[p], PARTNER] != r for r, p in zip(batch.rows, partners))
            assert len(batch.rows) - batch.size <= 2 + odd


def test_pairs_stay_inside_their_group() -> None:
    rows = list(range(1000, 1000 + 2 * PAIR_GROUP + 37))
    partners = pair_rows(5, 2, 3, rows)
    assert set(partners) == set(rows)
    for r, p in partners.items():
        assert (r - 1000) // PAIR_GROUP == (p - 1000) // PAIR_GROUP
    assert pair_rows(5, 3, 3, rows) != partners  # re-drawn every epoch


def test_worker_count_and_rerun(reference, digits, teachers, tmp_path) -> None:
    out = tmp_path / "c"
    cache_teachers(job(digits["val"], out, [teachers["conv"], teachers["inv"]], workers=2))
    ref, got = arrays(reference), arrays(out)
    assert ref.keys() == got.keys()
    for k in ref:
        assert np.array_equal(ref[k], got[k]), k
    before = {p: p.stat().st_mtime_ns for p in (out / "progress").iterdir()}
    summary = cache_teachers(job(digits["val"], out, [teachers["conv"], teachers["inv"]]))
    assert summary["units"] == 0  # finished cache: nothing to do
    assert before == {p: p.stat().st_mtime_ns for p in (out / "progress").iterdir()}


def test_mismatching_rerun_refused(reference, digits, teachers, tmp_path) -> None:
    for change, needle in [(dict(seed=1), "seed: cache has 0, asked 1"),
                           (dict(recipe=replace(RECIPE, erase_prob=0.5)), "erase_prob: 0.25 -> 0.5"),
                           (dict(topk=3), "topk")]:
        with pytest.raises(CacheMismatchError, match=needle):
            cache_teachers(job(digits["val"], reference, [teachers["conv"]], **change))
    with pytest.raises(CacheMismatchError, match="data manifest"):
        cache_teachers(job(digits["train"], reference, [teachers["conv"]]))
    other = tmp_path / "o.pth"
    torch.manual_seed(5)
    torch.save(timm.create_model("resnet10t", num_classes=10).state_dict(), other)
    with pytest.raises(CacheMismatchError, match="teacher 'conv'.*checkpoint_sha256"):
        cache_teachers(job(digits["val"], reference, [f"conv=resnet10t:{other}"]))


def test_adding_a_teacher_later(reference, digits, teachers, tmp_path) -> None:
    out = tmp_path / "c"
    cache_teachers(job(digits["val"], out, [teachers["conv"]]))
    views_before = arrays(out)["views/params"].copy()
    summary = cache_teachers(job(digits["val"], out, [teachers["conv"], teachers["inv"]]))
    assert summary["units"] == 4
    got, ref = arrays(out), arrays(reference)
    assert np.array_equal(got["views/params"], views_before)
    for k in ref:
        assert np.array_equal(ref[k], got[k]), k


def test_corrupt_shard_refused_and_committed_units_intact(reference, digits, teachers, tmp_path) -> None:
    m = load_manifest(digits["val"])
    data = tmp_path / "data"
    shutil.copytree(m.shard_path(0).parent, data)
    raw = json.loads(digits["val"].read_text())
    for s in raw["shards"]:
        s["path"] = str(data / Path(s["path"]).name)
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps(raw))
    out = tmp_path / "c"
    cache_teachers(job(manifest, out, [teachers["conv"]], epochs=1))
    committed = {p.name: p.read_bytes() for p in (out / "progress").iterdir()}
    shard1 = data / Path(raw["shards"][1]["path"]).name
    blob = bytearray(shard1.read_bytes())
    blob[5000] ^= 0xFF
    shard1.write_bytes(bytes(blob))
    shutil.rmtree(out / "progress")  # force a redo of every unit
    (out / "progress").mkdir()
    (out / "progress" / "s000000-b0000.json").write_bytes(committed["s000000-b0000.json"])
    with pytest.raises(ManifestError, match=shard1.name + ".*sha256"):
        cache_teachers(job(manifest, out, [teachers["conv"]], epochs=1))
    assert (out / "progress" / "s000000-b0000.json").read_bytes() == committed["s000000-b0000.json"]
    assert not (out / "progress" / "s000001-b0000.json").exists()


def _cli_job_args(manifest: Path, out: Path, teachers: dict[str, str]) -> list[str]:
    return ["cache-teachers", "--manifest", str(manifest), "--teacher", teachers["conv"],
            "--teacher", teachers["inv"], "--epochs", "2", "--epochs-per-unit", "1", "--topk", "5",
            "--pipeline", str(Path(__file__).parent / "data" / "tiny.toml"), "--out", str(out),
            "--workers", "0", "--batch-size", "64"]


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume(reference, digits, teachers, tmp_path) -> None:
    out = tmp_path / "c"
    args = [sys.executable, "-m", "civt_cache.cli", *_cli_job_args(digits["val"], out, teachers)]
    rng = np.random.default_rng(0)
    for _ in range(3):
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(float(rng.uniform(4.0, 9.0)))  # startup takes ~4 s; units ~1 s each
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    run_cli(*_cli_job_args(digits["val"], out, teachers))
    ref, got = arrays(reference), arrays(out)
    for k in ref:
        assert np.array_equal(ref[k], got[k]), k


def test_two_ranks_under_torchrun_match_one_process(reference, digits, teachers, tmp_path,
                                                    pinned_threads) -> None:
    """Bit for bit, given the same thread count: the reference was built in this process and the
    ranks inherit OMP_NUM_THREADS, both pinned to TEST_THREADS by conftest (torchrun keeps a
    value that is set)."""
    out = tmp_path / "c"
    assert os.environ["OMP_NUM_THREADS"] == str(pinned_threads) == str(torch.get_num_threads())
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", "29517", "-m", "civt_cache.cli",
                           *_cli_job_args(digits["val"], out, teachers)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0: 2 unit(s)" in proc.stdout and "rank 1: 2 unit(s)" in proc.stdout
    ref, got = arrays(reference), arrays(out)
    for k in ref:
        assert np.array_equal(ref[k], got[k]), k


@pytest.mark.slow
def test_verify_needs_only_the_cache_and_finds_moved_files(digits, teachers, tmp_path) -> None:
    ckpt = Path(teachers["conv"].split(":", 1)[1])
    own = tmp_path / "conv.pth"
    shutil.copy(ckpt, own)
    out = tmp_path / "c"
    cache_teachers(job(digits["val"], out, [f"conv=resnet10t:{own}"], epochs=1))
    proc = run_cli("verify", str(out), "--samples", "3")
    assert "verified 3 views x 1 teacher(s)" in proc.stdout and "OK" in proc.stdout
    moved = tmp_path / "moved.pth"
    own.rename(moved)
    proc = run_cli("verify", str(out), "--samples", "3", check=False)
    assert proc.returncode == 2
    assert f"teacher 'conv' was cached from {own}" in proc.stderr
    assert "give --teacher conv=resnet10t:NEW_PATH" in proc.stderr
    run_cli("verify", str(out), "--samples", "3", "--teacher", f"conv=resnet10t:{moved}")
    torch.manual_seed(123)
    torch.save(timm.create_model("resnet10t", num_classes=10).state_dict(), moved)  # changed file
    proc = run_cli("verify", str(out), "--samples", "3", "--teacher", f"conv=resnet10t:{moved}",
                   check=False)
    assert proc.returncode == 2 and "is not the one cached: sha256" in proc.stderr


def _same_arrays(a: Path, b: Path) -> None:
    x, y = arrays(a), arrays(b)
    assert x.keys() == y.keys()
    for k in x:
        assert x[k].shape == y[k].shape and np.array_equal(x[k], y[k], equal_nan=x[k].dtype.kind == "f"), k


def test_growing_a_cache_computes_only_the_new_epochs(reference, digits, teachers, tmp_path) -> None:
    """2 -> 3 epochs: only the new units run, the committed ones stay as they were, and the
    result equals a 3-epoch cache made at once."""
    specs = [teachers["conv"], teachers["inv"]]
    out = tmp_path / "grown"
    shutil.copytree(reference, out)
    committed = {p.name: p.read_bytes() for p in (out / "progress").glob("*.json")}
    summary = cache_teachers(job(digits["val"], out, specs, epochs=3))
    assert summary["units"] == 2  # 2 shards x 1 new epoch
    assert all((out / "progress" / name).read_bytes() == data for name, data in committed.items())
    assert CacheStore.open(out).spec.epochs == 3
    at_once = tmp_path / "at-once"
    cache_teachers(job(digits["val"], at_once, specs, epochs=3))
    _same_arrays(out, at_once)
    with pytest.raises(CacheMismatchError, match="epochs: cache has 3, asked 2"):
        cache_teachers(job(digits["val"], out, specs, epochs=2))  # a cache never shrinks


def test_growing_a_short_last_block_redoes_it(digits, teachers, tmp_path) -> None:
    """3 epochs in blocks of 2 ([0, 1], [2]) grown to 4: block [2] becomes [2, 3] and is redone."""
    specs = [teachers["conv"]]
    grown, at_once = tmp_path / "grown", tmp_path / "at-once"
    cache_teachers(job(digits["val"], grown, specs, epochs=3, epochs_per_unit=2))
    summary = cache_teachers(job(digits["val"], grown, specs, epochs=4, epochs_per_unit=2))
    assert summary["units"] == 2 and summary["views"] == 2 * load_manifest(digits["val"]).num_samples  # both shards x epochs 2, 3
    cache_teachers(job(digits["val"], at_once, specs, epochs=4, epochs_per_unit=2))
    _same_arrays(grown, at_once)
