"""RMT: Retentive Networks Meet Vision Transformers (Fan et al., CVPR 2024, arXiv:2309.11523).

A four-stage NHWC backbone whose token mixer is Manhattan Self-Attention (MaSA, "ReSA" in the code): softmax
attention with an explicit spatial decay. Head h of a stage has a decay rate gamma_h = 1 - 2^-(a + r * h / heads)
(a = `init_values`, r = `heads_ranges`), and the attention logits get log(gamma_h) * (|dy| + |dx|) added, so
attention weights are proportional to exp(q.k / sqrt(d)) * gamma_h^(Manhattan distance):

* stages 1-2 (`decomposed`): attention along each row (keys in the same row, decay gamma^|dx|), then along each
  column on the result (decay gamma^|dy|), which costs O(HW (H + W)) instead of O((HW)^2);
* stages 3-4: full attention over all H*W tokens with the 2D Manhattan mask.

Both run `F.scaled_dot_product_attention` with the decay as an additive float mask. As in the official code, q and k
first get a rotary (RoPE-style) rotation whose angle is the token's raster index h * W + w, and the output adds a
"LePE" depthwise 5x5 conv of v. Each block is x += DWConv3x3(x); x += MaSA(LN(x)); x += FFN(LN(x)) with the FFN
fc1 -> GELU -> (+ DWConv3x3) -> fc2. The stem is four 3x3 convs with BN (stride 4 in all), stages are joined by a
3x3 stride-2 conv + BN, and the head is the official one: Linear(C -> 1024) per position, BatchNorm, Swish, global
average pool, Linear classifier.

Official code: github.com/qhfan/RMT, `classfication_release/RMT.py` (`RMT_T3`, `RMT_S`, `RMT_M2`, `RMT_L6`),
commit 32ea21417a4d82ba6481f930f94cb4696dda0a8e.

| variant | params (1000 classes) | MACs at 224 | top-1 (IN-1k) |
|---|---|---|---|
| RMT-T (`vl_rmt_tiny`, `RMT_T3`) | 14,334,216 (README 14M) | 2.64G counted here (README "FLOPs" 2.5G, below) | 82.4% |
| RMT-S (`vl_rmt_small`, `RMT_S`) | 26,967,240 (README 27M) | 4.78G counted here (README 4.5G; fvcore: 4.80G) | 84.1% |
| RMT-B (`vl_rmt_base`, `RMT_M2`) | 54,154,896 (README 54M) | (README 9.7G) | 85.0% |
| RMT-L (`vl_rmt_large`, `RMT_L6`) | 95,464,864 (README 95M) | (README 18.2G) | 85.5% |

MACs: this file counts 2.637G for RMT-T at 224, exactly what fvcore (the counter the official `main.py` prints)
gives on the official `RMT_T3` for its conv, linear and matmul ops (0.5375G + 1.8250G + 0.2747G; fvcore adds 0.013G
of norms: 2.651G). The README's 2.5G is 5.5% lower; it is what the same network counts with stage 3 decomposed too
(`decomposed=(True, True, True, False)`, as in RMT-S/B/L): 2.502G. The released `RMT_T3`, whose parameter count is
the one in the official training log, decomposes stages 1-2 only, so that is the default here; the tests assert both.

Differences from the official file, none of which changes the function: q, k and v are one `qkv` Linear (official:
`q_proj`, `k_proj`, `v_proj`; `checkpoint_filter_fn` concatenates them), modules carry timm's names (`attn`, `norm1`,
`mlp`, `ls1`, ...), each stage's downsampler belongs to the next stage (official: the end of the previous one), the
decay rates and rotary angles are recomputed from the config (official stores them as buffers `Relpos.decay` /
`Relpos.angle`, which the converter drops), and `drop_path_rate` defaults to 0 (official: 0.1 T, 0.15 S, 0.4 B,
0.5 L for training).

Speed (same function, float rounding aside): attention is `F.scaled_dot_product_attention` (official: explicit
matmul + softmax); the rotary rotation is one complex product per call (official: five elementwise kernels per q and
k); the residual depthwise convs `x + conv(x)` (the block's positional conv and the FFN's) run as one conv whose
kernel centre is raised by 1; the LePE add doubles as the copy out of the attention layout; and the stem runs
channels-last, where oneDNN's dense 3x3 convs are about twice as fast on CPU as on NCHW. Interleaved in one process, 1 thread,
batch 4, shared CPU (preliminary), they took vitlab RMT-T from 1.06x to 1.18x the official speed (median per-round
ratio of CPU times; 1.09x to 1.31x by minimum times); BENCHMARKS.md has the quiet-window ratio.

Checked against (tests/models/test_zoo_rmt.py): the official `RMT.py` run locally on a tiny config (decomposed and full
stages, layer scale, a non-square input), committed as a fixture in the official key layout and loaded through
`checkpoint_filter_fn` (logits within 1e-4); the decay masks against gamma^Manhattan computed directly; the
decomposed attention against the full one on a single row / column (where the two must agree); exact parameter
counts of the four official constructors; MACs of RMT-T at 224 (both figures above).
"""
import contextlib
from functools import partial
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, trunc_normal_
from timm.models import generate_default_cfgs, register_model

