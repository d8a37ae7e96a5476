"""Structured pruning: geometry, reloading in a fresh process, cost formulas, criteria (Hessian vs explicit Fisher)."""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab.prune import Prune, model_macs, plan, prune_
from vitlab.prune.importance import unit_scores
from vitlab.prune.structure import block_macs, block_params, keep_indices, model_widths, prune_model_, units


def _calib(n_batches=2, batch=8, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 1, size, size, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(n_batches)]


def _tiny(depth=2, **kw):
    torch.manual_seed(0)
    return vitlab.create_model("vl_test_vit", num_classes=10, depth=depth, **kw).eval()


def test_target_one_is_identity():
    """Ratio 0 (keep 100 % of the MACs) changes nothing, for every criterion."""
    x = torch.randn(3, 1, 16, 16)
    for importance in ("l1", "taylor", "hessian"):
        model = _tiny()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        out = model(x)
        prune_(model, Prune(target_flops=1.0, importance=importance), calib=_calib())
        assert model.vitlab.prune["removed"] == 0
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert torch.equal(model(x), out)


def test_pruned_geometry_and_fused_equals_manual():
    model = _tiny(depth=3, num_heads=4, embed_dim=32)
    prune_(model, Prune(target_flops=0.6, importance="l1", blocks=True))
    heads = model.vitlab.arch["num_heads"]
    assert heads != [4] * len(heads)
    for blk, h in zip(model.blocks, heads):
        attn = blk.attn
        assert attn.num_heads == h and attn.attn_dim == h * attn.head_dim
        assert attn.qkv.out_features == 3 * h * attn.head_dim and attn.proj.in_features == h * attn.head_dim
        assert attn.scale == attn.head_dim ** -0.5
    x = torch.randn(4, 1, 16, 16)
    fused = model(x)
    for blk in model.blocks:
        blk.attn.fused_attn = False
    manual = model(x)
    torch.testing.assert_close(fused, manual, atol=1e-5, rtol=1e-5)


def test_cost_formulas_match_counters():
    """The analytic MACs and parameter counts used for targets equal count_flops and sum(numel)."""
    model = _tiny(depth=3, num_heads=4, embed_dim=32)
    full_macs, full_params = model_macs(model), sum(p.numel() for p in model.parameters())
    w = model_widths(model)
    fixed_macs = full_macs - sum(w.macs(i) for i in range(3))
    fixed_params = full_params - sum(block_params(w.dim, h, d, m) for h, d, m in zip(w.num_heads, w.head_dim, w.mlp_hidden))
    prune_(model, Prune(target_flops=0.55, importance="l2", blocks=True))
    w2 = model_widths(model)
    assert model_macs(model) == fixed_macs + sum(block_macs(w2.tokens, w2.dim, h, d, m)
                                                 for h, d, m in zip(w2.num_heads, w2.head_dim, w2.mlp_hidden))
    assert sum(p.numel() for p in model.parameters()) == fixed_params + sum(
        block_params(w2.dim, h, d, m) for h, d, m in zip(w2.num_heads, w2.head_dim, w2.mlp_hidden))
    assert model_macs(model) <= 0.55 * full_macs


def test_params_target():
    model = _tiny(depth=2)
    total = sum(p.numel() for p in model.parameters())
    prune_(model, Prune(target_params=0.7, importance="l1"))
    assert sum(p.numel() for p in model.parameters()) <= 0.7 * total + 1


def test_unreachable_target_names_the_fix():
    with pytest.raises(ValueError, match="unprunable|blocks=true"):
        prune_(_tiny(), Prune(target_flops=0.05, importance="l1"))
    with pytest.raises(ValueError, match="target_flops"):
        Prune(target_flops=0)
    with pytest.raises(ValueError, match="calibration images"):
        prune_(_tiny(), Prune(importance="hessian"))


