"""kMaX-DeepLab's k-means mask transformer decoder, and the same decoder with softmax cross-attention.

kMaX-DeepLab (Yu et al., ECCV 2022, "k-means Mask Transformer", Sec. 3.2) reads the cross-attention of a mask
transformer (cluster centres attending over pixels, softmax over the spatial axis) as a clustering step and replaces
it by one k-means step: each pixel is assigned to the centre whose mask logit is largest (argmax over the clusters,
a hard one-hot with no gradient through it, `kmeans_assignment`), and each centre is updated by the **sum** of the
values of its pixels (`cluster_update`). The update passes BN -> 1x1 conv -> BN whose gamma starts at zero, so the
residual adds nothing at initialisation (`KMeansCrossAttention`). Every decoder layer also predicts class and mask
logits from its centres (they give the assignment and the auxiliary outputs), then runs query self-attention and an
FFN, both with zero-gamma residuals as well.

Checked line by line against bytedance/kmax-deeplab @ f8e1d0467fd35b4e81f5312748e616a48436beb4 (the PyTorch port
of google-research/deeplab2 `model/transformer_decoder/kmax.py`):
`kmax_deeplab/modeling/transformer_decoder/kmax_transformer_decoder.py` (`kMaXTransformerLayer`, `kMaXPredictor`,
`AttentionOperation`, `add_bias_towards_void`, `kMaXTransformerDecoder`) and
`kmax_deeplab/modeling/pixel_decoder/kmax_pixel_decoder.py` (`ConvBN`, `SingleBlock`, `ResizedFuse`,
`kMaXPixelDecoder`).

`attention="softmax"` (registered also as `softmax-xattn`) swaps only the k-means step for standard multi-head
softmax cross-attention of the centres over the pixels (Mask2Former-style, no mask): the paper's baseline at equal
size (it adds the query and key projections: +7 % head parameters at the default size).

What is simplified for 64 px scenes on a CPU, and why:
- widths: 16 centres, query width 128, FFN 256, mask embedding 64, 4 heads (official: 128 / 256 / 2048 / 128 / 8);
  one decoder layer per stage over strides 16/8/4 (official: two per stage over 32/16/8).
- pixel decoder: bottleneck blocks (the official `SingleBlock(block_type="bottleneck")`) at every scale, with the
  official input LayerNorm and `ResizedFuse` top-down fusion; the official decoder uses axial-attention blocks at
  strides 32/16. On a 4x4 or 8x8 map an axial block's global span is what a 3x3 conv already sees, and the decoder
  stays a few conv layers on a 2-core CPU.
- BatchNorm (eps 1e-3 as official) with PyTorch's momentum 0.1, not SyncBN's 0.01: runs here are hundreds of steps,
  not 150k, and the running statistics must settle within them.

Losses (`loss=`): "kmax" trains with kMaX-DeepLab's own criterion (vitlab/dense/kmax_loss.py: PQ-style matching,
mask-ID cross-entropy over queries, dice weighted by the matched class probability, pixel instance discrimination,
auxiliary semantic loss; the head then adds the official auxiliary semantic predictor (its `use_aux_semantic_decoder
=False` form) on the coarsest level, and in training mode returns "pixel_feature" and "aux_semantic_pred"). Its
masks are a softmax over the queries, so in eval mode "pred_masks" holds their log-odds log(p / (1 - p)): the shared
sigmoid inference of vitlab.dense.matching then reads the kMaX mask probabilities p. "m2f" keeps per-mask sigmoid
logits for the shared Mask2Former `vitlab.dense.matching.MaskCriterion`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d, trunc_normal_tf_

from ..errors import UserError
from .heads import register_head
from .kmax_loss import KMaXCriterion
from .matching import MaskCriterion

__all__ = ["kmeans_assignment", "cluster_update", "KMeansCrossAttention", "SoftmaxCrossAttention", "KMaXLayer",
           "KMaXPixelDecoder", "KMaXDecoder", "SoftmaxXAttnDecoder", "KMaXCriterion", "LOSSES"]

LOSSES = ("kmax", "m2f")  # kMaX-DeepLab's own criterion; Mask2Former's (vitlab.dense.matching.MaskCriterion)

_BN_EPS = 1e-3  # official get_norm('syncbn'): eps=1e-3


def kmeans_assignment(logits: torch.Tensor) -> torch.Tensor:
    """Hard k-means assignment: one-hot of the argmax over clusters per pixel, [B, Q, N] -> [B, Q, N], no gradient.

    Official: `clustering_result.max(1)[1]` scattered into zeros, under `torch.no_grad()` on detached logits."""
    with torch.no_grad():
        index = logits.detach().argmax(dim=1, keepdim=True)  # (B, 1, N)
        return torch.zeros_like(logits).scatter_(1, index, 1.0)


def cluster_update(assignment: torch.Tensor, values: torch.Tensor, mean: bool = False) -> torch.Tensor:
    """Sum (kMaX) or mean (Lloyd's k-means) of the values of each cluster's pixels: [B, Q, N], [B, D, N] -> [B, D, Q].

    The mean divides by the cluster's pixel count; an empty cluster then has no defined mean (NaN)."""
    update = torch.einsum("bqn,bdn->bdq", assignment.to(values.dtype), values)
    if mean:
        update = update / assignment.sum(dim=2).to(values.dtype)[:, None, :]
    return update


class ConvBN(nn.Sequential):
    """Conv (1d over queries or 2d over pixels) + BatchNorm with gamma `norm_init` + activation (official `ConvBN`).

    Weights use the official initialisations: truncated normal with std `sqrt(2 / in)` ("he_normal") unless given."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 1, groups: int = 1, bias: bool = False,
                 norm: bool = True, act: bool = False, dim: int = 2, norm_init: float = 1.0,
                 init_std: float | None = None):
        conv_cls, bn_cls = (nn.Conv2d, nn.BatchNorm2d) if dim == 2 else (nn.Conv1d, nn.BatchNorm1d)
        conv = conv_cls(in_ch, out_ch, kernel_size, padding=kernel_size // 2, groups=groups, bias=bias)
        if groups > 1:
            nn.init.xavier_uniform_(conv.weight)
        else:
            trunc_normal_tf_(conv.weight, std=init_std if init_std is not None else math.sqrt(2.0 / in_ch))
        if bias:
            nn.init.zeros_(conv.bias)
        layers: list[nn.Module] = [conv]
        if norm:
            bn = bn_cls(out_ch, eps=_BN_EPS)
            nn.init.constant_(bn.weight, norm_init)
            layers.append(bn)
        if act:
            layers.append(nn.GELU())
        super().__init__(*layers)


class KMeansCrossAttention(nn.Module):
    """`centres + ConvBN_gamma0(BN(cluster_update(argmax-assignment(logits), values)))` (kMaX's k-means update)."""

    def __init__(self, value_dim: int, query_dim: int, drop_path: float = 0.0):
        super().__init__()
        self.norm = nn.BatchNorm1d(value_dim, eps=_BN_EPS)  # official _kmeans_query_batch_norm_retrieved_value
        self.proj = ConvBN(value_dim, query_dim, dim=1, norm_init=0.0)  # official _kmeans_query_conv3_bn
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, centres: torch.Tensor, logits: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        # centres (B, D, Q), logits (B, Q, N), values (B, Dv, N)
        update = cluster_update(kmeans_assignment(logits), values.float())  # (B, Dv, Q)
        return centres + self.drop_path(self.proj(self.norm(update)))


class SoftmaxCrossAttention(nn.Module):
    """The baseline: `centres + ConvBN_gamma0(BN(softmax_pixels(q k^T / sqrt(d)) v))`, multi-head, no mask."""

    def __init__(self, query_in: int, pixel_in: int, key_dim: int, value_dim: int, query_dim: int, heads: int,
                 drop_path: float = 0.0):
        super().__init__()
        self.heads = heads
        self.q = ConvBN(query_in, key_dim, dim=1, init_std=query_in ** -0.5)
        self.k = ConvBN(pixel_in, key_dim, init_std=pixel_in ** -0.5)
        self.norm = nn.BatchNorm1d(value_dim, eps=_BN_EPS)
        self.proj = ConvBN(value_dim, query_dim, dim=1, norm_init=0.0)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, centres: torch.Tensor, query_space: torch.Tensor, pixel_space: torch.Tensor,
                values: torch.Tensor) -> torch.Tensor:
        B, _, Q = query_space.shape
        H = self.heads
        q = self.q(query_space).reshape(B, H, -1, Q).transpose(2, 3)  # (B, H, Q, dk)
        k = self.k(pixel_space).flatten(2).reshape(B, H, q.shape[-1], -1).transpose(2, 3)  # (B, H, N, dk)
        v = values.reshape(B, H, -1, values.shape[-1]).transpose(2, 3)  # (B, H, N, dv)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, Q, dv), softmax over the N pixels
        out = out.transpose(2, 3).reshape(B, -1, Q)  # (B, Dv, Q)
        return centres + self.drop_path(self.proj(self.norm(out)))


class SelfAttention(nn.Module):
    """Query self-attention with BN on the logits and on the output, then GELU (official `AttentionOperation`)."""

    def __init__(self, value_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm_similarity = nn.BatchNorm2d(heads, eps=_BN_EPS)
        self.norm_value = nn.BatchNorm1d(value_dim, eps=_BN_EPS)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, _, Q = q.shape
        H = self.heads
        q, k, v = (t.reshape(B, H, -1, Q) for t in (q, k, v))  # (B, H, d, Q)
        logits = self.norm_similarity(torch.einsum("bhdl,bhdm->bhlm", q, k))  # (B, H, Q, Q), no 1/sqrt(d) as official
        out = torch.einsum("bhlm,bhdm->bhdl", logits.float().softmax(dim=-1), v).reshape(B, -1, Q)  # (B, Dv, Q)
        return F.gelu(self.norm_value(out))


def add_bias_towards_void(class_logits: torch.Tensor, void_prior: float = 0.9) -> torch.Tensor:
    """Add log((K) p / (1 - p)) to the "no object" logit so that every centre starts out predicting void."""
    bias = torch.zeros(class_logits.shape[-1], dtype=class_logits.dtype, device=class_logits.device)
    bias[-1] = math.log((class_logits.shape[-1] - 1) * void_prior / (1 - void_prior))
    return class_logits + bias


class KMaXPredictor(nn.Module):
    """Class logits and mask logits from centre embeddings and pixel features (official `kMaXPredictor`).

    Mask logits = BN_1(<L2-normalised pixel embedding, mask kernel>), the BN's gamma starting at 0.1. Returns
    (class logits, mask logits, the normalised pixel embedding: kMaX's instance discrimination loss reads it)."""

    def __init__(self, pixel_in: int, query_in: int, num_classes: int, hidden: int, mask_dim: int):
        super().__init__()
        self.pixel_head = nn.Sequential(
            ConvBN(pixel_in, pixel_in, kernel_size=5, groups=pixel_in, act=True),
            ConvBN(pixel_in, hidden, act=True),
            ConvBN(hidden, mask_dim, bias=True, init_std=0.01))
        self.mask_head = ConvBN(query_in, mask_dim, dim=1)
        self.class_head = ConvBN(query_in, num_classes + 1, bias=True, norm=False, dim=1, init_std=0.01)
        self.mask_norm = nn.BatchNorm3d(1, eps=_BN_EPS)  # over (B, 1, Q, h, w) as official
        nn.init.constant_(self.mask_norm.weight, 0.1)

    def forward(self, mask_embed: torch.Tensor, class_embed: torch.Tensor,
                pixel_feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pixel = F.normalize(self.pixel_head(pixel_feature), dim=1)  # (B, M, h, w)
        class_logits = add_bias_towards_void(self.class_head(class_embed).transpose(1, 2))  # (B, Q, K+1)
        kernel = self.mask_head(mask_embed)  # (B, M, Q)
        mask_logits = torch.einsum("bchw,bcq->bqhw", pixel, kernel)  # (B, Q, h, w)
        return class_logits, self.mask_norm(mask_logits.unsqueeze(1)).squeeze(1), pixel


class KMaXLayer(nn.Module):
    """One kMaX decoder layer: predict masks, k-means (or softmax) cross-attention, self-attention, FFN.

    Official `kMaXTransformerLayer`; returns the new centres and this layer's (class, mask logits, pixel embedding)."""

    def __init__(self, pixel_in: int, query_dim: int, num_classes: int, attention: str = "kmeans",
                 base: int = 64, heads: int = 4, ffn: int = 256, mask_dim: int = 64, drop_path: float = 0.0):
        super().__init__()
        bottleneck, key_dim, value_dim = 2 * base, base, 2 * base  # official expansions 2 / 1 / 2
        self.key_dim, self.value_dim, self.heads = key_dim, value_dim, heads
        self.pixel_in = ConvBN(pixel_in, bottleneck, act=True)
        self.query_in = ConvBN(query_dim, bottleneck, dim=1, act=True)
        self.pixel_v = ConvBN(bottleneck, value_dim, init_std=bottleneck ** -0.5)
        self.predictor = KMaXPredictor(bottleneck, bottleneck, num_classes, hidden=bottleneck, mask_dim=mask_dim)
        if attention == "kmeans":
            self.cross: nn.Module = KMeansCrossAttention(value_dim, query_dim, drop_path)
        else:
            self.cross = SoftmaxCrossAttention(bottleneck, bottleneck, key_dim, value_dim, query_dim, heads, drop_path)
        self.qkv = ConvBN(bottleneck, 2 * key_dim + value_dim, dim=1, init_std=bottleneck ** -0.5)
        self.self_attn = SelfAttention(value_dim, heads)
        self.self_proj = ConvBN(value_dim, query_dim, dim=1, norm_init=0.0)
        self.ffn = nn.Sequential(ConvBN(query_dim, ffn, dim=1, act=True), ConvBN(ffn, query_dim, dim=1, norm_init=0.0))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, pixels: torch.Tensor, centres: torch.Tensor
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        # pixels (B, C, h, w), centres (B, D, Q)
        pixel_space = self.pixel_in(F.gelu(pixels))  # (B, 2*base, h, w)
        query_space = self.query_in(centres)  # (B, 2*base, Q)
        values = self.pixel_v(pixel_space).flatten(2)  # (B, Dv, N)
        class_logits, mask_logits, pixel = self.predictor(query_space, query_space, pixel_space)
        if isinstance(self.cross, KMeansCrossAttention):
            centres = self.cross(centres, mask_logits.flatten(2), values)
        else:
            centres = self.cross(centres, query_space, pixel_space, values)
        q, k, v = self.qkv(query_space).split([self.key_dim, self.key_dim, self.value_dim], dim=1)
        centres = F.gelu(centres + self.drop_path(self.self_proj(self.self_attn(q, k, v))))
        centres = F.gelu(centres + self.drop_path(self.ffn(centres)))
        return centres, (class_logits, mask_logits, pixel)


class BottleneckBlock(nn.Module):
    """GELU, then 1x1 -> 3x3 -> 1x1 (last BN gamma 0) plus a (projected) shortcut (official `SingleBlock`)."""

    def __init__(self, in_ch: int, width: int):
        super().__init__()
        self.convs = nn.Sequential(ConvBN(in_ch, width, act=True), ConvBN(width, width, kernel_size=3, act=True),
                                   ConvBN(width, 4 * width, norm_init=0.0))
        self.shortcut = ConvBN(in_ch, 4 * width) if in_ch != 4 * width else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(x)
        return self.convs(x) + self.shortcut(x)


class ResizedFuse(nn.Module):
    """Upsample the coarse map and add the (projected) fine map (official `ResizedFuse`)."""

    def __init__(self, low_in: int, high_in: int, out: int):
        super().__init__()
        self.low = ConvBN(low_in, out) if low_in != out else None
        self.high = ConvBN(high_in, out) if high_in != out else None

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        if self.low is not None:
            low = self.low(F.gelu(low))
        low = F.interpolate(low, size=high.shape[-2:], mode="bilinear", align_corners=low.shape[-1] % 2 == 1)
        if self.high is not None:
            high = self.high(F.gelu(high))
        return low + high


class KMaXPixelDecoder(nn.Module):
    """Coarse-to-fine pixel decoder: LayerNorm each backbone map, a bottleneck block per scale, `ResizedFuse` between.

    Official `kMaXPixelDecoder` with bottleneck blocks in place of axial ones (module docstring). Returns the maps
    coarse to fine, each with `4 * widths[i]` channels."""

    def __init__(self, channels: list[int], widths: list[int]):
        super().__init__()
        self.norms = nn.ModuleList(LayerNorm2d(c) for c in channels)
        self.blocks = nn.ModuleList(
            BottleneckBlock(channels[0] if i == 0 else widths[i], widths[i]) for i in range(len(channels)))
        self.fuses = nn.ModuleList(
            ResizedFuse(4 * widths[i - 1], channels[i], widths[i]) for i in range(1, len(channels)))

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        # features coarse to fine
        x = self.blocks[0](self.norms[0](features[0]))
        out = [x]
        for i in range(1, len(features)):
            x = self.blocks[i](self.fuses[i - 1](x, self.norms[i](features[i])))
            out.append(x)
        return out


def _pick_levels(strides: list[int], wanted: tuple[int, ...] = (16, 8, 4)) -> list[int]:
    """Indices of the backbone levels nearest strides 16/8/4, coarse to fine, distinct."""
    picked: list[int] = []
    for target in wanted:
        best = min((i for i in range(len(strides)) if i not in picked),
                   key=lambda i: (abs(math.log2(strides[i] / target)), -strides[i]), default=None)
        if best is not None:
            picked.append(best)
    return sorted(picked, key=lambda i: -strides[i])


@register_head("kmax", tasks=("panoptic", "semantic"))
class KMaXDecoder(nn.Module):
    """kMaX-DeepLab decoder: k-means cross-attention of learned cluster centres over a stride 16/8/4 pixel decoder.

    `attention="softmax"` gives the softmax cross-attention baseline of the same size (`softmax-xattn`).
    Output: `{"pred_logits" [B, Q, K+1], "pred_masks" [B, Q, h/4, w/4], "aux": [one dict per decoder layer]}`; with
    `loss="kmax"` (module docstring) in training also "pixel_feature" [B, M, h/4, w/4] (and per aux layer) and
    "aux_semantic_pred" [B, K, h/16, w/16], and in eval "pred_masks" are log-odds of the softmax over queries.

        >>> head = KMaXDecoder([32, 32, 32], [4, 8, 16], num_classes=11)
        >>> out = head([torch.randn(2, 32, 16, 16), torch.randn(2, 32, 8, 8), torch.randn(2, 32, 4, 4)], None)
        >>> tuple(out["pred_masks"].shape), len(out["aux"])
        ((2, 16, 16, 16), 3)
    """

    def __init__(self, channels: list[int], strides: list[int], num_classes: int, attention: str = "kmeans",
                 num_queries: int = 16, dim: int = 128, layers_per_stage: int = 1, heads: int = 4,
                 drop_path: float = 0.0, loss: str = "m2f"):
        super().__init__()
        if loss not in LOSSES:
            raise UserError(f"kmax: loss={loss!r} is not one of {', '.join(LOSSES)}; write --head kmax:loss=kmax "
                            f"(kMaX-DeepLab's own losses) or loss=m2f (Mask2Former's)")
        if attention not in ("kmeans", "softmax"):
            raise UserError(f"kmax: attention={attention!r} is not one of kmeans, softmax; "
                            f"write --head kmax:attention=kmeans or attention=softmax")
        for key, value in (("num_queries", num_queries), ("dim", dim), ("layers_per_stage", layers_per_stage),
                           ("heads", heads)):
            if value < 1:
                raise UserError(f"kmax: {key}={value} must be a positive integer")
        if dim % (2 * heads):
            raise UserError(f"kmax: dim={dim} must be a multiple of 2 * heads={2 * heads} (key width dim/2 per head)")
        if not 0.0 <= drop_path < 1.0:
            raise UserError(f"kmax: drop_path={drop_path} must be in [0, 1)")
        self.attention, self.loss = attention, loss
        self.levels = _pick_levels(list(strides))
        if len(self.levels) < 2:
            raise UserError(f"kmax needs a backbone with at least two feature levels; it has strides {list(strides)}")
        widths = [max(8, dim // 4 // 2 ** i) for i in range(len(self.levels))]  # official ratios 512/256/128/64
        self.pixel_decoder = KMaXPixelDecoder([channels[i] for i in self.levels], widths)
        self.centres = nn.Parameter(torch.empty(dim, num_queries))  # official _cluster_centers, (D, Q)
        trunc_normal_tf_(self.centres, std=1.0)
        base = dim // 2
        self.layers = nn.ModuleList(
            KMaXLayer(4 * w, dim, num_classes, attention, base=base, heads=heads, ffn=2 * dim, mask_dim=base,
                      drop_path=drop_path)
            for w in widths for _ in range(layers_per_stage))
        self.stage_of_layer = [s for s in range(len(widths)) for _ in range(layers_per_stage)]
        self.class_embed = ConvBN(dim, dim, dim=1, act=True)
        self.mask_embed = ConvBN(dim, dim, dim=1, act=True)
        self.predictor = KMaXPredictor(4 * widths[-1], dim, num_classes, hidden=dim, mask_dim=base)
        if loss == "kmax":  # official _auxiliary_semantic_predictor (use_aux_semantic_decoder=False), coarsest level
            c = channels[self.levels[0]]
            self.aux_semantic = nn.Sequential(ConvBN(c, c, kernel_size=5, groups=c, act=True),
                                              ConvBN(c, 2 * dim, act=True),
                                              ConvBN(2 * dim, num_classes, bias=True, norm=False, init_std=0.01))

    def criterion(self, task: str) -> nn.Module:
        """The training criterion of this head's `loss` for `task` (panoptic or semantic)."""
        num_classes = self.predictor.class_head[0].out_channels - 1
        return KMaXCriterion(num_classes, task) if self.loss == "kmax" else MaskCriterion(num_classes, task=task)

    def forward(self, features: list[torch.Tensor], image: torch.Tensor | None) -> dict:
        pixels = self.pixel_decoder([features[i] for i in self.levels])  # coarse to fine
        centres = self.centres.unsqueeze(0).expand(pixels[0].shape[0], -1, -1)  # (B, D, Q)
        aux = []
        for layer, stage in zip(self.layers, self.stage_of_layer):
            centres, prediction = layer(pixels[stage], centres)
            aux.append(prediction)
        class_logits, mask_logits, pixel = self.predictor(self.mask_embed(centres), self.class_embed(centres),
                                                          pixels[-1])
        size = mask_logits.shape[-2:]

        def up(x: torch.Tensor) -> torch.Tensor:  # official _set_aux_loss: bilinear to the final mask size
            return F.interpolate(x, size=size, mode="bilinear", align_corners=size[-1] % 2 == 1)

        kmax_training = self.loss == "kmax" and self.training
        aux_out = [{"pred_logits": c, "pred_masks": up(m), **({"pixel_feature": up(p)} if kmax_training else {})}
                   for c, m, p in aux]
        out = {"pred_logits": class_logits, "pred_masks": mask_logits, "aux": aux_out}
        if kmax_training:
            out.update(pixel_feature=pixel, aux_semantic_pred=self.aux_semantic(features[self.levels[0]]))
        elif self.loss == "kmax":  # log-odds of the softmax over queries: sigmoid inference reads p (docstring)
            log_p = mask_logits.float().log_softmax(dim=1)  # (B, Q, h, w)
            out["pred_masks"] = (log_p - torch.log1p(-log_p.exp().clamp(max=1 - 1e-6))).to(mask_logits.dtype)
        return out


@register_head("softmax-xattn", tasks=("panoptic", "semantic"))
class SoftmaxXAttnDecoder(KMaXDecoder):
    """kMaX's decoder with softmax cross-attention in place of the k-means step: the paper's baseline at equal size."""

    def __init__(self, channels: list[int], strides: list[int], num_classes: int, attention: str = "softmax",
                 num_queries: int = 16, dim: int = 128, layers_per_stage: int = 1, heads: int = 4,
                 drop_path: float = 0.0, loss: str = "m2f"):
        super().__init__(channels, strides, num_classes, attention, num_queries, dim, layers_per_stage, heads,
                         drop_path, loss)
