"""SG-Former: Self-guided Transformer with Evolving Token Reallocation (Ren et al., ICCV 2023, arXiv:2308.12216).

A four-stage token backbone whose global attention sees a number of key/value tokens per region that depends on how
significant the region is. Blocks come in pairs in stages 1-3 (spatial-reduction ratio `sr` > 1):

* even blocks, hybrid-scale attention: half of the heads attend globally to keys from the map shrunk by an
  sr x sr stride-sr conv (+ LayerNorm, GELU), the other half locally inside 7 x 7 windows at full resolution. The
  attention probabilities, averaged over heads and queries, give a significance per key: the global part
  nearest-upsampled to H x W plus the local part; this map (no gradient) goes on to the next block;
* odd blocks, significance-guided attention: the tokens, sorted by ascending significance, are cut into chunks and
  each chunk's consecutive groups of g tokens are merged into one key/value token by a learned Linear(g, 1). The
  official allocation (`TOKEN_GROUPS`): sr 8 - least significant quarter g = 196, middle half g = 56, most
  significant quarter g = 28 (3136 tokens -> 4 + 28 + 28 at 224 px); sr 4 - 49 / 14 / 7 (784 -> 4 + 28 + 28);
  sr 2 - lower half g = 2, upper half g = 1 (196 -> 49 + 98). Half of the heads take keys from the tokens in
  raster order, the other half in column-major order (they differ only where significances tie); every query
  attends to all of them.

Stage 4 (sr 1) is plain global attention. Every attention adds a "LePE" term (depthwise 3x3 conv of a Linear of its
input) before the output projection; the MLP is fc1 -> GELU(h + DWConv3x3(h)) -> fc2. The stem is three 3x3 convs
(strides 2, 1, 2) with GroupNorm(1) and GELU between, then LayerNorm, plus an absolute position embedding
(initialised to 2D sin-cos, trained); stages 2-4 start with 1x1 -> depthwise 3x3 stride 2 -> 1x1 convs with
GroupNorm(1); every stage ends with a LayerNorm; the head averages the tokens.

Official code: github.com/OliverRensu/SG-Former, `sgformer.py` (`sgformer_s`, `sgformer_m`, `sgformer_b`),
commit b982803ceb0af70ff20f42784ddac51212ef954e.

| variant | params (1000 classes) | MACs at 224 (counted here) | top-1 (IN-1k, paper) |
|---|---|---|---|
| SG-Former-S (`vl_sgformer_small`, `sgformer_s`) | 22,545,981 | 4.78G (paper 4.8G) | 83.2% |
| SG-Former-M (`vl_sgformer_medium`, `sgformer_m`) | 38,689,316 | 7.43G | not checked here |
| SG-Former-B (`vl_sgformer_base`, `sgformer_b`) | 77,950,293 | 15.54G | 84.7% |

Parameter counts are the official constructors' exactly (tests). MACs are vitlab.profiling.count_flops's (attention
matmuls included); SG-Former-S's is within 0.4% of the paper's 4.8G "FLOPs" (tested); M's and B's published figures
were not available here. Top-1: 84.7% (base) is the abstract's, 83.2% (small) the seed catalog's reading of the paper.

Differences from the official file, none of which changes the function at 224 px: stages are modules
(`stages.{i}.patch_embed / blocks / norm`, the position embedding in stage 0), the merge Linears `f1, f2, f3` are
`attn.merge.{0,1,2}`, convs with GroupNorm are timm `ConvNormAct`s, and `checkpoint_filter_fn` renames the official
keys. Each attention is its own class (official: one class whose branch depends on whether a map came in), the
significance map is one (B, H, W) tensor (official: its raster and column-major flattenings), the guided and plain
attentions run `F.scaled_dot_product_attention`. The official model runs at its `img_size` only (the position
embedding is added as it is); here it is resampled (bicubic) for other grids, so any input whose stage grids split
into 7 x 7 windows and whose token counts split into the merge groups runs (448 px for the official variants; 56 px
steps for `vl_test_sgformer`); others raise a ValueError saying why. Blocks take `(x, (H, W), significance)` and
return `(x, significance)`. `no_weight_decay` is empty, as the official one is in effect (it names parameters that
do not exist). `drop_path_rate` defaults to 0 (official training: 0.1 S, 0.2 M, 0.4 B).

Checked against (tests/models/test_zoo_sgformer.py): the official `sgformer.py` run locally on two tiny configs (112 px with
sr 8 and 4, the three-tier allocation; 56 px with sr 2), committed as fixtures in the official key layout and loaded
through `checkpoint_filter_fn` (logits within 1e-5 here, 1e-4 asserted); the token allocation on a hand-made
significance map against the official rule (salient tokens share keys 7 to one, minor ones 49 to one); that the
guided attention depends on the map's order only, and the map sums to (windows + sr^2) as mean attention
probabilities must; exact parameter counts of the three official constructors; MACs of SG-Former-S; the position
embedding's sin-cos init against the MAE formula the official code uses (identical to the official function).
"""
import math
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import ConvNormAct, DropPath, GroupNorm1, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models.swin_transformer import window_partition, window_reverse
from torch.utils.checkpoint import checkpoint

