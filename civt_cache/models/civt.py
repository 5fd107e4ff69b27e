"""CivT, the co-advise student: a ViT whose patch embedding is two stems of different
inductive bias, each advised by its own teacher through its own token and head.

Sequence: [cls, conv token, involution token, patch tokens] + learned position embedding, where
the patch tokens are conv-stem tokens + involution-stem tokens, and the conv / involution tokens
are the means of each stem's tokens. Forward returns the mean of the (class, conv, involution)
logits, in training too, as timm's distilled DeiT does: a CivT trains in timm's train.py like
any classifier. ``set_distilled_training(True)`` (timm's switch; stage two sets it) makes the
training forward return the three logits, one per loss term. Module names match the official co-advise code (conv_embed.conv,
inv_embed.stem, head_conv, head_inv). Unlike the official code, ``drop_path_rate`` reaches the
blocks. Registered in timm as civt_micro/tiny/small/base, with timm's ViT conventions:
``forward_features`` (normed tokens), ``forward_head(pre_logits=True)`` (the mean of the three
prefix tokens), ``head_hidden_size``, ``forward_intermediates`` and ``features_only`` (patch-token
maps), ``dynamic_img_size`` and position embeddings resampled on load for other input sizes.
"""
from typing import Any, List, Optional, Tuple, Union

import torch
from timm.layers import _assert, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Block
from torch import nn

from civt_cache.models.involution import Impl, Involution
from civt_cache.models.rednet import rednet_stem

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
        """The token map [B, D, H/stride, W/stride]."""
        return self.proj(self.conv(x))


