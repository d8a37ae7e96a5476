"""TurboViT: Generating Fast Vision Transformers via Generative Architecture Search (Wong, Abbasi & Nair, 2023,
arXiv:2308.11421).

What the paper gives, and what is public: TurboViT is "a highly efficient hierarchical vision transformer
architecture design that is generated around mask unit attention and Q-pooling design patterns" (the abstract),
i.e. built from Hiera's blocks (Ryali et al., ICML 2023). Its claims: >2.47x smaller than FasterViT-0 at the same
ImageNet-1k accuracy, >3.4x fewer FLOPs and +0.9% top-1 over MobileViTv2-2.0, >3.21x lower latency and >3.18x
higher throughput than FasterViT-0 at low latency. The generated architecture (stage widths, depths, heads, unit
sizes) and its own parameter / FLOP / top-1 figures are NOT available here: searched (Dec 2026) the stored pages
and docs (arXiv / Hugging Face / papers-with-code / emergentmind / tomesphere abstract pages: abstract only;
papers-with-code: "No code implementations yet"), the code index (find_string "TurboViT": no model code;
find_repos "turbovit": unrelated repositories) and the seed catalog (row 14: "final spec not public"). The
generative architecture search itself (GenSynth-style) is out of scope for a model library.

So this file implements the stated design, not the generated network:

* the architecture family: Hiera's hierarchy exactly, reusing timm's `HieraBlock` and `MaskUnitAttention`
  (timm/models/hiera.py, timm 1.0.31, a port of github.com/facebookresearch/hiera): a 7x7 stride-4 patch embedding
  plus an absolute position embedding; four stages; each later stage opens with a block that widens the channels
  (a Linear on the normalised tokens) and max-pools them 2x2 (Q-pooling: queries and residual are pooled, keys and
  values are not); blocks of the mask-unit stages attend only within their mask unit (8x8 tokens at stride 4,
  shrinking with each pooling), later stages globally, and a stage-opening block uses the previous stage's kind
  (Hiera's one-block lag); the head pools, normalises and classifies (timm's `ClNormMlpClassifierHead`);
* `vl_turbovit_proxy`: Hiera-T's topology (depths 1-2-7-2, heads 1-2-4-8, MLP ratio 4, three poolings, 8x8 mask
  units) at width 64 (64-128-256-512). A stand-in sized to the bounds the abstract implies, not the generated net:
  FasterViT-0 has 31.4M params, 3.3 GFLOPs, 82.1% top-1 (NVlabs/FasterViT README), so TurboViT has < 12.7M params
  (31.4M / 2.47); MobileViTv2-2.0 has 7.5 GFLOPs (its paper; 7.16 GMACs at 256 counted here on timm's
  `mobilevitv2_200`, 18,449,329 params) and 81.2% top-1, so TurboViT has < 2.21 GFLOPs (7.5G / 3.4) and 82.1% top-1
  (81.2 + 0.9, FasterViT-0's). The proxy is not trained.

| variant | params (1000 classes) | MACs at 224 | top-1 (IN-1k) |
|---|---|---|---|
| `vl_turbovit_proxy` (stand-in) | 12,659,752 (bound < 12.71M) | 2.246G (bound < 2.206G: +1.8%) | untrained (82.1%) |

Nothing here is the generated net's own figure: the paper's table is not available offline.

Layout. Hiera keeps its tokens "unrolled" (stride offsets outermost, mask units innermost) through the whole
network so that pooling and unit attention are views; here every block takes and returns an NHWC map, as vitlab's
other hierarchical families do, and orders its tokens the way Hiera's layers expect just around the block
(`mask_unit_order` / `grid_order`: one permuted copy each way). Attention has no position bias, so the order
inside a unit does not change its result; the stride offset comes first, as Hiera's pooling needs. A stage's
opening block is its `downsample` (stages.s.downsample), so the blocks of a stage keep its grid. The position
embedding is resampled (bicubic) when the input's token grid differs from the configured one; the grid must split
into whole mask units at every stage (input sides a multiple of 32 with 8x8 units).

Checked (tests/models/test_zoo_turbovit.py): the official Hiera code (github.com/facebookresearch/hiera, hiera/hiera.py,
commit b12b842542ee5c757fcfec8c41f6b56fcbe89b65) run locally on a tiny three-stage config (pooled and unpooled
mask-unit blocks, the lagged opening block, a global block, a non-square input), committed as a fixture in the
official key layout and loaded through `checkpoint_filter_fn` (its `norm` / `head.projection` names; Hiera's flat
`blocks.i`): logits within 1e-4 (4.8e-7 here); timm's `Hiera` of the same configuration on a tiny four-stage
config with layer scale and on the proxy (equal within 1e-5 / exactly); the proxy's exact parameter count and the
implied bounds (params; MACs within 2 %); mask-unit locality (a change inside one unit of a mask-unit block's
input, pooled or not, leaves every other unit's output unchanged, while a global block spreads it); Q-pooling
equal to a 2x2 max pool of the widened residual; token-order round trips; gray (in_chans=1) loading through
timm's builder. The official head applies a softmax in eval mode; here, as in timm, the model returns logits.
"""
from functools import partial
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.layers import ClNormMlpClassifierHead, resample_abs_pos_embed, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models.hiera import HieraBlock

