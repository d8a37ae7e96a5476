"""Multi-scale deformable attention (Deformable DETR, Zhu et al., ICLR 2021, Eq. 2) in pure PyTorch, for the CPU.

Each query attends to `n_points` sampled locations per head and per feature level, placed at learned offsets from
its reference point; the sampled values (bilinear, `grid_sample` with `align_corners=False` and zero padding, i.e.
the official CUDA kernel's semantics) are summed with weights softmax-normalised over levels x points.

`ms_deform_attn` computes what the official `MSDeformAttnFunction` (fundamentalvision/Deformable-DETR,
`models/ops/functions/ms_deform_attn_func.py::ms_deform_attn_core_pytorch`) and HF transformers'
`deformable_detr.modeling_deformable_detr.MultiScaleDeformableAttention` (an `nn.Module` in transformers 5.24, not a
function) compute; tests/dense/test_dense_msda.py checks it against HF's module (<= 1e-6) and a naive per-point bilinear
loop. The one difference is how the weighted sum over levels x points is written: HF multiplies and sums, which
`torch.utils.flop_counter` does not see; here it is one batched matmul (`aten.bmm`), which the counter counts, and
vitlab.profiling counts the bilinear sampling (`aten.grid_sampler_2d`, 4 MACs per sampled value). Inside an
`MSDeformAttn` both land in `FlopCount.attention_macs`.

`MSDeformAttn` is the official module (Traffic-X/ViT-CoMer@b57f386, `detection/ops/modules/ms_deform_attn.py`,
itself Deformable DETR's plus `ratio`, the width of the value projection relative to `d_model`), with its
initialisation: zero offset weights, offset biases pointing each head in its own direction (angle 2*pi*m/M, scaled
to the unit square, times k for the k-th point), zero attention-weight projection (uniform weights at start).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ms_deform_attn", "MSDeformAttn", "reference_points", "level_start_index"]


def ms_deform_attn(
        value: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        sampling_locations: torch.Tensor,
        attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Deformable attention core: sum over levels l and points p of A[q,m,l,p] * bilinear(V_l[m], loc[q,m,l,p]).

    Args:
        value: (B, S, M, d), the S = sum_l H_l * W_l value tokens of all levels, row-major per level, M heads.
        spatial_shapes: (L, 2) long, (H_l, W_l) per level.
        level_start_index: (L,) long, where each level starts in S.
        sampling_locations: (B, Q, M, L, P, 2), (x, y) in [0, 1] of each level's extent (0 = left/top edge).
        attention_weights: (B, Q, M, L, P), normalised over L x P by the caller.

    Returns:
        (B, Q, M * d)
    """
    B, S, M, d = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    grids = 2 * sampling_locations - 1  # grid_sample's [-1, 1] coordinates (align_corners=False)
    starts = level_start_index.tolist()
    sampled = []
    for level, (height, width) in enumerate(spatial_shapes.tolist()):
        v = value[:, starts[level]:starts[level] + height * width]  # (B, H_l*W_l, M, d)
        v = v.permute(0, 2, 3, 1).reshape(B * M, d, height, width)  # (B*M, d, H_l, W_l)
        grid = grids[:, :, :, level].transpose(1, 2).reshape(B * M, Q, P, 2)  # (B*M, Q, P, 2)
        sampled.append(F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    samples = torch.stack(sampled, dim=-2).flatten(-2)  # (B*M, d, Q, L*P)
    weights = attention_weights.transpose(1, 2).reshape(B * M, Q, L * P)  # (B*M, Q, L*P)
    out = torch.einsum("zdqk,zqk->zqd", samples, weights)  # (B*M, Q, d), runs as one bmm
    return out.view(B, M, Q, d).transpose(1, 2).reshape(B, Q, M * d)


def level_start_index(spatial_shapes: torch.Tensor) -> torch.Tensor:
    """(L,) start of each level in the flattened sequence of levels of sizes H_l * W_l."""
    sizes = spatial_shapes.prod(1)
    return torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))


def reference_points(spatial_shapes: list[tuple[int, int]], device: torch.device | None = None) -> torch.Tensor:
    """(1, sum_l H_l*W_l, 1, 2) normalised (x, y) centres of every cell of every level, row-major per level.

    As `get_reference_points` in ViT-CoMer's `comer_modules.py`: cell (i, j) of an H x W map sits at
    ((j + 0.5) / W, (i + 0.5) / H). The singleton level axis broadcasts one point to all levels.
    """
    points = []
    for height, width in spatial_shapes:
        ref_y, ref_x = torch.meshgrid(
            (torch.arange(height, dtype=torch.float32, device=device) + 0.5) / height,
            (torch.arange(width, dtype=torch.float32, device=device) + 0.5) / width,
            indexing="ij")
        points.append(torch.stack((ref_x.reshape(-1), ref_y.reshape(-1)), -1))  # (H_l*W_l, 2)
    return torch.cat(points, 0)[None, :, None]


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module: projections around `ms_deform_attn` (official MSDeformAttn)."""

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4,
                 ratio: float = 1.0):
        super().__init__()
        value_dim = int(d_model * ratio)
        if value_dim % n_heads:
            raise ValueError(f"MSDeformAttn: value width d_model*ratio = {value_dim} must be divisible by "
                             f"n_heads = {n_heads}; pick n_heads dividing {value_dim}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.value_dim = value_dim
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, value_dim)
        self.output_proj = nn.Linear(value_dim, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official `_reset_parameters`: head m's points start at k * (cos, sin)(2*pi*m/M) / max(|cos|, |sin|)."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)  # (M, 2)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)  # (M, L, P, 2)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, input_flatten: torch.Tensor,
                input_spatial_shapes: torch.Tensor, input_level_start_index: torch.Tensor,
                input_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """query (B, Q, C), reference_points (B or 1, Q, L or 1, 2 or 4) in [0, 1], input_flatten (B, S, C),
        input_spatial_shapes (L, 2), input_level_start_index (L,), input_padding_mask (B, S) True = padding
        -> (B, Q, C). With (x, y) reference points the offsets are in cells of each level (divided by (W_l, H_l));
        with (cx, cy, w, h) boxes, in half box sizes divided by n_points (Deformable DETR's box refinement)."""
        B, Q, _ = query.shape
        _, S, _ = input_flatten.shape
        if int(input_spatial_shapes.prod(1).sum()) != S:
            raise ValueError(f"MSDeformAttn: spatial shapes {input_spatial_shapes.tolist()} cover "
                             f"{int(input_spatial_shapes.prod(1).sum())} tokens, but the input has {S}")
        M, L, P = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(B, S, M, self.value_dim // M)  # (B, S, M, d)
        offsets = self.sampling_offsets(query).view(B, Q, M, L, P, 2)
        weights = F.softmax(self.attention_weights(query).view(B, Q, M, L * P), -1).view(B, Q, M, L, P)
        if reference_points.shape[-1] == 2:  # points: offsets in cells of each level
            normaliser = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1)  # (L, 2)
            locations = reference_points[:, :, None, :, None, :] + offsets / normaliser[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:  # boxes (cx, cy, w, h): offsets in half box sizes / n_points
            ref = reference_points[:, :, None, :, None, :]
            locations = ref[..., :2] + offsets / P * ref[..., 2:] * 0.5
        else:
            raise ValueError(f"MSDeformAttn: reference_points must end in 2 (x, y) or 4 (cx, cy, w, h) "
                             f"coordinates, got shape {tuple(reference_points.shape)}")
        out = ms_deform_attn(value, input_spatial_shapes, input_level_start_index, locations, weights)
        return self.output_proj(out)
