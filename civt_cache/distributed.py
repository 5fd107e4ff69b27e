"""torchrun plumbing, kept apart from models and stages: rank/world discovery, process group,
device choice. Stages work unchanged without torchrun (world size 1)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

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


def init_distributed(device_preference: str = "auto") -> DistInfo:
    """Join the torchrun process group if launched by torchrun (gloo on CPU, NCCL on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference, local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, device)


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
