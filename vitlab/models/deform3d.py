"""3-D deformable cross-modal transformer (Kim, Ahn & Ko, "Cross-Modal Learning with 3D Deformable Attention for
Action Recognition", ICCV 2023, arXiv 2212.05638) for RGB clips + skeleton keypoints.

No official code is published; this follows the paper's description (abstract, Fig. 2) and fills what it leaves
open with the choices of DAT (Xia et al., CVPR 2022), the 2-D deformable attention it extends, as marked below:

- 3-D deformable attention (3DTS + attention, Fig. 2b): reference points on a uniform (T_r, H_r, W_r) grid over the
  (T', H', W') RGB token map; an offset network (DAT's: depthwise Conv3d with stride = the grid's downsampling,
  GELU, 1x1x1 Conv3d to 3 offsets; ours starts at zero) moves them, bounded by tanh * `offset_range` cells; the
  deformable tokens are the map sampled trilinearly there (`sample_3d`). Queries are [cross-modal tokens, RGB
  tokens]; keys and values are [cross-modal tokens, deformable tokens] ("concatenated with modal tokens, then
  multiplied with Wk, Wv"). At zero offsets it is attention over the reference points (the cells' means when the
  grid is coarser than the map).
- Two cross-modal tokens, one per modality (RGB, skeleton), enter the deformable attention together, so each sees
  the other and every RGB query sees both; the head reads the mean of the last layer's cross-modal tokens.
- Local joint-stride attention: per frame, the joints in groups of `joint_stride` consecutive joints (here one
  group per item: its 5 keypoints) attend within their group, with the skeleton token in every group (its outputs
  averaged over groups and frames, as TimeSformer/PAAB average per-frame class tokens; our choice).
- Temporal-stride attention: per joint, the frames t = s, s + stride, ... form one sequence (with the skeleton
  token), so each attention sees T / stride tokens ("temporally reduces the number of input tokens").
- The skeleton is embedded per joint: Linear(2 -> D) of its (x, y) plus learned joint and frame embeddings (ours).

`skeleton=False` builds the RGB-only model (one cross-modal token, no skeleton stream). With the skeleton stream,
`forward(clip, keypoints)`; `forward(clip)` feeds zero coordinates (the joint tokens hold only the embedding's bias
and the joint and frame embeddings), the input of a clip whose pose is unknown.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import Block

from ._builder import build_vitlab_model
from .vivit import TubeletEmbed

__all__ = ["CrossModalDeformable3D", "Deformable3DAttention", "DeformableBlock3D", "sample_3d", "reference_points"]


def sample_3d(value: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Trilinear samples (B, P, C) of value (B, C, T, H, W) at points (B, P, 3) = (x, y, t) in [-1, 1], zero outside.

    `F.grid_sample`'s 5-D convention with align_corners=False (voxel i's centre at (2 i + 1) / size - 1), written as
    the eight corner gathers so its weights are explicit (the tests compare it with grid_sample and a loop).
    """
    B, C, T, H, W = value.shape
    size = points.new_tensor([W, H, T])
    pos = ((points + 1) * size - 1) / 2  # (B, P, 3) voxel coordinates (x, y, t)
    low = pos.floor()
    frac = pos - low
    low = low.long()
    flat = value.flatten(2)  # (B, C, T H W)
    out = value.new_zeros(B, points.shape[1], C)
    for corner in range(8):
        bits = torch.tensor([corner & 1, (corner >> 1) & 1, (corner >> 2) & 1], device=points.device)
        idx = low + bits  # (B, P, 3)
        weight = torch.where(bits.bool(), frac, 1 - frac).prod(dim=-1)  # (B, P)
        inside = ((idx >= 0) & (idx < size.long())).all(dim=-1)
        x, y, t = (idx[..., i].clamp(0, int(size[i]) - 1) for i in range(3))
        linear = (t * H + y) * W + x  # (B, P)
        gathered = flat.gather(2, linear[:, None, :].expand(B, C, -1)).transpose(1, 2)  # (B, P, C)
        out = out + gathered * (weight * inside)[..., None]
    return out


