"""vitlab.dense core: stage-feature backbones, the head registry, the dense engine and the product path
(`vitlab train --task ... --head ...`, `vitlab eval`, `vitlab predict`)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn

import vitlab
from vitlab.contract import describe
from vitlab.dense import HeadError, get_head, head_names, parse_head, register_head, register_model_head
from vitlab.dense.backbone import Backbone, BackboneError
from vitlab.dense.heads import _REGISTRY, DetrLite, SemanticFPN, build_dense_model, sine_position_embedding
from vitlab.dense.predict import ALPHA, class_colour, draw_prediction

pytest.importorskip("torchmetrics")
pytest.importorskip("pycocotools")

FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_data = pytest.mark.skipif(not FMNIST.is_dir(), reason="Fashion-MNIST idx files not installed")
REFERENCE = Path(__file__).resolve().parents[2] / "checkpoints" / "fashion-mnist-reference-v2"

# hierarchical backbones, small enough for CPU tests: (name, kwargs)
HIERARCHICAL = {
    "swin_tiny_patch4_window7_224": dict(window_size=4, embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 2)),
    "pvt_v2_b0": dict(embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 2, 2), depths=(1, 1, 1, 1)),
    "convnext_atto": dict(dims=(16, 32, 48, 64)),
    "vl_test_pvt": dict(),
}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------- backbones

@pytest.mark.parametrize("name", sorted(HIERARCHICAL))
def test_hierarchical_backbone_matches_timm_features_only(name):
    kwargs = HIERARCHICAL[name]
    torch.manual_seed(0)
    backbone = Backbone(name, in_chans=1, img_size=64, model_kwargs=kwargs).eval()
    assert not backbone.plain
    # timm's own features_only build of the same architecture reports the same channels and strides
    img = {"img_size": 64} if name.startswith("swin") else {}
    torch.manual_seed(0)   # the same seed builds the same weights: features_only wraps the full model's modules
    reference = timm.create_model(name, features_only=True, in_chans=1, **img, **kwargs).eval()
    assert backbone.channels == reference.feature_info.channels()
    assert backbone.strides == reference.feature_info.reduction()
    x = torch.randn(2, 1, 64, 64)
    maps = backbone(x)
    assert [tuple(m.shape) for m in maps] == [(2, c, 64 // s, 64 // s) for c, s in zip(backbone.channels,
                                                                                         backbone.strides)]
    # the same maps as timm's features_only (its Swin stages are NHWC)
    for ours, theirs in zip(maps, reference(x), strict=True):
        theirs = theirs.permute(0, 3, 1, 2) if name.startswith("swin") else theirs
        torch.testing.assert_close(ours, theirs)
    assert describe(backbone.model).blocks


def test_vit_pyramid_input_is_the_last_block_patch_tokens():
    torch.manual_seed(0)
    backbone = Backbone("vl_test_vit", in_chans=1, img_size=32).eval()
    assert backbone.plain and backbone.strides == [4, 8, 16, 32] and backbone.channels == [32] * 4
    model, x = backbone.model, torch.randn(2, 1, 32, 32)
    # independent: forward_features (stem, position embedding, blocks, final norm), prefix token dropped
    tokens = model.forward_features(x)[:, model.num_prefix_tokens:]              # [B, 64, 32]
    expected = tokens.transpose(1, 2).reshape(2, 32, 8, 8)
    torch.testing.assert_close(backbone.tokens(x)[-1], expected)
    torch.testing.assert_close(backbone.tokens(x)[-1],
                               model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)[-1])
    assert [tuple(m.shape[-2:]) for m in backbone(x)] == [(8, 8), (4, 4), (2, 2), (1, 1)]
    assert describe(model).blocks and describe(model).num_prefix_tokens == 1


def test_vit_patch16_pyramid_is_vitdet():
    """A stride-16 ViT gets ViTDet's scale factors 4, 2, 1, 0.5: two deconvolutions, one, none, a max-pool."""
    backbone = Backbone("vit_tiny_patch16_224", in_chans=1, img_size=64,
                        model_kwargs=dict(depth=1, embed_dim=32, num_heads=2))
    kinds = [[type(m).__name__ for m in level if isinstance(m, (nn.ConvTranspose2d, nn.MaxPool2d))]
             for level in backbone.pyramid.levels]
    assert kinds == [["ConvTranspose2d"] * 2, ["ConvTranspose2d"], [], ["MaxPool2d"]]
    assert [tuple(m.shape[1:]) for m in backbone(torch.randn(1, 1, 64, 64))] == \
        [(32, 16, 16), (32, 8, 8), (32, 4, 4), (32, 2, 2)]


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="reference checkpoint not committed")
def test_backbone_from_classification_checkpoint():
    from safetensors.torch import load_file

    backbone = Backbone(str(REFERENCE), in_chans=1, img_size=64)
    saved = load_file(str(REFERENCE / "model.safetensors"))
    own = backbone.model.state_dict()
    for key in ("blocks.0.attn.qkv.weight", "blocks.3.mlp.fc2.weight", "patch_embed.backbone.0.weight"):
        torch.testing.assert_close(own[key], saved[key])
    assert saved["pos_embed"].shape[1] == 1 + 7 * 7 and own["pos_embed"].shape[1] == 1 + 16 * 16   # resampled
    assert backbone.spec["name"] == "vl_vit_fmnist" and backbone.strides == [4, 8, 16, 32]


