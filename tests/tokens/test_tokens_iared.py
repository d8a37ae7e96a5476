"""IA-RED²: the interpreter's policy, REINFORCE against the formula, hierarchical dropping, FLOPs, saliency,
refusal, checkpoints."""

import pytest
import torch
import torch.nn as nn

import vitlab
from vitlab.engine.recipes import Step, parse_recipe
from vitlab.explain import explain
from vitlab.explain.core import ExplainError
from vitlab.profiling import count_flops
from vitlab.techniques import TechniqueNotApplicable, parse_apply
from vitlab.tokens import IARED
from vitlab.explain.iared import iared_saliency
from vitlab.tokens.iared import IAREDTraining, iared_reductions, iared_reward, policy_log_prob, reinforce_loss

SMALL = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=5)   # 64 patches, 8 x 8


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return vitlab.create_model("vit_tiny_patch16_224", **SMALL).eval()


def _iared(cfg: IARED = IARED(locations=(0.0, 0.5)), seed: int = 0) -> nn.Module:
    model = vitlab.apply_(_model(seed), cfg)
    torch.manual_seed(seed + 1)
    for red in iared_reductions(model):       # scores spread around the threshold: some tokens drop, some stay
        red.interpreter.qk.weight.data.normal_(0, 0.5)
        red.interpreter.bias.data.zero_()
    return model.eval()


def test_reinforce_gradient_on_two_tokens_equals_the_formula():
    # one image, two tokens, logits z, keep probabilities p = sigmoid(z), actions u = (1, 0), reward R:
    # d/dz [-R log pi(u)] = -R (u - p), the Bernoulli score function
    z = torch.tensor([[0.3, -1.2]], requires_grad=True)
    p, u, R = z.sigmoid(), torch.tensor([[True, False]]), torch.tensor([0.75])
    loss = reinforce_loss(policy_log_prob(p, u, torch.ones_like(u)), R, baseline=False)
    loss.backward()
    torch.testing.assert_close(z.grad, -0.75 * (u.float() - p.detach()))
    # a dropped-earlier token (not alive) gets no gradient; the baseline subtracts the batch's mean reward
    z2 = torch.tensor([[0.3, -1.2], [0.5, 0.1]], requires_grad=True)
    u2 = torch.tensor([[True, False], [False, True]])
    alive = torch.tensor([[True, False], [True, True]])
    reward = torch.tensor([1.0, -0.5])
    reinforce_loss(policy_log_prob(z2.sigmoid(), u2, alive), reward, baseline=True).backward()
    adv = (reward - reward.mean())[:, None]
    expected = -adv * (u2.float() - z2.sigmoid().detach()) * alive.float() / 2     # mean over the 2 images
    torch.testing.assert_close(z2.grad, expected)


def test_reward_is_one_minus_squared_budget_when_right_else_the_penalty():
    correct, executed = torch.tensor([True, True, False]), torch.tensor([1.0, 0.5, 0.3])
    torch.testing.assert_close(iared_reward(correct, executed, penalty=0.5), torch.tensor([0.0, 0.75, -0.5]))


def test_threshold_near_zero_keeps_every_token_and_is_the_base_model():
    base, model = _model(), _iared(IARED(locations=(0.0, 0.5), threshold=1e-6))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), base(x))
    assert model.token_state.counts == [65, 65, 65, 65]
    assert parse_apply(["iared:threshold=0.3,locations=0/0.5"]) == [IARED(threshold=0.3, locations=(0.0, 0.5))]


def test_dropping_equals_masking_and_is_hierarchical():
    model, x = _iared(), torch.randn(3, 3, 32, 32)
    dropped = model(x)
    counts = model.token_state.counts
    assert 1 + 64 > counts[0] >= counts[2] > 1                    # fewer tokens, and fewer again in group 2
    for r in iared_reductions(model):
        r.mask = True
    masked = model(x)                                            # keys masked, positions kept
    torch.testing.assert_close(dropped, masked, rtol=1e-5, atol=1e-5)
    _, keep2, alive2 = iared_reductions(model)[1].record
    assert bool((keep2 <= alive2).all()) and bool((alive2 == iared_reductions(model)[0].record[1]).all())


def test_flops_drop_by_the_executed_token_counts_plus_the_interpreters():
    model, base = _iared(IARED(locations=(0.0, 0.5))), _model()
    x = torch.randn(1, 3, 32, 32)
    macs = count_flops(model, x).macs
    counts = model.token_state.counts                             # tokens each block ran on (1 image: no padding)
    C = SMALL["embed_dim"]
    block = lambda n: count_flops(base.blocks[0], torch.randn(1, n, C)).macs   # noqa: E731
    interp = lambda n: n * C * 2 * 3 * 16 + (n - 1) * 3 * 16     # noqa: E731  q, k projections; q.k per patch
    expected = (count_flops(base, x).macs - sum(block(65) - block(n) for n in counts)
                + interp(65) + interp(counts[1]))
    assert macs == expected and counts[-1] < 65


