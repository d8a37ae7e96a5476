"""ChannelViT (vitlab/models/channelvit.py) against the official code: fixture (all channels, channel subsets,
per-image channels, HCS), parameter counts, channel sampling, position embedding, converters, features, tokens."""
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import vitlab
from vitlab.checkpoint import load_weights
from vitlab.models.channelvit import ChannelViT, channel_pos_embed, checkpoint_filter_fn, sample_channel_subset
from vitlab.models.listing import count_params_meta
from vitlab.profiling import count_flops
from vitlab.tokens import ToMe, token_schedule

from _zoo_common import assert_filter_is_identity

FIXTURE = Path(__file__).parents[1] / "fixtures" / "zoo" / "channelvit"

# sum(p.numel() for p in model.parameters()) of the official constructors (commit 1077a10), 1000 classes, 3 channels
OFFICIAL_PARAMS = {
    "vl_channelvit_tiny_patch16": 5_619_688,   # channelvit_tiny(patch_size=16)
    "vl_channelvit_small_patch16": 21_855_208,  # channelvit_small(patch_size=16), hcs_channelvit_small alike
    "vl_channelvit_small_patch8": 22_007_272,  # channelvit_small(patch_size=8)
    "vl_channelvit_base_patch16": 86_176_744,  # channelvit_base(patch_size=16)
}


def _fixture():
    tensors = load_file(str(FIXTURE / "official_tiny.safetensors"))
    meta = json.loads((FIXTURE / "official_tiny.json").read_text())
    extras = {k: tensors.pop(k) for k in list(tensors) if k.startswith("__")}
    hcs_embed = tensors.pop("hcs:patch_embed.channel_embed.weight")
    return tensors, meta, extras, hcs_embed


def _official_model(state=None) -> ChannelViT:
    official, meta, _, _ = _fixture()
    model = ChannelViT(**meta["vitlab_config"]).eval()
    model.load_state_dict(checkpoint_filter_fn(official if state is None else state, model))  # strict: every tensor
    return model


def _test_model(**kwargs) -> ChannelViT:
    torch.manual_seed(0)
    return vitlab.create_model("vl_test_channelvit", **kwargs).eval()


def _case(extras, case):
    x, rect, per_image = extras["__input__"], extras["__input_rect__"], extras["__channels_per_image__"]
    return {
        "all": (x, None, extras["__logits__"]),
        "subset_024": (x[:, [0, 2, 4]], [0, 2, 4], extras["__logits_024__"]),
        "subset_3": (x[:, [3]], [3], extras["__logits_3__"]),    # one channel: no position-table resampling
        "non_square": (rect, None, extras["__logits_rect__"]),
        "per_image": (torch.stack([x[0, per_image[0]], x[1, per_image[1]]]), per_image,
                      extras["__logits_per_image__"]),
    }[case]


@pytest.mark.parametrize("case", ["all", "subset_024", "subset_3", "non_square", "per_image"])
def test_matches_official_code(case):
    _, meta, extras, _ = _fixture()
    assert meta["commit"] == "1077a103e30cf20b6223b64935666962d0e2e836"
    x, channels, expected = _case(extras, case)
    with torch.no_grad():
        torch.testing.assert_close(_official_model()(x, channels=channels), expected, atol=1e-4, rtol=0)


def test_official_hcs_layout_loads():
    official, _, extras, hcs_embed = _fixture()
    state = {k: v for k, v in official.items() if k != "patch_embed.channel_embed"}
    state["patch_embed.channel_embed.weight"] = hcs_embed  # hcs_channel_vit.py: an nn.Embedding
    with torch.no_grad():
        torch.testing.assert_close(_official_model(state)(extras["__input__"]), extras["__logits__"], atol=1e-4, rtol=0)


def test_official_hcs_training_batch_equals_its_channel_subset():
    # the official HCS model in train mode drew channels [4, 1] (random.seed(3)); its logits are those of the
    # eval-mode model given only those channels, in the official order or in input order
    _, _, extras, _ = _fixture()
    x, subset = extras["__input__"], extras["__hcs_subset__"]
    assert 1 < len(subset) < 5
    model = _official_model()
    with torch.no_grad():
        for index in (subset, subset.sort().values):
            torch.testing.assert_close(model(x[:, index], channels=index), extras["__logits_hcs_train__"], atol=1e-4,
                                       rtol=0)


def test_filter_is_identity_on_vitlab_layout():
    assert_filter_is_identity(_test_model(), checkpoint_filter_fn)


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_parameter_count_equals_official(name):
    assert count_params_meta(name) == OFFICIAL_PARAMS[name]