from ._builder import build_vitlab_model, imagenet_cfg
from ._staged import LinearHeadMixin
from timm.models._features import feature_take_indices

__all__ = ["RMT", "ManhattanSelfAttention", "RetBlock", "decay_rates", "manhattan_decay_mask", "axis_decay_mask",
           "rotary_sin_cos", "rotate_every_two", "apply_rotary", "checkpoint_filter_fn", "vl_rmt_tiny", "vl_rmt_small",
           "vl_rmt_base", "vl_rmt_large", "vl_test_rmt"]


# --- the math: pure tensor functions ----------------------------------------------------------------------

def decay_rates(num_heads: int, init_value: float, heads_range: float, device=None) -> torch.Tensor:
    """log(gamma_h) = log(1 - 2^-(init_value + heads_range * h / num_heads)) for each head h, shape (heads,)."""
    h = torch.arange(num_heads, dtype=torch.float32, device=device)
    return torch.log(1 - 2 ** (-init_value - heads_range * h / num_heads))


def manhattan_decay_mask(height: int, width: int, log_gamma: torch.Tensor) -> torch.Tensor:
    """Additive mask log(gamma_h) * (|dy| + |dx|) between all pairs of the H*W raster-ordered tokens, (n, HW, HW)."""
    ys, xs = torch.meshgrid(torch.arange(height, device=log_gamma.device, dtype=log_gamma.dtype),
                            torch.arange(width, device=log_gamma.device, dtype=log_gamma.dtype), indexing="ij")
    grid = torch.stack((ys, xs), dim=-1).reshape(height * width, 2)  # (HW, 2)
    distance = (grid[:, None, :] - grid[None, :, :]).abs().sum(-1)  # (HW, HW)
    return distance * log_gamma[:, None, None]


def axis_decay_mask(length: int, log_gamma: torch.Tensor) -> torch.Tensor:
    """Additive mask log(gamma_h) * |i - j| along one axis: (heads, L, L)."""
    index = torch.arange(length, device=log_gamma.device, dtype=log_gamma.dtype)
    return (index[:, None] - index[None, :]).abs() * log_gamma[:, None, None]


