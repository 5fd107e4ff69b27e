"""The optimiser and learning-rate schedule of a run, from timm's factories, stepped per
optimiser step as the official co-advise scheduler does.
"""
from __future__ import annotations

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn


def optimizer_and_schedule(model: nn.Module, opt: str, lr: float, weight_decay: float,
                           total_steps: int, warmup_steps: int, min_lr: float,
                           momentum: float = 0.9) -> tuple[torch.optim.Optimizer, CosineLRScheduler]:
    """timm's optimizer factory (no decay on norms, biases and ``no_weight_decay()`` params)
    and a per-step cosine schedule with linear warmup, as co-advise's training script (Swin's
    ``build_scheduler``) builds it: the cosine runs over all steps, warmup included
    (``warmup_prefix=False``), so after warmup the rate is already ``cos(pi t / T)`` of the way
    down, never a fresh cosine that starts after the warmup."""
    kwargs = {"momentum": momentum} if opt.lower() in ("sgd", "momentum") else {}
    optimizer = create_optimizer_v2(model, opt, lr=lr, weight_decay=weight_decay, **kwargs)
    schedule = CosineLRScheduler(optimizer, t_initial=max(total_steps, 1), lr_min=min_lr,
                                 warmup_t=warmup_steps, warmup_lr_init=min(1e-6, lr),
                                 warmup_prefix=False, t_in_epochs=False)
    return optimizer, schedule
