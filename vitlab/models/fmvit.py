"""FMViT: A multiple-frequency mixing Vision Transformer (Tan, Geng, Xie; arXiv:2311.05707, 2023).

A four-stage NCHW hybrid backbone, written from the abstract (no official code, no architecture table found):

* **CFB** (convolutional fusion block, stages 1-2 here): the high-frequency, local path. x += LocalMixer(x), a
  depthwise 3x3 conv -> BN -> ReLU -> 1x1 conv; then x += gMLP(x).
* **FMB** (frequency mixing block, stages 3-4 here): blends a high-frequency feature (the same LocalMixer) with a
  low-frequency one (RLMHSA, below) by concatenating the two on channels and fusing them with a 1x1 conv:
  x += Fuse([LocalMixer(x), RLMHSA(x)]); then x += gMLP(x).
* **RLMHSA** (lightweight multi-head self-attention): BN, then queries from every position and keys / values from
  the map average-pooled by `sr_ratio` (a low-pass of the map, which is also what makes it light: N x N/sr^2 logits),
  multi-head softmax attention (`F.scaled_dot_product_attention`), an output projection.
* **gMLP** (convolutional multi-group reparameterisation): BN -> fc1 -> GELU -> fc2 where each fc is, in training,
  a sum of parallel 1x1 convs with different group counts (`mlp_groups`, e.g. dense + 2 groups + 4 groups), each with
  its own BN. `reparameterize()` folds every branch's BN into its conv, expands the grouped weights to block-diagonal
  dense ones, sums them (and folds the MLP's input BN into fc1): at inference each fc is ONE dense 1x1 conv with the
  same function (tests: train form == fused form, atol 1e-5).

The stem is two 3x3 stride-2 conv-BN-ReLU (stride 4); stages 2-4 start with a 3x3 stride-2 conv + BN; the head is
BN, global average pool, Linear.

Official code: github.com/tany0699/FMViT, commit 40b6bbf (HEAD, "Update README.md"): a README saying "Code coming
soon" and a LICENSE, nothing else. Searched also: the code index for FMViT / RLMHSA / gMLP reparameterisation names
(no implementation), papers-with-code ("No code implementations yet"), ar5iv / arXiv / Hugging Face pages (only the
abstract is stored), blog posts (none).

What is NOT verified (the paper's body and tables were not readable here): the stage widths, depths, heads,
pooling ratios, MLP ratio, the group counts of gMLP, where FMBs sit in the network, and RLMHSA's exact form (the "R"
may reparameterise its projections too; here q, kv and proj are plain Linears). The four variants below are vitlab
configurations sized by analogy with Next-ViT, NOT the paper's FMViT-T/S/B/L; their counts are this file's own,
asserted exactly by the tests as a regression, and no published parameter or MAC figure is claimed for them.
Published top-1 (abstract): 83.3% for the FMViT compared with ResNet101 on TensorRT, 78.5% for the one compared with
MobileOne on CoreML (variants not named in the abstract).

| variant (vitlab config, unverified) | params (1000 classes): training form | fused | MACs at 224: training / fused |
|---|---|---|---|
| `vl_fmvit_tiny`  | 10,663,168 | 8,188,480  | 1.45G / 1.06G |
| `vl_fmvit_small` | 21,057,544 | 16,078,600 | 2.98G / 2.17G |
| `vl_fmvit_base`  | 38,882,568 | 29,330,056 | 5.93G / 4.27G |
| `vl_fmvit_large` | 78,987,352 | 59,410,840 | 11.93G / 8.55G |

MACs are `vitlab.profiling.count_flops` on one 224 x 224 image (attention included). A reparameterised model is
for inference: its state dict has `reparam_conv` keys instead of the branches, so save the training form and call
`reparameterize()` after loading.

Checked (tests/models/test_zoo_fmvit.py): reparameterisation equivalence per layer, per block and for the whole model
(logits, atol 1e-5) and that it changes the parameter count as the fused layout says; a reparameterised model is
plain convs (no grouped 1x1 conv left); RLMHSA against an explicit softmax(q k^T / sqrt(d)) v over pooled keys; that
sr_ratio=1 attention is permutation-equivariant over positions and pooled attention is not; the local path's
receptive field (a 3x3 neighbourhood per CFB) against the FMB's global one; a few training steps on a synthetic
batch lower the loss and the trained model still fuses to the same logits.
"""
from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import adapt_input_conv

