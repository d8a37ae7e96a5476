"""TinyViT fast distillation (vitlab/engine/fastkd.py): sparse top-k storage, replay on the student's images and
refusals."""
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import vitlab
from vitlab.checkpoint import default_preprocessing, save_checkpoint
from vitlab.engine import TrainConfig, fit
from vitlab.engine.fastkd import (FastKD, FastKDError, StoreMismatch, dense_targets, load_store, save_teacher_logits,
                                  soft_target_cross_entropy, sparse_topk)
from vitlab.engine.recipes import Recipe, Step, register_recipe

SYNTH = "synthetic:n=64,classes=4"


def _teacher(folder: Path, num_classes: int, seed: int = 0) -> str:
    torch.manual_seed(seed)
    model = vitlab.create_model("vl_test_vit", num_classes=num_classes)
    save_checkpoint(model, folder, preprocessing=default_preprocessing(model))
    return str(folder)


def _train_kw(**kw) -> dict:
    base = dict(model="vl_test_vit", data=SYNTH, epochs=2, batch_size=16, lr=0.05, opt="momentum", warmup_epochs=0,
                hflip=0.0, clip_grad=None, eval_val=False, progress=False, threads=1)
    base.update(kw)
    return base


def _plain_train_set(data: str, model):
    """The training split prepared as `model` expects, without augmentation."""
    from vitlab.data import build_dataset

    pre = default_preprocessing(model)
    return build_dataset(data, "train", img_size=tuple(pre["input_size"][1:]), mean=pre["mean"], std=pre["std"])


def _weights(run) -> dict:
    return load_file(str(Path(run) / "model.safetensors"))


# ---------------------------------------------------------------------------------------------------------------------
# the math

def test_dense_targets_spread_the_rest_uniformly_by_hand():
    values = torch.tensor([[0.6, 0.3], [0.5, 0.5]])
    classes = torch.tensor([[3, 0], [1, 4]], dtype=torch.int16)
    got = dense_targets(values, classes, 5)
    want = torch.tensor([[0.3, 0.1 / 3, 0.1 / 3, 0.6, 0.1 / 3],
                         [0.0, 0.5, 0.0, 0.0, 0.5]])
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("k", [1, 3, 7, 10])
def test_sparse_topk_roundtrip_keeps_topk_and_total_mass(k):
    logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(k)) * 3
    probs = logits.softmax(-1)
    values, classes = sparse_topk(logits, k)
    assert torch.all(values[:, :-1] >= values[:, 1:])                       # sorted, descending
    targets = dense_targets(values, classes, 10)
    torch.testing.assert_close(targets.sum(-1), torch.ones(6))
    torch.testing.assert_close(targets.gather(-1, classes.long()), probs.gather(-1, classes.long()))
    others = torch.ones_like(targets, dtype=torch.bool).scatter_(-1, classes.long(), False)
    if k < 10:   # every class outside the top k gets the same share of the rest
        rest = (1 - probs.gather(-1, classes.long()).sum(-1, keepdim=True)) / (10 - k)
        torch.testing.assert_close(targets[others].view(6, 10 - k), rest.expand(-1, 10 - k))
    else:        # k = C stores the whole distribution
        torch.testing.assert_close(targets, probs)


def test_dense_targets_equal_tinyvits_reconstruction():
    # the official lines (microsoft/Cream@4a13c40 TinyViT/main.py, train_one_epoch_distill_using_saved_logits)
    num_classes, topk = 10, 3
    logits_value, logits_index = sparse_topk(torch.randn(8, num_classes, generator=torch.Generator().manual_seed(0)), 3)
    minor_value = (1.0 - logits_value.sum(-1, keepdim=True)) / (num_classes - topk)
    minor_value = minor_value.repeat_interleave(num_classes, dim=-1)
    outputs_teacher = minor_value.scatter_(-1, logits_index, logits_value)
    torch.testing.assert_close(dense_targets(logits_value, logits_index.to(torch.int16), num_classes), outputs_teacher)


def test_soft_target_cross_entropy_is_timms():
    from timm.loss import SoftTargetCrossEntropy

    logits, targets = torch.randn(5, 7), torch.rand(5, 7).softmax(-1)
    torch.testing.assert_close(soft_target_cross_entropy(logits, targets), SoftTargetCrossEntropy()(logits, targets))


# ---------------------------------------------------------------------------------------------------------------------
# replay: the stored probabilities are the teacher's on the very images the student trains on

CHECKS: list[tuple[Step, torch.Tensor, torch.Tensor, torch.Tensor]] = []


@register_recipe("_test_fastkd_check")
@dataclass
class _CheckedFastKD(FastKD):
    """fastkd that also runs the stored teacher on the step's images, to compare with what it replays."""

    teacher: str = ""

    def setup(self, model, train_set, cfg, rt) -> None:
        super().setup(model, train_set, cfg, rt)
        self.model = vitlab.create_model(self.teacher).eval()

    def loss(self, step: Step) -> torch.Tensor:
        values, classes = self.lookup(step)
        with torch.no_grad():
            online = self.model(step.images)
        CHECKS.append((step, values, classes, online))
        return super().loss(step)


