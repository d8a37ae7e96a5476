"""Token reduction through the model contract: ToMe, EViT, ATS and MCTF on every seed backbone either work (right
output, token counts as scheduled, fewer MACs) or refuse by name; no-op settings equal the base model; reduced
models reload from a checkpoint with the technique re-applied."""
import copy
import functools

import pytest
import torch
from seed_models import _TIMM_KWARGS, SEED_MODELS, build, input_shape

import vitlab
from vitlab.errors import UserError
from vitlab.profiling import count_flops
from vitlab.tokens import ATS, MCTF, EViT, ToMe, token_schedule
from vitlab.tokens.families import reducible_blocks

# models the token techniques apply to (every other seed model must refuse all four by name)
SUPPORTED = {"vit_tiny_patch16_224", "vitamin_small_224", "convit_tiny", "crossvit_tiny_240", "vl_test_vit",
             "vl_test_t2t_vit", "vl_test_spectformer", "vl_test_pvt", "volo_d1_224", "vl_test_channelvit",
             "vl_test_ggem", "vl_test_hyena_nd"}
REDUCING = {"tome": ToMe(r=2), "evit": EViT(keep_rate=0.5), "ats": ATS(keep_rate=0.5), "mctf": MCTF(r=2)}
NO_OP = {"tome": ToMe(r=0), "evit": EViT(keep_rate=1.0), "ats": ATS(start=1.0), "mctf": MCTF(r=0)}
# MCTF keeps at least 10 tokens and skips the model's first block: these tiny sequences leave it nothing to fuse
NOTHING_TO_FUSE = {("crossvit_tiny_240", "mctf"), ("vl_test_pvt", "mctf")}
# how to rebuild the seed models that tests/seed_models.py does not build through vitlab.create_model
REBUILD = {name: (name, dict(kw, num_classes=10)) for name, kw in _TIMM_KWARGS.items()}


@functools.cache
def _built(name):
    torch.manual_seed(0)
    model = build(name)
    return model, torch.randn(4, *input_shape(name, model), generator=torch.Generator().manual_seed(1))


def _model_and_input(name, batch=2):
    """A fresh copy of the seed model (built once per session) and `batch` fixed inputs."""
    model, x = _built(name)
    return copy.deepcopy(model), x[:batch]


@pytest.mark.parametrize("name", list(SEED_MODELS))
def test_every_seed_model_reduces_tokens_or_refuses_by_name(name):
    base, x = _model_and_input(name)
    base_macs = None
    works = set()
    for text, cfg in REDUCING.items():
        model, _ = _model_and_input(name)
        try:
            vitlab.apply_(model, cfg)
        except vitlab.TechniqueNotApplicable as e:
            assert e.model_class == type(model).__name__ and str(e).startswith(text) and "supports" in str(e)
            continue
        works.add(text)
        with torch.no_grad():
            out = model(x)
        assert out.shape == (2, 10) and torch.isfinite(out).all(), text
        schedule = _per_sequence(model, token_schedule(model, cfg))
        for state, planned in zip(model.token_states, schedule):
            assert (all(map(int.__le__, state.counts, planned)) if text == "ats" else state.counts == planned), text
        reduces = any(n < s.num_tokens for s, planned in zip(model.token_sequences, schedule) for n in planned)
        assert reduces != ((name, text) in NOTHING_TO_FUSE), (text, schedule)
        if reduces:
            base_macs = base_macs or count_flops(base, x[:1]).macs
            assert count_flops(model, x[:1]).macs < base_macs, text
    assert works == (set(REDUCING) if name in SUPPORTED else set()), works


def _per_sequence(model, schedule: list[int]) -> list[list[int]]:
    """Split a schedule (one count per reducible block, execution order) into one list per token sequence."""
    out = [[] for _ in model.token_sequences]
    for (i, _), n in zip(reducible_blocks(model.token_sequences), schedule):
        out[i].append(n)
    return out


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_no_op_settings_equal_the_base_model(name):
    base, x = _model_and_input(name)
    with torch.no_grad():
        expected = base(x)
        for text, cfg in NO_OP.items():
            model, _ = _model_and_input(name)
            vitlab.apply_(model, cfg)
            diff = (model(x) - expected).abs().max().item()
            assert diff <= 1e-5, (text, diff)


