"""PredFormer (Tang et al., 2024, "PredFormer: Video Prediction Transformers"): recurrent-free spatio-temporal
prediction with gated transformer blocks, on clips (B, C, T, H, W).

A clip's frames are cut into p x p patches, each embedded by one Linear (B, T, N, D), a fixed sinusoidal position
embedding over all T*N positions is added, and a stack of *gated transformers* mixes the tokens. A gated transformer
is pre-norm attention + a SwiGLU MLP per block (timm's `Block` with `SwiGLU`: the official `GatedTransformer` of
`openstl/models/PredFormer_*.py`) and one LayerNorm after its blocks; it attends along one axis:

- "s": spatial, over a frame's N patches (frames folded into the batch);
- "t": temporal, over one patch position's T frames (positions folded into the batch);
- "st": full space-time attention over all T*N tokens.

The paper's layouts (`layout=`) chain them: "full" (one "st" unit of `depth` blocks), "fac_st" / "fac_ts"
(factorised: a spatial unit of `depth` blocks then a temporal one, or the reverse), and the interleaved layouts
"binary_st" / "binary_ts" (ST / TS pairs), "tst", "sts", "tsst", "stts": `depth` repetitions of the pattern, one
block per unit. A LayerNorm + Linear head turns each token back into its p x p patch of the predicted frame at
the same time index: T input frames predict the T frames that follow (10 -> 10 on Moving MNIST).

Checked against the official code, github.com/yyyujintang/PredFormer at b73c7ae83a7774e93b117f58bda4d321095b70ba
(every layout, run on CPU for a tiny config with the same weights: tests/models/test_video_predformer.py and
tests/fixtures/predformer_make_fixture.py); `vl_predformer_mmnist` has the parameter count of the official
constructor for configs/mmnist/PredFormer.py. The official 'depth' (blocks per unit of an interleaved layout) is 1
in every released config and is fixed at 1 here.

With `num_classes > 0` the head is instead a classifier over the mean of the final tokens (for clip
classification); `num_classes=0`, the default, predicts frames.
"""
from functools import partial

import torch
import torch.nn as nn
from timm.layers import Attention, SwiGLU, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import Block

from ._builder import build_vitlab_model

__all__ = ["PredFormer", "GatedBlock", "GatedTransformer", "LAYOUTS", "sinusoidal_embedding"]

# layout -> (axes of one repeated group, whether `depth` counts groups (True) or blocks per unit (False))
LAYOUTS: dict[str, tuple[tuple[str, ...], bool]] = {
    "full": (("st",), False),
    "fac_st": (("s", "t"), False),
    "fac_ts": (("t", "s"), False),
    "binary_st": (("s", "t"), True),
    "binary_ts": (("t", "s"), True),
    "tst": (("t", "s", "t"), True),
    "sts": (("s", "t", "s"), True),
    "tsst": (("t", "s", "s", "t"), True),
    "stts": (("s", "t", "t", "s"), True),
}


def sinusoidal_embedding(positions: int, dim: int) -> torch.Tensor:
    """(positions, dim) sin/cos table, PE[p, i] = sin or cos (p / 10000^(2 floor(i/2) / dim)) for even / odd i
    (the official `sinusoidal_embedding`)."""
    p = torch.arange(positions, dtype=torch.float64)[:, None]
    i = torch.arange(dim)
    angle = p / 10000 ** (2 * torch.div(i, 2, rounding_mode="floor") / dim)  # (positions, dim)
    return torch.where(i % 2 == 0, angle.sin(), angle.cos()).float()


