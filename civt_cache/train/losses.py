"""co-advise's loss: cross-entropy on the class token, and for each teacher's token the KL from
its teacher's soft target (``loader/soft_targets.py`` builds those from the cached top-k).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossWeights:
    """co-advise's loss: w_ce * CE(class head) + T^2 * (w_conv * KL_conv + w_inv * KL_inv)."""

    ce: float = 1.0
    conv: float = 1.0
    inv: float = 1.0
    temperature: float = 1.0


def kd_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float) -> torch.Tensor:
    """T^2 * KL(teacher || student) at temperature T, averaged over the batch.

    Classes the teacher gives no mass (``-inf`` pseudo-logits: ``renormalize``, or k = C after
    an fp16 underflow) contribute 0, as 0 * log 0 = 0 in the definition; ``F.kl_div`` with
    ``log_target=True`` would give 0 * inf = NaN there."""
    log_t = F.log_softmax(teacher_logits.float() / t, dim=1)
    log_s = F.log_softmax(student_logits.float() / t, dim=1)
    p_t = log_t.exp()
    log_t = torch.where(p_t > 0, log_t, torch.zeros_like(log_t))
    return (p_t * (log_t - log_s)).sum(1).mean() * (t * t)


def soft_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with a (mixed, smoothed) probability target."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=1), dim=1).mean()


def coadvise_loss(heads: tuple[torch.Tensor, torch.Tensor, torch.Tensor], ce_target: torch.Tensor,
                  teacher: dict[str, torch.Tensor], w: LossWeights) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its parts (detached, still on the device: nothing here waits for it). A
    head whose teacher is absent (ablations) learns from the labels instead, so all three heads
    stay meaningful for the averaged prediction."""
    cls_head, conv_head, inv_head = heads
    parts = {"ce": soft_ce(cls_head, ce_target) * w.ce}
    for name, head, weight in (("conv", conv_head, w.conv), ("inv", inv_head, w.inv)):
        if name in teacher:
            parts[name] = kd_term(head, teacher[name], w.temperature) * weight
        else:
            parts[name] = soft_ce(head, ce_target) * weight
    total = parts["ce"] + parts["conv"] + parts["inv"]
    return total, {k: v.detach() for k, v in parts.items()}
