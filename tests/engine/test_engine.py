"""Training engine: loss goes down, bitwise resume, 2-process DDP equals 1 process, evaluation."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import vitlab
from vitlab.engine import TrainConfig, evaluate, fit
from vitlab.engine.train import TrainInterrupted
from vitlab.data import build_dataset


def _weights(run: Path) -> dict:
    return load_file(str(run / "model.safetensors"))


def _cfg(out, **kw) -> TrainConfig:
    base = dict(out=str(out), model="vl_test_vit", data="synthetic:n=64,classes=4", epochs=2, batch_size=16,
                lr=3e-3, warmup_epochs=0.5, progress=False, threads=1)
    base.update(kw)
    return TrainConfig(**base)


def test_a_few_steps_lower_the_loss(tmp_path, tiny_folder):
    # bright "cat" images vs dark "dog" images: learnable in a few steps
    run = fit(_cfg(tmp_path / "run", data=tiny_folder, epochs=5, batch_size=4, model_kwargs={"in_chans": 3},
                   label_smoothing=0.0))
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 5 and lines[-1]["step"] == 30
    assert lines[-1]["train_loss"] < 0.5 * lines[0]["train_loss"]
    assert lines[-1]["val_top1"] == 1.0
    assert {"epoch", "step", "train_loss", "lr", "img_per_s", "val_top1", "val_loss"} <= set(lines[-1])
    config = vitlab.load_config(run)
    assert config["training"]["global_step"] == 30 and config["metrics"]["val_top1"] == lines[-1]["val_top1"]
    assert config["preprocessing"]["class_names"] == ["cat", "dog"]


@pytest.fixture
def tiny_folder(tmp_path) -> str:
    torch.manual_seed(0)
    for split, n in (("train", 12), ("val", 4), ("test", 4)):
        for label in ("cat", "dog"):
            folder = tmp_path / "imgs" / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                low = 150 if label == "cat" else 0
                pixels = (low + torch.rand(20, 20, 3) * 100).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return f"imagefolder:{tmp_path / 'imgs'}"


@pytest.mark.parametrize("crash_at, saved", [
    (9, (8, 1, 2)),   # 6 steps per epoch: dies in epoch 2, state from --save-every at step 8
    (7, (6, 1, 0)),   # state from epoch 1's end, after which the validation ran (it must not move the RNG)
])
def test_resume_after_a_crash_mid_epoch_is_bitwise_identical(tmp_path, tiny_folder, crash_at, saved):
    # augmentation (torch RNG), drop path (torch RNG) and mixup (numpy RNG) all draw random numbers
    common = dict(data=tiny_folder, batch_size=4, epochs=2, drop_path=0.1, mixup=0.4, save_every=2,
                  model_kwargs={"in_chans": 3})
    straight = fit(_cfg(tmp_path / "a", **common))
    with pytest.raises(TrainInterrupted):
        fit(_cfg(tmp_path / "b", **common), _crash_at_step=crash_at)
    state = torch.load(tmp_path / "b" / "train_state.pt", weights_only=True)
    assert (state["global_step"], state["epoch"], state["step_in_epoch"]) == saved
    resumed = fit(resume=str(tmp_path / "b"))
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_cli_resume_of_a_missing_run_is_a_clear_error(tmp_path, capsys):
    from vitlab.cli import main

    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "train_state.pt does not exist" in capsys.readouterr().err


def test_two_process_ddp_equals_one_process(tmp_path):
    args = ["train", "--model", "vl_test_vit", "--data", "synthetic:n=64,classes=4", "--batch-size", "16",
            "--epochs", "1", "--no-val", "--no-progress", "--threads", "1", "--lr", "0.05", "--opt", "momentum"]
    # SGD, not AdamW: the attention key bias gets an exactly-zero gradient (softmax ignores a constant per query), and
    # Adam divides that float noise by its own square root, turning 1e-10 differences into lr-sized steps
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "vitlab", *args, "--out", str(tmp_path / "one")], check=True, env=env,
                   capture_output=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                    "-m", "vitlab", *args, "--out", str(tmp_path / "two")], check=True, env=env, capture_output=True)
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    moved = sum((one[k] - vitlab.create_model("vl_test_vit", num_classes=4).state_dict()[k]).abs().sum() for k in one)
    assert moved > 0
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-4, atol=1e-5, msg=key)


def test_evaluate_counts_and_confusion(tiny_model, tmp_path):
    from vitlab.engine import plot_confusion

    data = build_dataset("synthetic:n=40,classes=10", "test", img_size=16)
    result = evaluate(tiny_model, data, batch_size=16, progress=False)
    assert result["n"] == 40 and 0 <= result["top1"] <= result["top5"] <= 1
    assert sum(map(sum, result["confusion"])) == 40 and len(result["per_class"]) == 10
    png = plot_confusion(result, tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_flip_tta_scores_the_mean_softmax_of_image_and_mirror(tiny_model):
    data = build_dataset("synthetic:n=40,classes=10", "test", img_size=16)
    x = torch.stack([data[i][0] for i in range(40)])
    y = torch.tensor([data[i][1] for i in range(40)])
    tiny_model.eval()
    with torch.no_grad():
        mean = (tiny_model(x).softmax(1) + tiny_model(x.flip(-1)).softmax(1)) / 2
    plain = evaluate(tiny_model, data, batch_size=16, progress=False)
    tta = evaluate(tiny_model, data, batch_size=16, progress=False, tta="flip", predictions=True)
    assert tta["predictions"] == dict(enumerate(mean.argmax(1).tolist()))
    assert tta["top1"] == pytest.approx((mean.argmax(1) == y).double().mean().item())
    assert abs(tta["loss"] - torch.nn.functional.nll_loss(mean.log(), y).item()) < 1e-5
    assert tta["predictions"] != evaluate(tiny_model, data, batch_size=16, progress=False, predictions=True)[
        "predictions"] or tta["loss"] != plain["loss"]   # the mirror pass changed something: it ran
    with pytest.raises(ValueError, match="tta='crop'.*flip"):
        evaluate(tiny_model, data, progress=False, tta="crop")


def test_shape_mismatch_names_both_shapes(tiny_model):
    data = build_dataset("synthetic:n=8", "test", img_size=20)
    with pytest.raises(ValueError, match="1x20x20 but the model expects 1x16x16"):
        evaluate(tiny_model, data, progress=False)


def test_muon_orthogonalises_hidden_matrices_and_leaves_embeddings_and_head_to_adamw(tmp_path):
    from timm.optim import Muon

    from vitlab.engine.train import _create_optimizer, muon_fallback

    model = vitlab.create_model("vl_test_vit", num_classes=4)
    assert {"pos_embed", "cls_token", "head", "head.*"} <= set(muon_fallback(model))
    cfg = _cfg(tmp_path, opt="muon")
    optimizer = _create_optimizer(model, cfg)
    assert isinstance(optimizer, Muon)
    names = {id(p): n for n, p in model.named_parameters()}
    on_fallback = {names[id(p)] for g in optimizer.param_groups if g.get("use_fallback") for p in g["params"]}
    on_muon = {names[id(p)] for g in optimizer.param_groups if not g.get("use_fallback") for p in g["params"]}
    assert {"pos_embed", "cls_token", "head.weight"} <= on_fallback
    assert "blocks.0.attn.qkv.weight" in on_muon and not on_muon & {"pos_embed", "cls_token", "head.weight"}
    # a Muon step on a hidden matrix is an orthogonalised update: its singular values are (nearly) equal
    w = model.blocks[0].mlp.fc1.weight
    before = w.detach().clone()
    w.grad = torch.randn_like(w)
    for n, p in model.named_parameters():
        if p is not w:
            p.grad = None
    optimizer.step()
    s = torch.linalg.svdvals((w.detach() - before).double())
    assert s.max() / s.min() < 2.0, s   # Newton-Schulz leaves singular values within ~[0.7, 1.2], not a raw gradient's spread
    # and the engine trains with it end to end
    run = fit(_cfg(tmp_path / "run", opt="muon", epochs=1))
    assert vitlab.load_config(run)["training"]["global_step"] == 4


def test_muon_fallback_by_role_keeps_tables_and_output_layers_off_muon():
    from vitlab.engine.train import muon_fallback_by_role

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.queries = torch.nn.Embedding(4, 8)
            self.level_embed = torch.nn.Parameter(torch.zeros(3, 8))
            self.attn = torch.nn.MultiheadAttention(8, 2)
            self.hidden = torch.nn.Linear(8, 8)
            self.conv = torch.nn.Conv2d(8, 8, 3)
            self.cls = torch.nn.Linear(8, 5)

    names = muon_fallback_by_role(Head(), output_layers=("cls",))
    assert names == ["cls.weight", "level_embed", "queries.weight"]   # biases / 1-D ones fall back by themselves
    assert "cls.weight" not in muon_fallback_by_role(Head())