def test_parameter_counts_of_other_official_patch_sizes_and_channels():
    with torch.device("meta"):
        count = lambda name, **kw: sum(p.numel() for p in timm.create_model(name, **kw).parameters())  # noqa: E731
        assert count("vl_channelvit_tiny_patch16", patch_size=8) == 5_695_720  # channelvit_tiny(patch_size=8)
        assert count("vl_channelvit_base_patch16", patch_size=8) == 86_480_872  # channelvit_base(patch_size=8)
        # hubconf's JUMP-CP model: hcs_channelvit_small(patch_size=8, in_chans=5), num_classes=0 backbone
        assert count("vl_channelvit_small_patch8", in_chans=5, num_classes=0) == 21_623_040


def test_channel_tokens_and_shared_position_embedding():
    model = _test_model()
    tokens = model.patch_embed(torch.randn(2, 5, 32, 32))
    assert tokens.shape == (2, 5, 2, 2, 48) and model.patch_embed.num_patches == 20
    assert model.pos_embed.shape == (1, 2 * 2 + 1, 48)  # one entry per patch (shared by channels) + class token
    features = model.forward_features(torch.randn(2, 3, 64, 48), channels=[4, 0, 1])
    assert features.shape == (2, 1 + 3 * 4 * 3, 48)


def test_channel_order_does_not_matter():
    model = _official_model()  # perturbed weights: channel embeddings well apart
    x = torch.randn(2, 5, 32, 32)
    order = [3, 0, 4, 1, 2]
    with torch.no_grad():
        torch.testing.assert_close(model(x[:, order], channels=order), model(x), atol=1e-5, rtol=0)
        # but the indices matter: the same pixels labelled as other channels give other logits
        assert not torch.allclose(model(x[:, order], channels=[0, 1, 2, 3, 4]), model(x), atol=1e-3)


def test_position_table_is_resampled_as_the_official_code():
    table = torch.randn(1, 16, 8)
    assert channel_pos_embed(table, (4, 4), (4, 4), 1) is table  # one channel at the native grid: as stored
    resampled = channel_pos_embed(table, (4, 4), (4, 4), 2)
    assert resampled.shape == (1, 16, 8) and not torch.allclose(resampled, table, atol=1e-3)  # DINO's +0.1 scale
    assert channel_pos_embed(table, (4, 4), (3, 5), 2).shape == (1, 15, 8)


def test_hcs_samples_channel_counts_uniformly():
    generator = torch.Generator().manual_seed(0)
    draws = [sample_channel_subset(5, generator) for _ in range(4000)]
    counts = torch.bincount(torch.tensor([len(d) for d in draws]), minlength=6)[1:] / len(draws)
    assert ((counts - 0.2).abs() < 0.03).all(), counts  # k ~ U{1..5}; independent dropout would be binomial
    assert all(len(d.unique()) == len(d) and d.min() >= 0 and d.max() < 5 and torch.equal(d, d.sort().values)
               for d in draws)
    inclusion = torch.stack([torch.zeros(5).index_fill(0, d, 1.0) for d in draws]).mean(0)
    assert ((inclusion - 0.6).abs() < 0.04).all(), inclusion  # E[k] / C = 3 / 5 for every channel


def _token_counts(model, x, **kwargs) -> list[int]:
    counts = []
    hook = model.blocks[0].register_forward_pre_hook(lambda m, args: counts.append(args[0].shape[1]))
    with torch.no_grad():
        model(x, **kwargs)
    hook.remove()
    return counts


def test_hcs_in_train_mode_drops_channels_and_eval_mode_keeps_all():
    hcs = _test_model(hcs=True)
    plain = _test_model()
    x = torch.randn(2, 5, 32, 32)
    assert _token_counts(hcs, x) == [21]  # eval: every channel, 5 x 2 x 2 + class token
    with torch.no_grad():
        torch.testing.assert_close(hcs(x), plain(x))
    hcs.train()
    seen = set()
    for seed in range(6):
        torch.manual_seed(seed)
        keep = sample_channel_subset(5)  # what the forward below draws first
        torch.manual_seed(seed)
        count = _token_counts(hcs, x)[0]
        assert count == 4 * len(keep) + 1
        seen.add(count)
        torch.manual_seed(seed)
        with torch.no_grad():
            torch.testing.assert_close(hcs(x), plain(x[:, keep], channels=keep))
    assert len(seen) > 2
    plain.train()
    assert _token_counts(plain, x) == [21]  # without hcs, train mode keeps every channel


def test_input_errors_say_what_to_do():
    model = _test_model()
    with pytest.raises(ValueError, match="channels="):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="one index per input channel"):
        model(torch.randn(1, 3, 32, 32), channels=[0, 1])
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        model(torch.randn(1, 5, 40, 32))


