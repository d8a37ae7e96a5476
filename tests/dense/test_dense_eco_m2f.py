"""ECO-M2F (vitlab.dense.eco_m2f): the early-exit encoder against unmodified HF Mask2Former models, the gate's control
of how many encoder layers run, the derived-dataset labels and the gate fit."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from vitlab.dense import get_head  # noqa: E402
from vitlab.dense.eco_m2f import (EcoMask2Former, ExitGate, build_eco_m2f, exit_loss_weights, fit_gate,  # noqa: E402
                                  ideal_depths, scene_config)
from vitlab.dense.heads import HeadError, build_dense_model  # noqa: E402

K = 6


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


def test_training_output_sums_every_exit_and_trains_every_layer(config):
    from vitlab.data.scenes import FmnistScenes, collate_scenes
    from vitlab.dense.engine import dense_loss
    from vitlab.dense.matching import MaskCriterion

    torch.manual_seed(0)
    model = EcoMask2Former(config).train()
    data = FmnistScenes("train", n=2)
    images, targets = collate_scenes([data[0], data[1]])
    out = model(images)
    assert len(out["aux"]) == (K - 1) + 2       # exits 1..K-1, then exit K's two earlier decoder layers
    loss = dense_loss(out, targets, MaskCriterion(11))
    loss.backward()
    assert torch.isfinite(loss)
    for i, layer in enumerate(model.encoder.layers):
        assert layer.fc2.weight.grad is not None and layer.fc2.weight.grad.abs().sum() > 0, i


def test_ideal_depths_and_loss_weights():
    quality = torch.tensor([[0.2, 0.5, 0.52, 0.53],     # gains after k=2 are below beta
                            [0.1, 0.1, 0.1, 0.9],       # only the last exit segments well
                            [0.4, 0.4, 0.4, 0.4]])      # flat: the shallowest exit
    assert ideal_depths(quality, beta=0.05).tolist() == [2, 4, 1]
    assert ideal_depths(quality, beta=0.0).tolist() == [4, 4, 1]   # ties go to the shallowest exit
    alpha = exit_loss_weights(6)
    assert torch.isclose(alpha.sum(), torch.tensor(1.0)) and bool((alpha.diff() > 0).all())


def test_fit_gate_learns_a_separable_labelling():
    torch.manual_seed(0)
    pooled = torch.randn(60, 8) * 5 + 3                # unstandardised inputs
    depths = torch.where(pooled[:, 0] > 3, 4, 1)
    gate = fit_gate(ExitGate(8, 4), pooled, depths, steps=200, lr=0.05)
    with torch.no_grad():
        assert ((gate(pooled).argmax(1) + 1) == depths).float().mean() >= 0.95


def test_registered_head_builds_and_refuses_plain_vit():
    entry = get_head("eco-m2f", "panoptic")
    assert entry.wraps_model
    model = build_dense_model("hf-swin", "eco-m2f", "panoptic", 11, head_options={"depth": 2, "decoder_layers": 2})
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 1, 64, 64))
    assert out["pred_logits"].shape == (1, 16, 12) and out["pred_masks"].shape == (1, 16, 16, 16)
    with pytest.raises(HeadError, match="supports"):
        build_eco_m2f("vl_vit_fmnist", 11)
    with pytest.raises(HeadError, match="depth=7"):
        build_eco_m2f("hf-swin", 11, depth=7)
    with pytest.raises(HeadError, match="semantic"):
        get_head("eco-m2f", "semantic")
