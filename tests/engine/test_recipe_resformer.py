"""ResFormer (vitlab/engine/resformer.py, vitlab/models/_glpe.py): GLPE and the consistency loss against the official
code's outputs (tests/fixtures/resformer, ruitian12/resformer @ 33e2c09), the loss against a hand computation,
GLPE at several input sizes, sizes=<training size> == plain training, and 2-process DDP == one process."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import vitlab
from vitlab.engine import TrainConfig, fit
from vitlab.engine.recipes import RecipeError, Step, parse_recipe
from vitlab.engine.resformer import resize_batch, scale_consistency
from vitlab.models._glpe import GLPEAttention, GlobalPosEmbed

FIXTURE = Path(__file__).parents[1] / "fixtures" / "resformer"
TINY = dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, stem_widths=(8, 16, 32))


def _glpe(**kw) -> torch.nn.Module:
    return vitlab.create_model("vl_vit_fmnist", pos_embed="glpe", **{**TINY, **kw})


def test_glpe_matches_the_official_code():
    meta = json.loads((FIXTURE / "official_glpe.json").read_text())
    t = load_file(FIXTURE / "official_glpe.safetensors")
    pos = GlobalPosEmbed(meta["dim"]).eval()
    pos.conv.load_state_dict({"weight": t["pos.embed_layer.weight"], "bias": t["pos.embed_layer.bias"]})
    attn = GLPEAttention(meta["dim"], num_heads=meta["heads"], qkv_bias=True).eval()
    names = ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "get_v.weight", "get_v.bias")
    attn.load_state_dict({k.replace("get_v", "local_pe"): t[f"attn.{k}"] for k in names})
    assert t["attn.get_v.weight"].abs().sum() > 0   # the fixture's local conv is not at its zero init
    for grid in meta["grids"]:
        x = t[f"input_{grid}"]
        table = pos(grid, grid).reshape(1, grid * grid, meta["dim"])                 # (1, H*W, D)
        torch.testing.assert_close(x + F.pad(table, (0, 0, 1, 0)), t[f"pos_out_{grid}"], rtol=1e-5, atol=1e-5)
        attn.state.grid = (grid, grid)
        for fused in (True, False):   # SDPA and the explicit softmax
            attn.fused_attn = fused
            with torch.no_grad():
                torch.testing.assert_close(attn(x), t[f"attn_out_{grid}"], rtol=1e-5, atol=1e-5)


def test_consistency_loss_matches_the_official_distillation_loss():
    """CE(label smoothing 0.1) + 1.0 * smooth-L1(student, LN(teacher)) = official DistillationLoss('smooth-l1')."""
    t = load_file(FIXTURE / "official_glpe.safetensors")
    ce = F.cross_entropy(t["kd_logits"], t["kd_labels"], label_smoothing=0.1)
    torch.testing.assert_close(ce.reshape(1), t["kd_base"])
    total = ce + scale_consistency(t["kd_student"], t["kd_teacher"], "cls")
    torch.testing.assert_close(total.reshape(1), t["kd_loss"])


def test_consistency_loss_by_hand():
    student, teacher = [[0.5, -1.0, 2.0], [0.0, 0.3, -0.2]], [[1.0, 2.0, 6.0], [-1.0, 0.0, 1.0]]
    diffs = []
    for s_row, t_row in zip(student, teacher):
        mean = sum(t_row) / 3
        std = math.sqrt(sum((v - mean) ** 2 for v in t_row) / 3 + 1e-6)
        diffs += [s - (v - mean) / std for s, v in zip(s_row, t_row)]
    smooth_l1 = sum(0.5 * d * d if abs(d) < 1 else abs(d) - 0.5 for d in diffs) / 6
    got = scale_consistency(torch.tensor(student), torch.tensor(teacher), "cls")
    assert got.item() == pytest.approx(smooth_l1, rel=1e-5)

    tau, kl = 2.0, 0.0
    for s_row, t_row in zip(student, teacher):
        zs, zt = sum(math.exp(v / tau) for v in s_row), sum(math.exp(v / tau) for v in t_row)
        ps, pt = [math.exp(v / tau) / zs for v in s_row], [math.exp(v / tau) / zt for v in t_row]
        kl += sum(q * math.log(q / p) for p, q in zip(ps, pt))
    got = scale_consistency(torch.tensor(student), torch.tensor(teacher), "logit", tau=tau)
    assert got.item() == pytest.approx(kl * tau * tau / 6, rel=1e-5)


def test_recipe_loss_is_the_mean_over_sizes_of_ce_plus_chained_consistency():
    """Independent path: features from forward_head(pre_logits=True) instead of the recipe's classifier hook."""
    torch.manual_seed(0)
    model = _glpe().train()
    images, targets = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    recipe = parse_recipe("resformer:sizes=14/28/21,weight=0.7")
    recipe.setup(model, None, SimpleNamespace(teacher=None, l1=0.0, label_smoothing=0.1), None)
    step = Step(model=model, train_model=model, images=images, targets=targets, soft=None, indices=[0, 1, 2, 3],
                epoch=0, step=0, global_step=0, default_loss=lambda: None)
    got = recipe.loss(step)
    terms, previous = [], None
    for size in (28, 21, 14):   # largest first; each size distilled from the next larger one
        features = model.forward_head(model.forward_features(resize_batch(images, size)), pre_logits=True)
        term = F.cross_entropy(model.head(features), targets, label_smoothing=0.1)
        if previous is not None:
            term = term + 0.7 * F.smooth_l1_loss(features, F.layer_norm(previous, (32,), eps=1e-6))
        terms.append(term)
        previous = features.detach()
    torch.testing.assert_close(got, sum(terms) / 3)
    got.backward()
    assert model.global_pos.conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("size, grid", [(28, (7, 7)), (14, (4, 4)), (21, (6, 6)), (35, (9, 9)), ((28, 35), (7, 9))])