def reference_points(grid: tuple[int, int, int], device=None) -> torch.Tensor:
    """Centres (T_r H_r W_r, 3) of a (T_r, H_r, W_r) grid of cells as (x, y, t) in [-1, 1], t-major order."""
    axes = [(2 * torch.arange(n, device=device) + 1) / n - 1 for n in grid]  # cell centres per axis
    t, y, x = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([x, y, t], dim=-1).reshape(-1, 3)


class Deformable3DAttention(nn.Module):
    """Queries [modal tokens, RGB tokens] attend to [modal tokens, the RGB map sampled at deformed 3-D points]."""

    def __init__(self, dim: int, num_heads: int, map_size: tuple[int, int, int], downsample: tuple[int, int, int],
                 offset_range: float = 2.0, kernel: int = 3):
        super().__init__()
        self.num_heads, self.head_dim, self.map_size = num_heads, dim // num_heads, tuple(map_size)
        if any(m % d for m, d in zip(map_size, downsample)):
            raise ValueError(f"downsample {downsample} must divide the token map {map_size}")
        self.ref_grid = tuple(m // d for m, d in zip(map_size, downsample))
        self.offset_range = offset_range
        self.offset_net = nn.Sequential(  # odd kernel, padding kernel // 2: stride d maps n = m d cells to m
            nn.Conv3d(dim, dim, kernel_size=kernel, stride=downsample, padding=kernel // 2, groups=dim), nn.GELU(),
            nn.Conv3d(dim, 3, kernel_size=1))
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        nn.init.zeros_(self.offset_net[-1].weight)  # start at the reference points
        nn.init.zeros_(self.offset_net[-1].bias)

    def deformed_points(self, tokens: torch.Tensor) -> torch.Tensor:
        """Sampling points (B, T_r H_r W_r, 3) in [-1, 1] from RGB tokens (B, T' H' W', D)."""
        B, _, D = tokens.shape
        grid = tokens.transpose(1, 2).reshape(B, D, *self.map_size)  # (B, D, T', H', W')
        offsets = self.offset_net(grid)  # (B, 3 = (x, y, t), T_r, H_r, W_r)
        if tuple(offsets.shape[2:]) != self.ref_grid:
            raise ValueError(f"offset map {tuple(offsets.shape[2:])} != reference grid {self.ref_grid}")
        cells = offsets.new_tensor([2 / g for g in reversed(self.ref_grid)])  # one cell in [-1, 1] units, (x, y, t)
        offsets = offsets.flatten(2).transpose(1, 2).tanh() * self.offset_range * cells  # (B, R, 3)
        return reference_points(self.ref_grid, tokens.device) + offsets

    def forward(self, modal: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """modal (B, M, D), RGB tokens (B, T'H'W', D) -> their updates, same shapes."""
        B, M, D = modal.shape
        grid = tokens.transpose(1, 2).reshape(B, D, *self.map_size)  # (B, D, T', H', W')
        sampled = sample_3d(grid, self.deformed_points(tokens))  # (B, R, D) deformable tokens
        q = self.q(torch.cat([modal, tokens], 1)).reshape(B, -1, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv(torch.cat([modal, sampled], 1)).reshape(B, -1, 2, self.num_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4)  # each (B, heads, M + R, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, M + N, d)
        out = self.proj(out.transpose(1, 2).reshape(B, -1, D))
        return out[:, :M], out[:, M:]


def _grouped(block: Block, token: torch.Tensor, sequences: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `block` on [token, each sequence]: token (B, 1, D), sequences (B, S, L, D) -> the token's outputs averaged
    over the S sequences (B, 1, D) and the sequences' outputs (B, S, L, D)."""
    B, S, L, D = sequences.shape
    x = torch.cat([token.repeat_interleave(S, dim=0), sequences.reshape(B * S, L, D)], 1)  # (B S, 1 + L, D)
    x = block(x)
    return x[:, :1].reshape(B, S, D).mean(1, keepdim=True), x[:, 1:].reshape(B, S, L, D)


class DeformableBlock3D(nn.Module):
    """One layer: 3-D deformable attention + MLP on the RGB stream; joint-stride then temporal-stride attention on
    the skeleton stream (when the model has one)."""

    def __init__(self, dim: int, num_heads: int, map_size: tuple[int, int, int], downsample: tuple[int, int, int],
                 joint_stride: int, temporal_stride: int, mlp_ratio: float = 4.0, offset_range: float = 2.0,
                 skeleton: bool = True):
        super().__init__()
        self.joint_stride, self.temporal_stride = joint_stride, temporal_stride
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = Deformable3DAttention(dim, num_heads, map_size, downsample, offset_range)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        if skeleton:
            self.joint_attn = Block(dim, num_heads, mlp_ratio, qkv_bias=True)
            self.temporal_attn = Block(dim, num_heads, mlp_ratio, qkv_bias=True)

    def forward(self, modal: torch.Tensor, rgb: torch.Tensor, pose: torch.Tensor | None):
        """modal (B, M, D) (RGB token, then the skeleton token if any), rgb (B, T'H'W', D), pose (B, T, J, D) or
        None (RGB-only) -> the same three, updated."""
        M = modal.shape[1]
        d_modal, d_rgb = self.attn(self.norm1(modal), self.norm1(rgb))
        x = torch.cat([modal + d_modal, rgb + d_rgb], 1)
        x = x + self.mlp(self.norm2(x))
        modal, rgb = x[:, :M], x[:, M:]
        if pose is None:
            return modal, rgb, None
        B, T, J, D = pose.shape
        skeleton = modal[:, 1:2]
        groups = pose.reshape(B, T * (J // self.joint_stride), self.joint_stride, D)  # per frame, runs of joints
        skeleton, groups = _grouped(self.joint_attn, skeleton, groups)
        pose = groups.reshape(B, T, J, D)
        s = self.temporal_stride
        strided = pose.reshape(B, T // s, s, J, D).permute(0, 3, 2, 1, 4).reshape(B, J * s, T // s, D)  # frames s::s
        skeleton, strided = _grouped(self.temporal_attn, skeleton, strided)
        pose = strided.reshape(B, J, s, T // s, D).permute(0, 3, 2, 1, 4).reshape(B, T, J, D)
        return torch.cat([modal[:, :1], skeleton], 1), rgb, pose


class CrossModalDeformable3D(nn.Module):
    """Tubelet-embedded RGB clip (B, C, T, H, W) + keypoints (B, T, J, 2) -> class logits via cross-modal tokens."""

    def __init__(self, img_size: int = 32, num_frames: int = 10, tubelet_size: tuple[int, int, int] = (2, 8, 8),
                 in_chans: int = 1, num_classes: int = 6, embed_dim: int = 64, depth: int = 4, num_heads: int = 2,
                 mlp_ratio: float = 4.0, num_joints: int = 10, joint_stride: int = 5, temporal_stride: int = 2,
                 downsample: tuple[int, int, int] = (1, 2, 2), offset_range: float = 2.0, skeleton: bool = True):
        super().__init__()
        if num_joints % joint_stride or num_frames % temporal_stride:
            raise ValueError(f"joint_stride={joint_stride} must divide num_joints={num_joints} and "
                             f"temporal_stride={temporal_stride} num_frames={num_frames}")
        self.num_classes, self.num_frames, self.in_chans = num_classes, num_frames, in_chans
        self.num_joints = num_joints
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.skeleton, self.num_prefix_tokens = skeleton, 2 if skeleton else 1
        self.patch_embed = TubeletEmbed(img_size, num_frames, tubelet_size, in_chans, embed_dim)
        grid = self.patch_embed.grid_size
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, embed_dim))
        self.modal_tokens = nn.Parameter(torch.zeros(1, self.num_prefix_tokens, embed_dim))  # RGB[, skeleton]
        if skeleton:
            self.joint_embed = nn.Linear(2, embed_dim)
            self.joint_pos = nn.Parameter(torch.zeros(1, 1, num_joints, embed_dim))
            self.frame_pos = nn.Parameter(torch.zeros(1, num_frames, 1, embed_dim))
        self.blocks = nn.ModuleList([DeformableBlock3D(embed_dim, num_heads, grid, downsample, joint_stride,
                                                       temporal_stride, mlp_ratio, offset_range, skeleton)
                                     for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        for p in (self.pos_embed, self.modal_tokens, *((self.joint_pos, self.frame_pos) if skeleton else ())):
            trunc_normal_(p, std=0.02)
        for m in self.modules():  # ViT's init for the linear layers (the offset nets' last conv stays at zero)
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "modal_tokens", "joint_pos", "frame_pos"}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor, keypoints: torch.Tensor | None = None) -> torch.Tensor:
        """Clip (B, C, T, H, W) [+ keypoints (B, T, J, 2) in [0, 1]] -> final-normed [cross-modal tokens, RGB tokens]
        (B, M + T'H'W', D)."""
        rgb = self.patch_embed(x).flatten(1, 2) + self.pos_embed  # (B, T'H'W', D)
        B = rgb.shape[0]
        modal, pose = self.modal_tokens.expand(B, -1, -1), None
        if self.skeleton:
            shape = (B, self.num_frames, self.num_joints, 2)
            if keypoints is not None and tuple(keypoints.shape) != shape:
                raise ValueError(f"keypoints must be {shape}, got {tuple(keypoints.shape)}")
            coords = keypoints if keypoints is not None else rgb.new_zeros(shape)  # unknown pose: no coordinates
            pose = self.joint_embed(coords) + self.joint_pos + self.frame_pos  # (B, T, J, D)
        elif keypoints is not None:
            raise ValueError("this model was built with skeleton=False (RGB only): call it without keypoints")
        for block in self.blocks:
            modal, rgb, pose = block(modal, rgb, pose)
        return self.norm(torch.cat([modal, rgb], 1))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, :self.num_prefix_tokens].mean(1)  # the last cross-modal tokens, combined
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, keypoints: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, keypoints))


def _cfg(**kwargs) -> dict:
    return {"url": "", "num_classes": 6, "input_size": (1, 32, 32), "pool_size": None, "crop_pct": 1.0,
            "interpolation": "bilinear", "mean": (0.2860,), "std": (0.3530,), "classifier": "head",
            "first_conv": "patch_embed.proj", **kwargs}


default_cfgs = generate_default_cfgs({
    "vl_deform3d_mfmnist.untrained": _cfg(),
    "vl_test_deform3d.untrained": _cfg(),
})


@register_model
def vl_deform3d_mfmnist(pretrained: bool = False, **kwargs) -> CrossModalDeformable3D:
    """3-D deformable cross-modal transformer for moving-fashion-mnist-pose clips (1, 10, 32, 32) + 10 keypoints:
    width 64, 4 layers, reference grid 5 x 2 x 2 over the 5 x 4 x 4 tubelet map."""
    arch = dict(embed_dim=64, depth=4, num_heads=2, downsample=(1, 2, 2))
    return build_vitlab_model(CrossModalDeformable3D, "vl_deform3d_mfmnist", pretrained, **dict(arch, **kwargs))


@register_model
def vl_test_deform3d(pretrained: bool = False, **kwargs) -> CrossModalDeformable3D:
    """Tiny 3-D deformable cross-modal transformer for tests: width 32, 2 layers."""
    arch = dict(embed_dim=32, depth=2, num_heads=2, downsample=(1, 2, 2))
    return build_vitlab_model(CrossModalDeformable3D, "vl_test_deform3d", pretrained, **dict(arch, **kwargs))
