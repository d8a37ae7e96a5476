"""3-D deformable cross-modal attention: trilinear sampling (against F.grid_sample on 5-D input and a loop), zero
offsets = attention over the reference points, the joint- and temporal-stride sequences, and the vl_ models."""
import itertools
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import vitlab  # noqa: F401  (registers the vl_ models)
from vitlab.models.deform3d import Deformable3DAttention, DeformableBlock3D, reference_points, sample_3d


def _trilinear_loop(value: torch.Tensor, x: float, y: float, t: float) -> torch.Tensor:
    """Value (C, T, H, W) at one normalized point by the textbook sum over the 8 surrounding voxels (zero outside)."""
    C, T, H, W = value.shape
    px, py, pt = ((x + 1) * W - 1) / 2, ((y + 1) * H - 1) / 2, ((t + 1) * T - 1) / 2
    out = torch.zeros(C, dtype=torch.float64)
    for i, j, k in itertools.product((0, 1), repeat=3):
        vx, vy, vt = math.floor(px) + i, math.floor(py) + j, math.floor(pt) + k
        w = (1 - abs(px - vx)) * (1 - abs(py - vy)) * (1 - abs(pt - vt))
        if 0 <= vx < W and 0 <= vy < H and 0 <= vt < T:
            out += w * value[:, vt, vy, vx].double()
    return out


def test_sample_3d_matches_grid_sample_and_a_loop():
    g = torch.Generator().manual_seed(0)
    value = torch.randn(2, 3, 4, 5, 6, generator=g, dtype=torch.float64)
    points = torch.rand(2, 40, 3, generator=g, dtype=torch.float64) * 2.6 - 1.3  # some outside the volume
    ours = sample_3d(value, points)
    theirs = F.grid_sample(value, points[:, :, None, None, :], mode="bilinear", padding_mode="zeros",
                           align_corners=False)  # (B, C, P, 1, 1)
    torch.testing.assert_close(ours, theirs[:, :, :, 0, 0].transpose(1, 2))
    for b, p in [(0, 0), (0, 7), (1, 13), (1, 39)]:
        torch.testing.assert_close(ours[b, p], _trilinear_loop(value[b], *points[b, p].tolist()))
    # gradients with respect to the points agree too (the offsets learn through them)
    pts = points.clone().requires_grad_(True)
    (sample_3d(value, pts) ** 2).sum().backward()
    ref = points.clone().requires_grad_(True)
    (F.grid_sample(value, ref[:, :, None, None, :], align_corners=False) ** 2).sum().backward()
    torch.testing.assert_close(pts.grad, ref.grad)


def _manual_attention(attn: Deformable3DAttention, modal, tokens, keys_values):
    B, M, D = modal.shape
    h, d = attn.num_heads, attn.head_dim
    q = attn.q(torch.cat([modal, tokens], 1)).reshape(B, -1, h, d).transpose(1, 2)
    k, v = attn.kv(torch.cat([modal, keys_values], 1)).reshape(B, -1, 2, h, d).permute(2, 0, 3, 1, 4)
    weights = (q @ k.transpose(-2, -1) / d ** 0.5).softmax(-1)
    out = attn.proj((weights @ v).transpose(1, 2).reshape(B, -1, D))
    return out[:, :M], out[:, M:]


@pytest.mark.parametrize("downsample", [(1, 1, 1), (1, 2, 2), (2, 2, 2)])
def test_zero_offsets_attend_to_the_reference_points(downsample):
    """At zero offsets the deformable tokens are the map at the reference points: the map itself for a full grid,
    the cells' means (trilinear at a 2x2x2 cell's centre) for a coarser one."""
    torch.manual_seed(0)
    T, H, W, D = 4, 4, 6, 16
    attn = Deformable3DAttention(D, 2, (T, H, W), downsample)
    modal, tokens = torch.randn(2, 2, D), torch.randn(2, T * H * W, D)
    grid = tokens.transpose(1, 2).reshape(2, D, T, H, W)
    at_refs = F.avg_pool3d(grid, downsample).flatten(2).transpose(1, 2)  # (B, R, D), t-major like the reference grid
    with torch.no_grad():
        expected = _manual_attention(attn, modal, tokens, at_refs)
        for ours, theirs in zip(attn(modal, tokens), expected):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        # a learned offset moves every point by tanh(bias) * offset_range cells along its axis
        attn.offset_net[-1].bias.copy_(torch.tensor([0.3, -0.2, 0.1]))
        cells = torch.tensor([2 * d / n for n, d in zip((W, H, T), reversed(downsample))])
        shift = torch.tensor([0.3, -0.2, 0.1]).tanh() * attn.offset_range * cells
        refs = reference_points(attn.ref_grid)
        torch.testing.assert_close(attn.deformed_points(tokens), (refs + shift).expand(2, -1, -1))


