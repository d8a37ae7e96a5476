"""FaViT: Factorization Vision Transformer (Qin, Zhou, Xu, Bian, Li, "Factorization Vision Transformer: Modeling
Long Range Dependency with Local Window Cost", IEEE TNNLS 2023, arXiv:2312.08614).

A four-stage PVT-v2-like backbone (overlapping patch embeddings 7x7/4 then 3x3/2 with LayerNorm; pre-norm blocks whose
MLP has a depthwise 3x3 conv; a LayerNorm closing every stage; mean pool; linear head) whose token mixer is
factorization self-attention (FaSA). FaSA splits the channels into groups (C/16 * (2, 7, 7) when the stage's
`sr_ratio` > 1, C/8 * (1, 7) when it is 1), all queries coming from one `q` Linear:

* a global group (one head): keys/values from the grid shrunk `sr_ratio` times by a strided conv + LayerNorm, as in
  PVT's spatial-reduction attention;
* one group per dilation rate (1, and `sr_ratio` when > 1), `num_heads` heads each: keys/values come from the map
  after a depthwise 3x3 + pointwise conv; the map is cut into K x K windows (K = `window_size` = 7) whose taps are
  `dilation` apart (windows tile the map, reflect-padded at the bottom / right), the windows are averaged into one
  K x K set of tokens, which a Linear then a Linear to (k, v) turn into K^2 keys and values shared by every query.

Each group's values get a depthwise 3x3 conv added (on the shrunk grid / the K x K window); the group outputs are
concatenated and projected. Every query thus attends to K^2 keys per local group and to (H / sr) x (W / sr) keys in
the global group, which at 224 px is also 7 x 7 in every stage: the attention matmuls cost exactly what K x K window
attention costs (2 * H * W * K^2 * C MACs), while each output depends on every token of the map. Counted whole, a FaSA
layer costs 0.78-0.87x timm's Swin `WindowAttention` (7 x 7) on B0's four stages at 224 (its q and proj against
Swin's qkv and proj, plus the key/value convs); at twice the resolution the global group's grid is 14 x 14 and the
first stage's layer costs 1.03x.

Official code: github.com/q2479036243/FaViT, `FaViT/classification/favit.py` (`favit_b0` .. `favit_b3`), commit
529b46be9a737537bff2e6f1a00e0455fc0ae802. No weights are published (README: "weights:" with no link).

| variant | params (1000 classes) | MACs at 224 counted here | README (params / "FLOPs") | top-1 (IN-1k) |
|---|---|---|---|---|
| FaViT-B0 (`vl_favit_b0`) | 3,427,704 | 0.632G | 3.4M / 0.6G | 71.5% |
| FaViT-B1 (`vl_favit_b1`) | 12,958,568 | 2.344G | 13M / 2.4G | 79.4% |
| FaViT-B2 (`vl_favit_b2`) | 24,919,896 | 4.458G | 24M / 4.5G | 82.3% |
| FaViT-B3 (`vl_favit_b3`) | 48,746,440 | 8.512G | 48M / 8.5G | 83.4% |

The parameter counts equal the official constructors'. MACs are `vitlab.profiling.count_flops` (matmuls and convs,
attention included); the official `get_flops.py` adds the same attention formula to mmcv's count, which also counts
norms, activations and pooling; these counts are within 5.4% of the README's rounded figures (B0 +5.4%, B1 -2.3%,
B2 -0.9%, B3 +0.1%).

Differences from the official file, none of which changes the function where the official code runs:
* module names: timm's PVT v2 layout (`patch_embed`, `stages.i.downsample` / `.blocks.j` / `.norm`; official
  `patch_embed{i}`, `block{i}`, `norm{i}`) and in the attention `global_kv`, `global_lepe`, `local_kv.{0,1}`,
  `groups.i.{fc,kv,lepe}` (official `kv_g`, `local_conv_g`, `kv_l.{depth,point}_conv`, `fcs.i`, `single_heads.i`,
  `local_convs.i`); `checkpoint_filter_fn` renames;
* the bottom / right padding that makes the map a whole number of windows mirrors periodically (`mirror_pad`), which
  equals the official `nn.ReflectionPad2d` wherever that is defined (padding smaller than the map) and also serves
  maps smaller than the padding (inputs below 224 px: the official code fails there);
* attention is `F.scaled_dot_product_attention` (official: explicit matmul + softmax, same scale);
* `drop_path_rate` defaults to 0 (official training: 0.1).
Kept although odd: the official "averaging" of the windows is `nn.AdaptiveAvgPool2d` over the window-major flattening
(window, channel) of each tap, i.e. the mean of runs of L (number of windows) consecutive entries, which for L > 1
mixes channels of neighbouring windows rather than averaging each channel over the windows (`pool_windows`); trained
weights depend on it.

Checked against (tests/models/test_zoo_favit.py): the official `favit.py` run locally on a tiny configuration (several
windows per dilated group, a non-square 128 x 160 input), committed as a fixture in the official key layout and loaded
through `checkpoint_filter_fn` (logits within 1e-4); exact parameter counts of the four official constructors; MACs at
224; the attention MACs of FaSA equal to those of timm's Swin `WindowAttention` with the same window at every B0
stage at 224 (`count_flops`), and the global group's excess above 224; the padding, window sampling and pooling against
their official formulations; every output depending on every input token.
"""
from functools import partial
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint
from timm.models.pvt_v2 import MlpWithDepthwiseConv, OverlapPatchEmbed

