"""EventTransAct: polarity events from moving Fashion-MNIST (hand-computed rule, static content silent), the event
augmentations, the Event-Contrastive Loss against the official NTXentLoss (fixture), the VTN model (per-frame
backbone, temporal order matters, timm registry) and `vitlab train --recipe ecl`."""
import copy
import json
import math
from pathlib import Path

import pytest
import timm
import torch

import vitlab
from vitlab.data import DataError, DataSpec, build_dataset, dataset_info
from vitlab.data.events import MovingFashionMNISTEvents, event_augment, events_from_frames
from vitlab.data.video import CLS_CLASSES, MovingFashionMNIST, render
from vitlab.engine.ecl import event_contrastive_loss, nt_xent
from vitlab.engine.recipes import RecipeError, parse_recipe

FIXTURE = Path(__file__).parents[1] / "fixtures" / "eventtransact_ecl.json"


# --- events ----------------------------------------------------------------------------------------------------------

def test_polarity_rule_on_a_hand_made_clip():
    """Pixels: a 0 -> .5 -> .5 (up once), b 1 -> .2 -> .2 (down once), c .3 -> .35 -> .3 (below threshold),
    d 0 -> 0 -> 1 (up at t=2). n = floor(|log(I_t + .1) - log(I_{t-1} + .1)| / .2)."""
    frames = torch.tensor([[[0.0, 1.0], [0.3, 0.0]],
                           [[0.5, 0.2], [0.35, 0.0]],
                           [[0.5, 0.2], [0.3, 1.0]]])
    ev = events_from_frames(frames, threshold=0.2)
    assert ev.shape == (2, 2, 2, 2)
    up_a = math.floor(math.log(0.6 / 0.1) / 0.2)       # 8
    down_b = math.floor(-math.log(0.3 / 1.1) / 0.2)    # 6
    up_d = math.floor(math.log(1.1 / 0.1) / 0.2)       # 11
    pos = torch.tensor([[[up_a, 0], [0, 0]], [[0, 0], [0, up_d]]], dtype=torch.float)
    neg = torch.tensor([[[0, down_b], [0, 0]], [[0, 0], [0, 0]]], dtype=torch.float)
    assert torch.equal(ev[0], pos) and torch.equal(ev[1], neg)
    # a higher threshold fires fewer events; half the threshold at least twice as many
    assert events_from_frames(frames, 0.4).sum() < ev.sum() <= events_from_frames(frames, 0.1).sum() / 2


def test_static_content_fires_nothing_and_events_follow_motion():
    ds = MovingFashionMNISTEvents("val", clips=20, frames=4, img_size=64)
    picks, corners = ds.trajectory(1)
    frames = render(ds.source.images[picks, 0], corners).float() / 255   # (5, 64, 64)
    still = frames[:1].expand(5, -1, -1)
    assert events_from_frames(still).abs().sum() == 0
    ev = ds.events(1)
    assert ev.shape == (2, 4, 64, 64) and ev.sum() > 0
    changed = frames.diff(dim=0).abs() > 0                                  # (4, 64, 64)
    assert not (ev.sum(0) > 0)[~changed].any()                            # no event where nothing changed


def test_events_dataset_spec_labels_and_errors():
    spec = DataSpec.parse("moving-fashion-mnist-events:clips=30,frames=4,threshold=0.3")
    assert spec.option("threshold") == 0.3 and DataSpec.parse(str(spec)) == spec
    assert dataset_info(spec)["classes"] == CLS_CLASSES and dataset_info(spec)["native_shape"][0] == 2
    ds = build_dataset(spec, "train", img_size=32, in_chans=2, mean=0.0, std=1.0)
    cls = MovingFashionMNIST("classify", "train", clips=30, frames=5)      # the same clips, one frame longer
    x, y = ds[5]
    assert x.shape == (2, 4, 32, 32) and y == cls[5][1] and (x >= 0).all()
    assert torch.equal(ds.trajectory(5)[1], cls.trajectory(5)[1])
    with pytest.raises(DataError, match="threshold='-1' must be a positive number"):
        DataSpec.parse("moving-fashion-mnist-events:threshold=-1")
    with pytest.raises(DataError, match="in_chans=2"):
        build_dataset("moving-fashion-mnist-events:clips=30", "test", in_chans=1)


def test_event_augment_only_drops_events():
    clip = torch.randint(0, 4, (2, 6, 16, 16)).float()
    assert torch.equal(event_augment(clip, torch.Generator().manual_seed(0), p=0.0), clip)
    dropped = 0
    for seed in range(40):
        out = event_augment(clip, torch.Generator().manual_seed(seed), p=1.0)
        assert torch.equal(out, event_augment(clip, torch.Generator().manual_seed(seed), p=1.0))   # seeded
        assert ((out == clip) | (out == 0)).all()                          # never adds or moves an event
        dropped += int((out != clip).any())
    assert 20 < dropped < 40   # each augmentation fires with its own probability; some draws drop nothing
    out = event_augment(clip, torch.Generator().manual_seed(0), augs=("pol",), p=1.0)
    assert torch.equal(out, clip) or (out[0] == 0).all() or (out[1] == 0).all()


# --- Event-Contrastive Loss ------------------------------------------------------------------------------------------

