"""Involution (Li et al., CVPR 2021): a per-pixel, channel-shared kernel generated from the input.

For each output pixel a KxK kernel per group of 16 channels is generated from that pixel's
features (1x1 conv C -> C/4 + BN + ReLU, then 1x1 conv C/4 -> K*K*G with bias; the input is
average-pooled by the stride first when stride > 1), and the KxK window is aggregated with it.

Two implementations compute the same function:
- ``unfold``: the published reference; materialises a (B, C*K*K, H*W) tensor (49x the input for
  K=7), which dominates memory and bandwidth in RedNet.
- ``shift`` (the default): accumulates K*K shifted views of the padded input with ``addcmul_``;
  it never holds more than the output and works unchanged in any dtype, under autocast and with
  channels_last (which the official CUDA kernel supports neither of).
The choice is fixed at construction (``impl``, or ``involution_impl`` of RedNet/CivT), never
taken from the input's size, so the layer traces (torch.fx), exports and compiles with
``fullgraph=True`` as one graph.

Stride-2 average pooling uses ``ceil_mode=True`` so odd spatial sizes work; for even sizes this
equals the published model (whose code fails on odd sizes with stride 2).
"""
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Impl = Literal["unfold", "shift"]
IMPLS = ("unfold", "shift")


class ConvNormAct(nn.Module):
    """Conv + optional BN + optional ReLU, with the `.conv`/`.bn` names of mmcv's ConvModule so
    official checkpoints load by name."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 norm: bool = True, act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, bias=not norm)
        self.bn = nn.BatchNorm2d(cout) if norm else nn.Identity()
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


def involution_unfold(x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int,
                      groups: int) -> torch.Tensor:
    """Reference aggregation: unfold the KxK windows, multiply by the kernels, sum."""
    b, c = x.shape[:2]
    h, w = weight.shape[-2:]
    k2 = kernel_size * kernel_size
    cols = F.unfold(x, kernel_size, 1, (kernel_size - 1) // 2, stride)
    cols = cols.view(b, groups, c // groups, k2, h, w)
    return (weight.view(b, groups, 1, k2, h, w) * cols).sum(dim=3).view(b, c, h, w)


def involution_shift(x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int,
                     groups: int) -> torch.Tensor:
    """Memory-lean aggregation: sum over the K*K offsets of kernel * shifted (strided) input.

    Out-of-place ``torch.addcmul`` (one fused kernel per offset): in-place accumulation would
    hide the data flow from torch.fx, whose dead-code elimination then drops it."""
    b, c = x.shape[0], x.shape[1]
    h, w = weight.shape[-2], weight.shape[-1]
    pad = (kernel_size - 1) // 2
    xp = F.pad(x, (pad, pad, pad, pad))
    kern = weight.view(b, groups, 1, kernel_size * kernel_size, h, w)
    out = torch.zeros((b, groups, c // groups, h, w), dtype=torch.result_type(x, weight),
                      device=x.device)
    for i in range(kernel_size):
        for j in range(kernel_size):
            window = xp[:, :, i:i + stride * (h - 1) + 1:stride, j:j + stride * (w - 1) + 1:stride]
            out = torch.addcmul(out, kern[:, :, :, i * kernel_size + j],
                                window.reshape(b, groups, c // groups, h, w))
    return out.view(b, c, h, w)


class Involution(nn.Module):
    """Involution layer; attribute names match the official RedNet code (conv1, conv2)."""

    def __init__(self, channels: int, kernel_size: int, stride: int = 1, group_channels: int = 16,
                 reduction: int = 4, impl: Impl = "shift") -> None:
        super().__init__()
        if channels % group_channels:
            raise ValueError(f"involution channels {channels} not divisible by {group_channels}")
        if impl not in IMPLS:
            raise ValueError(f"involution impl must be one of {IMPLS}, got {impl!r}")
        self.kernel_size, self.stride, self.impl = kernel_size, stride, impl
        self.groups = channels // group_channels
        self.conv1 = ConvNormAct(channels, channels // reduction, 1)
        self.conv2 = ConvNormAct(channels // reduction, kernel_size ** 2 * self.groups, 1,
                                 norm=False, act=False)
        self.avgpool = nn.AvgPool2d(stride, stride, ceil_mode=True) if stride > 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.conv2(self.conv1(self.avgpool(x)))
        if self.impl == "unfold":
            return involution_unfold(x, weight, self.kernel_size, self.stride, self.groups)
        return involution_shift(x, weight, self.kernel_size, self.stride, self.groups)
