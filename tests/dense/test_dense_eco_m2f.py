"""ECO-M2F (vitlab.dense.eco_m2f): the early-exit encoder against unmodified HF Mask2Former models, the gate's control
of how many encoder layers run, the exits' loss weights, the derived-dataset utilities, the gate's soft-target loss
against the official code's functions run locally (tests/fixtures/eco_m2f/, GYeow/ECO-M2F@291f1e1) and by hand, and
the gate fit."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vitlab

transformers = pytest.importorskip("transformers")

from vitlab.dense import get_head  # noqa: E402
from vitlab.dense.eco_m2f import (EcoMask2Former, ExitGate, ExitWeightedCriterion, build_eco_m2f,  # noqa: E402
                                  exit_loss_weights, fit_gate, gate_loss, gate_utilities, ideal_depths,
                                  scene_config, soft_gate_targets)
from vitlab.dense.heads import HeadError, build_dense_model, parse_head  # noqa: E402
from vitlab.dense.matching import MaskCriterion  # noqa: E402

K = 6
OFFICIAL = json.loads((Path(__file__).parents[1] / "fixtures" / "eco_m2f" / "official_gate.json").read_text())


@pytest.fixture(scope="module")
def config():
    return scene_config(num_classes=11, encoder_layers=K, decoder_layers=3)


@pytest.fixture(scope="module")
def hf_and_eco(config):
    """An unmodified HF Mask2Former and an ECO-M2F holding the same weights."""
    torch.manual_seed(0)
    hf = transformers.Mask2FormerForUniversalSegmentation(config).eval()
    eco = EcoMask2Former(config).eval()
    eco.m2f.load_state_dict(hf.state_dict())   # same keys: the early-exit encoder holds HF's own layers
    return hf, eco


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 1, 64, 64, generator=torch.Generator().manual_seed(1))


def _layer_counts(eco):
    """Forward hooks on the encoder layers: images each layer processed."""
    counts = [0] * len(eco.encoder.layers)
    handles = [layer.register_forward_hook(lambda m, args, out, i=i: counts.__setitem__(i, counts[i] + len(args[0])))
               for i, layer in enumerate(eco.encoder.layers)]
    return counts, handles


@torch.no_grad()
def test_full_depth_is_bit_identical_to_hf(hf_and_eco, images):
    hf, eco = hf_and_eco
    eco.depth = K
    out = eco(images)
    ref = hf(pixel_values=images, output_auxiliary_logits=True)
    assert torch.equal(out["pred_logits"], ref.class_queries_logits)
    assert torch.equal(out["pred_masks"], ref.masks_queries_logits)
    assert len(out["aux"]) == len(ref.auxiliary_logits) == 2
    for mine, theirs in zip(out["aux"], ref.auxiliary_logits):
        assert torch.equal(mine["pred_logits"], theirs["class_queries_logits"])
        assert torch.equal(mine["pred_masks"], theirs["masks_queries_logits"])
    assert out["depths"].tolist() == [K] * len(images)


@pytest.mark.parametrize("depth", [1, 4])
@torch.no_grad()
def test_exit_at_depth_k_equals_hf_with_k_encoder_layers(hf_and_eco, config, images, depth):
    _, eco = hf_and_eco
    short = transformers.Mask2FormerForUniversalSegmentation(
        scene_config(num_classes=11, encoder_layers=depth, decoder_layers=3)).eval()
    result = short.load_state_dict(eco.m2f.state_dict(), strict=False)
    assert not result.missing_keys
    assert result.unexpected_keys and all(
        any(f"encoder.layers.{i}." in key for i in range(depth, K)) for key in result.unexpected_keys)
    eco.depth = depth
    out, ref = eco(images), short(pixel_values=images)
    assert torch.equal(out["pred_logits"], ref.class_queries_logits)
    assert torch.equal(out["pred_masks"], ref.masks_queries_logits)


@torch.no_grad()
def test_exits_share_one_encoder_pass_and_match_fixed_depths(hf_and_eco, images):
    _, eco = hf_and_eco
    counts, handles = _layer_counts(eco)
    exits = eco.exits(images)
    for h in handles:
        h.remove()
    assert counts == [len(images)] * K          # each layer ran once for the whole batch
    for depth in (2, 5):
        eco.depth = depth
        assert torch.equal(exits[depth - 1]["pred_masks"], eco(images)["pred_masks"])


@torch.no_grad()
def test_gate_choice_controls_layers_run(hf_and_eco, images):
    _, eco = hf_and_eco
    eco.depth = None
    torch.nn.init.zeros_(eco.gate.head.weight)
    eco.gate.head.bias.copy_(torch.arange(K) == 2)   # logit 2: three layers for every image
    counts, handles = _layer_counts(eco)
    out = eco(images)
    assert counts == [3, 3, 3, 0, 0, 0] and out["depths"].tolist() == [3, 3, 3]
    eco.depth = 3
    assert torch.equal(out["pred_masks"], eco(images)["pred_masks"])

    # per-image depths: a gate whose choice depends on the image; layer i runs on the images with depth > i only
    torch.manual_seed(3)
    eco.depth = None
    eco.gate.head.weight.normal_(0, 30.0)
    eco.gate.head.bias.zero_()
    batch = torch.randn(6, 1, 64, 64, generator=torch.Generator().manual_seed(5))
    counts[:] = [0] * K
    out = eco(batch)
    for h in handles:
        h.remove()
    depths = out["depths"]
    assert len(depths.unique()) >= 2
    assert counts == [int((depths > i).sum()) for i in range(K)]
    for b in range(len(batch)):   # each image as if run alone at its depth
        eco.depth = int(depths[b])
        torch.testing.assert_close(out["pred_masks"][b], eco(batch[b:b + 1])["pred_masks"][0], atol=1e-5, rtol=1e-5)
    eco.depth = None


@pytest.fixture(scope="module")
def training_step():
    """A training-mode forward of a 3-layer-encoder ECO-M2F (default exit weights) on two scenes:
    (model, outputs, targets)."""
    from vitlab.data.scenes import FmnistScenes, collate_scenes

    torch.manual_seed(0)
    model = EcoMask2Former(scene_config(num_classes=11, encoder_layers=3, decoder_layers=2, num_queries=4)).train()
    data = FmnistScenes("train", n=2)
    images, targets = collate_scenes([data[0], data[1]])
    return model, model(images), targets


def test_training_output_weights_every_exit_by_depth_and_trains_every_layer(training_step):
    from vitlab.dense.engine import dense_loss, make_criterion

    model, out, targets = training_step
    assert len(out["aux"]) == 2 + 1             # exits 1..2, then exit 3's earlier decoder layer
    # output = exit 3, aux = exits 1..2, then exit 3's decoder aux: the official losses[k] *= i_exit, unnormalised
    assert out["loss_weights"] == [3.0, 1.0, 2.0, 3.0]
    criterion = make_criterion(out, "panoptic", 11)
    assert isinstance(criterion, ExitWeightedCriterion)
    loss = dense_loss(out, targets, criterion)
    loss.backward()
    assert torch.isfinite(loss)
    for i, layer in enumerate(model.encoder.layers):
        assert layer.fc2.weight.grad is not None and layer.fc2.weight.grad.abs().sum() > 0, i
    model.zero_grad(set_to_none=True)


@torch.no_grad()
def test_exit_weighted_criterion_against_per_exit_mask_criterion(training_step):
    _, out, targets = training_step
    plain, weighted = MaskCriterion(11), ExitWeightedCriterion(11)
    entries = [out, *out["aux"]]
    per_entry = [sum(plain({k: e[k] for k in ("pred_logits", "pred_masks")}, targets).values()) for e in entries]
    expected = sum(w * loss for w, loss in zip([3, 1, 2, 3], per_entry))
    torch.testing.assert_close(sum(weighted(out, targets).values()), expected)
    # unit weights (or none): term for term what MaskCriterion returns
    uniform = {**out, "loss_weights": [1.0] * len(entries)}
    reference = plain(out, targets)
    for given in (uniform, {k: v for k, v in out.items() if k != "loss_weights"}):
        mine = weighted(given, targets)
        assert mine.keys() == reference.keys()
        assert all(torch.equal(mine[k], reference[k]) for k in reference)


def test_exit_loss_weights_modes():
    assert exit_loss_weights(6).tolist() == [1, 2, 3, 4, 5, 6]          # k, not k / 21
    assert exit_loss_weights(4, "uniform").tolist() == [1, 1, 1, 1]
    with pytest.raises(HeadError, match="exit_weights='normalized'.*depth"):
        exit_loss_weights(6, "normalized")


def test_ideal_depths():
    quality = torch.tensor([[0.2, 0.5, 0.52, 0.53],     # gains after k=2 are below beta
                            [0.1, 0.1, 0.1, 0.9],       # only the last exit segments well
                            [0.4, 0.4, 0.4, 0.4]])      # flat: the shallowest exit
    assert ideal_depths(quality, beta=0.05).tolist() == [2, 4, 1]
    assert ideal_depths(quality, beta=0.0).tolist() == [4, 4, 1]   # ties go to the shallowest exit


def test_utilities_and_soft_targets_equal_the_official_functions():
    """Official `prepare_gating_targets` (utilities of exits 2..6) and `loss_gates` (MSE of softmaxes), run on the
    fixture's per-image PQ: ours on the same 5 exits give its utilities, and our over-exits loss is its
    `loss_gates` on each image's (exits,) vector (the transposed batch, so its dim 0 is the exits)."""
    quality = torch.tensor(OFFICIAL["quality"], dtype=torch.float64)
    utilities = torch.tensor(OFFICIAL["utilities"], dtype=torch.float64)
    gates = torch.tensor(OFFICIAL["gates"], dtype=torch.float64)
    torch.testing.assert_close(gate_utilities(quality, OFFICIAL["slope"]), utilities, rtol=0, atol=1e-12)
    torch.testing.assert_close(soft_gate_targets(quality, OFFICIAL["slope"]), utilities.softmax(1))
    ours = gate_loss(gates, quality, OFFICIAL["slope"])
    assert ours.item() == pytest.approx(OFFICIAL["loss_over_exits"], rel=1e-6)   # loss_gates computes in float32
    # the code as released softmaxes dim 0 of (B, 5): over the batch; that loss is blind to a per-exit offset of
    # the logits (so the gate's bias gets no gradient), which is why ours takes the softmax over the exits
    literal = F.mse_loss(gates.softmax(0), torch.tensor(OFFICIAL["soft_targets_dim0"], dtype=torch.float64))
    assert literal.item() == pytest.approx(OFFICIAL["loss_literal"], rel=1e-6)
    offset = gates + torch.tensor([3.0, -1.0, 0.5, 2.0, 0.0], dtype=torch.float64)
    assert F.mse_loss(offset.softmax(0), utilities.softmax(0)).item() == pytest.approx(literal.item(), rel=1e-9)
    assert gate_loss(offset, quality, OFFICIAL["slope"]).item() != pytest.approx(ours.item(), rel=1e-3)


