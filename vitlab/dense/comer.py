"""ViT-CoMer (Xia et al., CVPR 2024): a plain ViT with a CNN feature pyramid that talks to it, for dense prediction.

Reference: Traffic-X/ViT-CoMer@b57f386, `segmentation/mmseg_custom/models/backbones/vit_comer.py` (`ViTCoMer`) and
`comer_modules.py` (`CNN`, `MRFP`, `MultiDWConv`, `ConvFFN`, `CTI_toV`, `CTI_toC`, `Extractor_CTI`, `CTIBlock`).

A small CNN (`SpatialPyramid`, the official `CNN`) gives maps c1..c4 at strides p/4, p/2, p, 2p of the ViT's patch
stride p. c2..c4 are flattened into one token sequence `c` (three levels, 4:1 / 1:4 cell ratios around the ViT grid).
The ViT's blocks are cut into 4 groups; around each group a `CTIBlock` runs

* MRFP (multi-receptive-field feature pyramid): Linear -> per level, 3x3 depthwise conv on half the channels and 5x5
  on the other half, BN, GELU -> GELU -> Linear, applied to `c` (no residual, as in the official code);
* CTI to ViT: the ViT tokens are added to the middle level of `c`, multi-scale deformable self-attention over the 3
  levels (`MSDeformAttn`, every `c` token queries at its own centre) + ConvFFN, then the 3 levels resampled to the
  ViT grid and summed are injected as `x + gamma * (...)`, gamma initialised to `init_values` = 0;
* the group of timm ViT blocks, on the class token(s) + patch tokens, unchanged;
* CTI to CNN: the new ViT tokens added to the middle level of `c`, then multi-scale deformable self-attention over
  `c` (+ ConvFFN); the last CTIBlock does 4 more of these (`extra_CTIs`, with a ConvFFN first).

With gamma = 0 the ViT stream is exactly timm's `VisionTransformer.forward_features` up to (not including) the final
norm: every block sees the tokens it sees in timm (tests/dense/test_dense_comer.py). Outputs: 4 maps of `embed_dim`
channels, c_i + the matching ViT output (after group i, bilinearly resized: x4, x2, x1, x0.5), each through BatchNorm.
Parity: the official ViTCoMer, run on CPU (its own pure-PyTorch `ms_deform_attn_core_pytorch` for the CUDA op) with
the same random weights (gamma != 0), gives the same 4 maps to 7e-6 (fixture tests/fixtures/comer/).

Differences from the official code: class and register tokens are kept and pass through the blocks untouched by the
CNN (the official model drops the class token); the CNN stem is cut to the patch stride (p = 16 as in the paper:
conv s2 + max-pool s2; p = 8: conv s2; p = 4: no downsampling), so the pyramid of a 64 px input to a stride-8 ViT is
32/16/8/4 px (strides 2/4/8/16); SyncBatchNorm is BatchNorm2d; level sizes come from the grid, not from N // 21.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from timm.models.vision_transformer import VisionTransformer

from ..errors import UserError
from .backbone import Backbone, _build
from .heads import DenseModel, get_head, register_model_head
from .msda import MSDeformAttn, level_start_index, reference_points

__all__ = ["ViTCoMer", "SpatialPyramid", "MRFP", "CTIBlock", "build_comer"]

Levels = list[tuple[int, int]]  # (H_l, W_l) of the 3 levels of `c`, finest first
_LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def _split(c: torch.Tensor, levels: Levels) -> list[torch.Tensor]:
    """(B, sum_l H_l*W_l, C) -> one (B, H_l*W_l, C) per level."""
    return list(c.split([h * w for h, w in levels], dim=1))


def _to_map(tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *size)


class DWConv(nn.Module):
    """One 3x3 depthwise conv applied to each level of `c` (official `DWConv`, shared weights across levels)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: torch.Tensor, levels: Levels) -> torch.Tensor:
        return torch.cat([self.dwconv(_to_map(t, s)).flatten(2).transpose(1, 2)
                          for t, s in zip(_split(x, levels), levels)], dim=1)