class _Recorder(torch.nn.Module):
    """Stands in for an attention block: records the sequences it is given and returns them unchanged."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return x


def test_joint_and_temporal_stride_sequences():
    """Label each joint token with its (frame, joint) and read back which tokens share an attention sequence."""
    T, J, D, js, ts = 6, 10, 4, 5, 3
    block = DeformableBlock3D(D, 2, (3, 2, 2), (1, 1, 1), joint_stride=js, temporal_stride=ts)
    block.joint_attn, block.temporal_attn = _Recorder(), _Recorder()
    t, j = torch.meshgrid(torch.arange(T), torch.arange(J), indexing="ij")
    pose = torch.zeros(1, T, J, D)
    pose[..., 0], pose[..., 1] = t.float(), j.float()
    with torch.no_grad():
        _, _, out = block(torch.zeros(1, 2, D), torch.zeros(1, 12, D), pose)
    torch.testing.assert_close(out, pose)  # identity blocks: the strided layouts are undone exactly
    joint_seqs = block.joint_attn.seen[0][:, 1:, :2]  # (T J / js, js, 2): drop the skeleton token
    assert joint_seqs.shape == (T * J // js, js, 2)
    for seq in joint_seqs:
        assert len(set(seq[:, 0].tolist())) == 1  # one frame
        assert len({int(x) // js for x in seq[:, 1].tolist()}) == 1  # one run of js consecutive joints
    temporal_seqs = block.temporal_attn.seen[0][:, 1:, :2]  # (J ts, T / ts, 2)
    assert temporal_seqs.shape == (J * ts, T // ts, 2)
    for seq in temporal_seqs:
        frames = seq[:, 0].long()
        assert len(set(seq[:, 1].tolist())) == 1  # one joint
        assert torch.equal(frames, frames[0] + ts * torch.arange(T // ts))  # frames s, s + ts, ...


def test_vl_test_deform3d_both_streams_and_rgb_only():
    from vitlab.data import build_dataset

    data = build_dataset("moving-fashion-mnist-pose:clips=20", "train", img_size=32)
    clips = torch.stack([data[i][0] for i in range(2)])
    keypoints = torch.stack([data[i][2] for i in range(2)])
    torch.manual_seed(0)
    model = timm.create_model("vl_test_deform3d")
    logits = model(clips, keypoints)
    assert logits.shape == (2, 6) and model.num_prefix_tokens == 2
    logits.sum().backward()
    skeleton_grads = [p.grad.abs().sum() for n, p in model.named_parameters() if "joint" in n or "temporal" in n]
    assert skeleton_grads and all(g > 0 for g in skeleton_grads)
    with torch.no_grad():
        assert (model(clips, keypoints) - model(clips)).abs().amax() > 1e-5  # the skeleton reaches the logits
        moved = keypoints.clone()
        moved[:, :, :, 0] += 0.1
        assert (model(clips, moved) - model(clips, keypoints)).abs().amax() > 1e-5
    rgb_only = timm.create_model("vl_test_deform3d", skeleton=False)
    assert rgb_only(clips).shape == (2, 6) and not hasattr(rgb_only.blocks[0], "joint_attn")
    with pytest.raises(ValueError, match="skeleton=False"):
        rgb_only(clips, keypoints)
    with pytest.raises(ValueError, match="keypoints must be"):
        model(clips, keypoints[:, :4])
