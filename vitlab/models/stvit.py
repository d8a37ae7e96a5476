"""STViT / SViT: Vision Transformer with Super Token Sampling (Huang et al., CVPR 2023, arXiv:2211.11167).

A four-stage backbone whose token mixer is Super Token Attention (STA). On a stage's H x W map of tokens:

1. super tokens start as the averages of the tokens in each h x w cell of a grid (`stoken_size`; the map is padded
   with zeros on the right / bottom to a multiple of it);
2. sparse association: each token gets a softmax over its 9 neighbouring super tokens (the 3 x 3 grid cells around
   its own), Q = softmax(x S_nb^T / sqrt(C)); the super tokens are re-estimated as the Q-weighted means of the tokens
   associated with them, S = Q^T X / column sums of Q (`n_iter` rounds, run without gradient through Q, as in the
   official code);
3. multi-head self-attention among the super tokens (global: every super token sees all others);
4. the super tokens go back to the tokens through the same association, X = Q S_nb.

Stages with `stoken_size` 1 (stages 3-4 of every variant) run plain global MHSA over all tokens instead. Each block
is x += DWConv3x3(x); x += STA(LN(x)); x += FFN(BN(x)) with the FFN fc1 -> GELU -> (+ DWConv3x3) -> fc2 (optional
LayerScale on both branches). The stem is four 3x3 convs (stride 4 in all, each followed by GELU and BN), stages are
joined by a 3x3 stride-2 conv + BN, and the head is the official one: a per-position projection to 1024, BN, Swish,
global average pool, Linear classifier.

Official code: github.com/hhb072/STViT, `models/stvit.py` (`stvit_small`, `stvit_base`, `stvit_large`), commit
c9ed9a4a3d2f258a1626dff4330032a714e3fa92 (the file last changed in 2465bf3). (github.com/hhb072/SViT, named in the
paper, has no snapshot here; STViT is the released code, README "SViT-S/B/L".)

| variant | params (1000 classes) | MACs at 224 | top-1 (IN-1k) |
|---|---|---|---|
| STViT-S (`vl_stvit_small`) | 25,495,624 (README 25M) | 4.34G counted here (README "FLOPs" 4.4G) | 83.6% |
| STViT-B (`vl_stvit_base`) | 51,691,288 (README 52M) | 9.82G counted here (README 9.9G) | 84.8% |
| STViT-L (`vl_stvit_large`) | 94,971,096 (README 95M) | 15.54G counted here (README 15.6G) | 85.3% |

Parameter counts equal the official constructors' trainable parameters exactly; the official modules also hold two
frozen 81-value identity kernels per block (`Unfold.weights`, `Fold.weights`, requires_grad=False: 3,240 / 4,860 /
6,156 values in S / B / L), which are `F.unfold` / `F.fold` here and which the converter drops. MACs are what
`vitlab.profiling.count_flops` counts (conv, linear, matmul, attention); on the official modules the same counter gives
4.350G / 9.842G / 15.561G, the difference being its identity-kernel convolutions (data movement, no MACs here). The
README's figures are 1.4 % / 0.8 % / 0.4 % above these.

Differences from the official file, none of which changes the function: blocks run on NHWC tokens with `nn.Linear`
layers (official: NCHW with 1x1 convs; the converter flattens the kernels); the super-token MHSA is a fused `qkv`
with timm's row order (q, k, v) x heads (official: per head (q, k, v) interleaved; the converter permutes the rows)
run by `F.scaled_dot_product_attention`; the 3 x 3 neighbourhood gather and scatter are `F.unfold` / `F.fold`
(official: convolutions with identity kernels); the initial super tokens are `F.avg_pool2d` (official:
`adaptive_avg_pool2d` on a map that is a multiple of the cell, the same windows); each stage's downsampler belongs to
the next stage (official: the end of the previous one); modules carry timm's names (`attn`, `mlp`, `ls1`, ...); and
`drop_path_rate` defaults to 0 (official training: 0.1 S, 0.4 B, 0.6 L). The official code's per-block
`torch.utils.checkpoint` is `set_grad_checkpointing` here.

Checked against (tests/models/test_zoo_stvit.py): the official `stvit.py` run locally on a tiny config (two association
rounds, zero padding on a non-divisible map, a direct-attention stage, layer scale, a non-square input), committed as a
fixture in the official key layout and loaded through `checkpoint_filter_fn` (logits within 1e-4); exact parameter
counts of the three official constructors; MACs at 224 against the README (within 2 %); association rows summing to
1 over the 9 neighbours (and their logits against a direct computation); the gather / scatter being adjoint; super
tokens as association-weighted means; the STA's output shape and gradients on padded maps; STA with 1 x 1 cells equal
to timm's `Attention`; a constant map mapped to one vector; the STA's MACs falling with the number of super tokens,
exactly 4 M C^2 + 27 N C + 2 M^2 C for N tokens and M super tokens.
"""
from functools import partial
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import DropPath, LayerScale, to_2tuple, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ._builder import build_vitlab_model, imagenet_cfg
from ._staged import LinearHeadMixin