def test_backbone_without_stage_features_is_refused():
    with pytest.raises(BackboneError, match="no stage features.*Swin"):
        Backbone(nn.Sequential(nn.Conv2d(1, 4, 3)))
    with pytest.raises(BackboneError, match="pyramid stride 32 exceeds"):
        Backbone("vl_test_vit", img_size=16)


# ----------------------------------------------------------------------------------------------- registry, heads

def test_registry_errors_name_the_choices():
    assert {"semantic-fpn", "detr-lite"} <= set(head_names())
    assert "detr-lite" in head_names("detection") and "semantic-fpn" not in head_names("detection")
    with pytest.raises(HeadError, match=r"unknown head 'nope'; heads for --task semantic: .*semantic-fpn"):
        get_head("nope", "semantic")
    with pytest.raises(HeadError, match=r"'semantic-fpn' supports --task semantic, not detection.*detr-lite"):
        get_head("semantic-fpn", "detection")
    with pytest.raises(HeadError, match="unknown option 'q'; options are num_queries, dim"):
        parse_head("detr-lite:q=3")
    with pytest.raises(HeadError, match="not a valid int"):
        parse_head("detr-lite:num_queries=many")
    entry, options = parse_head("detr-lite:num_queries=7,dim=32")
    assert entry.target is DetrLite and options == {"num_queries": 7, "dim": 32}
    with pytest.raises(ValueError, match="tasks must be"):
        register_head("bad-task", tasks=("classify",))
    with pytest.raises(ValueError, match="already registered"):
        register_head("semantic-fpn", tasks=("semantic",))(type("Other", (nn.Module,), {}))
    assert _REGISTRY["semantic-fpn"].target is SemanticFPN


def test_model_head_gets_the_data_size_and_refuses_backbone_kwargs():
    seen = {}

    def build(backbone_name: str, num_classes: int, img_size: int = 32, width: int = 4) -> nn.Module:
        seen.update(backbone=backbone_name, num_classes=num_classes, img_size=img_size, width=width)
        return nn.Conv2d(1, num_classes, 1)

    register_model_head("toy-wrap", ("semantic",), build)
    try:
        assert list(get_head("toy-wrap").options()) == ["width"]     # img_size comes from the data
        model = build_dense_model("vl_test_vit", "toy-wrap", "semantic", 11, img_size=48, head_options={"width": 8})
        assert seen == {"backbone": "vl_test_vit", "num_classes": 11, "img_size": 48, "width": 8}
        assert model.vitlab.dense["head"] == "toy-wrap" and model.pretrained_cfg["input_size"] == (1, 48, 48)
        with pytest.raises(HeadError, match="drop the backbone kwargs"):
            build_dense_model("vl_test_vit", "toy-wrap", "semantic", 11, backbone_kwargs={"depth": 1})
        with pytest.raises(HeadError, match="unknown option 'img_size'; options are width"):
            build_dense_model("vl_test_vit", "toy-wrap", "semantic", 11, head_options={"img_size": 8})
    finally:
        _REGISTRY.pop("toy-wrap")


