"""The targets a student learns from: each teacher's soft target from the cache's top-k, and
the labels' mixed, smoothed target (``mixed_targets``). The loss is in ``train/losses.py``.

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

import torch


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


def mixed_targets(labels: torch.Tensor, partner_labels: torch.Tensor, lam: torch.Tensor,
                  num_classes: int, smoothing: float) -> torch.Tensor:
    """timm's mixup target: lam * smooth(onehot(y)) + (1 - lam) * smooth(onehot(y_partner))."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    a = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    b = a.clone().scatter_(1, partner_labels[:, None], on)
    a.scatter_(1, labels[:, None], on)
    lam = lam[:, None].float()
    return lam * a + (1.0 - lam) * b


def stored_target_loss(full_logits: torch.Tensor, topk_logprobs: torch.Tensor, topk_idx: torch.Tensor,
                       renormalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """What storing only the top-k costs, per view: KL(the teacher's full softmax || the target a
    student builds from the stored values, ``pseudo_logits``) in nats at T = 1, and the full
    softmax's mass outside its top-k (what the stored target has to guess the shape of)."""
    num_classes, k = full_logits.shape[1], topk_logprobs.shape[1]
    logp = torch.log_softmax(full_logits.float(), 1)
    logq = torch.log_softmax(pseudo_logits(topk_logprobs.float(), topk_idx, num_classes, renormalize), 1)
    p = logp.exp()
    kl = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(1)
    return kl, (1.0 - p.topk(k, 1).values.sum(1)).clamp_min(0.0)  # not -0.0 where nothing is left
