"""Weight-sharing supernet of the Hiera-style space (vitlab/search/hiera_space.py), ViT-ResNAS's machinery on timm's
Hiera blocks.

The supernet is the largest net of the space, a `TurboViT` (vl_turbovit_proxy; timm `HieraBlock`s), run as any net
of the space by the masks of vitlab/search/supernet.py: a subnet keeps the *first* channels of every width (the stage
width zeroes channels >= w of the NHWC residual stream, the MLP ratio zeroes hidden channels >= ratio * w after the
activation), a block past the stage's depth adds nothing, and every LayerNorm is `masked_layer_norm` over the kept
channels. Two choices are not channel masks and are applied per sub-batch: the heads split the kept w channels of
q, k and v into h heads of w / h (timm's `MaskUnitAttention` ties head width to width / heads), and the attention
runs within mask units or globally as the net says. The widening projection of a stage's opening block and its
2x2 max pool of queries and residual keep zeros at zero, so pooling needs no mask.

`materialise(def)` builds the plain `vl_turbovit_proxy` of a net and copies the leading weight slices (q, k and v
rows sliced separately); a test checks the masked forward equals it to <= 1e-5. Training reuses
`vitlab.search.train_supernet` (multi-architecture sampling within a batch, sandwich rule). Everything is BN-free,
so a subnet needs no statistics recalibration.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import create_model
from ..models.turbovit import TurboViT, grid_order, mask_unit_order
from .hiera_space import HieraSpace
from .supernet import _copy, _leading as leading_mask, masked_layer_norm

__all__ = ["HieraSupernet"]


def _leading(counts: list[int], channels: int, per: int, device: torch.device) -> torch.Tensor:
    """(B, 1, 1, C) float mask keeping the first counts[k] channels for the k-th sub-batch of `per` examples (the
    ViT-ResNAS supernet's mask, for NHWC maps)."""
    return leading_mask(counts, channels, per, device)[:, None]


def unit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, unit: tuple[int, int],
                   stride: tuple[int, int], windowed: bool) -> torch.Tensor:
    """timm `MaskUnitAttention` (before `proj`) on NHWC maps: q, k, v (B, H, W, C) -> (B, H/sy, W/sx, C), C split
    into `heads` heads, attention within mask units of `unit` tokens (after pooling) or over the whole map; with a
    stride the queries are max-pooled over each stride window (Q-pooling)."""
    B, H, W, C = q.shape
    sy, sx = stride
    unit = unit if windowed else (H // sy, W // sx)
    units = (H // (unit[0] * sy), W // (unit[1] * sx))
    windows = units[0] * units[1]

    def split(t: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B, heads, windows, tokens, C / heads)
        return mask_unit_order(t, unit, stride).reshape(B, -1, windows, heads, C // heads).permute(0, 3, 2, 1, 4)

    q, k, v = split(q), split(k), split(v)
    if sy * sx > 1:
        q = q.view(B, heads, windows, sy * sx, -1, C // heads).amax(dim=3)
    o = F.scaled_dot_product_attention(q, k, v)  # (B, heads, windows, unit tokens, C / heads)
    return grid_order(o.transpose(1, 3).reshape(B, -1, C), units, unit)


class HieraSupernet(nn.Module):
    """The largest net of `space` (a `TurboViT`, in `.net`) whose forward runs one or several sampled nets by masks."""

    def __init__(self, space: HieraSpace):
        super().__init__()
        self.space = space
        self.net: TurboViT = create_model("vl_turbovit_proxy", **space.largest(), **space.model_kwargs())

    def forward(self, x: torch.Tensor, network_defs: dict | list) -> torch.Tensor:
        """Logits of the nets in `network_defs` (one def, or a list of K defs for K equal contiguous sub-batches)."""
        defs = [network_defs] if isinstance(network_defs, dict) else list(network_defs)
        if x.shape[0] % len(defs):
            raise ValueError(f"batch {x.shape[0]} is not divisible into {len(defs)} sub-batches (one per net)")
        for d in defs:
            self.space.check(d)
        per, device, net, space = x.shape[0] // len(defs), x.device, self.net, self.space
        largest = space.largest()
        widths = largest["embed_dims"]
        embed = _leading([d["embed_dims"][0] for d in defs], widths[0], per, device)
        x = net._embed(x) * embed  # (B, H, W, C)
        unit = (space.mask_unit, space.mask_unit)
        for s, stage in enumerate(net.stages):
            blocks = ([stage.downsample] if s else []) + list(stage.blocks)
            for j, block in enumerate(blocks):
                opens = s > 0 and j == 0
                if opens:
                    unit = (unit[0] // 2, unit[1] // 2)
                    out = _leading([d["embed_dims"][s] for d in defs], widths[s], per, device)
                else:
                    out = embed
                kinds = [d["mask_unit_attn"][s - 1] if opens else d["mask_unit_attn"][s] for d in defs]
                hidden = _leading([int(d["embed_dims"][s] * d["mlp_ratio"]) for d in defs],
                                  block.mlp.fc1.out_features, per, device)
                keep = torch.tensor([float(j < d["depths"][s]) for d in defs], device=device)
                keep = keep.repeat_interleave(per)[:, None, None, None]  # (B, 1, 1, 1)
                x = self._block(block, x, embed, out, hidden, keep, defs, s, unit, (2, 2) if opens else (1, 1),
                                kinds, per)
                embed = out
        pooled = x.mean(dim=(1, 2))[:, None, :]  # (B, 1, C): the head's average pool
        return net.head.fc(masked_layer_norm(pooled, embed[:, 0], net.head.norm)[:, 0])

    @staticmethod
    def _block(block: nn.Module, x: torch.Tensor, embed: torch.Tensor, out: torch.Tensor, hidden: torch.Tensor,
               keep: torch.Tensor, defs: list, stage: int, unit: tuple[int, int], stride: tuple[int, int],
               kinds: list[bool], per: int) -> torch.Tensor:
        """timm `HieraBlock` (pre-norm mask-unit attention with Q-pooling + MLP) with masked LayerNorms and channel
        masks; the heads and the attention kind of sub-batch k are those of defs[k]."""
        sy, sx = stride
        B, H, W, _ = x.shape
        x_norm = masked_layer_norm(x, embed, block.norm1)
        if block.do_expand:  # widen the residual, then max-pool it 2x2 (Q-pooling)
            x = (block.proj(x_norm) * out).view(B, H // sy, sy, W // sx, sx, -1).amax(dim=(2, 4))
        qkv = block.attn.qkv(x_norm)  # (B, H, W, 3 * C_max): q | k | v
        C = block.attn.dim_out
        parts = []
        for k, d in enumerate(defs):
            width, rows = d["embed_dims"][stage], qkv[k * per:(k + 1) * per]
            q, kk, v = rows[..., :width], rows[..., C:C + width], rows[..., 2 * C:2 * C + width]
            o = unit_attention(q, kk, v, d["num_heads"][stage], unit, stride, kinds[k])
            parts.append(F.pad(o, (0, C - width)))
        x = x + block.attn.proj(torch.cat(parts)) * out * keep
        h = block.mlp.act(block.mlp.fc1(masked_layer_norm(x, out, block.norm2))) * hidden
        return x + block.mlp.fc2(h) * out * keep

    @torch.no_grad()
    def materialise(self, network_def: dict) -> TurboViT:
        """A plain `vl_turbovit_proxy` model of `network_def` holding the supernet's leading weight slices."""
        self.space.check(network_def)
        model = create_model("vl_turbovit_proxy", **network_def, **self.space.model_kwargs())
        src, dst = self.net, model
        widths, ratio = network_def["embed_dims"], network_def["mlp_ratio"]
        _copy(dst.patch_embed.proj, src.patch_embed.proj, widths[0], None)
        dst.pos_embed.copy_(src.pos_embed[..., :widths[0]])
        for s, (source, target) in enumerate(zip(src.stages, dst.stages)):
            sources = ([source.downsample] if s else []) + list(source.blocks)
            targets = ([target.downsample] if s else []) + list(target.blocks)
            for j, block in enumerate(targets):
                _copy_block(block, sources[j], widths[s - 1] if s and not j else widths[s], widths[s],
                            int(widths[s] * ratio))
        _copy(dst.head.norm, src.head.norm, widths[-1], None)
        _copy(dst.head.fc, src.head.fc, None, widths[-1])
        return model.train(self.training)


def _copy_block(dst: nn.Module, src: nn.Module, dim: int, dim_out: int, hidden: int) -> None:
    """Leading slices of one HieraBlock: q, k and v rows each, the widening projection, proj, MLP hidden channels."""
    qkv = src.attn.qkv
    C = src.attn.dim_out
    dst.attn.qkv.weight.copy_(qkv.weight.reshape(3, C, -1)[:, :dim_out, :dim].reshape(3 * dim_out, dim))
    dst.attn.qkv.bias.copy_(qkv.bias.reshape(3, C)[:, :dim_out].reshape(-1))
    _copy(dst.attn.proj, src.attn.proj, dim_out, dim_out)
    _copy(dst.norm1, src.norm1, dim, None)
    _copy(dst.norm2, src.norm2, dim_out, None)
    if dst.proj is not None:
        _copy(dst.proj, src.proj, dim_out, dim)
    _copy(dst.mlp.fc1, src.mlp.fc1, hidden, dim_out)
    _copy(dst.mlp.fc2, src.mlp.fc2, dim_out, hidden)