def test_muon_leaves_the_prediction_layers_to_adamw():
    """--opt muon: hidden matrices on Muon; class / box outputs (K, K + 1 or 4 channels), tables and 1-D
    parameters on its AdamW fallback, whatever the head."""
    from vitlab.dense.engine import dense_optimizer, prediction_layers

    detr = build_dense_model("vl_test_vit", "detr-lite", "detection", 10)
    assert {"head.class_embed", "head.bbox_embed.4"} <= set(prediction_layers(detr, 10))
    fpn = build_dense_model("vl_test_vit", "semantic-fpn", "semantic", 11)
    assert prediction_layers(fpn, 11) == ("head.predictor",)
    optimizer = dense_optimizer(fpn, "muon", 1e-3, 0.05, 11)
    names = {id(p): n for n, p in fpn.named_parameters()}
    muon_names = {names[id(p)] for g in optimizer.param_groups if not g.get("use_fallback")
                  for p in g["params"] if p.ndim >= 2}     # timm's Muon runs AdamW on 1-D parameters anyway
    assert "head.predictor.weight" not in muon_names
    assert any(n.startswith("head.") and n.endswith(".weight") for n in muon_names)   # the FPN's convolutions
    with pytest.raises(vitlab.errors.UserError, match="takes adamw or muon"):
        dense_optimizer(fpn, "lamb", 1e-3, 0.05, 11)


def test_semantic_fpn_top_down_and_shapes():
    torch.manual_seed(0)
    head = SemanticFPN([8, 16, 32], [4, 8, 16], num_classes=5, dim=16, conv_dim=16)
    feats = [torch.randn(2, 8, 16, 16), torch.randn(2, 16, 8, 8), torch.randn(2, 32, 4, 4)]
    out = head(feats, torch.randn(2, 1, 64, 64))["sem_logits"]
    assert out.shape == (2, 5, 16, 16)
    # the coarsest map reaches the logits through the top-down path: perturbing it changes every output pixel
    feats2 = [feats[0], feats[1], feats[2] + 1.0]
    assert (head(feats2, None)["sem_logits"] - out).abs().amax(1).min() > 0
    # scale heads: the stride-16 level has 2 conv+upsample stages, the finest one conv stage and no upsampling
    ups = [sum(isinstance(m, nn.Upsample) for m in h) for h in head.scale_heads]
    assert ups == [0, 1, 2]


