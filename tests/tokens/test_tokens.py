"""Token reduction (ToMe, EViT): parity with the official ToMe, identity at no-op settings, schedules, FLOPs."""
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

import vitlab
from vitlab.profiling import count_flops
from vitlab.techniques import TechniqueError, parse_apply
from vitlab.tokens import ATS, MCTF, EViT, ToMe, token_schedule

FIXTURE = Path(__file__).parents[1] / "fixtures" / "tokens"
SMALL = dict(img_size=64, patch_size=8, embed_dim=48, depth=4, num_heads=3, num_classes=5)


def _model(cls=VisionTransformer, **kw):
    torch.manual_seed(0)
    return cls(**{**SMALL, **kw}).eval()


@pytest.mark.parametrize("case", ["cls", "distilled"])
def test_tome_matches_the_official_implementation(case):
    """Fixture: the official facebookresearch/ToMe patch run on the same weights and input (see the json)."""
    meta = json.loads((FIXTURE / "official_tome.json").read_text())["cases"][case]
    tensors = load_file(str(FIXTURE / "official_tome.safetensors"))
    cls = {"VisionTransformer": VisionTransformer, "VisionTransformerDistilled": VisionTransformerDistilled}[meta["class"]]
    model = cls(**meta["kwargs"]).eval()
    model.load_state_dict({k[len(case) + 1:]: v for k, v in tensors.items() if k.startswith(case + ".") and "__" not in k})
    vitlab.apply_(model, ToMe(r=meta["r"], trace_source=True))   # fused attention (SDPA + bias) stays on
    with torch.no_grad():
        logits = model(tensors[f"{case}.__input__"])
    torch.testing.assert_close(logits, tensors[f"{case}.__logits__"], atol=1e-5, rtol=1e-5)
    assert torch.equal(model.token_state.source, tensors[f"{case}.__source__"])
    assert torch.equal(model.token_state.size, tensors[f"{case}.__size__"])


@pytest.mark.parametrize("make", [
    lambda: _model(),
    lambda: _model(init_values=0.3),                                  # LayerScale (DeiT III)
    lambda: _model(VisionTransformerDistilled),                       # distillation token
    lambda: _model(reg_tokens=2),                                     # register tokens
    lambda: _model(class_token=False, global_pool="avg"),             # average-pool head
    lambda: vitlab.create_model("vl_vit_fmnist").eval(),
], ids=["vit", "layerscale", "distilled", "registers", "avgpool", "vl_vit_fmnist"])
@pytest.mark.parametrize("cfg", [ToMe(r=0), EViT(keep_rate=1.0), EViT(keep_rate=1.0, fuse=False)],
                         ids=["tome-r0", "evit-1.0", "evit-1.0-nofuse"])
def test_no_op_settings_equal_the_untouched_model(make, cfg):
    model = make()
    c, h, w = (1, 28, 28) if isinstance(model.patch_embed.img_size, tuple) and model.patch_embed.img_size[0] == 28 \
        else (3, 64, 64)
    x = torch.randn(2, c, h, w)
    with torch.no_grad():
        expected = model(x)
        vitlab.apply_(model, cfg)
        torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("cfg", [ToMe(r=3), ToMe(r=6, prop_attn=False), EViT(keep_rate=0.7), EViT(keep_rate=0.5, fuse=False)])
@pytest.mark.parametrize("kw", [{}, {"init_values": 0.3}, {"reg_tokens": 2}, {"class_token": False, "global_pool": "avg"}],
                         ids=["vit", "layerscale", "registers", "avgpool"])
def test_token_counts_follow_the_schedule_and_tensors_shrink(cfg, kw):
    model = _model(**kw)
    vitlab.apply_(model, cfg)
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    assert model.token_state.counts == token_schedule(model, cfg)
    assert model.token_state.counts[-1] < 64 + model.num_prefix_tokens


def test_a_schedule_that_removes_too_many_tokens_is_an_error():
    with pytest.raises(TechniqueError, match=r"tome:r=20 would merge more tokens than exist.*use r <= 12 for this model"):
        vitlab.apply_(_model(), ToMe(r=20))
    with pytest.raises(TechniqueError, match="already has a token-reduction"):
        vitlab.apply_(vitlab.apply_(_model(), ToMe(r=1)), EViT())


