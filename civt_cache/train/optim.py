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


#: Below this peak rate a transformer barely moves in a short run (AdamW, DeiT's recipe).
SMALL_LR = 1e-4


def schedule_warnings(lr: float, scaled: bool, global_batch: int, warmup_epochs: float, epochs: int) -> list[str]:
    """What in a schedule would leave a student near chance, said before it trains: a warmup
    that lasts the whole run (the rate never reaches its peak), or a rate scaled down by a small
    global batch (DeiT's 5e-4 x batch / 512 gives 3.1e-5 at batch 32)."""
    said = []
    if warmup_epochs >= epochs:
        said.append(f"warmup of {warmup_epochs:g} epochs is as long as the {epochs} epoch(s): the learning "
                    "rate never reaches its peak; set warmup_epochs ([student] of the pipeline) below the epochs")
    if scaled and lr < SMALL_LR:
        said.append(f"learning rate {lr:.2g} = 5e-4 x global batch {global_batch} / 512 is small; give --lr "
                    "for small batches")
    return said