def test_in_chans_1_from_multichannel_weights(tmp_path):
    source = _test_model()
    gray = _test_model(in_chans=1)
    gray.load_state_dict(checkpoint_filter_fn(source.state_dict(), gray))
    image = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        # the one channel's tokens are the mean of the five tokens of an image whose five channels are that one
        torch.testing.assert_close(gray.patch_embed(image), source.patch_embed(image.expand(-1, 5, -1, -1)).mean(1,
                                   keepdim=True), atol=1e-6, rtol=0)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "five.safetensors"))
    loaded = vitlab.create_model("vl_test_channelvit", pretrained=True, in_chans=1,
                                 pretrained_cfg_overlay=dict(file=str(tmp_path / "five.safetensors"))).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(image), gray(image))
    seven = _test_model(in_chans=7)
    state = checkpoint_filter_fn(source.state_dict(), seven)
    embed = source.patch_embed.channel_embed
    assert torch.equal(state["patch_embed.channel_embed"], embed[[0, 1, 2, 3, 4, 0, 1]])  # cyclic
    seven.load_state_dict(state)


def test_lightning_checkpoint_converts(tmp_path):
    # the supervised training module saves {"state_dict": {"backbone.*", "classifier.*"}}: what `vitlab convert
    # ... --allow-pickle` reads with load_weights
    official, meta, extras, _ = _fixture()
    state = {("classifier." + k[5:] if k.startswith("head.") else "backbone." + k): v for k, v in official.items()}
    torch.save({"epoch": 99, "state_dict": state}, tmp_path / "last.ckpt")
    model = ChannelViT(**meta["vitlab_config"]).eval()
    load_weights(model, tmp_path / "last.ckpt", allow_pickle=True, filter_fn=checkpoint_filter_fn)
    with torch.no_grad():
        torch.testing.assert_close(model(extras["__input__"]), extras["__logits__"], atol=1e-4, rtol=0)


def test_pos_embed_resampled_for_another_native_size():
    official, meta, extras, _ = _fixture()
    model = ChannelViT(**dict(meta["vitlab_config"], img_size=48)).eval()
    state = checkpoint_filter_fn(official, model)
    assert state["pos_embed"].shape == (1, 6 * 6 + 1, 32)
    model.load_state_dict(state)
    assert torch.isfinite(model(torch.randn(1, 5, 48, 48))).all()


def test_intermediates_stack_channel_tokens():
    model = _test_model()
    x = torch.randn(2, 5, 32, 32)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        sequences = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
        torch.testing.assert_close(final, model.forward_features(x))
    assert [tuple(m.shape) for m in maps] == [(2, 5 * 48, 2, 2)] * 2
    # channel c's D features at (i, j) are its token c * h * w + i * w + j
    torch.testing.assert_close(maps[1][:, 3 * 48:4 * 48, 1, 0], sequences[1][:, 3 * 4 + 1 * 2 + 0])
    subset = model.forward_intermediates(x[:, :2], channels=[0, 1], intermediates_only=True)
    assert tuple(subset[0].shape) == (2, 2 * 48, 2, 2)
    features = timm.create_model("vl_test_channelvit", features_only=True)
    assert features.feature_info.channels() == [5 * 48] * 2
    assert [tuple(f.shape) for f in features(x)] == [(2, 240, 2, 2)] * 2


def test_token_reduction_runs_on_channel_tokens():
    model = _test_model()
    x = torch.randn(2, 5, 32, 32)
    with torch.no_grad():
        expected = model(x)
        vitlab.apply_(model, ToMe(r=0))
        torch.testing.assert_close(model(x), expected)  # no-op setting: the untouched model
    model = _test_model()
    vitlab.apply_(model, ToMe(r=4))
    with torch.no_grad():
        assert model(x).shape == (2, 10)
        assert model.token_state.counts == token_schedule(model, ToMe(r=4)) == [17, 13]  # from 5 x 4 + class token
        model(x[:, :3], channels=[0, 1, 2])
        assert model.token_state.counts == [9, 5]  # a channel subset starts from 3 x 4 + 1 tokens


@pytest.mark.slow
def test_macs_tiny_at_224():
    model = vitlab.create_model("vl_channelvit_tiny_patch16").eval()
    # the same counter on the official channelvit_tiny with its head: 4,754,362,368 MACs (3 channels, 589 tokens)
    assert count_flops(model, torch.randn(1, 3, 224, 224)).macs == 4_754_362_368


def test_module_docstring_example_runs():
    import doctest

    import vitlab.models.channelvit as module

    result = doctest.testmod(module)
    assert result.attempted and not result.failed
