"""FcaFormer: Forward Cross Attention in Hybrid Vision Transformer (Zhang, Hu, Wang, ICCV 2023, arXiv:2211.07198).

A hybrid four-stage backbone: ConvNeXt stages first, then Fca stages of ViT-style blocks in which each block also
attends to *cross tokens* made from the earlier blocks of the same stage. In an Fca stage of L blocks on an H x W
grid, block i (i < L - 1) merges its tokens, right after its attention, with a depthwise 7x7 stride-4 conv (the
paper's "token merge", part of TME) into ceil(H/4) * ceil(W/4) cross tokens; block i > 0 takes the cross tokens of
blocks max(0, i - 12) .. i - 1, multiplies each by a learnable scale factor (LSF), LayerNorms them and appends them
as extra keys / values to its self-attention (queries are its own tokens only), with a learned bias per head and
cross token next to the LeViT-style bias per head and (|dy|, |dx|) offset of the self-attention logits. A block is

    x = x + ls1 * proj(softmax(q [k; k_cross]^T / sqrt(d) + [B_pos, b_cross]) [v; v_cross])     (q, k, v: LN1(x))
    cross_out = DWConv7x7/4(x)                           (not in the stage's last block)
    x = BN(DWConv3x3(x))                                 (the TME "enhancement": a local conv, not residual)
    x = x + ls2 * MLP(LN(LN2(x)))                        (the official Mlp has a LayerNorm of its own)

The stem is two 3x3 stride-2 conv + BN (GELU between) and stages are joined by TinyViT's patch merging (1x1 conv,
3x3 stride-2 depthwise conv, 1x1 conv, each with BN, GELU between). Classifier: global average pool, LayerNorm,
Linear. These are timm's `tiny_vit.PatchEmbed` / `PatchMerging` / `NormMlp`, `convnext.ConvNeXtBlock` (same graph
as the official `CxBlock`) and `NormMlpClassifierHead`, reused here.

Official code: github.com/hkzhang-git/FcaFormer, `image_classification/models/fcaformer.py` (`fcaformer_l1` .. `l4`),
commit 7dcd8e0ed207a6c74708ab10553dcd6a6d4ea2bd. No weights are published.

| variant | params (1000 classes) | MACs at 224 | top-1 (IN-1k) |
|---|---|---|---|
| FcaFormer-L1 (`vl_fcaformer_l1`) | 6,187,560 (paper 6.2M) | 1.374G counted here (paper 1.37G) | 80.3% |
| FcaFormer-L2 (`vl_fcaformer_l2`) | 16,275,870 (paper 16.3M) | 3.602G counted here (paper 3.6G) | 83.1% |
| FcaFormer-L3 (`vl_fcaformer_l3`) | 27,894,484 (code comment 27.9M) | 6.651G counted here (comment 6.7G) | 84.2% (comment) |
| FcaFormer-L4 (`vl_fcaformer_l4`) | 65,638,204 (code comment 65.6M) | 14.49G counted here (comment 14.5G) | 84.9% (comment) |

MACs are `vitlab.profiling.count_flops` (matmuls, convs and attention, as fvcore counts them); the official
modules give the same counts to the MAC. The plain DeiT-like
FcaFormer-L0 of the README is not in the official code and is not here.

The model is built for one input size (`img_size`): the position-bias table and the cross-token biases and scale
factors are sized to the stage grids, as in the official code. `checkpoint_filter_fn` resizes them (bicubic, from a
square source grid) when a checkpoint's grid differs from the model's, so `img_size=...` with `pretrained=True`
gives a model for another input size.

Differences from the official file, none of which changes the function: modules carry timm's names (`conv_dw`,
`mlp.fc1`, `ls1.gamma`, `attn.qkv`, ...; `checkpoint_filter_fn` renames), each stage's downsampler belongs to the
next stage (official: the end of the previous one), the cross-token bias `s_token_bias` (1, heads, 1, M) lives in the
attention as `cross_bias` (heads, M) and the scale factors `s_scale_factors` (1, M, 1) as `cross_scale` (M, 1), the
position-bias index is computed as |dy| * W + |dx| (the order the official dictionary assigns), attention runs
through `F.scaled_dot_product_attention` with the biases as its float mask, stage grids follow the convs' output
sizes (official: img_size // 4 // 2^i, equal at multiples of 32), a stage is ConvNeXt or Fca by its `num_heads`
(0 = ConvNeXt, as in the official constructor's [0, 0, h3, h4]) and `drop_path_rate` defaults to 0 (the official
L1 recipe trains with 0; the constructor's default is 0.1).

The LSFs scale the cross tokens *before* their LayerNorm (official order), which normalises each token over its
channels: a positive factor changes nothing but the norm's eps, and a factor of 0 turns the cross tokens into the
norm's bias, the same for every image; they do not turn a block into the plain block. What does is a cross-token
bias of -inf (the softmax gives the cross tokens no weight). tests/models/test_zoo_fcaformer.py asserts all three.

Checked against (tests/models/test_zoo_fcaformer.py): the official `fcaformer.py` run locally on a tiny config (two
ConvNeXt and two Fca stages, three and two blocks with cross tokens, a non-square 64 x 96 input), committed as a
fixture in the official key layout and loaded through `checkpoint_filter_fn` (logits within 1e-4); exact parameter
counts of the four official constructors; MACs and parameters of L1 against the paper (within 2%); the position-bias
index against the official enumeration; the LSF and cross-bias properties above.
"""
import math
from functools import partial
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d, LayerScale, NormMlpClassifierHead, to_2tuple, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.convnext import ConvNeXtBlock
from timm.models.tiny_vit import ConvNorm, NormMlp, PatchEmbed, PatchMerging

