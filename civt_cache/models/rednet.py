"""RedNet (Li et al., CVPR 2021): ResNet bottlenecks whose 3x3 conv is a 7x7 involution.

Module names follow the official mmcls code (``stem.N``, ``layerN.M.conv1/bn1/conv2/...``,
``downsample``), so an official checkpoint loads once ``checkpoints.match_layout`` has recognised
its ``backbone.*``/``head.fc.*`` layout (or co-advise's ``model.*``/``classifier.*``). Registered
in timm as rednet26 ... 152.
"""
from typing import Any, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from timm.layers import create_classifier
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn

from civt_cache.models.checkpoints import match_layout
from civt_cache.models.involution import ConvNormAct, Impl, Involution

DEPTHS: dict[int, tuple[int, int, int, int]] = {
    26: (1, 2, 4, 1), 38: (2, 3, 5, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def rednet_stem(stem_channels: int = 64, in_chans: int = 3, impl: Impl = "shift") -> nn.Sequential:
    """3x3/2 conv to C/2 + BN + ReLU, involution(C/2, K=3), BN, ReLU, 3x3 conv to C + BN + ReLU.

    Shared with the CivT student's involution stem."""
    half = stem_channels // 2
    return nn.Sequential(
        ConvNormAct(in_chans, half, 3, stride=2, padding=1),
        Involution(half, 3, 1, impl=impl),
        nn.BatchNorm2d(half),
        nn.ReLU(inplace=True),
        ConvNormAct(half, stem_channels, 3, stride=1, padding=1),
    )


class Bottleneck(nn.Module):
    """1x1 conv -> involution(7x7, stride) -> 1x1 conv (x4), with BN after each and a shortcut."""

    expansion = 4

    def __init__(self, cin: int, cout: int, stride: int, avg_down: bool, impl: Impl = "shift") -> None:
        super().__init__()
        mid = cout // self.expansion
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = Involution(mid, 7, stride, impl=impl)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module = nn.Identity()
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
        return self.relu(out + self.downsample(x))


LAYERS = ("layer1", "layer2", "layer3", "layer4")


class RedNet(nn.Module):
    """RedNet classifier with timm's model conventions: ``forward_features`` (unpooled map),
    ``forward_head``, ``reset_classifier`` (incl. ``global_pool=''``), ``feature_info`` and
    ``features_only`` (stem at stride 2, then stages at 4/8/16/32, like timm's ResNet), and
    ``forward_intermediates``. ``avg_down=False`` matches the released models (strided 1x1
    shortcut); ``True`` gives the average-pool shortcut (same parameter count)."""

    def __init__(self, depth: int = 26, num_classes: int = 1000, in_chans: int = 3,
                 global_pool: str = "avg", avg_down: bool = False, drop_rate: float = 0.0,
                 involution_impl: Impl = "shift", **_: Any) -> None:
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"RedNet depth must be one of {sorted(DEPTHS)}, got {depth}")
        self.num_classes, self.drop_rate = num_classes, drop_rate
        self.stem = rednet_stem(64, in_chans, involution_impl)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.feature_info = [dict(num_chs=64, reduction=2, module="stem")]
        cin, cout, reduction = 64, 256, 4
        for i, blocks in enumerate(DEPTHS[depth]):
            stride = 1 if i == 0 else 2
            reduction *= stride
            layer = [Bottleneck(cin if b == 0 else cout, cout, stride if b == 0 else 1, avg_down,
                                involution_impl) for b in range(blocks)]
            self.add_module(LAYERS[i], nn.Sequential(*layer))
            self.feature_info.append(dict(num_chs=cout, reduction=reduction, module=LAYERS[i]))
            cin, cout = cout, cout * 2
        self.num_features = self.head_hidden_size = cin
        self.global_pool, self.fc = create_classifier(cin, num_classes, pool_type=global_pool)
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

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        pool = self.global_pool.pool_type if global_pool is None else global_pool
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=pool)

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False,
                              ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Final features and the maps of ``indices`` (0: stem, 1-4: stages; int: the last n),
        as timm's ``forward_intermediates``. ``norm`` is accepted for the common signature; a
        RedNet has no final norm."""
        if output_fmt != "NCHW":
            raise ValueError(f"RedNet intermediates are NCHW, not {output_fmt}")
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        x = self.stem(x)
        intermediates = [x] if 0 in take else []
        x = self.maxpool(x)
        for i, name in enumerate(LAYERS[:max_index] if stop_early else LAYERS, start=1):
            x = getattr(self, name)(x)
            if i in take:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the stages (and head) after the last of ``indices``; returns the kept indices."""
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        for name in LAYERS[max_index:]:
            setattr(self, name, nn.Sequential())
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.stem(x))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
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
