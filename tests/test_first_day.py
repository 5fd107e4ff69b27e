"""A new user's first day, at its edges: every refusal leaves nothing that pins a setting, a
refused run stays refused under torchrun's restarts, and what a daily timm user types works."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import yaml
import torch

from tests.conftest import (
    TINY,
    assert_gone,
    cache_args,
    children,
    descendants,
    free_port,
    refused,
    run_cli,
    small_disk,
    student_args,
)


def _own_shards(world: dict, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the data (shards and manifest) this test may damage: (manifest, first shard)."""
    shards = tmp_path / "shards"
    shutil.copytree(world["root"] / "shards", shards)
    raw = json.loads(world["manifest"].read_text())
    for s in raw["shards"]:
        s["path"] = str(shards / Path(s["path"]).name)
    (tmp_path / "val.json").write_text(json.dumps(raw))
    shutil.copy(world["root"] / "conv.pth", tmp_path / "conv.pth")
    return tmp_path / "val.json", shards / Path(raw["shards"][0]["path"]).name


def test_refusals_before_the_first_unit_create_no_cache(world, tmp_path) -> None:
    """A teacher of other classes, a pipe: shard not allowed, a reversed crop scale: each is
    refused before the cache folder exists, so the corrected rerun starts clean."""
    manifest, _ = _own_shards(world, tmp_path)
    root = manifest.parent
    out = tmp_path / "cache"
    torch.manual_seed(0)
    torch.save(timm.create_model("resnet10t", num_classes=5).state_dict(), tmp_path / "five.pth")
    args = cache_args(root, out)
    args[args.index("--teacher") + 1] = f"conv=resnet10t:{tmp_path / 'five.pth'}"
    refused(run_cli(*args, check=False), "predicts 5 classes", "the data has 10")
    assert not out.exists()

    raw = json.loads(manifest.read_text())
    raw["shards"][0]["path"] = f"pipe:cat {raw['shards'][0]['path']}"
    (root / "piped.json").write_text(json.dumps(raw))
    args = cache_args(root, out)
    args[args.index("--manifest") + 1] = str(root / "piped.json")
    refused(run_cli(*args, check=False), "pipe:cat", "CIVT_ALLOW_PIPE=1")
    assert not out.exists()

    reversed_scale = tmp_path / "reversed.toml"
    reversed_scale.write_text(Path(TINY).read_text().replace("crop_scale = [0.35, 1.0]", "crop_scale = [1.0, 0.1]"))
    args = cache_args(root, out)
    args[args.index("--pipeline") + 1] = str(reversed_scale)
    refused(run_cli(*args, check=False), "crop_scale [1.0, 0.1]", "0 < low <= high")
    assert not out.exists()


def test_a_cache_with_no_committed_unit_pins_no_setting(world, tmp_path) -> None:
    """A shard that fails its checksum stops the run in its first unit, after the cache was made:
    the rerun with the shard restored and another seed is not refused ("seed: cache has 0") but
    makes the cache again, says so, and finishes it sound. One unit committed pins the seed."""
    manifest, shard = _own_shards(world, tmp_path)
    good = shard.read_bytes()
    blob = bytearray(good)
    blob[5000] ^= 0x01
    shard.write_bytes(bytes(blob))
    out = tmp_path / "cache"
    refused(run_cli(*cache_args(manifest.parent, out), check=False), str(shard), "sha256 differs")
    assert (out / "zarr.json").exists() and not list((out / "progress").glob("s*.json"))
    shard.write_bytes(good)
    proc = run_cli(*cache_args(manifest.parent, out, "--seed", "1"))
    assert "holds no committed unit, so it is made again" in proc.stderr and "seed: cache has 0, asked 1" in proc.stderr
    assert "complete, all sound -> OK" in run_cli("verify", str(out), "--full").stdout
    pinned = run_cli(*cache_args(manifest.parent, out, "--seed", "2"), check=False)
    refused(pinned, "cache does not match the request")
    assert "seed: cache has 1, asked 2" in pinned.stderr