def test_gate_loss_by_hand():
    """One image, three exits, beta 0.1: u = (0.6 - 0.1, 0.8 - 0.2, 0.9 - 0.3) = (0.5, 0.6, 0.6)."""
    quality, logits = torch.tensor([[0.6, 0.8, 0.9]]), torch.tensor([[0.0, 1.0, -1.0]])
    t = [math.exp(u) / (math.exp(0.5) + 2 * math.exp(0.6)) for u in (0.5, 0.6, 0.6)]
    p = [math.exp(z) / (1 + math.e + 1 / math.e) for z in (0.0, 1.0, -1.0)]
    soft = sum((a - b) ** 2 for a, b in zip(p, t)) / 3
    assert gate_loss(logits, quality, 0.1).item() == pytest.approx(soft, rel=1e-6)
    hard = -math.log(p[1])                     # ideal depth 2 (tie with 3 goes to the shallower)
    assert gate_loss(logits, quality, 0.1, target="hard").item() == pytest.approx(hard, rel=1e-6)
    with pytest.raises(HeadError, match="target='ce'.*soft"):
        gate_loss(logits, quality, 0.1, target="ce")


def test_exit_gate_equals_official_gating_function():
    """`ExitGate` on the mean of the coarsest level's tokens == official `GatingFunction` on those tokens."""
    gate = ExitGate(8, 5).double()
    with torch.no_grad():
        gate.head.weight.copy_(torch.tensor(OFFICIAL["gate_weight"]))
        gate.head.bias.copy_(torch.tensor(OFFICIAL["gate_bias"]))
        tokens = torch.tensor(OFFICIAL["tokens"], dtype=torch.float64)[:, :OFFICIAL["coarsest_tokens"]]
        torch.testing.assert_close(gate(tokens.mean(1)), torch.tensor(OFFICIAL["gate_out"], dtype=torch.float64))


