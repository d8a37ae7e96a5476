"""Multi-scale deformable attention (vitlab.dense.msda): against HF transformers, a naive bilinear loop, the official
initialisation, and vitlab's FLOP counter against a hand formula."""
import math

import pytest
import torch

from vitlab.dense.msda import MSDeformAttn, level_start_index, ms_deform_attn, reference_points
from vitlab.profiling import count_flops

LEVELS = [(5, 6), (3, 3), (2, 1)]


def _random_inputs(dtype=torch.float64, B=2, Q=7, M=2, d=3, P=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(LEVELS)
    S = int(shapes.prod(1).sum())
    L = len(LEVELS)
    value = torch.randn(B, S, M, d, generator=g, dtype=dtype)
    # locations a little outside [0, 1] too, to exercise the zero padding
    locations = torch.rand(B, Q, M, L, P, 2, generator=g, dtype=dtype) * 1.4 - 0.2
    weights = torch.softmax(torch.randn(B, Q, M, L * P, generator=g, dtype=dtype), -1).view(B, Q, M, L, P)
    return value, shapes, level_start_index(shapes), locations, weights


def _bilinear(image: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """Sample image (d, H, W) at normalised (x, y), grid_sample(align_corners=False, zeros) semantics."""
    _, H, W = image.shape
    px, py = x * W - 0.5, y * H - 0.5  # pixel centres at (i + 0.5) / W
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(image.shape[0], dtype=image.dtype)
    for yy in (y0, y0 + 1):
        for xx in (x0, x0 + 1):
            if 0 <= xx < W and 0 <= yy < H:
                out += (1 - abs(px - xx)) * (1 - abs(py - yy)) * image[:, yy, xx]
    return out


def _naive(value, shapes, starts, locations, weights) -> torch.Tensor:
    B, S, M, d = value.shape
    _, Q, _, L, P, _ = locations.shape
    out = torch.zeros(B, Q, M, d, dtype=value.dtype)
    for b in range(B):
        for lvl, (H, W) in enumerate(shapes.tolist()):
            start = int(starts[lvl])
            for m in range(M):
                image = value[b, start:start + H * W, m].T.reshape(d, H, W)
                for q in range(Q):
                    for p in range(P):
                        x, y = locations[b, q, m, lvl, p].tolist()
                        out[b, q, m] += weights[b, q, m, lvl, p] * _bilinear(image, x, y)
    return out.reshape(B, Q, M * d)


def test_matches_naive_bilinear_loop():
    inputs = _random_inputs()
    torch.testing.assert_close(ms_deform_attn(*inputs), _naive(*inputs), atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_matches_hf_transformers(dtype, atol):
    detr = pytest.importorskip("transformers.models.deformable_detr.modeling_deformable_detr")
    value, shapes, starts, locations, weights = _random_inputs(dtype, B=2, Q=20, M=4, d=8, P=4, seed=1)
    expected = detr.MultiScaleDeformableAttention()(value, shapes, LEVELS, starts, locations, weights, 64)
    torch.testing.assert_close(ms_deform_attn(value, shapes, starts, locations, weights), expected,
                               atol=atol, rtol=0)


def test_module_matches_hf_module_with_copied_weights():
    detr = pytest.importorskip("transformers.models.deformable_detr.modeling_deformable_detr")
    config = pytest.importorskip("transformers").DeformableDetrConfig(d_model=16, num_feature_levels=3)
    torch.manual_seed(0)
    hf = detr.DeformableDetrMultiscaleDeformableAttention(config, num_heads=4, n_points=2).eval()
    ours = MSDeformAttn(16, n_levels=3, n_heads=4, n_points=2).eval()
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.3)  # non-trivial offsets and weights
    ours.load_state_dict({k: v for k, v in hf.state_dict().items() if not k.startswith("attn.")})
    shapes = torch.tensor(LEVELS)
    feats = torch.randn(2, int(shapes.prod(1).sum()), 16)
    query = torch.randn(2, 5, 16)
    ref = torch.rand(2, 5, 3, 2)
    expected, _ = hf(query, encoder_hidden_states=feats, reference_points=ref, spatial_shapes=shapes,
                     spatial_shapes_list=LEVELS, level_start_index=level_start_index(shapes))
    torch.testing.assert_close(ours(query, ref, feats, shapes, level_start_index(shapes)), expected,
                               atol=1e-5, rtol=1e-5)
    boxes = torch.cat([torch.rand(2, 5, 3, 2), torch.rand(2, 5, 3, 2) * 0.5], -1)  # (cx, cy, w, h)
    expected, _ = hf(query, encoder_hidden_states=feats, reference_points=boxes, spatial_shapes=shapes,
                     spatial_shapes_list=LEVELS, level_start_index=level_start_index(shapes))
    torch.testing.assert_close(ours(query, boxes, feats, shapes, level_start_index(shapes)), expected,
                               atol=1e-5, rtol=1e-5)


def test_official_initialisation():
    attn = MSDeformAttn(32, n_levels=2, n_heads=8, n_points=3)
    bias = attn.sampling_offsets.bias.view(8, 2, 3, 2)  # (heads, levels, points, xy)
    # head m points along angle 2*pi*m/8, scaled so the larger coordinate is 1, times k for point k
    torch.testing.assert_close(bias[0, 0, 0], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(bias[1, 1, 0], torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(bias[2, 0, 2], torch.tensor([0.0, 3.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(bias[5, 0, 1], torch.tensor([-2.0, -2.0]))
    assert attn.sampling_offsets.weight.abs().sum() == 0
    # zero attention projection: every query weighs its levels x points uniformly at the start
    query = torch.randn(1, 4, 32)
    logits = attn.attention_weights(query)
    assert torch.equal(logits, torch.zeros_like(logits))


def test_reference_points_are_cell_centres():
    ref = reference_points([(2, 4), (1, 1)])
    assert ref.shape == (1, 9, 1, 2)
    torch.testing.assert_close(ref[0, :4, 0], torch.tensor([[0.125, 0.25], [0.375, 0.25], [0.625, 0.25],
                                                            [0.875, 0.25]]))
    torch.testing.assert_close(ref[0, 8, 0], torch.tensor([0.5, 0.5]))


def test_rejects_mismatched_shapes():
    attn = MSDeformAttn(8, n_levels=1, n_heads=2, n_points=1)
    with pytest.raises(ValueError, match="cover 4 tokens"):
        attn(torch.randn(1, 3, 8), torch.rand(1, 3, 1, 2), torch.randn(1, 5, 8), torch.tensor([[2, 2]]),
             torch.tensor([0]))


def test_flop_count_matches_hand_formula():
    B, Q, C, M, P = 2, 7, 16, 4, 3
    L, shapes = len(LEVELS), torch.tensor(LEVELS)
    S = int(shapes.prod(1).sum())
    attn = MSDeformAttn(C, n_levels=L, n_heads=M, n_points=P)
    inputs = (torch.randn(B, Q, C), torch.rand(B, Q, L, 2), torch.randn(B, S, C), shapes, level_start_index(shapes))
    count = count_flops(attn, inputs)
    samples = B * Q * M * L * P * (C // M)  # sampled values: one per query, head, level, point, channel
    projections = B * Q * C * (M * L * P * 3) + B * S * C * C + B * Q * C * C  # offsets + weights, value, output
    assert count.by_op["aten.grid_sampler_2d"] == 4 * samples  # bilinear: 4 taps per sampled value
    assert count.by_op["aten.bmm"] == samples  # the attention-weighted sum over levels x points
    assert count.macs == projections + 5 * samples
    assert count.attention_macs == 5 * samples
    backward = count_flops(attn, inputs, backward=True)
    assert backward.by_op["aten.grid_sampler_2d_backward"] == 12 * samples  # input (4) + grid (8) gradients
