"""LookupViT (Koner et al., ECCV 2024) fitted to a trained ViT: a few compressed tokens get the full block, the
full-resolution ("lookup") tokens get cheap updates, and the two sets talk through bidirectional cross-attention.

Before the first block the patch grid (H x W, after position embedding) is average-pooled to an h x w grid of
M = h x w compressed tokens; the prefix tokens (class token) join the compressed set, so the ViT's own head reads
it unchanged. Each block then runs, with x_c the compressed tokens (p + M) and x_p the N full-resolution tokens:

    information gathering   A = (q(LN(x_c)) k(LN(x_p))^T) * scale           (B, H, p + M, N), per head
                            x_c = x_c + proj(softmax_N(A) v(LN(x_p)))
    compressed tokens       x_c = block(x_c)                                  the ViT block: full MHSA + MLP
    information propagation x_p = x_p + proj'(softmax_M(A^T) v'(LN(x_c)))   A reused, transposed (bidirectional)
                            x_p = x_p + MLP_p(LN(x_p))                        MLP hidden width x lookup_mlp_ratio

The last block skips the propagation: nothing reads the full-resolution tokens after it. The block structure follows
the paper's Sec. 3 (MHBC_{p->c}, compressed MHSA + MLP, MHBC_{c->p} reusing the attention logits, a lower-width
MLP for the lookup tokens), cross-checked with lucidrains/vit-pytorch vit_pytorch/look_vit.py (commit 9992a61):
the paper has no official code. As the paper's fine-tuning of a ViT allows, the new modules start from the block's
weights: the cross-attentions copy its q/k/v/proj and norm1 (the compressed tokens first read the full-resolution
ones as the ViT's attention would), the lookup MLP keeps the block MLP's hidden units of largest
||fc1 row|| x ||fc2 column||, with norm2. Per-block MACs (`lookup_block_macs`) with N tokens, M' = p + M, width D,
block MLP hidden F and lookup MLP hidden F':

    block(x_c)     4 M' D^2 + 2 M'^2 D + 2 M' D F
    gathering      2 M' D^2 + 2 N D^2 + 2 M' N D
    propagation    M' D^2 + N D^2 + M' N D + 2 N D F'       (all blocks but the last)

against 4 N' D^2 + 2 N'^2 D + 2 N' D F for the ViT block on N' = p + N tokens.
"""
import copy
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp

__all__ = ["LookupBlocks", "GatherAttention", "PropagateAttention", "lookup_blocks", "lookup_block_macs",
           "compressed_grid"]