@pytest.mark.parametrize("target", ["soft", "hard"])
def test_fit_gate_learns_a_separable_labelling(target):
    torch.manual_seed(0)
    pooled = torch.randn(60, 8) * 5 + 3                # unstandardised inputs
    deep = pooled[:, 0] > 3                            # these images segment well at depth 4 only, the others at 1
    quality = torch.where(deep[:, None], torch.tensor([0.1, 0.1, 0.1, 0.9]), torch.tensor([0.9, 0.5, 0.5, 0.5]))
    depths = ideal_depths(quality, 0.05)
    assert depths.tolist() == torch.where(deep, 4, 1).tolist()
    gate = fit_gate(ExitGate(8, 4), pooled, quality, 0.05, target=target, steps=200, lr=0.05)
    with torch.no_grad():
        assert ((gate(pooled).argmax(1) + 1) == depths).float().mean() >= 0.95
        if target == "soft":   # it regresses the soft targets themselves, well below the untrained gate's loss
            assert gate_loss(gate(pooled), quality, 0.05) < 0.3 * gate_loss(torch.zeros(60, 4), quality, 0.05)


def test_registered_head_builds_and_refuses_plain_vit():
    entry = get_head("eco-m2f", "panoptic")
    assert entry.wraps_model
    model = build_dense_model("hf-swin", "eco-m2f", "panoptic", 11, head_options={"depth": 2, "decoder_layers": 2})
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 1, 64, 64))
    assert out["pred_logits"].shape == (1, 16, 12) and out["pred_masks"].shape == (1, 16, 16, 16)
    with pytest.raises(HeadError, match="four backbone stages.*levit_128s.*16, 32, 64"):
        build_eco_m2f("levit_128s", 11)   # three stages: Mask2Former's pixel decoder needs four
    with pytest.raises(HeadError, match="depth=7"):
        build_eco_m2f("hf-swin", 11, depth=7)
    assert parse_head("eco-m2f:exit_weights=uniform", "panoptic")[1] == {"exit_weights": "uniform"}
    with pytest.raises(HeadError, match="exit_weights='sum'"):
        build_eco_m2f("hf-swin", 11, exit_weights="sum")
    with pytest.raises(HeadError, match="semantic"):
        get_head("eco-m2f", "semantic")


