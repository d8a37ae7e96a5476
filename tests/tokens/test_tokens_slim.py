"""Self-slimmed ViT: the Token Slimming Module, its schedule and FLOPs, FRD, refusal, checkpoints."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import vitlab
from vitlab.engine.recipes import Step, parse_recipe
from vitlab.profiling import count_flops
from vitlab.techniques import TechniqueError, TechniqueNotApplicable, parse_apply
from vitlab.tokens import Slim
from vitlab.tokens.slim import FRD, ReverseTSM, TokenSlimming, frd_loss, slim_counts, slim_reductions

SMALL = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=5)   # 64 patches


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return vitlab.create_model("vit_tiny_patch16_224", **SMALL).eval()


def _slimmed(cfg: Slim, seed: int = 0) -> nn.Module:
    model = _model(seed)
    vitlab.apply_(model, cfg)
    torch.manual_seed(seed + 1)
    for _, red in slim_reductions(model):          # non-trivial TSM weights (the official init is near-uniform)
        for p in red.tsm.parameters():
            p.data.normal_(0, 0.5)
    return model.eval()


def test_tsm_weights_are_row_stochastic_and_aggregate_convexly():
    torch.manual_seed(0)
    tsm = TokenSlimming(dim=16, keep=5)
    for p in tsm.parameters():
        p.data.normal_(0, 1)
    x = torch.randn(3, 12, 16)
    a = tsm.mixing(x)                                             # (B, M, N)
    assert a.shape == (3, 5, 12) and bool((a >= 0).all())
    torch.testing.assert_close(a.sum(-1), torch.ones(3, 5))
    out = tsm(x)
    torch.testing.assert_close(out, torch.einsum("bmn,bnc->bmc", a, x))
    # each output token lies in the convex hull of the inputs: per channel between their min and max
    assert bool((out <= x.amax(1, keepdim=True) + 1e-6).all() and (out >= x.amin(1, keepdim=True) - 1e-6).all())
    # the official formula: softmax over the N input tokens of scale * MLP(LN(x)), transposed
    ref = torch.softmax(tsm.weight(x) * tsm.scale, dim=1).transpose(2, 1) @ x
    torch.testing.assert_close(out, ref)


def test_tsm_and_reverse_tsm_match_the_official_modules():
    # tests/fixtures/tokens/make_sit_fixture.py: Sense-X/SiT f5778084, models/lvvit.py, on a tiny config
    fix = load_file(Path(__file__).parents[1] / "fixtures" / "tokens" / "official_sit_tsm.safetensors")
    tsm, rtsm = TokenSlimming(dim=16, keep=5), ReverseTSM(dim=16, kept=5, recovered=12)
    tsm.load_state_dict({k[4:]: v for k, v in fix.items() if k.startswith("tsm.")})
    rtsm.load_state_dict({k[5:]: v for k, v in fix.items() if k.startswith("rtsm.")})
    with torch.no_grad():
        torch.testing.assert_close(tsm(fix["x"]), fix["tsm_out"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rtsm(fix["tsm_out"]), fix["rtsm_out"], rtol=1e-5, atol=1e-6)


def test_schedule_keeps_class_token_and_follows_the_official_counts():
    assert slim_counts(196, 0.5, 3) == [98, 49, 24]               # int(N0 * keep ** s), official `keeped_patches`
    model = _slimmed(Slim(keep_rate=0.5, locations=(0.25, 0.5, 0.75)))
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 5)
    assert model.token_state.counts == [65, 33, 17, 9]            # 1 class token + 64, 32, 16, 8 patches
    with pytest.raises(TechniqueError, match="keeps no token"):
        vitlab.apply_(_model(), Slim(keep_rate=0.01, locations=(0.25,)))
    assert parse_apply(["slim:keep_rate=0.7,locations=0.5/0.75"]) == [Slim(keep_rate=0.7, locations=(0.5, 0.75))]


def test_class_token_bypasses_the_tsm():
    model = _slimmed(Slim(keep_rate=0.5, locations=(0.5,)))
    base = _model()
    x = torch.randn(2, 3, 32, 32)
    outs, base_outs = [], []
    model.blocks[1].register_forward_hook(lambda m, i, o: outs.append(o))
    base.blocks[1].register_forward_hook(lambda m, i, o: base_outs.append(o))
    model(x), base(x)
    torch.testing.assert_close(outs[0], base_outs[0])              # before the slimming block: identical
    assert model.blocks[2].reduction.last.shape == (2, 32, 48)


def test_keep_rate_one_is_the_unslimmed_model():
    base, model = _model(), vitlab.apply_(_model(), Slim(keep_rate=1.0))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
    assert not slim_reductions(model) and not any("token_slimming" in k for k in model.state_dict())


def test_flops_drop_by_the_blocks_smaller_token_counts_plus_the_tsms():
    cfg = Slim(keep_rate=0.5, locations=(0.25, 0.5, 0.75))
    base, model = _model(), _slimmed(cfg)
    x = torch.randn(1, 3, 32, 32)
    base_macs, macs = count_flops(base, x).macs, count_flops(model, x).macs
    C = SMALL["embed_dim"]
    block = lambda n: count_flops(base.blocks[0], torch.randn(1, n, C)).macs   # noqa: E731  (one ViT block)
    counts = [65, 33, 17, 9]                                      # tokens each block runs on
    tsm = sum(count_flops(red.tsm, torch.randn(1, n - 1, C)).macs
              for (_, red), n in zip(slim_reductions(model), [65, 33, 17]))
    expected = base_macs - sum(block(65) - block(n) for n in counts) + tsm
    assert macs == expected and macs < 0.6 * base_macs


def test_refuses_swin_by_name():
    torch.manual_seed(0)
    swin = vitlab.create_model("swin_tiny_patch4_window7_224", img_size=64, window_size=4, embed_dim=24,
                               depths=(1, 1), num_heads=(1, 2), num_classes=5)
    with pytest.raises(TechniqueNotApplicable, match="supports") as err:
        vitlab.apply_(swin, Slim())
    assert "slim" in str(err.value) and "SwinTransformer" in str(err.value)


def test_checkpoint_round_trip_keeps_the_trained_tsms(tmp_path):
    model = _slimmed(Slim(keep_rate=0.5, locations=(0.25, 0.75)))
    vitlab.save_checkpoint(model, tmp_path / "ck")
    again = vitlab.create_model(tmp_path / "ck")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(again(x), model(x))
    assert again.token_state.counts == model.token_state.counts == [65, 33, 33, 17]
    assert again.vitlab.techniques == (Slim(keep_rate=0.5, locations=(0.25, 0.75)),)


def test_frd_loss_terms_and_one_step_trains_the_tsm_and_reverse_tsm():
    model = _slimmed(Slim(keep_rate=0.5, locations=(0.5, 0.75)))
    recipe = parse_recipe("frd:token_weight=2,logits_weight=2")
    assert isinstance(recipe, FRD)
    recipe.setup(model, None, type("Cfg", (), {"label_smoothing": 0.0})(), None)
    base, x = _model(), torch.randn(4, 3, 32, 32)
    with torch.no_grad():                                         # the teacher is the un-slimmed starting model
        from vitlab.tokens.slim import _Unslimmed
        with _Unslimmed(recipe.teacher):
            torch.testing.assert_close(recipe.teacher(x), base(x))
    # reverse TSMs (official rule): identity before the first slimming; block 1's output is the one block 2 slims
    assert isinstance(recipe.rtsms[0], nn.Identity) and recipe.rtsms[1].mlp1.fc1.in_features == 32
    assert recipe.rtsms[2].mlp1.fc1.in_features == 16 and recipe.rtsms[3].mlp1.fc1.in_features == 16
    # token and logit terms vanish when student equals teacher
    t, logits = [torch.randn(2, 64, 8)], torch.randn(2, 5)
    zero_tok, zero_kl = frd_loss(t, t, nn.ModuleList([nn.Identity()]), logits, logits, 2.0)
    assert float(zero_tok) == 0.0 and abs(float(zero_kl)) < 1e-7
    tok, kl = frd_loss(t, [t[0] + 1.0], nn.ModuleList([nn.Identity()]), logits, torch.zeros(2, 5), 2.0)
    p_t, log_p_s = torch.full((2, 5), 0.2), torch.log_softmax(logits / 2, dim=1)
    assert float(tok) == pytest.approx(1.0)                       # MSE of a constant gap of 1
    assert float(kl) == pytest.approx(float(4 * (p_t * (p_t.log() - log_p_s)).sum(1).mean()), rel=1e-5)
    model.train()
    y = torch.randint(0, 5, (4,))
    loss = recipe.loss(Step(model, model, x, y, None, [], 0, 0, 0, lambda: None))
    tsm_before = model.blocks[2].token_slimming.weight[1].weight.clone()
    rtsm_before = recipe.rtsms[1].mlp1.fc1.weight.clone()
    loss.backward()
    opt = torch.optim.SGD(list(model.parameters()) + recipe.parameters(), lr=0.1)
    opt.step()
    assert float(loss.detach()) > 0
    assert not torch.equal(model.blocks[2].token_slimming.weight[1].weight, tsm_before)
    assert not torch.equal(recipe.rtsms[1].mlp1.fc1.weight, rtsm_before)
    assert all(p.grad is None for p in recipe.teacher.parameters())


def test_frd_refuses_a_model_without_slim():
    with pytest.raises(TechniqueError, match="--apply slim"):
        FRD().setup(_model(), None, None, None)


def test_vitlab_train_fine_tunes_with_frd_and_the_checkpoint_reloads_slimmed(tmp_path):
    from vitlab.cli import main

    init = tmp_path / "init"
    torch.manual_seed(0)
    vitlab.save_checkpoint(vitlab.create_model("vl_test_vit", num_classes=4), init)
    code = main(["train", "--init", str(init), "--data", "synthetic:n=32,classes=4", "--apply",
                 "slim:keep_rate=0.5,locations=0.5", "--recipe", "frd:ratio=1", "--epochs", "1", "--batch-size", "16",
                 "--max-steps", "1", "--warmup-epochs", "0", "--no-progress", "--threads", "1", "--out",
                 str(tmp_path / "run")])
    assert code in (0, None)
    model = vitlab.create_model(tmp_path / "run")
    model(torch.randn(2, 1, 16, 16))
    assert model.vitlab.techniques == (Slim(keep_rate=0.5, locations=(0.5,)),)
    assert model.token_state.counts == [17, 9]                    # 16 patches -> 8 at block 1


def _train2():
    """benchmarks/tokens_train2.py as a module (the step-budget fine-tune the BENCHMARKS rows come from)."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "tokens_train2.py"
    spec = importlib.util.spec_from_file_location("tokens_train2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train2_step_budget_runs_exactly_n_steps_on_a_cosine_over_the_steps():
    train2 = _train2()
    model = _slimmed(Slim(keep_rate=0.5, locations=(0.5, 0.75)))
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,)))
    tsm = slim_reductions(model)[0][1].tsm.weight[1].weight
    before = tsm.detach().clone()
    trainer = train2.Finetune(model, FRD(ratio=1), data, lr=1e-3, batch=4, seed=0, new_lr=2e-3)
    assert trainer.run(steps=3, seconds=1e-9) == 3              # the step budget wins over the wall-clock one
    assert not torch.equal(tsm, before) and not model.training
    old, new = trainer.opt.param_groups                          # lr set at the last step: cosine at progress 2/3
    assert old["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 2 / 3)))
    assert new["lr"] == pytest.approx(2 * old["lr"])
    assert any(p is tsm for p in new["params"]) and not any(p is tsm for p in old["params"])


def test_train2_steps_flag_per_method_or_for_all_and_refusals():
    train2 = _train2()
    specs = ["evit", "slim:keep_rate=0.6,locations=0.25/0.5/0.75", "slim:keep_rate=0.7,locations=0.25/0.5/0.75"]
    assert train2.step_budgets(["100"], specs) == dict.fromkeys(specs, 100)
    assert train2.step_budgets(["100", "slim=40", "slim:keep_rate=0.7,locations=0.25/0.5/0.75=30"], specs) == {
        specs[0]: 100, specs[1]: 40, specs[2]: 30}
    assert train2.step_budgets([], specs) == dict.fromkeys(specs)    # None: the --minutes budget
    for bad in (["0"], ["slim=x"], ["iared=10"]):
        with pytest.raises(SystemExit, match="--steps"):
            train2.step_budgets(bad, specs)
    with pytest.raises(SystemExit, match="tome"):
        train2.method_of("tome:r=8")