def test_policy_phase_freezes_the_backbone_samples_and_trains_only_the_interpreters():
    model = _iared()
    recipe = parse_recipe("iared:phase=policy,penalty=0.5")
    assert isinstance(recipe, IAREDTraining)
    recipe.setup(model, None, None, None)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".interpreter." in n for n in trainable)
    model.train()
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))
    loss = recipe.loss(Step(model, model, x, y, None, [], 0, 0, 0, lambda: None))
    assert model.token_state.counts == [65] * 4                  # sampled drops are masks: no token removed
    probs, keep, alive = iared_reductions(model)[0].record
    assert 0 < int(keep.sum()) < keep.numel()                    # Bernoulli actions: some kept, some dropped
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if ".interpreter." not in n)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for r in iared_reductions(model)
               for p in r.interpreter.parameters())
    backbone = parse_recipe("iared:phase=backbone")
    backbone.setup(model, None, None, None)
    assert all(not p.requires_grad for r in iared_reductions(model) for p in r.interpreter.parameters())
    assert model.blocks[0].attn.qkv.weight.requires_grad


def test_saliency_is_the_product_of_keep_probabilities_over_the_groups_reached():
    model, x = _iared(), torch.randn(2, 3, 32, 32)
    target = torch.zeros(2, dtype=torch.long)
    sal = iared_saliency(model, x, target)
    assert sal.shape == (2, 8, 8)
    (p1, k1, a1), (p2, k2, a2) = (r.record for r in iared_reductions(model))
    torch.testing.assert_close(sal.flatten(1), p1 * torch.where(a2, p2, torch.zeros_like(p2)))
    assert bool((sal.flatten(1)[~k1] == 0).all())                # dropped by group 1: no saliency
    e = explain(model, x, method="iared")
    assert e.maps.shape == (2, 32, 32) and float(e.maps.max()) == pytest.approx(1.0)
    with pytest.raises(ExplainError, match="--apply iared"):
        explain(_model(), x, method="iared")


def test_refuses_swin_by_name():
    torch.manual_seed(0)
    swin = vitlab.create_model("swin_tiny_patch4_window7_224", img_size=64, window_size=4, embed_dim=24,
                               depths=(1, 1), num_heads=(1, 2), num_classes=5)
    with pytest.raises(TechniqueNotApplicable, match="supports") as err:
        vitlab.apply_(swin, IARED())
    assert "iared" in str(err.value) and "SwinTransformer" in str(err.value)


def test_checkpoint_round_trip_keeps_the_trained_interpreters(tmp_path):
    model = _iared()
    vitlab.save_checkpoint(model, tmp_path / "ck")
    again = vitlab.create_model(tmp_path / "ck")
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(again(x), model(x))
    assert again.token_state.counts == model.token_state.counts
    assert again.vitlab.techniques == (IARED(locations=(0.0, 0.5)),)


def test_vitlab_train_policy_phase_keeps_the_backbone_frozen_and_saves_the_interpreters(tmp_path):
    from safetensors.torch import load_file

    from vitlab.cli import main

    init = tmp_path / "init"
    torch.manual_seed(0)
    vitlab.save_checkpoint(vitlab.create_model("vl_test_vit", num_classes=4), init)
    code = main(["train", "--init", str(init), "--data", "synthetic:n=32,classes=4", "--apply", "iared",
                 "--recipe", "iared:phase=policy", "--epochs", "1", "--batch-size", "16", "--max-steps", "2",
                 "--warmup-epochs", "0", "--lr", "0.01", "--no-progress", "--threads", "1", "--out",
                 str(tmp_path / "run")])
    assert code in (0, None)
    before, after = load_file(str(init / "model.safetensors")), load_file(str(tmp_path / "run" / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)          # the backbone is frozen
    assert any(".interpreter." in k for k in after)
    model = vitlab.create_model(tmp_path / "run")
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 4)
    # phase 2 from the phase-1 checkpoint (iared re-applied on load): the interpreters are frozen now
    code = main(["train", "--init", str(tmp_path / "run"), "--data", "synthetic:n=32,classes=4", "--recipe",
                 "iared:phase=backbone", "--epochs", "1", "--batch-size", "16", "--max-steps", "1", "--warmup-epochs",
                 "0", "--no-progress", "--threads", "1", "--out", str(tmp_path / "run2")])
    assert code in (0, None)
    final = load_file(str(tmp_path / "run2" / "model.safetensors"))
    assert all(torch.equal(after[k], final[k]) for k in after if ".interpreter." in k)
    assert any(not torch.equal(after[k], final[k]) for k in after if ".interpreter." not in k)


def test_vitlab_explain_draws_the_interpreter_saliency(tmp_path):
    from PIL import Image

    from vitlab.cli import main

    torch.manual_seed(0)
    model = vitlab.apply_(vitlab.create_model("vl_test_vit"), IARED(locations=(0.0,)))
    vitlab.save_checkpoint(model, tmp_path / "ck")
    image = tmp_path / "img.png"
    Image.fromarray((torch.rand(16, 16) * 255).to(torch.uint8).numpy()).save(image)
    out = tmp_path / "iared.png"
    assert main(["explain", str(tmp_path / "ck"), "--image", str(image), "--method", "iared", "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