def rotary_sin_cos(height: int, width: int, head_dim: int, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """sin, cos (H, W, d) of the official rotary angles: raster index h * W + w times 1 / 10000^(i / (d/2 - 1))."""
    angle = 1.0 / (10000 ** torch.linspace(0, 1, head_dim // 2, device=device))
    angle = angle.unsqueeze(-1).repeat(1, 2).flatten()  # (d,), each frequency twice: pairs (2i, 2i+1)
    index = torch.arange(height * width, device=device, dtype=angle.dtype)
    phase = index[:, None] * angle[None, :]  # (HW, d)
    return phase.sin().reshape(height, width, -1), phase.cos().reshape(height, width, -1)


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...) along the last dim."""
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


_PLAIN = False


@contextlib.contextmanager
def plain_formulas():
    """Within the block, RMT runs the plain formulas (what exporters see): the dependency-graph pruner traces under it,
    since the fast residual depthwise conv (a computed kernel through F.conv2d) hides the conv module from a trace."""
    global _PLAIN
    before, _PLAIN = _PLAIN, True
    try:
        yield
    finally:
        _PLAIN = before


def _exporting() -> bool:
    """True under ONNX export, torch.export or torch.jit.trace (OpenVINO's converter traces): the fast paths below use
    complex tensors and a computed conv kernel, which ONNX cannot take, so exporters see the plain formulas."""
    return _PLAIN or torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting() or torch.jit.is_tracing()


def apply_rotary(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_every_two(x) * sin (sin, cos broadcast against x).

    The official rotation turns each pair (x0, x1) by one angle (sin and cos repeat each frequency twice), which is
    a complex product (x0 + i x1) * (cos + i sin): one kernel on a complex view of x, instead of the official five.
    Dtypes without a complex counterpart (bfloat16, half) take the real formula.
    """
    if x.dtype not in (torch.float32, torch.float64) or x.stride(-1) != 1 or x.storage_offset() % 2 or _exporting():
        swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0, x3, x2, ...)
        sign = torch.tensor([-1.0, 1.0], device=sin.device, dtype=sin.dtype).repeat(sin.shape[-1] // 2)
        return torch.addcmul(x * cos, swapped, sin * sign)
    rotation = torch.complex(cos[..., 0::2], sin[..., 0::2])  # (..., d/2): small, broadcast against x
    return torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * rotation).flatten(-2)


# --- modules ----------------------------------------------------------------------------------------------

def _nchw_conv(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D conv to an NHWC tensor (the permutes are views: the conv runs channels-last)."""
    return conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def _plus_dwconv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """x + conv(x) for a stride-1 'same' depthwise conv on NHWC x, as one conv whose kernel centre is raised by 1.

    Equal up to float rounding; it saves the separate pass over x that the residual add costs.
    """
    if _exporting():
        return x + _nchw_conv(conv, x)
    weight = conv.weight  # (C, 1, k, k)
    centre = weight.shape[-1] // 2
    identity = F.pad(weight.new_ones(weight.shape[0], 1, 1, 1), (centre, centre, centre, centre))
    out = F.conv2d(x.permute(0, 3, 1, 2), weight + identity, conv.bias, 1, conv.padding, 1, conv.groups)
    return out.permute(0, 2, 3, 1)


class ManhattanSelfAttention(nn.Module):
    """MaSA on NHWC tokens: softmax(q k^T / sqrt(d) + decay mask) v + LePE(v); full, or decomposed along W then H."""

    def __init__(self, dim: int, num_heads: int, decomposed: bool = False, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, lepe_kernel: int = 5):
        super().__init__()
        if dim % num_heads or (dim // num_heads) % 2:
            raise ValueError(f"dim {dim} must split into {num_heads} heads of even size (rotary pairs)")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.head_index = tuple(range(num_heads))  # which of the stage's heads (decay rates) these are (pruning)
        self.decomposed = decomposed
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.lepe = nn.Conv2d(dim, dim, lepe_kernel, padding=lepe_kernel // 2, groups=dim)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, rel_pos: Tuple[torch.Tensor, ...]) -> torch.Tensor:
        """x (B, H, W, C); rel_pos = (sin, cos, masks): masks (n, HW, HW) if full, (mask_h, mask_w) if decomposed."""
        B, H, W, _ = x.shape
        n, d = self.num_heads, self.head_dim
        C = n * d  # the attention width: the input width unless heads were pruned
        sin, cos, masks = rel_pos
        if (masks[0] if self.decomposed else masks).shape[0] != n:
            keep = torch.tensor(self.head_index, device=x.device)  # a pruned block keeps some of the stage's heads
            masks = tuple(m.index_select(0, keep) for m in masks) if self.decomposed else masks.index_select(0, keep)
        qkv = self.qkv(x).view(B, H, W, 3, n, d)
        v = qkv[:, :, :, 2]  # (B, H, W, n, d)
        lepe = _nchw_conv(self.lepe, v.reshape(B, H, W, C)).view(B, H, W, n, d)
        qk = qkv[:, :, :, :2]  # (B, H, W, 2, n, d)
        qk = apply_rotary(qk, sin[:, :, None, None], cos[:, :, None, None])
        q, k = qk.unbind(3)  # (B, H, W, n, d)
        drop = self.attn_drop if self.training else 0.0
        if self.decomposed:
            mask_h, mask_w = masks
            # along W: each row is a batch entry
            q_w, k_w, v_w = (t.permute(0, 1, 3, 2, 4).reshape(B * H, n, W, d) for t in (q, k, v))
            v = F.scaled_dot_product_attention(q_w, k_w, v_w, attn_mask=mask_w[None], dropout_p=drop)  # (B*H, n, W, d)
            # along H on the result: each column is a batch entry
            v = v.view(B, H, n, W, d).permute(0, 3, 2, 1, 4).reshape(B * W, n, H, d)
            q_h, k_h = (t.permute(0, 2, 3, 1, 4).reshape(B * W, n, H, d) for t in (q, k))
            out = F.scaled_dot_product_attention(q_h, k_h, v, attn_mask=mask_h[None], dropout_p=drop)  # (B*W, n, H, d)
            out = out.view(B, W, n, H, d).permute(0, 3, 1, 2, 4)  # (B, H, W, n, d), a view
        else:
            q, k, v = (t.permute(0, 3, 1, 2, 4).reshape(B, n, H * W, d) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=masks[None], dropout_p=drop)  # (B, n, HW, d)
            out = out.transpose(1, 2).view(B, H, W, n, d)
        # lepe first: the sum takes its (contiguous) layout, so the add is also the copy out of the attention layout
        return self.proj_drop(self.proj((lepe + out).view(B, H, W, C)))


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
        x = _plus_dwconv(self.dwconv, x)  # x + dwconv(x)
        return self.drop2(self.fc2(x))


class RetBlock(nn.Module):
    """x += DWConv3x3(x); x += MaSA(LN(x)); x += FFN(LN(x)); NHWC in and out."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 3.0, decomposed: bool = False,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 layer_scale: Optional[float] = None, act_layer: type[nn.Module] = nn.GELU,
                 norm_layer: type[nn.Module] = partial(nn.LayerNorm, eps=1e-6)):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = norm_layer(dim)
        self.attn = ManhattanSelfAttention(dim, num_heads, decomposed, attn_drop=attn_drop, proj_drop=proj_drop)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = ConvFFN(dim, int(dim * mlp_ratio), act_layer, proj_drop)
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, rel_pos: Tuple[torch.Tensor, ...]) -> torch.Tensor:
        x = _plus_dwconv(self.pos_embed, x)  # x + pos_embed(x)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), rel_pos)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class ConvStem(nn.Module):
    """3x3 s2 -> 3x3 -> 3x3 s2 -> 3x3 convs with BN (GELU between): NCHW image in, NHWC tokens at 1/4 out."""

    def __init__(self, in_chans: int = 3, embed_dim: int = 64, act_layer: type[nn.Module] = nn.GELU):
        super().__init__()
        half = embed_dim // 2
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, half, 3, 2, 1), nn.BatchNorm2d(half), act_layer(),
            nn.Conv2d(half, half, 3, 1, 1), nn.BatchNorm2d(half), act_layer(),
            nn.Conv2d(half, embed_dim, 3, 2, 1), nn.BatchNorm2d(embed_dim), act_layer(),
            nn.Conv2d(embed_dim, embed_dim, 3, 1, 1), nn.BatchNorm2d(embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # channels-last: oneDNN's dense 3x3 convs run about twice as fast on it on CPU as on NCHW, and the NHWC
        # tokens come out contiguous (the permute is a view)
        return self.proj(x.contiguous(memory_format=torch.channels_last)).permute(0, 2, 3, 1)


class Downsample(nn.Module):
    """3x3 stride-2 conv + BN, NHWC in and out."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.reduction = nn.Conv2d(dim, out_dim, 3, 2, 1)
        self.norm = nn.BatchNorm2d(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)


class RMTStage(nn.Module):
    """Optional downsampler, then blocks sharing one set of decay masks and rotary angles for the stage's grid."""

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, init_value: float, heads_range: float,
                 decomposed: bool, downsample: bool, drop_path: Sequence[float], **block_kwargs):
        super().__init__()
        self.num_heads, self.init_value, self.heads_range = num_heads, init_value, heads_range
        self.head_dim = dim // num_heads
        self.decomposed = decomposed
        self.downsample = Downsample(in_dim, dim) if downsample else nn.Identity()
        self.blocks = nn.ModuleList([
            RetBlock(dim, num_heads, decomposed=decomposed, drop_path=drop_path[i], **block_kwargs)
            for i in range(depth)])

    def rel_pos(self, height: int, width: int, device, dtype) -> Tuple[torch.Tensor, ...]:
        log_gamma = decay_rates(self.num_heads, self.init_value, self.heads_range, device)
        sin, cos = rotary_sin_cos(height, width, self.head_dim, device)
        if self.decomposed:
            masks = (axis_decay_mask(height, log_gamma).to(dtype), axis_decay_mask(width, log_gamma).to(dtype))
        else:
            masks = manhattan_decay_mask(height, width, log_gamma).to(dtype)
        return sin.to(dtype), cos.to(dtype), masks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)  # (B, H, W, C)
        rel_pos = self.rel_pos(x.shape[1], x.shape[2], x.device, x.dtype)
        for block in self.blocks:
            x = block(x, rel_pos)
        return x