from ._builder import build_vitlab_model, imagenet_cfg
from ._staged import LinearHeadMixin

__all__ = ["FMViT", "RepGroupConv1x1", "GroupRepMlp", "LocalMixer", "LightweightAttention", "ConvFusionBlock",
           "FrequencyMixingBlock", "fold_bn", "grouped_to_dense", "checkpoint_filter_fn", "vl_fmvit_tiny",
           "vl_fmvit_small", "vl_fmvit_base", "vl_fmvit_large", "vl_test_fmvit"]


# --- the math: pure tensor functions ----------------------------------------------------------------------

def fold_bn(weight: torch.Tensor, bias: Optional[torch.Tensor],
            bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of conv-then-BN as one conv: BN(W x + b) = (s W) x + s (b - mean) + beta, s = gamma / std."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (out,)
    bias = torch.zeros_like(bn.running_mean) if bias is None else bias
    return weight * scale.reshape(-1, *([1] * (weight.ndim - 1))), (bias - bn.running_mean) * scale + bn.bias


def grouped_to_dense(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped conv weight (out, in / groups, k, k) as the dense (out, in, k, k) weight of the same conv: block
    diagonal, output group g reading only input group g."""
    out_chs, in_per_group = weight.shape[:2]
    dense = weight.new_zeros(out_chs, in_per_group * groups, *weight.shape[2:])
    out_per_group = out_chs // groups
    for g in range(groups):
        rows = slice(g * out_per_group, (g + 1) * out_per_group)
        dense[rows, g * in_per_group:(g + 1) * in_per_group] = weight[rows]
    return dense


def fold_input_bn(weight: torch.Tensor, bias: torch.Tensor, bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of BN-then-1x1-conv as one 1x1 conv: W (s x + t) + b = (W s) x + (W t + b)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (in,)
    shift = bn.bias - bn.running_mean * scale
    return weight * scale.reshape(1, -1, 1, 1), bias + weight.flatten(1) @ shift


# --- modules ----------------------------------------------------------------------------------------------

class RepGroupConv1x1(nn.Module):
    """gMLP's layer: sum over `groups` of BN(1x1 conv with that many groups) while training; one dense 1x1 conv
    (`reparam_conv`) after `reparameterize()`."""

    def __init__(self, in_chs: int, out_chs: int, groups: Sequence[int] = (1, 2, 4)):
        super().__init__()
        if any(in_chs % g or out_chs % g for g in groups):
            raise ValueError(f"every group count in {tuple(groups)} must divide {in_chs} and {out_chs}")
        self.in_chs, self.out_chs, self.groups = in_chs, out_chs, tuple(groups)
        self.branches = nn.ModuleList(
            nn.Sequential(OrderedDict(conv=nn.Conv2d(in_chs, out_chs, 1, groups=g, bias=False),
                                      bn=nn.BatchNorm2d(out_chs))) for g in self.groups)
        self.reparam_conv: Optional[nn.Conv2d] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out

    def fused_weight(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(weight (out, in, 1, 1), bias (out,)) of the one conv equal to the branches' sum (BN in eval mode)."""
        weight, bias = 0, 0
        for g, branch in zip(self.groups, self.branches):
            w, b = fold_bn(branch.conv.weight, None, branch.bn)
            weight, bias = weight + grouped_to_dense(w, g), bias + b
        return weight, bias

    @torch.no_grad()
    def reparameterize(self, input_bn: Optional[nn.BatchNorm2d] = None) -> None:
        """Replace the branches by one dense conv (also absorbing a BatchNorm applied to this layer's input)."""
        if self.reparam_conv is not None:
            return
        weight, bias = self.fused_weight()
        if input_bn is not None:
            weight, bias = fold_input_bn(weight, bias, input_bn)
        like = self.branches[0].conv.weight
        self.reparam_conv = nn.Conv2d(self.in_chs, self.out_chs, 1, device=like.device, dtype=like.dtype)
        self.reparam_conv.weight.copy_(weight)
        self.reparam_conv.bias.copy_(bias)
        del self.branches


class GroupRepMlp(nn.Module):
    """gMLP: BN -> fc1 -> GELU -> fc2 on NCHW maps, each fc a `RepGroupConv1x1`."""

    def __init__(self, dim: int, hidden_dim: int, groups: Sequence[int] = (1, 2, 4),
                 act_layer: type[nn.Module] = nn.GELU, drop: float = 0.0):
        super().__init__()
        self.norm = nn.BatchNorm2d(dim)
        self.fc1 = RepGroupConv1x1(dim, hidden_dim, groups)
        self.act = act_layer()
        self.drop = nn.Dropout(drop)
        self.fc2 = RepGroupConv1x1(hidden_dim, dim, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(self.norm(x))))))

    def reparameterize(self) -> None:
        if isinstance(self.norm, nn.BatchNorm2d):
            self.fc1.reparameterize(input_bn=self.norm)
            self.norm = nn.Identity()
        self.fc2.reparameterize()


