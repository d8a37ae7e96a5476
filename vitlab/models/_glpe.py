"""ResFormer's global-local positional embedding (GLPE) for timm ViTs: `vl_vit_fmnist(pos_embed="glpe")`.

Tian et al., "ResFormer: Scaling ViTs with Multi-Resolution Training" (CVPR 2023), Sec. 3.3; verified against the
official code, github.com/ruitian12/resformer @ 33e2c09f6c2cfca264644f0948783ad33c8c8e64,
image_classification/models.py (`GlobalPosEmbed`, `Attention.get_local_pos_embed`):

- global: a 2-D sine-cosine embedding of the token grid whose coordinates are normalised to (0, 2*pi] (so it changes
  smoothly with the grid size instead of being a fixed table), passed through a learned depth-wise 3x3 convolution
  and added to the patch tokens (the class token gets none);
- local: in every attention layer a depth-wise 3x3 convolution of the value map (shared by the heads, zero-initialised)
  is added to `attn @ v` at the patch tokens.

Neither part has a size-dependent table, so the model takes any input size (timm's `dynamic_img_size` grid path).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention
from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask
from timm.models.vision_transformer import VisionTransformer

__all__ = ["GLPEAttention", "GLPEVisionTransformer", "GlobalPosEmbed", "GridState", "sincos_grid"]


@dataclass
class GridState:
    """Per-forward state a GLPE model shares with its attention layers: the patch grid (rows, cols) of the input."""

    grid: tuple[int, int] | None = None


def sincos_grid(height: int, width: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """(dim, height, width) sine-cosine embedding of a grid, rows in the first dim/2 channels, columns in the rest.

    Coordinates are 1..n divided by n (+1e-6) times 2*pi, and channel pairs (2i, 2i+1) hold sin and cos at frequency
    temperature^(-2i/(dim/2)) — the official `GlobalPosEmbed.forward` (DETR's normalised sine embedding).
    """
    half = dim // 2
    y = torch.arange(1, height + 1, dtype=torch.float32) / (height + 1e-6) * (2 * math.pi)   # (H,)
    x = torch.arange(1, width + 1, dtype=torch.float32) / (width + 1e-6) * (2 * math.pi)     # (W,)
    freq = temperature ** (2 * (torch.arange(half, dtype=torch.float32) // 2) / half)        # (half,)

    def encode(coord: torch.Tensor) -> torch.Tensor:   # (n,) -> (n, half): sin on even channels, cos on odd
        angle = coord[:, None] / freq
        return torch.stack((angle[:, 0::2].sin(), angle[:, 1::2].cos()), dim=2).flatten(1)

    pos_y = encode(y)[:, None, :].expand(height, width, half)   # (H, W, half)
    pos_x = encode(x)[None, :, :].expand(height, width, half)   # (H, W, half)
    return torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1)    # (dim, H, W)


class GlobalPosEmbed(nn.Module):
    """Global part of GLPE: sine-cosine grid embedding -> learned depth-wise 3x3 conv, (H, W, dim) to add to tokens."""

    def __init__(self, dim: int):
        super().__init__()
        if dim % 4:
            raise ValueError(f"pos_embed='glpe' needs embed_dim divisible by 4 (sin/cos pairs per axis), got {dim}")
        self.dim = dim
        self.conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, height: int, width: int) -> torch.Tensor:
        grid = sincos_grid(height, width, self.dim).to(self.conv.weight)   # (dim, H, W)
        return self.conv(grid[None])[0].permute(1, 2, 0)                    # (H, W, dim)


class GLPEAttention(Attention):
    """timm `Attention` plus the local part of GLPE: a depth-wise 3x3 conv of the value map added to `attn @ v`.

    `state.grid` (rows, cols of the patch tokens) is set by `GLPEVisionTransformer` at the start of every forward
    (the model's `glpe_state`, shared by its attention layers); the tokens before the grid (class / register tokens)
    get no local term. Like timm's `Attention`, it runs SDPA when `fused_attn` is on and the explicit softmax
    (through `attn_drop`, where attention maps are read) when it is off.
    """

    def __init__(self, dim: int, num_heads: int = 8, **kwargs):
        super().__init__(dim, num_heads=num_heads, **kwargs)
        if self.gate is not None or not isinstance(self.norm, nn.Identity):
            raise ValueError("pos_embed='glpe' supports timm Attention without gated / scale_attn_norm options")
        self.local_pe = nn.Conv2d(self.head_dim, self.head_dim, kernel_size=3, padding=1, groups=self.head_dim)
        nn.init.zeros_(self.local_pe.weight)   # official init: the local term starts at zero
        nn.init.zeros_(self.local_pe.bias)
        self.state = GridState()

    def local_pos_embed(self, v: torch.Tensor) -> torch.Tensor:
        """(B, heads, N, head_dim) values -> (B, heads, N, head_dim) local term, zero at the prefix tokens."""
        B, heads, N, head_dim = v.shape
        grid = self.state.grid
        if grid is None or grid[0] * grid[1] > N:
            raise ValueError(f"GLPE attention got {N} tokens for a grid of {grid}: the tokens must be the model's "
                             f"prefix tokens plus its full patch grid (GLPE supports no token reduction)")
        height, width = grid
        prefix = N - height * width
        maps = v[:, :, prefix:].transpose(-2, -1).reshape(B * heads, head_dim, height, width)   # one map per head
        local = self.local_pe(maps).reshape(B, heads, head_dim, height * width).transpose(-2, -1)  # (B, h, HW, d)
        return F.pad(local, (0, 0, prefix, 0))                                                  # (B, h, N, d)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)   # each (B, heads, N, head_dim)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                               dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)   # (B, heads, N, N)
            attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = x + self.local_pos_embed(v)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        return self.proj_drop(self.proj(x))


class GLPEVisionTransformer(VisionTransformer):
    """timm `VisionTransformer` with GLPE in place of the learned `pos_embed` table; takes any input size."""

    def __init__(self, *args, pos_embed: str = "glpe", dynamic_img_size: bool = True, **kwargs):
        if pos_embed != "glpe" or not dynamic_img_size:
            raise ValueError(f"GLPEVisionTransformer needs pos_embed='glpe' and dynamic_img_size=True, got "
                             f"pos_embed={pos_embed!r}, dynamic_img_size={dynamic_img_size}")
        super().__init__(*args, pos_embed="none", dynamic_img_size=True, attn_layer=GLPEAttention, **kwargs)
        self.global_pos = GlobalPosEmbed(self.embed_dim)
        self.glpe_state = GridState()
        for block in self.blocks:
            block.attn.state = self.glpe_state

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The official code also exempts the positional convolutions from weight decay (`no_weight_decay`)."""
        return super().no_weight_decay() | {name for name, _ in self.named_parameters()
                                            if name.startswith("global_pos.") or ".local_pe." in name}

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) patch grid -> (B, prefix + H*W, C) tokens with the global embedding added."""
        _, height, width, _ = x.shape
        self.glpe_state.grid = (height, width)
        x = x + self.global_pos(height, width)
        return self.pos_drop(super()._pos_embed(x))   # timm's pos_embed=None path: prefix tokens + flatten
