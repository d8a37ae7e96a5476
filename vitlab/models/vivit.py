"""ViViT: A Video Vision Transformer (Arnab et al., ICCV 2021), models 1 and 2 on clips (B, C, T, H, W).

Both embed a clip with non-overlapping tubelets (a Conv3d whose kernel equals its stride, eq. 2: "tubelet
embedding"), then:
- model 1, spatio-temporal attention (`temporal_depth=0`, `vl_vivit_joint_*`): one transformer over the class token
  and all T'H'W' tubelet tokens, with a learned position embedding over them (eq. 1). This is what HF transformers'
  `VivitModel` / `VivitForVideoClassification` implement; `tests/models/test_vivit.py` copies their weights into ours.
- model 2, factorised encoder (`temporal_depth>0`, `vl_vivit_*`): a spatial transformer runs on each tubelet-frame's
  H'W' tokens with its own class token and a position embedding shared by all frames, ends in its LayerNorm, and
  hands its class token on; a temporal transformer then runs over the T' frame tokens with a second class token,
  position embedding and final LayerNorm; the head reads the temporal class token. Read against the official code,
  `SpaceTimeViViT` in google-research/scenic `scenic/projects/vivit/model.py` (commit 1dc7352d1dec): the spatial
  `Encoder` is vmapped over time (shared weights and position embedding), each `Encoder` adds its learned
  position embedding to the class token too and ends in `encoder_norm`, and classifier='token' takes token 0.

The blocks are timm's pre-norm `Block`s, so timm-ViT techniques that look for `blocks`, `attn.qkv` and `mlp.fc1`
find them; `blocks` are the (spatial or joint) blocks, `temporal_blocks` the temporal ones.
"""
from functools import partial

import torch
import torch.nn as nn
from timm.layers import get_act_layer, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import Block

from ..checkpoint import create_model
from ._builder import build_vitlab_model
from ._convert import register_hf_converter

__all__ = ["ViViT", "TubeletEmbed"]