def test_any_stage_backbone_and_checkpoint_weights_kept(tmp_path):
    """ECO-M2F over vitlab's stage features: a plain ViT through the simple pyramid, and a classification
    checkpoint whose weights the model starts from (and whose architecture, not folder, the dense record keeps)."""
    from vitlab.checkpoint import record, save_checkpoint
    from vitlab.dense.backbone import Backbone

    vit = build_eco_m2f("vl_vit_fmnist", 11, depth=2, decoder_layers=2).eval()
    with torch.no_grad():
        out = vit(torch.randn(1, 1, 64, 64))
    assert out["pred_masks"].shape == (1, 16, 16, 16)   # the pyramid's finest stride, 4
    swin = vitlab.create_model("swin_tiny_patch4_window7_224", img_size=32, in_chans=1, patch_size=2, window_size=4,
                               embed_dim=24, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], num_classes=10)
    folder = save_checkpoint(swin, tmp_path / "swin")
    model = build_dense_model(str(folder), "eco-m2f", "panoptic", 11, head_options={"depth": 2, "decoder_layers": 2})
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        got = model.eval().backbone_maps(x)
        want = Backbone(str(folder), in_chans=1, img_size=64).eval()(x)
    assert [m.shape[-1] for m in got] == [32, 16, 8, 4]          # patch 2 at 64 px: strides 2 / 4 / 8 / 16
    assert all(torch.equal(a, b) for a, b in zip(got, want))      # HF's init did not touch the checkpoint weights
    assert model(x)["pred_masks"].shape[-1] == 32                 # masks at the finest stride
    with pytest.raises(HeadError, match="needs its backbone"):      # HF's Swin would not give strides 2..16
        EcoMask2Former(scene_config("swin-from-a-folder", strides=(2, 4, 8, 16), decoder_layers=2))
    dense = record(model).dense
    assert dense["backbone"] == "swin_tiny_patch4_window7_224" and dense["backbone_kwargs"]["embed_dim"] == 24


