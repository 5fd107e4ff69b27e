"""What the stored top-k keeps of a teacher's softmax: ``stored_target_loss`` against the
definition, computed here in float64 numpy."""
from __future__ import annotations

import numpy as np
import torch

from civt_cache.loader.soft_targets import stored_target_loss


def _stored(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k log-probabilities as the cache stores them (float16 values) and their classes."""
    logp = torch.log_softmax(logits, 1)
    values, idx = logp.topk(k, 1)
    return values.half().float(), idx


def _kl_by_definition(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """KL(p || q) with q the top-k of p and the rest's mass spread evenly; the mass outside."""
    logits = logits.astype(np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    kl, tail = [], []
    for row in p:
        top = np.argsort(-row)[:k]
        q = np.full_like(row, (1 - row[top].sum()) / (len(row) - k) if k < len(row) else 0.0)
        q[top] = row[top]
        kl.append(float((row * np.log(row / q)).sum()))
        tail.append(1 - row[top].sum())
    return np.array(kl), np.array(tail)


def test_the_loss_of_top_k_is_the_kl_of_its_definition() -> None:
    torch.manual_seed(0)
    logits = torch.randn(64, 100) * 3
    for k in (1, 5, 10, 50):
        kl, tail = stored_target_loss(logits, *_stored(logits, k))
        want_kl, want_tail = _kl_by_definition(logits.numpy(), k)
        assert np.allclose(kl.numpy(), want_kl, rtol=2e-3, atol=2e-4), k  # float16 storage
        assert np.allclose(tail.numpy(), want_tail, atol=1e-5), k
        assert (kl >= -1e-6).all() and (tail > 0).all()


def test_nothing_is_lost_when_every_class_is_kept_or_the_tail_is_flat() -> None:
    torch.manual_seed(1)
    logits = torch.randn(16, 10) * 4
    kl, tail = stored_target_loss(logits, *_stored(logits, 10))
    assert kl.abs().max() < 1e-3 and tail.abs().max() < 1e-6  # only float16 rounding
    flat = torch.zeros(16, 100)  # the spread-evenly guess is exact for a flat tail
    flat[:, :5] = torch.arange(5.0, 0.0, -1.0)
    kl, tail = stored_target_loss(flat, *_stored(flat, 5))
    assert kl.abs().max() < 1e-3 and (tail > 0.25).all()  # 95 classes of 327 mass units


def test_the_study_says_at_which_k_cache_equals_online_at_its_spread(tmp_path) -> None:
    """``make demo-classes``'s verdict: a k holds when its students' figure is within the spread
    of the online students' (the demo's rule), and each cache of another k has its own folder."""
    from civt_cache.stages.cache_teachers import CacheJob
    from civt_cache.topk_study import ONLINE, cache_at, table

    def student(*last3: float) -> list[dict]:
        return [{"val_top1": 10.0}] * 4 + [{"val_top1": v} for v in last3]

    kept = {k: {t: dict(kl_mean=0.1, kl_p99=0.3, tail_mean=0.2, tail_p99=0.5, views=8) for t in ("conv", "inv")}
            for k in (1, 10)}
    runs = {"cache, k = 1": [student(40, 41, 42), student(42, 41, 40)],
            "cache, k = 10": [student(60, 61, 62), student(61, 62, 60)],
            ONLINE: [student(61, 60, 62), student(60, 61, 62)]}
    lines = table(kept, runs, [0, 1], 1000, 100)
    assert lines[-1] == "cache = online holds within the spread at k = 10; not at k = 1."
    assert "| cache, k = 1 | 0.1000 / 0.3000 | 0.2000 / 0.5000 |" in "\n".join(lines)
    job = CacheJob(manifest="m.json", teachers=["conv=resnet10t:c.pth"], out=tmp_path / "cache-k10", topk=10)
    assert cache_at(job, 10) is job and cache_at(job, 1).out == tmp_path / "cache-k10-k1"
