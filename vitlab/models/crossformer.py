"""CrossFormer: A Versatile Vision Transformer Based on Cross-scale Attention (Wang et al., ICLR 2022, 2108.00154).

A four-stage NHWC transformer with three ideas:

* Cross-scale Embedding Layer (CEL): the stem and every downsampler run several convolutions of different kernel
  sizes (4/8/16/32 at the stem, 2/4 between stages) with the same stride and concatenate their outputs channel-wise
  (larger kernels get fewer channels), so each token mixes several scales.
* Long/Short Distance Attention (LSDA): blocks alternate Short Distance Attention (SDA: attention inside adjacent
  G x G groups) and Long Distance Attention (LDA: attention inside groups of G x G tokens sampled every `interval`
  pixels). Sizes that are not multiples of G (SDA) or G * interval (LDA) are zero-padded bottom/right and the padded
  keys masked with -1e6, as the official code does; a stage whose feature map is no larger than G runs one SDA group
  of min(H, W).
* Dynamic Position Bias (DPB): an MLP maps each relative offset (dy, dx) to one bias per head, so the bias exists
  for any group size; it is computed on the fly for the group size in use.

Official code: github.com/cheerss/CrossFormer, `models/crossformer.py` with `configs/crossformer/*.yaml`, commit
795201075f0066e78408882617312084e25aef61 (CrossFormer++ code base; the v1 configs used here set USE_ACL False and
leave USE_CPE off, i.e. plain CrossFormer; CrossFormer++'s ACL / CPE / group-size schedules are not implemented).

| variant | params (1000 classes) | MACs at 224 | top-1 (IN-1k) |
|---|---|---|---|
| CrossFormer-T (`vl_crossformer_tiny`) | 27,776,794 (README 27.8M) | 2.86G counted here (README 2.9G) | 81.5% |
| CrossFormer-S (`vl_crossformer_small`) | 30,657,394 (README 30.7M) | 4.90G counted here (README 4.9G) | 82.5% |

Unlike the official model, which fixes its input resolution at construction (group sizes, LDA/SDA switch, padding
masks), this one derives them from each input, so one model runs any size; at a given size it computes what the
official model built for that size computes.

Checked against (tests/models/test_zoo_crossformer.py): the official code run locally on a tiny config (64 px, and 72 px
where SDA and LDA pad and mask), committed as a fixture loaded through `checkpoint_filter_fn`; exact parameter
counts of the official constructors with the tiny / small yaml configs; MACs against the README.
"""

from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import ClassifierHead, DropPath, Mlp, trunc_normal_
from timm.models import generate_default_cfgs, register_model

from ._builder import build_vitlab_model, cpu_cached, imagenet_cfg
from ._staged import NHWCStageModel

__all__ = ["CrossFormer", "checkpoint_filter_fn", "vl_crossformer_tiny", "vl_crossformer_small",
           "vl_test_crossformer"]

PAD_MASK_VALUE = -1e6  # the official NEG_INF: padded keys get exp(-1e6) = 0, and an all-padding group stays finite


