"""GGeM pooling (vitlab/models/ggem.py): the pooling's stated properties, parameter counts and MACs against the
class-token-free timm ViT and the DeiT / ViT papers, token reduction's sizes, and checkpoint loading."""
import pytest
import timm
import torch
from safetensors.torch import save_file

import vitlab
import vitlab.tokens.families
from vitlab.checkpoint import load_weights
from vitlab.models.ggem import GroupGeM, checkpoint_filter_fn, group_gem
from vitlab.models.listing import count_params_meta
from vitlab.profiling import count_flops

# name -> (timm ViT of the same trunk, groups, exact params, published params, published MACs at 224)
# published: DeiT (Touvron et al., 2021) Table 1 for S and B, ViT (Dosovitskiy et al., 2021) for L/16
VARIANTS = {
    "vl_vit_small_ggem": ("vit_small_patch16_224", 6, 22_049_902, 22e6, 4.6e9),
    "vl_vit_base_ggem": ("vit_base_patch16_224", 12, 86_566_132, 86e6, 17.6e9),
    "vl_vit_large_ggem": ("vit_large_patch16_224", 16, 304_324_600, 307e6, 61.6e9),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_params_are_the_vit_plus_one_exponent_per_group_and_match_the_papers(name):
    vit, groups, exact, published, _ = VARIANTS[name]
    with torch.device("meta"):
        trunk = timm.create_model(vit, class_token=False, global_pool="avg", fc_norm=False)
        model = vitlab.create_model(name)
    assert model.ggem.p.shape == (groups,) and model.ggem.p.requires_grad
    assert count_params_meta(name) == exact == sum(p.numel() for p in trunk.parameters()) + groups
    assert abs(exact / published - 1) < 0.02


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_macs_at_224_match_the_papers(name):
    with torch.device("meta"):
        model = vitlab.create_model(name).eval()
        macs = count_flops(model, torch.randn(1, 3, 224, 224)).macs
    assert abs(macs / VARIANTS[name][4] - 1) < 0.02, macs


def test_p_one_is_mean_pooling():
    x = torch.rand(2, 7, 12) + 0.1
    torch.testing.assert_close(group_gem(x, torch.ones(3)), x.mean(1))
    signed = torch.randn(2, 7, 12)  # GeM clamps at eps: p = 1 is the mean of the clamped features
    torch.testing.assert_close(group_gem(signed, torch.ones(3)), signed.clamp(min=1e-6).mean(1))


def test_large_p_approaches_max_pooling():
    x = torch.rand(2, 16, 12) * 5 + 0.1
    errors = [(group_gem(x, torch.full((4,), p)) - x.amax(1)).abs().max() for p in (3.0, 30.0, 300.0, 3000.0)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    torch.testing.assert_close(group_gem(x, torch.full((4,), 3000.0)), x.amax(1), atol=0, rtol=2e-3)
    assert (group_gem(x, torch.full((4,), 3.0)) < x.amax(1)).all()  # a power mean lies below the max
    huge = group_gem(x * 1e4, torch.full((4,), 200.0))  # (5e4)^200 overflows float32: scaled by the max instead
    assert torch.isfinite(huge).all()
    torch.testing.assert_close(huge, 1e4 * group_gem(x, torch.full((4,), 200.0)))


def test_each_group_pools_its_own_channels_with_its_own_p():
    x = torch.rand(3, 9, 8) + 0.1
    p = torch.tensor([1.0, 4.0])
    out = group_gem(x, p)
    torch.testing.assert_close(out[:, :4], x[:, :, :4].mean(1))  # group 0: p = 1
    torch.testing.assert_close(out[:, 4:], x[:, :, 4:].pow(4).mean(1).pow(0.25))  # group 1: p = 4
    with pytest.raises(ValueError, match="do not divide"):
        group_gem(x, torch.ones(3))


def test_per_group_p_is_learnable_and_gets_gradients():
    torch.manual_seed(0)
    model = vitlab.create_model("vl_test_ggem")
    assert dict(model.named_parameters())["ggem.p"].shape == (4,)
    optimizer = torch.optim.SGD([model.ggem.p], lr=0.1)
    model(torch.randn(4, 3, 32, 32)).logsumexp(-1).sum().backward()
    grad = model.ggem.p.grad
    assert grad.shape == (4,) and (grad != 0).all()
    before = model.ggem.p.detach().clone()
    optimizer.step()
    assert (model.ggem.p != before).all()
    # a group's p acts on its channels only: perturbing p_0 moves features 0..11 and nothing else
    pool = GroupGeM(48, 4)
    tokens = torch.rand(2, 5, 48) + 0.1
    base = pool(tokens)
    with torch.no_grad():
        pool.p[0] = 7.0
    moved = (pool(tokens) - base).abs().amax(0)
    assert (moved[:12] > 0).all() and (moved[12:] == 0).all()


def test_pool_types_and_reset_classifier():
    model = vitlab.create_model("vl_test_ggem").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)  # (B, 16, 48), after the final norm
        torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), group_gem(tokens, model.ggem.p))
        model.reset_classifier(0, "avg")
        torch.testing.assert_close(model(x), tokens.mean(1))
        model.reset_classifier(5, "ggem")
        assert model.global_pool == "ggem" and model(x).shape == (2, 5)


