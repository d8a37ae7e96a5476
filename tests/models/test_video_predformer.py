"""PredFormer against the official code (tests/fixtures/predformer_official.*, written by
tests/fixtures/predformer_make_fixture.py from yyyujintang/PredFormer b73c7ae8): every layout's output with the same
weights, the MMNIST parameter count; the axes each unit mixes; the ConvLSTM cell against Shi et al.'s equations;
registry, contract and the techniques the tiny model takes."""
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vitlab
from vitlab.contract import describe
from vitlab.models.convlstm import ConvLSTM, ConvLSTMCell
from vitlab.models.predformer import LAYOUTS, PredFormer, sinusoidal_embedding

FIXTURES = Path(__file__).parents[1] / "fixtures"
META = json.loads((FIXTURES / "predformer_official.json").read_text())
# official unit attribute names, in the order each layout's PredFormerLayer (or model) runs them
UNITS = {"full": ["space_temporal_transformer"], "fac_st": ["space_transformer", "temporal_transformer"],
         "fac_ts": ["temporal_transformer", "space_transformer"],
         "binary_st": ["st_space_transformer", "st_temporal_transformer"],
         "binary_ts": ["ts_temporal_transformer", "ts_space_transformer"],
         "tst": ["temporal_transformer_first", "space_transformer", "temporal_transformer_second"],
         "sts": ["space_transformer_first", "temporal_transformer", "space_transformer_second"],
         "tsst": ["ts_temporal_transformer", "ts_space_transformer", "st_space_transformer", "st_temporal_transformer"],
         "stts": ["st_space_transformer", "st_temporal_transformer", "ts_temporal_transformer", "ts_space_transformer"]}
INNER = [(r"layers\.(\d+)\.0\.norm\.", r"blocks.\1.norm1."),
         (r"layers\.(\d+)\.0\.fn\.to_qkv\.", r"blocks.\1.attn.qkv."),
         (r"layers\.(\d+)\.0\.fn\.to_out\.0\.", r"blocks.\1.attn.proj."),
         (r"layers\.(\d+)\.1\.norm\.", r"blocks.\1.norm2."), (r"layers\.(\d+)\.1\.fn\.", r"blocks.\1.mlp.")]


def _our_name(official: str, layout: str) -> str:
    """Our parameter name for an official one (see the UNITS order and the INNER renames)."""
    fixed = {"to_patch_embedding.1.": "patch_embed.", "mlp_head.0.": "head_norm.", "mlp_head.1.": "head."}
    for old, new in fixed.items():
        if official.startswith(old):
            return new + official[len(old):]
    names = UNITS[layout]
    group = re.match(r"blocks\.(\d+)\.", official)
    i, rest = (int(group[1]), official[group.end():]) if group else (0, official)
    unit = next(n for n in sorted(names, key=len, reverse=True) if rest.startswith(n + "."))
    rest = rest[len(unit) + 1:]
    for pattern, repl in INNER:
        if re.match(pattern, rest):
            rest = re.sub(pattern, repl, rest)
            break
    return f"units.{i * len(names) + names.index(unit)}.{rest}"


def _tiny(layout: str) -> PredFormer:
    t = META["tiny"]
    return PredFormer(img_size=(t["height"], t["width"]), num_frames=t["pre_seq"], patch_size=t["patch_size"],
                      in_chans=t["num_channels"], embed_dim=t["dim"], num_heads=t["heads"], head_dim=t["dim_head"],
                      mlp_ratio=t["scale_dim"], layout=layout, depth=t["Ndepth"]).eval()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_matches_official_predformer(layout):
    fixture = load_file(FIXTURES / "predformer_official.safetensors")
    model = _tiny(layout)
    ours = dict(model.named_parameters())
    official = META["params"][layout]
    assert len(official) == len(ours)
    with torch.no_grad():
        for k, (name, shape) in enumerate(official):  # the fixture's weights: 0.3 * randn from seed k
            ours[_our_name(name, layout)].copy_(0.3 * torch.randn(shape, generator=torch.Generator().manual_seed(k)))
        clip = fixture["input"].transpose(1, 2)  # official (B, T, C, H, W) -> ours (B, C, T, H, W)
        got = model(clip)
        if layout == "fac_st":
            # the official FacST hands its temporal unit's (B*N, T, D) output to the head without folding it back,
            # so its frames are tokens in (N, T) order read as (T, N): ours, scrambled the same way, must match
            tokens = model.head(model.head_norm(model.forward_features(clip)))  # (B, T, N, C*p*p)
            got = model.unpatchify(tokens.transpose(1, 2).reshape(tokens.shape))
    torch.testing.assert_close(got.transpose(1, 2), fixture[f"output.{layout}"], rtol=1e-4, atol=1e-4)


def test_mmnist_parameter_count_equals_official():
    with torch.device("meta"):
        model = vitlab.create_model("vl_predformer_mmnist")
        assert sum(p.numel() for p in model.parameters()) == META["mmnist_params"]["tsst"] == 25_297_728
        for layout in ("full", "fac_ts", "binary_st", "sts"):  # the official ones with Ndepth 6 too
            other = vitlab.create_model("vl_predformer_mmnist", layout=layout)
            assert sum(p.numel() for p in other.parameters()) == META["mmnist_params"][layout], layout


def test_sinusoidal_embedding_formula():
    pe = sinusoidal_embedding(5, 6)
    p, i = 3, 4  # even i: sin(p / 10000^(i/6)); odd i + 1 shares the frequency: cos
    assert torch.isclose(pe[p, i], torch.tensor(p / 10000 ** (4 / 6)).sin())
    assert torch.isclose(pe[p, i + 1], torch.tensor(p / 10000 ** (4 / 6)).cos())


