"""CvT: Convolutional vision Transformer (Wu et al., "CvT: Introducing Convolutions to Vision Transformers",
ICCV 2021, arXiv:2103.15808).

Three stages, each: a convolutional token embedding (overlapping strided conv + LayerNorm), then pre-norm
transformer blocks whose Q/K/V come from a convolutional projection (depthwise 3x3 conv + BatchNorm, K/V at
stride 2) followed by a linear layer. No position embedding; a class token only in the last stage, which is what
the head reads.

Official code: github.com/microsoft/CvT, `lib/models/cls_cvt.py` and `experiments/imagenet/cvt/*.yaml`, read at
commit f851e681966390779b71380d2600b52360ff4fe1. Published (README, ImageNet-1k, 224 px):

    model     params       GFLOPs   top-1
    CvT-13    19,997,480   4.5      81.6   (83.0 at 384 px)
    CvT-21    31,622,696   7.1      82.5   (83.3 at 384 px)

The exact parameter counts are the official `ConvolutionalVisionTransformer` built from those yaml files with 1000
classes (README: "20M", "32M"); HF transformers' default `CvtConfig` (= CvT-13, with `num_labels=1000`) gives the same
count. vitlab counts 4.57 GMACs for CvT-13 and 7.18 GMACs for CvT-21 at 224 px (`vitlab.profiling.count_flops`,
attention included, as the official `Attention.compute_macs` includes it): +1.5 % and +1.1 % over the published
"GFLOPs" (multiply-adds).

Differences between implementations, kept as arguments with the official default:
  * `act_layer`: the official model uses QuickGELU (`x * sigmoid(1.702 x)`); HF transformers' `CvtModel` uses exact
    GELU. The HF converter below sets `act_layer="gelu"`.
Both scale attention by `embed_dim ** -0.5` (the full width, not the head width); so does vitlab.

Checked against (`tests/models/test_zoo_cvt.py`): HF transformers 5.24 `CvtForImageClassification`, random init, weights
copied by the converter `_cvt_from_hf`: logits within 1e-4 (max diff ~1e-6) for a small config at 64 px and 48x80 px,
and (slow tests) for the default config = CvT-13 at 224 and 160 px; and the official code (commit above) run locally on
a tiny configuration, its state dict loaded through `checkpoint_filter_fn` (fixture `tests/fixtures/zoo/cvt/`, max
diff ~2e-6).

    >>> import timm, torch, vitlab.models
    >>> model = timm.create_model("vl_test_cvt", num_classes=10).eval()
    >>> model(torch.randn(1, 3, 32, 32)).shape
    torch.Size([1, 10])
"""
from collections import OrderedDict
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, get_act_layer, to_2tuple, trunc_normal_, use_fused_attn
from timm.models import generate_default_cfgs, register_model
from timm.models._manipulate import checkpoint

from ..checkpoint import create_model
from ._builder import build_vitlab_model, imagenet_cfg
from ._convert import register_hf_converter
from ._staged import StagedTokenModel, tokens_to_map

__all__ = ["ConvVisionTransformer", "checkpoint_filter_fn", "vl_cvt_13", "vl_cvt_21", "vl_test_cvt"]

PerStage = Union[Any, Sequence[Any]]


def _per_stage(value: PerStage, num_stages: int, name: str) -> tuple:
    """A scalar repeated once per stage, or a sequence that must have one entry per stage."""
    if isinstance(value, (list, tuple)):
        if len(value) != num_stages:
            raise ValueError(f"{name}={tuple(value)} must have one entry per stage ({num_stages})")
        return tuple(value)
    return (value,) * num_stages


