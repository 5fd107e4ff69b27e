"""The job in the shape users run it: torchrun ranks with loader workers on shards of unequal
sizes, kills of processes that have workers, and ranks that fail or hang. The whole miniature
(two nodes, object storage, restarts) is tests/test_rehearsal.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from civt_cache import load_manifest
from civt_cache.loader.batches import epoch_plan, steps_per_epoch
from tests.conftest import TINY, assert_gone, descendants, run_cli, student_args

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def _torchrun(*args: str, port: int, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*TORCHRUN, "--nproc-per-node", "2", "--master-port", str(port), *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_ddp_with_loader_workers_on_uneven_shards_runs_the_same_steps_on_every_rank(world, tmp_path) -> None:
    """2 ranks x 3 workers on shards of 256 and 103 samples, batch 40 (a remainder on every
    worker): both ranks run the planned steps in each epoch, and only rank 0 reports a result.
    The val manifest has one shard, so rank 1 evaluates nothing and still joins the sum."""
    m = load_manifest(world["manifest"])
    assert sorted(s.num_samples for s in m.shards) == [103, 256]
    run = tmp_path / "run"
    one_shard = json.loads(world["manifest"].read_text())  # fewer val shards than ranks
    one_shard["shards"] = one_shard["shards"][:1]
    one_shard["num_samples"] = one_shard["shards"][0]["num_samples"]
    (tmp_path / "val1.json").write_text(json.dumps(one_shard))
    args = student_args(world, world["ref"], run, "--workers", "3", "--batch-size", "40", "--epochs", "2",
                        "--val-manifest", str(tmp_path / "val1.json"))
    proc = _torchrun("-m", "civt_cache.cli", *args, port=29541)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for epoch in range(2):
        steps = steps_per_epoch(m, 2, 40)
        for rank in range(2):
            assert f"epoch {epoch + 1}: rank {rank} of 2: {steps} steps" in proc.stderr, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["steps"] for r in rows] == [steps_per_epoch(m, 2, 40)] * 2
    results = [line for line in proc.stdout.splitlines() if line.startswith("val top-1")]
    assert len(results) == 1 and "nan" not in results[0] and str(run / "results.json") in results[0]
    assert sum("val top-1" in line for line in proc.stdout.splitlines()) == 3  # + rank 0's 2 epochs


def test_kill_9_of_a_run_with_workers_leaves_no_process_and_resume_continues(world, tmp_path) -> None:
    """SIGKILL of train-student with 2 loader workers (a node failure): the workers end within
    10 s, no lock is left held, and --resume with workers continues at once."""
    run = tmp_path / "run"
    args = [sys.executable, "-m", "civt_cache.cli",
            *student_args(world, world["ref"], run, "--workers", "2", "--epochs", "2", "--checkpoint-every", "2")]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (run / "last.pth.tar").exists():
        time.sleep(0.05)
    children = descendants(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert children, "the run had no loader workers when killed"
    assert_gone(children)
    resumed = run_cli(*student_args(world, world["ref"], run, "--workers", "2", "--epochs", "2", "--resume"))
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert [json.loads(l)["epoch"] for l in (run / "metrics.jsonl").read_text().splitlines()][-1] == 1


def test_a_rank_that_fails_ends_the_whole_job_naming_the_cause(world, tmp_path) -> None:
    """A shard damaged where only rank 1 reads it in epoch 1 (a bad disk on one node): the job
    ends within the bound with rank 1's one line naming the shard, never a silent wait."""
    m = load_manifest(world["manifest"])
    theirs = {s for batch in epoch_plan(m, 0, 0, 1, 2, 32, 1).batches for s, _, _ in batch}
    mine = {s for batch in epoch_plan(m, 0, 0, 0, 2, 32, 1).batches for s, _, _ in batch}
    shard = min(theirs - mine)
    raw = json.loads(world["manifest"].read_text())
    for i, entry in enumerate(raw["shards"]):
        src = Path(entry["path"])
        entry["path"] = str(tmp_path / src.name)
        data = bytearray(src.read_bytes())
        if i == shard:
            data[len(data) // 2] ^= 0xFF
        (tmp_path / src.name).write_bytes(bytes(data))
    (tmp_path / "m.json").write_text(json.dumps(raw))
    args = ["train-student", "--pipeline", TINY, "--manifest", str(tmp_path / "m.json"),
            "--val-manifest", str(world["manifest"]), "--teachers", "none", "--model", "civt_micro",
            "--epochs", "1", "--batch-size", "32", "--workers", "2", "--device", "cpu", "--out", str(tmp_path / "run")]
    start = time.time()
    proc = _torchrun("-m", "civt_cache.cli", *args, port=29542, env={**os.environ, "CIVT_DIST_TIMEOUT": "30"},
                     timeout=240)
    assert proc.returncode != 0
    assert time.time() - start < 200
    errors = [l for l in proc.stderr.splitlines() if "civt-cache: error:" in l]
    assert any(Path(m.shard_path(shard)).name in l for l in errors), proc.stderr[-3000:]


_HUNG_RANK = """
import sys, time
from civt_cache.distributed import all_reduce_sum, collective_failure, distributed_session
with distributed_session("cpu") as info:
    if info.rank == 1:
        time.sleep(60)  # hung: never joins the collective
    start = time.time()
    try:
        all_reduce_sum(info, [1.0])
    except RuntimeError as e:
        print(f"rank 0: {time.time() - start:.1f} s: {collective_failure(e)}", flush=True)
        sys.exit(3)
"""


def test_a_hung_rank_ends_the_collective_within_the_process_group_timeout(tmp_path) -> None:
    script = tmp_path / "hung.py"
    script.write_text(_HUNG_RANK)
    proc = _torchrun(str(script), port=29543, env={**os.environ, "CIVT_DIST_TIMEOUT": "5"}, timeout=120)
    assert proc.returncode != 0
    line = next(l for l in proc.stdout.splitlines() if l.startswith("rank 0:"))
    seconds, recognised = line.split(": ")[1], line.split(": ")[2]
    assert float(seconds.split()[0]) < 30 and recognised == "True", line


_OWN_BATCHNORM = """
import torch
from torch import nn
from civt_cache.distributed import all_gather_objects, data_parallel, distributed_session
with distributed_session("cpu") as info:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(2, 3, 8, 8))
    ddp = data_parallel(model, info)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(info.rank)) * (1 + info.rank)
        ddp(x).sum().backward()
        opt.step()
        opt.zero_grad()
    means = all_gather_objects(info, model[1].running_mean.clone())
    weights = all_gather_objects(info, model[0].weight.detach().clone())
    if info.rank == 0:
        print("buffers equal:", torch.equal(means[0], means[1]), "weights equal:", torch.equal(weights[0], weights[1]))
    del ddp  # no DDP outlives the process group (train-student drops its own with the run)
"""


def test_ranks_keep_their_own_batchnorm_statistics_and_share_the_weights(tmp_path) -> None:
    """DDP as co-advise runs it (``broadcast_buffers=False``): after steps on different data
    the ranks' BatchNorm running means differ, while their weights stay equal."""
    script = tmp_path / "bn.py"
    script.write_text(_OWN_BATCHNORM)
    proc = _torchrun(str(script), port=29544, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "buffers equal: False weights equal: True" in proc.stdout