class MultiDWConv(nn.Module):
    """Per level: 3x3 depthwise conv on the first half of the channels, 5x5 on the second, BN, GELU (official)."""

    def __init__(self, dim: int):
        super().__init__()
        half = dim // 2
        for i in range(3):
            setattr(self, f"dwconv{2 * i + 1}", nn.Conv2d(half, half, 3, 1, 1, bias=True, groups=half))
            setattr(self, f"dwconv{2 * i + 2}", nn.Conv2d(dim - half, dim - half, 5, 1, 2, bias=True,
                                                          groups=dim - half))
            setattr(self, f"bn{i + 1}", nn.BatchNorm2d(dim))
            setattr(self, f"act{i + 1}", nn.GELU())

    def forward(self, x: torch.Tensor, levels: Levels) -> torch.Tensor:
        out = []
        for i, (t, size) in enumerate(zip(_split(x, levels), levels)):
            m = _to_map(t, size)  # (B, C, H_l, W_l)
            half = getattr(self, f"dwconv{2 * i + 1}").in_channels
            m = torch.cat([getattr(self, f"dwconv{2 * i + 1}")(m[:, :half]),
                           getattr(self, f"dwconv{2 * i + 2}")(m[:, half:])], dim=1)
            m = getattr(self, f"act{i + 1}")(getattr(self, f"bn{i + 1}")(m))
            out.append(m.flatten(2).transpose(1, 2))
        return torch.cat(out, dim=1)