from ._builder import build_vitlab_model, imagenet_cfg
from ._staged import NHWCStageModel

__all__ = ["TurboViT", "TurboViTStage", "MaskUnitBlock", "mask_unit_order", "grid_order", "checkpoint_filter_fn",
           "vl_turbovit_proxy", "vl_test_turbovit"]


# --- token order: pure tensor functions -------------------------------------------------------------------

def mask_unit_order(x: torch.Tensor, unit: Tuple[int, int], stride: Tuple[int, int]) -> torch.Tensor:
    """(B, H, W, C) -> (B, H*W, C) ordered (stride offset, position in unit, unit index), Hiera's unrolled order.

    `unit` is a mask unit's size in tokens after pooling by `stride`, so a unit covers unit * stride input tokens.
    """
    B, H, W, C = x.shape
    (uy, ux), (sy, sx) = unit, stride
    if H % (uy * sy) or W % (ux * sx):
        raise ValueError(f"a {H}x{W} token grid does not split into {uy * sy}x{ux * sx} mask units; use an input "
                         "whose token grid (size / patch stride) is a multiple of the mask unit size")
    x = x.view(B, H // (uy * sy), uy, sy, W // (ux * sx), ux, sx, C)  # (B, ny, uy, sy, nx, ux, sx, C)
    return x.permute(0, 3, 6, 2, 5, 1, 4, 7).reshape(B, H * W, C)  # (B, sy*sx*uy*ux*ny*nx, C)


def grid_order(x: torch.Tensor, units: Tuple[int, int], unit: Tuple[int, int]) -> torch.Tensor:
    """Inverse of `mask_unit_order` after pooling: (B, uy*ux*ny*nx, C) -> (B, ny*uy, nx*ux, C)."""
    B, _, C = x.shape
    (ny, nx), (uy, ux) = units, unit
    x = x.view(B, uy, ux, ny, nx, C)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(B, ny * uy, nx * ux, C)


# --- blocks -----------------------------------------------------------------------------------------------

class MaskUnitBlock(HieraBlock):
    """timm's HieraBlock on an NHWC map: attention within mask units of `unit` tokens, or over the whole map."""

    def __init__(self, dim: int, dim_out: int, heads: int, unit: Sequence[int], stride: Sequence[int] = (1, 1),
                 use_mask_unit_attn: bool = False, **kwargs):
        super().__init__(dim, dim_out, heads, q_stride=stride[0] * stride[1], window_size=unit[0] * unit[1],
                         use_mask_unit_attn=use_mask_unit_attn, **kwargs)
        self.unit, self.stride = tuple(unit), tuple(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, H, W, _ = x.shape
        (sy, sx) = self.stride
        unit = self.unit if self.attn.use_mask_unit_attn else (H // sy, W // sx)  # global: one unit, the map
        units = (H // (unit[0] * sy), W // (unit[1] * sx))
        return grid_order(super().forward(mask_unit_order(x, unit, self.stride)), units, unit)  # (B, H/sy, W/sx, C')


class TurboViTStage(nn.Module):
    """A stage: its opening block (`downsample`: widens the channels and, Q-pooling, max-pools queries and residual
    2x2; Identity in the first stage), then blocks that keep the grid."""

    def __init__(self, downsample: nn.Module, blocks: Sequence[nn.Module]):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))  # (B, H, W, C)


# --- model ------------------------------------------------------------------------------------------------

class TurboViT(NHWCStageModel):
    """Hiera-style hierarchy: patch embedding + position embedding, mask-unit and global stages joined by Q-pooling
    blocks, then pool -> LayerNorm -> Linear."""

    def __init__(
            self,
            img_size: int | Tuple[int, int] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            embed_dims: Sequence[int] = (64, 128, 256, 512),
            depths: Sequence[int] = (1, 2, 7, 2),
            num_heads: Sequence[int] = (1, 2, 4, 8),
            mask_unit_attn: Sequence[bool] = (True, True, False, False),
            mask_unit_size: Sequence[int] = (8, 8),
            q_pool: int = 3,
            q_stride: Sequence[int] = (2, 2),
            mlp_ratio: float = 4.0,
            patch_kernel: Sequence[int] = (7, 7),
            patch_stride: Sequence[int] = (4, 4),
            patch_padding: Sequence[int] = (3, 3),
            init_values: Optional[float] = None,
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            norm_layer: type[nn.Module] = partial(nn.LayerNorm, eps=1e-6),
    ):
        super().__init__()
        per_stage = (embed_dims, depths, num_heads, mask_unit_attn)
        if len({len(s) for s in per_stage}) != 1:
            raise ValueError("embed_dims, depths, num_heads and mask_unit_attn need one entry per stage, got lengths "
                             f"{[len(s) for s in per_stage]}")
        if not 0 <= q_pool < len(depths):
            raise ValueError(f"q_pool (stages that pool) must be in [0, {len(depths) - 1}], got {q_pool}")
        if any(embed_dims[s] == embed_dims[s - 1] for s in range(1, q_pool + 1)):
            raise ValueError(f"embed_dims {tuple(embed_dims)}: a pooling stage must change the width (HieraBlock "
                             "pools its residual only where it projects it to the new width)")
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.num_classes = num_classes
        self.grid_size = (img_size[0] // patch_stride[0], img_size[1] // patch_stride[1])
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dims[0], tuple(patch_kernel), tuple(patch_stride),
                                          tuple(patch_padding))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], embed_dims[0]))
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        unit, reduction, stages, self.feature_info = tuple(mask_unit_size), patch_stride[0], [], []
        for s, depth in enumerate(depths):
            blocks = []
            for j in range(depth):
                opens = s > 0 and j == 0
                pools = opens and s <= q_pool
                if pools:
                    unit = (unit[0] // q_stride[0], unit[1] // q_stride[1])
                    reduction *= q_stride[0]
                blocks.append(MaskUnitBlock(
                    embed_dims[s - 1] if opens else embed_dims[s], embed_dims[s], num_heads[s], unit,
                    tuple(q_stride) if pools else (1, 1),
                    use_mask_unit_attn=mask_unit_attn[s - 1] if opens else mask_unit_attn[s],  # lags one block
                    mlp_ratio=mlp_ratio, drop_path=dpr[sum(depths[:s]) + j], init_values=init_values,
                    norm_layer=norm_layer))
            stages.append(TurboViTStage(blocks.pop(0) if s > 0 else nn.Identity(), blocks))
            self.feature_info.append(dict(num_chs=embed_dims[s], reduction=reduction, module=f"stages.{s}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.norm = nn.Identity()  # Hiera normalises after pooling, in the head
        self.head = ClNormMlpClassifierHead(self.num_features, num_classes, pool_type=global_pool,
                                            drop_rate=drop_rate, norm_layer=norm_layer, input_fmt="NHWC")
        trunc_normal_(self.pos_embed, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        B, H, W, C = x.shape
        pos = self.pos_embed
        if (H, W) != self.grid_size:
            pos = resample_abs_pos_embed(pos, new_size=[H, W], old_size=list(self.grid_size), num_prefix_tokens=0)
        return x + pos.view(1, H, W, C)


# --- converter --------------------------------------------------------------------------------------------

def checkpoint_filter_fn(state_dict: dict, model: TurboViT) -> dict:
    """Hiera state dict (timm's, or facebookresearch/hiera's `head.projection` / `norm`) -> vitlab's stage layout.

    Hiera numbers its blocks `blocks.i` over the whole network; here a stage's opening block is `stages.s.downsample`
    and the others `stages.s.blocks.j`. Identity on a state dict already in vitlab's layout. Accepts
    {"model" / "model_state" / "state_dict": ...} wrappers.
    """
    for wrapper in ("model", "model_state", "state_dict"):
        state_dict = state_dict.get(wrapper, state_dict)
    if not any(k.startswith("blocks.") for k in state_dict):
        return state_dict
    where = [f"stages.{s}.downsample" if s and not j else f"stages.{s}.blocks.{j - bool(s)}"
             for s, stage in enumerate(model.stages) for j in range(len(stage.blocks) + bool(s))]
    out = {}
    for key, value in state_dict.items():
        if key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            key = f"{where[int(index)]}.{rest}"
        elif key.startswith(("norm.", "encoder_norm.")):
            key = "head.norm." + key.split(".", 1)[1]
        elif key.startswith("head.projection."):
            key = "head.fc." + key[len("head.projection."):]
        out[key] = value
    return out


# --- registry ---------------------------------------------------------------------------------------------

def _cfg(**kwargs) -> dict:
    return imagenet_cfg(**{"pool_size": (7, 7), "crop_pct": 0.9, "first_conv": "patch_embed.proj",
                           "classifier": "head.fc", "license": "unknown", "paper_ids": "arXiv:2308.11421", **kwargs})


default_cfgs = generate_default_cfgs({
    "vl_turbovit_proxy": _cfg(),
    "vl_test_turbovit": _cfg(input_size=(3, 64, 64), pool_size=(2, 2), num_classes=10),
})


def _create_turbovit(variant: str, pretrained: bool = False, **kwargs) -> TurboViT:
    return build_vitlab_model(TurboViT, variant, pretrained, filter_fn=checkpoint_filter_fn,
                              default_out_indices=tuple(range(len(kwargs.get("depths", (1, 2, 7, 2))))), **kwargs)


@register_model
def vl_turbovit_proxy(pretrained: bool = False, **kwargs) -> TurboViT:
    """Stand-in for TurboViT (its generated spec is unpublished): Hiera-T's topology at width 64, 12,659,752 params,
    2.25 GMACs at 224, sized to the abstract's implied bounds (< 12.7M params, 2.21 GFLOPs); not trained."""
    arch = dict(embed_dims=(64, 128, 256, 512), depths=(1, 2, 7, 2), num_heads=(1, 2, 4, 8))
    return _create_turbovit("vl_turbovit_proxy", pretrained, **dict(arch, **kwargs))


@register_model
def vl_test_turbovit(pretrained: bool = False, **kwargs) -> TurboViT:
    """Tiny TurboViT for tests: widths 32-40-48-64, depths 1-2-2-2, 8x8 mask units (2x2 of them at 64 px)."""
    arch = dict(img_size=64, embed_dims=(32, 40, 48, 64), depths=(1, 2, 2, 2), num_heads=(1, 2, 2, 4),
                num_classes=10)
    return _create_turbovit("vl_test_turbovit", pretrained, **dict(arch, **kwargs))
