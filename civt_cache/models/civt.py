"""CivT, the co-advise student: a ViT whose patch embedding is two stems of different
inductive bias, each advised by its own teacher through its own token and head.

Sequence: [cls, conv token, involution token, patch tokens] + learned position embedding, where
the patch tokens are conv-stem tokens + involution-stem tokens, and the conv / involution tokens
are the means of each stem's tokens. Training forward returns (class, conv, involution) logits;
eval returns their mean. Module names match the official co-advise code (conv_embed.conv,
inv_embed.stem, head_conv, head_inv). Unlike the official code, ``drop_path_rate`` reaches the
blocks. Registered in timm as civt_micro/tiny/small/base.
"""
from __future__ import annotations

from typing import Any

import torch
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block
from torch import nn

from .rednet import rednet_stem

STEM_STRIDE = 2


class ConvEmbed(nn.Module):
    """7x7/2 conv 3->64 + BN + ReLU, two 3x3 64->64 conv + BN + ReLU, then a PxP/P projection."""

    def __init__(self, embed_dim: int, proj: int, in_chans: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_chans, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                                   nn.ReLU(inplace=True)]
        for _ in range(2):
            layers += [nn.Conv2d(64, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64),
                       nn.ReLU(inplace=True)]
        self.conv = nn.Sequential(*layers)
        self.proj = nn.Conv2d(64, embed_dim, proj, proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.conv(x)).flatten(2).transpose(1, 2)


class InvEmbed(nn.Module):
    """The RedNet-26 stem (no max pool), then a PxP/P projection."""

    def __init__(self, embed_dim: int, proj: int, in_chans: int = 3) -> None:
        super().__init__()
        self.stem = rednet_stem(64, in_chans)
        self.proj = nn.Conv2d(64, embed_dim, proj, proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.stem(x)).flatten(2).transpose(1, 2)


class CivT(nn.Module):
    """Cross-inductive-bias ViT; see the module docstring."""

    def __init__(self, img_size: int = 224, num_classes: int = 1000, embed_dim: int = 192,
                 depth: int = 12, num_heads: int = 3, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 token_stride: int = 16, in_chans: int = 3, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, **_: Any) -> None:
        super().__init__()
        if token_stride % STEM_STRIDE or img_size % token_stride:
            raise ValueError(f"token_stride {token_stride} must be even and divide img_size {img_size}")
        proj = token_stride // STEM_STRIDE
        self.num_classes, self.embed_dim, self.num_features = num_classes, embed_dim, embed_dim
        self.img_size, self.token_stride = img_size, token_stride
        num_patches = (img_size // token_stride) ** 2
        self.conv_embed = ConvEmbed(embed_dim, proj, in_chans)
        self.inv_embed = InvEmbed(embed_dim, proj, in_chans)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 3, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, attn_drop=attn_drop_rate,
                  proj_drop=drop_rate, drop_path=rate, norm_layer=_layer_norm)
            for rate in rates])
        self.norm = _layer_norm(embed_dim)
        self.head = self._linear_head(num_classes)
        self.head_conv = self._linear_head(num_classes)
        self.head_inv = self._linear_head(num_classes)
        self._init_weights()

    def _linear_head(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def _init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW must not decay (timm's optimizer factory reads this)."""
        return {"pos_embed", "cls_token"}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head = self._linear_head(num_classes)
        self.head_conv = self._linear_head(num_classes)
        self.head_inv = self._linear_head(num_classes)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Final-norm features of the cls, conv and involution tokens."""
        x_conv, x_inv = self.conv_embed(x), self.inv_embed(x)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1),
                            x_conv.mean(1, keepdim=True), x_inv.mean(1, keepdim=True),
                            x_conv + x_inv], dim=1)
        x = self.norm(self.blocks(self.pos_drop(tokens + self.pos_embed)))
        return x[:, 0], x[:, 1], x[:, 2]

    def forward_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(class, conv, involution) logits, in any mode."""
        cls_tok, conv_tok, inv_tok = self.forward_features(x)
        return self.head(cls_tok), self.head_conv(conv_tok), self.head_inv(inv_tok)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        logits = self.forward_heads(x)
        return logits if self.training else (logits[0] + logits[1] + logits[2]) / 3


def _layer_norm(dim: int, **kwargs: Any) -> nn.LayerNorm:
    """DeiT's LayerNorm (eps 1e-6); kwargs carry timm's device/dtype."""
    return nn.LayerNorm(dim, eps=1e-6, **kwargs)


def _cfg(size: int = 224, **kwargs: Any) -> dict[str, Any]:
    return {"num_classes": 1000, "input_size": (3, size, size), "crop_pct": 0.875,
            "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225), "first_conv": "conv_embed.conv.0",
            "classifier": "head", **kwargs}


default_cfgs = generate_default_cfgs({
    "civt_micro": _cfg(32), "civt_tiny": _cfg(), "civt_small": _cfg(), "civt_base": _cfg()})

ARCHS: dict[str, dict[str, Any]] = {
    "civt_micro": dict(embed_dim=96, depth=6, num_heads=3, token_stride=4, img_size=32),
    "civt_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "civt_small": dict(embed_dim=384, depth=12, num_heads=6),
    "civt_base": dict(embed_dim=768, depth=12, num_heads=12),
}


def _create(name: str, pretrained: bool, **kwargs: Any) -> CivT:
    return build_model_with_cfg(CivT, name, pretrained, **{**ARCHS[name], **kwargs})


@register_model
def civt_micro(pretrained: bool = False, **kwargs: Any) -> CivT:
    """96-dim, 6 blocks, token stride 4 at 32 px: for small data and the demo."""
    return _create("civt_micro", pretrained, **kwargs)


@register_model
def civt_tiny(pretrained: bool = False, **kwargs: Any) -> CivT:
    """CivT-Ti: 192-dim, 12 blocks, 3 heads."""
    return _create("civt_tiny", pretrained, **kwargs)


@register_model
def civt_small(pretrained: bool = False, **kwargs: Any) -> CivT:
    """CivT-S: 384-dim, 12 blocks, 6 heads."""
    return _create("civt_small", pretrained, **kwargs)


@register_model
def civt_base(pretrained: bool = False, **kwargs: Any) -> CivT:
    """CivT-B: 768-dim, 12 blocks, 12 heads."""
    return _create("civt_base", pretrained, **kwargs)