class LocalMixer(nn.Module):
    """The high-frequency path: depthwise 3x3 conv -> BN -> ReLU -> 1x1 conv, NCHW."""

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=False)
        self.norm = nn.BatchNorm2d(dim)
        self.act = nn.ReLU()
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.norm(self.conv(x))))


class LightweightAttention(nn.Module):
    """RLMHSA: BN, queries at every position, keys / values from the map average-pooled by `sr_ratio`, softmax MHSA.

    Input and output (B, C, H, W).
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} does not split into {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.sr_ratio = sr_ratio
        self.norm = nn.BatchNorm2d(dim)
        self.pool = (nn.AvgPool2d(sr_ratio, sr_ratio, ceil_mode=True, count_include_pad=False) if sr_ratio > 1
                     else nn.Identity())
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        n, d = self.num_heads, self.head_dim
        x = self.norm(x)
        q = self.q(x.flatten(2).transpose(1, 2)).view(B, H * W, n, d).transpose(1, 2)  # (B, n, N, d)
        kv = self.kv(self.pool(x).flatten(2).transpose(1, 2))  # (B, M, 2 n d), M = pooled positions
        k, v = kv.view(B, -1, 2, n, d).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, n, M, d)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, H * W, n * d)))  # (B, N, C)
        return out.transpose(1, 2).reshape(B, -1, H, W)


class ConvFusionBlock(nn.Module):
    """CFB: x += LocalMixer(x); x += gMLP(x)."""

    def __init__(self, dim: int, mlp_ratio: float = 3.0, mlp_groups: Sequence[int] = (1, 2, 4),
                 proj_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.mixer = LocalMixer(dim)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.mlp = GroupRepMlp(dim, int(dim * mlp_ratio), mlp_groups, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.mixer(x))
        return x + self.drop_path2(self.mlp(x))


class FrequencyMixingBlock(nn.Module):
    """FMB: x += Fuse([LocalMixer(x) (high frequency), RLMHSA(x) (low frequency)]); x += gMLP(x)."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, mlp_ratio: float = 3.0,
                 mlp_groups: Sequence[int] = (1, 2, 4), qkv_bias: bool = True, proj_drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.local = LocalMixer(dim)
        self.attn = LightweightAttention(dim, num_heads, sr_ratio, qkv_bias, attn_drop, proj_drop)
        self.fuse = nn.Conv2d(2 * dim, dim, 1)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.mlp = GroupRepMlp(dim, int(dim * mlp_ratio), mlp_groups, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.fuse(torch.cat((self.local(x), self.attn(x)), dim=1)))
        return x + self.drop_path2(self.mlp(x))


def _conv_bn(in_chs: int, out_chs: int, stride: int, act: bool) -> nn.Sequential:
    layers = OrderedDict(conv=nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False), bn=nn.BatchNorm2d(out_chs))
    if act:
        layers["act"] = nn.ReLU()
    return nn.Sequential(layers)


