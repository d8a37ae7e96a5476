"""T-TAME: the attention mechanism against the official code, the loss terms against hand-written formulas, training
lowers the loss, save/load round trip, hierarchical and token-reduced models, and the errors."""
import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import vitlab
from vitlab.explain import ExplainError
from vitlab.explain.tame import (TameAttention, TameExplainer, _masked_forward, _tapped, area_loss, load_tame,
                                 save_tame, tame_layers, tame_loss, tame_step_loss, train_tame, variation_loss)

from seed_models import SEED_MODELS, input_shape

FIXTURE = Path(__file__).parents[1] / "fixtures" / "explain" / "tame" / "official_attention.safetensors"


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return vitlab.create_model("vl_test_vit", num_classes=10).eval()


def _images(n: int, shape=(1, 16, 16), seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def test_attention_matches_official_code():
    """Copied weights, same features: the official AttentionTAME's maps and logits, eval and train mode."""
    ref = load_file(str(FIXTURE))
    features = [ref[f"feature.{i}"] for i in range(3)]
    mechanism = TameAttention([f.shape[1] for f in features], num_classes=5, size=(8, 8))
    mechanism.load_state_dict({k[len("state."):]: v for k, v in ref.items() if k.startswith("state.")})
    with torch.no_grad():
        maps, logits = mechanism.eval()(features)
        torch.testing.assert_close(logits, ref["eval.logits"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(maps, ref["eval.maps"], rtol=1e-5, atol=1e-6)
        maps, logits = mechanism.train()(features)
        torch.testing.assert_close(logits, ref["train.logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(variation_loss(ref["eval.maps"]), ref["loss.variation"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(area_loss(ref["eval.maps"]), ref["loss.area"][0], rtol=1e-5, atol=1e-6)


def test_loss_terms_by_hand():
    m = torch.tensor([[[[0.0, 1.0], [1.0, 0.0]]]])               # (1, 1, 2, 2) checkerboard
    # vertical and horizontal squared steps: 2 + 2; each of the four edges holds one 1: 0.3 * 4; / (p=2 * B=1)
    assert variation_loss(m).item() == pytest.approx((2 + 2 + 0.3 * 4) / 2)
    assert area_loss(m).item() == pytest.approx((2 * 0.0005 ** 0.3 + 2 * 1.0005 ** 0.3) / 4)
    logits = torch.tensor([[0.0, math.log(3.0)]])               # softmax (1/4, 3/4)
    total, ce, area, var = tame_loss(logits, torch.tensor([1]), m)
    assert ce.item() == pytest.approx(1.5 * -math.log(0.75))
    assert area.item() == pytest.approx(2 * area_loss(m).item())
    assert var.item() == pytest.approx(0.01 * 2.6)
    assert total.item() == pytest.approx(ce.item() + area.item() + var.item())


def test_layers_come_from_the_contract(vit):
    names = [name for name, _, _ in tame_layers(vit)]
    blocks = [f"blocks.{i}" for i in range(len(vit.blocks))]
    assert names == blocks[-3:]
    swin = SEED_MODELS["swin_tiny_patch4_window7_224"]()
    # two stages of one block each: the last block of each stage
    assert [(n, lay) for n, lay, _ in tame_layers(swin)] == [("layers.0.blocks.0", "nhwc"),
                                                             ("layers.1.blocks.0", "nhwc")]


def test_training_lowers_the_loss(vit):
    data = torch.utils.data.TensorDataset(_images(16), torch.zeros(16, dtype=torch.long))
    torch.manual_seed(0)
    explainer = TameExplainer.for_model(vit, (1, 16, 16))
    images = data.tensors[0]

    def loss_of(e):
        with torch.no_grad():
            return tame_step_loss(e.train(), vit, images)[0].item()

    before = loss_of(copy.deepcopy(explainer))
    train_tame(vit, data, batch_size=16, max_steps=8, lr=0.1, explainer=explainer, progress=False)
    assert loss_of(explainer) < 0.8 * before


def test_save_load_round_trip_is_exact(vit, tmp_path):
    torch.manual_seed(1)
    explainer = TameExplainer.for_model(vit, (1, 16, 16))
    with torch.no_grad():
        for p in explainer.parameters():
            p.normal_()
        for bn in explainer.attention.bns:
            bn.running_mean.normal_()
    path = save_tame(explainer, tmp_path / "e" / "explainer.safetensors")
    loaded = load_tame(tmp_path / "e")
    assert loaded.config == explainer.config
    for (k, a), (k2, b) in zip(explainer.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x = _images(3)
    torch.testing.assert_close(loaded.eval()(vit, x)[2], explainer.eval()(vit, x)[2], rtol=0, atol=0)
    exp = vitlab.explain(vit, x, method="tame", tame=str(path))
    assert exp.maps.shape == (3, 16, 16) and exp.maps.amax().item() == pytest.approx(1.0)


def test_hierarchical_seed_model(tmp_path):
    torch.manual_seed(0)
    model = SEED_MODELS["swin_tiny_patch4_window7_224"]().eval()
    shape = input_shape("swin_tiny_patch4_window7_224", model)
    data = torch.utils.data.TensorDataset(_images(4, shape), torch.zeros(4, dtype=torch.long))
    explainer = train_tame(model, data, batch_size=2, max_steps=2, progress=False)
    assert explainer.config.channels == (24, 48) and explainer.config.map_size == (16, 16)
    path = save_tame(explainer, tmp_path / "swin.safetensors")
    exp = vitlab.explain(model, data.tensors[0][:2], method="tame", tame=str(path))
    assert exp.maps.shape == (2, *shape[1:]) and torch.isfinite(exp.maps).all()


def test_token_reduced_model_maps_merged_tokens_back_to_patches(vit, tmp_path):
    reduced = vitlab.apply_(copy.deepcopy(vit), vitlab.parse_apply(["tome:r=4"]))
    layers = tame_layers(reduced)
    with torch.no_grad(), _tapped(reduced, layers, (16, 16)) as features:
        reduced(_images(1))
        source = reduced.token_state.source[0, :, 1:]             # (N', patches): which patches each token holds
    last = features[-1][0].flatten(1).T                            # (C, gh, gw) -> (patches, C)
    assert source.shape[0] < source.shape[1]                       # tokens were merged
    for row in source:                                             # every patch of a merged token: the same features
        members = row.nonzero()[:, 0]
        assert torch.equal(last[members], last[members[:1]].expand(len(members), -1))
    path = save_tame(TameExplainer.for_model(vit, (1, 16, 16)), tmp_path / "vit.safetensors")
    exp = vitlab.explain(reduced, _images(2), method="tame", tame=str(path))
    assert exp.maps.shape == (2, 16, 16)


def test_errors_say_how_to_train_one(vit, tmp_path):
    with pytest.raises(ExplainError, match="vitlab train-tame"):
        vitlab.explain(vit, _images(1), method="tame")
    with pytest.raises(ExplainError, match="no trained explainer"):
        vitlab.explain(vit, _images(1), method="tame", tame=str(tmp_path / "missing"))
    swin = SEED_MODELS["swin_tiny_patch4_window7_224"]().eval()
    path = save_tame(TameExplainer.for_model(swin, (3, 64, 64)), tmp_path / "swin.safetensors")
    with pytest.raises(ExplainError, match="train one for this model"):
        vitlab.explain(vit, _images(1), method="tame", tame=str(path))


def test_int8_simulated_model_gives_nearly_the_float_maps(vit, tmp_path):
    quantized = vitlab.apply_(copy.deepcopy(vit), vitlab.parse_apply(["ptq"]), calib=[_images(16, seed=3)])
    torch.manual_seed(2)
    path = save_tame(TameExplainer.for_model(vit, (1, 16, 16)), tmp_path / "vit.safetensors")
    x = _images(4, seed=4)
    q = vitlab.explain(quantized, x, method="tame", tame=str(path)).maps.flatten(1)
    f = vitlab.explain(vit, x, method="tame", tame=str(path)).maps.flatten(1)
    assert not torch.equal(q, f)                                   # the fake-quant model was the one looked into
    assert F.cosine_similarity(q - q.mean(1, keepdim=True), f - f.mean(1, keepdim=True)).min() > 0.9


def test_masking_of_preprocessed_input_and_of_raw_pixels():
    images = torch.full((1, 1, 4, 4), 2.0)                        # preprocessed: raw pixel 0.5 + 2 * 0.25 = 1.0
    maps = torch.zeros(1, 3, 2, 2)
    maps[0, 1, :, 1] = 1.0                                         # class 1: keep the right half
    mask = F.interpolate(maps[:, 1:2], size=(4, 4), mode="bilinear", align_corners=False)
    flat = torch.nn.Flatten()                                      # a "backbone" that returns what it sees
    target = torch.tensor([1])
    torch.testing.assert_close(_masked_forward(flat, images, maps, target), (2.0 * mask).flatten(1))
    raw_masked = (1.0 * mask - 0.5) / 0.25
    torch.testing.assert_close(_masked_forward(flat, images, maps, target, ([0.5], [0.25])), raw_masked.flatten(1))
