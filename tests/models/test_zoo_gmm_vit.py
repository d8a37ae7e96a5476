"""GMM-ViT (vitlab/models/gmm_vit.py) against the official code: fixture, parameter counts, MACs, the mask."""
import pytest
import torch
from safetensors.torch import save_file
from timm.layers import Attention

import vitlab
from vitlab.models.gmm_vit import (GaussianMixtureAttention, GMMViT, checkpoint_filter_fn, gaussian_mixture_mask,
                                   squared_grid_distances)
from vitlab.models.listing import count_params_meta
from vitlab.profiling import count_flops

from _zoo_common import assert_filter_is_identity, assert_official_file_converts, official_fixture

# exact trainable-parameter counts of the official constructors (models/create_model.py at b06b199, is_GMM=True,
# num_kernals=5, 32 px, 1000 classes)
OFFICIAL_PARAMS = {
    "vl_gmm_vit_d9": 2_884_192,
    "vl_gmm_vit_base": 4_537_384,
    "vl_gmm_vit_heat": 2_617_096,
    "vl_gmm_vit_d6": 3_342_988,
    "vl_gmm_vit_d15": 2_668_960,
    "vl_gmm_vit_d30": 1_346_320,
    "vl_gmm_vit_d30_w108": 2_950_300,
    "vl_gmm_vit_d30_w192": 9_112_120,
    "vl_gmm_vit_d60": 2_611_360,
}


def _fixture():
    return official_fixture("gmm_vit")


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_param_count_equals_official(name):
    assert count_params_meta(name) == OFFICIAL_PARAMS[name]


def test_param_counts_of_the_readme_model():
    with torch.device("meta"):
        cifar10 = vitlab.create_model("vl_gmm_vit_d9", num_classes=10)  # the README's 2.7M
        tiny_imagenet = vitlab.create_model("vl_gmm_vit_d9", num_classes=200, img_size=64, patch_size=8)
    assert sum(p.numel() for p in cifar10.parameters()) == 2_693_122
    assert sum(p.numel() for p in tiny_imagenet.parameters()) == 2_720_770 - 10 * 193 + 200 * 193


def test_logits_match_official_code():
    meta, x, logits, official_state = _fixture()
    assert meta["commit"] == "b06b199c20425650c2e83a34e4f6a1f3d2720501" and x.shape[-2:] == (32, 32)
    model = GMMViT(**meta["vitlab_kwargs"]).eval()
    model.load_state_dict(checkpoint_filter_fn(official_state, model))  # strict: every tensor mapped
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits, atol=1e-4, rtol=0)
        for block in model.blocks:  # the mask matters in this fixture: a constant mask of 1 moves the logits
            block.attn.alpha.zero_()[0] = 1.0
            block.attn.sigma.fill_(1e4)
        assert (model(x) - logits).abs().max() > 0.05


def test_filter_is_identity_on_vitlab_layout():
    assert_filter_is_identity(vitlab.create_model("vl_test_gmm_vit"), checkpoint_filter_fn)


def test_official_file_loads_through_timm_builder_and_adapts_to_one_channel(tmp_path):
    meta, x, logits, official_state = _fixture()
    path = tmp_path / "official.safetensors"
    save_file(official_state, str(path))
    overlay = dict(file=str(path))
    model = vitlab.create_model("vl_test_gmm_vit", pretrained=True, pretrained_cfg_overlay=overlay).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits, atol=1e-4, rtol=0)
    gray = vitlab.create_model("vl_test_gmm_vit", pretrained=True, in_chans=1, pretrained_cfg_overlay=overlay).eval()
    torch.testing.assert_close(gray.patch_embed.proj.weight, model.patch_embed.proj.weight.sum(1, keepdim=True))
    with torch.no_grad():
        torch.testing.assert_close(gray(x[:, :1]), model(x[:, :1].expand(-1, 3, -1, -1)), atol=1e-4, rtol=0)


def test_official_file_converts_to_a_vitlab_checkpoint(tmp_path):
    meta, x, logits, official_state = _fixture()
    # the official main.py's final checkpoint.pth: a plain state dict
    assert_official_file_converts(tmp_path, "vl_test_gmm_vit", official_state, checkpoint_filter_fn, x, logits)


