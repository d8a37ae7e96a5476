"""PVT v1: Pyramid Vision Transformer (Wang et al., "Pyramid Vision Transformer: A Versatile Backbone for Dense
Prediction without Convolutions", ICCV 2021, arXiv:2102.12122).

Four stages, each: a non-overlapping patch embedding (conv with kernel = stride, + LayerNorm: 4 in the first stage,
2 after), a learned absolute position embedding, and pre-norm transformer blocks with spatial-reduction attention
(K/V from the token grid shrunk by a strided conv of ratio `sr` + LayerNorm). A class token joins in the last stage
and is what the head reads. timm has only PVT v2 (`pvt_v2_*`).

Official code: github.com/whai362/PVT, `classification/pvt.py`, read at commit
57e2dfaa5a46f9050d76f306a4fcd9a7c061f520. Published (paper Table 2 / classification README, ImageNet-1k, 224 px):

    model       params       GFLOPs   top-1
    PVT-Tiny    13,229,288   1.9      75.1
    PVT-Small   24,485,864   3.8      79.8

The exact parameter counts are the official `pvt_tiny` / `pvt_small` constructors with 1000 classes (README: 13.2M,
24.5M); HF transformers' default `PvtConfig` (= PVT-Tiny, with `num_labels=1000`) gives the same count. vitlab counts
1.93 GMACs for PVT-Tiny and 3.82 GMACs for PVT-Small at 224 px (`vitlab.profiling.count_flops`, attention included,
as the official `get_flops.py` adds it to mmcv's count): +1.7 % and +0.4 % over the published "GFLOPs"
(multiply-adds).

Differences between implementations, kept as arguments with the official default:
  * `pos_embed_interp="bilinear"`, `pos_embed_antialias=False`: how the position embeddings are resized for another
    input size (official: bilinear, no antialias; timm's ViTs: bicubic with antialias).
  * `inner_norm_eps=1e-5`: the patch-embedding and spatial-reduction LayerNorms are torch's default `nn.LayerNorm` in
    the official code, while the block and final norms use eps 1e-6 (`norm_eps`). HF transformers uses
    `layer_norm_eps` (1e-6) for all of them; the HF converter sets `inner_norm_eps` accordingly.
  * HF's `PvtEfficientSelfAttention` has separate key/value layers; the official (and vitlab's) `attn.kv` is one layer,
    so the HF converter concatenates them.

Checked against (`tests/models/test_zoo_pvt.py`): HF transformers 5.24 `PvtForImageClassification`, random init, weights
copied by the converter `_pvt_from_hf`: logits within 1e-4 (max diff ~2e-6) for a small config at its 64 px and
(slow test) for the default config = PVT-Tiny at 224 px; HF's PVT cannot change resolution correctly (it reshapes the
stored position embedding to the new grid), so only its configured size is compared. And the official code (commit
above) run locally on a tiny configuration at its own size and at another size (bilinear position-embedding resize),
its state dict loaded through `checkpoint_filter_fn` (fixture `tests/fixtures/zoo/pvt/`, max diff ~2e-6).

    >>> import timm, torch, vitlab.models
    >>> model = timm.create_model("vl_test_pvt", num_classes=10).eval()
    >>> model(torch.randn(1, 3, 64, 64)).shape
    torch.Size([1, 10])
"""
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, get_act_layer, resample_abs_pos_embed, to_2tuple, trunc_normal_, use_fused_attn
from timm.models import generate_default_cfgs, register_model
from timm.models._manipulate import checkpoint

from ..checkpoint import create_model
from ._builder import build_vitlab_model, imagenet_cfg
from ._convert import register_hf_converter
from ._staged import StagedTokenModel, tokens_to_map

__all__ = ["PyramidVisionTransformer", "checkpoint_filter_fn", "vl_pvt_tiny", "vl_pvt_small", "vl_test_pvt"]


