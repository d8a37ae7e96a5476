"""Conv-stem and embedding-channel pruning: exactness, widths, cost formulas, reloading in a fresh process."""
import json
import subprocess
import sys

import pytest
import torch

import vitlab
from vitlab.prune import Prune, PruneError, model_macs, plan, prune_, stem_time_weights
from vitlab.prune.importance import unit_scores
from vitlab.prune.structure import (Unit, keep_channels, keep_indices, model_widths, prune_model_, units,
                                    variable_macs, variable_params)


def _calib(n_batches=2, batch=8, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 1, size, size, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(n_batches)]


def _tiny(depth=2, **kw):
    torch.manual_seed(0)
    kw = {"stem_widths": (16, 24), "stem_groups": (4, 4), "num_heads": 4, "embed_dim": 32, **kw}
    return vitlab.create_model("vl_test_vit", num_classes=10, depth=depth, **kw).eval()


def _x(n=3, seed=1):
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def _params(model):
    return sum(p.numel() for p in model.parameters())


def test_ratio_zero_is_identity_with_stem_and_embed():
    x = _x()
    for importance in ("l1", "hessian"):
        model = _tiny()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        out = model(x)
        prune_(model, Prune(target_flops=1.0, importance=importance, stem=True, embed=True, blocks=True),
               calib=_calib())
        assert model.vitlab.prune["removed"] == 0
        assert model.state_dict().keys() == before.keys()
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert torch.equal(model(x), out)


def test_removing_stem_groups_equals_zeroing_their_groupnorm():
    """Whole GroupNorm groups go, so the kept groups' statistics are unchanged: removal == GN weight and bias zeroed."""
    model = _tiny()
    x = _x()
    w = model_widths(model)
    assert w.stem == (16, 24) and w.stem_groups == (4, 4)
    removed = [Unit("stem", 0, 1, (4, 5, 6, 7)), Unit("stem", 1, 0, tuple(range(6))), Unit("stem", 1, 3, tuple(range(18, 24)))]
    masked = _tiny()
    with torch.no_grad():
        for u in removed:
            norm = masked.patch_embed.backbone[3 * u.block + 1]
            norm.weight[list(u.channels)] = 0
            norm.bias[list(u.channels)] = 0
    expected = masked(x)
    stem, embed = keep_channels(w, removed)
    assert embed is None and [len(k) for k in stem] == [12, 12]
    prune_model_(model, *keep_indices(w, removed), stem=stem)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    backbone = model.patch_embed.backbone
    assert [backbone[i].out_channels for i in (0, 3)] == [12, 12]
    assert [backbone[i].num_groups for i in (1, 4)] == [3, 2]  # 4 channels and 6 channels per group, as before
    kwargs = model.vitlab.arch["base_kwargs"]
    assert kwargs["stem_widths"] == [12, 12] and kwargs["stem_groups"] == [3, 2]