@pytest.mark.parametrize("name,text", [(n, list(REDUCING)[i % 4]) for i, n in enumerate(sorted(SUPPORTED))])
def test_a_saved_reduced_model_reloads_with_its_technique(name, text, tmp_path):
    """Each supported family with one of the four techniques (all four are covered)."""
    model, x = _model_and_input(name)
    vitlab.apply_(model, REDUCING[text])
    model_name, kwargs = REBUILD.get(name, (None, None))
    c, h, w = x.shape[1:]
    pre = dict(input_size=[c, h, w], in_chans=c, mean=[0.5] * c, std=[0.5] * c, interpolation="bilinear",
               class_names=[str(i) for i in range(10)])
    vitlab.save_checkpoint(model, tmp_path, model_name=model_name, model_kwargs=kwargs, preprocessing=pre)
    again = vitlab.create_model(tmp_path)
    assert type(again) is type(model) and len(again.token_states) == len(model.token_states)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), atol=1e-6, rtol=1e-6)
    assert [s.counts for s in again.token_states] == [s.counts for s in model.token_states]


@pytest.mark.parametrize("name", ["crossvit_tiny_240", "vl_test_spectformer"])
def test_ats_padding_is_masked_wherever_tokens_are_read(name):
    """ATS pads each batch to its largest token count: every reader of the tokens (CrossViT's cross-branch fusion,
    average-pool heads) must ignore the padding, so an image's logits do not depend on the batch it is in."""
    model, x = _model_and_input(name, batch=4)
    vitlab.apply_(model, ATS(keep_rate=0.9, start=0.0))   # near-uniform scores: most samples hit distinct tokens
    with torch.no_grad():
        batch = model(x)
        assert any(state.padded for state in model.token_states)
        single = torch.cat([model(x[i:i + 1]) for i in range(len(x))])
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["vl_test_spectformer", "convit_tiny", "vl_test_pvt"])
def test_avg_pool_heads_weight_merged_tokens_by_size(name):
    """A head that averages tokens counts a merged token as the patches it stands for: the ToMe logits equal the
    head applied to the size-weighted mean of the final (non-prefix) tokens."""
    model, x = _model_and_input(name)
    model.global_pool = "avg"
    vitlab.apply_(model, ToMe(r=2))
    with torch.no_grad():
        tokens = model.forward_features(x)
        p = model.token_state.num_prefix
        size = model.token_state.size[:, p:]                             # (B, N - p, 1)
        expected = model.head((tokens[:, p:] * size).sum(1) / size.sum(1))
        torch.testing.assert_close(model.forward_head(tokens), expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(model.head(tokens[:, p:].mean(1)), expected)


def test_token_sources_draw_on_the_first_reducible_blocks_grid():
    from vitlab.explain import token_source_map

    for name, grid in (("convit_tiny", (4, 4)), ("vl_test_spectformer", (8, 8)), ("vl_test_pvt", (2, 2))):
        model, x = _model_and_input(name, batch=1)
        vitlab.apply_(model, ToMe(r=1))
        labels = token_source_map(model, x[0])
        final = token_schedule(model, ToMe(r=1))[-1] - model.token_state.num_prefix
        assert labels.shape == grid and (labels >= 0).all() and len(labels.unique()) == final < grid[0] * grid[1]
    model, x = _model_and_input("crossvit_tiny_240", batch=1)
    with pytest.raises(UserError, match="CrossVit has 2 sequences"):
        token_source_map(vitlab.apply_(model, ToMe(r=1)), x[0])


def test_attention_pool_heads_give_merged_tokens_their_size_bias():
    """A ViT with global_pool="map": its attention pool's keys get log(size), as the blocks' attention does."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, global_pool="map",
                              num_classes=10).eval()
    vitlab.apply_(model, ToMe(r=4))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        p = model.num_prefix_tokens
        bias = model.token_state.size[:, p:].log()[:, None, None, :, 0]      # (B, 1, 1, N - p)
        expected = model.head(model.fc_norm(model.attn_pool(tokens[:, p:], attn_mask=bias)))
        torch.testing.assert_close(model.forward_head(tokens), expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(model.head(model.fc_norm(model.attn_pool(tokens[:, p:]))), expected)