@cpu_cached(maxsize=32)
def _relative_index(group_h: int, group_w: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(offsets ((2Gh-1)*(2Gw-1), 2) fed to the DPB MLP, index (Gh*Gw, Gh*Gw) of each query-key pair's offset)."""
    offsets = torch.stack(torch.meshgrid(torch.arange(1 - group_h, group_h), torch.arange(1 - group_w, group_w),
                                         indexing="ij")).flatten(1).transpose(0, 1).float()
    coords = torch.stack(torch.meshgrid(torch.arange(group_h), torch.arange(group_w), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 2): query - key
    index = (relative[..., 0] + group_h - 1) * (2 * group_w - 1) + relative[..., 1] + group_w - 1
    return offsets, index


class DynamicPosBias(nn.Module):
    """MLP from a relative offset (dy, dx) to one bias per head (3 LayerNorm-ReLU-Linear layers after a projection)."""

    def __init__(self, dim: int, num_heads: int, residual: bool = False):
        super().__init__()
        self.residual = residual
        self.pos_dim = dim // 4
        self.pos_proj = nn.Linear(2, self.pos_dim)
        layer = lambda out_dim: nn.Sequential(  # noqa: E731
            nn.LayerNorm(self.pos_dim), nn.ReLU(inplace=True), nn.Linear(self.pos_dim, out_dim))
        self.pos1, self.pos2, self.pos3 = layer(self.pos_dim), layer(self.pos_dim), layer(num_heads)

    def forward(self, offsets: torch.Tensor) -> torch.Tensor:
        pos = self.pos_proj(offsets)
        if self.residual:
            pos = pos + self.pos1(pos)
            pos = pos + self.pos2(pos)
            return self.pos3(pos)
        return self.pos3(self.pos2(self.pos1(pos)))  # (num_offsets, heads)


class GroupAttention(nn.Module):
    """Multi-head self-attention inside groups of tokens, with a dynamic position bias for the group's shape."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, position_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.pos = DynamicPosBias(dim // 4, num_heads) if position_bias else None  # official: DPB width dim // 16
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def position_bias(self, group: Tuple[int, int], device, dtype) -> torch.Tensor:
        offsets, index = (t.to(device) for t in _relative_index(*group))
        table = self.pos(offsets.to(dtype))  # ((2Gh-1)*(2Gw-1), heads)
        return table[index.reshape(-1)].reshape(*index.shape, -1).permute(2, 0, 1)  # (heads, N, N)

    def forward(self, x: torch.Tensor, group: Tuple[int, int], key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B*groups, N, C); key_mask (groups, N) additive (0 or PAD_MASK_VALUE) or None."""
        B_, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B_, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        mask = None if self.pos is None else self.position_bias(group, x.device, q.dtype)[None]  # (1, heads, N, N)
        if key_mask is not None:
            groups = key_mask.shape[0]
            key_mask = key_mask.to(q.dtype)[:, None, None, :]  # (groups, 1, 1, N)
            mask = key_mask if mask is None else mask + key_mask  # (groups, heads, N, N)
            mask = mask.expand(B_ // groups, *mask.shape).reshape(B_, *mask.shape[1:])  # (B*groups, heads|1, N, N)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                           dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B_, N, C)))


class CrossFormerBlock(nn.Module):
    """Pre-norm block whose attention is SDA (lsda_flag 0) or LDA (lsda_flag 1); NHWC in and out."""

    def __init__(self, dim: int, num_heads: int, group_size: int = 7, interval: int = 8, lsda_flag: int = 0,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, pad_type: int = 0,
                 act_layer: type[nn.Module] = nn.GELU, norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.group_size, self.interval, self.lsda_flag, self.pad_type = group_size, interval, lsda_flag, pad_type
        self.norm1 = norm_layer(dim)
        self.attn = GroupAttention(dim, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def _grouping(self, H: int, W: int) -> Tuple[int, int, int, int, int, int]:
        """(group size, interval or 0 for SDA, pad top, bottom, left, right) for an H x W map, as the official code."""
        group, lda = self.group_size, self.lsda_flag == 1
        if min(H, W) <= group:  # the whole (smaller) map is one group: SDA
            group, lda = min(H, W), False
        size_div = self.interval * group if lda else group
        pad_h, pad_w = (size_div - H % size_div) % size_div, (size_div - W % size_div) % size_div
        top, left = (pad_h // 2, pad_w // 2) if self.pad_type else (0, 0)
        return group, self.interval if lda else 0, top, pad_h - top, left, pad_w - left

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        G, interval, top, bottom, left, right = self._grouping(H, W)
        x = F.pad(x, (0, 0, left, right, top, bottom))
        Hp, Wp = H + top + bottom, W + left + right
        key_mask = None
        if top or bottom or left or right:
            padded = torch.ones(Hp, Wp, dtype=torch.bool, device=x.device)
            padded[top:top + H, left:left + W] = False
            key_mask = torch.zeros(Hp, Wp, device=x.device).masked_fill_(padded, PAD_MASK_VALUE)
        if interval == 0:  # SDA: adjacent G x G groups
            x = x.reshape(B, Hp // G, G, Wp // G, G, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, G * G, C)
            if key_mask is not None:
                key_mask = key_mask.reshape(Hp // G, G, Wp // G, G).permute(0, 2, 1, 3).reshape(-1, G * G)
        else:  # LDA: G x G tokens every `interval` pixels, inside (G*interval)^2 regions
            I, Rh, Rw = interval, Hp // (G * interval), Wp // (G * interval)
            x = x.reshape(B, Rh, G, I, Rw, G, I, C).permute(0, 1, 4, 3, 6, 2, 5, 7).reshape(-1, G * G, C)
            if key_mask is not None:
                key_mask = key_mask.reshape(Rh, G, I, Rw, G, I).permute(0, 3, 2, 5, 1, 4).reshape(-1, G * G)
        x = self.attn(x, (G, G), key_mask)  # (B*groups, G*G, C)
        if interval == 0:
            x = x.reshape(B, Hp // G, Wp // G, G, G, C).permute(0, 1, 3, 2, 4, 5)
        else:
            x = x.reshape(B, Rh, Rw, I, I, G, G, C).permute(0, 1, 5, 3, 2, 6, 4, 7)
        return x.reshape(B, Hp, Wp, C)[:, top:top + H, left:left + W]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attention(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


def _cel_widths(out_dim: int, num_kernels: int) -> List[int]:
    """Channels per kernel size, smallest kernel first: out/2, out/4, ..., and the last two equal."""
    return [out_dim // 2 ** (i + 1) if i < num_kernels - 1 else out_dim // 2 ** i for i in range(num_kernels)]


class CrossScaleEmbed(nn.Module):
    """CEL stem: convolutions of several kernel sizes, stride = the smallest; concatenated, then LayerNorm (NHWC)."""

    def __init__(self, in_chans: int = 3, embed_dim: int = 64, patch_size: Sequence[int] = (4, 8, 16, 32),
                 norm_layer: Optional[type[nn.Module]] = nn.LayerNorm):
        super().__init__()
        stride = patch_size[0]
        self.projs = nn.ModuleList([
            nn.Conv2d(in_chans, width, kernel, stride=stride, padding=(kernel - stride) // 2)
            for kernel, width in zip(patch_size, _cel_widths(embed_dim, len(patch_size)))])
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(torch.cat([proj(x) for proj in self.projs], dim=1).permute(0, 2, 3, 1))


class CrossScaleMerging(nn.Module):
    """CEL downsampler: LayerNorm, then stride-2 convolutions of several kernel sizes, concatenated (NHWC)."""

    def __init__(self, dim: int, out_dim: int, patch_size: Sequence[int] = (2, 4),
                 norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.norm = norm_layer(dim)
        self.reductions = nn.ModuleList([
            nn.Conv2d(dim, width, kernel, stride=2, padding=(kernel - 2) // 2)
            for kernel, width in zip(patch_size, _cel_widths(out_dim, len(patch_size)))])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x).permute(0, 3, 1, 2)
        return torch.cat([reduction(x) for reduction in self.reductions], dim=1).permute(0, 2, 3, 1)


class CrossFormerStage(nn.Module):
    """Optional CEL downsampler (stages 2-4; the official code runs it at the end of the stage before), then blocks."""

    def __init__(self, dim: int, out_dim: int, depth: int, merge_size: Optional[Sequence[int]],
                 drop_path: Sequence[float], norm_layer: type[nn.Module] = nn.LayerNorm, **block_kwargs):
        super().__init__()
        self.downsample = CrossScaleMerging(dim, out_dim, merge_size, norm_layer) if merge_size else nn.Identity()
        self.blocks = nn.Sequential(*[
            CrossFormerBlock(out_dim, lsda_flag=i % 2, drop_path=drop_path[i], norm_layer=norm_layer, **block_kwargs)
            for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class CrossFormer(NHWCStageModel):
    """CrossFormer classifier: CEL stem, stages of alternating SDA/LDA blocks joined by CEL merging, norm, head."""

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            patch_size: Sequence[int] = (4, 8, 16, 32),
            merge_size: Sequence[Sequence[int]] = ((2, 4), (2, 4), (2, 4)),
            embed_dim: int = 64,
            depths: Sequence[int] = (1, 1, 8, 6),
            num_heads: Sequence[int] = (2, 4, 8, 16),
            group_size: Union[int, Sequence[int]] = 7,
            crs_interval: Sequence[int] = (8, 4, 2, 1),
            mlp_ratio: Union[float, Sequence[float]] = 4.0,
            qkv_bias: bool = True,
            qk_scale: Optional[float] = None,
            drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            patch_norm: bool = True,
            pad_type: int = 0,
            act_layer: type[nn.Module] = nn.GELU,
            norm_layer: type[nn.Module] = nn.LayerNorm,
            stage_fn: Callable[..., nn.Module] = CrossFormerStage,  # CrossFormer++ passes its stage (with ACL)
    ):
        super().__init__()
        num_stages = len(depths)
        if len(merge_size) != num_stages - 1:
            raise ValueError(f"merge_size needs one entry per stage after the first: got {len(merge_size)} "
                             f"for {num_stages} stages")
        group_size = [group_size] * num_stages if isinstance(group_size, int) else list(group_size)
        mlp_ratio = [mlp_ratio] * num_stages if isinstance(mlp_ratio, (int, float)) else list(mlp_ratio)
        self.num_classes = num_classes
        self.output_fmt = "NHWC"
        self.patch_embed = CrossScaleEmbed(in_chans, embed_dim, patch_size, norm_layer if patch_norm else None)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = [x.tolist() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))]
        dims = [embed_dim * 2 ** i for i in range(num_stages)]
        stages, self.feature_info = [], []
        for i in range(num_stages):
            stages.append(stage_fn(
                dims[max(i - 1, 0)], dims[i], depths[i], merge_size[i - 1] if i > 0 else None, dpr[i], norm_layer,
                num_heads=num_heads[i], group_size=group_size[i], interval=crs_interval[i], mlp_ratio=mlp_ratio[i],
                qkv_bias=qkv_bias, qk_scale=qk_scale, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
                pad_type=pad_type, act_layer=act_layer))
            self.feature_info.append(dict(num_chs=dims[i], reduction=patch_size[0] * 2 ** i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = dims[-1]
        self.norm = norm_layer(self.num_features)
        self.head = ClassifierHead(self.num_features, num_classes, global_pool, drop_rate, input_fmt="NHWC")
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

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.pos_drop(self.patch_embed(x))


def checkpoint_filter_fn(state_dict: dict, model: CrossFormer) -> dict:
    """Official CrossFormer state dict (`layers.i`, downsample at the end of stage i, `head`) -> vitlab's layout.

    Identity on a state dict already in vitlab's layout. Accepts the official file's {"model": ...} wrapper; drops the
    official non-persistent position-bias buffers if a checkpoint carries them.
    """
    state_dict = state_dict.get("model", state_dict.get("state_dict", state_dict))
    if not any(k.startswith("layers.") for k in state_dict):
        return state_dict
    out = {}
    for key, value in state_dict.items():
        if key.endswith(("attn.biases", "attn.relative_position_index", ".attn_mask")):
            continue  # derived from the group size at run time
        parts = key.split(".")
        if parts[0] == "layers":
            stage = int(parts[1])
            if parts[2] == "downsample":  # official stage i ends with the merging that vitlab's stage i+1 starts with
                key = ".".join(["stages", str(stage + 1), *parts[2:]])
            else:
                key = ".".join(["stages", *parts[1:]])
        elif parts[0] == "head":
            key = "head.fc." + ".".join(parts[1:])
        out[key] = value
    return out


def _cfg(**kwargs) -> dict:
    return imagenet_cfg(**{
        "pool_size": (7, 7),
        # every CEL stem conv reads the image: timm adapts each to in_chans (names a model lacks are skipped)
        "first_conv": tuple(f"patch_embed.projs.{i}" for i in range(4)), "classifier": "head.fc", "license": "mit",
        **kwargs,
    })


default_cfgs = generate_default_cfgs({
    "vl_crossformer_tiny": _cfg(paper_ids="arXiv:2108.00154"),
    "vl_crossformer_small": _cfg(paper_ids="arXiv:2108.00154"),
    "vl_test_crossformer": _cfg(input_size=(3, 64, 64), pool_size=(8, 8), num_classes=10,
                                first_conv=("patch_embed.projs.0", "patch_embed.projs.1")),   # its 2 patch sizes
})


def _create_crossformer(variant: str, pretrained: bool = False, **kwargs) -> CrossFormer:
    return build_vitlab_model(CrossFormer, variant, pretrained, filter_fn=checkpoint_filter_fn,
                              default_out_indices=tuple(range(len(kwargs.get("depths", (1, 1, 8, 6))))),
                              exclude=("act_layer", "norm_layer"), **kwargs)


@register_model
def vl_crossformer_tiny(pretrained: bool = False, **kwargs) -> CrossFormer:
    """CrossFormer-T: 27,776,794 params, 2.86 GMACs at 224 (README 27.8M / 2.9G), 81.5% top-1 (official, IN-1k)."""
    arch = dict(embed_dim=64, depths=(1, 1, 8, 6), num_heads=(2, 4, 8, 16), group_size=7, crs_interval=(8, 4, 2, 1))
    return _create_crossformer("vl_crossformer_tiny", pretrained, **dict(arch, **kwargs))


@register_model
def vl_crossformer_small(pretrained: bool = False, **kwargs) -> CrossFormer:
    """CrossFormer-S: 30,657,394 params, 4.90 GMACs at 224 (README 30.7M / 4.9G), 82.5% top-1 (official, IN-1k)."""
    arch = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), group_size=7, crs_interval=(8, 4, 2, 1))
    return _create_crossformer("vl_crossformer_small", pretrained, **dict(arch, **kwargs))


@register_model
def vl_test_crossformer(pretrained: bool = False, **kwargs) -> CrossFormer:
    """Tiny CrossFormer for tests: width 32, 4 blocks in 2 stages (SDA + LDA each), 4x4 groups, 64 px."""
    arch = dict(embed_dim=32, depths=(2, 2), num_heads=(2, 2), group_size=4, crs_interval=(4, 2), mlp_ratio=2.0,
                patch_size=(4, 8), merge_size=((2, 4),), num_classes=10)
    return _create_crossformer("vl_test_crossformer", pretrained, **dict(arch, **kwargs))
