"""UniFormer-light (vitlab/models/uniformer_light.py) against the official code: fixture, parameter counts, MACs, the
Evo-ViT token pruning's properties, converters and interfaces."""
import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file
from timm.models.vision_transformer import Block

import vitlab
from vitlab.models.listing import count_params_meta
from vitlab.models.uniformer_light import (TokenPruningBlock, UniFormerLight, checkpoint_filter_fn, merge_dropped,
                                           pool_scores)
from vitlab.profiling import count_flops

from _zoo_common import assert_filter_is_identity, assert_official_file_converts, official_fixture

COMMIT = "52a0415e4e0dda880fab8ffbc710e4d8e171149d"

# exact counts of the official constructors (image_classification/models/uniformer_light.py at 52a0415, 1000
# classes), class-token head (norm_cls + head_cls) included
OFFICIAL_PARAMS = {"vl_uniformer_xxs": 10_215_280, "vl_uniformer_xs": 16_509_264}
TOKEN_HEAD_PARAMS = {"vl_uniformer_xxs": 449_896, "vl_uniformer_xs": 514_024}
# README "FLOPs" (multiply-adds) per input size; counted here 1.299G / 0.425G / 1.417G (XS at 224: 1.931G, README
# 2.0G, 3.4 % off, not asserted)
README_MACS = [pytest.param("vl_uniformer_xxs", 224, 1.3e9, marks=pytest.mark.slow),
               ("vl_uniformer_xxs", 128, 0.43e9),
               pytest.param("vl_uniformer_xs", 192, 1.4e9, marks=pytest.mark.slow)]


def _fixture():
    return official_fixture("uniformer_light")


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_param_count_equals_official(name):
    assert count_params_meta(name) == OFFICIAL_PARAMS[name]
    with torch.device("meta"):
        without = vitlab.create_model(name, token_head=False)
    assert sum(p.numel() for p in without.parameters()) == OFFICIAL_PARAMS[name] - TOKEN_HEAD_PARAMS[name]


def test_logits_match_official_code():
    meta, x, logits, official_state = _fixture()
    assert meta["commit"] == COMMIT
    model = UniFormerLight(**meta["vitlab_kwargs"]).eval()
    model.load_state_dict(checkpoint_filter_fn(official_state, model))  # strict: every tensor mapped
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits, atol=1e-4, rtol=0)


def test_filter_is_identity_on_vitlab_layout():
    assert_filter_is_identity(vitlab.create_model("vl_test_uniformer_light"), checkpoint_filter_fn)