from ._builder import build_vitlab_model, imagenet_cfg
from ._staged import StagedTokenModel, tokens_to_map

__all__ = ["SGFormer", "HybridScaleAttention", "SignificanceGuidedAttention", "GlobalAttention", "SGBlock",
           "TOKEN_GROUPS", "allocation", "token_assignment", "reallocate_tokens", "global_significance",
           "local_significance", "sincos_pos_embed", "checkpoint_filter_fn", "vl_sgformer_small",
           "vl_sgformer_medium", "vl_sgformer_base", "vl_test_sgformer"]

# The official token allocation of the significance-guided attention, by spatial-reduction ratio: for each chunk of
# the tokens in ascending significance, (its share in parts of the whole, tokens merged into one key/value token).
TOKEN_GROUPS: dict[int, tuple[tuple[int, int], ...]] = {
    8: ((1, 196), (2, 56), (1, 28)),
    4: ((1, 49), (2, 14), (1, 7)),
    2: ((1, 2), (1, 1)),
}


# --- the math: pure tensor functions ----------------------------------------------------------------------

def allocation(num_tokens: int, groups: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """(tokens in the chunk, tokens merged into one) per chunk, least significant first, as the official code cuts
    them: chunk boundaries at (N // parts) * (cumulative parts), the last chunk taking the rest."""
    parts = sum(p for p, _ in groups)
    bounds = [num_tokens // parts * sum(p for p, _ in groups[:i]) for i in range(len(groups))] + [num_tokens]
    sizes = [(end - start, merge) for start, end, (_, merge) in zip(bounds, bounds[1:], groups)]
    if any(size % merge or size == 0 for size, merge in sizes):
        raise ValueError(f"{num_tokens} tokens do not split into the significance-guided chunks {sizes} "
                         "((chunk size, tokens merged per key) with chunk sizes multiples of the merge sizes): "
                         "SG-Former runs at input sizes whose stage grids allow it, e.g. multiples of 224 px")
    return sizes


def token_assignment(significance: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Index of the key/value token each token is merged into, (B, N), for significances (B, N) in the order the
    tokens are gathered (what `reallocate_tokens` computes, as an index map)."""
    B, N = significance.shape
    order = significance.sort(dim=1).indices  # (B, N) token indices, ascending significance
    slots, offset = [], 0
    for size, merge in sizes:
        slots.append(offset + torch.arange(size, device=order.device) // merge)
        offset += size // merge
    slot = torch.cat(slots).expand(B, N)  # (B, N) key/value slot of each sorted position
    return torch.empty_like(order).scatter_(1, order, slot)


def reallocate_tokens(x: torch.Tensor, order: torch.Tensor, sizes: Sequence[tuple[int, int]],
                      weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor]) -> torch.Tensor:
    """Key/value tokens (B, M, C): x (B, N, C) gathered in `order` (B, N), cut into chunks of `sizes`, each chunk's
    consecutive groups of `merge` tokens combined by its Linear(merge, 1) (`weights[k]` (1, merge), `biases[k]`)."""
    B, N, C = x.shape
    x = x.gather(1, order.unsqueeze(-1).expand(-1, -1, C))  # (B, N, C), ascending significance
    out = []
    for chunk, (size, merge), weight, bias in zip(x.split([s for s, _ in sizes], dim=1), sizes, weights, biases):
        groups = chunk.transpose(1, 2).reshape(B, C, size // merge, merge)  # (B, C, n, merge)
        out.append(F.linear(groups, weight, bias).squeeze(-1))  # (B, C, n)
    return torch.cat(out, dim=2).transpose(1, 2)  # (B, M, C)


def global_significance(attn: torch.Tensor, reduced_hw: tuple[int, int], hw: tuple[int, int]) -> torch.Tensor:
    """Attention (B, h, N, M) to the M = h' x w' reduced keys -> mean over heads and queries, nearest-upsampled to
    the H x W grid: (B, H, W)."""
    value = attn.detach().mean(1).mean(1)  # (B, M)
    return F.interpolate(value.view(-1, 1, *reduced_hw), size=hw, mode="nearest")[:, 0]


def local_significance(attn: torch.Tensor, batch: int, hw: tuple[int, int], window: int) -> torch.Tensor:
    """Window attention (B*h*nW, w*w, w*w) -> each key's mean over heads and its window's queries, back on the
    H x W grid: (B, H, W)."""
    H, W = hw
    value = attn.detach().view(batch, -1, (H // window) * (W // window), window * window, window * window)
    value = value.mean(1).mean(2)  # (B, nW, w*w)
    value = value.view(batch, H // window, W // window, window, window)
    return value.permute(0, 1, 3, 2, 4).reshape(batch, H, W)


def sincos_pos_embed(grid: tuple[int, int], dim: int, device=None) -> torch.Tensor:
    """The MAE 2D sin-cos embedding the official code initialises with, (1, H*W, dim): [sin x, cos x, sin y, cos y]
    with x the column index, frequencies 1 / 10000^(i / (dim/4))."""
    ys, xs = torch.meshgrid(torch.arange(grid[0], device=device, dtype=torch.float64),
                            torch.arange(grid[1], device=device, dtype=torch.float64), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, device=device, dtype=torch.float64) / (dim / 4))  # (dim/4,)
    phases = [coordinate.reshape(-1, 1) * omega for coordinate in (xs, ys)]  # 2 x (H*W, dim/4)
    return torch.cat([f(p) for p in phases for f in (torch.sin, torch.cos)], dim=1).float().unsqueeze(0)


def _windows(x: torch.Tensor, hw: tuple[int, int], window: int) -> torch.Tensor:
    """(B, h, N, d) -> (B*h*nW, w*w, d), windows of each (batch, head) in raster order."""
    B, h, N, d = x.shape
    windows = window_partition(x.reshape(B * h, *hw, d), (window, window))  # (B*h*nW, w, w, d)
    return windows.flatten(1, 2)


def _unwindow(x: torch.Tensor, batch: int, hw: tuple[int, int], window: int) -> torch.Tensor:
    """(B*h*nW, w*w, d) -> (B, N, h*d), heads first in the channels."""
    d = x.shape[-1]
    x = window_reverse(x.view(-1, window, window, d), (window, window), *hw)  # (B*h, H, W, d)
    return x.view(batch, -1, hw[0] * hw[1], d).transpose(1, 2).flatten(2)


# --- modules ----------------------------------------------------------------------------------------------

class _LePEAttention(nn.Module):
    """What every SG-Former attention has: a LePE term (depthwise 3x3 conv of a Linear of the input), added to the
    attention's output before the projection."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must split into {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.lepe_linear = nn.Linear(dim, dim)
        self.lepe_conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _lepe(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        return self.lepe_conv(tokens_to_map(self.lepe_linear(x), hw, 0)).flatten(2).transpose(1, 2)  # (B, N, C)

    def _out(self, x: torch.Tensor, lepe: torch.Tensor) -> torch.Tensor:
        return self.proj_drop(self.proj(x + lepe))

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Softmax attention, (B, h, N, d) queries -> (B, N, h*d)."""
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        return out.transpose(1, 2).flatten(2)


class GlobalAttention(_LePEAttention):
    """Plain global attention + LePE (sr 1: stage 4). Takes and returns the significance slot unused (None out)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, **kwargs):
        super().__init__(dim, num_heads, **kwargs)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)

    def forward(self, x: torch.Tensor, hw: tuple[int, int],
                significance: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, None]:
        B, N, C = x.shape
        q = self.q(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, N, d)
        k, v = self.kv(x).view(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self._out(self._sdpa(q, k, v), self._lepe(x, hw)), None


class HybridScaleAttention(_LePEAttention):
    """Half the heads global (keys from the sr-reduced map), half local (7x7 windows); returns the output and the
    significance map (B, H, W) their attention probabilities give (no gradient)."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, qkv_bias: bool = True, window_size: int = 7,
                 **kwargs):
        super().__init__(dim, num_heads, **kwargs)
        if num_heads % 2:
            raise ValueError(f"hybrid-scale attention splits its heads in two halves: num_heads={num_heads} is odd")
        self.sr_ratio, self.window_size = sr_ratio, window_size
        self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
        self.norm = nn.LayerNorm(dim)
        self.act = nn.GELU()
        self.q1 = nn.Linear(dim, dim // 2, bias=qkv_bias)
        self.kv1 = nn.Linear(dim, dim, bias=qkv_bias)
        self.q2 = nn.Linear(dim, dim // 2, bias=qkv_bias)
        self.kv2 = nn.Linear(dim, dim, bias=qkv_bias)

    def forward(self, x: torch.Tensor, hw: tuple[int, int],
                significance: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        B, N, C = x.shape
        h, d, w = self.num_heads // 2, self.head_dim, self.window_size
        if hw[0] % w or hw[1] % w:
            raise ValueError(f"a {hw[0]} x {hw[1]} token grid does not split into {w} x {w} attention windows: "
                             f"SG-Former needs stage grids that are multiples of {w} (e.g. 224 px inputs)")
        # global half: every query against the sr x sr-reduced map
        q1 = self.q1(x).view(B, N, h, d).transpose(1, 2)  # (B, h, N, d)
        reduced = self.sr(tokens_to_map(x, hw, 0))  # (B, C, H/sr, W/sr)
        reduced_hw = tuple(reduced.shape[-2:])
        reduced = self.act(self.norm(reduced.flatten(2).transpose(1, 2)))  # (B, M, C)
        k1, v1 = self.kv1(reduced).view(B, -1, 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, M, d)
        attn1 = self.attn_drop(((q1 @ k1.transpose(-2, -1)) * self.scale).softmax(dim=-1))  # (B, h, N, M)
        x1 = (attn1 @ v1).transpose(1, 2).reshape(B, N, C // 2)
        # local half: 7 x 7 windows at full resolution
        q2 = self.q2(x).view(B, N, h, d).transpose(1, 2)
        k2, v2 = self.kv2(x).view(B, N, 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        q2, k2, v2 = (_windows(t, hw, w) for t in (q2, k2, v2))  # (B*h*nW, w*w, d)
        attn2 = self.attn_drop(((q2 @ k2.transpose(-2, -1)) * self.scale).softmax(dim=-1))  # (B*h*nW, w*w, w*w)
        x2 = _unwindow(attn2 @ v2, B, hw, w)  # (B, N, C/2)
        significance = global_significance(attn1, reduced_hw, hw) + local_significance(attn2, B, hw, w)
        return self._out(torch.cat([x1, x2], dim=2), self._lepe(x, hw)), significance


class SignificanceGuidedAttention(_LePEAttention):
    """Global attention to tokens reallocated by the previous block's significance map: `TOKEN_GROUPS[sr_ratio]`
    says how many tokens each significance chunk merges into one key/value token."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, qkv_bias: bool = True, **kwargs):
        super().__init__(dim, num_heads, **kwargs)
        if num_heads % 2:
            raise ValueError(f"significance-guided attention splits its heads in two halves: num_heads={num_heads}")
        if sr_ratio not in TOKEN_GROUPS:
            raise ValueError(f"no official token allocation for sr_ratio={sr_ratio}: one of {sorted(TOKEN_GROUPS)}")
        self.groups = TOKEN_GROUPS[sr_ratio]
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv1 = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv2 = nn.Linear(dim, dim, bias=qkv_bias)
        self.merge = nn.ModuleList(nn.Linear(merge, 1) for _, merge in self.groups)

    def forward(self, x: torch.Tensor, hw: tuple[int, int],
                significance: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, None]:
        if significance is None:
            raise ValueError("significance-guided attention needs the map of the hybrid-scale block before it")
        B, N, C = x.shape
        H, W = hw
        h, d = self.num_heads // 2, self.head_dim
        sizes = allocation(N, self.groups)
        weights, biases = [m.weight for m in self.merge], [m.bias for m in self.merge]
        order_rows = significance.reshape(B, N).sort(dim=1).indices  # tokens in raster order
        order_cols = significance.transpose(1, 2).reshape(B, N).sort(dim=1).indices  # in column-major order
        x_cols = x.reshape(B, H, W, C).transpose(1, 2).reshape(B, N, C)
        seq1 = reallocate_tokens(x, order_rows, sizes, weights, biases)  # (B, M, C)
        seq2 = reallocate_tokens(x_cols, order_cols, sizes, weights, biases)
        kv = torch.cat([self.kv1(seq1).view(B, -1, 2, h, d), self.kv2(seq2).view(B, -1, 2, h, d)], dim=3)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, M, d): the first half from seq1
        q = self.q(x).view(B, N, self.num_heads, d).transpose(1, 2)  # (B, heads, N, d)
        return self._out(self._sdpa(q, k, v), self._lepe(x, hw)), None


class DWConvMlp(nn.Module):
    """fc1 -> act(h + depthwise 3x3 conv(h)) -> fc2 on (B, N, C) tokens."""

    def __init__(self, dim: int, hidden_dim: int, act_layer: type[nn.Module] = nn.GELU, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, groups=hidden_dim)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        x = self.fc1(x)
        x = self.act(x + self.dwconv(tokens_to_map(x, hw, 0)).flatten(2).transpose(1, 2))
        return self.drop(self.fc2(self.drop(x)))


_MIXERS = {"hybrid": HybridScaleAttention, "guided": SignificanceGuidedAttention, "global": GlobalAttention}


class SGBlock(nn.Module):
    """x += attn(LN(x)); x += MLP(LN(x)) on (B, N, C) tokens; the significance map goes in and out alongside."""

    def __init__(self, dim: int, num_heads: int, mixer: str, sr_ratio: int = 1, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, window_size: int = 7, proj_drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, act_layer: type[nn.Module] = nn.GELU, norm_eps: float = 1e-6):
        super().__init__()
        self.mixer = mixer
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        extra = dict(sr_ratio=sr_ratio) if mixer != "global" else {}
        if mixer == "hybrid":
            extra["window_size"] = window_size
        self.attn = _MIXERS[mixer](dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop,
                                   **extra)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = DWConvMlp(dim, int(dim * mlp_ratio), act_layer, proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, hw: tuple[int, int],
                significance: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        y, significance = self.attn(self.norm1(x), hw, significance)
        x = x + self.drop_path1(y)
        return x + self.drop_path2(self.mlp(self.norm2(x), hw)), significance


class ConvStem(nn.Module):
    """3x3 s2 -> 3x3 -> 3x3 s2 convs with GroupNorm(1) (GELU between), then LayerNorm: image -> (B, H/4 * W/4, C)."""

    def __init__(self, in_chans: int, dim: int, act_layer: type[nn.Module] = nn.GELU):
        super().__init__()
        conv = dict(norm_layer=GroupNorm1, act_layer=act_layer, bias=False)
        self.proj = nn.Sequential(ConvNormAct(in_chans, dim, 3, 2, **conv), ConvNormAct(dim, dim, 3, 1, **conv),
                                  ConvNormAct(dim, dim, 3, 2, apply_act=False, **conv))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)
        hw = tuple(x.shape[-2:])
        return self.norm(x.flatten(2).transpose(1, 2)), hw


class PatchMerging(nn.Module):
    """1x1 -> depthwise 3x3 stride 2 -> 1x1 convs with GroupNorm(1) (GELU between): map -> (B, H/2 * W/2, C')."""

    def __init__(self, dim: int, out_dim: int, act_layer: type[nn.Module] = nn.GELU):
        super().__init__()
        conv = dict(norm_layer=GroupNorm1, act_layer=act_layer, bias=False)
        self.conv1 = ConvNormAct(dim, out_dim, 1, **conv)
        self.conv2 = ConvNormAct(out_dim, out_dim, 3, 2, groups=out_dim, **conv)
        self.conv3 = ConvNormAct(out_dim, out_dim, 1, apply_act=False, **conv)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.conv3(self.conv2(self.conv1(x)))
        return x.flatten(2).transpose(1, 2), tuple(x.shape[-2:])


class SGFormerStage(nn.Module):
    """Patch embedding (stem or merging), position embedding (stage 0), blocks passing the significance map from
    each hybrid-scale block to the guided one after it, LayerNorm. NCHW in; tokens (B, H*W, C) and (H, W) out."""

    num_prefix_tokens = 0

    def __init__(self, patch_embed: nn.Module, dim: int, depth: int, num_heads: int, sr_ratio: int, guided: bool,
                 grid_size: Optional[tuple[int, int]], drop_path: Sequence[float], norm_eps: float = 1e-6,
                 **block_kwargs):
        super().__init__()
        self.patch_embed = patch_embed
        self.grid_size = grid_size
        self.pos_embed = nn.Parameter(torch.zeros(1, grid_size[0] * grid_size[1], dim)) if grid_size else None
        mixers = ["global" if sr_ratio == 1 else "guided" if guided and j % 2 else "hybrid" for j in range(depth)]
        self.blocks = nn.ModuleList(
            SGBlock(dim, num_heads, mixers[j], sr_ratio, drop_path=drop_path[j], norm_eps=norm_eps, **block_kwargs)
            for j in range(depth))
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x, hw = self.patch_embed(x)  # (B, H*W, C)
        if self.pos_embed is not None:  # resample_abs_pos_embed returns pos_embed itself when hw == grid_size
            x = x + resample_abs_pos_embed(self.pos_embed, new_size=hw, old_size=self.grid_size, num_prefix_tokens=0)
        significance = None
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x, significance = checkpoint(block, x, hw, significance, use_reentrant=False)
            else:
                x, significance = block(x, hw, significance)
        return self.norm(x), hw


class SGFormer(StagedTokenModel):
    """SG-Former. `forward_features` returns the last stage's tokens (B, H*W, C) after its LayerNorm (each stage ends
    with one, so the model's `norm` is the identity and `forward_intermediates(norm=True)` changes nothing)."""

    family_name = "SG-Former"
    stem_pattern = r"^stages\.0\.(patch_embed|pos_embed)"
    token_pool_hint = "a class token, which SG-Former does not have"
    pool_types = ("avg", "")

    def __init__(
            self,
            img_size: Union[int, tuple[int, int]] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            embed_dims: Sequence[int] = (64, 128, 256, 512),
            depths: Sequence[int] = (2, 4, 16, 1),
            num_heads: Sequence[int] = (2, 4, 8, 16),
            mlp_ratios: Sequence[float] = (4, 4, 4, 4),
            sr_ratios: Sequence[int] = (8, 4, 2, 1),
            qkv_bias: bool = True,
            window_size: int = 7,
            norm_eps: float = 1e-6,
            act_layer: type[nn.Module] = nn.GELU,
            drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
    ):
        """`img_size` sets the position embedding's grid (img_size / 4); other inputs resample it. Blocks 1, 3, ...
        of every stage but the last with sr_ratio > 1 are significance-guided, the others hybrid-scale (sr > 1) or
        global (sr 1), as in the official code."""
        super().__init__()
        per_stage = (embed_dims, depths, num_heads, mlp_ratios, sr_ratios)
        if len({len(s) for s in per_stage}) != 1:
            raise ValueError("embed_dims, depths, num_heads, mlp_ratios and sr_ratios need one entry per stage, got "
                             f"lengths {[len(s) for s in per_stage]}")
        img_size = to_2tuple(img_size)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_prefix_tokens = 0
        self._check_pool(global_pool)
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = embed_dims[-1]
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # meta-device safe
        n = len(depths)
        stages, self.feature_info = [], []
        for i in range(n):
            embed = (ConvStem(in_chans, embed_dims[0], act_layer) if i == 0
                     else PatchMerging(embed_dims[i - 1], embed_dims[i], act_layer))
            stages.append(SGFormerStage(
                embed, embed_dims[i], depths[i], num_heads[i], sr_ratios[i], guided=i < n - 1,
                grid_size=(img_size[0] // 4, img_size[1] // 4) if i == 0 else None,
                drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])], norm_eps=norm_eps, mlp_ratio=mlp_ratios[i],
                qkv_bias=qkv_bias, window_size=window_size, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
                act_layer=act_layer))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=4 * 2 ** i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        with torch.no_grad():
            pos_embed = self.stages[0].pos_embed
            pos_embed.copy_(sincos_pos_embed(self.stages[0].grid_size, embed_dims[0], device=pos_embed.device))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # official init: trunc-normal Linear weights, zero biases, unit LayerNorms, He-normal (fan-out) convs
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        # the official list names `pos_embed1`..`pos_embed4`, which do not exist: its position embedding is decayed
        return set()


