"""CrossFormer++: A Versatile Vision Transformer Hinging on Cross-scale Attention (Wang et al., IEEE TPAMI 46(5) 2024,
arXiv 2303.06908).

CrossFormer (vitlab/models/crossformer.py: cross-scale embedding, alternating short/long distance group attention,
dynamic position bias) plus two changes:

* Progressive Group Size (PGS): attention maps widen with depth, so shallow stages use small groups (4 x 4) and deep
  stages large ones (14 x 14 and 7 x 7: at 224 px the whole 14 x 14 / 7 x 7 map is one group, i.e. global attention);
  the LDA interval shrinks to match (4, 2, 1, 1). The released configs fix one group size per stage
  (`GROUP_TYPE: constant` with GROUP_SIZE [4, 4, 14, 7]); that is what is built here.
* Amplitude Cooling Layer (ACL): the residual stream's amplitude grows with depth, so after every third block of a
  stage (never its last) a depthwise 3x3 conv followed by LayerNorm *replaces* the stream (no shortcut around it),
  resetting its scale.

Official code: github.com/cheerss/CrossFormer, `models/crossformer.py` (one `CrossFormer` class; `use_acl=True` adds
`ex_conv` / `ex_ln` to the blocks) with `configs/crossformer_pp/{small,base,large,huge}_patch4_group_const_224.yaml`,
commit 795201075f0066e78408882617312084e25aef61.

| variant | params (1000 classes) = official constructor | ACLs | MACs at 224: here / official `flops()` | README |
|---|---|---|---|---|
| CrossFormer++-S (`vl_crossformer_pp_s`) | 23,325,340 | 5 | 4.43G / 4.39G | 23.3M, 4.9G, 83.2% |
| CrossFormer++-B (`vl_crossformer_pp_b`) | 51,994,594 | 5 | 9.59G / 9.50G | 52.0M, 9.5G, 84.2% |
| CrossFormer++-L (`vl_crossformer_pp_l`) | 92,001,904 | 5 | 16.72G / 16.57G | 92.0M, 16.6G, 84.7% |
| CrossFormer++-H (`vl_crossformer_pp_h`) | 95,962,944 | 7 | 22.00G / 21.59G | 96.0M, 21.8G, 84.9% |

(README: params, FLOPs, ImageNet-1k top-1 of the official checkpoints.) MACs here are counted with
`vitlab.profiling.count_flops`; the official `flops()` (run locally) counts no padded tokens (stage 1's LDA pads the
56 x 56 map to 64 x 64 for 4 x 4 groups every 4 pixels, stage 2's 28 x 28 to 32 x 32) nor the ACL convs: 0.9-1.9 %
less.
The README's 4.9G for S matches neither (its own `flops()` gives 4.39G) and equals CrossFormer-S's; it is taken to be
a copy error.

What differs from the official code: as in vitlab's CrossFormer, group sizes, the SDA/LDA switch and padding masks
are derived from each input instead of being fixed at construction, so one model runs any input size (at a given
size it computes what the official model built for that size computes); the ACL is its own module (`cool.conv`,
`cool.norm`; `checkpoint_filter_fn` renames the official `ex_conv` / `ex_ln`). The official code's other group-size
schedules (`linear`, `linear_div`, `alter`, `7_14`) and its conditional position encoding (`USE_CPE`) are used by no
released config and are not implemented.

Checked against (tests/models/test_zoo_crossformer_pp.py): the official code run locally on a tiny two-stage config with an
ACL (32 px, and 40 px where SDA and LDA pad and mask), committed as a fixture loaded through `checkpoint_filter_fn`
(max logit difference 4e-8); exact parameter counts of the four official constructors with the released yaml
configs; the ACL positions and per-stage group sizes of the released configs.
"""
from functools import partial
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model

from ._builder import build_vitlab_model
from .crossformer import CrossFormer, CrossFormerBlock, CrossScaleMerging, _cfg
from .crossformer import checkpoint_filter_fn as _crossformer_filter_fn

__all__ = ["AmplitudeCooling", "CooledCrossFormerBlock", "CrossFormerPP", "acl_positions", "checkpoint_filter_fn",
           "vl_crossformer_pp_s", "vl_crossformer_pp_b", "vl_crossformer_pp_l", "vl_crossformer_pp_h",
           "vl_test_crossformer_pp"]


def acl_positions(depth: int, every: int = 3) -> List[bool]:
    """Which blocks of a `depth`-block stage end with an ACL: every `every`-th block, never the stage's last."""
    return [(i + 1) % every == 0 and i < depth - 1 for i in range(depth)]


class AmplitudeCooling(nn.Module):
    """ACL: depthwise k x k conv, then LayerNorm, on an NHWC map. Its output replaces the residual stream."""

    def __init__(self, dim: int, kernel_size: int = 3, norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = norm_layer(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))  # (B, H, W, C)


