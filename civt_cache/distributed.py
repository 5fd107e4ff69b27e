"""torchrun plumbing, kept apart from models and stages: rank/world discovery, process group,
device choice. Stages work unchanged without torchrun (world size 1)."""
from __future__ import annotations

import gc
import os
import re
import socket
import sys
from collections.abc import Callable, Iterator
from datetime import timedelta
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from civt_cache.errors import ConfigError, RankError
from civt_cache.processes import die_with_parent

T = TypeVar("T", torch.Tensor, torch.nn.Module)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    threads: int = 1  # this process's intra-op threads (see ``choose_threads``)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' -> this rank's GPU when there is one, else CPU; 'cpu'/'cuda' force."""
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but no GPU is visible")
    return torch.device("cuda", local_rank)


def choose_threads(requested: int = 0, workers: int = 0) -> int:
    """Set and return this process's intra-op threads. ``requested`` > 0 is used as given; else
    an ``OMP_NUM_THREADS`` already set (torchrun sets 1 per rank) is kept; else the cores this
    rank may use (its affinity, shared among the node's ranks) less one per loader worker, at
    least 1. torch's own default takes every core, which with workers busy on the same cores
    oversubscribes them (a RedNet-26 teacher epoch took 428-501 s instead of 66 s on a busy
    2-core machine; ``civt-cache bench threads`` measures it)."""
    if requested > 0:
        torch.set_num_threads(requested)
    elif not os.environ.get("OMP_NUM_THREADS"):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        per_rank = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        torch.set_num_threads(max(1, per_rank - workers))
    return torch.get_num_threads()


#: Seconds a rank waits in a collective (a step's gradient all-reduce, a barrier) for the other
#: ranks before it stops with an error: a rank that died or hung ends the job within this
#: bound instead of leaving the others waiting for ever. Long enough for rank 0's evaluation
#: and checkpoint writes, which the others wait for at a barrier.
TIMEOUT_ENV = "CIVT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 900.0


def collective_timeout() -> timedelta:
    """The process group's timeout (``CIVT_DIST_TIMEOUT`` seconds, else 900)."""
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV}={text!r}: must be a number of seconds") from None
    if not 0 < seconds < float("inf"):
        raise ConfigError(f"{TIMEOUT_ENV}={text!r}: must be a positive, finite number of seconds")
    return timedelta(seconds=seconds)


def torchrun_job() -> str | None:
    """What names the torchrun job this process runs in, the same across its restarts: its run
    id (``--rdzv-id``, random under ``--standalone``) or, where that is torchrun's default
    ``none`` that every job shares, this node's agent (host and pid: a restart keeps the agent,
    and the rendezvous orders the agents the same way each round, so rank 0 stays on its node).
    None outside torchrun. A restart count cannot name a job: an agent restarts its ranks without
    counting when another node's ranks failed, and a new job may inherit nothing to compare."""
    run = os.environ.get("TORCHELASTIC_RUN_ID")
    if run is None:
        return None
    return run if run and run != "none" else f"agent {socket.gethostname()}:{os.getppid()}"