def test_stem_units_are_whole_groups_and_widths_respect_them():
    model = _tiny()
    w = model_widths(model)
    stem_units = [u for u in units(w, stem=True) if u.kind == "stem"]
    assert len(stem_units) == 8 and {len(u.channels) for u in stem_units if u.block == 0} == {4}
    prune_(model, Prune(target_flops=0.6, importance="taylor", stem=True, stem_weight=(20.0, 1.0)), calib=_calib())
    kw = model.vitlab.arch["base_kwargs"]
    assert kw["stem_widths"] != [16, 24], "the stem weight of 20 should make layer 0's groups go"
    assert [c // g for c, g in zip(kw["stem_widths"], kw["stem_groups"])] == [4, 6]
    assert model.vitlab.prune["stem_widths"] == kw["stem_widths"]
    assert model_macs(model) <= 0.6 * model_macs(_tiny())


def test_cost_formulas_match_counters_with_stem_and_embed():
    """variable_macs / variable_params + the constant rest == count_flops / sum(numel), before and after pruning."""
    model = _tiny(depth=3)
    w = model_widths(model)
    fixed_macs, fixed_params = model_macs(model) - variable_macs(w), _params(model) - variable_params(w)
    full = model_macs(model)
    prune_(model, Prune(target_flops=0.45, importance="l2", heads=False, stem=True, embed=True,
                        stem_weight=(20.0, 20.0)))
    w2 = model_widths(model)
    assert w2.dim < 32 and w2.stem != w.stem
    assert model_macs(model) == fixed_macs + variable_macs(w2)
    assert _params(model) == fixed_params + variable_params(w2)
    assert model_macs(model) <= 0.45 * full


def test_embed_pruning_slices_every_consumer_and_fused_equals_manual():
    model = _tiny()
    prune_(model, Prune(target_flops=0.7, importance="l1", embed=True, heads=False, mlp=False, embed_group=8))
    dim = model.embed_dim
    assert dim in (8, 16, 24) and model.vitlab.arch["base_kwargs"]["embed_dim"] == dim
    assert model.pos_embed.shape[-1] == dim and model.cls_token.shape[-1] == dim
    assert model.patch_embed.proj.out_channels == dim and model.head.in_features == dim
    for blk in model.blocks:
        assert blk.norm1.normalized_shape == (dim,) and blk.attn.qkv.in_features == dim
        assert blk.attn.proj.out_features == dim and blk.mlp.fc1.in_features == dim and blk.mlp.fc2.out_features == dim
        assert blk.attn.num_heads == 4 and blk.attn.head_dim == 8  # heads keep their width; only the residual shrinks
    x = _x(4)
    fused = model(x)
    for blk in model.blocks:
        blk.attn.fused_attn = False
    torch.testing.assert_close(fused, model(x), atol=1e-5, rtol=1e-5)


def test_stem_and_embed_pruned_model_rebuilds_in_fresh_process(tmp_path):
    """Rebuilt from config.json alone in a new process: same outputs, parameter count from the analytic formula."""
    model = _tiny(depth=3)
    w0 = model_widths(model)
    fixed_params = _params(model) - variable_params(w0)
    prune_(model, Prune(target_flops=0.5, importance="hessian", blocks=True, stem=True, embed=True,
                        stem_weight=(5.0, 1.0)), calib=_calib())
    w = model_widths(model)
    assert w.dim < 32 or w.stem != w0.stem
    vitlab.save_checkpoint(model, tmp_path / "ck")
    x = _x(2)
    torch.save(x, tmp_path / "x.pt")
    expected = model(x)
    code = (
        "import json, torch, vitlab\n"
        f"m = vitlab.create_model({str(tmp_path / 'ck')!r}).eval()\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)\n"
        "print(json.dumps({'out': m(x).tolist(), 'params': sum(p.numel() for p in m.parameters()),"
        " 'dim': m.embed_dim, 'stem': [c.out_channels for c in m.patch_embed.backbone if hasattr(c, 'out_channels')]}))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    got = json.loads(res.stdout.strip().splitlines()[-1])
    torch.testing.assert_close(torch.tensor(got["out"]), expected.detach(), atol=1e-5, rtol=1e-5)
    assert got["dim"] == w.dim and tuple(got["stem"]) == w.stem
    assert got["params"] == fixed_params + variable_params(w)


def test_stem_ablation_score_is_the_loss_change_of_removal():
    model = _tiny()
    calib = _calib()
    w = model_widths(model)
    u = Unit("stem", 1, 2, tuple(range(12, 18)))
    score = unit_scores(model, [u], w, "ablation", calib)[0].item()
    base = sum(torch.nn.functional.cross_entropy(model(x), y, reduction="sum").item() for x, y in calib) / 16
    stem, _ = keep_channels(w, [u])
    prune_model_(model, *keep_indices(w, [u]), stem=stem)
    after = sum(torch.nn.functional.cross_entropy(model(x), y, reduction="sum").item() for x, y in calib) / 16
    assert score == pytest.approx(after - base, abs=1e-5)


def test_stem_refusals_name_the_fix():
    plain = vitlab.create_model("vl_pruned_vit", base="vit_tiny_patch16_224",
                                base_kwargs=dict(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=32,
                                                 depth=2, num_heads=2))
    with pytest.raises(PruneError, match="no conv stem"):
        plan(plain, Prune(importance="l1", stem=True))
    with pytest.raises(ValueError, match="stem_weight"):
        Prune(stem=True, stem_weight=0.0)
    with pytest.raises(PruneError, match="one\\s+per layer"):
        plan(_tiny(), Prune(importance="l1", stem=True, stem_weight=(2.0, 1.0, 1.0)))
    with pytest.raises(ValueError, match="stem groups"):
        vitlab.create_model("vl_test_vit", stem_widths=(12, 16), stem_groups=(8, 8))


def test_stem_time_weights_are_positive_per_layer():
    weights = stem_time_weights(_tiny(), batch=2, rounds=1)
    assert len(weights) == 2 and all(v > 0 for v in weights)


def test_cli_prune_stem_and_embed(tmp_path):
    from vitlab.cli import main

    src = tmp_path / "src"
    vitlab.save_checkpoint(_tiny(), src)
    assert main(["prune", str(src), "--target-flops", "0.6", "--importance", "l1", "--stem", "--stem-weight", "20,1",
                 "--embed", "--out", str(tmp_path / "out")]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    kw = config["model"]["kwargs"]["base_kwargs"]
    rebuilt = vitlab.create_model(tmp_path / "out")
    assert rebuilt.embed_dim == kw["embed_dim"]
    assert [c.out_channels for c in rebuilt.patch_embed.backbone if hasattr(c, "out_channels")] == kw["stem_widths"]
    assert main(["prune", str(src), "--stem-weight", "x", "--importance", "l1", "--out", str(tmp_path / "o2")]) != 0


def test_sliced_consumers_match_torch_pruning_dependency_graph():
    """torch-pruning's DependencyGraph (traced) finds the same layers coupled to an embedding channel and to a stem
    channel as the slices vitlab prunes; it is the oracle here, the slicing itself is vitlab's (whole-group aware)."""
    import torch_pruning as tp  # the test extra pins it (pyproject.toml)

    from vitlab.prune.importance import model_unit_slices

    model = _tiny()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, 1, 16, 16),
                                                  unwrapped_parameters=[(model.pos_embed, 2), (model.cls_token, 2)])
    names = {id(m): n for n, m in model.named_modules()} | {id(p): n for n, p in model.named_parameters()}
    w = model_widths(model)
    for layer, unit in ((model.patch_embed.proj, Unit("embed", 0, 0, (0, 1, 2))),
                        (model.patch_embed.backbone[0], Unit("stem", 0, 0, (0, 1, 2, 3)))):
        group = graph.get_pruning_group(layer, tp.prune_conv_out_channels, idxs=list(unit.channels))
        theirs = {names[id(dep.target.module)] for dep, _ in group if id(dep.target.module) in names}
        param_names = {id(p): n for n, p in model.named_parameters()}
        ours = {param_names[id(p)].rsplit(".", 1)[0] if param_names[id(p)].endswith((".weight", ".bias"))
                else param_names[id(p)] for p, _ in model_unit_slices(model, unit, w)}
        assert theirs == ours, (unit.kind, sorted(theirs ^ ours))