def test_merged_tokens_count_once_per_patch():
    x = torch.randn(2, 3, 32, 32)
    model = vitlab.create_model("vl_test_ggem").eval()
    with torch.no_grad():
        base = model(x)
        vitlab.apply_(model, vitlab.parse_apply(["tome:r=0"]))
        torch.testing.assert_close(model(x), base)  # no merge: the same pooling
    model = vitlab.create_model("vl_test_ggem").eval()
    vitlab.apply_(model, vitlab.parse_apply(["tome:r=2"]))
    with torch.no_grad():
        tokens = model.forward_features(x)
        size = model.token_state.size  # (B, 12, 1), summing to the 16 patches
        assert tokens.shape[1] == 12 and (size.sum(1) == 16).all() and (size > 1).any()
        pooled = model.forward_head(tokens, pre_logits=True)
        torch.testing.assert_close(pooled, group_gem(tokens, model.ggem.p, weights=size))
        assert (pooled - group_gem(tokens, model.ggem.p)).abs().max() > 1e-3  # the weights matter
        model.ggem.p.fill_(1.0)  # p = 1: the mean over the patches the tokens stand for
        want = (tokens.clamp(min=1e-6) * size).sum(1) / 16
        torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), want)


def test_timm_vit_checkpoint_loads_without_its_class_token(tmp_path):
    arch = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, mlp_ratio=2.0, num_classes=10)
    torch.manual_seed(0)
    with_cls = timm.create_model("vit_small_patch16_224", **arch)
    model = vitlab.create_model("vl_test_ggem")
    state = checkpoint_filter_fn(with_cls.state_dict(), model)
    model.load_state_dict(state)  # strict
    torch.testing.assert_close(model.pos_embed, with_cls.pos_embed[:, 1:])
    torch.testing.assert_close(model.blocks[1].mlp.fc2.weight, with_cls.blocks[1].mlp.fc2.weight)
    assert (model.ggem.p == 3.0).all()
    gap = timm.create_model("vit_small_patch16_224", class_token=False, global_pool="avg", fc_norm=False,
                            **arch).eval()
    path = tmp_path / "gap.pth"
    torch.save(gap.state_dict(), path)
    model = vitlab.create_model("vl_test_ggem").eval()
    load_weights(model, path, allow_pickle=True, filter_fn=checkpoint_filter_fn)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), gap.forward_features(x))


def test_pretrained_file_and_gray_adaptation(tmp_path):
    torch.manual_seed(0)
    source = vitlab.create_model("vl_test_ggem").eval()
    with torch.no_grad():
        source.ggem.p.copy_(torch.tensor([1.5, 2.0, 3.0, 4.0]))
    path = tmp_path / "ggem.safetensors"
    save_file(source.state_dict(), str(path))
    overlay = dict(file=str(path))
    x = torch.randn(2, 3, 32, 32)
    model = vitlab.create_model("vl_test_ggem", pretrained=True, pretrained_cfg_overlay=overlay).eval()
    gray = vitlab.create_model("vl_test_ggem", pretrained=True, in_chans=1, pretrained_cfg_overlay=overlay).eval()
    torch.testing.assert_close(gray.patch_embed.proj.weight, source.patch_embed.proj.weight.sum(1, keepdim=True))
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x))
        torch.testing.assert_close(gray(x[:, :1]), source(x[:, :1].expand(-1, 3, -1, -1)), atol=1e-4, rtol=0)
