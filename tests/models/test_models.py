"""Contract tests over every vitlab model (`vl_test_*` variants), plus the reference model's limits."""
import pytest
import timm
import torch

import vitlab
from vitlab.models.listing import count_params_meta

TEST_MODELS = timm.list_models("vl_test_*")


def _input(model, batch=2):
    """An image batch, or a clip batch (B, C, T, H, W) for a video model (it has `num_frames`; its pretrained_cfg
    input_size is one frame's, as the engine reads it)."""
    c, h, w = model.pretrained_cfg["input_size"]
    frames = getattr(model, "num_frames", None)
    return torch.randn(batch, c, frames, h, w) if frames else torch.randn(batch, c, h, w)


@pytest.mark.parametrize("name", TEST_MODELS)
def test_contract(name):
    torch.manual_seed(0)
    model = vitlab.create_model(name, num_classes=7)
    x = _input(model)
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters without a gradient: {no_grad[:5]}"
    features = model.forward_features(x)
    assert features.shape[0] == 2 and torch.isfinite(features).all()
    assert model.forward_head(features).shape == (2, 7)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    # state-dict round trip into a fresh instance gives identical outputs
    model.eval()
    again = vitlab.create_model(name, num_classes=3).eval()
    again.load_state_dict(model.state_dict())
    torch.testing.assert_close(again(x), model(x))


@pytest.mark.parametrize("name", TEST_MODELS)
def test_meta_count_equals_real_count(name):
    real = sum(p.numel() for p in vitlab.create_model(name).parameters())
    assert count_params_meta(name) == real


def test_reference_model_limits():
    model = vitlab.create_model("vl_vit_fmnist")
    params = sum(p.numel() for p in model.parameters())
    assert params <= 6_000_000
    assert isinstance(model, timm.models.vision_transformer.VisionTransformer)
    tokens = model.patch_embed(torch.zeros(1, 1, 28, 28))
    assert tokens.shape[1] >= 49                       # 7 x 7 patch tokens (+ the class token in the blocks)
    assert model.num_prefix_tokens == 1 and model.pretrained_cfg["input_size"] == (1, 28, 28)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_in_chans_and_img_size_follow_kwargs():
    model = vitlab.create_model("vl_vit_fmnist", in_chans=3, img_size=56, num_classes=5)
    assert model(torch.randn(1, 3, 56, 56)).shape == (1, 5)
    assert model.patch_embed.num_patches == 196