def _torchrun(*args: str, port: int) -> subprocess.CompletedProcess:
    """One torchrun node of the README's multi-node shape (c10d rendezvous, torchrun's default
    run id ``none``, restarts allowed), one rank."""
    env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "1",
                           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--max-restarts", "2",
                           "-m", "civt_cache.cli", *args], capture_output=True, text=True, env=env, timeout=600)


def test_a_refused_start_stays_refused_through_torchruns_restarts(world, tmp_path) -> None:
    """The README's torchrun command run a second time into the same --out: refused ("holds
    another run's files") at the start and at every restart torchrun makes of it, never turned
    into a resume that prints the old run's result; the old run's files are untouched."""
    run = tmp_path / "run"
    first = _torchrun(*student_args(world, world["ref"], run), port=free_port())
    assert first.returncode == 0, first.stderr[-3000:]
    kept = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}
    again = _torchrun(*student_args(world, world["ref"], run), port=free_port())
    out = again.stdout + again.stderr
    assert again.returncode != 0
    refusals = [l for l in out.splitlines() if "holds another run's files" in l]
    assert len(refusals) == 3, out[-3000:]  # the start and torchrun's 2 restarts
    assert sum("torchrun restart" in l and "stays refused" in l for l in refusals) == 2
    assert "continuing the run" not in out and "val top-1" not in out and "already finished" not in out
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"} == kept


def test_eval_takes_the_size_a_checkpoint_records_and_says_it(world, tmp_path) -> None:
    """A timm train.py checkpoint of a 32 px model is scored at 32 px (its args.img_size), not at
    its architecture's cfg (176 px for resnet10t); a Hugging Face folder (model.safetensors +
    config.json) is taken as --teacher takes it, at its config's input_size; the line says which."""
    from safetensors.torch import save_file

    sd = torch.load(world["root"] / "conv.pth", weights_only=True)
    timm_ckpt = tmp_path / "timm-train.pth.tar"
    torch.save({"epoch": 3, "arch": "resnet10t", "state_dict": sd,
                "args": argparse.Namespace(model="resnet10t", img_size=32, input_size=None)}, timm_ckpt)
    hf = tmp_path / "hf"
    hf.mkdir()
    save_file(sd, hf / "model.safetensors")
    (hf / "config.json").write_text(json.dumps({"architecture": "resnet10t", "num_classes": 10,
                                                "pretrained_cfg": {"input_size": [3, 32, 32]}}))
    scores = {}
    for ckpt, where in ((timm_ckpt, "its args.img_size"), (hf, "config.json's input_size")):
        proc = run_cli("eval", "--manifest", str(world["manifest"]), "--checkpoint", str(ckpt), "--json")
        assert f"eval: resnet10t at 32 px ({ckpt}: {where}): short side resized to 36, centre crop 32" in proc.stderr
        scores[where] = json.loads(proc.stdout)["val_top1"]
    bare = run_cli("eval", "--manifest", str(world["manifest"]), "--checkpoint", str(world["root"] / "conv.pth"),
                   "--arch", "resnet10t", "--json")
    assert "at 176 px (resnet10t's default cfg; the checkpoint records no size)" in bare.stderr
    at_32 = run_cli("eval", "--manifest", str(world["manifest"]), "--checkpoint", str(world["root"] / "conv.pth"),
                    "--arch", "resnet10t", "--img-size", "32", "--json")
    assert "at 32 px (--img-size)" in at_32.stderr
    assert scores["its args.img_size"] == scores["config.json's input_size"] == json.loads(at_32.stdout)["val_top1"]


