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


def test_involution_impl_is_static_and_traceable() -> None:
    """The implementation is chosen at construction, so fx tracing and torch.export capture the
    layer as one graph with the eager numerics."""
    torch.manual_seed(0)
    x = torch.randn(2, 64, 15, 16)
    for impl in ("shift", "unfold"):
        m = Involution(64, 7, 2, impl=impl).eval()
        traced = torch.fx.symbolic_trace(m)
        assert torch.equal(traced(x), m(x))
        exported = torch.export.export(m, (x,))
        torch.testing.assert_close(exported.module()(x), m(x))
    assert Involution(64, 7).impl == "shift"
    with pytest.raises(ValueError, match="impl must be one of"):
        Involution(64, 7, impl="auto")


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


def test_the_student_stems_involution_bias_starts_at_zero() -> None:
    """As the official model initialises it: the kernel-generating conv of the involution in
    the student's RedNet stem has a zero bias (its weights are random)."""
    from civt_cache.models.involution import Involution

    torch.manual_seed(0)
    for name in ("civt_micro", "civt_tiny"):
        involutions = [m for m in timm.create_model(name).modules() if isinstance(m, Involution)]
        assert involutions
        for inv in involutions:
            assert torch.count_nonzero(inv.conv2.conv.bias) == 0
            assert torch.count_nonzero(inv.conv2.conv.weight) > 0


