"""Shards in object storage: an S3-compatible server on 127.0.0.1 (moto's server mode, a real
HTTP endpoint speaking the S3 protocol) started and stopped by the tests; nothing leaves the
machine. scan-shards lists s3:// shards (sha256 from the one read), both stages read them, and
their results equal the same runs on the local files; failures are retried or named."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch

from civt_cache import load_manifest
from civt_cache.data import remote
from civt_cache.data.shards import read_shard
from civt_cache.errors import ManifestError
from tests.conftest import cache_args, refused, run_cli, student_args
from tests.test_faults import assert_same_cache

BUCKET = "civt-test"


@pytest.fixture(scope="module")
def s3(world):
    """A moto S3 server with the world's val shards under s3://civt-test/val/, and the
    environment every S3 client reads pointing at it (inherited by the CLI subprocesses)."""
    fsspec = pytest.importorskip("fsspec")
    from moto.server import ThreadedMotoServer

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fsspec.filesystem("s3").invalidate_cache()
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir(BUCKET)
    manifest = load_manifest(world["manifest"])
    for i in range(len(manifest.shards)):
        local = Path(manifest.shard_path(i))
        fs.put_file(str(local), f"{BUCKET}/val/{local.name}")
    yield {"fs": fs, "url": f"s3://{BUCKET}/val"}
    server.stop()
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


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


def test_both_stages_from_s3_shards_equal_the_local_runs(world, s3_manifest, tmp_path) -> None:
    """Stage one from s3:// shards makes the reference cache byte for byte (same thread count),
    and a student trained from s3:// shards on it ends with the local run's very weights."""
    cache = tmp_path / "cache"
    args = cache_args(world["root"], cache)
    args[args.index("--manifest") + 1] = str(s3_manifest)
    run_cli(*args)
    assert_same_cache(world["ref"], cache)
    runs = {}
    for where, manifest in (("local", world["manifest"]), ("s3", s3_manifest)):
        student = student_args(world, cache, tmp_path / where, "--workers", "0")
        for flag in ("--manifest", "--val-manifest"):
            student[student.index(flag) + 1] = str(manifest)
        run_cli(*student)
        runs[where] = torch.load(tmp_path / where / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]
    assert runs["local"].keys() == runs["s3"].keys()
    assert all(torch.equal(runs["local"][k], runs["s3"][k]) for k in runs["local"])


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
