"""SReT: parity with the official code (fixture), exact parameter counts, MACs, slicing, sizes, in_chans, features."""
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import vitlab
from vitlab.checkpoint import load_weights
from vitlab.models.listing import count_params_meta
from vitlab.models.sret import SReT, checkpoint_filter_fn, slice_tokens, unslice_tokens
from vitlab.profiling import count_flops

from _zoo_common import assert_filter_is_identity

FIXTURE = Path(__file__).parents[1] / "fixtures" / "zoo" / "sret"

# sum(p.numel() for p in model.parameters()) of the official constructors (commit af6db0a), 1000 classes; recursion
# shares weights, so each recursive block counts once
OFFICIAL_PARAMS = {
    "vl_sret_tiny": 4_755_979,
    "vl_sret_tiny_wo_slice": 4_755_979,
    "vl_sret_lt": 4_988_024,
    "vl_sret_small": 20_899_692,
}
# (MACs the same counter gives for the official model at 224 px, README "FLOPs")
OFFICIAL_MACS = {
    "vl_sret_tiny": (1_112_444_672, 1.1e9),
    "vl_sret_tiny_wo_slice": (1_365_682_944, 1.4e9),
    "vl_sret_lt": (1_164_477_184, 1.2e9),
    "vl_sret_small": (4_172_819_112, 4.2e9),
}


def _official_fixture():
    tensors = load_file(FIXTURE / "official_tiny.safetensors")
    meta = json.loads((FIXTURE / "official_tiny.json").read_text())
    extras = {k: tensors.pop(k) for k in ("__input__", "__logits__")}
    return tensors, meta, extras


def _test_model(**kwargs) -> SReT:
    return vitlab.create_model("vl_test_sret", **kwargs).eval()


def test_matches_official_code():
    official, meta, extras = _official_fixture()
    model = _test_model(**meta["vitlab_config"], eval_shuffle=True)  # the official eval-time shuffle
    model.load_state_dict(checkpoint_filter_fn(official, model))
    torch.manual_seed(meta["seed_before_forward"])  # same permutations as the official forward
    with torch.no_grad():
        torch.testing.assert_close(model(extras["__input__"]), extras["__logits__"], atol=1e-4, rtol=0)


def test_filter_keeps_each_shared_block_once_and_is_identity_on_vitlab_layout():
    official, meta, _ = _official_fixture()
    model = _test_model(**meta["vitlab_config"])
    converted = checkpoint_filter_fn(official, model)
    assert converted.keys() == model.state_dict().keys()
    # the official dict repeats stage 0's block 0 at positions 0 and 2 (recursion): same tensor
    assert torch.equal(official["transformers.0.blocks.0.attn.qkv.weight"],
                       official["transformers.0.blocks.2.attn.qkv.weight"])
    assert_filter_is_identity(model, checkpoint_filter_fn)


def test_eval_shuffle():
    official, meta, extras = _official_fixture()
    x = extras["__input__"]
    shuffled = _test_model(**meta["vitlab_config"], eval_shuffle=True)
    shuffled.load_state_dict(checkpoint_filter_fn(official, shuffled))
    fixed = _test_model(**meta["vitlab_config"], eval_shuffle=False)
    fixed.load_state_dict(shuffled.state_dict())
    with torch.no_grad():
        torch.manual_seed(1)
        a = shuffled(x)
        torch.manual_seed(2)
        b = shuffled(x)
        assert not torch.allclose(a, b)  # official behaviour: a fresh permutation at every forward
        torch.testing.assert_close(fixed(x), fixed(x))


def test_sliced_attention_is_block_diagonal_attention():
    """G groups of (permuted) tokens == full attention masked to same-group pairs."""
    torch.manual_seed(0)
    block = vitlab.create_model("vl_test_sret").stages[0].blocks[0].eval()
    attn = block.attn
    x = torch.randn(2, 16, 32)
    order = torch.randperm(16)
    sliced = unslice_tokens(attn(slice_tokens(x, 4, order)), 2, order)
    group = torch.empty(16, dtype=torch.long)
    group[order] = torch.arange(16) // 4  # token order[i] is in group i // 4
    mask = group[:, None] == group[None, :]
    torch.testing.assert_close(sliced, attn(x, attn_mask=mask), atol=1e-5, rtol=0)
    torch.testing.assert_close(unslice_tokens(slice_tokens(x, 4, order), 2, order), x)
    with pytest.raises(ValueError, match="do not split"):
        slice_tokens(x, 3)


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_parameter_count_equals_official(name):
    assert count_params_meta(name) == OFFICIAL_PARAMS[name]