class FMViTStage(nn.Module):
    """A 3x3 stride-2 conv + BN (Identity in stage 1, after the stem), then the blocks."""

    def __init__(self, downsample: nn.Module, blocks: List[nn.Module]):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class FMViT(LinearHeadMixin, nn.Module):
    """FMViT classifier: conv stem (stride 4), four stages of CFBs ("cfb") or FMBs ("fmb"), BN, pool, Linear."""

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            depths: Sequence[int] = (2, 2, 6, 2),
            embed_dims: Sequence[int] = (48, 96, 192, 384),
            block_types: Sequence[str] = ("cfb", "cfb", "fmb", "fmb"),
            head_dim: int = 32,
            sr_ratios: Sequence[int] = (8, 4, 2, 1),
            mlp_ratio: float = 3.0,
            mlp_groups: Sequence[int] = (1, 2, 4),
            qkv_bias: bool = True,
            drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if not len(depths) == len(embed_dims) == len(block_types) == len(sr_ratios):
            raise ValueError(f"depths {tuple(depths)}, embed_dims {tuple(embed_dims)}, block_types "
                             f"{tuple(block_types)} and sr_ratios {tuple(sr_ratios)} need one entry per stage")
        self._check_pool(global_pool)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.stem = nn.Sequential(_conv_bn(in_chans, embed_dims[0] // 2, 2, True),
                                  _conv_bn(embed_dims[0] // 2, embed_dims[0], 2, True))
        dpr = [x.tolist() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))]
        stages, self.feature_info = [], []
        for i, (depth, dim, kind, sr) in enumerate(zip(depths, embed_dims, block_types, sr_ratios)):
            if kind == "cfb":
                blocks = [ConvFusionBlock(dim, mlp_ratio, mlp_groups, proj_drop_rate, dpr[i][j]) for j in range(depth)]
            elif kind == "fmb":
                blocks = [FrequencyMixingBlock(dim, dim // head_dim, sr, mlp_ratio, mlp_groups, qkv_bias,
                                               proj_drop_rate, attn_drop_rate, dpr[i][j]) for j in range(depth)]
            else:
                raise ValueError(f"block_types entries must be 'cfb' or 'fmb', got {kind!r}")
            downsample = _conv_bn(embed_dims[i - 1], dim, 2, False) if i > 0 else nn.Identity()
            stages.append(FMViTStage(downsample, blocks))
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2 ** i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.norm = nn.BatchNorm2d(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def reparameterize(self) -> "FMViT":
        """Fuse every gMLP into plain 1x1 convs (inference form, same function in eval mode); returns self."""
        for module in self.modules():
            if isinstance(module, GroupRepMlp):
                module.reparameterize()
        return self

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None), (r"^norm", (99999,))])

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs at `indices` (last n if int, all if None); `norm` applies the final BN to stage 4's."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:max_index + 1]
        intermediates = []
        x = self.stem(x)
        for i, stage in enumerate(stages):
            x = stage(x)  # (B, C, H, W)
            if i in take_indices:
                y = self.norm(x) if norm and i == last else x
                intermediates.append(y.permute(0, 2, 3, 1) if output_fmt == "NHWC" else y)
        if intermediates_only:
            return intermediates
        if len(stages) - 1 == last:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        if prune_norm or max_index < len(self.stages) - 1:
            self.norm = nn.Identity()  # sized for the last stage only
        if max_index < len(self.stages) - 1:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            prune_head = True
        self.stages = self.stages[:max_index + 1]
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.stages(self.stem(x)))  # (B, C, H/32, W/32)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean((2, 3))
        else:
            x = x.permute(0, 2, 3, 1)  # unpooled: the head runs on every position, (B, H, W, C)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# --- converter --------------------------------------------------------------------------------------------