def test_official_file_loads_through_timm_builder_and_adapts_to_one_channel(tmp_path):
    meta, x, logits, official_state = _fixture()
    path = tmp_path / "official.safetensors"
    save_file(official_state, str(path))
    kwargs = dict(meta["vitlab_kwargs"], pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    model = vitlab.create_model("vl_test_uniformer_light", **kwargs).eval()
    headless = vitlab.create_model("vl_test_uniformer_light", **dict(kwargs, token_head=False)).eval()
    assert headless.head_cls is None and model.head_cls is not None  # the filter dropped the class-token head
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(headless(x), logits, atol=1e-4, rtol=0)
    gray = vitlab.create_model("vl_test_uniformer_light", in_chans=1, **kwargs).eval()
    # timm's in_chans adaptation sums the RGB filters of `first_conv`: a gray image then acts like an RGB one
    torch.testing.assert_close(gray.patch_embed.proj[0].weight,
                               official_state["patch_embed1.proj.0.weight"].sum(1, keepdim=True))
    with torch.no_grad():
        gray_x = x[:, :1]
        torch.testing.assert_close(gray(gray_x), model(gray_x.expand(-1, 3, -1, -1)), atol=1e-4, rtol=0)


def test_official_file_converts_to_a_vitlab_checkpoint(tmp_path):
    meta, x, logits, official_state = _fixture()
    # the official files wrap the state dict in {"model": ...}
    again = assert_official_file_converts(tmp_path, "vl_test_uniformer_light", {"model": official_state},
                                          checkpoint_filter_fn, x, logits, **meta["vitlab_kwargs"])
    with torch.no_grad():
        main, token = again.forward_token_head(x)  # the official training pair: both heads
    torch.testing.assert_close(main, logits, atol=1e-4, rtol=0)
    assert token.shape == logits.shape and not torch.allclose(token, main, atol=1e-2)


@pytest.mark.parametrize("name,size,readme", README_MACS)
def test_macs_match_readme(name, size, readme):
    with torch.device("meta"):  # uninitialised weights: the counts do not depend on which tokens are kept
        model = vitlab.create_model(name)
    macs = count_flops(model.to_empty(device="cpu").eval(), torch.randn(1, 3, size, size)).macs
    assert abs(macs / readme - 1) < 0.02, macs


# --- the token pruning ----------------------------------------------------------------------------------

def _block(ratio: float, seed: int = 0, dim: int = 16) -> TokenPruningBlock:
    torch.manual_seed(seed)
    block = TokenPruningBlock(dim, 2, mlp_ratio=2.0, prune_ratio=ratio, trade_off=0.5).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    return block


def _inputs(n: int = 16, dim: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 1 + n, dim, generator=g), torch.rand(2, n, generator=g) + 0.1


def test_dropped_tokens_share_the_representatives_update():
    block = _block(0.5)
    x, scores = _inputs()
    with torch.no_grad():
        out, _ = block(x, (4, 4), scores)
        with_pos = x[:, 1:] + block.pos_embed(x[:, 1:].reshape(2, 4, 4, 16).permute(0, 3, 1, 2)).flatten(2).mT
    update = out[:, 1:] - with_pos  # (B, N, C)
    dropped = torch.argsort(scores, dim=1, descending=True)[:, 8:]  # the 8 lowest-scoring tokens of each image
    for b in range(2):
        same = update[b, dropped[b]]
        torch.testing.assert_close(same, same[:1].expand_as(same), atol=1e-5, rtol=0)
        kept = update[b][torch.ones(16, dtype=torch.bool).index_fill_(0, dropped[b], False)]
        assert (kept - same[:1]).abs().amax(-1).min() > 1e-3  # the kept tokens got updates of their own


def test_kept_tokens_see_the_dropped_ones_only_through_their_weighted_mean():
    block = _block(0.5)
    with torch.no_grad():
        block.pos_embed.weight.zero_()  # the position conv mixes neighbours; without it only the attention does
    x, scores = _inputs()
    order = torch.argsort(scores, dim=1, descending=True)
    kept, dropped = order[:, :8], order[:, 8:]
    rep = merge_dropped(torch.stack([x[b, 1:][dropped[b]] for b in range(2)]),
                        torch.stack([scores[b][dropped[b]] for b in range(2)]))  # (B, 1, C)
    collapsed = x.clone()
    for b in range(2):
        collapsed[b, 1 + dropped[b]] = rep[b]  # every dropped token replaced by the representative
    with torch.no_grad():
        out, new_scores = block(x, (4, 4), scores)
        out2, new_scores2 = block(collapsed, (4, 4), scores)
    for b in range(2):
        torch.testing.assert_close(out[b, 1 + kept[b]], out2[b, 1 + kept[b]], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, 0], out2[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(new_scores, new_scores2, atol=1e-6, rtol=0)
    for b in range(2):  # the dropped tokens keep their scores; the kept ones move towards the class attention
        torch.testing.assert_close(new_scores[b, dropped[b]], scores[b, dropped[b]])
        assert not torch.allclose(new_scores[b, kept[b]], scores[b, kept[b]])


def test_full_ratio_block_is_a_vit_block_with_class_attention_scores():
    block = _block(1.0)
    x, scores = _inputs()
    vit = Block(16, 2, mlp_ratio=2.0, qkv_bias=True, norm_layer=nn.LayerNorm).eval()
    vit.norm1.eps = vit.norm2.eps = 1e-6
    vit.load_state_dict({k: v for k, v in block.state_dict().items() if not k.startswith("pos_embed")})
    with torch.no_grad():
        with_pos = x.clone()
        with_pos[:, 1:] += block.pos_embed(x[:, 1:].reshape(2, 4, 4, 16).permute(0, 3, 1, 2)).flatten(2).mT
        out, first = block(x, (4, 4), None)
        out_again, blended = block(x, (4, 4), scores)
        torch.testing.assert_close(out, vit(with_pos), atol=1e-5, rtol=1e-5)
        q, k, _ = block.attn.qkv(block.norm1(with_pos)).reshape(2, 17, 3, 2, 8).permute(2, 0, 3, 1, 4)
        cls_attn = ((q @ k.mT) * 8 ** -0.5).softmax(-1)[:, :, 0, 1:].mean(1)  # (B, N)
    torch.testing.assert_close(first, cls_attn)  # the first attention block sets the scores
    torch.testing.assert_close(out_again, out)  # a full block runs every token whatever the scores
    torch.testing.assert_close(blended, 0.5 * scores + 0.5 * cls_attn)


def test_pool_scores_keeps_each_images_total():
    scores = torch.rand(3, 6 * 4, generator=torch.Generator().manual_seed(0))
    pooled = pool_scores(scores, (6, 4))
    assert pooled.shape == (3, 3 * 2)
    torch.testing.assert_close(pooled.sum(1), scores.sum(1))
    avg = scores.reshape(3, 3, 2, 2, 2).mean((2, 4)).flatten(1)  # 2x2 means of the 6x4 grid
    torch.testing.assert_close(pooled / avg, (pooled / avg)[:, :1].expand_as(avg))  # proportional to them


def test_merge_dropped_is_the_score_weighted_mean():
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]]])
    torch.testing.assert_close(merge_dropped(tokens, torch.tensor([[1.0, 1.0, 2.0]])), torch.tensor([[[1.75, 2.0]]]))
    torch.testing.assert_close(merge_dropped(tokens[:, :1].expand(1, 3, 2), torch.rand(1, 3)), tokens[:, :1])


