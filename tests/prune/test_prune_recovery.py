"""Recovery training for pruned models: DeiT distillation losses, SAM's step, the train/prune/eval/bench CLI."""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab.engine.distill import DistillTokenViT, distill_loss
from vitlab.engine.sam import SAM


def test_soft_distillation_formula():
    torch.manual_seed(0)
    s, t, y = torch.randn(5, 10), torch.randn(5, 10), torch.randint(0, 10, (5,))
    tau, alpha = 2.0, 0.3
    kl = (F.softmax(t / tau, -1) * (F.log_softmax(t / tau, -1) - F.log_softmax(s / tau, -1))).sum() * tau ** 2 / s.numel()
    expected = (1 - alpha) * F.cross_entropy(s, y) + alpha * kl
    torch.testing.assert_close(distill_loss(s, t, y, "soft", alpha, tau), expected)
    assert distill_loss(s, s, y, "soft", 1.0, tau).abs() < 1e-6             # same logits: no KL
    hard = distill_loss(s, t, y, "hard", 0.5)
    torch.testing.assert_close(hard, 0.5 * F.cross_entropy(s, y) + 0.5 * F.cross_entropy(s, t.argmax(-1)))
    with pytest.raises(ValueError, match="soft, hard, token"):
        distill_loss(s, t, y, "kd")


def test_distillation_token_model():
    vit = vitlab.create_model("vl_test_vit", num_classes=10)
    model = DistillTokenViT(vit).train()
    cls_logits, dist_logits = model(torch.randn(2, 1, 16, 16))
    assert cls_logits.shape == dist_logits.shape == (2, 10)
    loss = distill_loss(cls_logits, torch.randn(2, 10), torch.tensor([1, 2]), "token", dist_logits=dist_logits)
    loss.backward()
    assert model.dist_token.grad is not None and model.dist_token.grad.abs().sum() > 0
    model.eval()
    x = torch.randn(2, 1, 16, 16)
    assert model(x).shape == (2, 10)


def test_sam_step_matches_formula_on_quadratic():
    """L(w) = 1/2 w^T A w - b^T w: grad L(w) = A w - b in closed form, so SAM's SGD step is known exactly."""
    torch.manual_seed(0)
    m = torch.randn(4, 4, dtype=torch.float64)
    A, b = m @ m.T + torch.eye(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    w0 = torch.randn(4, dtype=torch.float64)
    w = torch.nn.Parameter(w0.clone())
    lr, rho = 0.1, 0.05
    opt = SAM([w], torch.optim.SGD, rho=rho, lr=lr)

    def closure():
        loss = 0.5 * w @ A @ w - b @ w
        loss.backward()
        return loss

    opt.zero_grad()
    closure()
    opt.step(closure)
    g = A @ w0 - b
    e = rho * g / g.norm()
    expected = w0 - lr * (A @ (w0 + e) - b)
    torch.testing.assert_close(w.detach(), expected)


def _tiny_ckpt(path):
    torch.manual_seed(0)
    model = vitlab.create_model("vl_test_vit", num_classes=10)
    vitlab.save_checkpoint(model, path)
    return path


def test_train_with_teacher_sam_and_l1(tmp_path):
    from vitlab.engine.train import TrainConfig, fit

    teacher = _tiny_ckpt(tmp_path / "teacher")
    for distill, opt, l1 in (("soft", "sam", 1e-4), ("token", "adamw", 0.0), ("hard", "adamw", 0.0)):
        out = fit(TrainConfig(out=str(tmp_path / f"run_{distill}"), init=str(teacher), data="synthetic:n=64,classes=10",
                              epochs=1, batch_size=16, teacher=str(teacher), distill=distill, opt=opt, l1=l1,
                              eval_val=False, progress=False, threads=1))
        model = vitlab.create_model(out)
        assert model(torch.randn(1, 1, 16, 16)).shape == (1, 10)
    with pytest.raises(ValueError, match="go together"):
        TrainConfig(out="x", model="vl_test_vit", teacher=str(teacher)).validate()


def test_cli_prune_then_eval_and_bench_in_fresh_processes(tmp_path):
    from vitlab.cli import main

    src = _tiny_ckpt(tmp_path / "src")
    assert main(["prune", str(src), "--target-flops", "0.7", "--importance", "taylor", "--data",
                 "synthetic:n=32,classes=10", "--calib-images", "16", "--out", str(tmp_path / "pruned")]) == 0
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert config["model"]["name"] == "vl_pruned_vit" and config["techniques"][0]["name"] == "prune"
    assert main(["prune", str(src), "--importance", "taylor", "--out", str(tmp_path / "x")]) == 2  # needs --data
    for verb in (["eval", str(tmp_path / "pruned"), "--data", "synthetic:n=32,classes=10", "--json"],
                 ["bench", str(tmp_path / "pruned"), "--no-memory", "--min-time", "0.05", "--batch", "2"]):
        res = subprocess.run([sys.executable, "-m", "vitlab", *verb], capture_output=True, text=True, timeout=180)
        assert res.returncode == 0, res.stderr
