"""Nothing wrong is reported as right: mismatched classes, URLs without a bucket, non-finite
settings, a full disk, crafted pickles, refusals that leave files behind, result lines
without results. Each is one line, exit 2, before anything is written."""
from __future__ import annotations

import errno
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from civt_cache.errors import one_line_error
from civt_cache.fsutil import atomic_write_with
from tests.conftest import TINY, refused, run_cli, student_args


def _manifest_with(world, tmp_path: Path, name: str, **changes) -> Path:
    raw = json.loads(world["manifest"].read_text())
    raw.update(changes)
    path = tmp_path / name
    path.write_text(json.dumps(raw))
    return path


def test_a_val_manifest_of_other_classes_is_refused_naming_the_first_difference(world, tmp_path) -> None:
    classes = json.loads(world["manifest"].read_text())["classes"]
    renamed = _manifest_with(world, tmp_path, "renamed.json", classes=[f"digit_{c}" for c in classes])
    run = tmp_path / "run"
    proc = run_cli(*student_args(world, world["ref"], run, "--val-manifest", str(renamed)), check=False)
    refused(proc, str(renamed), "class 0 is '0' in one and 'digit_0' in the other")
    assert not run.exists()
    fewer = _manifest_with(world, tmp_path, "two.json", classes=classes[:2], num_classes=2)
    refused(run_cli(*student_args(world, world["ref"], run, "--val-manifest", str(fewer)), check=False),
            "10 classes against 2")


def test_train_teacher_refuses_a_val_manifest_of_other_classes(world, tmp_path) -> None:
    classes = json.loads(world["manifest"].read_text())["classes"]
    renamed = _manifest_with(world, tmp_path, "renamed.json", classes=[f"digit_{c}" for c in classes])
    proc = run_cli("train-teacher", "--pipeline", TINY, "--arch", "resnet10t", "--manifest", str(world["manifest"]),
                   "--val-manifest", str(renamed), "--epochs", "1", "--out", str(tmp_path / "t.pth"), check=False)
    refused(proc, str(renamed), "class 0 is '0' in one and 'digit_0' in the other")
    assert not (tmp_path / "t.pth").exists()


def test_eval_refuses_a_manifest_of_other_classes_than_the_checkpoint(world, tmp_path) -> None:
    classes = json.loads(world["manifest"].read_text())["classes"]
    fewer = _manifest_with(world, tmp_path, "two.json", classes=classes[:2], num_classes=2)
    proc = run_cli("eval", "--manifest", str(fewer), "--arch", "resnet10t", "--checkpoint",
                   str(world["root"] / "conv.pth"), "--img-size", "32", check=False)
    refused(proc, str(fewer), "lists 2 classes", "predicts 10")


@pytest.mark.parametrize("url", ["s3://", "gs://", "s3:///x"])
def test_a_url_without_a_bucket_is_refused_before_anything_is_written(world, tmp_path, url) -> None:
    proc = run_cli(*["cache-teachers", "--pipeline", TINY, "--manifest", str(world["manifest"]),
                     "--teacher", f"conv=resnet10t:{world['root'] / 'conv.pth'}", "--out", url],
                   cwd=tmp_path, check=False)
    refused(proc, "--out", "names no bucket")
    assert list(tmp_path.iterdir()) == []
    refused(run_cli(*student_args(world, url, tmp_path / "run"), cwd=tmp_path, check=False), "--cache",
            "names no bucket")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag", ["--lr", "--temperature", "--weight-decay", "--min-lr"])
def test_non_finite_settings_are_refused_at_start(world, tmp_path, flag) -> None:
    if flag in ("--weight-decay", "--min-lr"):  # pipeline keys of train-student
        pipeline = tmp_path / "p.toml"
        pipeline.write_text(Path(TINY).read_text() + f"{flag[2:].replace('-', '_')} = inf\n")
        args = student_args(world, world["ref"], tmp_path / "run")
        args[args.index("--pipeline") + 1] = str(pipeline)
        refused(run_cli(*args, check=False), f"[student] {flag[2:].replace('-', '_')} inf", "finite")
    else:
        refused(run_cli(*student_args(world, world["ref"], tmp_path / "run", flag, "inf"), check=False),
                f"{flag} inf: must be a finite number")
    assert not (tmp_path / "run").exists()