class PatchEmbed(nn.Module):
    """Non-overlapping patches (conv, kernel = stride = patch_size), then LayerNorm: NCHW -> (B, H*W, C), (H, W)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, norm_eps: float):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=to_2tuple(patch_size), stride=to_2tuple(patch_size))
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)  # (B, C, H, W), channels-last strides after the first stage (see _tokens_to_map)
        B, C, H, W = x.shape
        x = x.permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, H*W, C): a view for a channels-last x
        return self.norm(x), (H, W)


class SpatialReductionAttention(nn.Module):
    """Multi-head attention whose K/V come from the token grid shrunk `sr_ratio` times by a strided conv + LN."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            qkv_bias: bool = True,
            sr_ratio: int = 1,
            attn_drop: float = 0.0,
            proj_drop: float = 0.0,
            norm_eps: float = 1e-5,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = use_fused_attn()
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=norm_eps)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        q = self.q(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, N, d)
        if self.sr_ratio > 1:
            x = tokens_to_map(x, hw, 0)  # no prefix tokens in reduced stages
            x = self.norm(self.sr(x).flatten(2).transpose(1, 2))  # (B, N', C), contiguous: the conv keeps channels-last
        kv = self.kv(x).view(B, -1, 2, self.num_heads, self.head_dim)  # (B, N', 2, h, d)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, N', d) each
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, h, N, N')
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    """Pre-norm transformer block with spatial-reduction attention."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            sr_ratio: int = 1,
            proj_drop: float = 0.0,
            attn_drop: float = 0.0,
            drop_path: float = 0.0,
            act_layer: type[nn.Module] = nn.GELU,
            norm_eps: float = 1e-6,
            inner_norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = SpatialReductionAttention(dim, num_heads, qkv_bias, sr_ratio, attn_drop, proj_drop, inner_norm_eps)
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
        `mlp_chunk_elems` elements: fresh buffers of tens of MB are slow to fault in and overflow the caches
        (PVT-Tiny at batch 8, 2 threads: about 1.4x faster overall; its first stage has 3136 tokens x 512 hidden)."""
        B, N, C = x.shape
        chunks = B * N * self.mlp.fc1.out_features // self.mlp_chunk_elems
        if chunks < 2 or x.device.type != "cpu" or torch.is_grad_enabled():
            return self.mlp(x)
        return torch.cat([self.mlp(part) for part in x.reshape(B * N, C).chunk(chunks)]).view(B, N, C)


class PvtStage(nn.Module):
    """PatchEmbed, optional class token, position embedding (resized to the input's grid), blocks.

    NCHW in; tokens (B, prefix + H*W, C) and (H, W) out.
    """

    def __init__(
            self,
            in_chans: int,
            dim: int,
            depth: int,
            num_heads: int,
            patch_size: int,
            grid_size: tuple[int, int],
            cls_token: bool = False,
            drop_path: Sequence[float] = (),
            drop_rate: float = 0.0,
            pos_embed_interp: str = "bilinear",
            pos_embed_antialias: bool = False,
            inner_norm_eps: float = 1e-5,
            **block_kwargs,
    ):
        super().__init__()
        self.patch_embed = PatchEmbed(in_chans, dim, patch_size, inner_norm_eps)
        self.grid_size = grid_size
        self.num_prefix_tokens = int(cls_token)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + grid_size[0] * grid_size[1], dim))
        self.pos_embed_interp = pos_embed_interp
        self.pos_embed_antialias = pos_embed_antialias
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, drop_path=drop_path[i], inner_norm_eps=inner_norm_eps, **block_kwargs)
            for i in range(depth))
        self.grad_checkpointing = False

    def _pos_embed(self, hw: tuple[int, int]) -> torch.Tensor:
        return resample_abs_pos_embed(  # returns self.pos_embed itself when hw == grid_size
            self.pos_embed, new_size=hw, old_size=self.grid_size, num_prefix_tokens=self.num_prefix_tokens,
            interpolation=self.pos_embed_interp, antialias=self.pos_embed_antialias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x, hw = self.patch_embed(x)  # (B, H*W, C)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + self._pos_embed(hw))
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, hw)
            else:
                x = block(x, hw)
        return x, hw