def test_rebuilt_in_fresh_process(tmp_path):
    """A pruned checkpoint rebuilds from config.json alone in a new process: same outputs, analytic params."""
    model = _tiny(depth=3, num_heads=4, embed_dim=32)
    prune_(model, Prune(target_flops=0.5, importance="taylor", blocks=True), calib=_calib())
    vitlab.save_checkpoint(model, tmp_path / "ck")
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    torch.save(x, tmp_path / "x.pt")
    expected = model(x)
    w = model_widths(model)
    code = (
        "import json, sys, torch, vitlab\n"
        f"m = vitlab.create_model({str(tmp_path / 'ck')!r})\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)\n"
        "print(json.dumps({'out': m(x).tolist(), 'params': sum(p.numel() for p in m.parameters()),"
        " 'heads': [b.attn.num_heads for b in m.blocks]}))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    got = json.loads(res.stdout.strip().splitlines()[-1])
    torch.testing.assert_close(torch.tensor(got["out"]), expected.detach(), atol=1e-5, rtol=1e-5)
    assert got["heads"] == list(w.num_heads)
    # analytic: everything outside the blocks (as in the unpruned model) + the blocks' formula at the new widths
    base = _tiny(depth=len(w.num_heads), num_heads=4, embed_dim=32)
    wb = model_widths(base)
    outside = sum(p.numel() for p in base.parameters()) - sum(
        block_params(wb.dim, h, d, m) for h, d, m in zip(wb.num_heads, wb.head_dim, wb.mlp_hidden))
    assert got["params"] == outside + sum(block_params(w.dim, h, d, m)
                                          for h, d, m in zip(w.num_heads, w.head_dim, w.mlp_hidden))


def test_hessian_saliency_equals_explicit_fisher_quadratic_form():
    """NViT saliency 1/2 w_S^T F w_S, F = mean_b g_b g_b^T, computed directly from flattened gradient vectors."""
    model = _tiny(depth=2)
    calib = _calib(n_batches=3)
    w = model_widths(model)
    us = [u for u in units(w, mlp_group=8) if u.block == 1][:4]  # two heads and two MLP groups
    scores = unit_scores(model, us, w, "hessian", calib)
    params = dict(model.named_parameters())
    for u, score in zip(us, scores):
        # the unit's parameters as a mask over the full flattened parameter vector
        masks = {n: torch.zeros_like(p) for n, p in params.items()}
        blk, hd, nh = "blocks.1.", w.head_dim[1], w.num_heads[1]
        if u.kind == "head":
            rows = [t * nh * hd + u.index * hd + d for t in range(3) for d in range(hd)]
            masks[blk + "attn.qkv.weight"][rows] = 1
            masks[blk + "attn.qkv.bias"][rows] = 1
            masks[blk + "attn.proj.weight"][:, u.index * hd:(u.index + 1) * hd] = 1
        else:
            ch = list(u.channels)
            masks[blk + "mlp.fc1.weight"][ch] = 1
            masks[blk + "mlp.fc1.bias"][ch] = 1
            masks[blk + "mlp.fc2.weight"][:, ch] = 1
        flat_mask = torch.cat([masks[n].flatten() for n in params]).bool()
        w_s = torch.cat([params[n].detach().flatten() for n in params]).double()[flat_mask]
        grads = []
        for x, y in calib:
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            grads.append(torch.cat([params[n].grad.flatten() for n in params]).double())
        G = torch.stack(grads)[:, flat_mask]         # (B, |S|): the unit's entries of the full gradient vectors
        fisher = G.T @ G / len(grads)                # (|S|, |S|) explicit empirical Fisher block of the unit
        direct = 0.5 * w_s @ fisher @ w_s
        torch.testing.assert_close(score, direct, rtol=1e-6, atol=1e-12)


def test_ablation_score_is_loss_change_of_removal():
    model = _tiny(depth=2)
    calib = _calib()
    w = model_widths(model)
    head = [u for u in units(w) if u.kind == "head" and u.block == 0][0]
    score = unit_scores(model, [head], w, "ablation", calib)[0]

    def loss(m):
        with torch.no_grad():
            return sum(F.cross_entropy(m(x), y, reduction="sum").item() for x, y in calib) / 16

    base = loss(model)
    keep = keep_indices(w, [head])
    prune_model_(model, *keep)
    assert model.blocks[0].attn.num_heads == w.num_heads[0] - 1
    assert abs((loss(model) - base) - score.item()) < 1e-5


def test_global_ranking_spans_layers():
    model = _tiny(depth=3, num_heads=4, embed_dim=32)
    removed, summary = plan(model, Prune(target_flops=0.6, importance="hessian"), calib=_calib())
    assert len({u.block for u in removed}) >= 2
    assert summary["after"] <= 0.6 * summary["before"]


def test_apply_stack_and_measure_calibration():
    from vitlab.bench.measure import needs_calibration

    assert needs_calibration(["prune:importance=hessian"]) and not needs_calibration(["prune:importance=l1"])
    model = vitlab.apply_(_tiny(), vitlab.parse_apply(["prune:target_flops=0.7,importance=taylor"]), calib=_calib())
    assert vitlab.format_technique(model.vitlab.techniques[0]).startswith("prune:")
    assert model_macs(model) <= 0.7 * model_macs(_tiny())


def test_bench_build_runner_calibrates_pruning(tmp_path):
    from vitlab.bench.measure import build_runner

    vitlab.save_checkpoint(_tiny(), tmp_path / "ck")
    runner = build_runner(str(tmp_path / "ck"), ["prune:target_flops=0.7,importance=hessian"],
                          calib_data="synthetic:n=16,classes=10", calib_images=16)
    assert runner.techniques[0].importance == "hessian"
    assert model_macs(runner.module) <= 0.7 * model_macs(_tiny())
    with pytest.raises(ValueError, match="calibrates on images"):
        build_runner(str(tmp_path / "ck"), ["prune:importance=taylor"])


def test_plain_timm_vit_base_prunes_and_reloads(tmp_path):
    """The builder is generic over the base: a plain timm ViT (patchify stem) prunes, saves and rebuilds too."""
    torch.manual_seed(0)
    model = vitlab.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                                num_classes=10, in_chans=1).eval()
    prune_(model, Prune(target_flops=0.6, importance="l2"))
    assert model.vitlab.arch["base"] == "vit_tiny_patch16_224" and model.vitlab.arch["base_kwargs"]["embed_dim"] == 64
    vitlab.save_checkpoint(model, tmp_path / "ck")
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(vitlab.create_model(tmp_path / "ck")(x), model(x))