class ConvEmbed(nn.Module):
    """Convolutional token embedding: overlapping strided conv, then LayerNorm: NCHW -> (B, H*W, C), (H, W)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, stride: int, padding: int, norm_eps: float):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=to_2tuple(patch_size), stride=stride, padding=padding)
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)  # (B, C, H, W), channels-last strides after the first stage (see _tokens_to_map)
        B, C, H, W = x.shape
        x = x.permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, H*W, C): a view for a channels-last x
        return self.norm(x), (H, W)


def _conv_projection(dim: int, kernel_size: int, stride: int, padding: int, method: str) -> nn.Module:
    """Map (B, C, H, W) to a token grid before the Q/K/V linear layer: depthwise conv + BN, average pool, or nothing."""
    if method == "dw_bn":
        return nn.Sequential(OrderedDict([
            ("conv", nn.Conv2d(dim, dim, kernel_size, stride=stride, padding=padding, groups=dim, bias=False)),
            ("bn", nn.BatchNorm2d(dim)),
        ]))
    if method == "avg":
        return nn.AvgPool2d(kernel_size, stride=stride, padding=padding, ceil_mode=True)
    if method == "linear":
        return nn.Identity()
    raise ValueError(f"qkv_proj_method={method!r}: expected 'dw_bn', 'avg' or 'linear'")


class ConvAttention(nn.Module):
    """Multi-head attention whose Q, K, V are convolutional projections of the token grid, then linear layers.

    Prefix (class) tokens skip the convolution and are prepended to Q, K and V unchanged.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            qkv_bias: bool = True,
            method: str = "dw_bn",
            kernel_size: int = 3,
            stride_q: int = 1,
            stride_kv: int = 2,
            padding_q: int = 1,
            padding_kv: int = 1,
            attn_drop: float = 0.0,
            proj_drop: float = 0.0,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = dim ** -0.5  # the official (and HF) scale: full width, not head width
        self.fused_attn = use_fused_attn()
        # 'avg' pools K/V only; Q stays at full resolution (official behaviour)
        q_method = "linear" if method == "avg" else method
        self.conv_proj_q = _conv_projection(dim, kernel_size, stride_q, padding_q, q_method)
        self.conv_proj_k = _conv_projection(dim, kernel_size, stride_kv, padding_kv, method)
        self.conv_proj_v = _conv_projection(dim, kernel_size, stride_kv, padding_kv, method)
        self.proj_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        return x.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, N, d)

    @staticmethod
    def _project(proj: nn.Module, prefix: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        x = proj(grid).flatten(2).transpose(1, 2)  # (B, N', C): contiguous when the conv keeps channels-last
        return torch.cat([prefix, x], dim=1) if prefix.shape[1] else x

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        H, W = hw
        B, N, C = x.shape
        num_prefix = N - H * W
        prefix, grid = x[:, :num_prefix], tokens_to_map(x, hw, num_prefix)
        q, k, v = (self._project(proj, prefix, grid) for proj in (self.conv_proj_q, self.conv_proj_k, self.conv_proj_v))
        q, k, v = self._heads(self.proj_q(q)), self._heads(self.proj_k(k)), self._heads(self.proj_v(v))
        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0, scale=self.scale)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, h, Nq, Nkv)
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, -1, C)  # (B, Nq, C)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    """Pre-norm transformer block with convolutional-projection attention."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            proj_drop: float = 0.0,
            attn_drop: float = 0.0,
            drop_path: float = 0.0,
            act_layer: type[nn.Module] = nn.GELU,
            norm_eps: float = 1e-5,
            **attn_kwargs,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = ConvAttention(dim, num_heads, qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, **attn_kwargs)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), hw))
        return x + self.drop_path2(self._mlp(self.norm2(x)))

    mlp_chunk_elems = 2 ** 20

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        """`self.mlp(x)`; on CPU without autograd, in token chunks whose hidden activation has at most
        `mlp_chunk_elems` elements: fresh buffers of tens of MB are slow to fault in and overflow the caches."""
        B, N, C = x.shape
        chunks = B * N * self.mlp.fc1.out_features // self.mlp_chunk_elems
        if chunks < 2 or x.device.type != "cpu" or torch.is_grad_enabled():
            return self.mlp(x)
        return torch.cat([self.mlp(part) for part in x.reshape(B * N, C).chunk(chunks)]).view(B, N, C)


class CvtStage(nn.Module):
    """ConvEmbed, optional class token, blocks. NCHW in; tokens (B, prefix + H*W, C) and (H, W) out."""

    def __init__(
            self,
            in_chans: int,
            dim: int,
            depth: int,
            num_heads: int,
            patch_size: int,
            patch_stride: int,
            patch_padding: int,
            cls_token: bool,
            drop_path: Sequence[float],
            drop_rate: float = 0.0,
            norm_eps: float = 1e-5,
            **block_kwargs,
    ):
        super().__init__()
        self.patch_embed = ConvEmbed(in_chans, dim, patch_size, patch_stride, patch_padding, norm_eps)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        self.num_prefix_tokens = int(cls_token)
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, drop_path=drop_path[i], norm_eps=norm_eps, **block_kwargs) for i in range(depth))
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x, (H, W) = self.patch_embed(x)  # (B, H*W, C)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x)
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, (H, W))
            else:
                x = block(x, (H, W))
        return x, (H, W)


