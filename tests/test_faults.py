"""Fault injection through the CLI (issue: nothing wrong is ever trained on silently).

Each test damages what a user's disk, colleague or typo could damage, after a cache was built
and committed, and asserts: a non-zero exit with one line naming the file or unit (or a logged
redo), no training on wrong data, nothing committed lost, and that the repair path gives back
exactly the uninterrupted cache.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from civt_cache.cache.store import CacheStore

from .conftest import ROOT, cache_args, refused, run_cli, small_disk, student_args


def arrays(root: Path) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(root), mode="r")
    return {name: a[...] for name, a in g.members(max_depth=None) if isinstance(a, zarr.Array)}


def assert_same_cache(a: Path, b: Path) -> None:
    x, y = arrays(a), arrays(b)
    assert x.keys() == y.keys()
    for k in x:
        assert np.array_equal(x[k], y[k], equal_nan=x[k].dtype.kind == "f"), k


def copy_cache(world: dict[str, Path], tmp_path: Path) -> Path:
    out = tmp_path / "cache"
    shutil.copytree(world["ref"], out)
    return out


def flip(path: Path, offset: int, count: int = 3) -> None:
    blob = bytearray(path.read_bytes())
    for i in range(offset, offset + count):
        blob[i] ^= 0x5A
    path.write_bytes(bytes(blob))


@pytest.mark.slow
@pytest.mark.parametrize("where", ["middle", "start"])
def test_flipped_bytes_in_a_committed_chunk(world, tmp_path, where) -> None:
    """Row 1 and 2: bytes flipped inside a chunk (it would still decode) or near its start (a
    raw Blosc error before): the read fails naming unit, array and file; verify --full lists
    the unit; --repair recomputes exactly it."""
    cache = copy_cache(world, tmp_path)
    chunk = CacheStore.open(cache).chunk_path("teachers/conv/targets", 1, 0)
    flip(chunk, chunk.stat().st_size // 2 if where == "middle" else 20)
    before = {p.name: p.read_bytes() for p in (cache / "progress").glob("s*.json") if p.name != "s000001-b0000.json"}
    run = tmp_path / "run"
    line = refused(run_cli(*student_args(world, cache, run), check=False),
                   "unit (shard 1, epochs 0-0)", "teachers/conv/targets", str(chunk), "--repair")
    assert "does not decode" in line or "checksum" in line
    assert not (run / "metrics.jsonl").exists()  # the epoch never finished on damaged targets
    proc = run_cli("verify", str(cache), "--full", check=False)
    assert proc.returncode == 1 and "unit (shard 1, block 0) conv" in proc.stdout
    assert "1 problem(s)" in proc.stdout
    proc = run_cli(*cache_args(world["root"], cache, "--repair"))
    assert "unit (shard 1, block 0) conv" in proc.stderr and "recomputing" in proc.stderr
    assert "rank 0: 1 unit(s)" in proc.stdout
    assert_same_cache(cache, world["ref"])
    for name, data in before.items():  # other committed units untouched
        assert (cache / "progress" / name).read_bytes() == data
    assert "all sound -> OK" in run_cli("verify", str(cache), "--full").stdout


@pytest.mark.slow
@pytest.mark.parametrize("array", ["teachers/conv/targets", "views/samples", "views/params"])
def test_deleted_chunk_is_never_read_as_fill_values(world, tmp_path, array) -> None:
    """Row 3: a deleted chunk: train-student refuses naming the file, inspect calls the unit
    damaged, and a plain rerun of cache-teachers recomputes it."""
    cache = copy_cache(world, tmp_path)
    chunk = CacheStore.open(cache).chunk_path(array, 0, 1)
    chunk.unlink()
    refused(run_cli(*student_args(world, cache, tmp_path / "run", "--epochs", "2"), check=False),
            "unit (shard 0, block 1)", str(chunk), "is missing")
    report = run_cli("inspect", str(cache)).stdout
    assert "DAMAGED: unit (shard 0, block 1)" in report and str(chunk) in report
    proc = run_cli(*cache_args(world["root"], cache))
    assert f"chunk file {chunk} is missing; recomputing" in proc.stderr
    assert_same_cache(cache, world["ref"])


def test_torn_progress_record_counts_as_not_committed(world, tmp_path) -> None:
    """Row 4: a commit record cut in half: no JSONDecodeError anywhere; the unit is said to
    be uncommitted and is redone."""
    cache = copy_cache(world, tmp_path)
    record = cache / "progress" / "s000000-b0000.json"
    record.write_bytes(record.read_bytes()[: record.stat().st_size // 2])
    report = run_cli("inspect", str(cache)).stdout
    assert f"DAMAGED: {record}: unreadable commit record" in report
    refused(run_cli(*student_args(world, cache, tmp_path / "run"), check=False),
            "cached epochs [0] are not complete", "cache-teachers")
    proc = run_cli(*cache_args(world["root"], cache))
    assert f"{record}: unreadable commit record" in proc.stderr and "rank 0: 1 unit(s)" in proc.stdout
    assert_same_cache(cache, world["ref"])
    assert json.loads(record.read_text())["teachers"]["conv"]


def test_shard_changed_after_caching_is_refused_by_train_student(world, tmp_path) -> None:
    """Row 5: one label and one JPEG byte changed in a shard after caching."""
    shards = tmp_path / "shards"
    shutil.copytree(world["root"] / "shards", shards)
    raw = json.loads(world["manifest"].read_text())
    for s in raw["shards"]:
        s["path"] = str(shards / Path(s["path"]).name)
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps(raw))
    shard = shards / Path(raw["shards"][0]["path"]).name
    blob = bytearray(shard.read_bytes())
    at = blob.index(b".cls") + 512 - blob.index(b".cls") % 512  # the first label's data block
    blob[at] = ord("9") if blob[at] != ord("9") else ord("8")
    blob[5000] ^= 0x01  # a byte inside the first JPEG
    shard.write_bytes(bytes(blob))
    w = dict(world, manifest=manifest)
    run = tmp_path / "run"
    refused(run_cli(*student_args(w, world["ref"], run), check=False), str(shard), "sha256")
    assert not (run / "metrics.jsonl").exists()


def test_an_epoch_read_checks_its_shard_without_reading_the_stored_samples(world, monkeypatch) -> None:
    """Stage two's read of one epoch reads that epoch's records and targets only: its shard is
    checked against the unit's samples checksum; a shard that differs (a label, a key) reads
    the stored samples to name the sample, and a damaged samples object is a damaged unit."""
    from dataclasses import replace

    from civt_cache import load_manifest
    from civt_cache.data.shards import read_shard
    from civt_cache.errors import CacheMismatchError, CorruptUnitError

    store, manifest = CacheStore.open(world["ref"]), load_manifest(world["manifest"])
    samples, record = read_shard(manifest, 1), store.unit_record(1, 1)
    real, read = store._read, []
    monkeypatch.setattr(store, "_read", lambda array, *a: read.append(array) or real(array, *a))
    recs, targets = store.read_epoch(1, 1, record, ["conv"])
    store.check_samples(1, 1, record, manifest, samples)
    assert read == ["views/params", "teachers/conv/targets"] and len(recs) == len(samples)
    relabelled = samples[:3] + [replace(samples[3], label=(samples[3].label + 1) % 10)] + samples[4:]
    with pytest.raises(CacheMismatchError, match=f"sample {samples[3].key!r} has label {relabelled[3].label}"):
        store.check_samples(1, 1, record, manifest, relabelled)
    assert read[-1] == "views/samples"
    renamed = [replace(samples[0], key="other")] + samples[1:]
    with pytest.raises(CacheMismatchError, match="sample 0 has key 'other'"):
        store.check_samples(1, 1, record, manifest, renamed)
    for other in (samples[:-1], samples + [replace(samples[0], key="extra")]):  # a sample fewer, one more
        with pytest.raises(CacheMismatchError, match=f"holds {len(other)} samples, the cache .* from {len(samples)}"):
            store.check_samples(1, 1, record, manifest, other)
    damaged = dict(record, views=dict(record["views"], samples="0" * 32))
    with pytest.raises(CorruptUnitError, match="views/samples"):
        store.check_samples(1, 1, damaged, manifest, samples)


@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_manifest_pointing_at_a_device_or_fifo(world, tmp_path, kind) -> None:
    """Row 6: /dev/zero or a FIFO as a shard: refused by stat, never read (no hang, no OOM)."""
    raw = json.loads(world["manifest"].read_text())
    target = "/dev/zero"
    if kind == "fifo":
        target = str(tmp_path / "fifo.tar")
        os.mkfifo(target)
    raw["shards"][0]["path"] = target
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps(raw))
    args = cache_args(world["root"], tmp_path / "c")
    args[args.index("--manifest") + 1] = str(manifest)
    proc = subprocess.run([sys.executable, "-m", "civt_cache.cli", *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    refused(proc, target, "not a regular file")
    assert not (tmp_path / "c").exists()  # refused before the cache was created


@pytest.mark.slow
def test_make_shards_bad_files_and_settings(tmp_path) -> None:
    """Row 7: a link loop and a broken link are named, and skipped under --skip-bad; a zero
    shard size and a folder without class folders are one-line errors."""
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    from PIL import Image

    for cls in ("a", "b"):
        for i in range(3):
            Image.new("RGB", (16, 12), (i * 60, 20, 40)).save(src / cls / f"{i}.jpg")
    (src / "a" / "loop.jpg").symlink_to(src / "a" / "loop.jpg")
    (src / "b" / "broken.jpg").symlink_to(tmp_path / "nowhere.jpg")
    out, m = tmp_path / "out", tmp_path / "m.json"
    refused(run_cli("make-shards", str(src), str(out), "--name", "x", "--manifest", str(m),
                    "--workers", "1", check=False), "cannot read file")
    assert not m.exists()
    run_cli("make-shards", str(src), str(out), "--name", "x", "--manifest", str(m), "--workers", "1",
            "--skip-bad")
    skipped = {Path(s["file"]).name for s in json.loads(m.read_text())["skipped"]}
    assert skipped == {"loop.jpg", "broken.jpg"} and json.loads(m.read_text())["num_samples"] == 6
    refused(run_cli("make-shards", str(src), str(out), "--name", "y", "--shard-size", "0",
                    "--manifest", str(tmp_path / "y.json"), check=False), "--shard-size 0")
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "x.jpg")
    refused(run_cli("make-shards", str(flat), str(out), "--name", "z", "--manifest",
                    str(tmp_path / "z.json"), check=False), str(flat), "no class folders")


@pytest.mark.parametrize("flag,value,needle", [
    ("--temperature", "0", "--temperature 0.0: must be > 0"),
    ("--batch-size", "0", "--batch-size 0: must be in 1..65536"),
    ("--batch-size", "-5", "--batch-size -5: must be in 1..65536"),
    ("--workers", "-1", "--workers -1: must be in 0..256"),
    ("--epochs", "0", "--epochs 0: must be in 1..10000"),
    ("--model", "nosuch", "--model 'nosuch': must be a CivT model"),
])
def test_bad_student_settings_refused_before_anything(world, tmp_path, flag, value, needle) -> None:
    """Rows 8 and 9: values that cannot work are refused before a run directory exists (a zero
    temperature used to train to a NaN checkpoint with exit 0)."""
    run = tmp_path / "run"
    args = student_args(world, world["ref"], run)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    refused(run_cli(*args, check=False), needle)
    assert not run.exists()


@pytest.mark.slow
def test_bad_cache_settings_leave_no_cache(world, tmp_path) -> None:
    """Row 9: a typo'd teacher spec, a missing checkpoint or bad numbers create nothing."""
    out = tmp_path / "c"
    for change, needle in [({"--teacher": "conv=resnet10t"}, "expected NAME=ARCH:CHECKPOINT"),
                           ({"--teacher": "conv=resnet10t:/nope.pth"}, "/nope.pth: checkpoint file not found"),
                           ({"--teacher": f"conv=resnett10:{world['root'] / 'conv.pth'}"}, "unknown architecture 'resnett10'"),
                           ({"--batch-size": "-5"}, "--batch-size -5"),
                           ({"--workers": "-1"}, "--workers -1"),
                           ({"--epochs": "0"}, "--epochs 0")]:
        args = cache_args(world["root"], out)
        for flag, value in change.items():
            args[args.index(flag) + 1] = value
        refused(run_cli(*args, check=False), needle)
        assert not out.exists() and not list(tmp_path.glob(".c.tmp-*"))