class InvEmbed(nn.Module):
    """The RedNet-26 stem (no max pool), then a PxP/P projection."""

    def __init__(self, embed_dim: int, proj: int, in_chans: int = 3,
                 involution_impl: Impl = "shift") -> None:
        super().__init__()
        self.stem = rednet_stem(64, in_chans, involution_impl)
        self.proj = nn.Conv2d(64, embed_dim, proj, proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The token map [B, D, H/stride, W/stride]."""
        return self.proj(self.stem(x))


class CivT(nn.Module):
    """Cross-inductive-bias ViT; see the module docstring."""

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, num_classes: int = 1000, embed_dim: int = 192,
                 depth: int = 12, num_heads: int = 3, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 token_stride: int = 16, in_chans: int = 3, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 dynamic_img_size: bool = False, involution_impl: Impl = "shift", **_: Any) -> None:
        super().__init__()
        size = to_2tuple(img_size)
        if token_stride % STEM_STRIDE or size[0] % token_stride or size[1] % token_stride:
            raise ValueError(f"token_stride {token_stride} must be even and divide img_size {img_size}")
        proj = token_stride // STEM_STRIDE
        self.num_classes, self.embed_dim = num_classes, embed_dim
        self.num_features = self.head_hidden_size = embed_dim
        self.num_prefix_tokens = 3  # cls, conv, involution
        self.img_size, self.token_stride = size, token_stride
        self.grid_size = (size[0] // token_stride, size[1] // token_stride)
        self.dynamic_img_size = dynamic_img_size
        self.conv_embed = ConvEmbed(embed_dim, proj, in_chans)
        self.inv_embed = InvEmbed(embed_dim, proj, in_chans, involution_impl)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1]
                                                  + self.num_prefix_tokens, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, attn_drop=attn_drop_rate,
                  proj_drop=drop_rate, drop_path=rate, norm_layer=_layer_norm)
            for rate in rates])
        self.norm = _layer_norm(embed_dim)
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=token_stride)
                             for i in range(depth)]
        self.head = self._linear_head(num_classes)
        self.head_conv = self._linear_head(num_classes)
        self.head_inv = self._linear_head(num_classes)
        self.distilled_training = False
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
            elif isinstance(m, Involution):  # its kernel-generating conv starts unbiased, as officially
                nn.init.zeros_(m.conv2.conv.bias)

    @torch.jit.ignore
    def set_distilled_training(self, enable: bool = True) -> None:
        """timm's switch for models with distillation heads: with it, the training forward
        returns every head's logits (co-advise's loss needs one per token) instead of their mean."""
        self.distilled_training = enable

    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW must not decay (timm's optimizer factory reads this)."""
        return {"pos_embed", "cls_token"}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """New (or, with 0, no) heads for all three tokens; pooling is fixed (the tokens)."""
        self.num_classes = num_classes
        self.head = self._linear_head(num_classes)
        self.head_conv = self._linear_head(num_classes)
        self.head_inv = self._linear_head(num_classes)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Prefix + patch tokens with position embedding, and the token grid (h, w)."""
        conv_map, inv_map = self.conv_embed(x), self.inv_embed(x)
        grid = (conv_map.shape[-2], conv_map.shape[-1])
        x_conv, x_inv = conv_map.flatten(2).transpose(1, 2), inv_map.flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1),
                            x_conv.mean(1, keepdim=True), x_inv.mean(1, keepdim=True),
                            x_conv + x_inv], dim=1)
        pos = self.pos_embed
        if self.dynamic_img_size:
            pos = resample_abs_pos_embed(pos, list(grid), list(self.grid_size),
                                         num_prefix_tokens=self.num_prefix_tokens)
        else:  # torch._assert: traceable, unlike a Python branch on the input's shape
            msg = (f"CivT was built for {self.img_size[0]}x{self.img_size[1]} inputs; create it "
                   "with that img_size, or with dynamic_img_size=True")
            _assert(grid[0] == self.grid_size[0], msg)
            _assert(grid[1] == self.grid_size[1], msg)
        return self.pos_drop(tokens + pos), grid

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final-norm tokens [B, 3 + N, D]: cls, conv, involution, then the patches."""
        tokens, _ = self._embed(x)
        return self.norm(self.blocks(tokens))

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False,
                              ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Final-norm tokens and the patch-token maps after the blocks in ``indices`` (int: the
        last n), NCHW [B, D, H/stride, W/stride] or NLC, as timm's ViTs."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"CivT intermediates are NCHW or NLC, not {output_fmt}")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        tokens, (h, w) = self._embed(x)
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, block in enumerate(blocks):
            tokens = block(tokens)
            if i in take:
                patches = (self.norm(tokens) if norm else tokens)[:, self.num_prefix_tokens:]
                if output_fmt == "NCHW":
                    patches = patches.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()
                intermediates.append(patches)
        if intermediates_only:
            return intermediates
        return self.norm(tokens), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the blocks (and norm, head) after the last of ``indices``; returns them."""
        take, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False
                     ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """From ``forward_features``' tokens: the three heads' mean logits, or in distilled
        training (class, conv, involution) logits; ``pre_logits``: the mean of the three prefix
        tokens."""
        if pre_logits:
            return x[:, :self.num_prefix_tokens].mean(1)
        cls_logits = self.head(x[:, 0])
        conv_logits, inv_logits = self.head_conv(x[:, 1]), self.head_inv(x[:, 2])
        if self.distilled_training and self.training and not torch.jit.is_scripting():
            return cls_logits, conv_logits, inv_logits
        return (cls_logits + conv_logits + inv_logits) / 3

    def forward_heads(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(class, conv, involution) logits, in any mode."""
        t = self.forward_features(x)
        return self.head(t[:, 0]), self.head_conv(t[:, 1]), self.head_inv(t[:, 2])

    def forward(self, x: torch.Tensor
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return self.forward_head(self.forward_features(x))


def coadvise_student(name: str, **kwargs: Any) -> CivT:
    """A registered CivT (``timm.create_model(name, **kwargs)``) as co-advise trains it: in
    distilled training, so its training forward gives each head's logits to its loss term."""
    import timm

    model = timm.create_model(name, **kwargs)
    model.set_distilled_training(True)
    return model


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: CivT) -> dict[str, torch.Tensor]:
    """Weights for another input size: the patch part of the position embedding is resampled
    (bicubic) to the model's token grid; the three prefix positions are kept."""
    out = dict(state_dict)
    pos = out.get("pos_embed")
    if pos is not None and pos.shape != model.pos_embed.shape:
        out["pos_embed"] = resample_abs_pos_embed(pos, list(model.grid_size),
                                                  num_prefix_tokens=model.num_prefix_tokens)
    return out


def _layer_norm(dim: int, **kwargs: Any) -> nn.LayerNorm:
    """DeiT's LayerNorm (eps 1e-6); kwargs carry timm's device/dtype."""
    return nn.LayerNorm(dim, eps=1e-6, **kwargs)


def _cfg(size: int = 224, **kwargs: Any) -> dict[str, Any]:
    return {"num_classes": 1000, "input_size": (3, size, size), "pool_size": None,
            "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": True,
            "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
            "first_conv": ("conv_embed.conv.0", "inv_embed.stem.0.conv"),
            "classifier": ("head", "head_conv", "head_inv"), "license": "apache-2.0", **kwargs}


default_cfgs = generate_default_cfgs({
    "civt_micro": _cfg(32), "civt_tiny": _cfg(), "civt_small": _cfg(), "civt_base": _cfg()})

ARCHS: dict[str, dict[str, Any]] = {
    "civt_micro": dict(embed_dim=96, depth=6, num_heads=3, token_stride=4, img_size=32),
    "civt_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "civt_small": dict(embed_dim=384, depth=12, num_heads=6),
    "civt_base": dict(embed_dim=768, depth=12, num_heads=12),
}


def _create(name: str, pretrained: bool, **kwargs: Any) -> CivT:
    out_indices = kwargs.pop("out_indices", 3)  # features_only: the last 3 blocks, as timm's ViTs
    return build_model_with_cfg(CivT, name, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
                                **{**ARCHS[name], **kwargs})


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
