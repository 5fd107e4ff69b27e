"""A run folder's rules (``train-student --out RUN``): one writer at a time, no mixing of two
runs' files, and a resume that continues exactly the run that was started.

Why: two runs into one folder both exit 0 with one run's metrics lost; a new run beside an old
run's ``metrics.jsonl`` leaves files that describe another model; and a resume with another
batch size or cache silently trains a different experiment under the old one's name.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, TextIO

from civt_cache.distributed import DistInfo, all_gather_objects, barrier, torchrun_job
from civt_cache.errors import CheckpointError, ConfigError
from civt_cache.fsutil import atomic_write_bytes
from civt_cache.models.checkpoints import load_torch_file

#: What a run writes; their presence means the folder holds a run.
RUN_FILES = ("last.pth.tar", "metrics.jsonl", "results.json", "curves.png", "summary.csv",
             "model_best.pth.tar", "args.yaml", "tb")
#: The flag of a setting whose flag is not its name with dashes (timm's names).
FLAG_NAMES = {"label_smoothing": "--smoothing"}
#: Settings a resume may change: where and how fast it runs, not what it trains.
RESUMABLE_CHANGES = frozenset({"workers", "threads", "device", "compile", "checkpoint_every", "log_every", "prefetch",
                               "resume", "max_steps", "force", "out", "log", "allow_sorted_shards",
                               "checkpoint_hist"})


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A run checkpoint, loaded as tensors and plain data only (see ``load_torch_file``)."""
    state = load_torch_file(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a checkpoint of this tool (holds a {type(state).__name__})")
    return state


class RunLock:
    """An exclusive lock on a run folder held for the run's life (a POSIX record lock on
    ``RUN/.lock``): a second run into the same folder is refused at once; a killed run's lock
    goes with it. A record lock belongs to the process that took it and is not inherited by
    forked children (``flock`` is: a loader worker that outlived a killed run would hold its
    lock). Taken only once the run's settings and cache are checked, so a refused run creates
    nothing."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / ".lock"
        self._file: TextIO | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise ConfigError(f"{self.path.parent}: another run is writing this folder ({holder}); "
                              "wait for it, or give another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            fcntl.lockf(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


@contextmanager
def removed_unless_checkpointed(run_dir: Path, lock: RunLock, owner: bool) -> Iterator[None]:
    """A run into a folder that did not exist, which fails or is refused before its first
    checkpoint, removes the folder it made (its lock, ``args.yaml``): nothing is left that the
    rerun would have to ``--force`` past. ``owner``: the process that made it (rank 0)."""
    made = not Path(run_dir).exists()
    try:
        yield
    except BaseException:
        lock.release()
        if made and owner and not (Path(run_dir) / "last.pth.tar").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        lock.release()


#: Under torchrun, the job that writes the folder (``distributed.torchrun_job``): a rank started
#: again in that job (torchrun restarted the group) continues the run instead of being refused as
#: a new one. Written only once the run is this job's (started fresh or resumed), never by a
#: start that was refused, so torchrun's restarts of a refused start stay refused.
ELASTIC_FILE = ".elastic-run"


def restarted_by_torchrun(run_dir: Path) -> bool:
    """Whether this start is torchrun restarting the job that writes ``run_dir``."""
    job = torchrun_job()
    mine = (run_dir / ELASTIC_FILE).read_text().strip() if (run_dir / ELASTIC_FILE).is_file() else None
    return job is not None and mine == job


def record_torchrun_job(run_dir: Path) -> None:
    """Record the torchrun job writing ``run_dir`` (see ``restarted_by_torchrun``)."""
    job = torchrun_job()
    if job is not None:
        atomic_write_bytes(run_dir / ELASTIC_FILE, f"{job}\n".encode())


def other_run_files(run_dir: Path) -> list[str]:
    """The run files already in ``run_dir`` (with the kept epochs' ``checkpoint-N.pth.tar``)."""
    return ([name for name in RUN_FILES if (run_dir / name).exists()]
            + sorted(p.name for p in run_dir.glob("checkpoint-*.pth.tar")))


def start_fresh(run_dir: Path, force: bool, remove: bool) -> None:
    """Refuse a fresh run into a folder holding another run's files unless ``force``; with
    ``force`` (and ``remove``: the process that owns the folder) those files are removed, so no
    old metrics stand beside the new run's checkpoint."""
    existing = other_run_files(run_dir)
    if existing and not force:
        raise ConfigError(f"{run_dir}: holds another run's files ({', '.join(existing)}); "
                          "--resume to continue it, --force to replace it, or another --out")
    if remove:
        for name in existing:
            path = run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


def resume_differences(saved: dict[str, Any], asked: dict[str, Any]) -> list[str]:
    """Settings that differ between a checkpoint's job and the resuming job, except those a
    resume may change (``RESUMABLE_CHANGES``)."""
    keys = sorted((set(saved) | set(asked)) - RESUMABLE_CHANGES)
    out = []
    for k in keys:
        if saved.get(k) == asked.get(k):
            continue
        if k == "recipe" and isinstance(saved.get(k), dict) and isinstance(asked.get(k), dict):
            changed = [f"{r} {saved[k].get(r)!r} -> {asked[k].get(r)!r}" for r in sorted(set(saved[k]) | set(asked[k]))
                       if saved[k].get(r) != asked[k].get(r)]
            out.append(f"the views ([recipe]): {', '.join(changed)}")
        else:
            out.append(f"{FLAG_NAMES.get(k, '--' + k.replace('_', '-'))}: checkpoint {saved.get(k)!r}, "
                       f"asked {asked.get(k)!r}")
    return out


def check_resumable(ckpt: Path, state: dict[str, Any], asked: dict[str, Any],
                    world_size: int) -> None:
    """Refuse to resume a checkpoint of a different run, naming every setting that differs."""
    if "job" not in state or "ranks" not in state:
        raise CheckpointError(f"{ckpt}: not a train-student checkpoint of this civt-cache version "
                              "(no job or per-rank state); start fresh with --force")
    diffs = resume_differences(state["job"], asked)
    if state.get("world_size") != world_size:
        diffs.append(f"ranks: checkpoint {state.get('world_size')}, asked {world_size} (the "
                     "global batch and data order would change)")
    if diffs:
        raise ConfigError(f"{ckpt}: --resume would train a different run: " + "; ".join(diffs)
                          + f". `--resume {ckpt.parent}` alone takes the run's own settings (its args.yaml; "
                          f"`-c {ckpt.parent / 'args.yaml'} --resume` with a pipeline), or start fresh with --force")


def finished_results(run_dir: Path) -> dict[str, Any]:
    """A finished run's results, read, never rewritten."""
    path = run_dir / "results.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: the run's checkpoint says it finished, but its results "
                              f"cannot be read ({e})") from None


def open_run(run_dir: Path, resume: bool, force: bool, asked: dict[str, Any], epochs: int, info: DistInfo,
             lock: RunLock, log: Callable[[str], None]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Whether this start continues the run in ``run_dir`` or starts one, decided by rank 0
    (which takes the folder's lock) and followed by every rank: (the checkpoint to resume from,
    or None; the results of a run that already ran its ``epochs``, or None). A start of the
    torchrun job that writes the folder continues it by itself; any other start into a folder
    holding a run's files is refused unless ``resume`` or ``force``."""
    ckpt_path = run_dir / "last.pth.tar"
    if info.is_main:  # rank 0 owns the folder: one run writes it at a time
        lock.acquire()
        if not resume and restarted_by_torchrun(run_dir):  # continue, never start over
            log(f"restarted by torchrun: continuing the run from {ckpt_path}")
            resume = True
    resume = bool(all_gather_objects(info, resume)[0])  # every rank as rank 0 decided
    state = None
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        check_resumable(ckpt_path, state, asked, info.world_size)
        if state["epoch"] >= epochs:
            log(f"{run_dir}: this run already finished its {epochs} epoch(s); nothing to do "
                f"(results in {run_dir / 'results.json'})")
            done = finished_results(run_dir)
            return state, {**done, "results_file": str(run_dir / "results.json")} if info.is_main else done
    else:
        if resume:  # files here are of this run, killed before its first checkpoint
            log(f"--resume: no checkpoint at {ckpt_path}; starting fresh")
        start_fresh(run_dir, force or resume, remove=info.is_main)
    if info.is_main:  # the run is this job's only now: a refused start never records itself
        record_torchrun_job(run_dir)
    barrier(info)
    return state, None


def checkpoint_position(epoch: int, step: int, epochs: int) -> str:
    """A checkpoint's place, as a person counts: epochs done, or the step within the next."""
    return f"{epoch} of {epochs} epoch(s) done" if step == 0 else f"step {step} of epoch {epoch + 1} of {epochs}"


def kept_by_checkpoint(ckpt: Path, saved: tuple[int, int] | None, epochs: int) -> str:
    """What a stop keeps of a run whose last checkpoint is at ``saved`` (None: none yet), and
    the command that continues it (``stopping``)."""
    if saved is None:
        return "no checkpoint was written yet, so nothing is kept; the same command starts again"
    return (f"{ckpt} keeps the run at {checkpoint_position(*saved, epochs)}; the same command with "
            f"`--resume {ckpt.parent}` (under torchrun too) continues from there")
