"""UniFormer: Unifying Convolution and Self-attention for Visual Recognition (Li et al., 2022, arXiv:2201.09450).

A four-stage NCHW backbone whose blocks all read "dynamic position embedding, relation aggregator, FFN":

* stages 1-2, `CBlock` (local MHRA): x += DWConv3x3(x); x += Conv1x1(DWConv5x5(Conv1x1(BN(x)))); x += Mlp(BN(x))
  with 1x1 convs (run as Linear layers on the channels-last view: a matmul beats PyTorch's 1x1 conv kernel on CPU).
  The 5x5 depthwise conv is the "local affinity" (a learnable, token-independent attention over a 5x5 window).
* stages 3-4, `SABlock` (global MHRA): x += DWConv3x3(x), then a pre-norm ViT block (LayerNorm, multi-head
  self-attention run by `F.scaled_dot_product_attention` through timm's `Attention`, Mlp) on the flattened tokens.
* Patch embeddings are non-overlapping convs (4x4 stride 4, then 2x2 stride 2) + LayerNorm (torch's eps 1e-5), or for
  the "+" models a conv stem (two 3x3 stride-2 convs with BN) and 3x3 stride-2 conv + BN downsamplers.
* Head: BatchNorm2d on the last feature map (the official choice: BN, not LN), global average pool, Linear.

Official code: github.com/Sense-X/UniFormer, `image_classification/models/uniformer.py`,
commit 52a0415e4e0dda880fab8ffbc710e4d8e171149d.

| variant | params (1000 classes) | MACs at 224 | top-1 (IN-1k, 224) |
|---|---|---|---|
| UniFormer-S (`vl_uniformer_small`) | 21,545,256 (README 22M) | 3.63G counted here (README "FLOPs" 3.6G) | 82.9% |
| UniFormer-S+ (`vl_uniformer_small_plus`, head_dim 32) | 24,032,552 (README 24M) | (README 4.2G) | 83.4% |
| UniFormer-S+ dim64 (`vl_uniformer_small_plus_dim64`) | 24,032,552 (README 24M) | (README 4.2G) | 83.4% |
| UniFormer-B (`vl_uniformer_base`) | 49,776,552 (README 50M) | (README 8.3G) | 83.8% |
| UniFormer-B + LayerScale (`vl_uniformer_base_ls`) | 49,796,520 (README 50M) | (README 8.3G) | 83.9% |

Differences from the official file, none of which changes the function: stages are `stages.i.{downsample,blocks}`
(official `patch_embedI` / `blocksI`), the CBlock 1x1 convs are Linear layers (`checkpoint_filter_fn` maps keys and
reshapes the weights), layer scale is a constructor argument (`layer_scale`, official: a module-level global switched
on by `uniformer_base_ls`), the patch embeddings accept any input size (official asserts the construction size), and
`drop_path_rate` defaults to 0 (the official run.sh files train with 0.1 for S and S+, 0.3 for B).

Checked against (tests/models/test_zoo_uniformer.py): the official `uniformer.py` run locally on two tiny configs (patch
stem; conv stem + layer scale), committed as fixtures in the official key layout and loaded through
`checkpoint_filter_fn` (logits within 1e-4); exact parameter counts of the five official constructors; MACs of
UniFormer-S at 224 against the README.
"""
from functools import partial
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import (Attention, DropPath, LayerNorm2d, LayerScale, Mlp, PatchEmbed,
                         trunc_normal_)
from timm.models import generate_default_cfgs, register_model

from ._builder import build_vitlab_model, imagenet_cfg
from ._staged import LinearHeadMixin
from timm.models._features import feature_take_indices

__all__ = ["UniFormer", "CBlock", "SABlock", "checkpoint_filter_fn", "vl_uniformer_small", "vl_uniformer_small_plus",
           "vl_uniformer_small_plus_dim64", "vl_uniformer_base", "vl_uniformer_base_ls", "vl_test_uniformer"]


