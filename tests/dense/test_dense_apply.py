"""Techniques on dense models: the DenseModel contract adapter, calibration on scenes, ptq / w8a8 /
prune / expedit on tiny trained semantic-fpn and detr-lite models, and `vitlab eval` / `vitlab measure --apply`."""
import json
from pathlib import Path

import pytest
import torch

import vitlab
from vitlab.techniques import TechniqueNotApplicable, parse_apply

FMNIST = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not FMNIST.is_dir(), reason="Fashion-MNIST idx files not installed")

DATA = "fmnist-scenes:n=16"
TINY_SWIN = dict(window_size=4, embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 2))
HEADS = {"semantic": "semantic-fpn:dim=32", "detection": "detr-lite:num_queries=8,dim=32"}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two runs trained 2 steps on 16 scenes: semantic-fpn and detr-lite over a tiny Swin."""
    from vitlab.dense.engine import DenseTrainConfig, fit_dense

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("dense_apply")
    return {task: fit_dense(DenseTrainConfig(out=str(root / task), task=task, head=head,
                                             backbone="swin_tiny_patch4_window7_224", backbone_kwargs=TINY_SWIN,
                                             data=DATA, steps=2, batch_size=4, progress=False))
            for task, head in HEADS.items()}


def _model(runs, task: str) -> torch.nn.Module:
    from vitlab.dense.engine import load_dense

    return load_dense(runs[task]).eval()


def _calib(model, n: int = 8) -> list[torch.Tensor]:
    from vitlab.bench.measure import calibration_batches

    return calibration_batches(model, DATA, "train", n, batch_size=4)


def _tensors(out: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in out.items() if torch.is_tensor(v)}


def _macs(model) -> int:
    from vitlab.profiling import count_flops

    return count_flops(model, torch.zeros(1, 1, 64, 64)).macs


def test_adapter_prefixes_the_backbone_spec(runs):
    from vitlab.contract import describe

    model = _model(runs, "semantic")
    spec, inner = describe(model), describe(model.backbone.model)
    names = dict(model.named_modules())
    assert spec.family == inner.family == "swin"
    assert [b.name for b in spec.blocks] == [f"backbone.model.{b.name}" for b in inner.blocks]
    assert all(names[b.name] is b.module for b in spec.blocks)
    assert spec.stem == tuple(f"backbone.model.{n}" for n in inner.stem) and all(n in names for n in spec.stem)
    # the head techniques leave alone is the backbone's unused classifier, not the dense head
    assert spec.head == tuple(f"backbone.model.{n}" for n in inner.head) and not any(
        n.startswith("head") for n in spec.head)


def test_calibration_takes_the_scene_images(runs):
    from vitlab.data import build_dense_dataset

    model = _model(runs, "semantic")
    batches = _calib(model)
    scenes = build_dense_dataset(DATA, "train")
    assert [tuple(b.shape) for b in batches] == [(4, 1, 64, 64)] * 2
    first = torch.randperm(len(scenes), generator=torch.Generator().manual_seed(0))[0].item()
    torch.testing.assert_close(batches[0][0], scenes[first][0])   # the seeded subset, images as the dataset gives


@pytest.mark.parametrize("task", sorted(HEADS))
def test_ptq_quantizes_backbone_and_dense_head(runs, task):
    from vitlab.quant import quant_layers

    model = _model(runs, task)
    x = _calib(model)[0]
    with torch.no_grad():
        ref = _tensors(model(x))
    model = vitlab.apply_(model, parse_apply(["ptq"]), calib=_calib(model))
    names = [n for n, _ in quant_layers(model)]
    assert any(n.startswith("backbone.model.layers.") for n in names) and any(n.startswith("head.") for n in names)
    assert not any(n.startswith("backbone.model.head") for n in names)   # the unused classifier stays float
    with torch.no_grad():
        out = _tensors(model(x))
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in ref.items()}
    for k in ref:
        assert torch.isfinite(out[k]).all()
        assert ((out[k] - ref[k]).norm() / ref[k].norm()).item() < 0.2, k   # 8-bit: close to the float model


@pytest.mark.parametrize("task", sorted(HEADS))
def test_w8a8_engine_returns_the_output_dict(runs, task):
    from vitlab.dense.apply import DenseEngineRunner

    model = _model(runs, task)
    x = _calib(model)[0]
    with torch.no_grad():
        ref = _tensors(model(x))
    runner = vitlab.deploy(model, parse_apply(["w8a8:engine=onnxruntime"]), calib=_calib(model))
    assert isinstance(runner, DenseEngineRunner) and runner.engine == "onnxruntime-int8"
    out = runner(x)
    assert set(out) == set(ref) - {"aux"}   # the training-only auxiliary outputs are not exported
    for k, v in out.items():
        assert v.shape == ref[k].shape and torch.isfinite(v).all()
        assert ((v - ref[k]).norm() / ref[k].norm()).item() < 0.2, k
    assert 0 < runner.quant_mac_fraction <= 1


@pytest.mark.parametrize("technique", ["w8", "bf16:engine=torch"])
def test_other_deployments_return_the_output_dict(runs, technique):
    from vitlab.profiling.cpu import has_bf16

    model = _model(runs, "detection")
    if technique.startswith("bf16") and not has_bf16():   # refused by name, never emulated (slower than fp32)
        with pytest.raises(Exception, match="native bf16"):
            vitlab.deploy(model, parse_apply([technique]))
        return
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        ref = _tensors(model(x))
    out = vitlab.deploy(model, parse_apply([technique]))(x)
    assert set(out) == {"pred_logits", "pred_boxes"}
    for k, v in out.items():
        assert v.shape == ref[k].shape and ((v - ref[k]).norm() / ref[k].norm()).item() < 0.1, k


@pytest.mark.parametrize("task", sorted(HEADS))
def test_prune_cuts_backbone_macs_and_keeps_outputs(runs, task):
    model = _model(runs, task)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        ref = _tensors(model(x))
    before, backbone_before = _macs(model), _macs(model.backbone.model)
    vitlab.apply_(model, parse_apply(["prune:importance=l2,target_flops=0.6"]))
    with torch.no_grad():
        out = _tensors(model(x))
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in ref.items()}
    assert all(torch.isfinite(v).all() for v in out.values())
    saved = before - _macs(model)
    assert saved > 0 and saved == backbone_before - _macs(model.backbone.model)   # only the backbone is cut
    assert _macs(model.backbone.model) <= 0.6 * backbone_before * 1.0001


def test_prune_refuses_classifier_scores_by_name(runs):
    model = _model(runs, "semantic")
    with pytest.raises(TechniqueNotApplicable, match=r"prune.*importance=hessian.*supports importance=l1 or l2"):
        vitlab.apply_(model, parse_apply(["prune"]), calib=_calib(model))


@pytest.mark.parametrize("task", sorted(HEADS))
def test_expedit_on_swin_backbone(runs, task):
    model = _model(runs, task)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        ref = _tensors(model(x))
    before = _macs(model)
    vitlab.apply_(model, parse_apply(["expedit:alpha=1,size=2"]))
    with torch.no_grad():
        out = _tensors(model(x))
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in ref.items()}
    assert all(torch.isfinite(v).all() for v in out.values())
    assert _macs(model) < before


def test_expedit_refuses_a_sequence_backbone_by_name():
    model = vitlab.create_model("vl_dense", backbone="vl_test_pvt", head="semantic-fpn", task="semantic",
                                num_classes=11).eval()
    with pytest.raises(TechniqueNotApplicable, match=r"expedit does not apply.*without its H x W grid.*supports"):
        vitlab.apply_(model, parse_apply(["expedit"]))


def test_cli_eval_and_measure_with_apply(runs, capsys):
    from vitlab.cli import main

    run = str(runs["semantic"])
    capsys.readouterr()
    assert main(["eval", run, "--apply", "ptq", "--calib-images", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= result["miou"] <= 1
    assert main(["measure", run, "--data", DATA, "--apply", "w8a8:engine=onnxruntime", "--calib-images", "8",
                 "--batch", "2", "--no-memory", "--min-time", "0.05", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["task_metric"] == "miou" and 0 <= row["task_score"] <= 1
    assert row["techniques"] == "w8a8:engine=onnxruntime" and row["engine"] == "onnxruntime-int8" and row["macs"] > 0