def test_model_prunes_tokens_it_has_seen_the_scores_of():
    with pytest.raises(ValueError, match="prune ratio must be 1"):
        UniFormerLight(depths=(1, 1, 2, 1), embed_dims=(16, 16, 16, 16), head_dim=8,
                       prune_ratios=((0.5, 0.5), (0.5,)), trade_offs=((1.0, 0.5), (0.5,)))
    model = vitlab.create_model("vl_test_uniformer_light").eval()
    x = torch.randn(2, 3, 64, 64)
    calls = []
    hook = model.stages[2].blocks[1].attn.register_forward_hook(lambda m, a, out: calls.append(a[0].shape))
    with torch.no_grad():
        model(x)
    hook.remove()
    assert calls == [(2, 1 + 8 + 1, 48)]  # class token, 8 of the 4x4 grid's 16 tokens, the representative


# --- interfaces -----------------------------------------------------------------------------------------

def test_features_only_intermediates_and_heads():
    x = torch.randn(2, 3, 64, 64)
    features = timm.create_model("vl_test_uniformer_light", features_only=True)
    assert features.feature_info.channels() == [32, 32, 48, 64]
    assert [tuple(f.shape) for f in features(x)] == [(2, 32, 16, 16), (2, 32, 8, 8), (2, 48, 4, 4), (2, 64, 2, 2)]
    model = vitlab.create_model("vl_test_uniformer_light").eval()
    final, inter = model.forward_intermediates(x)
    torch.testing.assert_close(final, model.forward_features(x))
    early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
    torch.testing.assert_close(early[0], inter[1])
    assert model(torch.randn(1, 3, 96, 80)).shape == (1, 10)  # 6x5 stage-3 grid, 3x2 stage 4
    with pytest.raises(RuntimeError, match="token_head"):
        model.forward_token_head(x)
    full = vitlab.create_model("vl_test_uniformer_light", num_classes=5, token_head=True).train()
    assert full(x).shape == (2, 5)  # training mode: one tensor (the timm API); the pair is forward_token_head's
    full.reset_classifier(3)
    assert [t.shape for t in full.forward_token_head(x)] == [(2, 3), (2, 3)]
