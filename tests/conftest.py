"""Shared fixtures: small data sets built once per test session."""
from __future__ import annotations

import contextlib

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import timm
import torch

from civt_cache import load_manifest

ROOT = Path(__file__).resolve().parents[1]

#: Intra-op threads of every test process and every process a test starts. Reductions (RedNet's
#: involution, matmuls) give other last bits at other thread counts, and torchrun sets one thread
#: per rank, so every test that compares caches or weights bit for bit runs both sides at this
#: count, whatever OMP_NUM_THREADS the suite was started with or the machine's core count.
TEST_THREADS = 1


@pytest.fixture(scope="session", autouse=True)
def pinned_threads():
    """Pin the thread count in this process and, through OMP_NUM_THREADS (which subprocesses and
    torchrun ranks inherit), in every CLI run, so a reference built here and a cache built by a
    subprocess are made at the same thread count."""
    saved_env, saved_threads = os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()
    os.environ["OMP_NUM_THREADS"] = str(TEST_THREADS)
    torch.set_num_threads(TEST_THREADS)
    yield TEST_THREADS
    torch.set_num_threads(saved_threads)
    if saved_env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = saved_env


def run_cli(*args: str, cwd: Path | None = None, check: bool = True,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``civt-cache ARGS`` in a subprocess, as a user would."""
    proc = subprocess.run([sys.executable, "-m", "civt_cache.cli", *args], cwd=cwd,
                          capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"civt-cache {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> dict[str, Path]:
    """The built-in digits data set as shards of 256 plus train/val manifests."""
    from civt_cache.data.digits import digits_items
    from civt_cache.data.writer import write_shards

    root = tmp_path_factory.mktemp("digits")
    out = {}
    for split, (classes, items) in digits_items(val_fraction=0.2).items():  # 359 held out: 2 val shards
        path = root / "manifests" / f"digits-{split}.json"
        write_shards(items, classes, root / "shards", f"digits-{split}", 256, 0, "digits", path,
                     workers=1)
        out[split] = path
    return out


def student_items(dataset, recipe) -> list[dict]:
    """Flatten a StudentBatches data set into per-sample dicts (row, view, label, partner_label,
    lam, t_<teacher>) in the order the batches hold them, views built on the CPU engine."""
    from civt_cache.loader.batches import batch_views

    items = []
    for batch in dataset:
        x = batch_views(batch, recipe, torch.device("cpu"))
        for i in range(batch.size):
            item = {"row": batch.rows[i], "view": x[i], "label": int(batch.labels[i]),
                    "partner_label": int(batch.partner_labels[i]), "lam": float(batch.lam[i])}
            for name, arrays in batch.teachers.items():
                item[f"t_{name}"] = tuple(torch.as_tensor(a[i]) for a in arrays)
            items.append(item)
    return items


#: The stage-one tests' recipe as a pipeline file, for CLI runs.
TINY = str(Path(__file__).parent / "data" / "tiny.toml")


@pytest.fixture(scope="session")
def world(digits, tmp_path_factory) -> dict[str, Path]:
    """Own copy of the val shards + manifest, a conv teacher, and a reference cache built
    uninterrupted (2 shards x 2 epochs = 4 units); one for the whole session, so every test
    treats it as read-only (tests that damage a cache or shards copy them first)."""
    root = tmp_path_factory.mktemp("faults")
    shutil.copytree(load_manifest(digits["val"]).shard_path(0).parent, root / "shards")
    raw = json.loads(digits["val"].read_text())
    for s in raw["shards"]:
        s["path"] = str(root / "shards" / Path(s["path"]).name)
    (root / "val.json").write_text(json.dumps(raw))
    torch.manual_seed(0)
    torch.save(timm.create_model("resnet10t", num_classes=10).state_dict(), root / "conv.pth")
    ref = root / "ref"
    run_cli(*cache_args(root, ref))
    return {"root": root, "manifest": root / "val.json", "ref": ref}


def cache_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["cache-teachers", "--pipeline", TINY, "--manifest", str(root / "val.json"),
            "--teacher", f"conv=resnet10t:{root / 'conv.pth'}", "--epochs", "2",
            "--epochs-per-unit", "1", "--topk", "5", "--out", str(out), "--workers", "0",
            "--batch-size", "64", *extra]


def student_args(world: dict[str, Path], cache: Path, out: Path, *extra: str) -> list[str]:
    return ["train-student", "--pipeline", TINY, "--manifest", str(world["manifest"]),
            "--val-manifest", str(world["manifest"]), "--cache", str(cache), "--teachers", "conv",
            "--model", "civt_micro", "--epochs", "1", "--batch-size", "32", "--workers", "1",
            "--device", "cpu", "--out", str(out), *extra]


@contextmanager
def moto_s3() -> Iterator[dict[str, str]]:
    """A moto S3 server on 127.0.0.1 (a real HTTP endpoint every S3 client talks to), with the
    environment every S3 client reads pointing at it (inherited by CLI subprocesses and
    torchrun ranks) for the length of the block."""
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
    try:
        yield env
    finally:
        server.stop()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a rendezvous endpoint)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _parents() -> dict[int, int]:
    """{pid: parent pid} of every process, read from /proc."""
    parent_of = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent_of[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parent_of


def children(pid: int) -> list[int]:
    """The processes ``pid`` started itself."""
    return sorted(p for p, parent in _parents().items() if parent == pid)


def descendants(pid: int) -> list[int]:
    """The live processes below ``pid`` (children, grandchildren...), read from /proc."""
    parent_of = _parents()
    found, frontier = [], {pid}
    while frontier:
        frontier = {p for p, parent in parent_of.items() if parent in frontier}
        found.extend(sorted(frontier))
    return found


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def assert_gone(pids: list[int], within: float = 10.0) -> None:
    """Every process of ``pids`` ends within ``within`` seconds (an orphaned loader worker
    would hold memory and the run's files)."""
    deadline = time.time() + within
    while time.time() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    left = [p for p in pids if alive(p)]
    assert not left, f"processes left behind: {left}"


def refused(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Assert a one-line refusal (exit 2, no traceback) containing every needle."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [l for l in proc.stderr.splitlines() if l.startswith("civt-cache: error: ")]
    assert len(errors) == 1, proc.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


@contextlib.contextmanager
def small_disk(tmp_path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (e.g. "256k") mounted at ``tmp_path/disk`` for the block: a disk that
    fills up. Skips the test where it cannot be mounted (mount needs root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