def test_civt_outputs_and_drop_path() -> None:
    torch.manual_seed(0)
    m = timm.create_model("civt_micro", num_classes=10, drop_path_rate=0.2)
    assert m.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    x = torch.randn(3, 3, 32, 32)
    assert m(x).shape == (3, 10)  # timm's convention: one tensor in training too
    m.set_distilled_training(True)
    heads = m(x)
    assert isinstance(heads, tuple) and [h.shape for h in heads] == [(3, 10)] * 3
    m.eval()
    cls_head, conv_head, inv_head = m.forward_heads(x)
    torch.testing.assert_close(m(x), (cls_head + conv_head + inv_head) / 3)
    tiny = timm.create_model("civt_tiny", num_classes=5, img_size=64, token_stride=8)
    assert tiny.pos_embed.shape[1] == (64 // 8) ** 2 + 3


def _fx_equal(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Symbolically trace ``model`` with timm's leaf modules/functions and compare outputs."""
    from timm.models import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=kwargs)
    fx = create_feature_extractor(model, train_return_nodes=[train_nodes[-1]],
                                  eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=kwargs)
    assert torch.equal(next(iter(fx(x).values())), model(x))


@pytest.mark.parametrize("name", ["rednet26", "rednet50"])
def test_rednet_timm_conventions(name: str) -> None:
    torch.manual_seed(0)
    m = timm.create_model(name, num_classes=7).eval()
    x = torch.randn(2, 3, 64, 64)
    feats = m.forward_features(x)
    assert feats.shape == (2, 2048, 2, 2) and m.num_features == m.head_hidden_size == 2048
    assert m.forward_head(feats, pre_logits=True).shape == (2, 2048)
    _fx_equal(m, x)
    final, inter = m.forward_intermediates(x)
    assert torch.equal(final, feats)
    assert [t.shape[1:] for t in inter] == [(64, 32, 32), (256, 16, 16), (512, 8, 8), (1024, 4, 4), (2048, 2, 2)]
    assert len(m.forward_intermediates(x, indices=2, intermediates_only=True)) == 2
    m.reset_classifier(0)
    assert m(x).shape == (2, 2048)
    m.reset_classifier(0, "")
    assert m(x).shape == (2, 2048, 2, 2)
    assert timm.create_model(name, num_classes=0, global_pool="").eval()(x).shape == (2, 2048, 2, 2)
    m.reset_classifier(5, "avg")
    assert m(x).shape == (2, 5) and m.get_classifier().out_features == 5
    fm = timm.create_model(name, features_only=True, out_indices=(1, 2, 3, 4)).eval()
    assert fm.feature_info.reduction() == [4, 8, 16, 32]
    assert fm.feature_info.channels() == [256, 512, 1024, 2048]
    assert [o.shape[-1] for o in fm(x)] == [16, 8, 4, 2]
    getter = timm.create_model(name, features_only=True, feature_cls="getter", out_indices=(2, 4)).eval()
    assert [o.shape[1:] for o in getter(x)] == [(512, 8, 8), (2048, 2, 2)]


@pytest.mark.parametrize("name,size", [("civt_micro", 32), ("civt_tiny", 224)])
def test_civt_timm_conventions(name: str, size: int, tmp_path) -> None:
    torch.manual_seed(0)
    m = timm.create_model(name, num_classes=7).eval()
    d, stride = m.embed_dim, m.token_stride
    n = (size // stride) ** 2
    x = torch.randn(2, 3, size, size)
    tokens = m.forward_features(x)
    assert tokens.shape == (2, 3 + n, d) and m.num_features == m.head_hidden_size == d
    assert torch.equal(m.forward_head(tokens, pre_logits=True), tokens[:, :3].mean(1))
    _fx_equal(m, x)
    final, inter = m.forward_intermediates(x, indices=2)
    assert torch.equal(final, tokens)
    assert [t.shape for t in inter] == [(2, d, size // stride, size // stride)] * 2
    fm = timm.create_model(name, features_only=True).eval()
    assert fm.feature_info.reduction() == [stride] * 3 and len(fm(x)) == 3
    m.reset_classifier(0)
    assert m(x).shape == (2, d)
    assert timm.create_model(name, num_classes=0).eval()(x).shape == (2, d)
    # other input sizes: dynamically resampled, or resampled once on load
    big = size * 2
    dyn = timm.create_model(name, num_classes=7, dynamic_img_size=True).eval()
    dyn.load_state_dict(timm.create_model(name, num_classes=7).state_dict())
    assert dyn(torch.randn(1, 3, big, big)).shape == (1, 7)
    with pytest.raises(Exception, match=f"built for {size}x{size} inputs"):
        m(torch.randn(1, 3, big, big))
    src = timm.create_model(name, num_classes=7)
    torch.save(src.state_dict(), tmp_path / "w.pth")
    loaded = timm.create_model(name, num_classes=7, img_size=big, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(tmp_path / "w.pth"))).eval()
    assert loaded.pos_embed.shape == (1, 3 + 4 * n, d)
    assert torch.equal(loaded.pos_embed[:, :3], src.pos_embed[:, :3])  # the three tokens kept
    assert loaded(torch.randn(1, 3, big, big)).shape == (1, 7)


def test_a_civt_trains_in_timms_own_training_task() -> None:
    """timm's train.py drives a model through ``timm.task.ClassificationTask``, with its Mixup,
    soft-target loss, optimizer factory and EMA: a CivT trains there like any classifier (one
    tensor from its training forward), and co-advise's stage two switches its heads on with
    timm's ``set_distilled_training``."""
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.task import ClassificationTask
    from timm.utils import ModelEmaV3

    torch.manual_seed(0)
    model = timm.create_model("civt_micro", num_classes=10, img_size=32, drop_path_rate=0.1)
    task = ClassificationTask(model, criterion=SoftTargetCrossEntropy(), verbose=False)
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    ema = ModelEmaV3(model, decay=0.9)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    losses = []
    task.train()
    for _ in range(4):
        xm, target = mixup(x.clone(), y)
        out = task(xm, target)
        assert out["output"].shape == (8, 10)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        ema.update(model)
        losses.append(float(out["loss"]))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert ema.module.eval()(x).shape == (8, 10)
    from civt_cache.models.civt import coadvise_student

    heads = coadvise_student("civt_micro", num_classes=10, img_size=32).train()(x)
    assert isinstance(heads, tuple) and len(heads) == 3