def test_ecl_matches_the_official_ntxent():
    """Fixture: the official nt_xent_original.py NTXentLoss in train.py's ECL loop (commit in the file)."""
    ref = json.loads(FIXTURE.read_text())
    B, T, S = ref["B"], ref["T"], ref["segments"]
    z1, z2 = (torch.tensor(ref[k]).view(B, T, -1) for k in ("z1", "z2"))
    torch.testing.assert_close(event_contrastive_loss(z1, z2, S, 0.1), torch.tensor(ref["ecl_dot_tau0.1"]),
                               rtol=1e-5, atol=1e-5)
    frames = slice(0, T, S)
    torch.testing.assert_close(nt_xent(z1[0, frames], z2[0, frames], 0.5, cosine=True),
                               torch.tensor(ref["clip0_cosine_tau0.5"]), rtol=1e-5, atol=1e-5)


def test_ntxent_by_hand():
    z1, z2 = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[0.5, 0.5], [1.0, -1.0]])
    z = torch.cat([z1, z2])
    partner = [2, 3, 0, 1]
    terms = []
    for i in range(4):
        others = [j for j in range(4) if j != i]
        s = {j: float(z[i] @ z[j]) / 0.5 for j in others}
        terms.append(-s[partner[i]] + math.log(sum(math.exp(v) for v in s.values())))
    assert nt_xent(z1, z2, 0.5).item() == pytest.approx(sum(terms) / 4, rel=1e-6)
    assert nt_xent(z1[:1], z2[:1]).item() == 0.0   # one pair: the partner is the only other row


# --- model -----------------------------------------------------------------------------------------------------------

def test_registry_and_timm_interface():
    names = timm.list_models("vl_*eventtransact*")
    assert {"vl_eventtransact_b", "vl_eventtransact_mfmnist", "vl_test_eventtransact"} <= set(names)
    model = vitlab.create_model("vl_test_eventtransact").eval()
    assert model.pretrained_cfg["input_size"] == (2, 32, 32) and model.num_frames == 10
    x = torch.randn(3, 2, 10, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (3, 11, 32)                                       # temporal class token + 10 frames
    assert model.forward_head(feats, pre_logits=True).shape == (3, model.head_hidden_size)
    assert model(x).shape == (3, 6)
    model.reset_classifier(4)
    assert model(x).shape == (3, 4)


def test_backbone_is_per_frame_and_temporal_order_matters():
    torch.manual_seed(0)
    model = vitlab.create_model("vl_test_eventtransact").eval()
    frames: list[torch.Tensor] = []
    model.spatial_norm.register_forward_hook(lambda m, a, out: frames.append(out.reshape(2, 10, -1)))
    x = torch.randn(2, 2, 10, 32, 32)
    y = x.clone()
    y[:, :, 4] = torch.randn(2, 2, 32, 32)                                  # change frame 4 only
    with torch.no_grad():
        shuffled = x[:, :, torch.randperm(10, generator=torch.Generator().manual_seed(1))]
        a, b, c = (model.forward_features(v)[:, 0] for v in (x, y, shuffled))   # temporal class token (B, D)
    keep = [t for t in range(10) if t != 4]
    torch.testing.assert_close(frames[0][:, keep], frames[1][:, keep], rtol=0, atol=1e-6)
    assert not torch.allclose(frames[0][:, 4], frames[1][:, 4])
    assert not torch.allclose(a, b, rtol=1e-3, atol=0) and not torch.allclose(a, c, rtol=1e-3, atol=0)   # positions


@pytest.mark.parametrize("text", ["tome:r=1", "evit:keep_rate=0.5", "ptq",
                                  *(pytest.param(t, marks=pytest.mark.slow) for t in
                                    ("prune:target_flops=0.8,importance=l1", "w8a8", "w8", "mctf:r=2", "lpvit"))])
def test_techniques_apply(text, monkeypatch):
    monkeypatch.setenv("VITLAB_ENGINE_TRIAL", "off")
    torch.manual_seed(0)
    model = vitlab.create_model("vl_test_eventtransact", num_classes=10).eval()
    x = torch.randn(2, 2, 10, 32, 32)
    calib = [torch.randn(8, 2, 10, 32, 32)]
    out = vitlab.load(copy.deepcopy(model), [text], calibration=lambda m: calib)(x)   # a model, or w8a8's runner
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_expedit_refuses_by_name():
    model = vitlab.create_model("vl_test_eventtransact")
    with pytest.raises(vitlab.TechniqueNotApplicable, match="supports"):
        vitlab.apply_(model, vitlab.parse_apply(["expedit"]))


# --- training with ECL -----------------------------------------------------------------------------------------------

def test_recipe_options_and_refusals(tmp_path):
    from vitlab.engine.train import TrainConfig

    recipe = parse_recipe("ecl:weight=0.5,segments=2")
    assert recipe.weight == 0.5 and recipe.segments == 2 and recipe.temperature == 0.1
    with pytest.raises(RecipeError, match="temperature"):
        parse_recipe("ecl:temperature=0")
    cfg = TrainConfig(out=str(tmp_path), model="x", data="moving-fashion-mnist-cls:clips=10")
    joint = vitlab.create_model("vl_test_vivit_joint")
    with pytest.raises(RecipeError, match="supports factorised video models"):
        parse_recipe("ecl").setup(joint, None, cfg, None)
    cls_set = build_dataset("moving-fashion-mnist-cls:clips=10", "val", img_size=32)
    with pytest.raises(RecipeError, match="moving-fashion-mnist-events"):
        parse_recipe("ecl").setup(vitlab.create_model("vl_test_vivit"), cls_set, cfg, None)


def test_train_one_step_with_ecl(tmp_path):
    from vitlab.cli import main

    code = main(["train", "--model", "vl_test_eventtransact", "--data", "moving-fashion-mnist-events:clips=20",
                 "--recipe", "ecl", "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "4",
                 "--max-steps", "2", "--threads", "1"])
    assert code == 0
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert log and math.isfinite(log[-1]["train_loss"])
