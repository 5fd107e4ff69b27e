"""Shards in object storage: an S3-compatible server on 127.0.0.1 (moto's server mode, a real
HTTP endpoint speaking the S3 protocol) started and stopped by the tests; nothing leaves the
machine. scan-shards lists s3:// shards (sha256 from the one read), both stages read them, and
their results equal the same runs on the local files; failures are retried or named."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from civt_cache import load_manifest
from civt_cache.cache.create import create_or_open
from civt_cache.cache.spec import CacheSpec
from civt_cache.cache.store import CacheStore
from civt_cache.data import remote
from civt_cache.data.shards import read_shard
from civt_cache.errors import CacheMismatchError, ManifestError
from civt_cache.views.recipe import Recipe
from tests.conftest import TINY, assert_gone, cache_args, descendants, moto_s3, refused, run_cli, student_args
from tests.test_faults import arrays, assert_same_cache

BUCKET = "civt-test"


@pytest.fixture(scope="module")
def s3(world):
    """A moto S3 server with the world's val shards under s3://civt-test/val/, and the
    environment every S3 client reads pointing at it (inherited by the CLI subprocesses)."""
    import fsspec

    with moto_s3():
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir(BUCKET)
        manifest = load_manifest(world["manifest"])
        for i in range(len(manifest.shards)):
            local = Path(manifest.shard_path(i))
            fs.put_file(str(local), f"{BUCKET}/val/{local.name}")
        yield {"fs": fs, "url": f"s3://{BUCKET}/val"}


@pytest.fixture(scope="module")
def s3_manifest(world, s3, tmp_path_factory) -> Path:
    """The val shards listed by scan-shards from their s3:// URLs (class names as the world's)."""
    root = tmp_path_factory.mktemp("s3m")
    classes = root / "classes.txt"
    classes.write_text("\n".join(load_manifest(world["manifest"]).classes))
    out = root / "val-s3.json"
    run_cli("scan-shards", f"{s3['url']}/*.tar", "--name", "digits-val", "--manifest", str(out),
            "--classes", str(classes))
    return out


def test_scan_shards_lists_urls_with_the_local_files_identity(world, s3_manifest) -> None:
    local, remote_m = load_manifest(world["manifest"]), load_manifest(s3_manifest)
    assert all(s.path.startswith(f"s3://{BUCKET}/val/") for s in remote_m.shards)
    assert [(s.num_samples, s.bytes, s.sha256) for s in remote_m.shards] == \
        [(s.num_samples, s.bytes, s.sha256) for s in local.shards]
    assert remote_m.fingerprint() == local.fingerprint()  # the same data: a cache serves both
    assert [x.key for x in read_shard(remote_m, 1)] == [x.key for x in read_shard(local, 1)]


def test_both_stages_from_s3_shards_with_the_cache_in_s3_equal_the_local_runs(world, s3, s3_manifest, tmp_path) -> None:
    """Stage one from s3:// shards into an s3:// cache makes the reference cache byte for byte
    (same thread count: arrays and commit-record checksums); inspect and verify --full read it
    there; a student trained from s3:// shards and that cache ends with the local run's very
    weights (local shards, local cache)."""
    cache = f"s3://{BUCKET}/caches/both"
    args = cache_args(world["root"], cache)
    args[args.index("--manifest") + 1] = str(s3_manifest)
    run_cli(*args)
    assert_same_cache(world["ref"], cache)
    local = CacheStore.open(world["ref"])
    remote_store = CacheStore.open(cache)
    for unit in local.units():
        mine, theirs = remote_store.unit_record(*unit), local.unit_record(*unit)
        assert (mine["views"], mine["teachers"]) == (theirs["views"], theirs["teachers"])
    assert s3["fs"].exists(f"{BUCKET}/caches/both/progress/index.json.gz")
    assert not s3["fs"].exists(f"{BUCKET}/caches/both/leases")
    assert "4 in all; views committed in 4" in run_cli("inspect", cache).stdout
    assert "all 4 unit(s) complete, all sound -> OK" in run_cli("verify", cache, "--full").stdout
    report = run_cli("bench", "requests", cache).stdout
    assert "4 units, 1 teacher(s)" in report and "3.0 array objects per unit" in report  # views: 2
    records = int(re.search(r"the records \(.*\): (\d+) requests", report).group(1))
    assert records <= 8, report  # a listing, the index, the group's metadata: not one per unit
    everything = int(re.search(r"stage two's check.*: (\d+) requests", report).group(1))
    assert everything <= records + 40, report  # + a listing and the metadata of each array
    read_per_stored = float(re.search(r"stage two, epoch 1 of 2 shard\(s\): .*read / stored ([\d.]+)", report).group(1))
    assert read_per_stored <= 1.05, report  # the epoch's chunks and the shards' indexes: nothing else
    runs = {}
    for where, manifest, source in (("local", world["manifest"], world["ref"]), ("s3", s3_manifest, cache)):
        student = student_args(world, source, tmp_path / where, "--workers", "0")
        for flag in ("--manifest", "--val-manifest"):
            student[student.index(flag) + 1] = str(manifest)
        run_cli(*student)
        runs[where] = torch.load(tmp_path / where / "last.pth.tar", map_location="cpu", weights_only=False)["state_dict"]
    assert runs["local"].keys() == runs["s3"].keys()
    assert all(torch.equal(runs["local"][k], runs["s3"][k]) for k in runs["local"])