class RMT(LinearHeadMixin, nn.Module):
    """RMT classifier: conv stem, four MaSA stages, then Linear -> BN -> Swish per position, pool, classifier."""

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            embed_dims: Sequence[int] = (64, 128, 256, 512),
            depths: Sequence[int] = (2, 2, 8, 2),
            num_heads: Sequence[int] = (4, 4, 8, 16),
            init_values: Sequence[float] = (2, 2, 2, 2),
            heads_ranges: Sequence[float] = (4, 4, 6, 6),
            mlp_ratios: Sequence[float] = (3, 3, 3, 3),
            decomposed: Sequence[bool] = (True, True, False, False),
            layer_scales: Sequence[Optional[float]] = (None, None, None, None),
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
        per_stage = (embed_dims, depths, num_heads, init_values, heads_ranges, mlp_ratios, decomposed, layer_scales)
        if len({len(s) for s in per_stage}) != 1:
            raise ValueError("embed_dims, depths, num_heads, init_values, heads_ranges, mlp_ratios, decomposed and "
                             f"layer_scales need one entry per stage, got lengths {[len(s) for s in per_stage]}")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.output_fmt = "NCHW"
        self.patch_embed = ConvStem(in_chans, embed_dims[0], act_layer)
        dpr = [x.tolist() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))]
        stages, self.feature_info = [], []
        for i in range(len(depths)):
            stages.append(RMTStage(
                embed_dims[max(i - 1, 0)], embed_dims[i], depths[i], num_heads[i], init_values[i], heads_ranges[i],
                decomposed[i], downsample=i > 0, drop_path=dpr[i], mlp_ratio=mlp_ratios[i],
                proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, layer_scale=layer_scales[i],
                act_layer=act_layer, norm_layer=norm_layer))
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


    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs at `indices` (last n if int, all if None). RMT has no final norm before its head: `norm`
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