@pytest.mark.slow
def test_full_disk_is_one_line_and_loses_nothing_committed(world, tmp_path) -> None:
    """Row 9: a full disk names the path; every unit committed before it stays sound."""
    with small_disk(tmp_path, "256k") as disk:
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "filler").write_bytes(b"\0" * max(0, free - 60_000))
        out = disk / "cache"
        refused(run_cli(*cache_args(world["root"], out), check=False), "disk full")
        if out.exists():  # what was committed is sound; the rest is listed as incomplete
            proc = run_cli("verify", str(out), "--full", check=False)
            assert proc.returncode == 1 and "incomplete" in proc.stdout, proc.stdout
            assert "problem(s)" not in proc.stdout, proc.stdout
            (disk / "filler").unlink()
            run_cli(*cache_args(world["root"], out))
            assert_same_cache(out, world["ref"])


def test_orphan_checkpoint_temp_files_are_removed(world, tmp_path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    orphan = run / ".last.pth.tar.abc123.tmp"
    orphan.write_bytes(b"half a checkpoint")
    run_cli(*student_args(world, world["ref"], run, "--max-steps", "1", "--workers", "0"))
    assert not orphan.exists() and (run / "last.pth.tar").exists()


def _kill_after(args: list[str], seconds: float) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "civt_cache.cli", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        proc.wait(timeout=seconds)  # finished before its kill: fine, the next run has less to do
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_soak_kills_corruption_and_repair(world, tmp_path) -> None:
    """20 SIGKILLs at random moments across cache-teachers and train-student, 5 chunk
    corruptions and 2 chunk deletions, then verify --full + repair: the cache is byte-identical
    to an uninterrupted one and the student's final weights equal an uninterrupted run's."""
    rng = np.random.default_rng(2026)
    more = ["--epochs", "4"]  # 8 units, so kills land mid-run
    ref = tmp_path / "ref"
    run_cli(*cache_args(world["root"], ref), *more)
    cache = tmp_path / "cache"
    for _ in range(10):
        _kill_after(cache_args(world["root"], cache) + more, float(rng.uniform(3.0, 9.0)))
    run_cli(*cache_args(world["root"], cache), *more)
    assert_same_cache(cache, ref)

    store = CacheStore.open(cache)
    units = store.units()
    arrays_ = ["views/params", "views/samples", "teachers/conv/targets"]
    picks = rng.choice(len(units) * len(arrays_), size=7, replace=False)
    damaged = set()
    for i, pick in enumerate(picks):
        (shard, block), array = units[pick // len(arrays_)], arrays_[pick % len(arrays_)]
        chunk = store.chunk_path(array, shard, block)
        if i < 5:
            flip(chunk, int(rng.integers(0, chunk.stat().st_size - 3)))
        else:
            chunk.unlink()
        damaged.add((shard, block))
    proc = run_cli("verify", str(cache), "--full", check=False)
    assert proc.returncode == 1
    for shard, block in damaged:
        assert f"unit (shard {shard}, block {block})" in proc.stdout
    run_cli(*cache_args(world["root"], cache, "--repair"), *more)
    assert_same_cache(cache, ref)
    assert "-> OK" in run_cli("verify", str(cache), "--full").stdout

    def student(out: Path, *extra: str) -> list[str]:
        return student_args(world, cache, out, "--epochs", "3", "--workers", "0",
                            "--checkpoint-every", "3", *extra)

    run_cli(*student(tmp_path / "uninterrupted"))
    killed = tmp_path / "killed"
    for i in range(10):
        _kill_after(student(killed, "--fresh" if i == 0 else "--resume"), float(rng.uniform(4.0, 10.0)))
    run_cli(*student(killed, "--resume"))
    a = torch.load(tmp_path / "uninterrupted" / "last.pth.tar", weights_only=True)["state_dict"]
    b = torch.load(killed / "last.pth.tar", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