class CBlock(nn.Module):
    """Local MHRA block (NCHW in and out): DWConv position embedding, BN -> 1x1 -> 5x5 depthwise "affinity" -> 1x1,
    BN -> MLP of 1x1 convs.

    The 1x1 convs are `nn.Linear` layers applied to the channels-last view of the map (the official file's Conv2d
    weights, reshaped by `checkpoint_filter_fn`): on CPU a matmul is faster than PyTorch's 1x1 conv kernel.
    """

    def __init__(self, dim: int, mlp_ratio: float = 4.0, proj_drop: float = 0.0, drop_path: float = 0.0,
                 act_layer: type[nn.Module] = nn.GELU):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.BatchNorm2d(dim)
        self.conv1 = nn.Linear(dim, dim)
        self.attn = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv2 = nn.Linear(dim, dim)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        y = self.conv1(self.norm1(x).permute(0, 2, 3, 1))  # (B, H, W, C), a view of the NCHW map
        y = self.conv2(self.attn(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        x = x + self.drop_path1(y.permute(0, 3, 1, 2))
        return x + self.drop_path2(self.mlp(self.norm2(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


class SABlock(nn.Module):
    """Global MHRA block: DWConv position embedding (NCHW), then a pre-norm ViT block on the (B, H*W, C) tokens."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 layer_scale: Optional[float] = None, act_layer: type[nn.Module] = nn.GELU,
                 norm_layer: type[nn.Module] = partial(nn.LayerNorm, eps=1e-6)):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, N, C)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x.transpose(1, 2).reshape(B, C, H, W)


class ConvEmbed(nn.Module):
    """Conv stem of the "+" models: 3x3 stride-2 convs with BN (GELU between), or one for the downsamplers."""

    def __init__(self, in_chans: int, embed_dim: int, stem: bool = False):
        super().__init__()
        if stem:  # two stride-2 convs: patch size 4
            self.proj = nn.Sequential(
                nn.Conv2d(in_chans, embed_dim // 2, 3, stride=2, padding=1), nn.BatchNorm2d(embed_dim // 2), nn.GELU(),
                nn.Conv2d(embed_dim // 2, embed_dim, 3, stride=2, padding=1), nn.BatchNorm2d(embed_dim))
        else:
            self.proj = nn.Sequential(nn.Conv2d(in_chans, embed_dim, 3, stride=2, padding=1), nn.BatchNorm2d(embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _patch_embed(in_chans: int, embed_dim: int, patch_size: int, conv_stem: bool) -> nn.Module:
    if conv_stem:
        return ConvEmbed(in_chans, embed_dim, stem=patch_size == 4)
    # conv k=s=patch_size, then LayerNorm over channels with torch's default eps (official nn.LayerNorm(embed_dim))
    return PatchEmbed(None, patch_size, in_chans, embed_dim, norm_layer=partial(LayerNorm2d, eps=1e-5),
                      output_fmt="NCHW", strict_img_size=False)


class UniFormerStage(nn.Module):
    """Downsampling patch embedding (Identity in stage 1, where `patch_embed` is the stem), then blocks."""

    def __init__(self, downsample: nn.Module, blocks: List[nn.Module]):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class UniFormer(LinearHeadMixin, nn.Module):
    """UniFormer image classifier (2D): four stages, CBlocks where `block_types` says "conv", SABlocks for "attn"."""

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            depths: Sequence[int] = (3, 4, 8, 3),
            embed_dims: Sequence[int] = (64, 128, 320, 512),
            head_dim: int = 64,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            block_types: Sequence[str] = ("conv", "conv", "attn", "attn"),
            conv_stem: bool = False,
            layer_scale: Optional[float] = None,
            drop_rate: float = 0.0,
            pos_drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            act_layer: type[nn.Module] = nn.GELU,
            norm_layer: type[nn.Module] = partial(nn.LayerNorm, eps=1e-6),
    ):
        super().__init__()
        if not len(depths) == len(embed_dims) == len(block_types):
            raise ValueError(f"depths {tuple(depths)}, embed_dims {tuple(embed_dims)} and block_types "
                             f"{tuple(block_types)} must have one entry per stage")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.output_fmt = "NCHW"
        self.patch_embed = _patch_embed(in_chans, embed_dims[0], 4, conv_stem)
        self.pos_drop = nn.Dropout(pos_drop_rate)
        dpr = [x.tolist() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))]
        stages, self.feature_info = [], []
        for i, (depth, dim, kind) in enumerate(zip(depths, embed_dims, block_types)):
            if kind == "conv":
                blocks = [CBlock(dim, mlp_ratio, proj_drop_rate, dpr[i][j], act_layer) for j in range(depth)]
            elif kind == "attn":
                blocks = [SABlock(dim, dim // head_dim, mlp_ratio, qkv_bias, proj_drop_rate, attn_drop_rate, dpr[i][j],
                                  layer_scale, act_layer, norm_layer) for j in range(depth)]
            else:
                raise ValueError(f"block_types entries must be 'conv' or 'attn', got {kind!r}")
            downsample = _patch_embed(embed_dims[i - 1], dim, 2, conv_stem) if i > 0 else nn.Identity()
            stages.append(UniFormerStage(downsample, blocks))
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
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^patch_embed", blocks=r"^stages\.(\d+)" if coarse else [
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
        x = self.pos_drop(self.patch_embed(x))
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
        return self.norm(self.stages(self.pos_drop(self.patch_embed(x))))  # (B, C, H/32, W/32)

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

def checkpoint_filter_fn(state_dict: dict, model: UniFormer) -> dict:
    """Official UniFormer state dict (`patch_embedI`, `blocksI.j`, `gamma_1/2`) -> vitlab's layout.

    Identity on a state dict already in vitlab's layout. Accepts the official file's {"model": ...} wrapper.
    """
    state_dict = state_dict.get("model", state_dict.get("state_dict", state_dict))
    if not any(k.startswith(("patch_embed1.", "blocks1.")) for k in state_dict):
        return state_dict
    out = {}
    for key, value in state_dict.items():
        head, _, rest = key.partition(".")
        if head == "patch_embed1":
            key = "patch_embed." + rest
        elif head.startswith("patch_embed"):  # patch_embed2..4 start stages 1..3
            key = f"stages.{int(head[len('patch_embed'):]) - 1}.downsample.{rest}"
        elif head.startswith("blocks"):  # blocksI.j.<...> -> stages.(I-1).blocks.j.<...>
            rest = rest.replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
            key = f"stages.{int(head[len('blocks'):]) - 1}.blocks.{rest}"
            if rest.endswith("weight") and value.ndim == 4 and value.shape[-2:] == (1, 1):
                value = value.flatten(1)  # CBlock 1x1 convs (conv1, conv2, mlp.fc1, mlp.fc2) -> Linear
        out[key] = value
    return out


# --- registry ---------------------------------------------------------------------------------------------

def _cfg(**kwargs) -> dict:
    return imagenet_cfg(**{"pool_size": (7, 7), "crop_pct": 0.9, "first_conv": "patch_embed.proj", "license": "mit",
                           "paper_ids": "arXiv:2201.09450", **kwargs})


default_cfgs = generate_default_cfgs({
    "vl_uniformer_small": _cfg(),
    "vl_uniformer_small_plus": _cfg(first_conv="patch_embed.proj.0"),
    "vl_uniformer_small_plus_dim64": _cfg(first_conv="patch_embed.proj.0"),
    "vl_uniformer_base": _cfg(),
    "vl_uniformer_base_ls": _cfg(),
    "vl_test_uniformer": _cfg(input_size=(3, 64, 64), pool_size=(2, 2), num_classes=10),
})


def _create_uniformer(variant: str, pretrained: bool = False, **kwargs) -> UniFormer:
    return build_vitlab_model(UniFormer, variant, pretrained, filter_fn=checkpoint_filter_fn,
                              default_out_indices=tuple(range(len(kwargs.get("depths", (3, 4, 8, 3))))), **kwargs)


@register_model
def vl_uniformer_small(pretrained: bool = False, **kwargs) -> UniFormer:
    """UniFormer-S: 21,545,256 params, 3.63 GMACs at 224 (README 22M / 3.6G), 82.9% top-1 (IN-1k)."""
    arch = dict(depths=(3, 4, 8, 3), embed_dims=(64, 128, 320, 512), head_dim=64, mlp_ratio=4.0)
    return _create_uniformer("vl_uniformer_small", pretrained, **dict(arch, **kwargs))


@register_model
def vl_uniformer_small_plus(pretrained: bool = False, **kwargs) -> UniFormer:
    """UniFormer-S+ (conv stem, head_dim 32): 24,032,552 params (README 24M / 4.2G), 83.4% top-1 (IN-1k)."""
    arch = dict(depths=(3, 5, 9, 3), embed_dims=(64, 128, 320, 512), head_dim=32, mlp_ratio=4.0, conv_stem=True)
    return _create_uniformer("vl_uniformer_small_plus", pretrained, **dict(arch, **kwargs))


@register_model
def vl_uniformer_small_plus_dim64(pretrained: bool = False, **kwargs) -> UniFormer:
    """UniFormer-S+ with head_dim 64: 24,032,552 params (README 24M / 4.2G), 83.4% top-1 (IN-1k)."""
    arch = dict(depths=(3, 5, 9, 3), embed_dims=(64, 128, 320, 512), head_dim=64, mlp_ratio=4.0, conv_stem=True)
    return _create_uniformer("vl_uniformer_small_plus_dim64", pretrained, **dict(arch, **kwargs))


@register_model
def vl_uniformer_base(pretrained: bool = False, **kwargs) -> UniFormer:
    """UniFormer-B: 49,776,552 params (README 50M / 8.3G), 83.8% top-1 (IN-1k)."""
    arch = dict(depths=(5, 8, 20, 7), embed_dims=(64, 128, 320, 512), head_dim=64, mlp_ratio=4.0)
    return _create_uniformer("vl_uniformer_base", pretrained, **dict(arch, **kwargs))


@register_model
def vl_uniformer_base_ls(pretrained: bool = False, **kwargs) -> UniFormer:
    """UniFormer-B with LayerScale 1e-6 in the attention stages: 49,796,520 params (README 50M / 8.3G), 83.9%."""
    arch = dict(depths=(5, 8, 20, 7), embed_dims=(64, 128, 320, 512), head_dim=64, mlp_ratio=4.0, layer_scale=1e-6)
    return _create_uniformer("vl_uniformer_base_ls", pretrained, **dict(arch, **kwargs))


@register_model
def vl_test_uniformer(pretrained: bool = False, **kwargs) -> UniFormer:
    """Tiny UniFormer for tests: widths 32-64, one block per stage (2 local, 2 global), head_dim 16, 64 px."""
    arch = dict(depths=(1, 1, 1, 1), embed_dims=(32, 32, 64, 64), head_dim=16, mlp_ratio=2.0, num_classes=10)
    return _create_uniformer("vl_test_uniformer", pretrained, **dict(arch, **kwargs))