@pytest.mark.parametrize("cfg,depth,expected", [
    # expected values printed by the official facebookresearch/ToMe `tome.utils.parse_r(depth, r)` (commit in
    # tests/fixtures/tokens/official_tome.json), with r as (r, inflect) or a list
    (ToMe(r=16, inflect=-0.5), 12, [24, 22, 21, 19, 18, 16, 15, 13, 12, 10, 9, 8]),
    (ToMe(r=16, inflect=-1), 12, [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0]),
    (ToMe(r=13, inflect=0.3), 12, [9, 9, 10, 11, 11, 12, 13, 14, 14, 15, 16, 17]),
    (ToMe(r=39, inflect=-0.5), 4, [58, 45, 32, 20]),
    (ToMe(r=(5, 4)), 4, [5, 4, 0, 0]),
    (ToMe(r=7), 3, [7, 7, 7]),
])
def test_tome_per_block_schedule_follows_the_official_parse_r(cfg, depth, expected):
    assert cfg.per_block(depth) == expected


def test_tome_per_block_schedule_sets_the_counts_and_last_block_merges_leave_the_logits():
    """With a class-token head, merging after the last block's attention only saves MLP work on merged tokens."""
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        early = vitlab.apply_(_model(), parse_apply(["tome:r=20/6/3"])[0])
        early_cfg = ToMe(r=(20, 6, 3))
        assert token_schedule(early, early_cfg) == [45, 39, 36, 36]
        logits = early(x)
        assert early.token_state.counts == [45, 39, 36, 36]
        last = vitlab.apply_(_model(), ToMe(r=(20, 6, 3, 17)))
        torch.testing.assert_close(last(x), logits)
        assert last.token_state.counts == [45, 39, 36, 19]
        assert early_cfg.per_block(4) == [20, 6, 3, 0]
        # an average-pool head reads every token: there the last block's merge changes the output
        avg = dict(class_token=False, global_pool="avg")
        a = vitlab.apply_(_model(**avg), ToMe(r=(20, 6, 3)))(x)
        b = vitlab.apply_(_model(**avg), ToMe(r=(20, 6, 3, 17)))(x)
        assert not torch.allclose(a, b)


def test_tome_schedule_errors_name_the_block_and_the_fix(tmp_path):
    with pytest.raises(TechniqueError, match=r"tome:r=20/20/20 would merge more tokens than exist: block 2 has 25 "
                                             r"tokens \(1 prefix\), so at most 12 can merge there, not 20; lower r "
                                             r"from block 2 on"):
        vitlab.apply_(_model(), ToMe(r=(20, 20, 20)))
    with pytest.raises(TechniqueError, match=r"tome:r=1/1/1/1/1 lists 5 blocks but the model has 4"):
        vitlab.apply_(_model(), ToMe(r=(1, 1, 1, 1, 1)))
    with pytest.raises(ValueError, match="inflect spreads one r"):
        ToMe(r=(3, 2), inflect=-0.5)
    with pytest.raises(ValueError, match=r"inflect must be in \[-1, 1\]"):
        ToMe(r=3, inflect=2)
    # a per-block schedule survives a checkpoint round trip (stored as a JSON list)
    model = vitlab.apply_(vitlab.create_model("vl_test_vit"), parse_apply(["tome:r=6/2"]))
    vitlab.save_checkpoint(model, tmp_path / "ck")
    again = vitlab.create_model(tmp_path / "ck")
    assert again.token_state is not None and again.blocks[0].reduction.r == 6 and again.blocks[1].reduction.r == 2


def test_unsupported_models_are_named():
    with pytest.raises(vitlab.TechniqueNotApplicable, match="tome:r=1 does not apply to ResNet: not a plain ViT"):
        vitlab.apply_(timm.create_model("resnet18"), ToMe(r=1))


def test_flops_fall_as_r_grows():
    x = torch.randn(1, 3, 64, 64)
    macs = []
    for r in (0, 2, 4, 7):
        model = vitlab.apply_(_model(), ToMe(r=r))
        macs.append(count_flops(model, x).macs)
    assert all(a > b for a, b in zip(macs, macs[1:])) and macs[-1] < 0.8 * macs[0]