def test_calibrate_gate_fits_the_models_gate_on_the_derived_set(monkeypatch):
    """Steps 2-3 end to end: the derived set's per-image PQ (here one that favours 3 layers on every scene) goes
    through `fit_gate` into `model.gate`, which then picks depth 3; gate_beta / gate_scenes are checked."""
    import vitlab.dense.eco_m2f as eco
    from vitlab.data.scenes import FmnistScenes

    model = build_eco_m2f("hf-swin", 11, decoder_layers=2, num_queries=4).train()
    quality = torch.tensor([0.1, 0.2, 0.9, 0.3, 0.2, 0.1])[:, None].expand(6, 6).clone()   # (K, n): depth 3 best
    monkeypatch.setattr(eco, "per_image_pq", lambda maps, targets, things=10: quality)
    done = eco.calibrate_gate(model, FmnistScenes("train", n=6), 6)
    assert model.training and done["gate_scenes"] == 6 and done["ideal_depth"] == 3.0 and done["gate_depth"] == 3.0
    with pytest.raises(HeadError, match="gate_beta=-1"):
        build_eco_m2f("hf-swin", 11, gate_beta=-1)


def test_vitlab_train_saves_a_fitted_gate(tmp_path):
    """`vitlab train --head eco-m2f` runs steps 2-3 after the last step: the checkpoint's gate is the fitted one,
    not its random initialisation; with a fixed depth there is no gate to fit."""
    from vitlab.cli import main
    from vitlab.data.scenes import FmnistScenes, collate_scenes

    common = ["train", "--task", "panoptic", "--model", "hf-swin", "--data", "fmnist-scenes:n=8", "--steps", "2",
              "--batch-size", "4", "--no-progress"]
    assert main([*common, "--head", "eco-m2f:decoder_layers=2,gate_scenes=4,gate_beta=0.5",
                 "--out", str(tmp_path / "gate")]) == 0
    model = vitlab.create_model(str(tmp_path / "gate")).eval()
    torch.manual_seed(0)
    fresh = build_eco_m2f("hf-swin", 11, decoder_layers=2)
    assert not torch.equal(model.gate.head.weight, fresh.gate.head.weight)
    images, _ = collate_scenes([FmnistScenes("train", n=8)[i] for i in range(4)])
    with torch.no_grad():   # beta 0.5 per layer outweighs any PQ gain: every ideal depth is 1
        assert (model.gate(model.gate_input(model.backbone_maps(images))).argmax(1) == 0).all()
    assert model.gate_beta == 0.5 and model.gate_scenes == 4