def torchrun_restart() -> int:
    """This agent's restart count (0 outside torchrun and at a job's first start)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def collective_failure(e: BaseException) -> bool:
    """Whether a RuntimeError is a collective that lost its peers (gloo's closed connection or
    timeout, NCCL's watchdog), as opposed to a bug in this process."""
    text = str(e).lower()
    return any(k in text for k in ("connection closed by peer", "timed out", "timeout", "connection reset",
                                   "nccl", "gloo", "broken pipe", "socket"))


def init_distributed(device_preference: str = "auto", threads: int = 0, workers: int = 0) -> DistInfo:
    """Join the torchrun process group if launched by torchrun (gloo on CPU, NCCL on GPU), and
    choose this process's threads (``choose_threads``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if os.environ.get("TORCHELASTIC_RUN_ID"):  # a torchrun rank ends with its agent
        die_with_parent(os.getppid())
    device = pick_device(device_preference, local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=collective_timeout())
        _LIVENESS[:] = [dist.new_group(backend="gloo")]  # see ``silent_ranks``
    if rank == 0 and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0 \
            and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        print("civt-cache: warning: torchrun --max-restarts with its rendezvous store shared with the ranks: "
              "a restarted group finds the last round's addresses there and cannot connect; start torchrun "
              "with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", file=sys.stderr, flush=True)
    return DistInfo(rank, world, local, device, choose_threads(threads, workers))


def data_parallel(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """``model`` under DDP when launched with several ranks (else itself), as co-advise's
    main.py runs it: gradients averaged over ranks, while each rank keeps its own BatchNorm
    statistics (``broadcast_buffers=False``: no buffer sync per forward; the buffers are equal
    at init, so DDP's one sync there changes nothing)."""
    if not info.distributed:
        return model
    return DistributedDataParallel(model, forward_sync_buffers=False)


def device_autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on a GPU; off elsewhere (on a CPU it is slower and less exact than fp32).
    Every forward pass of every stage runs under this, so they all compute alike."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def device_layout(obj: T, device: torch.device) -> T:
    """A model or a 4-D batch in channels_last on a GPU (what its convolutions run fastest on),
    unchanged elsewhere."""
    if device.type != "cuda":
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.contiguous(memory_format=torch.channels_last)  # type: ignore[return-value]
    return obj.to(memory_format=torch.channels_last)  # type: ignore[union-attr]


@contextmanager
def distributed_session(device_preference: str, threads: int = 0, workers: int = 0) -> Iterator[DistInfo]:
    """``init_distributed`` for the length of a command, the process group always left after."""
    info = init_distributed(device_preference, threads, workers)
    try:
        yield info
    finally:
        shutdown(info)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    """Leave the process group. A DDP wrapper sits in a reference cycle, so after its last use
    it lives on until a garbage collection; one collected after the group is destroyed aborts
    the rank as it exits (``terminate called without an active exception``, exit -6, seen on
    the CPU under load), turning a finished run into a failed one. So collect first."""
    if info.distributed and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
        _LIVENESS.clear()


def all_reduce_sum(info: DistInfo, values: list[float]) -> list[float]:
    """Sum a few floats over ranks (metrics); identity without torchrun."""
    if not info.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64,
                     device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def same_steps_on_every_rank(info: DistInfo, what: str, ran: int) -> None:
    """Each rank says how many steps it ran (``WHAT: rank r of W: N steps``, in its own log under
    ``torchrun --log-dir``), and the job stops naming every rank's count if they differ: a cheap
    agreement check where a disagreement would otherwise become a wait in the next collective."""
    if not info.distributed:
        return
    counts = all_gather_objects(info, ran)
    print(f"{what}: rank {info.rank} of {info.world_size}: {ran} steps", file=sys.stderr, flush=True)
    if len(set(counts)) > 1:
        raise RankError(f"{what}: the ranks ran different step counts ("
                        + ", ".join(f"rank {r}: {n}" for r, n in enumerate(counts)) + ")")


#: A gloo group beside the training one, used only to ask which ranks still answer after a
#: collective failed: the failed group's connections are closed by then (gloo closes every pair
#: after a timeout), this one's are not.
_LIVENESS: list[Any] = []
#: How long rank 0 waits for each rank's answer (and the others for rank 0's) after a failure,
#: at most: never longer than the process group's own timeout (``collective_timeout``).
SILENT_AFTER = timedelta(seconds=20)


def silent_ranks(info: DistInfo) -> list[int] | None:
    """After a failed collective, on rank 0: the ranks that do not reach a barrier on the liveness
    group within ``SILENT_AFTER`` (stopped, hung or dead), or None where that cannot be told
    (other ranks, no liveness group, or every rank answered)."""
    if not _LIVENESS:
        return None
    try:
        dist.monitored_barrier(group=_LIVENESS[0], timeout=min(SILENT_AFTER, collective_timeout()),
                               wait_all_ranks=True)
    except RuntimeError as e:
        found = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", str(e))
        if info.is_main and found:
            return [int(r) for r in found.group(1).replace(",", " ").split()]
    return None


@contextmanager
def lost_ranks_named(info: DistInfo, position: Callable[[], tuple[int, int]]) -> Iterator[None]:
    """A collective that lost its peers (a rank died, hung past ``collective_timeout``, or ran
    other steps) becomes one ``RankError`` naming its (epoch, step) from ``position`` and, on
    rank 0, the ranks that stopped answering (``silent_ranks``), instead of a gloo/NCCL
    traceback that reads as if this rank were the one at fault."""
    try:
        yield
    except RuntimeError as e:
        if not (info.distributed and collective_failure(e)):
            raise
        epoch, step = position()
        where = f"epoch {epoch + 1} step {step + 1} ({str(e).strip().splitlines()[0][:160]})"
        silent = silent_ranks(info)
        if silent:
            raise RankError(f"rank {info.rank} of {info.world_size}: rank(s) {', '.join(map(str, silent))} stopped "
                            f"answering at {where}: stopped, hung past the process-group timeout, or dead; "
                            "see their own lines and the machine they ran on") from None
        raise RankError(f"rank {info.rank} of {info.world_size}: lost the other ranks at {where}: a rank died, "
                        "hung past the process-group timeout, or ran other steps; rank 0's line names the ranks "
                        "that stopped answering where it can tell") from None


def all_gather_objects(info: DistInfo, obj: object) -> list[object]:
    """Every rank's ``obj`` in rank order (checkpoints keep each rank's RNG state and loss sums);
    ``[obj]`` without torchrun."""
    if not info.distributed:
        return [obj]
    out: list[object] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out