_BLOCK_RENAMES = (("pos.conv.", "pos_embed."), ("retention_layer_norm.", "norm1."), ("final_layer_norm.", "norm2."),
                  ("retention.lepe.conv.", "attn.lepe."), ("retention.out_proj.", "attn.proj."),
                  ("ffn.dwconv.conv.", "mlp.dwconv."), ("ffn.", "mlp."), ("gamma_1", "ls1.gamma"),
                  ("gamma_2", "ls2.gamma"))


def checkpoint_filter_fn(state_dict: dict, model: RMT) -> dict:
    """Official RMT state dict (`layers.i`, `retention.{q,k,v}_proj`, `Relpos` buffers) -> vitlab's layout.

    Identity on a state dict already in vitlab's layout. Accepts the official file's {"model": ...} wrapper.
    """
    state_dict = state_dict.get("model", state_dict.get("state_dict", state_dict))
    if not any(k.startswith("layers.") for k in state_dict):
        return state_dict
    out, qkv = {}, {}
    for key, value in state_dict.items():
        if not key.startswith("layers."):
            out[key] = value  # patch_embed, proj, norm, head: same names
            continue
        _, layer, rest = key.split(".", 2)
        layer = int(layer)
        if rest.startswith("Relpos."):
            continue  # decay rates and rotary angles: recomputed from the config
        if rest.startswith("downsample."):  # official layer i ends with the downsampler that starts stage i+1
            out[f"stages.{layer + 1}.{rest}"] = value
            continue
        _, block, rest = rest.split(".", 2)  # blocks.j.<...>
        prefix = f"stages.{layer}.blocks.{block}."
        if rest.startswith("retention.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
            _, which, param = rest.split(".")
            qkv.setdefault(prefix + "attn.qkv." + param, {})[which] = value
            continue
        for old, new in _BLOCK_RENAMES:
            if rest.startswith(old):
                rest = new + rest[len(old):]
                break
        if rest.endswith("gamma"):
            value = value.reshape(-1)  # official (1, 1, 1, C)
        out[prefix + rest] = value
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
    return out


# --- registry ---------------------------------------------------------------------------------------------

def _cfg(**kwargs) -> dict:
    return imagenet_cfg(**{"pool_size": (7, 7), "crop_pct": 0.9, "first_conv": "patch_embed.proj.0",
                           "license": "unknown", "paper_ids": "arXiv:2309.11523", **kwargs})


default_cfgs = generate_default_cfgs({
    "vl_rmt_tiny": _cfg(),
    "vl_rmt_small": _cfg(),
    "vl_rmt_base": _cfg(),
    "vl_rmt_large": _cfg(),
    "vl_test_rmt": _cfg(input_size=(3, 64, 64), pool_size=(2, 2), num_classes=10),
})


def _create_rmt(variant: str, pretrained: bool = False, **kwargs) -> RMT:
    return build_vitlab_model(RMT, variant, pretrained, filter_fn=checkpoint_filter_fn,
                              default_out_indices=tuple(range(len(kwargs.get("depths", (2, 2, 8, 2))))), **kwargs)


@register_model
def vl_rmt_tiny(pretrained: bool = False, **kwargs) -> RMT:
    """RMT-T (`RMT_T3`): 14,334,216 params, 2.64 GMACs at 224 (README 14M / 2.5G), 82.4% top-1 (IN-1k)."""
    arch = dict(embed_dims=(64, 128, 256, 512), depths=(2, 2, 8, 2), num_heads=(4, 4, 8, 16),
                heads_ranges=(4, 4, 6, 6), mlp_ratios=(3, 3, 3, 3), decomposed=(True, True, False, False))
    return _create_rmt("vl_rmt_tiny", pretrained, **dict(arch, **kwargs))


@register_model
def vl_rmt_small(pretrained: bool = False, **kwargs) -> RMT:
    """RMT-S (`RMT_S`): 26,967,240 params, 4.78 GMACs at 224 (README 27M / 4.5G), 84.1% top-1 (IN-1k)."""
    arch = dict(embed_dims=(64, 128, 256, 512), depths=(3, 4, 18, 4), num_heads=(4, 4, 8, 16),
                heads_ranges=(4, 4, 6, 6), mlp_ratios=(4, 4, 3, 3), decomposed=(True, True, True, False))
    return _create_rmt("vl_rmt_small", pretrained, **dict(arch, **kwargs))


@register_model
def vl_rmt_base(pretrained: bool = False, **kwargs) -> RMT:
    """RMT-B (`RMT_M2`): 54,154,896 params (README 54M / 9.7G), 85.0% top-1 (IN-1k)."""
    arch = dict(embed_dims=(80, 160, 320, 512), depths=(4, 8, 25, 8), num_heads=(5, 5, 10, 16),
                heads_ranges=(5, 5, 6, 6), mlp_ratios=(4, 4, 3, 3), decomposed=(True, True, True, False),
                layer_scales=(None, None, 1e-6, 1e-6))
    return _create_rmt("vl_rmt_base", pretrained, **dict(arch, **kwargs))


@register_model
def vl_rmt_large(pretrained: bool = False, **kwargs) -> RMT:
    """RMT-L (`RMT_L6`): 95,464,864 params (README 95M / 18.2G), 85.5% top-1 (IN-1k)."""
    arch = dict(embed_dims=(112, 224, 448, 640), depths=(4, 8, 25, 8), num_heads=(7, 7, 14, 20),
                heads_ranges=(6, 6, 6, 6), mlp_ratios=(4, 4, 3, 3), decomposed=(True, True, True, False),
                layer_scales=(None, None, 1e-6, 1e-6))
    return _create_rmt("vl_rmt_large", pretrained, **dict(arch, **kwargs))


@register_model
def vl_test_rmt(pretrained: bool = False, **kwargs) -> RMT:
    """Tiny RMT for tests: widths 32-64, one block per stage (2 decomposed, 2 full), 64-d head projection, 64 px."""
    arch = dict(embed_dims=(32, 32, 64, 64), depths=(1, 1, 1, 1), num_heads=(2, 2, 4, 4), mlp_ratios=(2, 2, 2, 2),
                head_hidden_size=64, num_classes=10)
    return _create_rmt("vl_test_rmt", pretrained, **dict(arch, **kwargs))