class CooledCrossFormerBlock(CrossFormerBlock):
    """A CrossFormer block followed by an ACL (not a residual block: its output is LN(dwconv(block(x))))."""

    def __init__(self, dim: int, num_heads: int, norm_layer: type[nn.Module] = nn.LayerNorm, **kwargs):
        super().__init__(dim, num_heads, norm_layer=norm_layer, **kwargs)
        self.cool = AmplitudeCooling(dim, norm_layer=norm_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cool(super().forward(x))


class CrossFormerPPStage(nn.Module):
    """Optional CEL downsampler, then alternating SDA/LDA blocks, every third (not the last) with an ACL."""

    def __init__(self, dim: int, out_dim: int, depth: int, merge_size: Optional[Sequence[int]],
                 drop_path: Sequence[float], norm_layer: type[nn.Module] = nn.LayerNorm, use_acl: bool = True,
                 **block_kwargs):
        super().__init__()
        self.downsample = CrossScaleMerging(dim, out_dim, merge_size, norm_layer) if merge_size else nn.Identity()
        cooled = acl_positions(depth) if use_acl else [False] * depth
        self.blocks = nn.Sequential(*[
            (CooledCrossFormerBlock if cooled[i] else CrossFormerBlock)(
                out_dim, lsda_flag=i % 2, drop_path=drop_path[i], norm_layer=norm_layer, **block_kwargs)
            for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class CrossFormerPP(CrossFormer):
    """CrossFormer++ classifier: CrossFormer with per-stage (progressive) group sizes and ACLs in its stages."""

    def __init__(self, *, use_acl: bool = True, **kwargs):
        super().__init__(stage_fn=partial(CrossFormerPPStage, use_acl=use_acl), **kwargs)


def checkpoint_filter_fn(state_dict: dict, model: CrossFormerPP) -> dict:
    """Official CrossFormer++ state dict -> vitlab's layout (CrossFormer's mapping, `ex_conv` / `ex_ln` -> `cool.*`).

    Identity on a state dict already in vitlab's layout; accepts the official {"model": ...} wrapper.
    """
    state_dict = _crossformer_filter_fn(state_dict, model)
    return {k.replace(".ex_conv.", ".cool.conv.").replace(".ex_ln.", ".cool.norm."): v for k, v in state_dict.items()}


default_cfgs = generate_default_cfgs({
    "vl_crossformer_pp_s": _cfg(paper_ids="arXiv:2303.06908"),
    "vl_crossformer_pp_b": _cfg(paper_ids="arXiv:2303.06908"),
    "vl_crossformer_pp_l": _cfg(paper_ids="arXiv:2303.06908"),
    "vl_crossformer_pp_h": _cfg(paper_ids="arXiv:2303.06908"),
    "vl_test_crossformer_pp": _cfg(input_size=(3, 64, 64), pool_size=(8, 8), num_classes=10,
                                   first_conv=("patch_embed.projs.0", "patch_embed.projs.1")),   # its 2 patch sizes
})

# the released configs: PGS group sizes and LDA intervals per stage
_PGS = dict(group_size=(4, 4, 14, 7), crs_interval=(4, 2, 1, 1))


def _create_crossformer_pp(variant: str, pretrained: bool = False, **kwargs) -> CrossFormerPP:
    return build_vitlab_model(CrossFormerPP, variant, pretrained, filter_fn=checkpoint_filter_fn,
                              default_out_indices=tuple(range(len(kwargs.get("depths", (1, 1, 8, 6))))),
                              exclude=("act_layer", "norm_layer"), **kwargs)


@register_model
def vl_crossformer_pp_s(pretrained: bool = False, **kwargs) -> CrossFormerPP:
    """CrossFormer++-S: 23,325,340 params, 4.43 GMACs at 224 (README 23.3M / 4.9G), 83.2% top-1 (official, IN-1k)."""
    arch = dict(embed_dim=64, depths=(2, 2, 18, 2), num_heads=(2, 4, 8, 16), **_PGS)
    return _create_crossformer_pp("vl_crossformer_pp_s", pretrained, **dict(arch, **kwargs))


@register_model
def vl_crossformer_pp_b(pretrained: bool = False, **kwargs) -> CrossFormerPP:
    """CrossFormer++-B: 51,994,594 params, 9.59 GMACs at 224 (README 52.0M / 9.5G), 84.2% top-1 (official, IN-1k)."""
    arch = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), **_PGS)
    return _create_crossformer_pp("vl_crossformer_pp_b", pretrained, **dict(arch, **kwargs))


@register_model
def vl_crossformer_pp_l(pretrained: bool = False, **kwargs) -> CrossFormerPP:
    """CrossFormer++-L: 92,001,904 params, 16.72 GMACs at 224 (README 92.0M / 16.6G), 84.7% top-1 (official)."""
    arch = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), **_PGS)
    return _create_crossformer_pp("vl_crossformer_pp_l", pretrained, **dict(arch, **kwargs))


@register_model
def vl_crossformer_pp_h(pretrained: bool = False, **kwargs) -> CrossFormerPP:
    """CrossFormer++-H: 95,962,944 params, 22.00 GMACs at 224 (README 96.0M / 21.8G), 84.9% top-1 (official)."""
    arch = dict(embed_dim=128, depths=(6, 6, 18, 2), num_heads=(4, 8, 16, 32), **_PGS)
    return _create_crossformer_pp("vl_crossformer_pp_h", pretrained, **dict(arch, **kwargs))


@register_model
def vl_test_crossformer_pp(pretrained: bool = False, **kwargs) -> CrossFormerPP:
    """Tiny CrossFormer++ for tests: width 32, 1 + 4 blocks, 4x4 then 8x8 (global at 64 px) groups, one ACL, 64 px."""
    arch = dict(embed_dim=32, depths=(1, 4), num_heads=(2, 2), group_size=(4, 8), crs_interval=(2, 1),
                mlp_ratio=2.0, patch_size=(4, 8), merge_size=((2, 4),), num_classes=10)
    return _create_crossformer_pp("vl_test_crossformer_pp", pretrained, **dict(arch, **kwargs))
