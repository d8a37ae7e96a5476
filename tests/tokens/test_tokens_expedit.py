"""Expedit (vitlab.tokens.expedit): the clustering and reconstruction layers against the official code on the same
tensors, no-op settings equal to the untouched model, fewer MACs with the right output shape on every supported
family, Swin's window surgery, refusals, and checkpoints / CLI that re-apply it."""
import importlib.util
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock, window_partition

import vitlab
from seed_models import SEED_MODELS, build, input_shape
from test_applicability import WORKS
from vitlab.cli import main
from vitlab.profiling import count_flops
from vitlab.techniques import TechniqueError, applied_techniques, format_technique, parse_technique
from vitlab.tokens import Expedit
from vitlab.tokens.expedit import (ClusteredWindowAttention, ExpeditBlockMixin, cluster_windows,
                                   reconstruct_windows, token_clustering, token_reconstruction)

FIXTURE = Path(__file__).parents[1] / "fixtures" / "expedit" / "official_expedit.py"

# name -> (constructor kwargs, input side): small members of every supported family
SWIN = dict(img_size=64, window_size=4, embed_dim=24, depths=(2, 2), num_heads=(1, 2), num_classes=10)
MODELS = {
    "swin_tiny_patch4_window7_224": (SWIN, 64),
    "swinv2_tiny_window8_256": (dict(img_size=64, window_size=4, embed_dim=24, depths=(2, 2), num_heads=(1, 2),
                                     num_classes=10), 64),
    "vl_test_cvt": ({}, 32),
    "vl_test_dinat": ({}, 64),
    "vl_test_hornet": ({}, 64),
    "pvt_v2_b0": (dict(embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8), depths=(1, 1, 1, 1),
                       num_classes=10), 64),
}


@pytest.fixture(scope="module")
def official():
    spec = importlib.util.spec_from_file_location("official_expedit", FIXTURE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.Variable = lambda t: types.SimpleNamespace(cuda=lambda: t)  # their `.cuda()`, kept on the CPU
    return module


def _model(name):
    kwargs, side = MODELS[name]
    torch.manual_seed(0)
    return vitlab.create_model(name, **kwargs).eval(), torch.randn(2, 3, side, side)


@pytest.mark.parametrize("size,grid,neighborhood", [((7, 7), (4, 4), 7), ((7, 7), (5, 5), 3), ((6, 8), (3, 4), 3)])
def test_clustering_matches_the_official_layer(official, size, grid, neighborhood):
    x = torch.randn(3, *size, 16, generator=torch.Generator().manual_seed(0))
    ref = official.TokenClusteringBlock(grid, n_iters=5, temperture=0.05, window_size=neighborhood)
    want, _ = ref(x.permute(0, 3, 1, 2))  # (B, h*w, C)
    got = token_clustering(x, grid, iters=5, temperature=0.05, neighborhood=neighborhood)
    torch.testing.assert_close(got.flatten(1, 2), want, atol=1e-5, rtol=1e-5)
    pooled = F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2), grid).flatten(2).transpose(1, 2)
    assert (got.flatten(1, 2) - pooled).abs().max() > 1e-3  # the iterations moved the centres


@pytest.mark.parametrize("k", [1, 10, 16])
def test_reconstruction_matches_the_official_layer(official, k):
    g = torch.Generator().manual_seed(1)
    tokens, centres, x = torch.randn(3, 49, 16, generator=g), torch.randn(3, 16, 16, generator=g), \
        torch.randn(3, 16, 16, generator=g)
    state = official.TokenReconstructionBlock(k=k, temperature=0.05).derive_unpooler()
    state.update_state(feat_before_pooling=tokens, feat_after_pooling=centres)
    want, _ = state.call(x)
    torch.testing.assert_close(token_reconstruction(x, tokens, centres, k, 0.05), want, atol=1e-5, rtol=1e-5)


def test_windowed_clustering_and_reconstruction_match_the_official_swin_path(official):
    """The official Swin layer pads to whole windows, clusters each window, and reconstructs window by window."""
    x = torch.randn(2, 10, 13, 8, generator=torch.Generator().manual_seed(2))  # pads to 14 x 14 with 7x7 windows
    y, saved = cluster_windows(x, (7, 7), (4, 4), iters=3, temperature=0.05, neighborhood=5)
    assert y.shape == (2, 8, 8, 8)
    processed = y * 1.5 + 0.25  # what the clustered blocks would do
    got = reconstruct_windows(processed, saved, k=6, temperature=0.05)

    windows = window_partition(F.pad(x, (0, 0, 0, 1, 0, 4)), (7, 7))  # (B*4, 7, 7, C)
    centres, _ = official.TokenClusteringBlock((4, 4), n_iters=3, temperture=0.05, window_size=5)(
        windows.permute(0, 3, 1, 2))
    state = official.TokenReconstructionBlock(k=6, temperature=0.05).derive_unpooler()
    state.update_state(feat_before_pooling=windows.flatten(1, 2), feat_after_pooling=centres)
    want, _ = state.call(window_partition(processed, (4, 4)).flatten(1, 2))  # (B*4, 49, C)
    want = want.view(2, 2, 2, 7, 7, 8).permute(0, 1, 3, 2, 4, 5).reshape(2, 14, 14, 8)[:, :10, :13]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cfg", [Expedit(ratio=1.0), Expedit(alpha=4), Expedit(alpha=0, size=(4,))])