from ._builder import build_vitlab_model, imagenet_cfg

__all__ = ["FcaFormer", "FcaAttention", "FcaBlock", "FcaStage", "ConvStage", "position_bias_index",
           "checkpoint_filter_fn", "vl_fcaformer_l1", "vl_fcaformer_l2", "vl_fcaformer_l3", "vl_fcaformer_l4",
           "vl_test_fcaformer"]

CROSS_KERNEL, CROSS_STRIDE = 7, 4  # the token-merge conv that makes cross tokens


# --- the math: pure tensor functions ----------------------------------------------------------------------

def position_bias_index(height: int, width: int, device=None) -> torch.Tensor:
    """(HW, HW) index into a per-head bias table over offsets: |dy| * W + |dx| between raster-ordered tokens."""
    ys, xs = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()  # (HW,)
    return (ys[:, None] - ys[None, :]).abs() * width + (xs[:, None] - xs[None, :]).abs()


def conv_out_size(size: int, kernel: int, stride: int) -> int:
    """Output length of a conv with padding kernel // 2."""
    return (size + 2 * (kernel // 2) - kernel) // stride + 1


def _resize_grid(table: torch.Tensor, old: Tuple[int, int], new: Tuple[int, int]) -> torch.Tensor:
    """(..., h0 * w0) values on an h0 x w0 grid -> (..., h1 * w1), bicubic."""
    lead = table.shape[:-1]
    grid = table.float().reshape(-1, 1, *old)  # (L, 1, h0, w0)
    out = F.interpolate(grid, size=new, mode="bicubic", align_corners=False)
    return out.reshape(*lead, new[0] * new[1]).to(table.dtype)


# --- modules ----------------------------------------------------------------------------------------------

class FcaAttention(nn.Module):
    """Self-attention over an H x W grid whose keys / values also include `cross` tokens (queries do not)."""

    def __init__(self, dim: int, num_heads: int, grid: Tuple[int, int], num_cross: int = 0, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.grid = grid
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, grid[0] * grid[1]))
        self.cross_bias = nn.Parameter(torch.zeros(num_heads, num_cross)) if num_cross else None
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, cross: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, N, C) and cross (B, M, C), both normalised -> (B, N, C)."""
        B, N, C = x.shape
        n, d = self.num_heads, self.head_dim
        bias = self.attention_biases[:, position_bias_index(*self.grid, device=x.device)]  # (n, N, N)
        if cross is not None:
            x = torch.cat((x, cross), dim=1)  # one qkv matmul for both, as the official code
            bias = torch.cat((bias, self.cross_bias[:, None, :].expand(-1, N, -1)), dim=-1)  # (n, N, N + M)
        qkv = self.qkv(x).reshape(B, -1, 3, n, d).permute(2, 0, 3, 1, 4)  # (3, B, n, N + M, d)
        q, k, v = qkv[0, :, :, :N], qkv[1], qkv[2]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype),
                                             dropout_p=self.attn_drop if self.training else 0.0)  # (B, n, N, d)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))


class FcaBlock(nn.Module):
    """Fca block on (B, N, C) tokens of a fixed grid: attention with cross tokens, token merge, local conv, MLP.

    `forward(x, cross)` returns (x, the cross tokens it makes or None).
    """

    def __init__(self, dim: int, num_heads: int, grid: Tuple[int, int], num_cross: int = 0, makes_cross: bool = True,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, proj_drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, ls_init_value: float = 1e-6, act_layer: type[nn.Module] = nn.GELU,
                 norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.grid = grid
        self.norm1 = norm_layer(dim)
        self.cross_scale = nn.Parameter(torch.ones(num_cross, 1)) if num_cross else None  # the LSFs
        self.cross_norm = norm_layer(dim) if num_cross else None
        self.attn = FcaAttention(dim, num_heads, grid, num_cross, qkv_bias, attn_drop, proj_drop)
        self.ls1 = LayerScale(dim, ls_init_value)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.cross_conv = (nn.Conv2d(dim, dim, CROSS_KERNEL, CROSS_STRIDE, CROSS_KERNEL // 2, groups=dim, bias=False)
                           if makes_cross else None)
        self.local_conv = ConvNorm(dim, dim, 3, 1, 1, groups=dim)
        self.norm2 = norm_layer(dim)
        self.mlp = NormMlp(dim, int(dim * mlp_ratio), norm_layer=norm_layer, act_layer=act_layer, drop=proj_drop)
        self.ls2 = LayerScale(dim, ls_init_value)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, cross: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if cross is not None:
            cross = self.cross_norm(cross * self.cross_scale)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), cross)))
        B, N, C = x.shape
        x = x.transpose(1, 2).reshape(B, C, *self.grid)  # (B, C, H, W)
        made = self.cross_conv(x).flatten(2).transpose(1, 2) if self.cross_conv is not None else None  # (B, M, C)
        x = self.local_conv(x).flatten(2).transpose(1, 2)  # (B, N, C)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x)))), made


class ConvStage(nn.Module):
    """Optional patch merging, then ConvNeXt blocks; NCHW in and out."""

    def __init__(self, in_dim: int, dim: int, depth: int, downsample: bool, drop_path: Sequence[float],
                 ls_init_value: float = 1e-6, act_layer: type[nn.Module] = nn.GELU):
        super().__init__()
        self.downsample = PatchMerging(in_dim, dim, act_layer) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[ConvNeXtBlock(dim, drop_path=drop_path[i], ls_init_value=ls_init_value,
                                                    act_layer=act_layer) for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class FcaStage(nn.Module):
    """Optional patch merging, then Fca blocks, block i attending to the cross tokens of the `max_cross_depth`
    blocks before it; NCHW in and out, on the grid it was built for."""

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, grid: Tuple[int, int], downsample: bool,
                 drop_path: Sequence[float], max_cross_depth: int = 12, act_layer: type[nn.Module] = nn.GELU,
                 **block_kwargs):
        super().__init__()
        self.grid = grid
        self.max_cross_depth = max_cross_depth
        self.downsample = PatchMerging(in_dim, dim, act_layer) if downsample else nn.Identity()
        per_block = math.prod(conv_out_size(s, CROSS_KERNEL, CROSS_STRIDE) for s in grid)
        self.blocks = nn.ModuleList([
            FcaBlock(dim, num_heads, grid, num_cross=min(i, max_cross_depth) * per_block, makes_cross=i < depth - 1,
                     drop_path=drop_path[i], act_layer=act_layer, **block_kwargs)
            for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        B, C, H, W = x.shape
        if not torch.jit.is_tracing() and (H, W) != tuple(self.grid):
            raise ValueError(f"FcaFormer stage built for a {self.grid[0]}x{self.grid[1]} grid got {H}x{W}: build the "
                             "model with img_size=<the input's (H, W)>")
        x = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        made: List[torch.Tensor] = []
        for block in self.blocks:
            x, new = block(x, torch.cat(made[-self.max_cross_depth:], dim=1) if made else None)
            if new is not None:
                made.append(new)
        return x.transpose(1, 2).reshape(B, C, H, W)


class FcaFormer(nn.Module):
    """FcaFormer classifier: conv stem, ConvNeXt stages (num_heads 0), Fca stages, then pool -> LayerNorm -> Linear."""

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            embed_dims: Sequence[int] = (64, 128, 192, 320),
            depths: Sequence[int] = (2, 2, 6, 2),
            num_heads: Sequence[int] = (0, 0, 6, 10),
            mlp_ratio: float = 4.0,
            max_cross_depth: int = 12,
            ls_init_value: float = 1e-6,
            drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            act_layer: type[nn.Module] = nn.GELU,
            norm_layer: type[nn.Module] = nn.LayerNorm,
    ):
        super().__init__()
        if len({len(embed_dims), len(depths), len(num_heads)}) != 1:
            raise ValueError("embed_dims, depths and num_heads need one entry per stage, got "
                             f"{len(embed_dims)}, {len(depths)}, {len(num_heads)}")
        self.num_classes = num_classes
        self.img_size = to_2tuple(tuple(img_size) if isinstance(img_size, list) else img_size)
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0], act_layer)
        grid = tuple(conv_out_size(conv_out_size(s, 3, 2), 3, 2) for s in self.img_size)
        dpr = [x.tolist() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))]
        stages, self.feature_info = [], []
        for i, (dim, depth, heads) in enumerate(zip(embed_dims, depths, num_heads)):
            if i > 0:
                grid = tuple(conv_out_size(s, 3, 2) for s in grid)
            common = dict(in_dim=embed_dims[max(i - 1, 0)], dim=dim, depth=depth, downsample=i > 0, drop_path=dpr[i],
                          act_layer=act_layer)
            if heads:
                stages.append(FcaStage(num_heads=heads, grid=grid, max_cross_depth=max_cross_depth,
                                       mlp_ratio=mlp_ratio, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
                                       ls_init_value=ls_init_value, norm_layer=norm_layer, **common))
            else:
                stages.append(ConvStage(ls_init_value=ls_init_value, **common))
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2 ** i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.head = NormMlpClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                          norm_layer=partial(LayerNorm2d, eps=1e-5))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^patch_embed", blocks=r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None), (r"^head\.norm", (99999,))])

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs at `indices` (last n if int, all if None). The only norm is the head's, after pooling:
        `norm` changes nothing."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:max_index + 1]
        intermediates = []
        x = self.patch_embed(x)
        for i, stage in enumerate(stages):
            x = stage(x)  # (B, C, H, W)
            if i in take_indices:
                intermediates.append(x if output_fmt == "NCHW" else x.permute(0, 2, 3, 1))
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        width = self.feature_info[max_index]["num_chs"]
        if prune_norm or width != self.num_features:  # the head's norm is sized for the last stage
            self.num_features = self.head_hidden_size = width
            self.head.reset(self.num_classes, reset_other=True, in_features=width)
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.patch_embed(x))  # (B, C, H/32, W/32)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# --- converter --------------------------------------------------------------------------------------------

_RENAMES = (("patch_embed.seq.0.c.", "patch_embed.conv1.conv."), ("patch_embed.seq.0.bn.", "patch_embed.conv1.bn."),
            ("patch_embed.seq.2.c.", "patch_embed.conv2.conv."), ("patch_embed.seq.2.bn.", "patch_embed.conv2.bn."),
            ("norm_head.", "head.norm."), ("head.", "head.fc."))
_BLOCK_RENAMES = (("dwconv.", "conv_dw."), ("pwconv1.", "mlp.fc1."), ("pwconv2.", "mlp.fc2."),
                  ("gamma_1", "ls1.gamma"), ("gamma_2", "ls2.gamma"), ("dw_conv.", "cross_conv."),
                  ("s_norm.", "cross_norm."), ("s_scale_factors", "cross_scale"), ("s_token_bias", "attn.cross_bias"),
                  ("attention_biases", "attn.attention_biases"), ("qkv.", "attn.qkv."), ("proj.", "attn.proj."),
                  ("local_conv.c.", "local_conv.conv."))


def _from_official(state_dict: dict) -> dict:
    out = {}
    for key, value in state_dict.items():
        if key.endswith("attention_bias_idxs"):
            continue  # recomputed from the grid
        if not key.startswith("layer_"):
            out[next((new + key[len(old):] for old, new in _RENAMES if key.startswith(old)), key)] = value
            continue
        layer, rest = key.split(".", 1)
        stage = int(layer[len("layer_"):])
        if rest.startswith("downsample."):  # official layer i ends with the merging that starts stage i + 1
            out[f"stages.{stage + 1}." + rest.replace(".c.", ".conv.")] = value
            continue
        _, block, rest = rest.split(".", 2)  # blocks.j.<...>
        rest = next((new + rest[len(old):] for old, new in _BLOCK_RENAMES if rest.startswith(old)), rest)
        if rest == "attn.cross_bias":
            value = value.reshape(value.shape[1], -1)  # (1, heads, 1, M) -> (heads, M)
        elif rest == "cross_scale":
            value = value.reshape(-1, 1)  # (1, M, 1) -> (M, 1)
        out[f"stages.{stage}.blocks.{block}.{rest}"] = value
    return out


def _resize_to_model(state_dict: dict, model: FcaFormer) -> dict:
    """Resample the grid-sized tensors of a checkpoint built for another input size (from a square grid)."""
    for i, stage in enumerate(model.stages):
        if not isinstance(stage, FcaStage):
            continue
        key = f"stages.{i}.blocks.0.attn.attention_biases"
        if key not in state_dict or state_dict[key].shape[-1] == stage.grid[0] * stage.grid[1]:
            continue
        side = math.isqrt(state_dict[key].shape[-1])
        if side * side != state_dict[key].shape[-1]:
            raise ValueError(f"{key}: cannot resize a {state_dict[key].shape[-1]}-position table (not a square grid)")
        old_cross = (conv_out_size(side, CROSS_KERNEL, CROSS_STRIDE),) * 2
        new_cross = tuple(conv_out_size(s, CROSS_KERNEL, CROSS_STRIDE) for s in stage.grid)
        for j in range(len(stage.blocks)):
            prefix = f"stages.{i}.blocks.{j}."
            bias = state_dict[prefix + "attn.attention_biases"]  # (heads, side * side)
            state_dict[prefix + "attn.attention_biases"] = _resize_grid(bias, (side, side), stage.grid)
            if prefix + "cross_scale" in state_dict:
                heads, depth = bias.shape[0], state_dict[prefix + "cross_scale"].shape[0] // math.prod(old_cross)
                cross_bias = state_dict[prefix + "attn.cross_bias"].reshape(heads * depth, -1)  # (heads * i, m)
                state_dict[prefix + "attn.cross_bias"] = _resize_grid(cross_bias, old_cross, new_cross).reshape(heads, -1)
                scale = state_dict[prefix + "cross_scale"].reshape(depth, -1)  # (i, m)
                state_dict[prefix + "cross_scale"] = _resize_grid(scale, old_cross, new_cross).reshape(-1, 1)
    return state_dict


def checkpoint_filter_fn(state_dict: dict, model: FcaFormer) -> dict:
    """Official FcaFormer state dict (`layer_i`, `s_token_bias`, `Conv2d_BN` `.c`) -> vitlab's layout, resampling
    the position and cross-token tensors when the checkpoint's grid differs from the model's.

    Identity on a state dict in vitlab's layout at the model's size. Accepts {"model": ...} / {"state_dict": ...}.
    """
    state_dict = state_dict.get("model", state_dict.get("state_dict", state_dict))
    if any(k.startswith("layer_") for k in state_dict):
        state_dict = _from_official(state_dict)
    return _resize_to_model(state_dict, model)


# --- registry ---------------------------------------------------------------------------------------------

def _cfg(**kwargs) -> dict:
    return imagenet_cfg(**{"pool_size": (7, 7), "first_conv": "patch_embed.conv1.conv", "classifier": "head.fc",
                           "license": "unknown", "paper_ids": "arXiv:2211.07198", **kwargs})


default_cfgs = generate_default_cfgs({
    "vl_fcaformer_l1": _cfg(),
    "vl_fcaformer_l2": _cfg(),
    "vl_fcaformer_l3": _cfg(),
    "vl_fcaformer_l4": _cfg(),
    "vl_test_fcaformer": _cfg(input_size=(3, 64, 64), pool_size=(2, 2), num_classes=10),
})


def _create_fcaformer(variant: str, pretrained: bool = False, **kwargs) -> FcaFormer:
    return build_vitlab_model(FcaFormer, variant, pretrained, filter_fn=checkpoint_filter_fn,
                              default_out_indices=tuple(range(len(kwargs.get("depths", (2, 2, 6, 2))))),
                              exclude=("act_layer", "norm_layer"), **kwargs)


@register_model
def vl_fcaformer_l1(pretrained: bool = False, **kwargs) -> FcaFormer:
    """FcaFormer-L1: 6,187,560 params, 1.374 GMACs at 224 (paper 6.2M / 1.37G), 80.3% top-1 (IN-1k)."""
    arch = dict(embed_dims=(64, 128, 192, 320), depths=(2, 2, 6, 2), num_heads=(0, 0, 6, 10))
    return _create_fcaformer("vl_fcaformer_l1", pretrained, **dict(arch, **kwargs))


@register_model
def vl_fcaformer_l2(pretrained: bool = False, **kwargs) -> FcaFormer:
    """FcaFormer-L2: 16,275,870 params, 3.60 GMACs at 224 (paper 16.3M / 3.6G), 83.1% top-1 (IN-1k)."""
    arch = dict(embed_dims=(96, 192, 320, 480), depths=(2, 2, 7, 2), num_heads=(0, 0, 10, 15))
    return _create_fcaformer("vl_fcaformer_l2", pretrained, **dict(arch, **kwargs))


@register_model
def vl_fcaformer_l3(pretrained: bool = False, **kwargs) -> FcaFormer:
    """FcaFormer-L3: 27,894,484 params, 6.65 GMACs at 224 (code comment 27.9M / 6.7G), 84.2% top-1 (comment)."""
    arch = dict(embed_dims=(96, 192, 320, 512), depths=(3, 6, 12, 3), num_heads=(0, 0, 10, 16))
    return _create_fcaformer("vl_fcaformer_l3", pretrained, **dict(arch, **kwargs))


@register_model
def vl_fcaformer_l4(pretrained: bool = False, **kwargs) -> FcaFormer:
    """FcaFormer-L4: 65,638,204 params, 14.49 GMACs at 224 (code comment 65.6M / 14.5G), 84.9% top-1 (comment)."""
    arch = dict(embed_dims=(128, 256, 512, 768), depths=(3, 6, 12, 3), num_heads=(0, 0, 16, 24))
    return _create_fcaformer("vl_fcaformer_l4", pretrained, **dict(arch, **kwargs))


@register_model
def vl_test_fcaformer(pretrained: bool = False, **kwargs) -> FcaFormer:
    """Tiny FcaFormer for tests: widths 32-64, two ConvNeXt stages, Fca stages of 3 and 2 blocks, 64 px."""
    arch = dict(img_size=64, embed_dims=(32, 32, 48, 64), depths=(1, 1, 3, 2), num_heads=(0, 0, 2, 4),
                num_classes=10)
    return _create_fcaformer("vl_test_fcaformer", pretrained, **dict(arch, **kwargs))