def test_a_lease_that_never_expires_is_taken_over_and_no_wait_is_silent(world, tmp_path) -> None:
    """A lease whose ``expires`` is NaN (shown as expired by inspect) is taken over by --claim
    after one lease, as an unreadable one is, instead of being waited on for ever; the wait
    says which unit it waits for and who holds it."""
    cache = tmp_path / "cache"
    shutil.copytree(world["ref"], cache)
    (cache / "progress" / "s000000-b0000.json").unlink()
    (cache / "progress" / "index.json.gz").unlink(missing_ok=True)
    (cache / "leases").mkdir(exist_ok=True)
    (cache / "leases" / "s000000-b0000.g0000.json").write_text('{"owner": "elsewhere:1", "expires": NaN}')
    proc = run_cli(*cache_args(world["root"], cache, "--claim", "--lease-seconds", "2"))
    assert "waiting for 1 unit(s) other processes are computing: unit (shard 0, block 0) is leased by unreadable" \
        in proc.stderr
    assert "complete, all sound -> OK" in run_cli("verify", str(cache), "--full").stdout


def test_a_loader_worker_killed_as_the_oom_killer_does_ends_in_one_line(world, tmp_path) -> None:
    """kill -9 of one of train-student's loader workers (outside torchrun): one line naming the
    worker, the likely cause (memory) and how to continue, exit 2; no process is left behind."""
    args = student_args(world, world["ref"], tmp_path / "run", "--epochs", "50", "--cycle-cache", "--workers", "2")
    proc = subprocess.Popen([sys.executable, "-m", "civt_cache.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen: set[int] = set()
    deadline = time.time() + 120
    try:
        while time.time() < deadline and len(children(proc.pid)) < 2 and proc.poll() is None:
            time.sleep(0.1)
        workers = children(proc.pid)
        assert len(workers) >= 2, "no loader workers appeared"
        seen |= set(descendants(proc.pid))
        os.kill(workers[-1], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    line = [ln for ln in err.splitlines() if ln.startswith("civt-cache: error: ")]
    assert len(line) == 1 and f"pid {workers[-1]}" in line[0] and "out-of-memory" in line[0] and "--resume" in line[0]
    assert_gone(sorted(seen))


def test_pipelines_with_tables_or_depth_this_tool_would_ignore_are_refused(world, tmp_path) -> None:
    """``[studnet] lr = 1.0`` (a typo) and a top-level key were ignored, training at the default
    lr; a pipeline nested 100,000 deep ended in a RecursionError traceback."""
    for name, text, needle in (("typo", "[studnet]\nlr = 1.0\n", "[studnet] is not a pipeline table"),
                               ("top", "lr = 1.0\n", "'lr' is not a pipeline table"),
                               ("deep", "a = " + "[" * 100_000 + "]" * 100_000 + "\n", "nested too deeply")):
        pipeline = tmp_path / f"{name}.toml"
        pipeline.write_text(text + Path(TINY).read_text() if name != "deep" else text)  # before any table
        args = student_args(world, world["ref"], tmp_path / "run")
        args[args.index("--pipeline") + 1] = str(pipeline)
        refused(run_cli(*args, check=False), str(pipeline), needle)
        assert not (tmp_path / "run").exists()


def test_a_dangling_or_looping_symlink_as_out_is_refused_naming_it(world, tmp_path) -> None:
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for link in ("dangling", "loop"):
        out = tmp_path / link
        refused(run_cli(*cache_args(world["root"], out), check=False), str(out), "symbolic link to nothing")
        refused(run_cli(*student_args(world, world["ref"], out), check=False), str(out), "symbolic link to nothing")
        assert out.is_symlink() and not (tmp_path / "nowhere").exists()


def test_make_shards_on_a_full_disk_names_the_shard_and_the_space_and_leaves_no_partial(tmp_path) -> None:
    """A full disk while make-shards writes: one line naming the shard file and the space left,
    no hidden ``.partial`` file, no manifest."""
    from PIL import Image

    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (src / cls).mkdir(parents=True)
        for i in range(40):  # noise: ~12 kB each as JPEG, 480 kB in all
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(src / cls / f"{i}.jpg", quality=95)
    with small_disk(tmp_path, "192k") as disk:
        out = disk / "shards"
        proc = run_cli("make-shards", str(src), str(out), "--name", "x", "--manifest", str(tmp_path / "m.json"),
                       "--shard-size", "16", "--workers", "1", check=False)
        line = refused(proc, "disk full", "MB left on its file system")
        assert f"{out}/x-0000" in line, line
        assert not [p.name for p in out.iterdir() if p.name.startswith(".")], list(out.iterdir())
        assert not (tmp_path / "m.json").exists()


def test_a_mid_epoch_checkpoint_keeps_the_seconds_of_the_images_it_counts(world, tmp_path) -> None:
    """A checkpoint mid-epoch counted its steps' images but not their seconds when no progress
    line had come yet (--log-every beyond them), so the epoch resumed from it (a torchrun restart)
    reported 863 img/s for a real 94: the images and the seconds are now counted together."""
    run = tmp_path / "run"
    run_cli(*student_args(world, world["ref"], run, "--epochs", "2", "--max-steps", "6", "--log-every", "50"))
    sums = torch.load(run / "last.pth.tar", weights_only=True)["ranks"][0]["sums"]
    assert sums["n"] == 6 * 32 and sums["seconds"] > 0
    run_cli(*student_args(world, world["ref"], run, "--epochs", "2", "--resume", "--log-every", "50"))
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    per_step = first["train_seconds"] / first["steps"]
    assert per_step >= 0.5 * sums["seconds"] / 6, (first, sums)  # no epoch faster than its own first steps


@pytest.mark.parametrize("damaged", ["views/params/zarr.json", "teachers/conv/targets/zarr.json"])
def test_a_truncated_array_metadata_file_is_named_and_repair_writes_it_again(world, tmp_path, damaged) -> None:
    from tests.test_faults import assert_same_cache

    cache = tmp_path / "cache"
    shutil.copytree(world["ref"], cache)
    meta = cache / damaged
    meta.write_bytes(meta.read_bytes()[:40])
    refused(run_cli(*student_args(world, cache, tmp_path / "run"), check=False), str(meta), "--repair")
    refused(run_cli(*cache_args(world["root"], cache), check=False), str(meta), "--repair")
    proc = run_cli(*cache_args(world["root"], cache, "--repair"))
    assert f"--repair: wrote {meta} again" in proc.stderr
    assert "complete, all sound -> OK" in run_cli("verify", str(cache), "--full").stdout
    assert_same_cache(cache, world["ref"])


def test_the_cache_carries_its_recipe(world, tmp_path) -> None:
    """train-student --cache needs no pipeline to repeat the cache's views: it trains on the
    recipe the cache was made with; a flag or a pipeline value that contradicts it is refused,
    naming the flag or the file."""
    from civt_cache.cache.store import CacheStore

    args = student_args(world, world["ref"], tmp_path / "run")
    at = args.index("--pipeline")
    bare = args[:at] + args[at + 2:]
    run_cli(*bare)
    recorded = yaml.safe_load((tmp_path / "run" / "args.yaml").read_text())["recipe"]
    assert recorded == CacheStore.open(world["ref"]).spec.recipe.to_json()
    refused(run_cli(*bare, "--img-size", "64", "--out", str(tmp_path / "r2"), check=False),
            "--img-size 64", "was made with img_size = 32")
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(Path(TINY).read_text().replace("[recipe]\n", "[recipe]\nerase_prob = 0.5\n"))
    args[at + 1] = str(pipeline)
    refused(run_cli(*args[:-1], str(tmp_path / "r3"), check=False), f"{pipeline}: [recipe] erase_prob 0.5",
            "was made with erase_prob = 0.25")
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r3").exists()


def test_resume_as_timm_users_type_it(world, tmp_path) -> None:
    """``--resume RUN`` or ``--resume RUN/last.pth.tar`` alone continues a run with its own
    settings (its args.yaml, which records the world size); a changed setting is refused by its
    real flag (``--smoothing``), the views' change said key by key, the fix named."""
    run = tmp_path / "run"
    run_cli(*student_args(world, world["ref"], run, "--epochs", "2", "--max-steps", "3", "--smoothing", "0.2"))
    assert yaml.safe_load((run / "args.yaml").read_text())["world_size"] == 1
    refused(run_cli("train-student", "--resume", str(run / "args.yaml"), check=False), "not a run's last.pth.tar")
    refused(run_cli("train-student", "--resume", str(run), "--smoothing", "0.1", check=False),
            "--smoothing: checkpoint 0.2, asked 0.1", f"`--resume {run}` alone takes the run's own settings")
    assert "--label-smoothing" not in run_cli("train-student", "--resume", str(run), "--smoothing", "0.1",
                                              check=False).stderr
    proc = run_cli("train-student", f"--resume={run / 'last.pth.tar'}", "--max-steps", "5")
    assert "--resume continues from" in proc.stdout
    proc = run_cli("train-student", "--resume", str(run))
    assert "val top-1" in proc.stdout
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]


def _stop_when(args: list[str], ready, signum: int) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``civt-cache ARGS`` in its own process group (as a terminal runs it), send ``signum``
    to the group once ``ready()`` holds (Ctrl-C reaches every process of it), and return the
    outcome and the seconds from the signal to the exit; no process of the group is left."""
    proc = subprocess.Popen([sys.executable, "-m", "civt_cache.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    seen: set[int] = set()
    try:
        deadline = time.time() + 300
        while not ready() and proc.poll() is None and time.time() < deadline:
            seen |= set(descendants(proc.pid))
            time.sleep(0.05)
        assert proc.poll() is None, "the command ended before it could be stopped"
        seen |= set(descendants(proc.pid))
        sent = time.time()
        os.killpg(proc.pid, signum)
        out, err = proc.communicate(timeout=120)
        took = time.time() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert_gone(sorted(seen))
    return subprocess.CompletedProcess(args, proc.returncode, out, err), took


def _stopped(proc: subprocess.CompletedProcess, signum: int, took: float, *needles: str) -> None:
    assert proc.returncode == 128 + signum, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and "Aborted" not in proc.stderr, proc.stderr[-2000:]
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("civt-cache: stopped by ")]
    assert len(line) == 1 and all(n in line[0] for n in needles), (needles, proc.stderr[-2000:])
    assert took < 10, f"{took:.1f} s from the signal to the exit"


def test_ctrl_c_or_sigterm_says_what_is_kept_and_what_continues(world, tmp_path) -> None:
    """Each long command, stopped by Ctrl-C (SIGINT to its process group) or SIGTERM: one line of
    what is kept and the command that continues, exit 128 + the signal, in seconds, nothing left
    running; each rerun says what was already done and continues."""
    run = tmp_path / "run"
    args = student_args(world, world["ref"], run, "--epochs", "30", "--cycle-cache", "--workers", "2",
                        "--checkpoint-every", "4")
    proc, took = _stop_when(args, lambda: (run / "last.pth.tar").exists(), signal.SIGINT)
    _stopped(proc, signal.SIGINT, took, f"{run / 'last.pth.tar'} keeps the run at step 4 of epoch 1 of 30",
             f"`--resume {run}`")

    cache = tmp_path / "cache"
    args = cache_args(world["root"], cache, "--workers", "1")
    proc, took = _stop_when(args, lambda: any((cache / "progress").glob("s*.json")), signal.SIGTERM)
    _stopped(proc, signal.SIGTERM, took, "unit(s) committed by this process are kept", "continues with the units left")
    again = run_cli(*args)
    assert "unit(s) of 4 left to compute; the others are committed" in again.stderr

    teacher = tmp_path / "t.pth"
    args = ["train-teacher", "--pipeline", TINY, "--arch", "resnet10t", "--manifest", str(world["manifest"]),
            "--val-manifest", str(world["manifest"]), "--epochs", "3", "--batch-size", "64", "--out", str(teacher)]
    proc, took = _stop_when(args, lambda: teacher.with_name("t.pth.resume").exists(), signal.SIGINT)
    _stopped(proc, signal.SIGINT, took, "t.pth.resume keeps 1 of 3 epoch(s); the same command continues")
    again = run_cli(*args)
    assert "resuming from" in again.stderr + again.stdout and "1 of 3 epoch(s) done" in again.stderr + again.stdout
    assert teacher.exists() and not teacher.with_name("t.pth.resume").exists()
    straight = tmp_path / "t2.pth"
    run_cli(*args[:-1], str(straight))
    a, b = (torch.load(p, weights_only=True)["state_dict"] for p in (teacher, straight))
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed teacher differs from the uninterrupted one"

    from PIL import Image

    src, shards = tmp_path / "src", tmp_path / "shards"
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (src / cls).mkdir(parents=True)
        for i in range(300):
            Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(src / cls / f"{i}.png")
    args = ["make-shards", str(src), str(shards), "--name", "x", "--manifest", str(tmp_path / "x.json"),
            "--shard-size", "50", "--workers", "2"]
    proc, took = _stop_when(args, lambda: shards.exists() and any(shards.iterdir()), signal.SIGINT)
    _stopped(proc, signal.SIGINT, took, "nothing of them is kept", "the same command starts again")
    assert not list(shards.iterdir()) and not (tmp_path / "x.json").exists()


def test_labels_as_people_store_them(world, tmp_path) -> None:
    """Class names in .txt, or in a field inside a field of .json (``json:meta.label``), read
    through --classes; without it the name is refused naming the fix; make-shards --classes
    numbers an image folder's classes as the file does (a split missing a class included)."""
    import webdataset as wds
    from PIL import Image

    from civt_cache.data.manifest import load_manifest
    from civt_cache.data.shards import read_shard

    source = load_manifest(world["manifest"])
    samples = read_shard(source, 0)[:40]
    names = [f"digit-{c}" for c in source.classes]
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    with wds.TarWriter(str(tmp_path / "named.tar")) as sink:
        for s in samples:
            sink.write({"__key__": s.key, "png": s.image, "txt": names[s.label],
                        "json": json.dumps({"meta": {"label": names[s.label], "id": s.key}})})
    for key in ("txt", "json:meta.label"):
        manifest = tmp_path / f"{key.replace(':', '-')}.json"
        run_cli("scan-shards", str(tmp_path / "named.tar"), "--name", "named", "--manifest", str(manifest),
                "--label-key", key, "--classes", str(tmp_path / "names.txt"))
        assert [s.label for s in read_shard(load_manifest(manifest), 0)] == [s.label for s in samples]
    refused(run_cli("scan-shards", str(tmp_path / "named.tar"), "--name", "named", "--manifest",
                    str(tmp_path / "bare.json"), "--label-key", "txt", check=False),
            "named.tar", "not an integer", "--classes FILE")

    src = tmp_path / "folder"
    for cls in ("cat", "ant"):
        (src / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 16), (i * 50, 90, 10)).save(src / cls / f"{i}.png")
    (tmp_path / "animals.txt").write_text("cat\ndog\nant\n")
    m = tmp_path / "animals.json"
    run_cli("make-shards", str(src), str(tmp_path / "animals"), "--name", "animals", "--manifest", str(m),
            "--classes", str(tmp_path / "animals.txt"), "--workers", "1")
    made = load_manifest(m)
    assert made.classes == ["cat", "dog", "ant"]
    assert sorted(s.label for s in read_shard(made, 0)) == [0, 0, 0, 2, 2, 2]
    (tmp_path / "two.txt").write_text("cat\ndog\n")
    refused(run_cli("make-shards", str(src), str(tmp_path / "x"), "--name", "x", "--manifest", str(tmp_path / "x.json"),
                    "--classes", str(tmp_path / "two.txt"), check=False), "['ant']", "not among the 2 --classes")


def test_progress_lines_say_seconds_per_step_under_one_a_second(monkeypatch, capsys) -> None:
    from civt_cache import progress

    clock = iter([0.0, 10.0, 10.0, 20.0, 20.0])  # start, then each update: its check and its line
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    monkeypatch.setenv(progress.INTERVAL_ENV, "0")
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: False)
    bar = progress.Progress(10, "epoch 1/1", "steps")
    bar.update(2)
    bar.update(1)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("epoch 1/1: 2/10 steps (20%), 5.0 s/step"), lines
    assert lines[1].startswith("epoch 1/1: 3/10 steps (30%), 6.7 s/step"), lines