def test_no_op_settings_equal_the_swin_model(cfg):
    model, x = _model("swin_tiny_patch4_window7_224")
    with torch.no_grad():
        want = model(x)
        got = vitlab.apply_(model, cfg)(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert applied_techniques(model) == (cfg,)


@pytest.mark.parametrize("name", [n for n in MODELS if not n.startswith("swin")])
def test_a_grid_equal_to_the_stage_grid_equals_the_model(name):
    model, x = _model(name)
    with torch.no_grad():
        want = model(x)
        got = vitlab.apply_(model, Expedit(alpha=0, ratio=1.0))(x)
    assert any(isinstance(m, ExpeditBlockMixin) for m in model.modules())  # the adapter ran, and changed nothing
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# the seed models whose blocks expedit can give a smaller grid (tests/test_applicability.py says which work)
GRID_MODELS = [n for n, works in WORKS.items() if "expedit" in works and n in SEED_MODELS]


FIRST_GRID_BLOCK = {"vl_test_svt": 1}   # its first stage's spectral filters are sized to the grid: refused there


@pytest.mark.parametrize("name", GRID_MODELS)
def test_every_grid_seed_model_is_unchanged_by_a_no_op_grid(name):
    torch.manual_seed(0)
    model = build(name)
    x = torch.randn(2, *input_shape(name, model), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
        got = vitlab.apply_(model, Expedit(alpha=FIRST_GRID_BLOCK.get(name, 0), ratio=1.0))(x)
    # the run is in place (windowed Swin models skip it: a window-sized cluster grid changes no block)
    assert name.startswith("swin") or any(isinstance(m, ExpeditBlockMixin) for m in model.modules())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_map_run_clusters_its_nchw_input_and_hands_back_the_full_map():
    torch.manual_seed(0)
    model = build("convnext_atto")
    vitlab.apply_(model, Expedit(alpha=2, ratio=0.5))   # stage 1 (8 x 8 at 64 px): both its blocks
    seen = []
    for block in model.stages[1].blocks:
        block.conv_dw.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape)))
    model.stages[2].register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape)))
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    assert seen == [(2, 32, 4, 4), (2, 32, 4, 4), (2, 32, 8, 8)]