class TubeletEmbed(nn.Module):
    """Clip (B, C, T, H, W) -> tubelet tokens (B, T', H'W', D) by a Conv3d with kernel = stride = tubelet_size."""

    def __init__(self, img_size: int | tuple[int, int], num_frames: int, tubelet_size: tuple[int, int, int],
                 in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.num_frames, self.in_chans, self.tubelet_size = num_frames, in_chans, tuple(tubelet_size)
        sizes = (num_frames, *self.img_size)
        if any(s % t for s, t in zip(sizes, self.tubelet_size)):
            raise ValueError(f"clip size (T, H, W) = {sizes} is not divisible by tubelet_size {self.tubelet_size}: "
                             f"pick a tubelet whose sides divide it")
        self.grid_size = tuple(s // t for s, t in zip(sizes, self.tubelet_size))  # (T', H', W')
        self.num_patches = self.grid_size[0] * self.grid_size[1] * self.grid_size[2]
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=self.tubelet_size, stride=self.tubelet_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = (self.in_chans, self.num_frames, *self.img_size)
        if not torch.jit.is_tracing() and (x.dim() != 5 or tuple(x.shape[1:]) != expected):  # traced: shapes fixed
            raise ValueError(f"ViViT expects clips (B, C, T, H, W) with (C, T, H, W) = {expected}, got "
                             f"{tuple(x.shape)}: build the model with num_frames/img_size/in_chans of the data")
        x = self.proj(x)  # (B, D, T', H', W')
        return x.flatten(3).permute(0, 2, 3, 1)  # (B, T', H'W', D)


class ViViT(nn.Module):
    """ViViT model 1 (joint space-time, `temporal_depth=0`) or model 2 (factorised encoder, `temporal_depth>0`)."""

    def __init__(
            self,
            img_size: int | tuple[int, int] = 224,
            num_frames: int = 32,
            tubelet_size: tuple[int, int, int] = (2, 16, 16),
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "token",
            embed_dim: int = 768,
            depth: int = 12,
            temporal_depth: int = 4,
            num_heads: int = 12,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            act_layer: str = "gelu",
            norm_eps: float = 1e-6,
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            freeze_spatial: bool = False,
    ):
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool={global_pool!r} must be 'token' or 'avg'")
        self.num_classes, self.global_pool, self.in_chans = num_classes, global_pool, in_chans
        self.num_frames = num_frames
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens, self.factorised = 1, temporal_depth > 0
        self.patch_embed = TubeletEmbed(img_size, num_frames, tubelet_size, in_chans, embed_dim)
        t, h, w = self.patch_embed.grid_size
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        n = depth + temporal_depth
        dpr = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]  # stochastic depth rising over both stacks
        block = partial(Block, dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                        proj_drop=drop_rate, norm_layer=norm_layer, act_layer=get_act_layer(act_layer))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (h * w if self.factorised else t * h * w), embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = nn.Sequential(*[block(drop_path=dpr[i]) for i in range(depth)])
        if self.factorised:
            self.spatial_norm = norm_layer(embed_dim)
            self.temporal_cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
            self.temporal_pos_embed = nn.Parameter(torch.zeros(1, 1 + t, embed_dim))
            self.temporal_blocks = nn.Sequential(*[block(drop_path=dpr[depth + i]) for i in range(temporal_depth)])
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()
        if freeze_spatial:
            self.freeze_spatial_()

    def freeze_spatial_(self) -> "ViViT":
        """Model 2 trained on a frozen spatial encoder (the recipe of seed entry 11): tubelet embedding, spatial class
        token, position embedding, spatial blocks and spatial LayerNorm stop requiring grad, so the optimizer skips
        them and autograd records no spatial backward. `vitlab train --model-kwargs '{"freeze_spatial": true}'`."""
        if not self.factorised:
            raise ValueError("freeze_spatial needs the factorised encoder (temporal_depth > 0): model 1 has no "
                             "separate spatial encoder; build a vl_vivit_* model, not vl_vivit_joint_*")
        for part in (self.patch_embed, self.blocks, self.spatial_norm):
            part.requires_grad_(False)
        self.cls_token.requires_grad_(False)
        self.pos_embed.requires_grad_(False)
        return self

    def _init_weights(self) -> None:
        for p in (self.pos_embed, getattr(self, "temporal_pos_embed", None)):
            if p is not None:
                trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "temporal_pos_embed", "temporal_cls_token"}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    @staticmethod
    def _encode(x: torch.Tensor, cls_token: torch.Tensor, pos_embed: torch.Tensor, blocks: nn.Module,
                drop: nn.Module) -> torch.Tensor:
        """Prepend the class token, add the position embedding (class token included, as scenic's
        AddPositionEmbs does), run the blocks: (B, N, D) -> (B, 1 + N, D)."""
        x = torch.cat([cls_token.expand(x.shape[0], -1, -1), x], dim=1) + pos_embed
        return blocks(drop(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Clip (B, C, T, H, W) -> final-normed tokens: (B, 1 + T'H'W', D) for model 1, (B, 1 + T', D) for model 2."""
        x = self.patch_embed(x)  # (B, T', H'W', D)
        B, T, N, D = x.shape
        if not self.factorised:
            return self.norm(self._encode(x.reshape(B, T * N, D), self.cls_token, self.pos_embed, self.blocks,
                                          self.pos_drop))
        x = self._encode(x.reshape(B * T, N, D), self.cls_token, self.pos_embed, self.blocks, self.pos_drop)
        x = self.spatial_norm(x[:, 0]).reshape(B, T, D)  # (B, T', D): each frame's spatial class token
        x = self._encode(x, self.temporal_cls_token, self.temporal_pos_embed, self.temporal_blocks, self.pos_drop)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0] if self.global_pool == "token" else x[:, self.num_prefix_tokens:].mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# transformers' activation names -> timm's; HF's "gelu_fast" is the tanh approximation (as flax's default nn.gelu)
_HF_ACT = {"gelu": "gelu", "gelu_fast": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


@register_hf_converter("vivit")
def _vivit_from_hf(hf_model) -> ViViT:
    """vitlab ViViT model 1 with the weights of a transformers `VivitForVideoClassification` (or `VivitModel`,
    giving a model without head). Inputs differ in layout: HF takes (B, T, C, H, W), ours (B, C, T, H, W)."""
    config = hf_model.config
    if config.hidden_act not in _HF_ACT:
        raise ValueError(f"hidden_act={config.hidden_act!r} does not convert: use one of {', '.join(_HF_ACT)}")
    has_head = hasattr(hf_model, "classifier")
    arch = dict(img_size=config.image_size, num_frames=config.num_frames, tubelet_size=tuple(config.tubelet_size),
                in_chans=config.num_channels, num_classes=config.num_labels if has_head else 0,
                embed_dim=config.hidden_size, depth=config.num_hidden_layers, temporal_depth=0,
                num_heads=config.num_attention_heads, mlp_ratio=config.intermediate_size / config.hidden_size,
                qkv_bias=config.qkv_bias, act_layer=_HF_ACT[config.hidden_act], norm_eps=config.layer_norm_eps)
    model = create_model("vl_vivit_joint_b", **arch)
    hf = {k.removeprefix("vivit."): v for k, v in hf_model.state_dict().items()}
    state = {"cls_token": hf.pop("embeddings.cls_token"), "pos_embed": hf.pop("embeddings.position_embeddings"),
             "patch_embed.proj.weight": hf.pop("embeddings.patch_embeddings.projection.weight"),
             "patch_embed.proj.bias": hf.pop("embeddings.patch_embeddings.projection.bias"),
             "norm.weight": hf.pop("layernorm.weight"), "norm.bias": hf.pop("layernorm.bias")}
    if has_head:
        state.update({"head.weight": hf.pop("classifier.weight"), "head.bias": hf.pop("classifier.bias")})
    for i in range(config.num_hidden_layers):
        p, q = f"layers.{i}.", f"blocks.{i}."
        for part in ("weight", "bias"):
            state[f"{q}attn.qkv.{part}"] = torch.cat([hf.pop(f"{p}attention.{n}_proj.{part}") for n in "qkv"])
            for old, new in (("attention.o_proj", "attn.proj"), ("layernorm_before", "norm1"),
                             ("layernorm_after", "norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                state[f"{q}{new}.{part}"] = hf.pop(f"{p}{old}.{part}")
    leftover = sorted(k for k in hf if not k.startswith("pooler."))
    if leftover:
        raise ValueError(f"transformers ViViT weights {leftover[:4]} have no place in vitlab's ViViT")
    model.load_state_dict(state, strict=True)
    return model


def _cfg(input_size: tuple[int, int, int], **kwargs) -> dict:
    """timm's pretrained config; input_size is one frame's (C, H, W): the frame count is the model's num_frames."""
    return {"url": "", "num_classes": 1000, "input_size": input_size, "pool_size": None,
            "crop_pct": 1.0, "interpolation": "bilinear", "mean": (0.5,) * input_size[0],
            "std": (0.5,) * input_size[0], "classifier": "head", **kwargs}


_FMNIST = dict(num_classes=6, mean=(0.2860,), std=(0.3530,))  # moving-fashion-mnist-cls, Fashion-MNIST stats
default_cfgs = generate_default_cfgs({
    "vl_vivit_b_fe.untrained": _cfg((3, 224, 224)),
    "vl_vivit_joint_b.untrained": _cfg((3, 224, 224)),
    "vl_vivit_mfmnist.untrained": _cfg((1, 32, 32), **_FMNIST),
    "vl_test_vivit.untrained": _cfg((1, 32, 32), **_FMNIST),
    "vl_test_vivit_joint.untrained": _cfg((1, 32, 32), **_FMNIST),
})


def _create(variant: str, pretrained: bool = False, **kwargs) -> ViViT:
    return build_vitlab_model(ViViT, variant, pretrained, **kwargs)


@register_model
def vl_vivit_b_fe(pretrained: bool = False, **kwargs) -> ViViT:
    """ViViT-B/16x2 factorised encoder (model 2): 12 spatial + 4 temporal layers, 32 frames at 224 (the paper's
    Kinetics FE configuration, scenic configs/kinetics400/vivit_base_factorised_encoder.py)."""
    arch = dict(embed_dim=768, depth=12, temporal_depth=4, num_heads=12, tubelet_size=(2, 16, 16), num_frames=32)
    return _create("vl_vivit_b_fe", pretrained, **dict(arch, **kwargs))


@register_model
def vl_vivit_joint_b(pretrained: bool = False, **kwargs) -> ViViT:
    """ViViT-B/16x2 model 1 (joint space-time attention): HF `VivitConfig()`'s defaults, 32 frames at 224."""
    arch = dict(embed_dim=768, depth=12, temporal_depth=0, num_heads=12, tubelet_size=(2, 16, 16), num_frames=32)
    return _create("vl_vivit_joint_b", pretrained, **dict(arch, **kwargs))


@register_model
def vl_vivit_mfmnist(pretrained: bool = False, **kwargs) -> ViViT:
    """A small factorised ViViT for moving-fashion-mnist-cls clips (1, 10, 32, 32): 4 spatial + 2 temporal layers."""
    arch = dict(img_size=32, num_frames=10, in_chans=1, tubelet_size=(2, 8, 8), embed_dim=96, depth=4,
                temporal_depth=2, num_heads=3, num_classes=6)
    return _create("vl_vivit_mfmnist", pretrained, **dict(arch, **kwargs))


@register_model
def vl_test_vivit(pretrained: bool = False, **kwargs) -> ViViT:
    """Tiny factorised ViViT for tests: clips (1, 10, 32, 32), 2 spatial + 2 temporal layers of width 32."""
    arch = dict(img_size=32, num_frames=10, in_chans=1, tubelet_size=(2, 8, 8), embed_dim=32, depth=2,
                temporal_depth=2, num_heads=2, num_classes=6)
    return _create("vl_test_vivit", pretrained, **dict(arch, **kwargs))


@register_model
def vl_test_vivit_joint(pretrained: bool = False, **kwargs) -> ViViT:
    """Tiny ViViT model 1 for tests: clips (1, 10, 32, 32), 2 joint space-time layers of width 32."""
    arch = dict(img_size=32, num_frames=10, in_chans=1, tubelet_size=(2, 8, 8), embed_dim=32, depth=2,
                temporal_depth=0, num_heads=2, num_classes=6)
    return _create("vl_test_vivit_joint", pretrained, **dict(arch, **kwargs))