def test_evit_matches_a_direct_computation():
    """EViT's rule written out on the full attention map (as the official code computes it), one block."""
    model = _model(depth=1)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        blk = model.blocks[0]
        h = blk.norm1(tokens)
        B, N, C = h.shape
        qkv = blk.attn.qkv(h).reshape(B, N, 3, 3, C // 3).permute(2, 0, 3, 1, 4)
        attn = ((qkv[0] @ qkv[1].transpose(-2, -1)) * blk.attn.scale).softmax(-1)
        y = tokens + blk.attn.proj((attn @ qkv[2]).transpose(1, 2).reshape(B, N, C))
        cls_attn = attn[:, :, 0, 1:].mean(1)                                  # (B, N-1)
        keep = 45                                                             # ceil(0.7 * 64)
        idx = cls_attn.topk(keep, dim=1).indices
        rest = y[:, 1:]
        kept = rest.gather(1, idx[..., None].expand(-1, -1, C))
        mask = torch.ones_like(cls_attn, dtype=torch.bool).scatter_(1, idx, False)
        fused = (rest * (cls_attn * mask)[..., None]).sum(1, keepdim=True)
        y = torch.cat([y[:, :1], kept, fused], dim=1)
        y = y + blk.mlp(blk.norm2(y))
        expected = model.forward_head(model.norm(y))
        vitlab.apply_(model, EViT(keep_rate=0.7, locations=(0.0,)))
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_sources_cover_every_patch_once():
    for cfg in (ToMe(r=5, trace_source=True), EViT(keep_rate=0.6, trace_source=True)):
        model = vitlab.apply_(_model(), cfg)
        model(torch.randn(2, 3, 64, 64))
        source = model.token_state.source                                     # (B, N, 65)
        assert torch.equal(source.sum(1), torch.ones(2, 65))                 # each input token in exactly one token
        assert torch.equal(source[:, 0], torch.eye(65)[0].expand(2, 65))     # the class token stands for itself


def test_cli_apply_lowers_the_measured_flops(capsys):
    from vitlab.cli import main

    rows = []
    for apply in ([], ["--apply", "tome:r=4"], ["--apply", "evit:keep_rate=0.5"]):
        assert main(["bench", "vl_vit_fmnist", "--batch", "2", "--no-memory", "--min-time", "0.05", "--json", *apply]) == 0
        rows.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert rows[0]["techniques"] == "none" and rows[1]["techniques"] == "tome:r=4"
    assert rows[1]["macs"] < rows[0]["macs"] and rows[2]["macs"] < rows[0]["macs"]


def test_checkpoint_reapplies_the_token_technique(tmp_path):
    model = vitlab.apply_(vitlab.create_model("vl_test_vit"), parse_apply(["tome:r=2"]))
    vitlab.save_checkpoint(model, tmp_path / "ck")
    again = vitlab.create_model(tmp_path / "ck")
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(again.eval()(x), model.eval()(x))
    assert again.token_state.counts == token_schedule(again, ToMe(r=2))


def test_explain_draws_token_sources(tmp_path, capsys):
    from PIL import Image

    from vitlab.cli import main
    from vitlab.explain import token_source_map

    model = vitlab.apply_(vitlab.create_model("vl_vit_fmnist"), EViT(keep_rate=0.5, fuse=False))
    labels = token_source_map(model, torch.randn(1, 28, 28))
    assert labels.shape == (7, 7) and (labels == -1).any() and len(labels.unique()) > 3
    model = vitlab.apply_(vitlab.create_model("vl_vit_fmnist"), ToMe(r=8))
    labels = token_source_map(model, torch.randn(1, 28, 28))
    assert (labels >= 0).all() and len(labels.unique()) == token_schedule(model, ToMe(r=8))[-1] - 1
    image = tmp_path / "img.png"
    Image.fromarray((torch.rand(28, 28) * 255).to(torch.uint8).numpy()).save(image)
    out = tmp_path / "tokens.png"
    assert main(["explain", "vl_test_vit", "--image", str(image), "--tokens", "--apply", "tome:r=2",
                 "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert main(["explain", "vl_test_vit", "--image", str(image), "--tokens", "--out", str(out)]) == 2
    assert "needs a model with a token-reduction technique" in capsys.readouterr().err


@pytest.mark.slow   # compiling takes 20 s - 3 min per method on the shared 2-core CPU
@pytest.mark.parametrize("cfg", [ToMe(r=4), ToMe(r=4, trace_source=True), EViT(keep_rate=0.7), ATS(keep_rate=0.7),
                                 MCTF(r=4)], ids=["tome", "tome-trace", "evit", "ats", "mctf"])
def test_every_method_works_under_torch_compile_and_equals_eager(cfg):
    """ToMe, EViT and MCTF have fixed schedules and compile to fixed shapes; ATS compiles with graph breaks where
    its data-dependent counts size the padded batch (`int(k.max())`), by design. Two inputs: the second call reuses
    (or recompiles) the graph and must still equal eager."""
    model = vitlab.apply_(_model(), cfg)
    compiled = torch.compile(model)
    with torch.no_grad():
        for seed in (0, 1):
            x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
            torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4)