@pytest.mark.parametrize("axis", ["s", "t", "st"])
def test_units_mix_only_their_axis(axis):
    """A spatial unit leaves the other frames untouched when one frame's token changes; a temporal unit leaves
    the other patch positions untouched; a full unit changes every token."""
    from vitlab.models.predformer import GatedTransformer

    torch.manual_seed(0)
    unit = GatedTransformer(axis, dim=16, depth=2, num_heads=2, head_dim=8, mlp_ratio=2.0).eval()
    with torch.no_grad():
        for p in unit.parameters():
            p.normal_(0.0, 0.3)
    x = torch.randn(2, 3, 5, 16)  # (B, T, N, D)
    y = x.clone()
    y[:, 1, 2] += torch.randn(16)  # frame 1, patch 2 (not a constant shift, which the LayerNorms would remove)
    with torch.no_grad():
        changed = (unit(x) - unit(y)).abs().amax(dim=(0, 3)) > 1e-6  # (T, N)
    expected = torch.zeros(3, 5, dtype=torch.bool)
    if axis == "s":
        expected[1] = True
    elif axis == "t":
        expected[:, 2] = True
    else:
        expected[:] = True
    assert torch.equal(changed, expected)


def test_registry_shapes_and_classifier_head():
    model = vitlab.create_model("vl_test_predformer").eval()
    assert model.num_frames == 4 and model.num_classes == 0
    clip = torch.randn(3, 1, 4, 32, 32)
    with torch.no_grad():
        assert model(clip).shape == clip.shape
        assert model.forward_features(clip).shape == (3, 4, 16, 32)
        model.reset_classifier(6)
        assert model(clip).shape == (3, 6)
    with pytest.raises(ValueError, match="num_frames"):
        model(torch.randn(1, 1, 5, 32, 32))
    assert [u.axis for u in model.units] == ["t", "s", "s", "t"]


def test_contract_refuses_token_reduction_by_name():
    """Units reshape tokens back to the (T, N) grid: the contract says so, and token reduction refuses."""
    from vitlab.techniques import TechniqueNotApplicable, apply_, parse_apply

    model = vitlab.create_model("vl_test_predformer")
    spec = describe(model)
    assert len(spec.blocks) == 4 and not any(b.token_reducible for b in spec.blocks)
    assert spec.blocks[0].mixer.kind == "attention" and spec.blocks[0].mixer.num_heads == 2
    assert spec.stem == ("patch_embed",) and spec.head == ("head",) and spec.num_prefix_tokens == 0
    seen = {}

    def record(name: str):
        def hook(module, args) -> None:
            seen.setdefault(name, tuple(args[0].shape))
        return hook
    hooks = [b.module.register_forward_pre_hook(record(b.name)) for b in spec.blocks]
    with torch.no_grad():
        model(torch.randn(2, 1, 4, 32, 32))
    for h in hooks:
        h.remove()
    # TSST: temporal units see (B*N, T, D) sequences, spatial ones (B*T, N, D)
    assert [seen[b.name] for b in spec.blocks] == [(32, 4, 32), (8, 16, 32), (8, 16, 32), (32, 4, 32)]
    with pytest.raises(TechniqueNotApplicable, match="supports"):
        apply_(model, parse_apply(["tome:r=2"]))


def test_pruning_works_on_the_predictor():
    """Structured pruning (heads, SwiGLU channels) keeps a frame predictor's output shape and removes MACs (PTQ on
    a prediction checkpoint: tests/engine/test_video_predict_engine.py)."""
    from vitlab.profiling import count_flops
    from vitlab.techniques import apply_, parse_apply

    clip = torch.randn(2, 1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = vitlab.create_model("vl_test_predformer").eval()
    base = count_flops(model, clip).macs
    result = apply_(model, parse_apply(["prune:target_flops=0.8,importance=l1"]))
    with torch.no_grad():
        out = result(clip)
    assert out.shape == clip.shape and torch.isfinite(out).all()
    assert count_flops(result, clip).macs < base


def test_convlstm_cell_is_shi_et_al():
    """Shi et al. (2015) eq. 3 without peepholes, as OpenSTL's ConvLSTMCell: gates from conv(x) + conv(h)."""
    torch.manual_seed(0)
    cell = ConvLSTMCell(3, 4, kernel_size=3)
    x, h, c = torch.randn(2, 3, 5, 5), torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    conv = torch.nn.functional.conv2d
    gx = conv(x, cell.conv_x.weight, padding=1)
    gh = conv(h, cell.conv_h.weight, padding=1)
    i, f, g, o = (gx + gh).chunk(4, dim=1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_new = torch.sigmoid(o) * torch.tanh(c_new)
    got_h, got_c = cell(x, h, c)
    torch.testing.assert_close(got_c, c_new)
    torch.testing.assert_close(got_h, h_new)


def test_convlstm_predicts_closed_loop():
    """Future frames depend on the inputs only through the recurrence: feeding its own predictions back."""
    model = vitlab.create_model("vl_test_convlstm").eval()
    assert isinstance(model, ConvLSTM)
    clip = torch.randn(2, 1, 4, 32, 32)
    with torch.no_grad():
        out = model(clip)
        assert out.shape == clip.shape
        changed = clip.clone()
        changed[:, :, -1] += 1.0
        assert not torch.allclose(model(changed), out)  # the last input frame matters
