"""LPViT block-structured pruning (vitlab/prune/lpvit.py): identity at 0, whole aligned blocks, the target is met,
the second-order distortion equals its explicit Fisher form, the allocation favours cheap layers, save/reload."""
import json

import pytest
import torch

import vitlab
from vitlab.prune import LPViT, LPViTError
from vitlab.prune.lpvit import (allocate, block_mask, block_scores, derivative, distortion, distortion_curve,
                                layer_gradients, power_weight, prunable_linears)
from vitlab.techniques import TechniqueError, parse_technique

BLOCK = (8, 8)


def _calib(n_batches=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 1, 16, 16, generator=g) for _ in range(n_batches)]


def _zero_fraction(model):
    ws = [lin.weight for _, lin in prunable_linears(model)]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def test_sparsity_zero_is_identity(tiny_model):
    x = torch.randn(3, 1, 16, 16)
    tiny_model.eval()
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    ref = tiny_model(x)
    vitlab.apply_(tiny_model, LPViT(sparsity=0.0, block=BLOCK))      # needs no calibration at 0
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(tiny_model(x), ref)


@pytest.mark.parametrize("target", [0.3, 0.5, 0.8])
def test_whole_aligned_blocks_and_target_met(tiny_model, target):
    cfg = parse_technique(f"lpvit:sparsity={target},block=8/8")
    model = vitlab.apply_(tiny_model, cfg, calib=_calib())
    bh, bw = BLOCK
    for name, lin in prunable_linears(model):
        w = lin.weight.detach()
        zero_blocks = (w == 0).reshape(w.shape[0] // bh, bh, w.shape[1] // bw, bw).all(dim=3).all(dim=1)
        expanded = zero_blocks.repeat_interleave(bh, 0).repeat_interleave(bw, 1)
        assert torch.equal(w == 0, expanded), f"{name}: a zero outside a whole aligned {bh}x{bw} block"
        assert not zero_blocks.all(), f"{name}: every block removed"
    reached = _zero_fraction(model)
    assert abs(reached - target) <= 0.01, (reached, target)
    assert model.vitlab.lpvit["sparsity"] == pytest.approx(reached)
    assert len(set(model.vitlab.lpvit["layers"].values())) > 1       # a per-layer allocation, not uniform


def test_distortion_equals_explicit_second_order_form():
    g = torch.Generator().manual_seed(1)
    w, grad = torch.randn(16, 24, generator=g), torch.randn(16, 24, generator=g)
    damp = 0.1
    for amount in (0.25, 0.5, 5 / 6):
        mask = block_mask(block_scores(w, grad, BLOCK), amount, BLOCK)
        dw = (-(w * (1 - mask.float()))).double().flatten()
        gv = grad.double().flatten()
        fisher = torch.outer(gv, gv) + damp * torch.eye(gv.numel(), dtype=torch.float64)
        explicit = (dw * gv).square().mean() + 0.5 * dw @ fisher @ dw
        assert distortion(w, grad, mask, damp=damp) == pytest.approx(float(explicit), rel=1e-9)
        assert distortion(w, grad, mask, second_order=False) == pytest.approx(float((dw * gv).square().mean()))
    # the cumulative-sum curve equals distortion() of each mask
    amounts, curve = distortion_curve(w, grad, BLOCK, steps=12, damp=damp)
    for a, d in zip(amounts.tolist(), curve.tolist()):
        mask = block_mask(block_scores(w, grad, BLOCK), a, BLOCK)
        assert d == pytest.approx(distortion(w, grad, mask, damp=damp), rel=1e-9, abs=1e-12)


def test_block_ranking_drops_lowest_taylor_blocks():
    w = torch.ones(16, 16)
    grad = torch.ones(16, 16)
    grad[:8, 8:] = 0.01                                              # the (0, 1) block has the smallest |w*g|
    mask = block_mask(block_scores(w, grad, BLOCK), 0.25, BLOCK)
    assert not mask[:8, 8:].any() and mask[:8, :8].all() and mask[8:].all()


def test_gradients_are_the_batch_mean_of_the_output_loss(tiny_model):
    calib = _calib(2)
    linears = prunable_linears(tiny_model)
    grads = layer_gradients(tiny_model, linears, calib, "output")
    tiny_model.eval()
    tiny_model.zero_grad()
    tiny_model(torch.cat(calib)).square().mean().backward()           # equal batch sizes: same mean
    for g, (name, lin) in zip(grads, linears):
        torch.testing.assert_close(g.float(), lin.weight.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_allocation_gives_more_sparsity_to_cheap_layers():
    amounts = torch.arange(101, dtype=torch.float64) / 100
    cheap, costly = amounts.square(), 10 * amounts.square()          # Lagrangian: 2 a1 = 20 a2 = s
    a1, a2 = allocate(amounts, [cheap, costly], [100, 100], [6400, 6400], 0.5)
    assert a1 > a2
    assert a1 == pytest.approx(10 / 11, abs=0.02) and a2 == pytest.approx(1 / 11, abs=0.02)
    # equal distortion, larger power weight -> pruned more (the hardware-aware term)
    same = amounts.square()
    beta = 0.5
    curves = [same + beta * p * (1 - amounts) for p in (2.0, 1.0)]
    hi_power, lo_power = allocate(amounts, curves, [100, 100], [6400, 6400], 0.5)
    assert hi_power > lo_power
    assert power_weight((288, 96), (16, 16)) == 18 * 6 * 6


def test_derivative_of_a_quadratic():
    x = torch.arange(51, dtype=torch.float64) / 50
    d = derivative(x, x.square(), h=4)
    torch.testing.assert_close(d[4:-4], 2 * x[4:-5], rtol=0, atol=1e-9)


def test_save_reload_reproduces_outputs(tiny_model, tmp_path):
    model = vitlab.apply_(tiny_model, LPViT(sparsity=0.5, block=BLOCK), calib=_calib())
    model.eval()
    x = torch.randn(4, 1, 16, 16)
    vitlab.save_checkpoint(model, tmp_path / "lp")
    again = vitlab.create_model(str(tmp_path / "lp")).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
    assert _zero_fraction(again) == pytest.approx(_zero_fraction(model))
    saved = json.loads((tmp_path / "lp" / "config.json").read_text())["techniques"]
    assert [t for t in saved if t["name"] == "lpvit"][0]["sparsity"] == 0.5


def test_bad_values_are_refused(tiny_model):
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="sparsity"):
            LPViT(sparsity=bad)
    with pytest.raises(TechniqueError, match="sparsity"):
        parse_technique("lpvit:sparsity=1.2")
    with pytest.raises(ValueError, match="block"):
        LPViT(block=(0, 8))
    with pytest.raises(LPViTError, match="does not divide"):
        vitlab.apply_(tiny_model, LPViT(block=(5, 8)), calib=_calib())
    with pytest.raises(LPViTError, match="calib"):
        vitlab.apply_(tiny_model, LPViT(block=BLOCK))


def test_cli_prune_apply_lpvit_saves_a_checkpoint(tiny_model, tmp_path, capsys):
    from vitlab.cli import main

    vitlab.save_checkpoint(tiny_model, tmp_path / "base")
    argv = ["prune", str(tmp_path / "base"), "--apply", "lpvit:sparsity=0.5,block=8/8", "--data",
            "synthetic:n=64,classes=10", "--calib-images", "32", "--out", str(tmp_path / "lp")]
    assert main(argv) == 0
    assert "% of the blocks' Linear weights are zero" in capsys.readouterr().out
    pruned = vitlab.create_model(tmp_path / "lp")
    assert _zero_fraction(pruned) == pytest.approx(0.5, abs=0.02)
    assert vitlab.load_config(tmp_path / "lp")["training"]["pruned"]["technique"].startswith("lpvit:")
    # no images -> one clear line naming the fix; a quantizer is refused by prune
    assert main(argv[:4] + ["--out", str(tmp_path / "x")]) == 2
    assert "give --data SPEC" in capsys.readouterr().err
    assert main(argv[:2] + ["--apply", "w8a8", "--out", str(tmp_path / "y")]) == 2
    assert "give one pruning technique" in capsys.readouterr().err and not (tmp_path / "y").exists()


def test_train_holds_the_lpvit_zeros_unless_told_not_to(tiny_model, tmp_path, capsys):
    """`vitlab train --init` an LPViT checkpoint keeps its zero blocks (the paper's recovery); --no-keep-zeros lets
    them train; --keep-zeros on a dense model is an error naming the fix."""
    from vitlab.cli import main

    vitlab.save_checkpoint(tiny_model, tmp_path / "base")
    assert main(["prune", str(tmp_path / "base"), "--apply", "lpvit:sparsity=0.5,block=8/8", "--data",
                 "synthetic:n=64,classes=10", "--calib-images", "32", "--out", str(tmp_path / "lp")]) == 0
    pruned = vitlab.create_model(tmp_path / "lp")
    zeros = {n: lin.weight == 0 for n, lin in prunable_linears(pruned)}
    train = ["train", "--data", "synthetic:n=64,classes=10", "--epochs", "1", "--max-steps", "3", "--batch-size",
             "16", "--lr", "1e-2", "--warmup-epochs", "0", "--no-val", "--no-progress", "--threads", "1"]
    assert main([*train, "--init", str(tmp_path / "lp"), "--out", str(tmp_path / "held")]) == 0
    assert "holding" in capsys.readouterr().out
    held = vitlab.create_model(tmp_path / "held")
    assert all(torch.equal(lin.weight == 0, zeros[n]) for n, lin in prunable_linears(held))
    assert any(not torch.equal(lin.weight, dict(prunable_linears(pruned))[n].weight) for n, lin in prunable_linears(held))
    assert main([*train, "--init", str(tmp_path / "lp"), "--no-keep-zeros", "--out", str(tmp_path / "free")]) == 0
    # zeroed fc2 blocks regrow; fully zeroed q/k rows get no gradient (uniform attention), so not everything does
    assert _zero_fraction(vitlab.create_model(tmp_path / "free")) < _zero_fraction(held) - 0.2
    assert main([*train, "--init", str(tmp_path / "base"), "--keep-zeros", "--out", str(tmp_path / "dense")]) == 2
    assert "no Linear weight under the blocks" in capsys.readouterr().err and not (tmp_path / "dense").exists()