def _split_qkv(attn: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    """Three Linear copies (q, k, v) of a fused qkv Linear (rows q, k, v)."""
    qkv = attn.qkv
    D = qkv.in_features
    parts = []
    for i in range(3):
        lin = nn.Linear(D, qkv.out_features // 3, bias=qkv.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(qkv.weight[i * D:(i + 1) * D])
            if qkv.bias is not None:
                lin.bias.copy_(qkv.bias[i * D:(i + 1) * D])
        parts.append(lin.to(qkv.weight.device))
    return tuple(parts)


class GatherAttention(nn.Module):
    """MHBC_{p->c}: the compressed tokens query the full-resolution tokens; returns the update and the logits."""

    def __init__(self, block: nn.Module):
        super().__init__()
        attn = block.attn
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.norm_c, self.norm_p = copy.deepcopy(block.norm1), copy.deepcopy(block.norm1)
        self.q, self.k, self.v = _split_qkv(attn)
        self.q_norm, self.k_norm, self.out_norm = (copy.deepcopy(m) for m in (attn.q_norm, attn.k_norm, attn.norm))
        self.proj, self.ls = copy.deepcopy(attn.proj), copy.deepcopy(block.ls1)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        return x.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)     # (B, H, N, d)

    def forward(self, xc: torch.Tensor, xp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, p = self.norm_c(xc), self.norm_p(xp)
        q, k, v = self.q_norm(self.heads(self.q(c))), self.k_norm(self.heads(self.k(p))), self.heads(self.v(p))
        logits = (q * self.scale) @ k.transpose(-2, -1)                         # (B, H, M', N)
        out = logits.softmax(dim=-1) @ v                                        # (B, H, M', d)
        B, H, M, d = out.shape
        out = self.out_norm(out.transpose(1, 2).reshape(B, M, H * d))
        return self.ls(self.proj(out)), logits


class PropagateAttention(nn.Module):
    """MHBC_{c->p}: the full-resolution tokens read the compressed tokens through the transposed gathering logits,
    then a lower-width MLP."""

    def __init__(self, block: nn.Module, lookup_mlp_ratio: float):
        super().__init__()
        attn, mlp = block.attn, block.mlp
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim
        self.norm_c = copy.deepcopy(block.norm1)
        self.v = _split_qkv(attn)[2]
        self.out_norm, self.proj, self.ls1 = (copy.deepcopy(m) for m in (attn.norm, attn.proj, block.ls1))
        hidden = max(1, round(mlp.fc1.out_features * lookup_mlp_ratio))
        self.norm2, self.ls2 = copy.deepcopy(block.norm2), copy.deepcopy(block.ls2)
        self.mlp = Mlp(mlp.fc1.in_features, hidden, act_layer=type(mlp.act), bias=mlp.fc1.bias is not None)
        with torch.no_grad():     # keep the hidden units that carry most: ||fc1 row|| x ||fc2 column||
            score = mlp.fc1.weight.norm(dim=1) * mlp.fc2.weight.norm(dim=0)
            units = score.topk(hidden).indices.sort().values
            self.mlp.fc1.weight.copy_(mlp.fc1.weight[units])
            self.mlp.fc2.weight.copy_(mlp.fc2.weight[:, units])
            if mlp.fc1.bias is not None:
                self.mlp.fc1.bias.copy_(mlp.fc1.bias[units])
                self.mlp.fc2.bias.copy_(mlp.fc2.bias)
        self.mlp.to(mlp.fc1.weight.device)

    def forward(self, xp: torch.Tensor, xc: torch.Tensor, logits: torch.Tensor,
                drop_path1: nn.Module, drop_path2: nn.Module) -> torch.Tensor:
        B, M, C = xc.shape
        v = self.v(self.norm_c(xc)).view(B, M, self.num_heads, self.head_dim).transpose(1, 2)   # (B, H, M', d)
        out = logits.transpose(-2, -1).softmax(dim=-1) @ v                                     # (B, H, N, d)
        N = out.shape[2]
        out = self.out_norm(out.transpose(1, 2).reshape(B, N, C))
        xp = xp + drop_path1(self.ls1(self.proj(out)))
        return xp + drop_path2(self.ls2(self.mlp(self.norm2(xp))))


class LookupPath(nn.Module):
    """The modules one block adds (`blocks.i.lookup`): gathering, and propagation unless it is the last block."""

    def __init__(self, block: nn.Module, lookup_mlp_ratio: float, propagate: bool):
        super().__init__()
        self.gather = GatherAttention(block)
        self.propagate = PropagateAttention(block, lookup_mlp_ratio) if propagate else None


def compressed_grid(grid: tuple[int, int], tokens: int) -> Optional[tuple[int, int]]:
    """(h, w) with h x w = tokens and h / w as close as possible to the patch grid's aspect, or None."""
    H, W = grid
    h = max(1, round(math.sqrt(tokens * H / W)))
    for cand in sorted(range(1, tokens + 1), key=lambda c: abs(c - h)):
        if tokens % cand == 0 and cand <= H and tokens // cand <= W:
            return cand, tokens // cand
    return None


class LookupBlocks(nn.Sequential):
    """`model.blocks` run as LookupViT: splits the sequence, pools the compressed tokens, runs every block on them
    and returns the compressed sequence (B, p + M, C) to the model's final norm and head."""

    num_prefix: int
    grid: tuple[int, int]
    compressed: tuple[int, int]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, (H, W), (h, w) = self.num_prefix, self.grid, self.compressed
        B, N, C = x.shape
        if N - p != H * W:
            raise ValueError(f"lookupvit was applied for a {H}x{W} patch grid ({H * W} tokens) but got {N - p}; "
                             "run the model at the input size it was applied at")
        xp = x[:, p:]                                                           # (B, N, C) full resolution
        pooled = F.adaptive_avg_pool2d(xp.transpose(1, 2).reshape(B, C, H, W), (h, w))   # (B, C, h, w)
        xc = torch.cat([x[:, :p], pooled.flatten(2).transpose(1, 2)], dim=1)   # (B, p + M, C)
        for blk in self:
            update, logits = blk.lookup.gather(xc, xp)
            xc = blk(xc + blk.drop_path1(update))
            if blk.lookup.propagate is not None:
                xp = blk.lookup.propagate(xp, xc, logits, blk.drop_path1, blk.drop_path2)
        return xc


def lookup_blocks(model: nn.Module, num_prefix: int, grid: tuple[int, int], compressed: tuple[int, int],
                  lookup_mlp_ratio: float) -> nn.Module:
    """Turn `model.blocks` (an nn.Sequential of timm Blocks) into `LookupBlocks` in place, adding each block's
    lookup modules initialised from its weights."""
    blocks = model.blocks
    for i, blk in enumerate(blocks):
        blk.lookup = LookupPath(blk, lookup_mlp_ratio, propagate=i < len(blocks) - 1)
    blocks.__class__ = LookupBlocks
    blocks.num_prefix, blocks.grid, blocks.compressed = num_prefix, tuple(grid), tuple(compressed)
    return model


def lookup_block_macs(n: int, m: int, dim: int, hidden: int, lookup_hidden: int, propagate: bool = True) -> int:
    """MACs per image of one LookupViT block (module docstring): n full-resolution tokens, m = p + M compressed
    tokens (prefix included), width `dim`, block MLP `hidden`, lookup MLP `lookup_hidden`."""
    D = dim
    block = 4 * m * D * D + 2 * m * m * D + 2 * m * D * hidden
    gather = 2 * m * D * D + 2 * n * D * D + 2 * m * n * D
    prop = m * D * D + n * D * D + m * n * D + 2 * n * D * lookup_hidden
    return block + gather + (prop if propagate else 0)