from ._builder import build_vitlab_model, imagenet_cfg
from ._staged import LinearHeadMixin

__all__ = ["FaViT", "FactorizationAttention", "FaViTBlock", "group_dims", "mirror_pad", "dilated_windows",
           "pool_windows", "checkpoint_filter_fn", "vl_favit_b0", "vl_favit_b1", "vl_favit_b2", "vl_favit_b3",
           "vl_test_favit"]


# --- the math: pure tensor functions ----------------------------------------------------------------------

def group_dims(dim: int, sr_ratio: int) -> Tuple[int, ...]:
    """Channels of the (global, dilation 1[, dilation sr_ratio]) groups: dim/16 * (2, 7, 7), or dim/8 * (1, 7)."""
    weights = (2, 7, 7) if sr_ratio > 1 else (1, 7)
    if dim % sum(weights):
        raise ValueError(f"FaSA splits dim into {sum(weights)} parts (sr_ratio={sr_ratio}); dim {dim} does not divide")
    return tuple(dim // sum(weights) * w for w in weights)


def _mirror_index(size: int, length: int, device: torch.device) -> torch.Tensor:
    """Source index of each of `length` positions of a map of `size` extended by mirroring about its last row."""
    index = torch.arange(length, device=device)
    if size == 1:
        return torch.zeros_like(index)
    period = 2 * (size - 1)
    index = index % period
    return torch.where(index < size, index, period - index)


def mirror_pad(x: torch.Tensor, pad_bottom: int, pad_right: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H + pad_bottom, W + pad_right), mirrored about the last row / column, periodically.

    Equal to `F.pad(x, (0, pad_right, 0, pad_bottom), mode="reflect")` where that is defined (pads < H, W).
    """
    H, W = x.shape[-2:]
    x = x.index_select(-2, _mirror_index(H, H + pad_bottom, x.device))
    return x.index_select(-1, _mirror_index(W, W + pad_right, x.device))


def dilated_windows(x: torch.Tensor, window: int, dilation: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, K*K, L): the K x K taps (`dilation` apart) of the L windows that tile the padded map.

    Windows span s = dilation * (K - 1) + 1 pixels and start every s pixels, so they do not overlap.
    """
    B, C, H, W = x.shape
    span = dilation * (window - 1) + 1
    x = mirror_pad(x, -H % span, -W % span)
    taps = F.unfold(x, window, dilation=dilation, stride=span)  # (B, C*K*K, L), channel-major
    return taps.view(B, C, window * window, -1)


def pool_windows(taps: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, C, K*K, L) -> (B, heads, K*K, C/heads): the official window "average".

    The official code flattens each tap's (window, channel) pairs window-major and adaptive-average-pools that
    length-L*d row to d values: value j is the mean of entries j*L .. (j+1)*L - 1, i.e. of the row read as (d, L).
    """
    B, C, T, L = taps.shape
    d = C // num_heads
    rows = taps.view(B, num_heads, d, T, L).permute(0, 1, 3, 4, 2)  # (B, h, K*K, L, d)
    return rows.reshape(B, num_heads, T, d, L).mean(-1)  # (B, h, K*K, d)


def _dwconv(channels: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, 3, padding=1, groups=channels)


# --- modules ----------------------------------------------------------------------------------------------

class DilatedGroup(nn.Module):
    """Keys and values of one dilation rate: K*K tokens pooled over the dilated windows, shared by all queries."""

    def __init__(self, dim: int, num_heads: int, window_size: int, dilation: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"a FaSA group of {dim} channels does not split into {num_heads} heads")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.window_size, self.dilation = window_size, dilation
        self.fc = nn.Linear(self.head_dim, self.head_dim, bias=qkv_bias)
        self.kv = nn.Linear(self.head_dim, 2 * self.head_dim, bias=qkv_bias)
        self.lepe = _dwconv(dim)

    def forward(self, kv_map: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """kv_map (B, C, H, W) -> k, v (B, heads, K*K, d)."""
        B, C = kv_map.shape[:2]
        K = self.window_size
        tokens = pool_windows(dilated_windows(kv_map, K, self.dilation), self.num_heads)  # (B, h, K*K, d)
        k, v = self.kv(self.fc(tokens)).chunk(2, dim=-1)  # (B, h, K*K, d) each
        v_map = v.transpose(2, 3).reshape(B, C, K, K)  # channel = head * d + i
        return k, v + self.lepe(v_map).view(B, self.num_heads, self.head_dim, K * K).transpose(2, 3)


class FactorizationAttention(nn.Module):
    """FaSA on (B, N, C) tokens of an H x W grid: a spatial-reduction global group plus dilated window groups."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, window_size: int = 7, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, inner_norm_eps: float = 1e-5):
        super().__init__()
        global_dim, *local_dims = group_dims(dim, sr_ratio)
        self.num_heads, self.sr_ratio, self.window_size = num_heads, sr_ratio, window_size
        self.global_dim, self.local_dims = global_dim, tuple(local_dims)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.sr = nn.Conv2d(global_dim, global_dim, sr_ratio, stride=sr_ratio)
        self.norm = nn.LayerNorm(global_dim, eps=inner_norm_eps)
        self.global_kv = nn.Linear(global_dim, 2 * global_dim, bias=qkv_bias)
        self.global_lepe = _dwconv(global_dim)
        local_dim = dim - global_dim
        self.local_kv = nn.Sequential(_dwconv(local_dim), nn.Conv2d(local_dim, local_dim, 1))
        dilations = (1, sr_ratio)[:len(local_dims)]
        self.groups = nn.ModuleList(DilatedGroup(c, num_heads, window_size, r, qkv_bias)
                                    for c, r in zip(local_dims, dilations))
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _global_kv(self, x: torch.Tensor, hw: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """x (B, N, C_g) -> k, v (B, 1, N_g, C_g) from the grid shrunk sr_ratio times."""
        B, _, C = x.shape
        H, W = hw
        if H < self.sr_ratio or W < self.sr_ratio:
            raise ValueError(f"a {H} x {W} token grid is smaller than the FaSA spatial reduction {self.sr_ratio}: "
                             "feed a larger input")
        x = self.sr(x.transpose(1, 2).reshape(B, C, H, W))  # (B, C_g, H/sr, W/sr)
        h, w = x.shape[-2:]
        k, v = self.global_kv(self.norm(x.flatten(2).transpose(1, 2))).unsqueeze(1).chunk(2, dim=-1)  # (B,1,N_g,C_g)
        v_map = v.transpose(2, 3).reshape(B, C, h, w)  # (B, C_g, H/sr, W/sr)
        return k, v + self.global_lepe(v_map).view(B, 1, C, h * w).transpose(2, 3)

    def forward(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        H, W = feat_size
        h, cg = self.num_heads, self.global_dim
        drop = self.attn_drop if self.training else 0.0
        q = self.q(x)  # (B, N, C)
        k, v = self._global_kv(x[..., :cg], feat_size)  # (B, 1, N_g, C_g)
        outs = [F.scaled_dot_product_attention(q[:, None, :, :cg], k, v, dropout_p=drop).squeeze(1)]  # (B, N, C_g)
        # the local groups split each head's query channels, and the key/value map's channels, in the same ratio
        q_local = q[..., cg:].view(B, N, h, -1).split([c // h for c in self.local_dims], dim=-1)  # (B, N, h, d_i)
        kv_map = self.local_kv(x[..., cg:].transpose(1, 2).reshape(B, C - cg, H, W))  # (B, C_l, H, W)
        for group, q_i, kv_i in zip(self.groups, q_local, kv_map.split(self.local_dims, dim=1)):
            k, v = group(kv_i)  # (B, h, K*K, d_i)
            out = F.scaled_dot_product_attention(q_i.transpose(1, 2), k, v, dropout_p=drop)  # (B, h, N, d_i)
            outs.append(out.transpose(1, 2).reshape(B, N, -1))
        return self.proj_drop(self.proj(torch.cat(outs, dim=-1)))


class FaViTBlock(nn.Module):
    """x += FaSA(LN(x)); x += MLP-with-depthwise-conv(LN(x)), on (B, N, C) tokens of an H x W grid."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, sr_ratio: int = 1, window_size: int = 7,
                 qkv_bias: bool = True, proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 act_layer: type[nn.Module] = nn.GELU, norm_layer: type[nn.Module] = partial(nn.LayerNorm, eps=1e-6)):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = FactorizationAttention(dim, num_heads, sr_ratio, window_size, qkv_bias, attn_drop, proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = MlpWithDepthwiseConv(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), feat_size))
        return x + self.drop_path2(self.mlp(self.norm2(x), feat_size))


class FaViTStage(nn.Module):
    """Optional overlapping patch embedding (3x3, stride 2), blocks, LayerNorm: NHWC or NCHW in, NCHW out."""

    def __init__(self, in_dim: int, dim: int, depth: int, downsample: bool, drop_path: Sequence[float],
                 norm_layer: type[nn.Module], **block_kwargs):
        super().__init__()
        self.downsample = OverlapPatchEmbed(3, 2, in_dim, dim) if downsample else None
        self.blocks = nn.ModuleList(FaViTBlock(dim, drop_path=drop_path[i], norm_layer=norm_layer, **block_kwargs)
                                    for i in range(depth))
        self.norm = norm_layer(dim)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)  # (B, C, H, W) -> (B, H, W, C)
        B, H, W, C = x.shape
        x = x.reshape(B, H * W, C)
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, (H, W))
            else:
                x = block(x, (H, W))
        return self.norm(x).view(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W), channels-last strides


class FaViT(LinearHeadMixin, nn.Module):
    """FaViT classifier: overlapping patch embedding, four FaSA stages (each closed by a LayerNorm), mean pool, head."""

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            embed_dims: Sequence[int] = (32, 64, 128, 256),
            depths: Sequence[int] = (2, 2, 6, 2),
            num_heads: Sequence[int] = (1, 2, 4, 8),
            mlp_ratios: Sequence[float] = (8, 6, 4, 4),
            sr_ratios: Sequence[int] = (8, 4, 2, 1),
            window_size: int = 7,
            qkv_bias: bool = True,
            drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            act_layer: type[nn.Module] = nn.GELU,
            norm_layer: type[nn.Module] = partial(nn.LayerNorm, eps=1e-6),
    ):
        super().__init__()
        per_stage = (embed_dims, depths, num_heads, mlp_ratios, sr_ratios)
        if len({len(s) for s in per_stage}) != 1:
            raise ValueError("embed_dims, depths, num_heads, mlp_ratios and sr_ratios need one entry per stage, got "
                             f"lengths {[len(s) for s in per_stage]}")
        self._check_pool(global_pool)
        self.num_classes, self.in_chans, self.global_pool = num_classes, in_chans, global_pool
        self.patch_embed = OverlapPatchEmbed(7, 4, in_chans, embed_dims[0])
        dpr = [x.tolist() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))]
        stages, self.feature_info = [], []
        for i in range(len(depths)):
            stages.append(FaViTStage(
                embed_dims[max(i - 1, 0)], embed_dims[i], depths[i], downsample=i > 0, drop_path=dpr[i],
                norm_layer=norm_layer, num_heads=num_heads[i], mlp_ratio=mlp_ratios[i], sr_ratio=sr_ratios[i],
                window_size=window_size, qkv_bias=qkv_bias, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
                act_layer=act_layer))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=4 * 2 ** i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """The official init: trunc-normal Linears, unit LayerNorms, convs N(0, 2 / fan_out), zero biases."""
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^patch_embed", blocks=r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None),
            (r"^stages\.(\d+)\.norm", (99999,))])

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
        """Stage outputs at `indices` (last n if int, all if None), each after its stage's LayerNorm (so `norm`
        changes nothing: every stage ends normalized, as in the official model)."""
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
        if max_index < len(self.stages) - 1:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            prune_head = True  # the head was sized for the last stage
        self.stages = self.stages[:max_index + 1]
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.patch_embed(x))  # (B, C, H/32, W/32)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean((2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# --- converter --------------------------------------------------------------------------------------------

_ATTN_RENAMES = (("attn.kv_g.", "attn.global_kv."), ("attn.local_conv_g.", "attn.global_lepe."),
                 ("attn.kv_l.depth_conv.", "attn.local_kv.0."), ("attn.kv_l.point_conv.", "attn.local_kv.1."),
                 ("attn.fcs.", "attn.groups.{}.fc."), ("attn.single_heads.", "attn.groups.{}.kv."),
                 ("attn.local_convs.", "attn.groups.{}.lepe."), ("mlp.dwconv.dwconv.", "mlp.dwconv."))


def _rename_block_key(rest: str) -> str:
    for old, new in _ATTN_RENAMES:
        if rest.startswith(old):
            tail = rest[len(old):]
            if "{}" in new:  # official ModuleList index first: fcs.<i>.weight -> groups.<i>.fc.weight
                index, tail = tail.split(".", 1)
                new = new.format(index)
            return new + tail
    return rest


def checkpoint_filter_fn(state_dict: dict, model: FaViT) -> dict:
    """Official FaViT state dict (`patch_embed{i}`, `block{i}.{j}`, `norm{i}`, `kv_g`, `fcs`, ...) -> vitlab's layout.

    Identity on a state dict already in vitlab's layout. Accepts the official file's {"model": ...} wrapper.
    """
    state_dict = state_dict.get("model", state_dict.get("state_dict", state_dict))
    if not any(k.removeprefix("module.").startswith(("patch_embed1.", "block1.")) for k in state_dict):
        return state_dict
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        head, _, rest = key.partition(".")
        if head == "patch_embed1":
            key = f"patch_embed.{rest}"
        elif head.startswith("patch_embed"):
            key = f"stages.{int(head[len('patch_embed'):]) - 1}.downsample.{rest}"
        elif head.startswith("block"):
            block, rest = rest.split(".", 1)
            key = f"stages.{int(head[len('block'):]) - 1}.blocks.{block}.{_rename_block_key(rest)}"
        elif head.startswith("norm"):
            key = f"stages.{int(head[len('norm'):]) - 1}.norm.{rest}"
        out[key] = value
    return out


# --- registry ---------------------------------------------------------------------------------------------

def _cfg(**kwargs) -> dict:
    return imagenet_cfg(**{"pool_size": (7, 7), "first_conv": "patch_embed.proj", "license": "unknown",
                           "paper_ids": "arXiv:2312.08614", **kwargs})


default_cfgs = generate_default_cfgs({
    "vl_favit_b0": _cfg(),
    "vl_favit_b1": _cfg(),
    "vl_favit_b2": _cfg(),
    "vl_favit_b3": _cfg(),
    "vl_test_favit": _cfg(input_size=(3, 64, 64), pool_size=(2, 2), num_classes=10),
})


def _create_favit(variant: str, pretrained: bool = False, **kwargs) -> FaViT:
    return build_vitlab_model(FaViT, variant, pretrained, filter_fn=checkpoint_filter_fn,
                              default_out_indices=tuple(range(len(kwargs.get("depths", (2, 2, 6, 2))))),
                              exclude=("act_layer", "norm_layer"), **kwargs)


@register_model
def vl_favit_b0(pretrained: bool = False, **kwargs) -> FaViT:
    """FaViT-B0 (`favit_b0`): 3,427,704 params, 0.63 GMACs at 224 (README 3.4M / 0.6G), 71.5% top-1 (IN-1k)."""
    arch = dict(embed_dims=(32, 64, 128, 256), depths=(2, 2, 6, 2))
    return _create_favit("vl_favit_b0", pretrained, **dict(arch, **kwargs))


@register_model
def vl_favit_b1(pretrained: bool = False, **kwargs) -> FaViT:
    """FaViT-B1 (`favit_b1`): 12,958,568 params, 2.34 GMACs at 224 (README 13M / 2.4G), 79.4% top-1 (IN-1k)."""
    arch = dict(embed_dims=(64, 128, 256, 512), depths=(2, 2, 6, 2))
    return _create_favit("vl_favit_b1", pretrained, **dict(arch, **kwargs))


@register_model
def vl_favit_b2(pretrained: bool = False, **kwargs) -> FaViT:
    """FaViT-B2 (`favit_b2`): 24,919,896 params, 4.46 GMACs at 224 (README 24M / 4.5G), 82.3% top-1 (IN-1k)."""
    arch = dict(embed_dims=(64, 128, 256, 512), depths=(2, 3, 18, 3))
    return _create_favit("vl_favit_b2", pretrained, **dict(arch, **kwargs))


@register_model
def vl_favit_b3(pretrained: bool = False, **kwargs) -> FaViT:
    """FaViT-B3 (`favit_b3`): 48,746,440 params, 8.51 GMACs at 224 (README 48M / 8.5G), 83.4% top-1 (IN-1k)."""
    arch = dict(embed_dims=(96, 192, 384, 768), depths=(2, 3, 14, 3))
    return _create_favit("vl_favit_b3", pretrained, **dict(arch, **kwargs))


@register_model
def vl_test_favit(pretrained: bool = False, **kwargs) -> FaViT:
    """Tiny FaViT for tests: widths 32-64, one block per stage, 3 x 3 windows (several per map at 64 px)."""
    arch = dict(embed_dims=(32, 32, 64, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 4), mlp_ratios=(2, 2, 2, 2),
                window_size=3, num_classes=10)
    return _create_favit("vl_test_favit", pretrained, **dict(arch, **kwargs))