def test_recursion_adds_no_shared_parameters():
    with torch.device("meta"):
        once = timm.create_model("vl_sret_tiny", depths=(2, 5, 3))  # each block applied once
        model = timm.create_model("vl_sret_tiny")  # each block applied twice
    shared = [sum(p.numel() for s in m.stages for p in s.blocks.parameters()) for m in (once, model)]
    assert shared[0] == shared[1]
    assert len(model.stages[1].non_projs) == 10 and len(model.stages[1].blocks) == 5


def _check_macs(name):
    model = vitlab.create_model(name).eval()
    macs = count_flops(model, torch.randn(1, 3, 224, 224)).macs
    official, published = OFFICIAL_MACS[name]
    assert macs == pytest.approx(official, rel=1e-3)
    assert macs == pytest.approx(published, rel=0.05)


def test_macs_sret_tiny_at_224():
    _check_macs("vl_sret_tiny")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vl_sret_tiny_wo_slice", "vl_sret_lt", "vl_sret_small"])
def test_macs_larger_variants_at_224(name):
    _check_macs(name)


def test_other_input_sizes():
    model = _test_model()
    for size in [(96, 96), (64, 96)]:
        x = torch.randn(2, 3, *size)
        assert model(x).shape == (2, 10)
        _, intermediates = model.forward_intermediates(x)
        assert [tuple(t.shape[-2:]) for t in intermediates] == [(size[0] // 8, size[1] // 8),
                                                                  (size[0] // 16, size[1] // 16)]
    with pytest.raises(ValueError, match="slice groups"):
        model(torch.randn(1, 3, 72, 72))  # 9 x 9 tokens do not split into 4 groups
    assert _test_model(img_size=96).pos_embed.shape == (1, 32, 12, 12)


def test_pos_embed_resampled_from_another_size():
    official, meta, _ = _official_fixture()
    model = _test_model(**dict(meta["vitlab_config"], img_size=96))
    state = checkpoint_filter_fn(official, model)
    assert state["pos_embed"].shape == (1, 32, 12, 12)
    model.load_state_dict(state)


def test_in_chans_1_from_rgb_weights(tmp_path):
    rgb = _test_model()
    save_file({k: v.contiguous() for k, v in rgb.state_dict().items()}, tmp_path / "rgb.safetensors")
    gray = vitlab.create_model("vl_test_sret", pretrained=True, in_chans=1,
                               pretrained_cfg_overlay=dict(file=str(tmp_path / "rgb.safetensors"))).eval()
    assert gray.patch_embed.conv1.weight.shape[1] == 1
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(gray(x), rgb(x.expand(-1, 3, -1, -1)), atol=1e-4, rtol=0)


def test_features_only():
    model = timm.create_model("vl_test_sret", features_only=True)
    features = model(torch.randn(2, 3, 64, 64))
    assert [tuple(f.shape) for f in features] == [(2, 32, 8, 8), (2, 64, 4, 4)]
    assert model.feature_info.channels() == [32, 64] and model.feature_info.reduction() == [8, 16]
    first = timm.create_model("vl_test_sret", features_only=True, out_indices=(0,))
    assert len(first.model.stages) == 1  # later stages pruned


def test_load_weights_reads_an_official_checkpoint(tmp_path):
    # what `vitlab convert vl_sret_tiny SReT_T.pth --allow-pickle` runs: torch.load(weights_only=True), the filter
    official, meta, extras = _official_fixture()
    torch.save({"model": official, "epoch": 299}, tmp_path / "SReT_T.pth")
    model = _test_model(**meta["vitlab_config"], eval_shuffle=True)
    load_weights(model, tmp_path / "SReT_T.pth", allow_pickle=True, filter_fn=checkpoint_filter_fn)
    torch.manual_seed(meta["seed_before_forward"])
    with torch.no_grad():
        torch.testing.assert_close(model(extras["__input__"]), extras["__logits__"], atol=1e-4, rtol=0)


def test_gradient_checkpointing_replays_the_same_permutations():
    model = vitlab.create_model("vl_test_sret", num_classes=5)  # train mode: shuffled slices and drop path
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        torch.manual_seed(3)
        model(x).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain)
