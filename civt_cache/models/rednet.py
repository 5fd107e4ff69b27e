"""RedNet (Li et al., CVPR 2021): ResNet bottlenecks whose 3x3 conv is a 7x7 involution.

Module names follow the official mmcls code (``stem.N``, ``layerN.M.conv1/bn1/conv2/...``,
``downsample``), so an official checkpoint loads once ``checkpoints.match_layout`` has recognised
its ``backbone.*``/``head.fc.*`` layout (or co-advise's ``model.*``/``classifier.*``). Registered
in timm as rednet26 ... 152.
"""
from __future__ import annotations

from typing import Any

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from .checkpoints import match_layout
from .involution import ConvNormAct, Involution

DEPTHS: dict[int, tuple[int, int, int, int]] = {
    26: (1, 2, 4, 1), 38: (2, 3, 5, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def rednet_stem(stem_channels: int = 64, in_chans: int = 3) -> nn.Sequential:
    """3x3/2 conv to C/2 + BN + ReLU, involution(C/2, K=3), BN, ReLU, 3x3 conv to C + BN + ReLU.

    Shared with the CivT student's involution stem."""
    half = stem_channels // 2
    return nn.Sequential(
        ConvNormAct(in_chans, half, 3, stride=2, padding=1),
        Involution(half, 3, 1),
        nn.BatchNorm2d(half),
        nn.ReLU(inplace=True),
        ConvNormAct(half, stem_channels, 3, stride=1, padding=1),
    )


class Bottleneck(nn.Module):
    """1x1 conv -> involution(7x7, stride) -> 1x1 conv (x4), with BN after each and a shortcut."""

    expansion = 4

    def __init__(self, cin: int, cout: int, stride: int, avg_down: bool) -> None:
        super().__init__()
        mid = cout // self.expansion
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = Involution(mid, 7, stride)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            layers: list[nn.Module] = []
            if avg_down and stride != 1:
                layers.append(nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False))
            layers += [nn.Conv2d(cin, cout, 1, stride=1 if avg_down else stride, bias=False),
                       nn.BatchNorm2d(cout)]
            self.downsample = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class RedNet(nn.Module):
    """RedNet classifier. ``avg_down=False`` matches the released models (strided 1x1 shortcut);
    ``True`` gives the average-pool shortcut (same parameter count)."""

    def __init__(self, depth: int = 26, num_classes: int = 1000, in_chans: int = 3,
                 avg_down: bool = False, drop_rate: float = 0.0, **_: Any) -> None:
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"RedNet depth must be one of {sorted(DEPTHS)}, got {depth}")
        self.num_classes = num_classes
        self.stem = rednet_stem(64, in_chans)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin, cout = 64, 256
        for i, blocks in enumerate(DEPTHS[depth]):
            stride = 1 if i == 0 else 2
            layer = [Bottleneck(cin if b == 0 else cout, cout, stride if b == 0 else 1, avg_down)
                     for b in range(blocks)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*layer))
            cin, cout = cout, cout * 2
        self.num_features = cin
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(cin, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():  # zero-init the last BN of each block, as the official code
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.stem(x))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.global_pool(x).flatten(1))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {"num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
            "crop_pct": 0.875, "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225), "first_conv": "stem.0.conv", "classifier": "fc",
            "license": "apache-2.0", **kwargs}


default_cfgs = generate_default_cfgs({f"rednet{d}": _cfg() for d in DEPTHS})


def _create(depth: int, pretrained: bool, **kwargs: Any) -> RedNet:
    return build_model_with_cfg(RedNet, f"rednet{depth}", pretrained, depth=depth,
                                pretrained_filter_fn=lambda sd, model: match_layout(sd, model, f"rednet{depth} weights"),
                                **kwargs)


@register_model
def rednet26(pretrained: bool = False, **kwargs: Any) -> RedNet:
    """RedNet-26 (9.23M parameters at 1000 classes)."""
    return _create(26, pretrained, **kwargs)


@register_model
def rednet38(pretrained: bool = False, **kwargs: Any) -> RedNet:
    """RedNet-38 (12.39M parameters)."""
    return _create(38, pretrained, **kwargs)


@register_model
def rednet50(pretrained: bool = False, **kwargs: Any) -> RedNet:
    """RedNet-50 (15.54M parameters)."""
    return _create(50, pretrained, **kwargs)


@register_model
def rednet101(pretrained: bool = False, **kwargs: Any) -> RedNet:
    """RedNet-101 (25.65M parameters)."""
    return _create(101, pretrained, **kwargs)


@register_model
def rednet152(pretrained: bool = False, **kwargs: Any) -> RedNet:
    """RedNet-152 (33.99M parameters)."""
    return _create(152, pretrained, **kwargs)
