"""MAFormer (paper only, no official code found): the two streams against direct softmax(q k^T) v computations, the
fusion using both streams, locality of the window stream, padding, exact parameter counts (this implementation's:
the paper's tables were not readable, see vitlab/models/maformer.py), MACs against the analytic count, loaders."""
import pytest
import timm
import torch
from safetensors.torch import save_file

import vitlab
from vitlab.checkpoint import load_weights, save_checkpoint
from vitlab.models.maformer import MAFBlock, MultiScaleAttentionFusion, checkpoint_filter_fn, maf_params_per_block
from vitlab.profiling import count_flops

PARAMS = {"vl_maformer_small": 38_655_848, "vl_maformer_base": 60_762_856, "vl_maformer_large": 136_160_872,
          "vl_test_maformer": 236_938}
ARCH = {  # embed_dim, depths, reductions, mlp_ratio, classes
    "vl_maformer_small": (64, (1, 2, 21, 1), (8, 4, 2, 1), 4.0, 1000),
    "vl_maformer_base": (64, (2, 4, 32, 2), (8, 4, 2, 1), 4.0, 1000),
    "vl_maformer_large": (96, (2, 4, 32, 2), (8, 4, 2, 1), 4.0, 1000),
    "vl_test_maformer": (32, (2, 2), (4, 2), 2.0, 10),
}


