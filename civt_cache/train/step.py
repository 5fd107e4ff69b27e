"""One optimisation step of co-advise, shared by ``train-student`` and the benchmarks, so that
what they time is exactly what trains."""
from __future__ import annotations

import torch

from civt_cache.distributed import device_autocast
from civt_cache.train.losses import LossWeights, coadvise_loss


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               ce_target: torch.Tensor, targets: dict[str, torch.Tensor], weights: LossWeights,
               clip_grad: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimisation step of co-advise's loss on a batch already on the device (bf16
    autocast on GPU); the benchmarks time exactly this against the data paths around it."""
    with device_autocast(x.device):
        heads = model(x)
    loss, parts = coadvise_loss(heads, ce_target, targets, weights)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    optimizer.step()
    return loss, parts
