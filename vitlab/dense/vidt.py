"""ViDT (Song et al., "ViDT: An Efficient and Effective Fully Transformer-based Object Detector", ICLR 2022) on timm's
Swin: the Reconfigured Attention Module (RAM), the deformable decoder neck, and ViDT without the neck.

Verified against the official code, naver-ai/vidt@a8c48b56ccf2d7cfe7ea51a3e7f6def6a61007a6
(`methods/swin_w_ram.py`, `methods/vidt/deformable_transformer.py`, `methods/vidt/detector.py`,
`methods/vidt_wo_neck/detector.py`); tests/dense/test_dense_vidt.py compares `RamSwin` with the official
`SwinTransformer.finetune_det(...)` body run on CPU (fixture in tests/fixtures/vidt/).

RAM (paper Sec. 3.2). `Q` learnable [DET] tokens (plus a learnable position encoding, projected to each block's
width by its own linear layer and added to the normalised [DET] tokens) travel beside the [PATCH] tokens through
every stage of an unmodified timm `SwinTransformer`. In each block, with the block's own weights:

* [PATCH] x [PATCH]: timm's block runs as is (W-MSA / SW-MSA, relative position bias, MLP), so the patch stream is
  exactly timm's Swin and never depends on the [DET] tokens;
* [DET] x [DET]: global self-attention through the same `qkv` / `proj` and the same MLP;
* [DET] x [PATCH; DET]: in the cross-attention stages only (the last one by default, `cross_stages`), the [DET]
  queries also attend to every patch of the stage, keys/values from `qkv` applied to the normalised, unshifted
  patches plus a sinusoidal position encoding (`sine_position_encoding`);
* at each patch merging the [DET] tokens are repeated x4 and go through the merge's own norm and reduction, so
  their width follows the stage width.

Deviations (all where the official code has no counterpart on our inputs): no padding mask (fmnist-scenes images
are all 64 x 64); timm's block order (shift, then pad) and its shrinking of a window larger than the stage, instead
of the official pad-then-shift, equal whenever the stage is a multiple of the window; no extra 256-wide patch
merging after the last stage (the official fourth scale): the neck reads timm's stage outputs 2..n (ViDT also
drops stage 1); the unused `level_embed` of the official neck is left out; each token stream draws its own
drop-path mask (the official code draws one for [PATCH; DET] together); classes are K + 1 logits ("no object"
last, vitlab's detection output) for the shared `BoxCriterion` (softmax CE by default, focal optional), where the
official neck trains K sigmoid logits with focal loss.

Sizes (`build_vidt`, the registered `vidt` head): 20 [DET] tokens, neck width 64, 2 decoding layers, 4 heads,
4 sampling points, FFN 256 (official: 100-300 tokens, 256, 6 layers, 8 heads, 4 points, FFN 1024), on
`SCENE_SWIN` or `checkpoints/fashion-mnist-swin`.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.swin_transformer import PatchMerging, SwinTransformer, SwinTransformerBlock

from ..checkpoint import create_model
from .heads import HeadError, register_model_head
from .msda import MSDeformAttn, level_start_index

__all__ = [
    "sine_position_encoding", "merge_det_tokens", "ram_block", "RamSwin", "DeformableDecoderLayer", "ViDT",
    "build_vidt", "SCENE_SWIN",
]

# timm Swin sized for 64 x 64 fmnist-scenes: patch 2 (32 x 32 tokens), window 4, widths 24/48/96/192, depths
# 1/1/6/1, the architecture of checkpoints/fashion-mnist-swin (trained at 32 px), so either can be the backbone.
SCENE_SWIN = dict(img_size=64, in_chans=1, patch_size=2, window_size=4, embed_dim=24, depths=(1, 1, 6, 1),
                  num_heads=(1, 2, 4, 8), mlp_ratio=2.0, num_classes=0)


def sine_position_encoding(height: int, width: int, dim: int, temperature: float = 10000.0,
                           device: torch.device | None = None) -> torch.Tensor:
    """(1, H, W, dim) sinusoidal encoding of the patch grid, ViDT's `masked_sin_pos_encoding` with no padding:
    y then x halves, each interleaving sin/cos of ((i + 1) / H) * 2 pi / temperature^(2 floor(k/2) / (dim/2))."""
    if dim % 4:
        raise ValueError(f"sine_position_encoding: dim must be a multiple of 4 (two sin/cos halves), got {dim}")
    half = dim // 2
    scale, eps = 2 * math.pi, 1e-6
    y = torch.arange(1, height + 1, dtype=torch.float32, device=device) / (height + eps) * scale  # (H,)
    x = torch.arange(1, width + 1, dtype=torch.float32, device=device) / (width + eps) * scale  # (W,)
    dim_t = temperature ** (2 * (torch.arange(half, dtype=torch.float32, device=device) // 2) / half)
    pos_y, pos_x = y[:, None] / dim_t, x[:, None] / dim_t  # (H, half), (W, half)
    pos_y = torch.stack((pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()), dim=2).flatten(1)  # (H, half) interleaved
    pos_x = torch.stack((pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()), dim=2).flatten(1)  # (W, half)
    pos = torch.cat((pos_y[:, None].expand(-1, width, -1), pos_x[None].expand(height, -1, -1)), dim=-1)
    return pos[None]  # (1, H, W, dim)


def merge_det_tokens(merging: PatchMerging, det: torch.Tensor) -> torch.Tensor:
    """[DET] tokens through a patch merging (official `PatchMerging.forward`): each token stands for all four
    2 x 2 neighbours (repeated x4), then the merge's own norm and reduction give it the next stage's width."""
    return merging.reduction(merging.norm(det.repeat(1, 1, 4)))  # (B, Q, 4C) -> (B, Q, C')


def ram_block(block: SwinTransformerBlock, x: torch.Tensor, det: torch.Tensor, det_pos: torch.Tensor,
              patch_pos: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One Swin block with RAM (official `ReconfiguredAttentionModule` + `SwinTransformerBlock.forward`).

    Args:
        x: (B, H, W, C) [PATCH] tokens; they go through timm's `block` unchanged.
        det: (B, Q, C) [DET] tokens.
        det_pos: (1 or B, Q, C) their position encoding, added after `norm1`.
        patch_pos: (1, H, W, C) patch position encoding; given, the [DET] queries attend to [PATCH; DET]
            (cross-attention stage), else to [DET] only.

    Returns:
        (x, det) after the block.
    """
    attn = block.attn
    B, Q, C = det.shape
    x_out = block(x)  # [PATCH] x [PATCH] window attention + MLP: timm's own forward, independent of [DET]
    qkv = attn.qkv(block.norm1(det) + det_pos)
    q, k, v = qkv.reshape(B, Q, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, nH, Q, d)
    if patch_pos is not None:
        attn_dim = attn.qkv.out_features // 3
        patches = (block.norm1(x) + patch_pos).reshape(B, -1, C)  # (B, HW, C), unshifted
        bias = attn.qkv.bias[attn_dim:] if attn.qkv.bias is not None else None
        kv = F.linear(patches, attn.qkv.weight[attn_dim:], bias)  # keys and values of the patches only
        patch_k, patch_v = kv.reshape(B, -1, 2, attn.num_heads, q.shape[-1]).permute(2, 0, 3, 1, 4).unbind(0)
        k, v = torch.cat((patch_k, k), dim=2), torch.cat((patch_v, v), dim=2)  # (B, nH, HW + Q, d)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0,
                                         scale=attn.scale)  # (B, nH, Q, d)
    out = attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(B, Q, -1)))  # (B, Q, C)
    det = det + block.drop_path1(out)
    det = det + block.drop_path2(block.mlp(block.norm2(det)))
    return x_out, det