class ConvFFN(nn.Module):
    """Linear -> depthwise conv per level -> GELU -> Linear (official `ConvFFN`; `MRFP` with `MultiDWConv`)."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0, multi_scale: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.dwconv = MultiDWConv(hidden_features) if multi_scale else DWConv(hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, levels: Levels) -> torch.Tensor:
        x = self.act(self.dwconv(self.fc1(x), levels))
        return self.drop(self.fc2(self.drop(x)))


class MRFP(ConvFFN):
    """Multi-receptive-field feature pyramid: a `ConvFFN` whose depthwise convs are 3x3 and 5x5 (`MultiDWConv`)."""

    def __init__(self, dim: int, hidden_features: int):
        super().__init__(dim, hidden_features, multi_scale=True)


class MultiscaleExtractor(nn.Module):
    """q + MSDeformAttn(norm(q), norm(feat)) [+ ConvFFN], official `MultiscaleExtractor`."""

    def __init__(self, dim: int, num_heads: int, n_points: int, n_levels: int, deform_ratio: float,
                 with_cffn: bool, cffn_ratio: float, drop: float, drop_path: float):
        super().__init__()
        self.query_norm = _LayerNorm(dim)
        self.feat_norm = _LayerNorm(dim)
        self.attn = MSDeformAttn(dim, n_levels, num_heads, n_points, deform_ratio)
        self.with_cffn = with_cffn
        if with_cffn:
            self.ffn = ConvFFN(dim, int(dim * cffn_ratio), drop)
            self.ffn_norm = _LayerNorm(dim)
            self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, query: torch.Tensor, ref: torch.Tensor, feat: torch.Tensor, shapes: torch.Tensor,
                starts: torch.Tensor, levels: Levels) -> torch.Tensor:
        query = query + self.attn(self.query_norm(query), ref, self.feat_norm(feat), shapes, starts)
        if self.with_cffn:
            query = query + self.drop_path(self.ffn(self.ffn_norm(query), levels))
        return query


class CTIToViT(nn.Module):
    """CNN -> ViT: deformable self-attention over `c` + ConvFFN, levels resized to the ViT grid, summed, scaled by
    the zero-initialised `gamma` and added to the patch tokens (official `CTI_toV`)."""

    def __init__(self, dim: int, num_heads: int, n_points: int, deform_ratio: float, init_values: float,
                 cffn_ratio: float, drop: float, drop_path: float):
        super().__init__()
        self.query_norm = _LayerNorm(dim)
        self.feat_norm = _LayerNorm(dim)
        self.attn = MSDeformAttn(dim, 3, num_heads, n_points, deform_ratio)
        self.gamma = nn.Parameter(init_values * torch.ones(dim))
        self.ffn = ConvFFN(dim, int(dim * cffn_ratio), drop)
        self.ffn_norm = _LayerNorm(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, ref: torch.Tensor, feat: torch.Tensor, shapes: torch.Tensor,
                starts: torch.Tensor, levels: Levels) -> torch.Tensor:
        c = self.attn(self.query_norm(feat), ref, self.feat_norm(feat), shapes, starts)
        c = c + self.drop_path(self.ffn(self.ffn_norm(c), levels))
        fine, mid, coarse = _split(c, levels)
        fine = F.interpolate(_to_map(fine, levels[0]), scale_factor=0.5, mode="bilinear", align_corners=False)
        coarse = F.interpolate(_to_map(coarse, levels[2]), scale_factor=2, mode="bilinear", align_corners=False)
        injected = fine.flatten(2).transpose(1, 2) + mid + coarse.flatten(2).transpose(1, 2)  # (B, H*W, C)
        return x + self.gamma * injected


class CTIToCNN(nn.Module):
    """ViT -> CNN: the ViT tokens added to the middle level of `c`, [ConvFFN,] deformable self-attention over `c`
    (official `CTI_toC`, and with `with_ffn` the `Extractor_CTI` of the last block)."""

    def __init__(self, dim: int, num_heads: int, n_points: int, deform_ratio: float, cffn_ratio: float,
                 drop: float, drop_path: float, with_ffn: bool):
        super().__init__()
        self.query_norm = _LayerNorm(dim)
        self.feat_norm = _LayerNorm(dim)
        self.with_ffn = with_ffn
        if with_ffn:
            self.ffn = ConvFFN(dim, int(dim * cffn_ratio), drop)
            self.ffn_norm = _LayerNorm(dim)
            self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.cfinter = MultiscaleExtractor(dim, num_heads, n_points, 3, deform_ratio, True, cffn_ratio, drop,
                                           drop_path)

    def forward(self, c: torch.Tensor, x: torch.Tensor, ref: torch.Tensor, shapes: torch.Tensor,
                starts: torch.Tensor, levels: Levels) -> torch.Tensor:
        fine, mid, coarse = _split(c, levels)
        c = torch.cat([fine, mid + x, coarse], dim=1)
        if self.with_ffn:
            c = c + self.drop_path(self.ffn(self.ffn_norm(c), levels))
        # the official code feeds the normed c as the query, so the extractor's residual is on norm(c)
        return self.cfinter(self.query_norm(c), ref, self.feat_norm(c), shapes, starts, levels)


class CTIBlock(nn.Module):
    """MRFP, CTI to ViT, a group of ViT blocks, CTI to CNN (+ 4 extra CTI to CNN in the last block)."""

    def __init__(self, dim: int, num_heads: int, n_points: int, init_values: float, cffn_ratio: float,
                 deform_ratio: float, dim_ratio: float, extra_cti: bool, drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.mrfp = MRFP(dim, int(dim * dim_ratio))
        self.cti_tov = CTIToViT(dim, num_heads, n_points, deform_ratio, init_values, cffn_ratio, drop, drop_path)
        self.cti_toc = CTIToCNN(dim, num_heads, n_points, deform_ratio, cffn_ratio, drop, drop_path, False)
        self.extra_CTIs = nn.Sequential(*[
            CTIToCNN(dim, num_heads, n_points, deform_ratio, cffn_ratio, drop, drop_path, True)
            for _ in range(4)]) if extra_cti else None

    def forward(self, tokens: torch.Tensor, c: torch.Tensor, blocks: nn.Sequential, num_prefix: int,
                ref: torch.Tensor, shapes: torch.Tensor, starts: torch.Tensor,
                levels: Levels) -> tuple[torch.Tensor, torch.Tensor]:
        prefix, x = tokens[:, :num_prefix], tokens[:, num_prefix:]
        fine, mid, coarse = _split(self.mrfp(c, levels), levels)
        c = torch.cat([fine, mid + x, coarse], dim=1)
        x = self.cti_tov(x, ref, c, shapes, starts, levels)
        tokens = blocks(torch.cat([prefix, x], dim=1))
        x = tokens[:, num_prefix:]
        if x.shape[1] != mid.shape[1]:
            raise UserError(f"ViT-CoMer supports ViT blocks that keep every patch token (it maps them back to the "
                            f"{levels[1][0]}x{levels[1][1]} grid), but the blocks returned {x.shape[1]}; apply token "
                            f"reduction (tome, evit, ...) to a plain ViT, not inside ViT-CoMer")
        c = self.cti_toc(c, x, ref, shapes, starts, levels)
        for cti in self.extra_CTIs or ():
            c = cti(c, x, ref, shapes, starts, levels)
        return tokens, c


def _conv_bn_relu(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SpatialPyramid(nn.Module):
    """The official `CNN` (spatial prior module): maps at strides p/4, p/2, p, 2p, each projected to `embed_dim`.

    Returns c1 as a map (B, D, H/(p/4), W/(p/4)) and c2, c3, c4 as tokens (B, H_l*W_l, D). The stem downsamples by
    p/4: conv s2 + max-pool s2 for p = 16 (official), conv s2 for p = 8, nothing for p = 4.
    """

    def __init__(self, in_chans: int, inplanes: int, embed_dim: int, patch_stride: int):
        super().__init__()
        if patch_stride not in (4, 8, 16):
            raise UserError(f"ViT-CoMer supports ViTs with patch stride 4, 8 or 16 (the CNN pyramid sits at strides "
                            f"p/4..2p), got {patch_stride}; pick a backbone or img_size with one of these strides")
        stem = (_conv_bn_relu(in_chans, inplanes, 2 if patch_stride >= 8 else 1) + _conv_bn_relu(inplanes, inplanes, 1)
                + _conv_bn_relu(inplanes, inplanes, 1))
        if patch_stride == 16:
            stem.append(nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        self.stem = nn.Sequential(*stem)
        self.conv2 = nn.Sequential(*_conv_bn_relu(inplanes, 2 * inplanes, 2))
        self.conv3 = nn.Sequential(*_conv_bn_relu(2 * inplanes, 4 * inplanes, 2))
        self.conv4 = nn.Sequential(*_conv_bn_relu(4 * inplanes, 4 * inplanes, 2))
        self.fc1 = nn.Conv2d(inplanes, embed_dim, 1)
        self.fc2 = nn.Conv2d(2 * inplanes, embed_dim, 1)
        self.fc3 = nn.Conv2d(4 * inplanes, embed_dim, 1)
        self.fc4 = nn.Conv2d(4 * inplanes, embed_dim, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        c1 = self.stem(x)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        return (self.fc1(c1), self.fc2(c2).flatten(2).transpose(1, 2), self.fc3(c3).flatten(2).transpose(1, 2),
                self.fc4(c4).flatten(2).transpose(1, 2))


def _official_init(m: nn.Module) -> None:
    """`ViTCoMer._init_weights`: trunc-normal Linear, unit norms, He-normal (fan-out) convs."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class ViTCoMer(nn.Module):
    """A timm `VisionTransformer` with ViT-CoMer's CNN pyramid and CTI blocks: `image -> [f1, f2, f3, f4]`.

    `.model` is the wrapped ViT (its blocks run as in timm; the model contract and techniques see it), `.channels`
    is 4 x embed_dim, `.strides` is (p/4, p/2, p, 2p) for patch stride p. The ViT's final norm and classifier are
    not used (as in the official backbone) and are replaced by Identity.

    Defaults are the official ones (`ViTCoMer.__init__` and the ViT-CoMer-T config): 64 CNN channels, 4 sampling
    points, 6 deformable heads, CFFN ratio 0.25, MRFP ratio 6, extra CTIs in the last block, gamma = 0.
    """

    def __init__(self, vit: VisionTransformer, conv_inplane: int = 64, n_points: int = 4, deform_num_heads: int = 6,
                 init_values: float = 0.0, cffn_ratio: float = 0.25, deform_ratio: float = 1.0,
                 dim_ratio: float = 6.0, use_extra_cti: bool = True, drop_path: float = 0.0):
        super().__init__()
        if not isinstance(vit, VisionTransformer):
            raise UserError(f"ViT-CoMer supports plain timm VisionTransformer backbones (patch tokens on a grid), "
                            f"got {type(vit).__name__}; use a vl_vit_* / vit_* model")
        if not isinstance(vit.patch_drop, nn.Identity):
            raise UserError("ViT-CoMer supports ViTs without patch dropout (it needs the full token grid); "
                            "build the ViT with patch_drop_rate=0")
        dim = vit.embed_dim
        if int(dim * deform_ratio) % deform_num_heads:
            raise UserError(f"ViT-CoMer: deform_num_heads={deform_num_heads} must divide the ViT width "
                            f"{dim} x deform_ratio {deform_ratio}; pick a divisor of {int(dim * deform_ratio)}")
        vit.reset_classifier(0)
        vit.norm = nn.Identity()
        self.model = vit
        self.grid = tuple(vit.patch_embed.grid_size)  # (h, w) of the ViT tokens
        patch_stride = vit.patch_embed.img_size[0] // self.grid[0]
        in_chans = next(m for m in vit.patch_embed.modules() if isinstance(m, nn.Conv2d)).in_channels
        self.channels = [dim] * 4
        self.strides = [patch_stride // 4, patch_stride // 2, patch_stride, patch_stride * 2]
        # 4 contiguous groups of blocks, as the official interaction_indexes [[0, 2], [3, 5], [6, 8], [9, 11]];
        # a ViT shallower than 4 gets empty groups (interactions back to back)
        bounds = [round(i * len(vit.blocks) / 4) for i in range(5)]
        self.block_groups = list(zip(bounds[:-1], bounds[1:]))

        self.level_embed = nn.Parameter(torch.zeros(3, dim))
        self.spm = SpatialPyramid(in_chans, conv_inplane, dim, patch_stride)
        self.interactions = nn.Sequential(*[
            CTIBlock(dim, deform_num_heads, n_points, init_values, cffn_ratio, deform_ratio, dim_ratio,
                     extra_cti=use_extra_cti and i == 3, drop_path=drop_path) for i in range(4)])
        self.up = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.norm1, self.norm2, self.norm3, self.norm4 = (nn.BatchNorm2d(dim) for _ in range(4))

        for module in (self.up, self.spm, self.interactions):
            module.apply(_official_init)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    def vit_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The ViT's embedded tokens (prefix + patches) before the first block, exactly as timm computes them."""
        vit = self.model
        return vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, w = self.grid
        levels = [(2 * h, 2 * w), (h, w), (h // 2, w // 2)]
        shapes = torch.as_tensor(levels, dtype=torch.long, device=x.device)
        starts = level_start_index(shapes)
        ref = reference_points(levels, x.device)  # every c token queries at its own centre, on all 3 levels

        c1, c2, c3, c4 = self.spm(x)
        c = torch.cat([c2 + self.level_embed[0], c3 + self.level_embed[1], c4 + self.level_embed[2]], dim=1)
        tokens = self.vit_tokens(x)
        num_prefix = self.model.num_prefix_tokens
        outs = []
        for layer, (lo, hi) in zip(self.interactions, self.block_groups):
            tokens, c = layer(tokens, c, self.model.blocks[lo:hi], num_prefix, ref, shapes, starts, levels)
            outs.append(_to_map(tokens[:, num_prefix:], (h, w)))

        c2, c3, c4 = (_to_map(t, s) for t, s in zip(_split(c, levels), levels))
        c1 = self.up(c2) + c1
        x1, x2, x3, x4 = outs
        x1 = F.interpolate(x1, scale_factor=4, mode="bilinear", align_corners=False)
        x2 = F.interpolate(x2, scale_factor=2, mode="bilinear", align_corners=False)
        x4 = F.interpolate(x4, scale_factor=0.5, mode="bilinear", align_corners=False)
        return [self.norm1(c1 + x1), self.norm2(c2 + x2), self.norm3(c3 + x3), self.norm4(c4 + x4)]


def build_comer(backbone_name: str, num_classes: int, img_size: int = 64, in_chans: int = 1,
                conv_inplane: int = 64, n_points: int = 4, deform_num_heads: int = 6, dim_ratio: float = 6.0,
                extra_cti: bool = True, fpn_dim: int = 64) -> DenseModel:
    """ViT-CoMer around a plain ViT (a name or a vitlab checkpoint, resized to `img_size` as `Backbone` does) with
    the Semantic-FPN decode head (vitlab.dense.heads `semantic-fpn`) on its 4-level pyramid, for semantic
    segmentation: `image -> {"sem_logits": [B, K, H / (p/4), W / (p/4)]}`."""
    vit = _build(backbone_name, in_chans, img_size, {})  # Backbone's loader, without its simple pyramid
    Backbone._resize(vit, backbone_name, img_size)
    comer = ViTCoMer(vit, conv_inplane=conv_inplane, n_points=n_points, deform_num_heads=deform_num_heads,
                     dim_ratio=dim_ratio, use_extra_cti=extra_cti)
    head = get_head("semantic-fpn", "semantic").target(comer.channels, comer.strides, num_classes, dim=fpn_dim,
                                                       conv_dim=fpn_dim)
    return DenseModel(comer, head)


register_model_head("comer", tasks=("semantic",), build=build_comer)
