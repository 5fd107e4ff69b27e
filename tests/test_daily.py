"""Daily use (issue: the paper's schedule and the details of daily use): progress in logs,
thread choice, the version, flags through make."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import timm
import torch

from civt_cache.distributed import choose_threads

from .conftest import ROOT, cache_args, refused, run_cli, student_args

LINE = r"{}: [\d,]+/[\d,]+ {} \(\d+%\), [\d,.]+ {}/s, ETA \d+:\d\d"


def test_progress_lines_outside_a_terminal(world, tmp_path) -> None:
    """Under nohup or SLURM (no terminal) every long command prints a line every
    CIVT_PROGRESS_SECONDS: done of total, rate, ETA."""
    env = {**os.environ, "CIVT_PROGRESS_SECONDS": "0"}
    proc = run_cli(*cache_args(world["root"], tmp_path / "c", "--epochs", "1"), env=env)
    assert re.search(LINE.format("cache-teachers", "views", "views"), proc.stderr), proc.stderr[-2000:]
    proc = run_cli(*student_args(world, tmp_path / "c", tmp_path / "run", "--workers", "0"), env=env)
    assert re.search(LINE.format(r"epoch 1/1", "steps", "steps") + r", loss [\d.]+", proc.stderr)
    assert re.search(LINE.format("evaluate digits-val", "images", "images"), proc.stderr)
    quiet = run_cli(*student_args(world, tmp_path / "c", tmp_path / "run2", "--workers", "0",
                                  "--max-steps", "2"), env={**env, "CIVT_PROGRESS_SECONDS": "3600"})
    # a long interval: no line per step, one when the epoch's counter closes
    assert len(re.findall(LINE.format(r"epoch 1/1", "steps", "steps"), quiet.stderr)) == 1


def test_threads_are_chosen_from_the_cores_left_after_workers(monkeypatch) -> None:
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        cores = len(os.sched_getaffinity(0))
        assert choose_threads(0, 1) == max(1, cores - 1)
        assert choose_threads(0, 64) == 1
        assert choose_threads(3, 1) == 3  # --threads wins
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torchrun's: kept
        torch.set_num_threads(1)
        assert choose_threads(0, 0) == 1
    finally:
        torch.set_num_threads(before)


def test_version_and_make_passes_extra_flags(tmp_path) -> None:
    from civt_cache import __version__

    assert run_cli("--version").stdout.strip() == f"civt-cache {__version__}"
    dry = subprocess.run(["make", "-n", "train-student", "ARGS=--resume --threads 2", "PY=" + sys.executable,
                          "CLI=civt-cache"], cwd=ROOT, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    assert "civt-cache train-student --pipeline pipelines/demo.toml --resume --threads 2" in dry.stdout


def test_run_records_are_written_and_readable(world, tmp_path) -> None:
    """Like timm's train.py: the merged settings (args.yaml), a per-epoch summary.csv, the best
    weights (model_best.pth.tar, which `eval --json` reads), EMA weights and TensorBoard when asked."""
    import csv
    import json

    import yaml

    run = tmp_path / "run"
    run_cli(*student_args(world, world["ref"], run, "--workers", "0", "--model-ema",
                          "--model-ema-decay", "0.9", "--log", "tensorboard"))
    args = yaml.safe_load((run / "args.yaml").read_text())
    assert (args["model"], args["batch_size"], args["model_ema"]) == ("civt_micro", 32, True)
    rows = list(csv.DictReader((run / "summary.csv").open()))
    assert len(rows) == 1 and rows[0]["epoch"] == "0"
    assert list(rows[0])[:6] == ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr"]  # timm's
    assert 0 <= float(rows[0]["eval_top1"]) <= 100 and 0 <= float(rows[0]["ema_val_top1"]) <= 100
    assert float(rows[0]["eval_loss"]) > 0
    state = torch.load(run / "last.pth.tar", weights_only=True)
    assert state["state_dict_ema"].keys() == state["state_dict"].keys()
    best = torch.load(run / "model_best.pth.tar", weights_only=True)
    assert best["epoch"] == 0 and best["val_top1"] == float(rows[0]["eval_top1"])
    assert (run / "checkpoint-0.pth.tar").exists()
    # timm reads the run as its own: create_model(checkpoint_path=...), and the EMA with use_ema
    model = timm.create_model("civt_micro", num_classes=10, img_size=32, checkpoint_path=str(run / "model_best.pth.tar"))
    timm.models.load_checkpoint(model, str(run / "model_best.pth.tar"), use_ema=False)
    assert all(torch.equal(v, best["state_dict"][k]) for k, v in model.state_dict().items())
    timm.models.load_checkpoint(model, str(run / "model_best.pth.tar"), use_ema=True)
    assert all(torch.equal(v, best["state_dict_ema"][k]) for k, v in model.state_dict().items())
    assert not all(torch.equal(v, best["state_dict"][k]) for k, v in model.state_dict().items())
    # eval takes the architecture from the checkpoint, the EMA weights with --use-ema
    evals = {ema: json.loads(run_cli("eval", "--manifest", str(world["manifest"]), "--checkpoint",
                                     str(run / "model_best.pth.tar"), "--device", "cpu", "--json",
                                     *(["--use-ema"] if ema else [])).stdout) for ema in (False, True)}
    assert evals[False]["val_top1"] == float(rows[0]["eval_top1"])
    assert evals[True]["val_top1"] == float(rows[0]["ema_val_top1"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    (scalar,) = events.Scalars("val_top1")
    assert scalar.step == 0 and abs(scalar.value - float(rows[0]["eval_top1"])) < 1e-4


def test_every_command_reads_a_pipeline(world, tmp_path) -> None:
    """make-shards, train-teacher, eval, inspect and verify take their settings from a pipeline
    file (their own table, or the ones they share); flags override; a missing one is named."""
    root = world["root"]
    p = tmp_path / "p.toml"
    p.write_text(f"""
