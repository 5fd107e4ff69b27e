"""Hostile and careless inputs through the CLI (issue: no code runs from a file, no NaN trains,
memory stays bounded). One test per probe that misbehaved: each asserts the exit code, the one
line naming the file or flag, and that nothing was created or lost."""
from __future__ import annotations

import fcntl
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import zarr
from PIL import Image

from civt_cache import load_manifest
from civt_cache.cache.layout import unpack_targets
from civt_cache.data.manifest import DataManifest, ShardInfo
from civt_cache.data.shards import iter_shard_file
from civt_cache.fsutil import sha256_file
from civt_cache.views.engine import worker_image

from .conftest import TINY, cache_args, refused, run_cli, student_args


class _Payload:
    """A pickle that creates a file when loaded without ``weights_only``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _jpeg(value: int = 127, size: tuple[int, int] = (16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(buf, "JPEG", quality=50)
    return buf.getvalue()


def _bomb(width: int, height: int) -> bytes:
    """A ~630-byte JPEG whose header declares width x height (libjpeg fills the missing data)."""
    data = bytearray(_jpeg())
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    return path


def _dataset(root: Path, samples: list[tuple[str, bytes, int]], classes: int = 10) -> Path:
    """One shard of (key, image, label) samples and its manifest; returns the manifest."""
    root.mkdir(parents=True, exist_ok=True)
    shard = _tar(root / "d-000000.tar", [m for key, image, label in samples
                                         for m in ((f"{key}.jpg", image), (f"{key}.cls", str(label).encode()))])
    manifest = root / "d.json"
    DataManifest("d", [str(i) for i in range(classes)],
                 [ShardInfo(shard.name, len(samples), shard.stat().st_size, sha256_file(shard))]).save(manifest)
    return manifest


def _with_manifest(args: list[str], manifest: Path) -> list[str]:
    args = list(args)
    args[args.index("--manifest") + 1] = str(manifest)
    return args


def _teacher_with_bias(world: dict[str, Path], path: Path, value: float) -> str:
    """The world's conv teacher with one class's bias set to ``value`` (NaN, inf, 1e5)."""
    model = timm.create_model("resnet10t", num_classes=10)
    model.load_state_dict(torch.load(world["root"] / "conv.pth", weights_only=True))
    with torch.no_grad():
        model.fc.bias[3] = value
    torch.save(model.state_dict(), path)
    return f"conv=resnet10t:{path}"


# ---- row 1: a crafted checkpoint ---------------------------------------------------------------
def test_crafted_checkpoint_is_refused_and_never_runs(world, tmp_path) -> None:
    marker, run = tmp_path / "pwned", tmp_path / "run"
    run.mkdir()
    torch.save({"model": _Payload(marker)}, run / "last.pth.tar")
    refused(run_cli(*student_args(world, world["ref"], run, "--resume"), check=False),
            str(run / "last.pth.tar"), "refused: it holds io.open", "would run code")
    assert not marker.exists()
    refused(run_cli("eval", "--manifest", str(world["manifest"]), "--arch", "civt_micro",
                    "--checkpoint", str(run / "last.pth.tar"), "--device", "cpu", check=False),
            str(run / "last.pth.tar"), "refused")
    assert not marker.exists()


def test_truncated_or_garbage_checkpoint_is_one_line(world, tmp_path) -> None:
    run = tmp_path / "run"
    run_cli(*student_args(world, world["ref"], run, "--max-steps", "1", "--workers", "0"))
    ckpt = run / "last.pth.tar"
    whole = ckpt.read_bytes()
    for damaged in (whole[: len(whole) // 2], b"not a checkpoint" * 64):
        ckpt.write_bytes(damaged)
        refused(run_cli(*student_args(world, world["ref"], run, "--resume", "--workers", "0"),
                        check=False), str(ckpt), "not a readable checkpoint")
        assert ckpt.read_bytes() == damaged  # nothing rewritten


# ---- row 2: teachers that give NaN, infinity or huge logits -----------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_teacher_refused_where_its_output_is_made(world, tmp_path, value) -> None:
    spec = _teacher_with_bias(world, tmp_path / "bad.pth", value)
    out = tmp_path / "c"
    args = cache_args(world["root"], out)
    args[args.index("--teacher") + 1] = spec
    refused(run_cli(*args, check=False), "teacher 'conv'", "NaN or infinite",
            "unit (shard 0, block 0), epoch 0", "digits-val-000000.tar: sample")
    assert not list((out / "progress").glob("*.json"))  # nothing committed


@pytest.mark.slow
def test_huge_finite_logit_cannot_overflow_the_cache(world, tmp_path) -> None:
    """A logit of 1e5 (over float16's 65,504) is stored as a log-probability: finite, and
    verify and training agree with it."""
    spec = _teacher_with_bias(world, tmp_path / "big.pth", 1e5)
    out = tmp_path / "c"
    args = cache_args(world["root"], out)
    args[args.index("--teacher") + 1] = spec
    run_cli(*args)
    g = zarr.open_group(str(out), mode="r")
    m = load_manifest(world["manifest"])
    rows = [m.row_of(i, j) for i in range(len(m.shards)) for j in range(m.shards[i].num_samples)]
    logprobs, _, lse = unpack_targets(g["teachers/conv/targets"][:, rows])
    assert np.isfinite(logprobs).all() and (logprobs <= 0).all()
    assert (lse > 9e4).all() and (logprobs[..., 0] > -1).all() and (logprobs[..., 1:] == -65504).all()
    assert "-> OK" in run_cli("verify", str(out), "--full").stdout
    assert "-> OK" in run_cli("verify", str(out), "--samples", "4", "--device", "cpu").stdout
    run = tmp_path / "run"
    run_cli(*student_args(world, out, run, "--max-steps", "2", "--workers", "0"))
    state = torch.load(run / "last.pth.tar", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())


def test_non_finite_loss_stops_at_its_step_without_a_checkpoint(world, tmp_path) -> None:
    run = tmp_path / "run"
    line = refused(run_cli(*student_args(world, world["ref"], run, "--lr", "1e38", "--workers", "0"),
                           check=False), "loss is", "at step", "digits-val-", "rows")
    assert "epoch 1" in line
    assert not (run / "last.pth.tar").exists() and not (run / "metrics.jsonl").exists()


# ---- row 3: images declaring 9000 x 9000 pixels ------------------------------------------------
def _peak_rss_mb(args: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """Run the CLI under a parent that reports its child's peak RSS (the CLI's own, alone)."""
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    proc = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "civt_cache.cli", *args],
                          capture_output=True, text=True)
    return proc, int(proc.stdout.strip().splitlines()[-1]) / 1024


@pytest.mark.slow
def test_group_of_huge_images_decodes_within_a_pixel_budget(world, tmp_path) -> None:
    """Ten 630-byte JPEGs declaring 9000 x 9000 (2.4 GB decoded at once; each under PIL's bomb
    limit) in one pair group: decoded one budget at a time, the process peaks below 2 GB."""
    manifest = _dataset(tmp_path / "d", [(f"k{i}", _bomb(9000, 9000), i) for i in range(10)])
    args = _with_manifest(cache_args(world["root"], tmp_path / "c", "--epochs", "1"), manifest)
    proc, peak = _peak_rss_mb(args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rank 0: 1 unit(s), 10 views" in proc.stdout
    assert peak < 2048, peak


def test_image_over_the_pixel_limit_is_refused_by_name(world, tmp_path) -> None:
    manifest = _dataset(tmp_path / "d", [("small", _jpeg(), 0), ("huge", _bomb(9000, 9000), 1)])
    out = tmp_path / "c"
    args = ["--max-image-pixels", "50000000",
            *_with_manifest(cache_args(world["root"], out, "--epochs", "1"), manifest)]
    refused(run_cli(*args, check=False), "d-000000.tar: sample 'huge'", "9000x9000",
            "per-image limit of 50,000,000", "--max-image-pixels")
    assert not list((out / "progress").glob("*.json"))


# ---- rows 4, 5, 11, 12: manifests and shards ---------------------------------------------------
@pytest.mark.parametrize("damage,needle", [
    ("duplicate shard", "shards 0 and 2 are the same shard"),
    ("classes a string", "'classes' must be a list of class names"),
    ("num_samples 1e400", "num_samples is inf, not a whole number"),
    ("nested 100,000 deep", "nested too deeply"),
])
def test_bad_manifests_are_refused_at_load(world, tmp_path, damage, needle) -> None:
    raw = json.loads(world["manifest"].read_text())
    if damage == "duplicate shard":
        raw["shards"].append(raw["shards"][0])
        text = json.dumps(raw)
    elif damage == "classes a string":
        raw["classes"] = "0123456789"
        text = json.dumps(raw)
    elif damage == "num_samples 1e400":
        text = json.dumps(raw).replace(f'"num_samples": {raw["shards"][0]["num_samples"]}',
                                       '"num_samples": 1e400', 1)
    else:
        text = "[" * 100_000 + "]" * 100_000
    manifest = tmp_path / "m.json"
    manifest.write_text(text)
    out = tmp_path / "c"
    refused(run_cli(*_with_manifest(cache_args(world["root"], out), manifest), check=False),
            str(manifest), needle)
    assert not out.exists()


def test_label_outside_the_classes_refused_naming_the_sample(world, tmp_path) -> None:
    samples = [(f"k{i}", _jpeg(10 * i), i % 10) for i in range(6)] + [("odd", _jpeg(), 99)]
    manifest = _dataset(tmp_path / "d", samples)
    out = tmp_path / "c"
    refused(run_cli(*_with_manifest(cache_args(world["root"], out, "--epochs", "1"), manifest),
                    check=False), "d-000000.tar: sample 'odd' has label 99, outside the 10 classes")
    assert not list((out / "progress").glob("*.json"))
    run = tmp_path / "run"
    refused(run_cli(*_with_manifest(student_args(world, world["ref"], run, "--teachers", "none",
                                                 "--batch-size", "4"), manifest),
                    "--val-manifest", str(manifest), check=False),
            "sample 'odd' has label 99")


@pytest.mark.parametrize("members,needle", [
    ([("a.jpg", b"x"), ("a.cls", str(10 ** 12).encode())], "label 1000000000000, outside the 1,048,576 classes"),
    ([("a.jpg", b"x"), ("a.jpg", b"y"), ("a.cls", b"0")], "sample 'a' has a second image or 'jpg' member"),
    ([("a.jpg", b"x"), ("a.png", b"y"), ("a.cls", b"0")], "sample 'a' has a second image or 'png' member"),
])
def test_scan_shards_refuses_ambiguous_or_absurd_samples(tmp_path, members, needle) -> None:
    _tar(tmp_path / "s-000000.tar", members)
    m = tmp_path / "m.json"
    refused(run_cli("scan-shards", str(tmp_path / "s-000000.tar"), "--name", "s", "--manifest", str(m),
                    check=False), "s-000000.tar", needle)
    assert not m.exists()


def test_tar_member_declaring_a_terabyte_is_refused_unread(tmp_path) -> None:
    info = tarfile.TarInfo("a.jpg")
    info.size = 1 << 40
    blob = info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape") + b"x" * 512 + b"\0" * 1024
    (tmp_path / "t.tar").write_bytes(blob)
    m = tmp_path / "m.json"
    refused(run_cli("scan-shards", str(tmp_path / "t.tar"), "--name", "t", "--manifest", str(m),
                    check=False), "t.tar", "declares 1,099,511,627,776 bytes")
    assert not m.exists()


# ---- row 6: 16-bit images ----------------------------------------------------------------------
def test_sixteen_bit_png_keeps_its_range(tmp_path) -> None:
    level = np.full((12, 20), 128 * 257, np.uint16)  # 16-bit mid grey = 8-bit 128
    buf = io.BytesIO()
    Image.fromarray(level).save(buf, "PNG")
    assert worker_image(buf.getvalue(), "x.png").float().mean() == 128.0
    src = tmp_path / "src"
    for cls in ("a", "b"):
        (src / cls).mkdir(parents=True)
        (src / cls / "grey.png").write_bytes(buf.getvalue())
    m = tmp_path / "m.json"
    run_cli("make-shards", str(src), str(tmp_path / "out"), "--name", "p", "--manifest", str(m),
            "--workers", "1")
    shard = tmp_path / "out" / "p-000000.tar"
    for sample in iter_shard_file(shard):
        assert abs(np.asarray(Image.open(io.BytesIO(sample.image))).mean() - 128) < 1.5


# ---- rows 7, 8: resuming and sharing run folders -----------------------------------------------
@pytest.fixture(scope="module")
def stopped_run(world, tmp_path_factory) -> Path:
    """A run stopped after 2 steps (resumable)."""
    run = tmp_path_factory.mktemp("stopped") / "run"
    run_cli(*student_args(world, world["ref"], run, "--max-steps", "2", "--workers", "0"))
    return run


@pytest.mark.parametrize("flag,value,needle", [
    ("--batch-size", "16", "--batch-size: checkpoint 32, asked 16"),
    ("--lr", "0.01", "--lr: checkpoint None, asked 0.01"),
    ("--cache", "OTHER", "--cache: checkpoint"),
])
def test_resume_refuses_settings_that_change_the_run(world, stopped_run, tmp_path, flag, value, needle) -> None:
    before = (stopped_run / "last.pth.tar").read_bytes()
    if value == "OTHER":
        shutil.copytree(world["ref"], tmp_path / "other")
        value = str(tmp_path / "other")
    args = student_args(world, world["ref"], stopped_run, "--resume", "--workers", "0")
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    refused(run_cli(*args, check=False), str(stopped_run / "last.pth.tar"), "different run", needle)
    assert (stopped_run / "last.pth.tar").read_bytes() == before


def test_resume_without_checkpoint_says_it_starts_fresh(world, tmp_path) -> None:
    run = tmp_path / "run"
    proc = run_cli(*student_args(world, world["ref"], run, "--resume", "--max-steps", "1", "--workers", "0"))
    assert f"no checkpoint at {run / 'last.pth.tar'}; starting fresh" in proc.stdout + proc.stderr


def test_finished_run_resumed_changes_nothing(world, tmp_path) -> None:
    run = tmp_path / "run"
    run_cli(*student_args(world, world["ref"], run, "--workers", "0"))
    files = {p.name: p.read_bytes() for p in run.iterdir() if p.name != ".lock"}
    proc = run_cli(*student_args(world, world["ref"], run, "--resume", "--workers", "0"))
    assert "already finished its 1 epoch(s); nothing to do" in proc.stdout + proc.stderr
    assert "val_top1" in json.loads((run / "results.json").read_text())
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.name != ".lock"} == files


def test_a_run_folder_has_one_writer_and_one_run(world, stopped_run, tmp_path) -> None:
    with open(stopped_run / ".lock", "a+") as held:  # another run is writing it
        fcntl.lockf(held, fcntl.LOCK_EX)
        refused(run_cli(*student_args(world, world["ref"], stopped_run, "--resume", "--workers", "0"),
                        check=False), str(stopped_run), "another run is writing this folder")
    run = tmp_path / "run"
    run_cli(*student_args(world, world["ref"], run, "--workers", "0", "--max-steps", "1"))
    before = (run / "last.pth.tar").read_bytes()
    refused(run_cli(*student_args(world, world["ref"], run, "--workers", "0"), check=False),
            str(run), "holds another run's files (last.pth.tar, args.yaml)", "--force")
    assert (run / "last.pth.tar").read_bytes() == before
    run_cli(*student_args(world, world["ref"], run, "--workers", "0", "--force", "--seed", "3"))
    assert torch.load(run / "last.pth.tar", weights_only=True)["job"]["seed"] == 3
    assert [r["epoch"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())] == [0]


# ---- row 9: files are shareable -------------------------------------------------------------------
def test_files_are_written_with_the_umask(world, tmp_path) -> None:
    old = os.umask(0o022)
    try:
        out, run = tmp_path / "c", tmp_path / "run"
        run_cli(*cache_args(world["root"], out, "--epochs", "1"))
        run_cli(*student_args(world, out, run, "--max-steps", "1", "--workers", "0"))
        m = tmp_path / "m.json"
        run_cli("scan-shards", str(world["root"] / "shards"), "--name", "w", "--manifest", str(m))
    finally:
        os.umask(old)
    files = [*(out / "progress").iterdir(), run / "last.pth.tar", m]
    assert files and all(p.stat().st_mode & 0o777 == 0o644 for p in files), \
        {p.name: oct(p.stat().st_mode & 0o777) for p in files}


# ---- rows 10, 11: bounds and types before anything is created -----------------------------------
@pytest.mark.parametrize("command,flag,value,needle", [
    ("train-student", "--img-size", "20000", "img_size 20000: must be between 8 and 2048"),
    ("train-student", "--epochs", "100000000", "--epochs 100000000: must be in 1..10000"),
    ("cache-teachers", "--epochs", "10000000", "--epochs 10000000: must be in 1..10000"),
    ("cache-teachers", "--img-size", "20000", "img_size 20000"),
])
def test_bounds_refused_before_anything_is_created(world, tmp_path, command, flag, value, needle) -> None:
    out = tmp_path / "out"
    args = (cache_args(world["root"], out) if command == "cache-teachers"
            else student_args(world, world["ref"], out))
    args = [*args, flag, value] if flag not in args else args
    args[args.index(flag) + 1] = value
    proc = subprocess.run([sys.executable, "-m", "civt_cache.cli", *args], capture_output=True,
                          text=True, timeout=60)
    refused(proc, needle)
    assert not out.exists()


def test_wrong_types_and_a_file_as_out_are_one_line(world, tmp_path) -> None:
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(Path(TINY).read_text().replace("img_size = 32", 'img_size = "32"'))
    assert 'img_size = "32"' in pipeline.read_text()
    out = tmp_path / "c"
    args = cache_args(world["root"], out)
    args[args.index("--pipeline") + 1] = str(pipeline)
    refused(run_cli(*args, check=False), str(pipeline), "[recipe] img_size = '32': must be int")
    assert not out.exists()
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    refused(run_cli(*cache_args(world["root"], afile), check=False), str(afile), "that path is a file")
    refused(run_cli(*student_args(world, world["ref"], afile), check=False), str(afile), "that path is a file")
    assert afile.read_text() == "keep me"


def test_out_of_memory_is_said_as_such() -> None:
    """A device or host out of memory (in a teacher, the student, a decode) is one line that
    says so and what to lower, never a traceback blaming an input."""
    from civt_cache.errors import one_line_error

    for error in (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), MemoryError()):
        line = one_line_error(error)
        assert line is not None and line.startswith("out of memory") and "--batch-size" in line


def test_a_url_is_refused_never_made_a_local_folder(world, tmp_path) -> None:
    """Object-storage URLs (and WebDataset's pipe:) where this version needs a path: one line
    naming the URL, exit 2, and no folder called 's3:' (pathlib would collapse s3://b/k)."""
    from civt_cache.config import load_pipeline
    from civt_cache.errors import ConfigError
    from civt_cache.fsutil import refuse_url

    refused(run_cli("make-shards", "digits", "https://host/shards", "--name", "dg", cwd=tmp_path, check=False),
            "argument: 'https://host/shards' is a URL")  # shards are written to s3:// or gs:// only
    for url in ("pipe:curl -s https://h/x-{000..009}.tar", "gs://bucket/cache", "https://h/m.json"):
        with pytest.raises(ConfigError, match="is a URL"):
            refuse_url(url, "argument")
    refuse_url("regnety_006:/abs/teacher.pth", "argument")  # a teacher ARCH:FILE is no URL
    pipeline = tmp_path / "p.toml"
    pipeline.write_text('[cache]\nout = "https://host/cache"\n')
    with pytest.raises(ConfigError, match=r"p.toml: \[cache\] out: 'https://host/cache' is a URL"):
        load_pipeline(pipeline)
    raw = json.loads(world["manifest"].read_text())
    raw["shards"][0]["path"] = "ftp://host/" + raw["shards"][0]["path"]  # shards may be s3/gs/https only
    (tmp_path / "m.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="m.json: shard 0: 'ftp://host/.*' is a URL"):
        load_manifest(tmp_path / "m.json")
    refused(run_cli("cache-teachers", "--manifest", "ftp://bucket/m.json", cwd=tmp_path, check=False),
            "'ftp://bucket/m.json' is a URL")
    refused(run_cli("train-student", "--out", "s3://bucket/run", cwd=tmp_path, check=False),
            "'s3://bucket/run' is a URL", "checkpoints, pipelines and run folders are files")
    refused(run_cli("cache-teachers", "--out", "https://h/cache", cwd=tmp_path, check=False),
            "'https://h/cache' is a URL here", "caches and make-shards' output (s3://, gs://)")
    assert not any(p.name.endswith(":") for p in tmp_path.rglob("*"))