class RamSwin(nn.Module):
    """timm `SwinTransformer` with [DET] tokens carried through the Reconfigured Attention Module.

    `forward(image) -> (features, det, det_pos)`: the stage outputs (NCHW, finest first, exactly timm's), the
    [DET] tokens after the last stage (B, Q, C_last) and their learnable position encoding (1, Q, pos_dim).
    `cross_stages` are the stage indices with [DET] x [PATCH; DET] attention (default: the last stage, as ViDT).
    The wrapped timm model is `.model`, its weights untouched.
    """

    def __init__(self, model: SwinTransformer, det_tokens: int = 100, pos_dim: int = 256,
                 cross_stages: tuple[int, ...] | None = None):
        super().__init__()
        if not isinstance(model, SwinTransformer):
            raise TypeError(f"RamSwin wraps timm's SwinTransformer, got {type(model).__name__}")
        self.model = model
        stages = len(model.layers)
        self.cross_stages = (stages - 1,) if cross_stages is None else tuple(sorted(set(cross_stages)))
        if any(not 0 <= s < stages for s in self.cross_stages):
            raise ValueError(f"RamSwin: cross_stages {self.cross_stages} must lie in 0..{stages - 1}")
        widths = [stage.blocks[0].dim for stage in model.layers]
        self.channels = widths
        self.det_token = nn.Parameter(trunc_normal_(torch.zeros(1, det_tokens, widths[0]), std=0.02))
        self.det_pos_embed = nn.Parameter(trunc_normal_(torch.zeros(1, det_tokens, pos_dim), std=0.02))
        # one projection of the [DET] position encoding per block (official `block.det_pos_linear`)
        self.det_pos_linear = nn.ModuleList(
            nn.ModuleList(nn.Linear(pos_dim, block.dim) for block in stage.blocks) for stage in model.layers)

    def forward(self, image: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        x = self.model.patch_embed(image)  # (B, H, W, C0)
        det = self.det_token.expand(x.shape[0], -1, -1)  # (B, Q, C0)
        features = []
        for index, stage in enumerate(self.model.layers):
            if isinstance(stage.downsample, PatchMerging):
                x = stage.downsample(x)  # (B, H/2, W/2, C')
                det = merge_det_tokens(stage.downsample, det)
            patch_pos = None
            if index in self.cross_stages:
                patch_pos = sine_position_encoding(x.shape[1], x.shape[2], x.shape[3], device=x.device).to(x.dtype)
            for block, pos_linear in zip(stage.blocks, self.det_pos_linear[index]):
                x, det = ram_block(block, x, det, pos_linear(self.det_pos_embed), patch_pos)
            features.append(x.permute(0, 3, 1, 2))  # (B, C, H, W)
        return features, det, self.det_pos_embed


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """log(x / (1 - x)) with both clamped at `eps` (Deformable DETR's `util.misc.inverse_sigmoid`)."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class TokenProjection(nn.Module):
    """Linear map of a token set followed by GroupNorm over (channels in a group) x (all tokens): the official
    1x1 `Conv2d` + `GroupNorm(32, dim)` applied to tokens laid out as a (B, C, Q, 1) map."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.norm = nn.GroupNorm(math.gcd(32, out_dim), out_dim)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(tokens).transpose(1, 2)).transpose(1, 2)  # (B, Q, C) -> (B, Q, C')


class MLP(nn.Module):
    """`layers` linear layers with ReLU between (DETR's box / class MLP)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, layers: int):
        super().__init__()
        dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


class DeformableDecoderLayer(nn.Module):
    """ViDT's neck layer (`DeformableTransformerDecoderLayer`): [DET] self-attention, multi-scale deformable
    cross-attention from the [DET] tokens to the [PATCH] maps (paper Eq. 1), ReLU FFN; post-norm. The official
    norm names are kept: `norm2` after self-attention, `norm1` after cross-attention, `norm3` after the FFN."""

    def __init__(self, dim: int, heads: int, levels: int, points: int, ffn_dim: int, dropout: float = 0.0):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = MSDeformAttn(dim, levels, heads, points)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1, self.linear2 = nn.Linear(dim, ffn_dim), nn.Linear(ffn_dim, dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor, reference_points: torch.Tensor,
                memory: torch.Tensor, shapes: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        q = k = tgt + query_pos
        tgt = self.norm2(tgt + self.dropout(self.self_attn(q, k, tgt, need_weights=False)[0]))
        tgt = self.norm1(tgt + self.dropout(self.cross_attn(tgt + query_pos, reference_points, memory, shapes, starts)))
        return self.norm3(tgt + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(tgt))))))


class ViDT(nn.Module):
    """ViDT detector: `RamSwin` body, then (`neck=True`) the deformable decoder over stages 2..n with iterative box
    refinement and one prediction per decoding layer plus one from the body's [DET] tokens (the auxiliary
    predictions), or (`neck=False`) ViDT without the neck: class and box MLPs on the body's [DET] tokens.

    Returns `{"pred_logits": (B, Q, K+1), "pred_boxes": (B, Q, 4) cx, cy, w, h in 0-1, "aux": [...]}`; class K is
    "no object". Class heads are linear (neck) / 3-layer MLPs (no neck), box heads 3-layer MLPs, as the official.
    """

    def __init__(self, body: RamSwin, num_classes: int, neck: bool = True, dim: int = 64,
                 decoder_layers: int = 2, heads: int = 4, points: int = 4, ffn_dim: int = 256,
                 dropout: float = 0.0):
        super().__init__()
        self.body, self.num_classes, self.neck = body, num_classes, neck
        pos_dim = body.det_pos_embed.shape[-1]
        if not neck:
            self.input_proj = TokenProjection(body.channels[-1], dim)
            self.class_embed = MLP(dim, dim, num_classes + 1, 3)
            self.bbox_embed = MLP(dim, dim, 4, 3)
            return
        levels = body.channels[1:]  # ViDT's neck reads stages 2..n
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, dim, kernel_size=1), nn.GroupNorm(math.gcd(32, dim), dim)) for c in levels)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight)
            nn.init.zeros_(proj[0].bias)
        self.tgt_proj = TokenProjection(body.channels[-1], dim)
        self.query_pos_proj = TokenProjection(pos_dim, dim)
        self.reference_points = nn.Linear(dim, 2)
        nn.init.xavier_uniform_(self.reference_points.weight)
        nn.init.zeros_(self.reference_points.bias)
        self.layers = nn.ModuleList(DeformableDecoderLayer(dim, heads, len(levels), points, ffn_dim, dropout)
                                    for _ in range(decoder_layers))
        # box refinement: one class / box head per prediction (body + each decoding layer), official init
        self.class_embed = nn.ModuleList(nn.Linear(dim, num_classes + 1) for _ in range(decoder_layers + 1))
        self.bbox_embed = nn.ModuleList(MLP(dim, dim, 4, 3) for _ in range(decoder_layers + 1))
        for box in self.bbox_embed:
            nn.init.zeros_(box.layers[-1].weight)
            nn.init.zeros_(box.layers[-1].bias)
        nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)

    def _predict(self, index: int, tokens: torch.Tensor, reference: torch.Tensor) -> dict[str, torch.Tensor]:
        """Class logits and boxes of prediction `index`, the box as a refinement of `reference` (2 or 4 coords)."""
        delta = self.bbox_embed[index](tokens)  # (B, Q, 4)
        offset = inverse_sigmoid(reference)
        if reference.shape[-1] == 2:
            offset = F.pad(offset, (0, 2))  # centre only: w, h from the head alone
        return {"pred_logits": self.class_embed[index](tokens), "pred_boxes": (delta + offset).sigmoid()}

    def forward(self, image: torch.Tensor) -> dict:
        features, det, det_pos = self.body(image)
        if not self.neck:
            tokens = self.input_proj(det)
            return {"pred_logits": self.class_embed(tokens), "pred_boxes": self.bbox_embed(tokens).sigmoid(),
                    "aux": []}
        srcs = [proj(f) for proj, f in zip(self.input_proj, features[1:])]  # (B, dim, H_l, W_l)
        shapes = torch.tensor([s.shape[-2:] for s in srcs], dtype=torch.long, device=image.device)  # (L, 2)
        memory = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], dim=1)  # (B, sum H_l W_l, dim)
        starts = level_start_index(shapes)
        tgt = self.tgt_proj(det)  # (B, Q, dim)
        query_pos = self.query_pos_proj(det_pos).expand(tgt.shape[0], -1, -1)  # (B, Q, dim)
        reference = self.reference_points(query_pos).sigmoid()  # (B, Q, 2)
        outputs = [self._predict(0, tgt, reference)]  # the body's own prediction
        for index, layer in enumerate(self.layers, start=1):
            reference = outputs[-1]["pred_boxes"].detach()  # (B, Q, 4), refined by each layer
            tgt = layer(tgt, query_pos, reference[:, :, None], memory, shapes, starts)
            outputs.append(self._predict(index, tgt, reference))
        return dict(outputs[-1], aux=outputs[:-1])


def _scene_swin(backbone_name: str) -> SwinTransformer:
    """A timm Swin for 64 x 64 one-channel scenes: a vitlab checkpoint of one (resized to 64 px, window 4), or a
    timm Swin name built with `SCENE_SWIN`."""
    if Path(backbone_name).is_dir() or "/" in backbone_name:
        model = create_model(backbone_name)
        if isinstance(model, SwinTransformer):
            model.set_input_size(img_size=(SCENE_SWIN["img_size"],) * 2, window_size=SCENE_SWIN["window_size"])
            model.reset_classifier(0)  # the classifier's head has no part in detection
    elif backbone_name.startswith("swin"):
        model = create_model(backbone_name, **SCENE_SWIN)
    else:
        model = None
    if not isinstance(model, SwinTransformer):
        raise HeadError(f"head vidt supports timm SwinTransformer backbones only (ViDT's RAM lives inside Swin), "
                        f"got {backbone_name!r}; use e.g. --model swin_tiny_patch4_window7_224 (sized for 64 px "
                        f"scenes) or --model checkpoints/fashion-mnist-swin")
    return model


def build_vidt(backbone_name: str, num_classes: int, neck: bool = True, cross_all_stages: bool = False,
               det_tokens: int = 20, dim: int = 64, decoder_layers: int = 2, heads: int = 4,
               points: int = 4) -> ViDT:
    """ViDT (RAM in timm's Swin + deformable decoder neck) for detection on 64 px scenes; `neck=False` is ViDT
    without the neck, `cross_all_stages=True` puts [DET] x [PATCH] cross-attention in every stage (ablation)."""
    swin = _scene_swin(backbone_name)
    stages = len(swin.layers)
    cross = tuple(range(stages)) if cross_all_stages else (stages - 1,)
    body = RamSwin(swin, det_tokens=det_tokens, pos_dim=dim, cross_stages=cross)
    return ViDT(body, num_classes, neck=neck, dim=dim, decoder_layers=decoder_layers, heads=heads, points=points,
                ffn_dim=4 * dim)


register_model_head("vidt", tasks=("detection",), build=build_vidt)