def test_replayed_probabilities_equal_the_teachers_on_the_augmented_images(tmp_path):
    teacher = _teacher(tmp_path / "teacher", 10)
    # Fashion-MNIST with its random crop + flip + erasing: the augmentation the store must reproduce per image
    aug = dict(hflip=0.5, crop_padding=3, re_prob=0.5)
    store = tmp_path / "store"
    manifest = save_teacher_logits(teacher, store, epochs=0.004, batch_size=32, seed=3, topk=3, progress=False, **aug)
    assert manifest["steps"] == 7 and manifest["topk"] == 3 and manifest["settings"]["seed"] == 3
    assert manifest["teacher"]["weights_sha256"] and json.loads((store / "manifest.json").read_text()) == manifest
    CHECKS.clear()
    fit(TrainConfig(out=str(tmp_path / "run"), recipe=f"_test_fastkd_check:store={store},teacher={teacher}",
                    **_train_kw(data="fashion-mnist", epochs=0.004, batch_size=32, seed=3, **aug)))
    assert [c[0].global_step for c in CHECKS] == list(range(7))

    model = vitlab.create_model(teacher).eval()
    plain = _plain_train_set("fashion-mnist", model)
    for step, values, classes, online in CHECKS:
        want_values, want_classes = sparse_topk(online, 3)
        torch.testing.assert_close(values, want_values, rtol=0, atol=1e-5)
        assert torch.equal(classes.long(), want_classes)
    # not vacuous: the same images without augmentation give other teacher probabilities
    step, values, _, _ = CHECKS[0]
    with torch.no_grad():
        unaugmented = model(torch.stack([plain[i][0] for i in step.indices]))
    assert (sparse_topk(unaugmented, 3)[0] - values).abs().max() > 1e-3


@register_recipe("_test_online_dense")
@dataclass
class _OnlineDense(Recipe):
    """The same loss as fastkd with every class stored, but from a teacher forward at every step."""

    teacher: str = ""

    def setup(self, model, train_set, cfg, rt) -> None:
        self.model = vitlab.create_model(self.teacher).eval()

    def loss(self, step: Step) -> torch.Tensor:
        with torch.no_grad():
            targets = self.model(step.images).softmax(-1)
        return soft_target_cross_entropy(step.train_model(step.images), targets)


def test_replay_with_every_class_trains_as_online_distillation(tmp_path):
    teacher = _teacher(tmp_path / "teacher", 4)
    store = tmp_path / "store"
    save_teacher_logits(teacher, store, data=SYNTH, epochs=2, batch_size=16, seed=1, hflip=0.0, topk=4,
                        progress=False)
    replay = fit(TrainConfig(out=str(tmp_path / "replay"), recipe=f"fastkd:store={store}", **_train_kw(seed=1)))
    online = fit(TrainConfig(out=str(tmp_path / "online"), recipe=f"_test_online_dense:teacher={teacher}",
                             **_train_kw(seed=1)))
    plain = fit(TrainConfig(out=str(tmp_path / "plain"), **_train_kw(seed=1)))
    a, b, c = _weights(replay), _weights(online), _weights(plain)
    for key in a:   # 8 steps over 2 epochs: each row of the store went to its own step
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    assert max((a[k] - c[k]).abs().max().item() for k in a) > 1e-3   # the teacher's targets are what trained it


def test_alpha_mixes_in_the_label_loss(tmp_path):
    teacher = _teacher(tmp_path / "teacher", 4)
    store = tmp_path / "store"
    save_teacher_logits(teacher, store, data=SYNTH, epochs=1, batch_size=16, hflip=0.0, topk=2, progress=False)
    recipe = FastKD(store=str(store), alpha=0.25)
    cfg = TrainConfig(out="unused", recipe="fastkd", **_train_kw(epochs=1))
    from vitlab.engine.runtime import Runtime

    model = vitlab.create_model("vl_test_vit", num_classes=4)
    train = _plain_train_set(SYNTH, model)
    recipe.setup(model, train, cfg, Runtime())
    indices = recipe.tensors["indices"][1].tolist()
    images = torch.stack([train[i][0] for i in indices])
    targets = recipe.tensors["labels"][1]
    step = Step(model=model, train_model=model, images=images, targets=targets, soft=None, indices=indices, epoch=0,
                step=1, global_step=1, default_loss=lambda: torch.tensor(0.0))
    logits = model(images)
    soft = dense_targets(recipe.tensors["probs"][1], recipe.tensors["classes"][1], 4)
    want = 0.25 * soft_target_cross_entropy(logits, soft) + 0.75 * F.cross_entropy(logits, targets,
                                                                                   label_smoothing=0.1)
    torch.testing.assert_close(recipe.loss(step), want)


# ---------------------------------------------------------------------------------------------------------------------
# refusals

@pytest.fixture(scope="module")
def synth_store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fastkd")
    teacher = _teacher(root / "teacher", 4)
    store = root / "store"
    save_teacher_logits(teacher, store, data=SYNTH, epochs=2, batch_size=16, hflip=0.0, topk=2, progress=False)
    return store