def test_detr_lite_outputs_and_position_embedding():
    torch.manual_seed(0)
    head = DetrLite([8, 16], [4, 8], num_classes=10, num_queries=6, dim=16, depth=2, heads=2, ffn=32)
    out = head([torch.randn(3, 8, 8, 8), torch.randn(3, 16, 4, 4)], torch.randn(3, 1, 32, 32))
    assert out["pred_logits"].shape == (3, 6, 11) and out["pred_boxes"].shape == (3, 6, 4)
    assert len(out["aux"]) == 1 and 0 <= out["pred_boxes"].min() and out["pred_boxes"].max() <= 1
    # DETR's PositionEmbeddingSine(normalize=True) at one position, written out by hand
    pos = sine_position_embedding(2, 3, 8)
    y, x = (1 + 1) / (2 + 1e-6) * 2 * np.pi, (2 + 1) / (3 + 1e-6) * 2 * np.pi   # row 1, column 2
    dim_t = 10000 ** (2 * (np.arange(4) // 2) / 4)
    want = [np.sin(y / dim_t[0]), np.cos(y / dim_t[1]), np.sin(y / dim_t[2]), np.cos(y / dim_t[3]),
            np.sin(x / dim_t[0]), np.cos(x / dim_t[1]), np.sin(x / dim_t[2]), np.cos(x / dim_t[3])]
    torch.testing.assert_close(pos[1 * 3 + 2], torch.tensor(want, dtype=torch.float32))


def test_draw_prediction_overlays_the_class_colour():
    from PIL import Image

    gray = Image.fromarray(np.full((64, 64), 100, np.uint8))
    semantic = torch.full((64, 64), 10)
    semantic[8:20, 30:40] = 3
    names = [str(i) for i in range(10)] + ["background"]
    drawn = np.asarray(draw_prediction(gray, semantic, "semantic", names, model_size=64))
    assert drawn.shape == (256, 256, 3)    # enlarged x4 for legible labels
    want = np.round((1 - ALPHA) * 100 + ALPHA * np.array(class_colour(3))).astype(np.uint8)
    assert (drawn[8 * 4 + 1, 30 * 4 + 1] == want).all() and (drawn[60 * 4, 2] == 100).all()
    boxes = {"boxes": torch.tensor([[4.0, 4.0, 20.0, 30.0]]), "scores": torch.tensor([0.9]),
             "labels": torch.tensor([1])}
    drawn = np.asarray(draw_prediction(gray, boxes, "detection", names, model_size=64))
    assert (drawn[16, 40] == class_colour(1)).all()      # the left edge of the box, scaled x4


# ----------------------------------------------------------------------------------------------- product path

def _scene_png(path: Path) -> np.ndarray:
    from PIL import Image

    from vitlab.data import build_dense_dataset
    from vitlab.data.fashion_mnist import FMNIST_MEAN, FMNIST_STD

    image, _ = build_dense_dataset("fmnist-scenes:n=16", "test")[0]
    pixels = ((image[0] * FMNIST_STD[0] + FMNIST_MEAN[0]) * 255).round().clamp(0, 255).byte().numpy()
    Image.fromarray(pixels).save(path)
    return pixels


@needs_data
def test_cli_semantic_and_detection_train_eval_predict(tmp_path, capsys):
    from vitlab.cli import main
    from vitlab.data.fashion_mnist import FMNIST_MEAN, FMNIST_STD
    from vitlab.dense.engine import load_dense, predict_dense

    pixels = _scene_png(tmp_path / "scene.png")
    common = ["--data", "fmnist-scenes:n=16", "--steps", "3", "--batch-size", "4", "--no-progress"]
    assert main(["train", "--task", "semantic", "--head", "semantic-fpn", "--model", "vl_test_vit",
                 "--out", str(tmp_path / "sem"), *common]) == 0
    assert main(["train", "--task", "detection", "--head", "detr-lite:num_queries=8,dim=32", "--model",
                 "vl_test_pvt", "--out", str(tmp_path / "det"), *common]) == 0
    lines = (tmp_path / "sem" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 3 and "val_miou" in json.loads(lines[-1])
    capsys.readouterr()

    assert main(["eval", str(tmp_path / "sem"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["task"] == "semantic" and 0 <= result["miou"] <= 1 and result["data"] == "fmnist-scenes:n=16"
    assert main(["eval", str(tmp_path / "sem"), "--tta", "flip"]) == 2   # flip TTA is for classifiers
    assert "--tta flip is for classifiers" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "det"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"ap", "ap50", "ap75"} <= set(result)

    # the checkpoint rebuilds through vitlab.create_model, with the architecture recorded (not a folder)
    model = vitlab.create_model(str(tmp_path / "det"))
    config = json.loads((tmp_path / "det" / "config.json").read_text())
    assert config["model"]["name"] == "vl_dense" and config["model"]["kwargs"]["head"] == "detr-lite"
    assert model.vitlab.dense["head_options"] == {"num_queries": 8, "dim": 32}

    out = tmp_path / "pred.png"
    assert main(["predict", str(tmp_path / "sem"), str(tmp_path / "scene.png"), "--out", str(out)]) == 0
    from PIL import Image

    drawn = np.asarray(Image.open(out).convert("RGB"))
    assert drawn.shape == (256, 256, 3)
    # where the model predicts a thing, the class colour is blended in; elsewhere the gray image is unchanged
    sem = load_dense(tmp_path / "sem")
    x = (torch.from_numpy(pixels).float() / 255 - FMNIST_MEAN[0]) / FMNIST_STD[0]
    pred = predict_dense(sem, x[None, None], "semantic")[0]
    colours = torch.tensor([class_colour(c) for c in range(10)] + [(0, 0, 0)], dtype=torch.float32)
    base = torch.from_numpy(pixels).float()[..., None].expand(64, 64, 3)
    want = torch.where((pred == 10)[..., None], base, ((1 - ALPHA) * base + ALPHA * colours[pred]).round())
    got = torch.from_numpy(drawn[2::4, 2::4].astype(np.float32))        # the centre of each enlarged pixel
    close = ((got - want).abs().amax(-1) <= 1).float().mean()
    assert close > 0.95, close     # all but the pixels under the class names' text
    assert main(["predict", str(tmp_path / "det"), str(tmp_path / "scene.png"), "--out", str(tmp_path / "d.png"),
                 "--threshold", "0"]) == 0
    assert (tmp_path / "d.png").stat().st_size > 0

    # an --apply stack: pruning needs no images; quantization calibrates on --data scenes and is refused without
    assert main(["predict", str(tmp_path / "sem"), str(tmp_path / "scene.png"), "--out", str(out), "--apply",
                 "ptq"]) == 2
    assert "--data SPEC" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "sem"), str(tmp_path / "scene.png"), "--out", str(tmp_path / "q.png"),
                 "--apply", "ptq", "--data", "fmnist-scenes:n=16", "--calib-images", "8"]) == 0
    from vitlab.bench.measure import calibration_batches
    from vitlab.dense.predict import draw_prediction
    from vitlab.techniques import apply_, parse_apply

    quant = apply_(sem, parse_apply(["ptq"]), calib=calibration_batches(sem, "fmnist-scenes:n=16", "train", 8))
    with Image.open(tmp_path / "scene.png") as original:
        want = draw_prediction(original, predict_dense(quant, x[None, None], "semantic")[0], "semantic",
                               list(sem.vitlab.checkpoint["config"]["preprocessing"]["class_names"]), model_size=64)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "q.png").convert("RGB")), np.asarray(want.convert("RGB")))