def test_claimers_share_an_s3_cache_and_finish_a_killed_ones_units(world, s3, tmp_path) -> None:
    """Independent ``--claim`` jobs on one s3:// cache: one is SIGKILLed holding a lease
    (forged onto another host, so only its expiry frees it); verify --full fails listing the
    missing units; two more jobs finish what is left between them, one takes the dead
    lease over once it expires; verify --full passes and the cache equals the reference."""
    cache = f"s3://{BUCKET}/caches/claimed"
    cmd = [sys.executable, "-m", "civt_cache.cli",
           *cache_args(world["root"], cache, "--claim", "--epochs", "4", "--workers", "2")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fs, leases = s3["fs"], f"{BUCKET}/caches/claimed/leases"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not _listed(fs, leases):
        time.sleep(0.05)
    workers = descendants(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert workers, "the claims were made without loader workers"
    assert_gone(workers)  # the loader workers die with their parent
    held = _listed(fs, leases)
    assert held, "the job finished before it could be killed"
    expires = time.time() + 8
    for key in held:
        fs.pipe_file(key, json.dumps({"owner": "node-b:4242", "expires": expires}).encode())
    failed = run_cli("verify", cache, "--full", check=False)
    assert failed.returncode == 1 and "incomplete" in failed.stdout and "leased by node-b:4242" in failed.stdout
    procs = [subprocess.Popen(cmd + ["--lease-seconds", "6"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [r[1][-2000:] for r in results]
    done = [int(re.search(r"rank 0: (\d+) unit", r[0]).group(1)) for r in results]
    assert sum(done) >= 1, done  # how the units split between the two depends on their start-up
    assert time.time() >= expires  # the dead job's unit was taken over, not computed beside it
    assert "all 8 unit(s) complete, all sound -> OK" in run_cli("verify", cache, "--full").stdout
    ref, got = arrays(world["ref"]), arrays(cache)
    for k in ref:  # the 2-epoch reference is the first 2 epochs (blocks) of this cache
        assert np.array_equal(ref[k], got[k][: ref[k].shape[0]], equal_nan=ref[k].dtype.kind == "f"), k
    assert not _listed(fs, leases)


def test_a_missing_bucket_is_named_as_such(world, s3, tmp_path) -> None:
    """A cache or a manifest in a bucket that does not exist: said so, not "no such object"."""
    args = cache_args(world["root"], "s3://no-such-bucket/c")
    refused(run_cli(*args, check=False), "the bucket s3://no-such-bucket does not exist")
    args = cache_args(world["root"], tmp_path / "c")
    args[args.index("--manifest") + 1] = "s3://no-such-bucket/m.json"
    refused(run_cli(*args, check=False), "s3://no-such-bucket/m.json", "the bucket s3://no-such-bucket does not exist")
    assert not (tmp_path / "c").exists()


def _listed(fs, prefix: str) -> list[str]:
    fs.invalidate_cache()
    return fs.find(prefix)


def test_failed_puts_are_retried_and_never_committed_wrong(world, s3, monkeypatch) -> None:
    """Fault injection on the object store, in-process: throttled PUTs of array objects are
    retried and the cache equals the reference; a PUT that keeps failing stops the unit with
    one error naming the object, its unit is never committed, and a rerun finishes the cache."""
    import s3fs

    from civt_cache.config import build_config, load_pipeline
    from civt_cache.stages.cache_teachers import CacheJob, cache_teachers
    from civt_cache.stages.verify import verify_full

    monkeypatch.setattr(remote.time, "sleep", lambda s: None)
    real = s3fs.S3FileSystem._pipe_file
    state = {"left": 0, "match": "/c/"}

    async def flaky(self, path, data, *args, **kwargs):
        if state["match"] in path and state["left"] > 0:
            state["left"] -= 1
            raise OSError("503 Service Unavailable: SlowDown")
        return await real(self, path, data, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_pipe_file", flaky)
    root = world["root"]
    job = build_config(CacheJob, load_pipeline(Path(TINY)), "cache", {
        "manifest": root / "val.json", "teachers": [f"conv=resnet10t:{root / 'conv.pth'}"], "epochs": 2,
        "epochs_per_unit": 1, "topk": 5, "workers": 0, "batch_size": 64, "out": f"s3://{BUCKET}/caches/flaky"})
    state["left"] = 3  # three throttled PUTs, each retried
    cache_teachers(job)
    assert state["left"] == 0
    assert_same_cache(world["ref"], job.out)
    job.out = f"s3://{BUCKET}/caches/down"
    state.update(left=10**6, match="teachers/conv/targets/c/0/1/0")  # unit (shard 1, block 0): always 503
    with pytest.raises(CacheMismatchError, match=f"s3://{BUCKET}/caches/down/teachers/conv/targets/c/0/1/0: "
                                                 "write failed after 4 tries"):
        cache_teachers(job)
    assert CacheStore.open(job.out).unit_record(1, 0) is None  # never committed
    report, ok = verify_full(job.out)
    assert not ok and "unit (shard 1, block 0) lacks" in report
    state["left"] = 0
    cache_teachers(job)
    assert_same_cache(world["ref"], job.out)


def test_failed_gets_are_retried_then_named_and_repair_works_in_a_bucket(world, s3, monkeypatch) -> None:
    """A read of a cache in S3: throttled GETs are retried (the same arrays), GETs that keep
    failing are named as failed reads (not as damage); a flipped byte in an object is found by
    verify --full and recomputed by --repair, as on a disk."""
    import s3fs

    monkeypatch.setattr(remote.time, "sleep", lambda s: None)
    url, prefix = f"s3://{BUCKET}/caches/copied", f"{BUCKET}/caches/copied"
    s3["fs"].put(str(world["ref"]), prefix, recursive=True)
    store = CacheStore.open(url)
    record = store.unit_record(0, 1)
    want = CacheStore.open(world["ref"]).read_epoch(0, 1, record, ["conv"])
    real = s3fs.S3FileSystem._cat_file
    state = {"left": 2}

    async def flaky(self, path, *args, **kwargs):
        if "/c/" in path and state["left"] > 0:
            state["left"] -= 1
            raise OSError("503 Service Unavailable: SlowDown")
        return await real(self, path, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_cat_file", flaky)
    got = store.read_epoch(0, 1, record, ["conv"])
    assert state["left"] == 0 and np.array_equal(got[0], want[0])
    assert all(np.array_equal(a, b) for a, b in zip(got[1]["conv"], want[1]["conv"]))
    state["left"] = 10**6
    with pytest.raises(CacheMismatchError, match=f"{url}/views/params/c/1/0/0: read failed after 4 tries"):
        CacheStore.open(url).read_epoch(0, 1, record, ["conv"])
    state["left"] = 0
    chunk = f"{prefix}/teachers/conv/targets/c/1/0/0"
    blob = bytearray(s3["fs"].cat_file(chunk))
    blob[len(blob) // 2] ^= 0x5A
    s3["fs"].pipe_file(chunk, bytes(blob))
    failed = run_cli("verify", url, "--full", check=False)
    assert failed.returncode == 1 and "unit (shard 0, block 1) conv" in failed.stdout
    proc = run_cli(*cache_args(world["root"], url, "--repair"))
    assert "unit (shard 0, block 1) conv" in proc.stderr and "rank 0: 1 unit(s)" in proc.stdout
    assert_same_cache(world["ref"], url)


def test_make_shards_into_a_bucket_and_manifests_read_from_urls(world, s3, tmp_path) -> None:
    """make-shards writes shards and manifests to s3:// (the same bytes as on a disk: the
    world's val shards were made with these settings); stage one reads that manifest by its URL
    and makes the reference cache; a manifest in a bucket that lists shards by relative names
    finds them beside itself."""
    made, staging = f"s3://{BUCKET}/made", tmp_path / "tmp"
    staging.mkdir()
    run_cli("make-shards", "digits", made, "--name", "digits", "--shard-size", "256", "--seed", "0",
            "--workers", "1", "--manifest", f"{made}/digits.json", env={**os.environ, "TMPDIR": str(staging)})
    on_disk = tmp_path / "on-disk"
    run_cli("make-shards", "digits", str(on_disk), "--name", "digits", "--shard-size", "256", "--seed", "0",
            "--workers", "1", "--manifest", str(on_disk / "digits.json"))
    remote_m, here = load_manifest(f"{made}/digits-val.json"), load_manifest(on_disk / "digits-val.json")
    assert remote_m.fingerprint() == here.fingerprint()  # the same shards, byte for byte
    assert all(s.path.startswith(f"{made}/digits-val-") for s in remote_m.shards)
    assert not list(staging.iterdir())  # the local staging folder is gone
    assert [(x.key, x.image) for x in read_shard(remote_m, 0)] == [(x.key, x.image) for x in read_shard(here, 0)]
    local = load_manifest(world["manifest"])
    raw = json.loads(Path(world["manifest"]).read_text())
    for shard in raw["shards"]:
        shard["path"] = Path(shard["path"]).name  # relative: beside the manifest
    s3["fs"].pipe(f"{BUCKET}/val/relative.json", json.dumps(raw).encode())
    beside = load_manifest(f"s3://{BUCKET}/val/relative.json")
    assert beside.shard_path(1) == f"s3://{BUCKET}/val/{raw['shards'][1]['path']}"
    assert [x.key for x in read_shard(beside, 1)] == [x.key for x in read_shard(local, 1)]


def test_a_missing_or_changed_object_is_named(world, s3, s3_manifest, tmp_path) -> None:
    raw = json.loads(s3_manifest.read_text())
    raw["shards"][0]["path"] = f"s3://{BUCKET}/val/gone.tar"
    (tmp_path / "gone.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=f"s3://{BUCKET}/val/gone.tar: no such object"):
        read_shard(load_manifest(tmp_path / "gone.json"), 0)
    raw = json.loads(s3_manifest.read_text())
    s3["fs"].pipe(f"{BUCKET}/val/changed.tar", b"x" * 100)
    raw["shards"][0]["path"] = f"s3://{BUCKET}/val/changed.tar"
    (tmp_path / "changed.json").write_text(json.dumps(raw))
    args = cache_args(world["root"], tmp_path / "c")
    args[args.index("--manifest") + 1] = str(tmp_path / "changed.json")
    refused(run_cli(*args, check=False), f"s3://{BUCKET}/val/changed.tar: size 100 differs from manifest")


class _Flaky:
    """An fsspec filesystem whose reads fail ``failures`` times (a throttled or dropped GET)."""

    def __init__(self, failures: int, error: Exception) -> None:
        self.failures, self.error, self.calls = failures, error, 0

    def cat_file(self, url: str, start: int, end: int) -> bytes:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return b"shard bytes"[start:end]


def test_transient_failures_are_retried_then_named(monkeypatch) -> None:
    monkeypatch.setattr(remote.time, "sleep", lambda s: None)
    flaky = _Flaky(2, OSError("503 Service Unavailable: SlowDown"))
    monkeypatch.setattr(remote, "_fs", lambda url: flaky)
    assert remote.read_remote("s3://b/x.tar", 5) == b"shard" and flaky.calls == 3
    down = _Flaky(99, ConnectionError("connection reset by peer"))
    monkeypatch.setattr(remote, "_fs", lambda url: down)
    with pytest.raises(ManifestError, match=r"s3://b/x.tar: read failed after 4 tries \(ConnectionError"):
        remote.read_remote("s3://b/x.tar", 5)
    denied = _Flaky(99, PermissionError("AccessDenied"))
    monkeypatch.setattr(remote, "_fs", lambda url: denied)
    with pytest.raises(ManifestError, match="s3://b/x.tar: access denied"):
        remote.read_remote("s3://b/x.tar", 5)
    assert denied.calls == 1  # not retried: it will not get better


def test_a_second_teacher_added_in_the_same_process_is_seen(world, s3) -> None:
    """s3fs caches listings unless told not to: a teacher added to a cache in a bucket must be
    listed by the very process that added it (the two-teacher stage one depends on it)."""
    manifest = load_manifest(world["manifest"])
    spec = CacheSpec.for_manifest(manifest, Recipe(img_size=32), 0, 2, 1, 5)
    store = create_or_open(f"s3://{BUCKET}/caches/two-teachers", spec)
    for name in ("conv", "inv"):
        store.ensure_teacher({"name": name, "arch": "resnet10t", "checkpoint_sha256": name * 8,
                              "num_classes": manifest.num_classes})
    assert list(store.teachers()) == ["conv", "inv"]