def test_rmt_blocks_get_decay_masks_for_the_clustered_grid():
    torch.manual_seed(0)
    model = build("vl_test_rmt")
    stage = next(i for i, s in enumerate(model.stages) if len(s.blocks))
    vitlab.apply_(model, Expedit(alpha=0, ratio=0.5))
    masks = []
    model.stages[stage].blocks[0].attn.register_forward_pre_hook(lambda m, a: masks.append((a[0].shape, a[1][2])))
    with torch.no_grad():
        out = model(torch.randn(1, *input_shape("vl_test_rmt", model)))
    (shape, mask), = masks
    h, w = shape[1:3]
    want = model.stages[stage].rel_pos(h, w, out.device, out.dtype)[2]
    for got, exp in zip(mask if isinstance(mask, tuple) else (mask,), want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(got, exp)


@pytest.mark.parametrize("name", list(MODELS))
def test_fewer_macs_and_the_right_output_shape(name):
    model, x = _model(name)
    with torch.no_grad():
        want = model(x)
    before = count_flops(model, x[:1]).macs
    vitlab.apply_(model, Expedit(alpha=0.5, ratio=0.5, k=4))  # halfway: stage 1 of 2 (Swin) or 2 (the others)
    first = next(m for m in model.modules() if isinstance(m, ExpeditBlockMixin))
    run, stage_grid = first.expedit_run, []
    first.register_forward_pre_hook(   # the grid it is given: (B, H, W, C), or tokens and (H, W)
        lambda m, a: stage_grid.append(tuple(a[1]) if run.layout == "sequence" else tuple(a[0].shape[1:3])))
    with torch.no_grad():
        got = model(x)
    after = count_flops(model, x[:1]).macs
    assert got.shape == want.shape and torch.isfinite(got).all()
    assert run.hw[0] * run.hw[1] < stage_grid[0][0] * stage_grid[0][1]   # the run worked on fewer tokens
    assert after < 0.95 * before, (after, before)
    assert not torch.allclose(got, want, atol=1e-4)


def test_swin_blocks_get_the_cluster_grid_and_its_window():
    model, x = _model("swin_tiny_patch4_window7_224")
    vitlab.apply_(model, Expedit(alpha=1, size=(3,)))   # stage 0 (16 x 16, 4x4 windows), block 1 (shifted)
    block = model.layers[0].blocks[1]
    assert block.input_resolution == (12, 12) and block.window_size == (3, 3) and block.shift_size == (1, 1)
    assert isinstance(block.attn, ClusteredWindowAttention)
    fresh = SwinTransformerBlock(24, (12, 12), num_heads=1, window_size=3, shift_size=1)
    torch.testing.assert_close(block.attn_mask, fresh.attn_mask)
    assert block.attn._get_rel_pos_bias().shape == (1, 1, 9, 9)
    assert model.layers[0].blocks[0].window_size == (4, 4)  # before alpha: untouched
    grids = []
    for block in (model.layers[0].blocks[1], model.layers[1].blocks[0]):   # norm1 sees what attention works on
        block.norm1.register_forward_pre_hook(lambda m, a: grids.append(a[0].shape[1:3]))
    with torch.no_grad():
        model(x)
    assert grids == [(12, 12), (8, 8)]  # clustered inside stage 0, full grid again after patch merging
    assert {k: v.shape for k, v in model.state_dict().items()} == \
        {k: v.shape for k, v in _model("swin_tiny_patch4_window7_224")[0].state_dict().items()}


def test_the_resized_bias_table_at_the_trained_window_is_the_table():
    model, _ = _model("swin_tiny_patch4_window7_224")
    attn = model.layers[0].blocks[0].attn
    want = attn._get_rel_pos_bias()
    attn.table_window = attn.window_size
    attn.__class__ = ClusteredWindowAttention
    torch.testing.assert_close(attn._get_rel_pos_bias(), want)


def test_beta_ends_the_run_inside_its_stage():
    with pytest.raises(TechniqueError, match="beta"):
        vitlab.apply_(_model("swin_tiny_patch4_window7_224")[0], Expedit(alpha=0, beta=3))
    model, x = _model("swin_tiny_patch4_window7_224")
    vitlab.apply_(model, Expedit(alpha=2, beta=3, size=(2,)))   # stage 1 block 0 only
    grids = []
    for block in model.layers[1].blocks:
        block.norm1.register_forward_pre_hook(lambda m, a: grids.append(a[0].shape[1:3]))
    with torch.no_grad():
        model(x)
    assert grids == [(4, 4), (8, 8)]


def test_refusals_name_what_it_supports():
    for name in ("vl_test_t2t_vit", "tnt_s_patch16_224", "vl_test_sret"):   # sequences that are not told their grid
        with pytest.raises(vitlab.TechniqueNotApplicable, match="supports") as e:
            vitlab.apply_(build(name), Expedit(alpha=0))
        assert "without its H x W grid" in str(e.value)
    with pytest.raises(vitlab.TechniqueNotApplicable, match="spectral filter sized to the stage grid"):
        vitlab.apply_(build("vl_test_svt"), Expedit(alpha=0))   # its scattering stage; later stages work
    assert any(isinstance(m, ExpeditBlockMixin) for m in vitlab.apply_(build("vl_test_svt"), Expedit(alpha=1)).modules())
    dynamic = vitlab.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, dynamic_img_size=True)
    with pytest.raises(vitlab.TechniqueNotApplicable, match="supports"):
        vitlab.apply_(dynamic, Expedit(alpha=0))
    model, _ = _model("vl_test_cvt")
    vitlab.apply_(model, Expedit(alpha=0))
    with pytest.raises(TechniqueError, match="already"):
        vitlab.apply_(model, Expedit(alpha=0))
    for bad in ("expedit:alpha=2.5", "expedit:neighborhood=4", "expedit:ratio=0", "expedit:size=2/2/2"):
        with pytest.raises(TechniqueError):
            parse_technique(bad)


def test_the_apply_text_round_trips():
    cfg = parse_technique("expedit:alpha=4,beta=none,size=4/3,k=6")
    assert cfg == Expedit(alpha=4, size=(4, 3), k=6) and cfg.grid((7, 7)) == (4, 3)
    assert parse_technique(format_technique(cfg)) == cfg
    assert Expedit().grid((12, 12)) == (8, 8) and Expedit().grid((7, 7)) == (5, 5)


def test_a_checkpoint_reapplies_expedit_and_the_cli_evaluates_with_it(tmp_path, capsys):
    model, x = _model("swin_tiny_patch4_window7_224")
    cfg = Expedit(alpha=1, size=(3,), k=4)
    vitlab.apply_(model, cfg)
    vitlab.save_checkpoint(model, tmp_path / "ck")
    again = vitlab.create_model(tmp_path / "ck")
    assert applied_techniques(again) == (cfg,) and isinstance(again.layers[0].blocks[1], ExpeditBlockMixin)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))

    fmnist = dict(SWIN, img_size=28, in_chans=1, window_size=7)   # a 7 x 7 grid, one window
    vitlab.save_checkpoint(vitlab.create_model("swin_tiny_patch4_window7_224", **fmnist), tmp_path / "plain")
    assert main(["eval", str(tmp_path / "plain"), "--data", "fashion-mnist", "--split", "val", "--limit", "32",
                 "--json", "--apply", "expedit:alpha=1,size=3,k=4"]) == 0
    assert '"n": 32' in capsys.readouterr().out
