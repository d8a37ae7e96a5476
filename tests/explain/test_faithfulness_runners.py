"""Faithfulness of a deployed model is scored on its engine, not on the simulated twin its maps come from."""
import math

import pytest
import torch
import torch.nn as nn

import vitlab
from vitlab.explain.faithfulness import (average_drop_increase, deletion_auc, faithfulness, perturbation_curves,
                                         scored_forward)

from test_explain_faithfulness import K, OnePixel   # the one-pixel toy model: p(class 0) = sigmoid(2 K x)


class EngineRunner:
    """A runner as vitlab's engines are: not an nn.Module, called on tensors through numpy (as ONNX Runtime and
    OpenVINO are); its engine reads pixel (0, 0) while its simulated twin reads pixel (1, 1)."""

    def __init__(self):
        self.engine = OnePixel(0, 0)
        self.sim_module = OnePixel(1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.detach().float().contiguous().numpy()
        with torch.no_grad():
            return self.engine(torch.from_numpy(x.copy()))


HI, LO = 1 / (1 + math.exp(-2 * K)), 1 / (1 + math.exp(2 * K))   # p at pixel value +1 and -1


def test_a_runner_is_scored_on_its_engine():
    # 2x2 image, 4 steps (one pixel a step); the map ranks pixel (0, 0) first and (1, 1) last
    runner, image, target = EngineRunner(), torch.ones(1, 1, 2, 2), torch.tensor([0])
    maps = torch.tensor([[[1.0, 0.7], [0.4, 0.0]]])
    curve = perturbation_curves(runner, image, torch.full_like(image, -1.0), maps, target, steps=4)
    torch.testing.assert_close(curve[0], torch.tensor([HI, LO, LO, LO, LO]))        # the engine's pixel goes first
    twin_curve = perturbation_curves(runner.sim_module, image, torch.full_like(image, -1.0), maps, target, steps=4)
    torch.testing.assert_close(twin_curve[0], torch.tensor([HI, HI, HI, HI, LO]))   # the twin's would go last
    assert deletion_auc(runner, image, maps, target, -1.0, steps=4).item() == pytest.approx(
        (HI / 2 + 3 * LO + LO / 2) / 4, abs=1e-6)
    # AD / IC: the map keeps all of the engine's pixel and none of the twin's -> no drop on the engine
    ad, ic = average_drop_increase(runner, image, maps, target)
    assert ad == pytest.approx(0.0) and ic == 0.0
    twin_ad, _ = average_drop_increase(runner.sim_module, image, maps, target)
    assert twin_ad == pytest.approx(100 * (HI - 0.5) / HI, rel=1e-5)                 # p_m = sigmoid(0) on the twin


def test_faithfulness_explains_the_engines_top1():
    # the engine says class 1 (pixel (0, 0) negative), the twin class 0: the default target is the engine's
    runner, image = EngineRunner(), torch.tensor([[[[-1.0, 0.0], [0.0, 1.0]]]])
    scores = faithfulness(runner, image, torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]), steps=4)
    # deleting (0, 0) to the baseline 0 first: p(class 1) goes from HI to 0.5 and stays there
    assert scores.deletion_auc == pytest.approx((HI / 2 + 3 * 0.5 + 0.5 / 2) / 4, abs=1e-6)
    assert scored_forward(runner) is runner
    module = OnePixel(0, 0).train()
    assert scored_forward(module) is module and not module.training


@pytest.mark.slow
def test_w8a8_runner_scores_match_its_engine_called_by_hand():
    # a real ONNX Runtime int8 runner (~25 s to deploy): the deletion curve is the engine's, step by step
    from vitlab.quant import W8A8

    torch.manual_seed(0)
    model = vitlab.create_model("vl_test_vit", num_classes=10).eval()
    runner = vitlab.deploy(model, W8A8(), calib=[torch.randn(8, 1, 16, 16)])
    assert not isinstance(runner, nn.Module)
    images, maps, steps = torch.randn(2, 1, 16, 16), torch.rand(2, 16, 16), 4
    target = runner(images).argmax(-1)
    curves = perturbation_curves(runner, images, torch.zeros(1), maps, target, steps=steps)
    order = torch.argsort(-maps.flatten(1), dim=1, stable=True)                    # (B, HW) most salient first
    for b in range(2):
        for k in range(steps + 1):
            x = images[b].clone().flatten(1)                                       # (C, HW)
            x[:, order[b, :round(k * 256 / steps)]] = 0
            p = runner(x.view(1, 1, 16, 16)).softmax(-1)[0, target[b]]
            assert curves[b, k].item() == pytest.approx(p.item(), abs=1e-6)
