"""FMViT (paper only, no official code): gMLP reparameterisation (multi-branch training form == fused inference form,
atol 1e-5), RLMHSA against explicit attention, the mechanism's stated properties (local high-frequency path, global
low-frequency path), exact parameter counts and MACs of vitlab's configurations, loaders.

The paper's architecture table was not readable (see vitlab/models/fmvit.py): the counts below are of vitlab's own
configurations, asserted as literals (a regression), not published figures."""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from vitlab.checkpoint import load_weights
from vitlab.models.fmvit import (ConvFusionBlock, FrequencyMixingBlock, GroupRepMlp, LightweightAttention,
                                 RepGroupConv1x1, checkpoint_filter_fn, grouped_to_dense)
from vitlab.models.listing import count_params_meta
from vitlab.profiling import count_flops

# name -> (params, train form; params, reparameterised; MACs at the default input size, train form; fused)
COUNTS = {
    "vl_fmvit_tiny": (10_663_168, 8_188_480, 1_449_705_216, 1_059_536_640),
    "vl_fmvit_small": (21_057_544, 16_078_600, 2_980_916_224, 2_171_677_696),
    "vl_fmvit_base": (38_882_568, 29_330_056, 5_930_989_056, 4_269_159_936),
    "vl_fmvit_large": (78_987_352, 59_410_840, 11_934_364_416, 8_552_903_424),
    "vl_test_fmvit": (197_466, 174_874, 6_029_184, 5_209_984),
}


def _randomize_bn_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine terms (fresh ones are the identity, which would hide folding bugs)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.randn(n, generator=g) * 0.5 + 1)
                m.bias.copy_(torch.randn(n, generator=g) * 0.5)
    return model


def _tiny(**kwargs):
    torch.manual_seed(0)
    return _randomize_bn_(timm.create_model("vl_test_fmvit", **kwargs)).eval()


def _fused_params(dim: int, hidden: int) -> int:
    """A reparameterised gMLP: two dense 1x1 convs with bias (its input BN folded away)."""
    return dim * hidden + hidden + hidden * dim + dim


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_param_counts(name):
    params, fused, _, _ = COUNTS[name]
    assert count_params_meta(name) == params
    with torch.device("meta"):
        model = timm.create_model(name)
    for module in model.modules():
        if isinstance(module, GroupRepMlp):   # what reparameterising must give, from the layout alone
            dim, hidden = module.fc1.in_chs, module.fc1.out_chs
            train = sum(p.numel() for p in module.parameters())
            params -= train - _fused_params(dim, hidden)
    assert params == fused


def test_reparameterized_param_count_matches_table():
    model = _tiny().reparameterize()
    assert sum(p.numel() for p in model.parameters()) == COUNTS["vl_test_fmvit"][1]


@pytest.mark.parametrize("name", ["vl_test_fmvit"])
def test_macs(name):
    _, _, macs, fused = COUNTS[name]
    model = timm.create_model(name).eval()
    x = torch.zeros(1, *model.pretrained_cfg["input_size"])
    assert count_flops(model, x).macs == macs
    assert count_flops(model.reparameterize(), x).macs == fused


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vl_fmvit_tiny", "vl_fmvit_small", "vl_fmvit_base", "vl_fmvit_large"])
def test_macs_large(name):
    test_macs(name)


# --- gMLP: convolutional multi-group reparameterisation ----------------------------------------------------

@pytest.mark.parametrize("groups", [2, 4, 8])
def test_grouped_weight_as_dense_is_the_same_conv(groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 1, groups=groups, bias=False)
    x = torch.randn(2, 16, 5, 7)
    torch.testing.assert_close(F.conv2d(x, grouped_to_dense(conv.weight, groups)), conv(x), atol=1e-6, rtol=0)
    dense = grouped_to_dense(conv.weight, groups)
    assert (dense != 0).sum() <= conv.weight.numel()       # block diagonal: nothing outside the groups


def test_rep_conv_branches_equal_fused_conv():
    torch.manual_seed(0)
    layer = _randomize_bn_(RepGroupConv1x1(16, 32, (1, 2, 4))).eval()
    x = torch.randn(3, 16, 6, 5)
    want = sum(F.batch_norm(F.conv2d(x, b.conv.weight, groups=g), b.bn.running_mean, b.bn.running_var,
                            b.bn.weight, b.bn.bias, eps=b.bn.eps) for g, b in zip(layer.groups, layer.branches))
    torch.testing.assert_close(layer(x), want)
    layer.reparameterize()
    assert not hasattr(layer, "branches") and layer.reparam_conv.groups == 1
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=0)


def test_rep_conv_refuses_groups_that_do_not_divide():
    with pytest.raises(ValueError, match="divide"):
        RepGroupConv1x1(6, 12, (1, 4))


