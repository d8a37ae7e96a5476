"""Token reduction (ToMe, EViT, ATS, MCTF) on timm's VOLO: its transformer stages after the Downsample form one token
sequence (their attention flattens the map, their MLP is per token), the post network's class attention reads the
reduced tokens with their size bias (ATS padding masked) and the head's aux max skips padding."""
import copy
import functools

import pytest
import torch
from seed_models import build
from timm.models import volo

import vitlab
from vitlab.profiling import count_flops
from vitlab.tokens import ATS, MCTF, EViT, ToMe, token_schedule

NAME = "volo_d1_224"   # tiny: 64 x 64 input, a 4 x 4 grid and three Transformer blocks after the Downsample
REDUCING = {"tome": ToMe(r=2), "evit": EViT(keep_rate=0.5), "ats": ATS(keep_rate=0.5), "mctf": MCTF(r=2)}
NO_OP = {"tome": ToMe(r=0), "evit": EViT(keep_rate=1.0), "ats": ATS(start=1.0), "mctf": MCTF(r=0)}


@functools.cache
def _built():
    torch.manual_seed(0)
    model = build(NAME)
    # images at different scales, so ATS keeps a different number of tokens per image (padding)
    scale = torch.tensor([0.5, 1.0, 2.0, 4.0])[:, None, None, None]
    return model, torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * scale


def _model_and_input(batch=2):
    model, x = _built()
    return copy.deepcopy(model), x[:batch]


@pytest.mark.parametrize("text", list(REDUCING))
def test_volo_reduces_tokens_in_its_transformer_stages(text):
    base, x = _model_and_input()
    model, _ = _model_and_input()
    cfg = REDUCING[text]
    vitlab.apply_(model, cfg)
    (seq,) = model.token_sequences
    assert [b.name for b in seq.blocks] == ["network.2.0", "network.3.0", "network.4.0"]   # after the pos embed
    assert (seq.num_tokens, seq.num_prefix, seq.grid) == (16, 0, (4, 4))
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    planned = token_schedule(model, cfg)
    counts = model.token_state.counts
    assert (all(map(int.__le__, counts, planned)) if text == "ats" else counts == planned), (counts, planned)
    assert planned[-1] < 16 and counts[-1] < 16
    assert count_flops(model, x[:1]).macs < count_flops(base, x[:1]).macs


def test_no_op_settings_equal_the_untouched_volo():
    base, x = _model_and_input()
    with torch.no_grad():
        expected = base(x)
        for text, cfg in NO_OP.items():
            model, _ = _model_and_input()
            vitlab.apply_(model, cfg)
            diff = (model(x) - expected).abs().max().item()
            assert diff <= 1e-5, (text, diff)
            assert model.token_state.counts == [16, 16, 16], text


@pytest.mark.parametrize("text", ["tome", "ats"])
def test_a_saved_reduced_volo_reloads_with_its_technique(text, tmp_path):
    model, x = _model_and_input()
    vitlab.apply_(model, REDUCING[text])
    vitlab.save_checkpoint(model, tmp_path)
    again = vitlab.create_model(tmp_path)
    assert type(again) is type(model) and isinstance(again, volo.VOLO)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), atol=1e-6, rtol=1e-6)
    assert again.token_state.counts == model.token_state.counts


def test_ats_padding_is_masked_in_the_class_attention_and_the_aux_head():
    """An image's logits do not depend on the batch it is padded in."""
    model, x = _model_and_input(batch=4)
    vitlab.apply_(model, ATS(keep_rate=0.9, start=0.0))
    with torch.no_grad():
        batch = model(x)
        assert model.token_state.padded
        single = torch.cat([model(x[i:i + 1]) for i in range(len(x))])
        torch.testing.assert_close(batch, single, atol=1e-5, rtol=1e-5)
        # the aux head's max over tokens skips padding rows, whatever they hold
        tokens = model.forward_features(x)
        pad = torch.cat([torch.ones_like(model.token_state.size[:, :1]), model.token_state.size], 1)[..., 0] == 0
        assert pad.any()
        loud = torch.where(pad[..., None], 100 * torch.randn_like(tokens), tokens)
        torch.testing.assert_close(model.forward_head(loud), model.forward_head(tokens))
        assert not torch.allclose(volo.VOLO.forward_head(model, loud), model.forward_head(tokens))


def test_the_class_attention_gives_merged_tokens_their_size_bias():
    model, x = _model_and_input()
    vitlab.apply_(model, ToMe(r=2))
    attn = model.post_network[0].attn
    seen = {}
    handle = attn.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    with torch.no_grad():
        model(x)
        handle.remove()
        h, out = seen["x"], seen["out"]
        B, N, C = h.shape
        size = model.token_state.size                                              # (B, N - 1, 1)
        assert N - 1 == size.shape[1] == 10 and (size > 1).any()
        k, v = attn.kv(h).reshape(B, N, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q = attn.q(h[:, :1]).reshape(B, attn.num_heads, 1, attn.head_dim) * attn.scale
        bias = torch.cat([torch.ones_like(size[:, :1]), size], 1).log()[:, None, None, :, 0]

        def expected(bias):
            a = (q @ k.transpose(-2, -1) + bias).softmax(-1)
            return attn.proj((a @ v).transpose(1, 2).reshape(B, 1, -1))
        torch.testing.assert_close(out, expected(bias), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out, expected(0.0), atol=1e-5)


def test_avg_pool_weights_tokens_by_the_patches_they_stand_for():
    model, x = _model_and_input()
    model.global_pool = "avg"
    vitlab.apply_(model, ToMe(r=2))
    with torch.no_grad():
        tokens = model.forward_features(x)
        size = model.token_state.size
        assert (size.sum(1) == 16).all()
        expected = (tokens[:, 0] + (tokens[:, 1:] * size).sum(1)) / 17            # class token + 16 patches
        torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), expected, atol=1e-6, rtol=1e-5)
        assert not torch.allclose(tokens.mean(1), expected, atol=1e-6)


@pytest.mark.parametrize("text", list(REDUCING))
def test_tnt_is_refused_naming_its_pixel_embeddings(text):
    """TNT's outer tokens carry inner pixel embeddings: no merging rule is exact for them, so all four refuse."""
    model = build("tnt_s_patch16_224")
    with pytest.raises(vitlab.TechniqueNotApplicable, match="TNT.*inner pixel embeddings follow each outer token"):
        vitlab.apply_(model, REDUCING[text])