class GatedBlock(Block):
    """timm's pre-norm `Block` with a SwiGLU MLP (SiLU gate): PredFormer's gated transformer block. A class of its
    own so that the model contract knows its tokens are a fixed (T, N) grid that token reduction may not shrink."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, mlp_ratio: float, proj_drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=False, proj_drop=proj_drop,
                         attn_drop=attn_drop, drop_path=drop_path, act_layer=nn.SiLU, norm_layer=nn.LayerNorm,
                         mlp_layer=SwiGLU)
        if num_heads * head_dim != dim:  # the official inner dim heads x dim_head may differ from dim
            self.attn = Attention(dim, num_heads, attn_head_dim=head_dim, attn_drop=attn_drop, proj_drop=proj_drop)


class GatedTransformer(nn.Module):
    """`depth` gated blocks along one axis ("s", "t" or "st") of (B, T, N, D) tokens, then a LayerNorm."""

    def __init__(self, axis: str, dim: int, depth: int, num_heads: int, head_dim: int, mlp_ratio: float,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__()
        if axis not in ("s", "t", "st"):
            raise ValueError(f"axis={axis!r} must be 's', 't' or 'st'")
        self.axis = axis
        self.blocks = nn.Sequential(*[GatedBlock(dim, num_heads, head_dim, mlp_ratio, drop_rate, attn_drop_rate,
                                                 drop_path_rate) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, N, D = x.shape
        if self.axis == "s":
            x = self.norm(self.blocks(x.reshape(B * T, N, D)))  # (B*T, N, D): each frame's patches
            return x.reshape(B, T, N, D)
        if self.axis == "t":
            x = x.transpose(1, 2).reshape(B * N, T, D)  # (B*N, T, D): each patch position's frames
            return self.norm(self.blocks(x)).reshape(B, N, T, D).transpose(1, 2)
        return self.norm(self.blocks(x.reshape(B, T * N, D))).reshape(B, T, N, D)  # all T*N tokens


class PredFormer(nn.Module):
    """PredFormer: clip (B, C, T, H, W) -> the next T frames (B, C, T, H, W), or class logits if num_classes > 0.

    `depth` is the official Ndepth (pattern repetitions, or blocks per unit for "full" / "fac_*"); `head_dim` the
    official dim_head (heads x head_dim may differ from embed_dim); `mlp_ratio` its scale_dim; `drop_path_rate` is
    the same in every block, as in the official code."""

    def __init__(
            self,
            img_size: int | tuple[int, int] = 64,
            num_frames: int = 10,
            patch_size: int = 8,
            in_chans: int = 1,
            num_classes: int = 0,
            embed_dim: int = 256,
            num_heads: int = 8,
            head_dim: int = 32,
            mlp_ratio: float = 4.0,
            layout: str = "tsst",
            depth: int = 6,
            drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r} is not one of {', '.join(LAYOUTS)}")
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if any(s % patch_size for s in self.img_size):
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {patch_size}")
        self.num_frames, self.patch_size, self.in_chans, self.layout = num_frames, patch_size, in_chans, layout
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens, self.num_classes = 0, num_classes
        self.patch_embed = nn.Linear(patch_size * patch_size * in_chans, embed_dim)
        pos = sinusoidal_embedding(num_frames * self.num_patches, embed_dim)
        self.register_buffer("pos_embed", pos.reshape(1, num_frames, self.num_patches, embed_dim), persistent=False)
        axes, repeated = LAYOUTS[layout]
        unit = partial(GatedTransformer, dim=embed_dim, num_heads=num_heads, head_dim=head_dim, mlp_ratio=mlp_ratio,
                       drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate)
        units = [unit(a, depth=1) for _ in range(depth) for a in axes] if repeated else [unit(a, depth=depth)
                                                                                        for a in axes]
        self.units = nn.ModuleList(units)
        self.head_norm = nn.LayerNorm(embed_dim)
        self.head = self._make_head(num_classes)
        self.apply(self._init_weights)

    def _make_head(self, num_classes: int) -> nn.Linear:
        """Frame head (a C x p x p patch per token) for num_classes=0, else a classifier of the pooled tokens."""
        return nn.Linear(self.embed_dim, num_classes or self.patch_size ** 2 * self.in_chans)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """The official `GatedTransformer._init_weights` (trunc-normal 0.02 Linear weights, zero biases)."""
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """num_classes > 0: a classifier over the mean token; 0: back to predicting frames."""
        self.num_classes = num_classes
        self.head = self._make_head(num_classes)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, T, N, p*p*C), patches row-major, pixels (p1, p2, c) as the official Rearrange."""
        B, C, T, H, W = x.shape
        p, (h, w) = self.patch_size, self.grid_size
        x = x.reshape(B, C, T, h, p, w, p).permute(0, 2, 3, 5, 4, 6, 1)  # (B, T, h, w, p1, p2, C)
        return x.reshape(B, T, h * w, p * p * C)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, N, C*p*p) -> (B, C, T, H, W), head channels (c, p1, p2) as the official head's view/permute."""
        B, T = x.shape[:2]
        p, (h, w), C = self.patch_size, self.grid_size, self.in_chans
        x = x.reshape(B, T, h, w, C, p, p).permute(0, 4, 1, 2, 5, 3, 6)  # (B, C, T, h, p1, w, p2)
        return x.reshape(B, C, T, h * p, w * p)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Clip (B, C, T, H, W) -> tokens (B, T, N, D) after the last gated transformer (its LayerNorm included)."""
        expected = (self.in_chans, self.num_frames, *self.img_size)
        if not torch.jit.is_tracing() and (x.dim() != 5 or tuple(x.shape[1:]) != expected):
            raise ValueError(f"PredFormer expects clips (B, C, T, H, W) with (C, T, H, W) = {expected}, got "
                             f"{tuple(x.shape)}: build the model with num_frames/img_size/in_chans of the data")
        x = self.patch_embed(self.patchify(x)) + self.pos_embed  # (B, T, N, D)
        for unit in self.units:
            x = unit(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens (B, T, N, D) -> predicted frames (B, C, T, H, W), or logits (B, num_classes) / pooled features."""
        if self.num_classes or pre_logits:
            x = self.head_norm(x.mean(dim=(1, 2)))  # (B, D)
            return x if pre_logits else self.head(x)
        return self.unpatchify(self.head(self.head_norm(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(input_size: tuple[int, int, int], **kwargs) -> dict:
    """timm's pretrained config; input_size is one frame's (C, H, W): the frame count is the model's num_frames."""
    return {"url": "", "num_classes": 0, "input_size": input_size, "pool_size": None, "crop_pct": 1.0,
            "interpolation": "bilinear", "mean": (0.2860,), "std": (0.3530,), "first_conv": "patch_embed",
            "classifier": "head", **kwargs}


default_cfgs = generate_default_cfgs({
    "vl_predformer_mmnist.untrained": _cfg((1, 64, 64)),
    "vl_predformer_mmnist_small.untrained": _cfg((1, 64, 64)),
    "vl_test_predformer.untrained": _cfg((1, 32, 32)),
})


def _create(variant: str, pretrained: bool = False, **kwargs) -> PredFormer:
    model = build_vitlab_model(PredFormer, variant, pretrained, **kwargs)
    # the frame size it was built for (img_size / in_chans kwargs), which runners and checkpoints read from here
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (model.in_chans, *model.img_size)}
    return model


@register_model
def vl_predformer_mmnist(pretrained: bool = False, **kwargs) -> PredFormer:
    """PredFormer TSST for Moving MNIST (configs/mmnist/PredFormer.py): 64x64x1, 10 -> 10 frames, patch 8, dim 256,
    8 heads x 32, SwiGLU x4, 6 TSST groups (24 gated blocks); 25.3M parameters, as the official constructor."""
    arch = dict(img_size=64, num_frames=10, patch_size=8, embed_dim=256, num_heads=8, head_dim=32, layout="tsst",
                depth=6)
    return _create("vl_predformer_mmnist", pretrained, **dict(arch, **kwargs))


@register_model
def vl_predformer_mmnist_small(pretrained: bool = False, **kwargs) -> PredFormer:
    """A CPU-sized PredFormer TSST for moving-fashion-mnist (64x64, 10 -> 10, patch 8): dim 64, 4 heads x 16,
    SwiGLU x2, one TSST group (benchmarks/video_predformer.py sizes a ConvLSTM to its parameter count)."""
    arch = dict(img_size=64, num_frames=10, patch_size=8, embed_dim=64, num_heads=4, head_dim=16, mlp_ratio=2.0,
                layout="tsst", depth=1)
    return _create("vl_predformer_mmnist_small", pretrained, **dict(arch, **kwargs))


@register_model
def vl_test_predformer(pretrained: bool = False, **kwargs) -> PredFormer:
    """Tiny PredFormer for tests: clips (1, 4, 32, 32) -> 4 frames, patch 8, width 32, 2 heads x 16, one TSST."""
    arch = dict(img_size=32, num_frames=4, patch_size=8, embed_dim=32, num_heads=2, head_dim=16, layout="tsst",
                depth=1)
    return _create("vl_test_predformer", pretrained, **dict(arch, **kwargs))
