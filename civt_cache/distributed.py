"""torchrun plumbing, kept apart from models and stages: rank/world discovery, process group,
device choice. Stages work unchanged without torchrun (world size 1)."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from civt_cache.errors import ConfigError

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


def init_distributed(device_preference: str = "auto", threads: int = 0, workers: int = 0) -> DistInfo:
    """Join the torchrun process group if launched by torchrun (gloo on CPU, NCCL on GPU), and
    choose this process's threads (``choose_threads``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference, local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, device, choose_threads(threads, workers))


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
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(info: DistInfo, values: list[float]) -> list[float]:
    """Sum a few floats over ranks (metrics); identity without torchrun."""
    if not info.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64,
                     device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def all_gather_objects(info: DistInfo, obj: object) -> list[object]:
    """Every rank's ``obj`` in rank order (checkpoints keep each rank's RNG state and loss sums);
    ``[obj]`` without torchrun."""
    if not info.distributed:
        return [obj]
    out: list[object] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out