def test_glpe_takes_any_input_size(size, grid):
    model = _glpe().eval()
    h, w = (size, size) if isinstance(size, int) else size
    with torch.no_grad():
        tokens = model.forward_features(torch.randn(2, 1, h, w))
        logits = model(torch.randn(2, 1, h, w))
    assert tokens.shape == (2, 1 + grid[0] * grid[1], 32) and logits.shape == (2, 10)
    assert model.glpe_state.grid == grid and all(block.attn.state is model.glpe_state for block in model.blocks)


def test_glpe_checkpoint_round_trip_and_default_unchanged(tmp_path):
    from vitlab.checkpoint import save_checkpoint

    model = _glpe().eval()
    for block in model.blocks:   # leave the zero init so the local term matters
        torch.nn.init.normal_(block.attn.local_pe.weight, std=0.1)
    save_checkpoint(model, tmp_path / "glpe")
    loaded = vitlab.create_model(str(tmp_path / "glpe")).eval()
    x = torch.randn(2, 1, 21, 21)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    plain = vitlab.create_model("vl_vit_fmnist", **TINY)
    assert type(plain).__name__ == "VisionTransformer" and plain.pos_embed.shape == (1, 50, 32)
    assert "pos_embed" not in plain.vitlab.arch and "global_pos.conv.weight" not in plain.state_dict()


def test_glpe_refuses_token_reduction():
    with pytest.raises(vitlab.techniques.TechniqueNotApplicable, match="needs the token grid"):
        vitlab.apply_(_glpe(), vitlab.parse_apply(["evit:keep_rate=0.7"]))


@pytest.mark.parametrize("kw, cfg, words", [
    ({}, dict(teacher=None, l1=0.0), "does not take 21x21 inputs.*pos_embed"),
    ({"pos_embed": "glpe"}, dict(teacher="ckpt", l1=0.0), "does not combine with --teacher"),
])
def test_setup_refusals_name_the_fix(kw, cfg, words):
    model = vitlab.create_model("vl_vit_fmnist", **{**TINY, **kw})
    with pytest.raises(RecipeError, match=words):
        parse_recipe("resformer:sizes=28/21").setup(model, None, SimpleNamespace(label_smoothing=0.1, **cfg), None)


_FIT = dict(model="vl_vit_fmnist", model_kwargs=dict(TINY, pos_embed="glpe"), data="synthetic:n=64,classes=10",
            epochs=1, batch_size=16, warmup_epochs=0, eval_val=False, progress=False, threads=1)


def test_training_size_only_equals_plain_training(tmp_path):
    fit(TrainConfig(out=str(tmp_path / "plain"), **_FIT))
    fit(TrainConfig(out=str(tmp_path / "one"), recipe="resformer:sizes=28", **_FIT))
    fit(TrainConfig(out=str(tmp_path / "multi"), recipe="resformer:sizes=28/14", **_FIT))
    plain, one, multi = (load_file(tmp_path / run / "model.safetensors") for run in ("plain", "one", "multi"))
    assert plain.keys() == one.keys() and all(torch.equal(plain[k], one[k]) for k in plain)
    assert max((plain[k] - multi[k]).abs().max().item() for k in plain) > 1e-4


@pytest.mark.slow
def test_two_process_ddp_equals_one_process(tmp_path):
    args = ["train", "--model", "vl_vit_fmnist", "--model-kwargs", json.dumps(dict(TINY, pos_embed="glpe")),
            "--data", "synthetic:n=64,classes=4", "--batch-size", "16", "--epochs", "1", "--no-val", "--no-progress",
            "--threads", "1", "--lr", "0.05", "--opt", "momentum", "--recipe", "resformer:sizes=28/21/14"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for launcher, out in (([], "one"), (["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541"],
                                        "two")):
        done = subprocess.run([sys.executable, *launcher, "-m", "vitlab", *args, "--out", str(tmp_path / out)],
                              env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-4, atol=1e-5, msg=key)