# --- official checkpoints -------------------------------------------------------------------------------------

_STEM_CONVS = {"0": "0", "2": "1", "4": "2"}  # official Sequential indices (GELUs between) -> ours


def _official_key(key: str) -> str:
    """One official key (`patch_embed{i}`, `block{i}.{j}`, `norm{i}`, `pos_embed`, `head`) in vitlab's layout."""
    if key == "pos_embed":
        return "stages.0.pos_embed"
    for old, new in (("patch_embed", "patch_embed"), ("block", "blocks"), ("norm", "norm")):
        if key.startswith(old) and key[len(old)].isdigit():
            index, _, rest = key[len(old):].partition(".")
            stage = int(index) - 1
            if new == "patch_embed" and stage == 0 and rest.startswith("conv."):  # conv.{k}.c / .bn
                _, k, rest = rest.split(".", 2)
                rest = f"proj.{_STEM_CONVS[k]}.{rest}"
            rest = rest.replace(".c.", ".conv.").replace("attn.f1.", "attn.merge.0.").replace(
                "attn.f2.", "attn.merge.1.").replace("attn.f3.", "attn.merge.2.").replace(
                "mlp.dwconv.dwconv.", "mlp.dwconv.")
            return f"stages.{stage}.{new}.{rest}"
    return key


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map an official SG-Former state dict (OliverRensu/SG-Former `sgformer.py`) to vitlab's layout.

    Accepts the bare state dict or the training script's checkpoint (`state_dict`, or `model`). A position
    embedding saved for another input size is resampled to the model's grid. A state dict already in vitlab's
    layout is returned unchanged.
    """
    for wrapper in ("model", "state_dict"):
        if isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
    if any(k.startswith("stages.") for k in state_dict):
        return state_dict
    out = {_official_key(k.removeprefix("module.")): v for k, v in state_dict.items()}
    stage = model.stages[0]
    pos_embed = out.get("stages.0.pos_embed")
    if pos_embed is not None and pos_embed.shape != stage.pos_embed.shape:
        side = math.isqrt(pos_embed.shape[1])
        out["stages.0.pos_embed"] = resample_abs_pos_embed(pos_embed, new_size=stage.grid_size, old_size=(side, side),
                                                           num_prefix_tokens=0)
    return out


# --- registry -------------------------------------------------------------------------------------------------

def _cfg(**kwargs) -> dict:
    return imagenet_cfg(**{
        "first_conv": "stages.0.patch_embed.proj.0.conv", "crop_pct": 0.9, "pool_size": (7, 7),
        "paper_ids": "arXiv:2308.12216", "origin_url": "https://github.com/OliverRensu/SG-Former", **kwargs,
    })


default_cfgs = generate_default_cfgs({
    "vl_sgformer_small": _cfg(),
    "vl_sgformer_medium": _cfg(),
    "vl_sgformer_base": _cfg(),
    "vl_test_sgformer": _cfg(input_size=(3, 56, 56), pool_size=(2, 2), num_classes=10),
})


def _create_sgformer(variant: str, pretrained: bool = False, **kwargs) -> SGFormer:
    return build_vitlab_model(SGFormer, variant, pretrained, filter_fn=checkpoint_filter_fn,
                              default_out_indices=tuple(range(len(kwargs.get("depths", (2, 4, 16, 1))))),
                              exclude=("act_layer",), **kwargs)


@register_model
def vl_sgformer_small(pretrained: bool = False, **kwargs) -> SGFormer:
    """SG-Former-S (`sgformer_s`): 22,545,981 params, 4.78 GMACs at 224 (paper 22.5M / 4.8G), 83.2% top-1."""
    arch = dict(embed_dims=(64, 128, 256, 512), depths=(2, 4, 16, 1), num_heads=(2, 4, 8, 16))
    return _create_sgformer("vl_sgformer_small", pretrained, **dict(arch, **kwargs))


@register_model
def vl_sgformer_medium(pretrained: bool = False, **kwargs) -> SGFormer:
    """SG-Former-M (`sgformer_m`): 38,689,316 params, 7.43 GMACs at 224."""
    arch = dict(embed_dims=(64, 128, 256, 512), depths=(2, 6, 28, 2), num_heads=(2, 4, 8, 16))
    return _create_sgformer("vl_sgformer_medium", pretrained, **dict(arch, **kwargs))


@register_model
def vl_sgformer_base(pretrained: bool = False, **kwargs) -> SGFormer:
    """SG-Former-B (`sgformer_b`): 77,950,293 params, 15.54 GMACs at 224, 84.7% top-1 (paper)."""
    arch = dict(embed_dims=(96, 192, 384, 768), depths=(4, 6, 24, 2), num_heads=(4, 6, 12, 24))
    return _create_sgformer("vl_sgformer_base", pretrained, **dict(arch, **kwargs))


@register_model
def vl_test_sgformer(pretrained: bool = False, **kwargs) -> SGFormer:
    """Tiny SG-Former for tests: widths 32-64, 56 px (a 14 x 14 stage-1 grid, sr 2: a hybrid-scale block, then a
    guided one merging the less significant half of the tokens in pairs), global attention after."""
    arch = dict(img_size=56, embed_dims=(32, 32, 64, 64), depths=(2, 1, 1, 1), num_heads=(2, 2, 4, 4),
                mlp_ratios=(2, 2, 2, 2), sr_ratios=(2, 1, 1, 1), num_classes=10)
    return _create_sgformer("vl_test_sgformer", pretrained, **dict(arch, **kwargs))
