"""Involution, RedNet, CivT, teacher loading and train-teacher (issue: models)."""
from __future__ import annotations

import pytest
import timm
import torch

import civt_cache  # noqa: F401  (registers the models)
from civt_cache.models.involution import Involution


@pytest.mark.parametrize("channels,k,stride,size", [(32, 3, 1, 9), (64, 7, 1, 15), (64, 7, 2, 15),
                                                    (64, 7, 2, 16), (32, 3, 2, 7)])
def test_involution_impls_equal_in_outputs_and_gradients(channels, k, stride, size) -> None:
    torch.manual_seed(0)
    m = Involution(channels, k, stride).double()
    x = torch.randn(2, channels, size, size + 2, dtype=torch.double, requires_grad=True)
    results = []
    for impl in ("unfold", "shift"):
        m.impl = impl
        y = m(x)
        grads = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel(), dtype=torch.double).view_as(y)).sum(),
                                    [x, *m.parameters()])
        results.append((y, grads))
    (y1, g1), (y2, g2) = results
    assert y1.shape == (2, channels, -(-size // stride), -(-(size + 2) // stride))
    torch.testing.assert_close(y1, y2, rtol=1e-10, atol=1e-10)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_involution_autocast_and_channels_last(dtype) -> None:
    torch.manual_seed(0)
    m = Involution(64, 7, 2).eval()
    x = torch.randn(2, 64, 14, 14)
    ref = m(x)
    for impl in ("unfold", "shift"):
        m.impl = impl
        torch.testing.assert_close(m(x.contiguous(memory_format=torch.channels_last)), ref,
                                   rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=dtype):
            y = m(x)  # kernels generated in low precision, aggregation follows the input
        torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05)
        low = Involution(64, 7, 2, impl=impl).eval()
        low.load_state_dict(m.state_dict())
        y = low.to(dtype)(x.to(dtype).contiguous(memory_format=torch.channels_last))
        assert y.dtype == dtype
        torch.testing.assert_close(y.float(), ref, rtol=0.1, atol=0.1)


def test_involution_auto_picks_shift_for_large_inputs() -> None:
    m = Involution(64, 7, 1)
    assert m.choose_impl(torch.empty(1, 64, 8, 8)) == "unfold"
    assert m.choose_impl(torch.empty(64, 64, 56, 56)) == "shift"


def test_rednet_parameter_counts_match_published() -> None:
    published = {26: 9.23, 38: 12.39, 50: 15.54, 101: 25.65, 152: 33.99}  # millions, involution README
    for depth, millions in published.items():
        n = sum(p.numel() for p in timm.create_model(f"rednet{depth}").parameters())
        assert abs(n / 1e6 - millions) < 0.006, (depth, n)  # 152 counts 33,984,582


def test_civt_parameter_counts_match_official() -> None:
    """Official CivT = DeiT (timm's published counts) - patch embedding + 2 extra position
    tokens + two extra heads + the conv stem + the RedNet-26 stem (each with its 8x8 projection)."""
    deit = {"civt_tiny": (5_717_416, 192), "civt_small": (22_050_664, 384), "civt_base": (86_567_656, 768)}
    conv_stem = 3 * 64 * 49 + 128 + 2 * (64 * 64 * 9 + 128)
    inv_stem = (3 * 32 * 9 + 64) + (32 * 8 + 16) + (8 * 18 + 18) + 64 + (32 * 64 * 9 + 128)
    for name, (n_deit, d) in deit.items():
        proj = 64 * d * 64 + d
        expected = (n_deit - (3 * 16 * 16 * d + d) + 2 * d + 2 * (d * 1000 + 1000)
                    + conv_stem + proj + inv_stem + proj)
        assert sum(p.numel() for p in timm.create_model(name).parameters()) == expected


def test_civt_outputs_and_drop_path() -> None:
    torch.manual_seed(0)
    m = timm.create_model("civt_micro", num_classes=10, drop_path_rate=0.2)
    assert m.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    x = torch.randn(3, 3, 32, 32)
    heads = m(x)
    assert isinstance(heads, tuple) and [h.shape for h in heads] == [(3, 10)] * 3
    m.eval()
    cls_head, conv_head, inv_head = m.forward_heads(x)
    torch.testing.assert_close(m(x), (cls_head + conv_head + inv_head) / 3)
    tiny = timm.create_model("civt_tiny", num_classes=5, img_size=64, token_stride=8)
    assert tiny.pos_embed.shape[1] == (64 // 8) ** 2 + 3
