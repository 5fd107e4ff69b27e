"""train-student as a timm train.py user drives it: timm's flag names for the recipe's knobs,
and a run's args.yaml read back with -c (timm's --config)."""
from __future__ import annotations

import yaml

from .conftest import refused, run_cli, student_args


def test_timms_flags_land_in_args_yaml_and_args_yaml_reruns_the_run(world, tmp_path) -> None:
    run = tmp_path / "run"
    args = student_args(world, world["ref"], run, "--max-steps", "1")
    args[args.index("--batch-size"):args.index("--batch-size") + 2] = []
    args[args.index("--workers"):args.index("--workers") + 2] = []
    run_cli(*args, "--weight-decay", "0.05", "--drop-path", "0.1", "-b", "64", "-j", "2", "--smoothing", "0.2",
            "--clip-grad", "3", "--min-lr", "2e-6", "--warmup-epochs", "0.25")
    saved = yaml.safe_load((run / "args.yaml").read_text())
    assert (saved["weight_decay"], saved["drop_path"], saved["batch_size"], saved["workers"]) == (0.05, 0.1, 64, 2)
    assert (saved["label_smoothing"], saved["clip_grad"], saved["min_lr"], saved["warmup_epochs"]) == (0.2, 3.0, 2e-6, 0.25)
    again = tmp_path / "again"
    # what args.yaml records of one start (where it stopped, resume/force) is not a setting to rerun
    run_cli("train-student", "-c", str(run / "args.yaml"), "--out", str(again), "--max-steps", "1")
    rerun = yaml.safe_load((again / "args.yaml").read_text())
    assert {**rerun, "out": None} == {**saved, "out": None}


def test_recipe_flags_must_match_the_cache(world, tmp_path) -> None:
    """--aa, --mixup, --cutmix and --reprob set the views; with a cache they must be its own."""
    proc = run_cli(*student_args(world, world["ref"], tmp_path / "run", "--reprob", "0.5"), check=False)
    refused(proc, "recipe")


def test_output_and_experiment_lay_the_run_out_as_timm(world, tmp_path) -> None:
    args = student_args(world, world["ref"], tmp_path / "unused", "--max-steps", "1")
    args[args.index("--out"):args.index("--out") + 2] = []
    run_cli(*args, "--output", str(tmp_path / "output"), "--experiment", "exp1")
    assert (tmp_path / "output" / "exp1" / "args.yaml").exists()