@pytest.mark.parametrize("change, words", [
    (dict(seed=5), "--seed 5 (the store has 0)"),
    (dict(batch_size=8), "--batch-size 8 (the store has 16)"),
    (dict(epochs=3), "--epochs 3.0 (the store has 2.0)"),
    (dict(hflip=0.5), "--hflip 0.5 (the store has 0.0)"),
    (dict(data="synthetic:n=96,classes=4"), "--data synthetic:n=96,classes=4"),
    (dict(mixup=0.2), "--mixup/--cutmix"),
    (dict(model_kwargs={"img_size": 20}), "(model input size) [1, 20, 20] (the store has [1, 16, 16])"),
])
def test_a_run_with_other_images_is_refused_by_name(tmp_path, synth_store, change, words):
    with pytest.raises(StoreMismatch, match=re.escape(words)):
        fit(TrainConfig(out=str(tmp_path / "run"), recipe=f"fastkd:store={synth_store}", **_train_kw(**change)))
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_store_problems_are_named(tmp_path, synth_store):
    from vitlab.engine.recipes import RecipeError, parse_recipe

    with pytest.raises(RecipeError, match="give store=PATH"):
        parse_recipe("fastkd")
    with pytest.raises(RecipeError, match=r"alpha=1.5 must be in \[0, 1\]"):
        parse_recipe(f"fastkd:store={synth_store},alpha=1.5")
    with pytest.raises(FastKDError, match="holds no teacher-logit store"):
        load_store(tmp_path)
    with pytest.raises(FastKDError, match="cannot be combined with --teacher"):
        fit(TrainConfig(out=str(tmp_path / "r"), recipe=f"fastkd:store={synth_store}",
                        teacher=str(synth_store.parent / "teacher"), distill="soft", **_train_kw()))
    manifest, tensors = load_store(synth_store)
    assert manifest["steps"] == 8 and tensors["probs"].shape == (8, 16, 2) and tensors["classes"].dtype == torch.int16


def test_writing_refuses_and_is_atomic(tmp_path, synth_store, monkeypatch):
    teacher = str(synth_store.parent / "teacher")
    kw = dict(data=SYNTH, epochs=1, batch_size=16, hflip=0.0, progress=False)
    with pytest.raises(FastKDError, match="--topk 5 must be between 1 and the 4 classes"):
        save_teacher_logits(teacher, tmp_path / "s", topk=5, **kw)
    with pytest.raises(FastKDError, match="already exists; choose another --out or pass --overwrite"):
        save_teacher_logits(teacher, synth_store, topk=2, **kw)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(FastKDError, match="holds no teacher-logit store"):
        save_teacher_logits(teacher, tmp_path / "notes", topk=2, overwrite=True, **kw)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    with pytest.raises(FastKDError, match="predicts 4 classes but --data fashion-mnist has 10"):
        save_teacher_logits(teacher, tmp_path / "s", topk=2, **{**kw, "data": "fashion-mnist"})

    import vitlab.engine.fastkd as fastkd

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(fastkd, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_teacher_logits(teacher, tmp_path / "s", topk=2, **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]   # nothing half-written left behind


def test_cli_writes_a_store_and_train_replays_it(tmp_path, synth_store, capsys):
    from vitlab.cli import main

    teacher = str(synth_store.parent / "teacher")
    store = tmp_path / "store"
    args = ["--data", SYNTH, "--epochs", "1", "--batch-size", "16", "--hflip", "0", "--threads", "1"]
    assert main(["distill-logits", teacher, "--out", str(store), "--topk", "3", "--no-progress", *args]) == 0
    assert "stored top-3 teacher probabilities for 4 steps x 16 images" in capsys.readouterr().out
    assert main(["train", "--model", "vl_test_vit", "--out", str(tmp_path / "run"), "--no-val", "--no-progress",
                 "--recipe", f"fastkd:store={store}", *args]) == 0
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert main(["train", "--model", "vl_test_vit", "--out", str(tmp_path / "run2"), "--no-val", "--no-progress",
                 "--recipe", f"fastkd:store={store}", *args[:-2], "--seed", "2"]) == 2
    assert "--seed 2 (the store has 0)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["distill-logits", teacher, "--out", str(tmp_path / "x"), "--topk", "0"])
    assert exit_.value.code == 2
    assert "argument --topk: must be an integer >= 1, got '0'" in capsys.readouterr().err


@pytest.mark.slow
def test_two_process_ddp_replay_equals_one_process(tmp_path, synth_store):
    args = ["train", "--model", "vl_test_vit", "--data", SYNTH, "--batch-size", "16", "--epochs", "2", "--hflip", "0",
            "--no-val", "--no-progress", "--threads", "1", "--lr", "0.05", "--opt", "momentum",
            "--recipe", f"fastkd:store={synth_store}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "vitlab", *args, "--out", str(tmp_path / "one")], check=True, env=env,
                   capture_output=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                    "-m", "vitlab", *args, "--out", str(tmp_path / "two")], check=True, env=env, capture_output=True)
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-4, atol=1e-5, msg=key)
