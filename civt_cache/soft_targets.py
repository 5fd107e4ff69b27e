"""Teacher soft targets from the cache's top-k, and the co-advise loss.

The cache stores the top-k log-probabilities l_i = z_i - L (logit minus the log-sum-exp of all
logits), so the top-k probabilities at T = 1 are exact: p_i = exp(l_i), and the remaining mass
r = 1 - sum p_i is known. The other C - k classes get equal shares of r (the default), which is
the same as giving each of them the pseudo-logit log(r / (C - k)); softmax is blind to the shift
by L, so at any temperature T the target is softmax(pseudo-logits / T) of these. With
``renormalize`` the remaining classes get nothing and the top-k probabilities are rescaled to 1.
With k = C the target is exactly the teacher's softmax (up to the fp16 storage).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def pseudo_logits(topk_logprobs: torch.Tensor, topk_idx: torch.Tensor, num_classes: int,
                  renormalize: bool = False) -> torch.Tensor:
    """Dense [B, C] logits whose softmax is the teacher target described in the module doc."""
    b, k = topk_logprobs.shape
    if k == num_classes or renormalize:
        fill = torch.full((b, 1), -math.inf, device=topk_logprobs.device)
    else:
        mass = torch.exp(topk_logprobs).sum(1, keepdim=True)
        rest = (1.0 - mass).clamp_min(1e-12)
        fill = torch.log(rest / (num_classes - k))
    out = fill.expand(b, num_classes).clone()
    return out.scatter_(1, topk_idx, topk_logprobs)


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