@needs_data
def test_cli_refuses_bad_dense_input(tmp_path, capsys):
    from vitlab.cli import main

    out = ["--out", str(tmp_path / "run")]
    for argv, message in [
        (["--task", "detection", "--head", "semantic-fpn"], "supports --task semantic, not detection"),
        (["--task", "semantic", "--head", "nope"], "unknown head 'nope'; heads for --task semantic"),
        (["--task", "panoptic"], "--task panoptic needs --head NAME; heads for it:"),
        (["--task", "semantic", "--head", "semantic-fpn", "--mixup", "0.2"], "--mixup: for classification only"),
        (["--task", "semantic", "--head", "semantic-fpn", "--opt", "sgd"], "dense training takes adamw or muon"),
        (["--task", "semantic", "--head", "semantic-fpn", "--model", "vl_test_vivit", "--steps", "1",
          "--data", "fmnist-scenes:n=4", "--batch-size", "2"], "'vl_test_vivit' (ViViT) has no stage features"),
    ]:
        code = main(["train", *argv, *out])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("vitlab train: error:"), (argv, err)
        assert message in err, (message, err)
    assert not (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.slow
@needs_data
def test_dense_resume_after_kill_is_bitwise(tmp_path):
    from safetensors.torch import load_file

    args = [sys.executable, "-m", "vitlab", "train", "--task", "semantic", "--head", "semantic-fpn", "--model",
            "vl_test_vit", "--data", "fmnist-scenes:n=16", "--steps", "4", "--eval-every", "2", "--batch-size", "4",
            "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(args + ["--out", str(tmp_path / "full")], env=env, check=True, capture_output=True)
    killed = subprocess.run(args + ["--out", str(tmp_path / "cut")], env={**env, "VITLAB_TEST_KILL_AT": "dense-step-3"},
                            capture_output=True)
    assert killed.returncode != 0
    subprocess.run([sys.executable, "-m", "vitlab", "train", "--resume", str(tmp_path / "cut")],   # a dense run
                   env=env, check=True, capture_output=True)
    full = load_file(str(tmp_path / "full" / "model.safetensors"))
    cut = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert full.keys() == cut.keys() and all(torch.equal(full[k], cut[k]) for k in full)


@pytest.mark.slow
@needs_data
def test_detr_lite_overfits_eight_scenes():
    """Head, Hungarian box criterion and inference agree: 300 steps on 8 scenes reach AP50 1.0 on them."""
    from vitlab.data import build_dense_dataset, collate_scenes
    from vitlab.dense.engine import dense_loss, evaluate_dense, make_criterion

    torch.manual_seed(0)
    scenes = build_dense_dataset("fmnist-scenes:n=8", "train")
    images, targets = collate_scenes([scenes[i] for i in range(8)])
    model = build_dense_model("vl_test_pvt", "detr-lite", "detection", 10, head_options={"num_queries": 10})
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3, weight_decay=1e-4)
    criterion = make_criterion(model(images), "detection", 10)
    for _ in range(300):
        loss = dense_loss(model(images), targets, criterion)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    assert evaluate_dense(model, scenes, "detection")["ap50"] > 0.95