def test_macs_at_32_px_and_the_readme_count():
    with torch.device("meta"):
        model = vitlab.create_model("vl_gmm_vit_d9", num_classes=10)
    flops = count_flops(model.to_empty(device="cpu").eval(), torch.randn(1, 3, 32, 32))
    assert flops.macs == 184_616_832 and flops.attention_macs == 2 * 9 * 64 * 64 * 192
    # README 170.9M: patch embedding + linear layers + the mask's elementwise product, without QK^T and AV
    mask_products = 9 * 12 * 64 * 64
    assert abs((flops.macs - flops.attention_macs + mask_products) / 170.9e6 - 1) < 5e-4


def test_mask_is_the_gaussian_mixture_of_the_grid_distance():
    torch.manual_seed(0)
    sigma, alpha = torch.rand(3, 2) * 3 + 0.5, torch.randn(3, 2)
    H, W = 3, 4
    mask = gaussian_mixture_mask(squared_grid_distances(H, W), sigma, alpha)  # (heads, HW, HW)
    assert mask.shape == (2, 12, 12)
    for i in range(H * W):
        for j in range(H * W):
            d2 = (i // W - j // W) ** 2 + (i % W - j % W) ** 2
            want = (alpha * torch.exp(-d2 / (2 * (sigma ** 2 + 1e-5)))).sum(0)
            torch.testing.assert_close(mask[:, i, j], want)
    torch.testing.assert_close(mask, mask.transpose(1, 2))
    torch.testing.assert_close(mask.diagonal(dim1=1, dim2=2), alpha.sum(0)[:, None].expand(2, 12))


def test_sigma_to_zero_leaves_only_the_diagonal():
    alpha = torch.randn(2, 3)
    mask = gaussian_mixture_mask(squared_grid_distances(4, 4), torch.zeros(2, 3), alpha)
    torch.testing.assert_close(mask, alpha.sum(0)[:, None, None] * torch.eye(16))


def _attention_pair():
    torch.manual_seed(0)
    gmm = GaussianMixtureAttention(32, 4, grid_size=(3, 5), num_kernels=2).eval()
    plain = Attention(32, 4, qkv_bias=False).eval()
    plain.load_state_dict({k: v for k, v in gmm.state_dict().items() if k not in ("sigma", "alpha")})
    return gmm, plain, torch.randn(2, 15, 32)


def test_a_mask_of_ones_is_timm_attention():
    # the mask multiplies the logits, so plain attention is M = 1 (alpha summing to 1, sigma -> infinity)
    gmm, plain, x = _attention_pair()
    with torch.no_grad():
        gmm.alpha.copy_(torch.tensor([[0.25] * 4, [0.75] * 4]))
        gmm.sigma.fill_(1e4)
        torch.testing.assert_close(gmm(x), plain(x), atol=1e-5, rtol=1e-4)
        gmm.sigma.fill_(2.0)
        assert (gmm(x) - plain(x)).abs().max() > 1e-2


def test_alpha_zero_gives_uniform_attention():
    gmm, _, x = _attention_pair()
    with torch.no_grad():
        gmm.alpha.zero_()
        v = gmm.qkv(x)[..., 64:]  # (B, N, C), heads side by side
        want = gmm.proj(v.mean(1, keepdim=True).expand_as(v))
        torch.testing.assert_close(gmm(x), want)


def test_mixture_parameters_train():
    model = vitlab.create_model("vl_test_gmm_vit")
    model(torch.randn(2, 3, 32, 32)).square().sum().backward()
    for block in model.blocks:
        assert block.attn.sigma.grad.abs().sum() > 0 and block.attn.alpha.grad.abs().sum() > 0


def test_non_square_grid_and_fixed_input_size():
    model = vitlab.create_model("vl_test_gmm_vit", img_size=(48, 64), num_classes=5).eval()
    assert model.blocks[0].attn.grid_size == (12, 16)
    assert model(torch.randn(1, 3, 48, 64)).shape == (1, 5)
    with pytest.raises(ValueError, match="build the model with img_size"):
        model.blocks[0].attn(torch.randn(1, 64, 32))
    with pytest.raises(ValueError, match="no class"):
        vitlab.create_model("vl_test_gmm_vit", class_token=True)