def _formula(embed_dim, depths, reductions, mlp_ratio, classes, in_chans=3):
    dims = [embed_dim * 2 ** i for i in range(len(depths))]
    total = in_chans * 49 * dims[0] + dims[0] + 2 * dims[0]  # stem conv 7x7 + LayerNorm
    for i, (dim, depth, r) in enumerate(zip(dims, depths, reductions)):
        if i:
            total += dims[i - 1] * 9 * dim + dim + 2 * dim  # 3x3 stride-2 conv + LayerNorm
        total += depth * maf_params_per_block(dim, r, mlp_ratio)
    return total + 2 * dims[-1] + dims[-1] * classes + classes


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_param_count(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    count = sum(p.numel() for p in model.parameters())
    assert count == PARAMS[name] == _formula(*ARCH[name])


def test_macs_match_analytic():
    """vl_maformer_small at 224: every grid splits into 7x7 windows and 7x7 GLD tokens, so the count is closed-form."""
    embed, depths, reductions, ratio, classes = ARCH["vl_maformer_small"]
    macs, w = 3 * 49 * embed * 56 * 56, 7
    for i, (depth, r) in enumerate(zip(depths, reductions)):
        C, side = embed * 2 ** i, 56 // 2 ** i
        N, M = side * side, (side // r) ** 2
        if i:
            macs += N * 9 * C // 2 * C  # downsampling conv
        local = 3 * N * C * C + 2 * N * w * w * C
        gld = (N * C * C if r > 1 else 0) + 3 * M * C * C + 2 * M * M * C
        fusion = N * C * C + 2 * M * C * C + 2 * N * M * C + N * C * C  # q, kv, cross attention, proj
        macs += depth * (local + gld + fusion + 2 * N * C * int(C * ratio))
    macs += embed * 8 * classes
    with torch.device("meta"):
        counted = count_flops(timm.create_model("vl_maformer_small").eval(), torch.empty(1, 3, 224, 224)).macs
    assert counted == pytest.approx(macs, rel=0.002)


def _softmax_attention(q, k, v, heads):
    """Direct multi-head softmax(q k^T / sqrt(d)) v on (N, C) / (M, C) tensors."""
    d = q.shape[-1] // heads
    q, k, v = (t.view(t.shape[0], heads, d).transpose(0, 1) for t in (q, k, v))
    return ((q @ k.transpose(1, 2)) * d ** -0.5).softmax(-1).matmul(v).transpose(0, 1).reshape(q.shape[1], -1)


def _mixer(window=4, reduction=2, dim=16, heads=2):
    torch.manual_seed(0)
    mixer = MultiScaleAttentionFusion(dim, heads, window_size=window, reduction=reduction).eval()
    for p in mixer.parameters():  # non-trivial biases and norms
        torch.nn.init.normal_(p, std=0.3)
    return mixer


@pytest.mark.parametrize("size", [(8, 8), (10, 7)])
def test_local_stream_is_attention_inside_windows(size):
    """Each w x w tile (clipped at the border: padded keys are masked) attends to its own pixels only."""
    mixer, (H, W), w = _mixer(), size, 4
    x = torch.randn(2, H, W, 16)
    with torch.no_grad():
        out = mixer.local_stream(x)
        for b in range(2):
            for top in range(0, H, w):
                for left in range(0, W, w):
                    tile = x[b, top:top + w, left:left + w]
                    q, k, v = mixer.local_qkv(tile.reshape(-1, 16)).chunk(3, dim=-1)
                    want = _softmax_attention(q, k, v, 2).view(tile.shape)
                    torch.testing.assert_close(out[b, top:top + w, left:left + w], want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [(8, 8), (9, 6)])
def test_global_stream_is_attention_over_downsampled_map(size):
    mixer, (H, W) = _mixer(reduction=2), size
    x = torch.randn(1, H, W, 16)
    with torch.no_grad():
        padded = torch.nn.functional.pad(x, (0, 0, 0, -W % 2, 0, -H % 2))  # zero pixels complete the last patches
        patches = padded.view(1, (H + 1) // 2, 2, (W + 1) // 2, 2, 16).permute(0, 1, 3, 5, 2, 4).flatten(3)
        weight = mixer.reduce.weight.flatten(1)  # (C, C * 2 * 2), the conv as a Linear of each 2x2 patch
        tokens = mixer.reduce_norm(patches.reshape(-1, weight.shape[1]) @ weight.T + mixer.reduce.bias)
        q, k, v = mixer.global_qkv(tokens).chunk(3, dim=-1)
        torch.testing.assert_close(mixer.global_stream(x)[0], _softmax_attention(q, k, v, 2), atol=1e-5, rtol=0)


def test_fusion_is_cross_attention_from_local_to_global():
    mixer = _mixer()
    x = torch.randn(1, 8, 8, 16)
    with torch.no_grad():
        local, glob = mixer.local_stream(x).reshape(64, 16), mixer.global_stream(x)[0]
        k, v = mixer.fuse_kv(glob).chunk(2, dim=-1)
        want = mixer.proj(local + _softmax_attention(mixer.fuse_q(local), k, v, 2))
        torch.testing.assert_close(mixer(x).reshape(64, 16), want, atol=1e-5, rtol=0)


def _zeroed(module, name):
    layer = module.get_submodule(name)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()
    return module


@pytest.mark.parametrize("stream", ["local_qkv", "global_qkv"])
def test_fusion_uses_both_streams(stream):
    mixer = _mixer()
    x = torch.randn(2, 8, 8, 16)
    with torch.no_grad():
        before = mixer(x)
        after = _zeroed(mixer, stream)(x)
    assert (after - before).abs().amax() > 1e-2
    assert after.abs().amax() > 1e-2  # the other stream still carries signal


def _block(global_on: bool):
    torch.manual_seed(0)
    block = MAFBlock(16, 2, window_size=4, reduction=2, mlp_ratio=2.0).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return block if global_on else _zeroed(block, "attn.global_qkv")


@pytest.mark.parametrize("global_on", [False, True])
def test_window_stream_is_local(global_on):
    """A pixel in window (0, 0) changes nothing outside that window when the GLD stream is zeroed; with GLD on, it
    reaches every position in one block."""
    block = _block(global_on)
    x = torch.randn(1, 8, 8, 16)
    y = x.clone()
    y[0, 1, 2] += torch.randn(16)
    with torch.no_grad():
        changed = (block(y) - block(x)).abs().amax(dim=-1)[0]  # (8, 8)
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[:4, :4] = True
    assert (changed[inside] > 1e-4).all()
    if global_on:
        assert (changed[~inside] > 1e-6).all()
    else:
        assert changed[~inside].max() == 0


def test_round_trip_gray_and_other_size(tmp_path):
    torch.manual_seed(0)
    model = vitlab.create_model("vl_test_maformer").eval()
    state = model.state_dict()
    assert checkpoint_filter_fn({"model": state}, model).keys() == state.keys()
    path = tmp_path / "maformer.safetensors"
    save_file(state, str(path))
    x = torch.randn(2, 3, 64, 64)
    loaded = load_weights(vitlab.create_model("vl_test_maformer").eval(), path, filter_fn=checkpoint_filter_fn)
    via_cfg = vitlab.create_model("vl_test_maformer", pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(path))).eval()
    reloaded = vitlab.create_model(save_checkpoint(model, tmp_path / "ckpt")).eval()
    with torch.no_grad():
        want = model(x)
        for other in (loaded, via_cfg, reloaded):
            torch.testing.assert_close(other(x), want, atol=0, rtol=0)
    gray = vitlab.create_model("vl_test_maformer", in_chans=1, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path))).eval()
    torch.testing.assert_close(gray.patch_embed.proj.weight, model.patch_embed.proj.weight.sum(1, keepdim=True))
    with torch.no_grad():
        assert gray(torch.randn(2, 1, 72, 56)).shape == (2, 10)  # not multiples of the window or reduction


def test_features():
    model = timm.create_model("vl_test_maformer", features_only=True).eval()
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(1, 32, 16, 16), (1, 64, 8, 8)]
    assert model.feature_info.reduction() == [4, 8]
