"""SOFT (vitlab/models/soft.py) against the official code: fixture, parameter counts, MACs, the Newton-Raphson
inverse, the Nystrom approximation, linear cost, interfaces."""
import pytest
import timm
import torch
from safetensors.torch import save_file

import vitlab
from vitlab.models.listing import count_params_meta
from vitlab.models.soft import (SoftmaxFreeAttention, _NewtonInverse, checkpoint_filter_fn, gaussian_kernel,
                                newton_inverse, nystrom_attention)
from vitlab.profiling import count_flops

from _zoo_common import assert_filter_is_identity, assert_official_file_converts, official_fixture

# exact counts of the official constructors (models/softmax_free_vision_transformer.py at d3febc3, 1000 classes)
OFFICIAL_PARAMS = {
    "vl_soft_tiny": 13_069_056,
    "vl_soft_small": 38_858_462,  # README: 24M
    "vl_soft_medium": 45_812_707,
    "vl_soft_large": 64_700_646,
    "vl_soft_huge": 87_108_273,
}


def _fixture():
    meta, x, logits, state = official_fixture("soft")
    return meta, x.float(), logits, state


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_param_count_equals_official(name):
    assert count_params_meta(name) == OFFICIAL_PARAMS[name]


def test_logits_match_official_code():
    meta, x, logits, official_state = _fixture()
    assert meta["commit"] == "d3febc335775c696b5cc4cefe3158dcb9bcf5fc2" and x.shape == (2, 3, 64, 96)
    model = vitlab.create_model("vl_test_soft", **meta["vitlab_kwargs"]).eval()
    model.load_state_dict(checkpoint_filter_fn(official_state, model))  # strict: every tensor mapped
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits, atol=1e-4, rtol=0)


def test_filter_is_identity_on_vitlab_layout():
    assert_filter_is_identity(vitlab.create_model("vl_test_soft"), checkpoint_filter_fn)


def test_filter_resizes_position_embeddings_for_another_img_size():
    meta, x, logits, official_state = _fixture()
    model = vitlab.create_model("vl_test_soft", **dict(meta["vitlab_kwargs"], img_size=(64, 96))).eval()
    model.load_state_dict(checkpoint_filter_fn(official_state, model))
    assert model.stages[0].pos_embed.shape == (1, 16 * 24, 8) and model.stages[3].pos_embed.shape == (1, 1 + 6, 24)
    with torch.no_grad():  # resized once at load time = resized at run time (bilinear, as the official forward)
        torch.testing.assert_close(model(x), logits, atol=1e-4, rtol=0)


def test_official_file_loads_through_timm_builder_and_adapts_to_one_channel(tmp_path):
    meta, x, logits, official_state = _fixture()
    path = tmp_path / "official.safetensors"
    save_file(official_state, str(path))
    kwargs = dict(meta["vitlab_kwargs"], pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    model = vitlab.create_model("vl_test_soft", **kwargs).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits, atol=1e-4, rtol=0)
    gray = vitlab.create_model("vl_test_soft", in_chans=1, **kwargs).eval()
    torch.testing.assert_close(gray.stages[0].patch_embed.proj[0].weight,
                               official_state["patch_embed1.proj.0.weight"].sum(1, keepdim=True))
    with torch.no_grad():
        torch.testing.assert_close(gray(x[:, :1]), model(x[:, :1].expand(-1, 3, -1, -1)), atol=1e-4, rtol=0)


def test_official_file_converts_to_a_vitlab_checkpoint(tmp_path):
    meta, x, logits, official_state = _fixture()
    ddp = {f"module.{k}": v for k, v in official_state.items()}  # from DDP
    assert_official_file_converts(tmp_path, "vl_test_soft", {"epoch": 299, "state_dict": ddp}, checkpoint_filter_fn,
                                  x, logits, **meta["vitlab_kwargs"])


def test_filter_takes_the_ema_weights_of_an_official_training_file():
    # timm's CheckpointSaver keeps both; the official evaluation (and timm's loader) reads the EMA weights
    meta, x, logits, official_state = _fixture()
    model = vitlab.create_model("vl_test_soft", **meta["vitlab_kwargs"]).eval()
    saved = {"epoch": 299, "state_dict": {k: torch.zeros_like(v) for k, v in official_state.items()},
             "state_dict_ema": official_state}
    model.load_state_dict(checkpoint_filter_fn(saved, model))
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits, atol=1e-4, rtol=0)