def test_gmlp_reparameterized_is_one_dense_conv_each_side():
    torch.manual_seed(0)
    mlp = _randomize_bn_(GroupRepMlp(16, 48, (1, 2, 4))).eval()
    x = torch.randn(2, 16, 7, 7)
    want = mlp(x)
    mlp.reparameterize()
    assert isinstance(mlp.norm, nn.Identity)              # the input BN went into fc1
    convs = [m for m in mlp.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 2 and all(c.groups == 1 and c.kernel_size == (1, 1) for c in convs)
    torch.testing.assert_close(mlp(x), want, atol=1e-5, rtol=0)


def test_model_reparameterization_keeps_the_logits():
    model = _tiny()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
        got = model.reparameterize()(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    fused = [m for m in model.modules() if isinstance(m, RepGroupConv1x1)]
    assert len(fused) == 8 and all(m.reparam_conv is not None and not hasattr(m, "branches") for m in fused)
    assert not any(isinstance(m, nn.Conv2d) and m.groups > 1 and m.kernel_size == (1, 1) for m in model.modules())


def test_branches_all_matter():
    """Each gMLP branch contributes: zeroing one changes the output (the fused conv is not one branch's)."""
    torch.manual_seed(0)
    layer = _randomize_bn_(RepGroupConv1x1(8, 8, (1, 2, 4))).eval()
    x = torch.randn(1, 8, 3, 3)
    base = layer(x)
    for branch in layer.branches:
        saved = branch.conv.weight.detach().clone()
        with torch.no_grad():
            branch.conv.weight.zero_()
        assert not torch.allclose(layer(x), base)
        with torch.no_grad():
            branch.conv.weight.copy_(saved)


# --- RLMHSA and the frequency paths --------------------------------------------------------------------

@pytest.mark.parametrize("sr", [1, 2, 3])
def test_rlmhsa_against_explicit_attention(sr):
    torch.manual_seed(0)
    attn = _randomize_bn_(LightweightAttention(32, 4, sr)).eval()
    x = torch.randn(2, 32, 7, 6)
    B, C, H, W = x.shape
    y = attn.norm(x)
    tokens = y.flatten(2).transpose(1, 2)  # (B, N, C)
    pooled = F.avg_pool2d(y, sr, sr, ceil_mode=True, count_include_pad=False).flatten(2).transpose(1, 2)
    q = attn.q(tokens).view(B, H * W, 4, 8).transpose(1, 2)
    k, v = attn.kv(pooled).view(B, -1, 2, 4, 8).permute(2, 0, 3, 1, 4)
    assert k.shape[2] == -(-H // sr) * -(-W // sr)        # keys: one per pooled cell
    weights = (q @ k.transpose(-2, -1) / 8 ** 0.5).softmax(-1)
    want = attn.proj((weights @ v).transpose(1, 2).reshape(B, H * W, C)).transpose(1, 2).reshape(B, C, H, W)
    torch.testing.assert_close(attn(x), want, atol=1e-5, rtol=1e-5)


def test_full_resolution_attention_is_permutation_equivariant_and_pooled_is_not():
    torch.manual_seed(0)
    x = torch.randn(1, 16, 4, 4)
    perm = torch.randperm(16)

    def permuted(t):
        return t.flatten(2)[:, :, perm].reshape(t.shape)

    full = LightweightAttention(16, 2, 1).eval()
    torch.testing.assert_close(full(permuted(x)), permuted(full(x)), atol=1e-5, rtol=1e-5)
    pooled = LightweightAttention(16, 2, 2).eval()
    assert not torch.allclose(pooled(permuted(x)), permuted(pooled(x)), atol=1e-4)


def _influence(block: nn.Module, size: int = 9) -> torch.Tensor:
    """Which input positions the block's output at the centre depends on (B=1, summed over channels)."""
    x = torch.randn(1, block.mlp.fc1.in_chs, size, size, requires_grad=True)
    block(x)[0, :, size // 2, size // 2].sum().backward()
    return x.grad.abs().sum(1)[0] > 0


def test_cfb_is_local_and_fmb_is_global():
    torch.manual_seed(0)
    cfb = _randomize_bn_(ConvFusionBlock(16, 2.0, (1, 2))).eval()
    seen = _influence(cfb)
    assert seen[3:6, 3:6].all() and seen.sum() == 9       # a 3x3 neighbourhood: the high-frequency path
    fmb = _randomize_bn_(FrequencyMixingBlock(16, 2, 2, 2.0, (1, 2))).eval()
    assert _influence(fmb).all()                          # every position, through the pooled attention


# --- loaders -------------------------------------------------------------------------------------------

def test_converter_round_trip_and_pretrained_file(tmp_path):
    model = _tiny()
    path = tmp_path / "fmvit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    x = torch.randn(2, 3, 64, 64)
    again = load_weights(timm.create_model("vl_test_fmvit").eval(), path, filter_fn=checkpoint_filter_fn)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))
        loaded = timm.create_model("vl_test_fmvit", pretrained=True,
                                   pretrained_cfg_overlay=dict(file=str(path))).eval()
        torch.testing.assert_close(loaded(x), model(x))
    assert checkpoint_filter_fn({"model": model.state_dict()}, model).keys() == model.state_dict().keys()


def test_gray_loading_sums_the_rgb_stem(tmp_path):
    model = _tiny()
    path = tmp_path / "rgb.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    gray = load_weights(timm.create_model("vl_test_fmvit", in_chans=1).eval(), path, filter_fn=checkpoint_filter_fn)
    torch.testing.assert_close(gray.stem[0].conv.weight, model.stem[0].conv.weight.sum(1, keepdim=True))
    g = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(gray(g), model(g.expand(-1, 3, -1, -1)), atol=1e-5, rtol=1e-5)


def test_tiny_training_lowers_the_loss_and_stays_fusable():
    """A few SGD steps on a fixed synthetic batch (training form, batch-statistics BN) lower the loss; the trained
    model still reparameterises to the same logits."""
    torch.manual_seed(0)
    model = timm.create_model("vl_test_fmvit", num_classes=4)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 4
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    model.eval()
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(model.reparameterize()(x), want, atol=1e-5, rtol=0)