def checkpoint_filter_fn(state_dict: dict, model: FMViT) -> dict:
    """A saved FMViT state dict (bare, or under "model" / "state_dict") -> this model's.

    No official checkpoint layout exists (no code was released), so vitlab's layout is the only one: the identity,
    except that a stem conv saved for another number of input channels is adapted as timm's `adapt_input_conv` does
    (RGB summed for one channel, tiled and rescaled for more).
    """
    state_dict = state_dict.get("model", state_dict.get("state_dict", state_dict))
    out = dict(state_dict)
    key = "stem.0.conv.weight"
    in_chans = model.stem[0].conv.in_channels
    if key in out and out[key].shape[1] != in_chans:
        out[key] = adapt_input_conv(in_chans, out[key])
    return out


# --- registry ---------------------------------------------------------------------------------------------

def _cfg(**kwargs) -> dict:
    return imagenet_cfg(**{"pool_size": (7, 7), "first_conv": "stem.0.conv", "paper_ids": "arXiv:2311.05707",
                           **kwargs})


default_cfgs = generate_default_cfgs({
    "vl_fmvit_tiny": _cfg(),
    "vl_fmvit_small": _cfg(),
    "vl_fmvit_base": _cfg(),
    "vl_fmvit_large": _cfg(),
    "vl_test_fmvit": _cfg(input_size=(3, 64, 64), pool_size=(2, 2), num_classes=10),
})


def _create_fmvit(variant: str, pretrained: bool = False, **kwargs) -> FMViT:
    return build_vitlab_model(FMViT, variant, pretrained, filter_fn=checkpoint_filter_fn,
                              default_out_indices=tuple(range(len(kwargs.get("depths", (2, 2, 6, 2))))), **kwargs)


@register_model
def vl_fmvit_tiny(pretrained: bool = False, **kwargs) -> FMViT:
    """FMViT "tiny" (vitlab config, not the paper's table): 10,663,168 params (8,188,480 fused), 1.45 GMACs."""
    arch = dict(depths=(2, 2, 6, 2), embed_dims=(48, 96, 192, 384), head_dim=32, mlp_ratio=3.0)
    return _create_fmvit("vl_fmvit_tiny", pretrained, **dict(arch, **kwargs))


@register_model
def vl_fmvit_small(pretrained: bool = False, **kwargs) -> FMViT:
    """FMViT "small" (vitlab config, not the paper's table): 21,057,544 params (16,078,600 fused), 2.98 GMACs."""
    arch = dict(depths=(2, 2, 8, 2), embed_dims=(64, 128, 256, 512), head_dim=32, mlp_ratio=3.0)
    return _create_fmvit("vl_fmvit_small", pretrained, **dict(arch, **kwargs))


@register_model
def vl_fmvit_base(pretrained: bool = False, **kwargs) -> FMViT:
    """FMViT "base" (vitlab config, not the paper's table): 38,882,568 params (29,330,056 fused), 5.93 GMACs."""
    arch = dict(depths=(3, 4, 12, 3), embed_dims=(64, 128, 320, 512), head_dim=32, mlp_ratio=3.0)
    return _create_fmvit("vl_fmvit_base", pretrained, **dict(arch, **kwargs))


@register_model
def vl_fmvit_large(pretrained: bool = False, **kwargs) -> FMViT:
    """FMViT "large" (vitlab config, not the paper's table): 78,987,352 params (59,410,840 fused), 11.93 GMACs."""
    arch = dict(depths=(3, 4, 16, 3), embed_dims=(96, 192, 384, 768), head_dim=32, mlp_ratio=3.0)
    return _create_fmvit("vl_fmvit_large", pretrained, **dict(arch, **kwargs))


@register_model
def vl_test_fmvit(pretrained: bool = False, **kwargs) -> FMViT:
    """Tiny FMViT for tests: widths 32-64, one block per stage (2 CFB, 2 FMB), head_dim 16, gMLP groups (1, 2)."""
    arch = dict(depths=(1, 1, 1, 1), embed_dims=(32, 32, 64, 64), head_dim=16, sr_ratios=(8, 4, 2, 1),
                mlp_ratio=2.0, mlp_groups=(1, 2), num_classes=10)
    return _create_fmvit("vl_test_fmvit", pretrained, **dict(arch, **kwargs))