def test_macs_at_224_equal_the_official_count():
    with torch.device("meta"):
        model = vitlab.create_model("vl_soft_tiny")
    model = model.to_empty(device="cpu").eval()  # uninitialised weights: enough to count MACs
    # FlopCounterMode on the official soft_tiny with its all-ones matmuls replaced by sums (2,220,943,416 with them)
    assert count_flops(model, torch.randn(1, 3, 224, 224)).macs == 2_157_019_192


def test_newton_inverse_converges_to_the_pseudo_inverse():
    points = 0.5 * torch.randn(12, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kernel = gaussian_kernel(*(2 * (torch.cat([points, points]),)))  # each point twice: 24 x 24 of rank 12
    assert torch.linalg.matrix_rank(kernel) == 12
    pinv = torch.linalg.pinv(kernel, hermitian=True)
    errors = [float((newton_inverse(kernel, iters, ridge=0.0) - pinv).norm() / pinv.norm()) for iters in (10, 20, 30)]
    assert errors[0] > 0.5 and errors[1] < 0.1 and errors[2] < 1e-10, errors  # slow start, then quadratic
    ridge = torch.linalg.inv(kernel + 0.01 * torch.eye(24, dtype=torch.float64))  # the official ridge
    torch.testing.assert_close(newton_inverse(kernel, 40), ridge)


def test_newton_inverse_backward_is_the_exact_inverses():
    points = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kernel = gaussian_kernel(points, points).requires_grad_()
    grad = torch.randn(6, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (_NewtonInverse.apply(kernel, 40, 0.01) * grad).sum().backward()
    exact = kernel.detach().requires_grad_()
    (torch.linalg.inv(exact + 0.01 * torch.eye(6, dtype=torch.float64)) * grad).sum().backward()
    torch.testing.assert_close(kernel.grad, exact.grad)


def test_nystrom_error_falls_to_zero_as_landmarks_reach_every_token():
    generator = torch.Generator().manual_seed(0)
    q = 0.5 * torch.randn(2, 64, 4, generator=generator, dtype=torch.float64)
    v = torch.randn(2, 64, 3, generator=generator, dtype=torch.float64)
    exact = gaussian_kernel(q, q) @ v
    order = torch.randperm(64, generator=generator)
    errors = [float((nystrom_attention(q, q[:, order[:m]], v, iters=60, ridge=0.0) - exact).norm() / exact.norm())
              for m in (4, 16, 48, 64)]
    assert errors == sorted(errors, reverse=True) and errors[0] > 0.1 and errors[-1] < 1e-8, errors


def _attention_macs(side: int, sr_ratio: int) -> int:
    torch.manual_seed(0)
    attn = SoftmaxFreeAttention(32, 2, sr_ratio=sr_ratio, conv_size=3).eval()
    return count_flops(attn, (torch.randn(1, side * side, 32), (side, side))).macs


def test_attention_cost_is_linear_in_tokens_at_a_fixed_number_of_landmarks():
    # pooling ratio side / 4: 16 landmarks at 16x16, 32x32 and 64x64 tokens; MACs = a * N + b exactly
    macs = [_attention_macs(side, side // 4) for side in (16, 32, 64)]
    assert macs[2] - macs[1] == 4 * (macs[1] - macs[0]) > 0, macs
    assert macs[2] < 4.01 * macs[1]
    # with the official fixed ratio the landmarks grow with N (m = N / 16 here): quadratic terms appear
    fixed = [_attention_macs(side, 4) for side in (16, 32, 64)]
    assert fixed[2] - fixed[1] > 4.5 * (fixed[1] - fixed[0]), fixed


def test_features_only_and_intermediates_on_a_non_square_input():
    x = torch.randn(2, 3, 64, 96)
    features = timm.create_model("vl_test_soft", features_only=True)
    assert features.feature_info.channels() == [32, 32, 64, 64]
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    assert [tuple(f.shape) for f in features(x)] == [(2, 32, 16, 24), (2, 32, 8, 12), (2, 64, 4, 6), (2, 64, 2, 3)]
    model = vitlab.create_model("vl_test_soft").eval()
    final, inter = model.forward_intermediates(x)
    torch.testing.assert_close(final, model.forward_features(x))
    assert final.shape == (2, 1 + 6, 64)  # class token first


def test_batch_entries_are_independent():
    # the attention folds heads (and head channels) into the batch: a mix-up would leak across images
    model = vitlab.create_model("vl_test_soft").eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[1:], model(x[1:]), atol=1e-5, rtol=1e-5)