__all__ = ["STViT", "SuperTokenAttention", "SuperTokenBlock", "neighbour_super_tokens", "fold_neighbours",
           "association", "sample_super_tokens", "checkpoint_filter_fn", "vl_stvit_small", "vl_stvit_base",
           "vl_stvit_large", "vl_test_stvit"]


# --- the math: pure tensor functions ----------------------------------------------------------------------

def neighbour_super_tokens(stokens: torch.Tensor) -> torch.Tensor:
    """(B, C, hh, ww) super tokens -> (B, hh*ww, C, 9): for each grid cell, its 3 x 3 neighbours (zeros outside),
    row-major (dy, dx) from (-1, -1) to (1, 1)."""
    B, C, hh, ww = stokens.shape
    return F.unfold(stokens, 3, padding=1).reshape(B, C, 9, hh * ww).permute(0, 3, 1, 2)  # (B, M, C, 9)


def fold_neighbours(values: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """The adjoint of `neighbour_super_tokens`: (B, M, C, 9) per-cell contributions to the 3 x 3 neighbours ->
    (B, C, hh, ww), each super token summing what its neighbouring cells sent it."""
    B, M, C, _ = values.shape
    return F.fold(values.permute(0, 2, 3, 1).reshape(B, C * 9, M), grid, 3, padding=1)


def association(pixels: torch.Tensor, stokens: torch.Tensor, scale: float) -> torch.Tensor:
    """Soft association of each token with its cell's 9 neighbouring super tokens: softmax over the 9 of
    scale * <token, super token>. pixels (B, M, P, C) (M cells of P tokens), stokens (B, C, hh, ww) -> (B, M, P, 9)."""
    return ((pixels @ neighbour_super_tokens(stokens)) * scale).softmax(-1)


def sample_super_tokens(pixels: torch.Tensor, affinity: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """Super tokens as association-weighted means of the tokens: S_j = sum_i Q_ij x_i / sum_i Q_ij over the tokens i
    of the 9 cells around j. pixels (B, M, P, C), affinity (B, M, P, 9) -> (B, C, hh, ww)."""
    weighted = fold_neighbours(pixels.transpose(-1, -2) @ affinity, grid)  # (B, C, hh, ww)
    mass = fold_neighbours(affinity.sum(2, keepdim=True), grid)  # (B, 1, hh, ww)
    return weighted / (mass + 1e-12)


# --- modules ----------------------------------------------------------------------------------------------

def _nchw(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply an NCHW module (conv, BatchNorm) to NHWC tokens (the permutes are views)."""
    return module(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class SuperTokenAttention(nn.Module):
    """STA on NHWC tokens: sample super tokens on an h x w grid, MHSA among them, map back through the association.
    With `stoken_size` (1, 1) it is plain MHSA over all tokens (the official `direct_forward`)."""

    def __init__(self, dim: int, num_heads: int, stoken_size: Tuple[int, int] = (1, 1), n_iter: int = 1,
                 qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must split into {num_heads} heads")
        if n_iter < 1:
            raise ValueError(f"n_iter must be >= 1, got {n_iter}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.stoken_size = tuple(stoken_size)
        self.n_iter = n_iter
        self.scale = dim ** -0.5  # of the association logits: the full width, not a head's
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def mhsa(self, x: torch.Tensor) -> torch.Tensor:
        """Global multi-head self-attention over a sequence (B, N, C)."""
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B, n, N, d)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, -1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H0, W0, C = x.shape
        h, w = self.stoken_size
        if h == 1 and w == 1:
            return self.mhsa(x.reshape(B, H0 * W0, C)).reshape(B, H0, W0, C)
        x = F.pad(x, (0, 0, 0, (-W0) % w, 0, (-H0) % h))  # zeros on the right and bottom, as the official code
        H, W = x.shape[1:3]
        grid = (H // h, W // w)
        pixels = x.reshape(B, grid[0], h, grid[1], w, C).permute(0, 1, 3, 2, 4, 5)  # (B, hh, ww, h, w, C)
        pixels = pixels.reshape(B, -1, h * w, C)  # (B, M, P, C): M cells of P tokens
        stokens = F.avg_pool2d(x.permute(0, 3, 1, 2), (h, w))  # (B, C, hh, ww)
        with torch.no_grad():  # the association carries no gradient (official)
            for _ in range(self.n_iter - 1):
                stokens = sample_super_tokens(pixels, association(pixels, stokens, self.scale), grid)
            affinity = association(pixels, stokens, self.scale)  # (B, M, P, 9)
        stokens = sample_super_tokens(pixels, affinity, grid)  # (B, C, hh, ww), with gradient through the tokens
        stokens = self.mhsa(stokens.flatten(2).transpose(1, 2))  # (B, M, C)
        stokens = stokens.transpose(1, 2).reshape(B, C, *grid)
        x = neighbour_super_tokens(stokens) @ affinity.transpose(-1, -2)  # (B, M, C, P)
        x = x.reshape(B, grid[0], grid[1], C, h, w).permute(0, 1, 4, 2, 5, 3).reshape(B, H, W, C)
        return x[:, :H0, :W0]


class ConvFFN(nn.Module):
    """fc1 -> act -> (+ depthwise 3x3 conv, residual) -> fc2, on NHWC tokens."""

    def __init__(self, dim: int, hidden_dim: int, act_layer: type[nn.Module] = nn.GELU, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, groups=hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.act(self.fc1(x)))
        x = x + _nchw(self.dwconv, x)
        return self.drop2(self.fc2(x))


class SuperTokenBlock(nn.Module):
    """x += DWConv3x3(x); x += STA(LN(x)); x += FFN(BN(x)); NHWC in and out."""

    def __init__(self, dim: int, num_heads: int, stoken_size: Tuple[int, int] = (1, 1), n_iter: int = 1,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, proj_drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, layer_scale: Optional[float] = None, act_layer: type[nn.Module] = nn.GELU,
                 norm_layer: type[nn.Module] = partial(nn.LayerNorm, eps=1e-6)):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = norm_layer(dim)
        self.attn = SuperTokenAttention(dim, num_heads, stoken_size, n_iter, qkv_bias, attn_drop, proj_drop)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = ConvFFN(dim, int(dim * mlp_ratio), act_layer, proj_drop)
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + _nchw(self.pos_embed, x)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(_nchw(self.norm2, x))))


class ConvStem(nn.Module):
    """Four 3x3 convs (s2, s1, s2, s1), each followed by GELU and BN: NCHW image in, NHWC tokens at 1/4 out."""

    def __init__(self, in_chans: int = 3, embed_dim: int = 64, act_layer: type[nn.Module] = nn.GELU):
        super().__init__()
        half = embed_dim // 2
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, half, 3, 2, 1), act_layer(), nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 3, 1, 1), act_layer(), nn.BatchNorm2d(half),
            nn.Conv2d(half, embed_dim, 3, 2, 1), act_layer(), nn.BatchNorm2d(embed_dim),
            nn.Conv2d(embed_dim, embed_dim, 3, 1, 1), act_layer(), nn.BatchNorm2d(embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class Downsample(nn.Module):
    """3x3 stride-2 conv + BN, NHWC in and out."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(dim, out_dim, 3, 2, 1), nn.BatchNorm2d(out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _nchw(self.proj, x)


class STViTStage(nn.Module):
    """Optional downsampler, then super token blocks on one grid of super tokens."""

    def __init__(self, in_dim: int, dim: int, depth: int, downsample: bool, drop_path: Sequence[float],
                 **block_kwargs):
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = Downsample(in_dim, dim) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[SuperTokenBlock(dim, drop_path=drop_path[i], **block_kwargs)
                                      for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)  # (B, H, W, C)
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


class STViT(LinearHeadMixin, nn.Module):
    """STViT classifier: conv stem, four super-token stages, then Linear -> BN -> Swish per position, pool,
    classifier."""

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            embed_dims: Sequence[int] = (64, 128, 320, 512),
            depths: Sequence[int] = (3, 5, 9, 3),
            num_heads: Sequence[int] = (1, 2, 5, 8),
            stoken_sizes: Sequence[int] = (8, 4, 1, 1),
            n_iters: Sequence[int] = (1, 1, 1, 1),
            layer_scales: Sequence[Optional[float]] = (None, None, None, None),
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            head_hidden_size: int = 1024,
            drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            act_layer: type[nn.Module] = nn.GELU,
            head_act_layer: type[nn.Module] = nn.SiLU,
            norm_layer: type[nn.Module] = partial(nn.LayerNorm, eps=1e-6),
    ):
        super().__init__()
        per_stage = (embed_dims, depths, num_heads, stoken_sizes, n_iters, layer_scales)
        if len({len(s) for s in per_stage}) != 1:
            raise ValueError("embed_dims, depths, num_heads, stoken_sizes, n_iters and layer_scales need one entry "
                             f"per stage, got lengths {[len(s) for s in per_stage]}")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.output_fmt = "NCHW"
        self.patch_embed = ConvStem(in_chans, embed_dims[0], act_layer)
        dpr = [x.tolist() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))]
        stages, self.feature_info = [], []
        for i in range(len(depths)):
            stages.append(STViTStage(
                embed_dims[max(i - 1, 0)], embed_dims[i], depths[i], downsample=i > 0, drop_path=dpr[i],
                num_heads=num_heads[i], stoken_size=to_2tuple(stoken_sizes[i]), n_iter=n_iters[i],
                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
                layer_scale=layer_scales[i], act_layer=act_layer, norm_layer=norm_layer))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=4 * 2 ** i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = embed_dims[-1]
        self.head_hidden_size = head_hidden_size
        self.proj = nn.Linear(self.num_features, head_hidden_size)
        self.norm = nn.BatchNorm2d(head_hidden_size)
        self.act = head_act_layer()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^patch_embed", blocks=r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None),
            (r"^(proj|norm)\.", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs at `indices` (last n if int, all if None). STViT has no final norm before its head: `norm`
        changes nothing."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:max_index + 1]
        intermediates = []
        x = self.patch_embed(x)
        for i, stage in enumerate(stages):
            x = stage(x)  # (B, H, W, C)
            if i in take_indices:
                intermediates.append(x.permute(0, 3, 1, 2) if output_fmt == "NCHW" else x)
        if intermediates_only:
            return intermediates
        return x.permute(0, 3, 1, 2), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        if max_index < len(self.stages) - 1:
            self.num_features = self.feature_info[max_index]["num_chs"]
            prune_head = True
        self.stages = self.stages[:max_index + 1]
        if prune_head:  # the projection, BN and Swish belong to the head
            self.proj, self.norm, self.act = nn.Identity(), nn.Identity(), nn.Identity()
            self.head_hidden_size = self.num_features
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.patch_embed(x)).permute(0, 3, 1, 2)  # (B, C, H/32, W/32)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.proj(x.permute(0, 2, 3, 1))  # per position, (B, H, W, head_hidden_size)
        x = self.act(self.norm(x.permute(0, 3, 1, 2)))  # (B, head_hidden_size, H, W)
        x = x.mean((2, 3)) if self.global_pool == "avg" else x.permute(0, 2, 3, 1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# --- converter --------------------------------------------------------------------------------------------

_BLOCK_RENAMES = (("pos_embed.conv.", "pos_embed."), ("norm1.norm.", "norm1."),
                  ("attn.stoken_refine.", "attn."), ("mlp2.conv.conv.", "mlp.dwconv."), ("mlp2.", "mlp."),
                  ("gamma_1", "ls1.gamma"), ("gamma_2", "ls2.gamma"))
_POINTWISE = ("attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight")


def _qkv_rows_to_timm(value: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Official rows (heads, (q, k, v), head_dim) -> timm's ((q, k, v), heads, head_dim), weight or bias."""
    return value.reshape(num_heads, 3, -1, *value.shape[1:]).transpose(0, 1).reshape(value.shape)


def checkpoint_filter_fn(state_dict: dict, model: STViT) -> dict:
    """Official STViT state dict (`layers.i.blocks.j`, 1x1 convs, `stoken_refine`, Unfold/Fold kernels) -> vitlab's.

    Identity on a state dict already in vitlab's layout. Accepts the official file's {"model": ...} wrapper.
    """
    state_dict = state_dict.get("model", state_dict.get("state_dict", state_dict))
    if not any(k.startswith("layers.") for k in state_dict):
        return state_dict
    out = {}
    for key, value in state_dict.items():
        if key == "proj.weight":
            value = value.flatten(1)  # 1x1 conv (out, in, 1, 1) -> Linear (out, in)
        if not key.startswith("layers."):
            out[key] = value  # patch_embed, proj, norm, head: same names
            continue
        _, stage, rest = key.split(".", 2)
        stage = int(stage)
        if rest.startswith("downsample."):  # official layer i ends with the downsampler that starts stage i+1
            out[f"stages.{stage + 1}.{rest}"] = value
            continue
        _, block, rest = rest.split(".", 2)  # blocks.j.<...>
        if rest.startswith(("attn.unfold.", "attn.fold.")):
            continue  # frozen identity kernels of the official gather / scatter: F.unfold / F.fold here
        for old, new in _BLOCK_RENAMES:
            if rest.startswith(old):
                rest = new + rest[len(old):]
                break
        if rest in _POINTWISE:
            value = value.flatten(1)
        if rest.startswith("attn.qkv."):
            value = _qkv_rows_to_timm(value, model.stages[stage].blocks[int(block)].attn.num_heads)
        if rest.endswith("gamma"):
            value = value.reshape(-1)  # official (1, C, 1, 1)
        out[f"stages.{stage}.blocks.{block}.{rest}"] = value
    return out


# --- registry ---------------------------------------------------------------------------------------------

def _cfg(**kwargs) -> dict:
    return imagenet_cfg(**{"pool_size": (7, 7), "crop_pct": 0.9, "first_conv": "patch_embed.proj.0",
                           "license": "unknown", "paper_ids": "arXiv:2211.11167", **kwargs})


default_cfgs = generate_default_cfgs({
    "vl_stvit_small": _cfg(),
    "vl_stvit_base": _cfg(),
    "vl_stvit_large": _cfg(),
    "vl_test_stvit": _cfg(input_size=(3, 64, 64), pool_size=(2, 2), num_classes=10),
})


def _create_stvit(variant: str, pretrained: bool = False, **kwargs) -> STViT:
    return build_vitlab_model(STViT, variant, pretrained, filter_fn=checkpoint_filter_fn,
                              default_out_indices=tuple(range(len(kwargs.get("depths", (3, 5, 9, 3))))), **kwargs)


@register_model
def vl_stvit_small(pretrained: bool = False, **kwargs) -> STViT:
    """STViT-S: 25,495,624 params, 4.34 GMACs at 224 (README 25M / 4.4G), 83.6% top-1 (IN-1k)."""
    arch = dict(embed_dims=(64, 128, 320, 512), depths=(3, 5, 9, 3), num_heads=(1, 2, 5, 8),
                stoken_sizes=(8, 4, 1, 1))
    return _create_stvit("vl_stvit_small", pretrained, **dict(arch, **kwargs))


@register_model
def vl_stvit_base(pretrained: bool = False, **kwargs) -> STViT:
    """STViT-B: 51,691,288 params, 9.82 GMACs at 224 (README 52M / 9.9G), 84.8% top-1 (IN-1k)."""
    arch = dict(embed_dims=(96, 192, 384, 512), depths=(4, 6, 14, 6), num_heads=(2, 3, 6, 8),
                stoken_sizes=(8, 4, 1, 1), layer_scales=(None, None, 1e-6, 1e-6))
    return _create_stvit("vl_stvit_base", pretrained, **dict(arch, **kwargs))


@register_model
def vl_stvit_large(pretrained: bool = False, **kwargs) -> STViT:
    """STViT-L: 94,971,096 params, 15.54 GMACs at 224 (README 95M / 15.6G), 85.3% top-1 (IN-1k)."""
    arch = dict(embed_dims=(96, 192, 448, 640), depths=(4, 7, 19, 8), num_heads=(2, 3, 7, 10),
                stoken_sizes=(8, 4, 1, 1), layer_scales=(None, None, 1e-6, 1e-6))
    return _create_stvit("vl_stvit_large", pretrained, **dict(arch, **kwargs))


@register_model
def vl_test_stvit(pretrained: bool = False, **kwargs) -> STViT:
    """Tiny STViT for tests: widths 16-64, one block per stage (2 with super tokens on 4x4 grids), 64 px."""
    arch = dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), stoken_sizes=(4, 2, 1, 1),
                mlp_ratio=2.0, head_hidden_size=64, num_classes=10)
    return _create_stvit("vl_test_stvit", pretrained, **dict(arch, **kwargs))