def test_a_full_disk_in_torch_save_is_one_line_naming_the_file_and_the_space(tmp_path) -> None:
    """torch.save reports a full disk as its zip writer's RuntimeError; any writer's ENOSPC
    without a file name gets the file's name; the old file is untouched."""
    path = tmp_path / "last.pth.tar"
    path.write_bytes(b"old")

    def torch_full(f) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    def os_full(f) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    for writer in (torch_full, os_full):
        with pytest.raises(OSError) as got:
            atomic_write_with(path, writer)
        line = one_line_error(got.value)
        assert line.startswith(f"{path}: disk full") and "MB left on its file system" in line, line
        assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["last.pth.tar"]


class _Runs:
    def __reduce__(self):
        return (os.system, ("echo ran",))


@pytest.mark.parametrize("form", ["torch.save", "pickle"])
def test_a_crafted_pickle_is_named_for_the_code_it_would_run(world, tmp_path, form) -> None:
    bad = tmp_path / "teacher.pth"
    if form == "torch.save":
        torch.save({"model": _Runs()}, bad)
    else:
        bad.write_bytes(pickle.dumps({"model": _Runs()}, protocol=4))
    proc = run_cli("eval", "--manifest", str(world["manifest"]), "--arch", "resnet10t", "--checkpoint", str(bad),
                   check=False)
    refused(proc, str(bad), f"holds {os.system.__module__}.system, which would run code")
    assert "ran" not in proc.stdout


@pytest.mark.parametrize("target", ["/dev/zero", "fifo"])
def test_a_refused_run_leaves_no_folder_behind(world, tmp_path, target) -> None:
    if target == "fifo":
        target = str(tmp_path / "fifo.tar")
        os.mkfifo(target)
    raw = json.loads(world["manifest"].read_text())
    raw["shards"][0]["path"] = target
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps(raw))
    args = student_args(world, world["ref"], tmp_path / "run", "--teachers", "none", "--cache", "")
    args[args.index("--manifest") + 1] = str(manifest)
    refused(run_cli(*args, check=False), target, "not a regular file")
    assert not (tmp_path / "run").exists()


def test_a_stop_by_max_steps_says_so_and_prints_no_result(world, tmp_path) -> None:
    run = tmp_path / "run"
    proc = run_cli(*student_args(world, world["ref"], run, "--max-steps", "1", "--workers", "0"))
    assert "val top-1" not in proc.stdout and "nan" not in proc.stdout
    assert f"stopped by --max-steps at epoch 1 step 1; --resume continues from {run / 'last.pth.tar'}" in proc.stdout
    assert not (run / "results.json").exists()


def test_scan_shards_like_the_training_manifest_takes_its_classes_and_warns_of_fewer(world, tmp_path) -> None:
    """A val split holding two of the ten classes, scanned without --classes: numbered on its
    own it would call its labels 0 and 1 the only classes; with --like it gets the training
    manifest's names and a warning that it holds 2 of 10."""
    from civt_cache import load_manifest
    from civt_cache.data.digits import digits_items
    from civt_cache.data.writer import write_shards

    classes, items = digits_items()["val"]
    two = [item for item in items if item.label in (3, 7)]
    write_shards(two, classes, tmp_path / "shards", "two", 64, 0, "digits", tmp_path / "made.json")
    proc = run_cli("scan-shards", str(tmp_path / "shards"), "--name", "two", "--manifest",
                   str(tmp_path / "two.json"), "--like", str(world["manifest"]))
    assert "holds samples of 2 of digits-val's 10 classes" in proc.stderr
    assert load_manifest(tmp_path / "two.json").classes == load_manifest(world["manifest"]).classes


def test_a_schedule_that_would_leave_the_student_at_chance_is_warned_of(world, tmp_path) -> None:
    """Warmup as long as the run, and DeiT's lr scaling at a small batch: said before training."""
    proc = run_cli(*student_args(world, world["ref"], tmp_path / "run", "--max-steps", "1", "--workers", "0"))
    out = proc.stdout + proc.stderr
    assert "warning: learning rate 3.1e-05 = 5e-4 x global batch 32 / 512 is small; give --lr" in out
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(Path(TINY).read_text().replace("warmup_epochs = 0.5", "warmup_epochs = 2"))
    args = student_args(world, world["ref"], tmp_path / "run2", "--max-steps", "1", "--workers", "0", "--lr", "1e-3")
    args[args.index("--pipeline") + 1] = str(pipeline)
    out = run_cli(*args).stdout
    assert "warning: warmup of 2 epochs is as long as the 1 epoch(s)" in out and "is small" not in out