def test_output_a_person_reads_ema_on_the_epoch_line_and_bars_that_end_at_the_whole(world, tmp_path) -> None:
    """--model-ema's top-1 is on the epoch line; under two ranks the evaluation counts the whole
    val set (not rank 0's 256 of 359) and each --claim process's progress ends at 100%, units
    other processes computed counted."""
    proc = run_cli(*student_args(world, world["ref"], tmp_path / "run", "--model-ema"))
    assert "EMA val top-1" in proc.stdout
    env = {**os.environ, "CIVT_PROGRESS_SECONDS": "0"}
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            "-m", "civt_cache.cli", "eval", "--manifest", str(world["manifest"]), "--checkpoint",
                            str(world["root"] / "conv.pth"), "--arch", "resnet10t", "--img-size", "32"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert ranks.returncode == 0, ranks.stderr[-2000:]
    counts = [ln for ln in ranks.stderr.splitlines() if ln.startswith("evaluate digits-val:")]
    assert counts and counts[-1].startswith("evaluate digits-val: 359/359 images (100%)"), counts
    cache = tmp_path / "cache"
    claims = [subprocess.Popen([sys.executable, "-m", "civt_cache.cli",
                                *cache_args(world["root"], cache, "--claim", "--lease-seconds", "5")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
              for _ in range(2)]
    outs = [c.communicate(timeout=300) for c in claims]
    for c, (_, err) in zip(claims, outs):
        assert c.returncode == 0, err[-2000:]
        last = [ln for ln in err.splitlines() if ln.startswith("cache-teachers:") and "views (" in ln][-1]
        assert "718/718 views (100%)" in last, err[-2000:]  # 359 digits x 2 epochs


def test_a_hung_rank_is_named_by_rank_0_not_rank_0_itself(world, tmp_path) -> None:
    """One of two ranks stopped (SIGSTOP: a hung node, a debugger): rank 0's line names rank 1 as
    the one that stopped answering, not itself; the torchrun job ends; nothing is left behind."""
    run = tmp_path / "run"
    args = student_args(world, world["ref"], run, "--epochs", "30", "--cycle-cache", "--workers", "0",
                        "--checkpoint-every", "2")
    env = {**os.environ, "CIVT_DIST_TIMEOUT": "6"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "civt_cache.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    seen: set[int] = set()
    try:
        deadline = time.time() + 300
        while not (run / "last.pth.tar").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        ranks = children(proc.pid)
        seen |= set(descendants(proc.pid))
        assert len(ranks) == 2 and proc.poll() is None, "no two ranks to stop one of"
        rank1 = [p for p in ranks if "RANK=1" in Path(f"/proc/{p}/environ").read_text(errors="replace").split("\0")]
        os.kill(rank1[0], signal.SIGSTOP)
        _, err = proc.communicate(timeout=240)
    finally:
        for pid in seen:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "rank 0 of 2: rank(s) 1 stopped answering at epoch" in err, err[-3000:]
    assert_gone(sorted(seen))