class PyramidVisionTransformer(StagedTokenModel):
    """PVT v1. `forward_features` returns the last stage's tokens after the final LayerNorm, class token first."""

    family_name = "PVT"
    stem_pattern = r"^stages\.0\.(patch_embed|pos_embed)"
    token_pool_hint = "the class token (cls_token=True)"

    def __init__(
            self,
            img_size: Union[int, tuple[int, int]] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: Optional[str] = None,
            patch_size: int = 4,
            embed_dims: Sequence[int] = (64, 128, 320, 512),
            depths: Sequence[int] = (2, 2, 2, 2),
            num_heads: Sequence[int] = (1, 2, 5, 8),
            mlp_ratios: Sequence[float] = (8, 8, 4, 4),
            sr_ratios: Sequence[int] = (8, 4, 2, 1),
            qkv_bias: bool = True,
            cls_token: bool = True,
            act_layer: Union[str, type[nn.Module]] = "gelu",
            norm_eps: float = 1e-6,
            inner_norm_eps: float = 1e-5,
            pos_embed_interp: str = "bilinear",
            pos_embed_antialias: bool = False,
            drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
    ):
        """`img_size` sets the position-embedding grids (input / (patch_size * 2**i) per stage); other input sizes
        resize them. `cls_token`: a class token in the last stage (official); without it the head averages."""
        super().__init__()
        n = len(depths)
        if cls_token and sr_ratios[-1] != 1:
            raise ValueError(f"cls_token=True needs sr_ratios[-1] == 1 (got {sr_ratios[-1]}): the class token "
                             "cannot go through the spatial-reduction conv")
        img_size = to_2tuple(img_size)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_prefix_tokens = int(cls_token)
        self.global_pool = global_pool if global_pool is not None else ("token" if cls_token else "avg")
        self._check_pool(self.global_pool)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        act_layer = get_act_layer(act_layer)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # meta-device safe

        self.feature_info = []
        stages, prev, reduction = [], in_chans, 1
        for i in range(n):
            stride = patch_size if i == 0 else 2
            reduction *= stride
            stages.append(PvtStage(
                prev, embed_dims[i], depths[i], num_heads[i], stride,
                grid_size=(img_size[0] // reduction, img_size[1] // reduction),
                cls_token=cls_token and i == n - 1, drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])],
                drop_rate=drop_rate, pos_embed_interp=pos_embed_interp, pos_embed_antialias=pos_embed_antialias,
                inner_norm_eps=inner_norm_eps, mlp_ratio=mlp_ratios[i], qkv_bias=qkv_bias, sr_ratio=sr_ratios[i],
                proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, act_layer=act_layer, norm_eps=norm_eps))
            prev = embed_dims[i]
            self.feature_info.append(dict(num_chs=prev, reduction=reduction, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(prev, eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(prev, num_classes) if num_classes > 0 else nn.Identity()

        for stage in self.stages:
            trunc_normal_(stage.pos_embed, std=0.02)
            if stage.cls_token is not None:
                trunc_normal_(stage.cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # official init: trunc-normal Linear weights, zero biases, unit LayerNorms; convs keep torch's default init
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)



# --- official checkpoints -------------------------------------------------------------------------------------

def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map an official PVT v1 state dict (whai362/PVT `classification/pvt.py`) to vitlab's layout.

    `patch_embed{i}.*` / `pos_embed{i}` / `block{i}.{j}.*` (1-based) become `stages.{i-1}.patch_embed.*` /
    `.pos_embed` / `.blocks.{j}.*`; `cls_token` moves to the last stage. Position embeddings saved for another
    `img_size` than the model's are resized the way the model resizes them at run time. A state dict already in
    vitlab's layout is returned unchanged.
    """
    if isinstance(state_dict.get("model"), dict):
        state_dict = state_dict["model"]
    if any(k.startswith("stages.") for k in state_dict):
        return state_dict
    last = len(model.stages) - 1
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")  # saved from DistributedDataParallel
        if key == "cls_token":
            key = f"stages.{last}.cls_token"
        else:
            for old, new in (("patch_embed", ".patch_embed"), ("pos_embed", ".pos_embed"), ("block", ".blocks")):
                if key.startswith(old) and key[len(old)].isdigit():
                    index, _, rest = key[len(old):].partition(".")
                    key = f"stages.{int(index) - 1}{new}" + (f".{rest}" if rest else "")
                    break
        out[key] = value
    for i, stage in enumerate(model.stages):
        key = f"stages.{i}.pos_embed"
        if key in out and out[key].shape != stage.pos_embed.shape:
            num_grid = out[key].shape[1] - stage.num_prefix_tokens
            side = int(num_grid ** 0.5)
            if side * side != num_grid:
                raise ValueError(f"{key}: cannot resize a non-square {tuple(out[key].shape)} position embedding")
            out[key] = resample_abs_pos_embed(
                out[key], new_size=stage.grid_size, old_size=(side, side), num_prefix_tokens=stage.num_prefix_tokens,
                interpolation=stage.pos_embed_interp, antialias=stage.pos_embed_antialias)
    return out


# --- Hugging Face transformers --------------------------------------------------------------------------------

_HF_KEYS = (  # (HF substring, vitlab substring), applied in order
    (".layer_norm_1.", ".norm1."),
    (".layer_norm_2.", ".norm2."),
    (".attention.self.query.", ".attn.q."),
    (".attention.self.sequence_reduction.", ".attn.sr."),
    (".attention.self.layer_norm.", ".attn.norm."),
    (".attention.output.dense.", ".attn.proj."),
    (".mlp.dense1.", ".mlp.fc1."),
    (".mlp.dense2.", ".mlp.fc2."),
)
_HF_EMBED = {"projection": "patch_embed.proj", "layer_norm": "patch_embed.norm", "position_embeddings": "pos_embed",
             "cls_token": "cls_token"}


def _hf_key(key: str) -> str:
    if key.startswith("pvt.encoder.layer_norm."):
        return "norm." + key.rsplit(".", 1)[1]
    if key.startswith("classifier."):
        return "head." + key.rsplit(".", 1)[1]
    if key.startswith("pvt.encoder.patch_embeddings."):
        i, name = key.split(".", 4)[3:]  # e.g. "0", "projection.weight" / "cls_token"
        module, _, tail = name.partition(".")
        return f"stages.{i}.{_HF_EMBED[module]}" + (f".{tail}" if tail else "")
    if key.startswith("pvt.encoder.block."):
        i, j, rest = key.split(".", 5)[3:]
        key = f"stages.{i}.blocks.{j}.{rest}"
        for old, new in _HF_KEYS:
            key = key.replace(old, new)
    return key


@register_hf_converter("pvt")
def _pvt_from_hf(hf_model) -> PyramidVisionTransformer:
    """vitlab PVT v1 with the weights of a transformers `PvtForImageClassification` (separate K/V layers joined)."""
    config = hf_model.config
    n = config.num_encoder_blocks
    if list(config.patch_sizes) != list(config.strides) or any(p != 2 for p in config.patch_sizes[1:]):
        raise ValueError(f"patch_sizes={config.patch_sizes}, strides={config.strides}: vitlab's PVT v1 uses "
                         "non-overlapping patches, 2 after the first stage (as the official code does)")
    if config.hidden_act != "gelu":
        raise ValueError(f"hidden_act={config.hidden_act!r}: only 'gelu' converts")
    arch = dict(
        img_size=config.image_size, in_chans=config.num_channels, num_classes=config.num_labels,
        patch_size=config.patch_sizes[0], embed_dims=tuple(config.hidden_sizes[:n]), depths=tuple(config.depths[:n]),
        num_heads=tuple(config.num_attention_heads[:n]), mlp_ratios=tuple(config.mlp_ratios[:n]),
        sr_ratios=tuple(config.sequence_reduction_ratios[:n]), qkv_bias=config.qkv_bias,
        norm_eps=config.layer_norm_eps, inner_norm_eps=config.layer_norm_eps,  # HF: one eps for every LayerNorm
    )
    size = to_2tuple(config.image_size)
    model = create_model("vl_pvt_tiny", pretrained_cfg_overlay=dict(input_size=(config.num_channels, *size)), **arch)
    hf_state, state = hf_model.state_dict(), {}
    for key, value in hf_state.items():
        if ".attention.self.key." in key or ".attention.self.value." in key:
            continue
        if ".attention.self.query." in key:  # HF's separate key/value layers -> one kv layer (keys first)
            kv = [hf_state[key.replace(".query.", name)] for name in (".key.", ".value.")]
            state[_hf_key(key).replace(".attn.q.", ".attn.kv.")] = torch.cat(kv, dim=0)
        state[_hf_key(key)] = value
    model.load_state_dict(state, strict=True)
    return model


# --- registry -------------------------------------------------------------------------------------------------

def _cfg(**kwargs) -> dict:
    return imagenet_cfg(**{
        "first_conv": "stages.0.patch_embed.proj", "paper_ids": "arXiv:2102.12122",
        "origin_url": "https://github.com/whai362/PVT", "license": "apache-2.0",
        **kwargs,
    })


default_cfgs = generate_default_cfgs({
    "vl_pvt_tiny": _cfg(),
    "vl_pvt_small": _cfg(),
    "vl_test_pvt": _cfg(input_size=(3, 64, 64), num_classes=10),
})


def _create_pvt(variant: str, pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    return build_vitlab_model(PyramidVisionTransformer, variant, pretrained, filter_fn=checkpoint_filter_fn,
                              default_out_indices=tuple(range(len(kwargs.get("depths", (2, 2, 2, 2))))), **kwargs)


@register_model
def vl_pvt_tiny(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    """PVT-Tiny (Wang et al., 2021): 13,229,288 params, 1.9 GMACs at 224 (paper's "GFLOPs"), 75.1 % top-1."""
    arch = dict(embed_dims=(64, 128, 320, 512), depths=(2, 2, 2, 2), num_heads=(1, 2, 5, 8))
    return _create_pvt("vl_pvt_tiny", pretrained, **dict(arch, **kwargs))


@register_model
def vl_pvt_small(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    """PVT-Small (Wang et al., 2021): 24,485,864 params, 3.8 GMACs at 224 (paper's "GFLOPs"), 79.8 % top-1."""
    arch = dict(embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3), num_heads=(1, 2, 5, 8))
    return _create_pvt("vl_pvt_small", pretrained, **dict(arch, **kwargs))


@register_model
def vl_test_pvt(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    """Tiny PVT for tests: widths 32/32/64/64, one block per stage, 64 px input (2x2 tokens + class token last)."""
    arch = dict(img_size=64, embed_dims=(32, 32, 64, 64), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2),
                mlp_ratios=(2, 2, 2, 2))
    return _create_pvt("vl_test_pvt", pretrained, **dict(arch, **kwargs))