[recipe]
img_size = 32
crop_scale = [0.35, 1.0]
[data]
src = "digits"
name = "dg"
shards = "{tmp_path / 'shards'}"
shard_size = 512
manifest = "{tmp_path / 'dg.json'}"
[cache]
out = "{world['ref']}"
[student]
manifest = "{world['manifest']}"
val_manifest = "{world['manifest']}"
model = "civt_micro"
out = "{tmp_path / 'run'}"
[teachers.conv]
arch = "resnet10t"
checkpoint = "{root / 'conv.pth'}"
[teachers.fresh]
arch = "resnet10t"
checkpoint = "{tmp_path / 'fresh.pth'}"
epochs = 1
""")
    out = run_cli("make-shards", "--pipeline", str(p)).stdout
    assert "dg-train" in out and (tmp_path / "dg-train.json").exists() and (tmp_path / "dg-val.json").exists()
    assert len(list((tmp_path / "shards").glob("dg-train-*.tar"))) == 3  # 1,438 images, 512 a shard
    assert "units" in run_cli("inspect", "--pipeline", str(p)).stdout
    assert run_cli("verify", "--full", "--pipeline", str(p)).returncode == 0
    metrics = json.loads(run_cli("eval", "--pipeline", str(p), "--name", "conv", "--json",
                                 "--device", "cpu").stdout)
    assert set(metrics) >= {"val_top1", "val_top5"}
    run_cli("train-teacher", "--pipeline", str(p), "--name", "fresh", "--workers", "0", "--batch-size", "64")
    assert (tmp_path / "fresh.pth").exists()
    missing = run_cli("eval", "--pipeline", str(p), "--device", "cpu", check=False)  # no model_best.pth.tar yet
    assert missing.returncode != 0
    refused(run_cli("eval", "--pipeline", str(p), "--name", "nope", check=False), "no [teachers.nope] table")