class ConvVisionTransformer(StagedTokenModel):
    """CvT. `forward_features` returns the last stage's tokens after the final LayerNorm, class token first."""

    family_name = "CvT"
    stem_pattern = r"^stages\.0\.patch_embed"
    token_pool_hint = "a class token in the last stage (cls_token=(..., True))"

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: Optional[str] = None,
            embed_dims: Sequence[int] = (64, 192, 384),
            depths: Sequence[int] = (1, 2, 10),
            num_heads: Sequence[int] = (1, 3, 6),
            patch_sizes: PerStage = (7, 3, 3),
            patch_strides: PerStage = (4, 2, 2),
            patch_paddings: PerStage = (2, 1, 1),
            mlp_ratio: PerStage = 4.0,
            qkv_bias: PerStage = True,
            cls_token: PerStage = (False, False, True),
            qkv_proj_method: PerStage = "dw_bn",
            kernel_qkv: PerStage = 3,
            stride_q: PerStage = 1,
            stride_kv: PerStage = 2,
            padding_q: PerStage = 1,
            padding_kv: PerStage = 1,
            act_layer: Union[str, type[nn.Module]] = "quick_gelu",
            norm_eps: float = 1e-5,
            drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: PerStage = 0.0,
            img_size: Any = None,  # accepted for a uniform interface; CvT has no position embedding
    ):
        """`drop_path_rate`: per stage, each ramped linearly over the stage's blocks (official); a float applies to
        the last stage only, as in the official configs ((0, 0, 0.1) for CvT-13)."""
        super().__init__()
        n = len(depths)
        if not isinstance(drop_path_rate, (list, tuple)):
            drop_path_rate = (0.0,) * (n - 1) + (drop_path_rate,)
        stage_args = dict(
            dim=embed_dims, depth=depths, num_heads=num_heads, patch_size=patch_sizes, patch_stride=patch_strides,
            patch_padding=patch_paddings, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, cls_token=cls_token,
            method=qkv_proj_method, kernel_size=kernel_qkv, stride_q=stride_q, stride_kv=stride_kv,
            padding_q=padding_q, padding_kv=padding_kv, drop_path=drop_path_rate)
        stage_args = {k: _per_stage(v, n, k) for k, v in stage_args.items()}
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_prefix_tokens = int(stage_args["cls_token"][-1])
        self.global_pool = global_pool if global_pool is not None else ("token" if self.num_prefix_tokens else "avg")
        self._check_pool(self.global_pool)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        act_layer = get_act_layer(act_layer)

        self.feature_info = []
        stages, prev, reduction = [], in_chans, 1
        for i in range(n):
            args = {k: v[i] for k, v in stage_args.items()}
            dpr = torch.linspace(0, args.pop("drop_path"), depths[i], device="cpu").tolist()  # meta-device safe
            stages.append(CvtStage(
                prev, drop_path=dpr, drop_rate=drop_rate, norm_eps=norm_eps, act_layer=act_layer,
                proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, **args))
            prev, reduction = embed_dims[i], reduction * args["patch_stride"]
            self.feature_info.append(dict(num_chs=prev, reduction=reduction, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(prev, eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(prev, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        for stage in self.stages:
            if stage.cls_token is not None:
                trunc_normal_(stage.cls_token, std=0.02)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # official init: trunc-normal Linear weights, zero biases, unit norms; convs keep torch's default init
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

# --- official checkpoints -------------------------------------------------------------------------------------

def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map an official CvT state dict (`stage{i}.…`, as saved by microsoft/CvT) to vitlab's (`stages.{i}.…`).

    The block internals already share names (`norm1`, `attn.conv_proj_q.conv/bn`, `attn.proj_q`, `mlp.fc1`, ...).
    A state dict already in vitlab's layout is returned unchanged.
    """
    if isinstance(state_dict.get("model"), dict):
        state_dict = state_dict["model"]
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")  # saved from DistributedDataParallel
        if key.startswith("stage") and not key.startswith("stages."):
            index, rest = key[len("stage"):].split(".", 1)
            key = f"stages.{index}.{rest}"
        out[key] = value
    return out


# --- Hugging Face transformers --------------------------------------------------------------------------------

_QKV = (("query", "q"), ("key", "k"), ("value", "v"))
_HF_KEYS = (  # (HF substring, vitlab substring), applied in order
    ("cvt.encoder.stages.", "stages."),
    (".embedding.convolution_embeddings.projection.", ".patch_embed.proj."),
    (".embedding.convolution_embeddings.normalization.", ".patch_embed.norm."),
    (".layers.", ".blocks."),
    *((f".attention.attention.convolution_projection_{hf}.convolution_projection.{hf_layer}.",
       f".attn.conv_proj_{ours}.{layer}.")
      for hf, ours in _QKV for hf_layer, layer in (("convolution", "conv"), ("normalization", "bn"))),
    *((f".attention.attention.projection_{hf}.", f".attn.proj_{ours}.") for hf, ours in _QKV),
    (".attention.output.dense.", ".attn.proj."),
    (".layernorm_before.", ".norm1."),
    (".layernorm_after.", ".norm2."),
    (".intermediate.dense.", ".mlp.fc1."),
    (".output.dense.", ".mlp.fc2."),
)


def _hf_key(key: str) -> str:
    if key.startswith("layernorm."):
        return "norm." + key[len("layernorm."):]
    if key.startswith("classifier."):
        return "head." + key[len("classifier."):]
    for old, new in _HF_KEYS:
        key = key.replace(old, new)
    return key


@register_hf_converter("cvt")
def _cvt_from_hf(hf_model) -> ConvVisionTransformer:
    """vitlab CvT with the weights of a transformers `CvtForImageClassification` (HF uses exact GELU)."""
    config = hf_model.config
    if set(config.qkv_projection_method) != {"dw_bn"}:
        raise ValueError(f"qkv_projection_method={config.qkv_projection_method}: only 'dw_bn' converts "
                         "(transformers' CvtSelfAttentionProjection builds no layer for the others)")
    arch = dict(
        in_chans=config.num_channels, num_classes=config.num_labels, embed_dims=tuple(config.embed_dim),
        depths=tuple(config.depth), num_heads=tuple(config.num_heads), patch_sizes=tuple(config.patch_sizes),
        patch_strides=tuple(config.patch_stride), patch_paddings=tuple(config.patch_padding),
        mlp_ratio=tuple(config.mlp_ratio), qkv_bias=tuple(config.qkv_bias), cls_token=tuple(config.cls_token),
        kernel_qkv=tuple(config.kernel_qkv), stride_q=tuple(config.stride_q), stride_kv=tuple(config.stride_kv),
        padding_q=tuple(config.padding_q), padding_kv=tuple(config.padding_kv),
        act_layer="gelu",  # transformers' CvtIntermediate: nn.GELU(); its LayerNorms keep torch's eps 1e-5
    )
    model = create_model("vl_cvt_13", **arch)
    state = {_hf_key(k): v for k, v in hf_model.state_dict().items()}
    model.load_state_dict(state, strict=True)
    return model


# --- registry -------------------------------------------------------------------------------------------------

def _cfg(**kwargs) -> dict:
    return imagenet_cfg(**{
        "first_conv": "stages.0.patch_embed.proj", "paper_ids": "arXiv:2103.15808",
        "origin_url": "https://github.com/microsoft/CvT", "license": "mit",
        **kwargs,
    })


default_cfgs = generate_default_cfgs({
    "vl_cvt_13": _cfg(),
    "vl_cvt_21": _cfg(),
    "vl_test_cvt": _cfg(input_size=(3, 32, 32), num_classes=10),
})


def _create_cvt(variant: str, pretrained: bool = False, **kwargs) -> ConvVisionTransformer:
    return build_vitlab_model(ConvVisionTransformer, variant, pretrained, filter_fn=checkpoint_filter_fn,
                              default_out_indices=tuple(range(len(kwargs.get("depths", (1, 2, 10))))), **kwargs)


@register_model
def vl_cvt_13(pretrained: bool = False, **kwargs) -> ConvVisionTransformer:
    """CvT-13 (Wu et al., 2021): 19,997,480 params, 4.5 GMACs at 224 (paper's "GFLOPs"), 81.6 % top-1."""
    arch = dict(embed_dims=(64, 192, 384), depths=(1, 2, 10), num_heads=(1, 3, 6))
    return _create_cvt("vl_cvt_13", pretrained, **dict(arch, **kwargs))


@register_model
def vl_cvt_21(pretrained: bool = False, **kwargs) -> ConvVisionTransformer:
    """CvT-21 (Wu et al., 2021): 31,622,696 params, 7.1 GMACs at 224 (paper's "GFLOPs"), 82.5 % top-1."""
    arch = dict(embed_dims=(64, 192, 384), depths=(1, 4, 16), num_heads=(1, 3, 6))
    return _create_cvt("vl_cvt_21", pretrained, **dict(arch, **kwargs))


@register_model
def vl_test_cvt(pretrained: bool = False, **kwargs) -> ConvVisionTransformer:
    """Tiny CvT for tests: widths 32/48/64, one block per stage, 32 px input (2x2 tokens + class token at the end)."""
    arch = dict(embed_dims=(32, 48, 64), depths=(1, 1, 1), num_heads=(1, 2, 2))
    return _create_cvt("vl_test_cvt", pretrained, **dict(arch, **kwargs))
