"""Deletion / insertion AUC and AD / IC against answers worked out by hand and against a naive re-computation."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import vitlab
from vitlab.explain import ExplainError
from vitlab.explain.faithfulness import (auc, average_drop, average_drop_increase, blurred, centre_gaussian_maps,
                                         deletion_auc, faithfulness, increase_in_confidence, insertion_auc,
                                         mean_baseline, perturbation_curves, pixel_baseline, random_maps)

K = 5.0  # the toy model's gain: p(class 0) = sigmoid(2 K x[pixel])


class OnePixel(nn.Module):
    """Reads exactly one pixel (channel 0): logits (K x, -K x), so p(class 0) = sigmoid(2 K x[y, x])."""

    def __init__(self, y: int, x: int):
        super().__init__()
        self.y, self.x = y, x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        v = images[:, 0, self.y, self.x]
        return torch.stack([K * v, -K * v], dim=1)


def _map_with_rank(rank: int, pixel: tuple[int, int], size: int = 4) -> torch.Tensor:
    """A (1, size, size) map whose `pixel` has saliency rank `rank` (0: most salient); the others follow pixel order."""
    others = [i for i in range(size * size) if i != pixel[0] * size + pixel[1]]
    order = others[:rank] + [pixel[0] * size + pixel[1]] + others[rank:]
    values = torch.empty(size * size)
    values[torch.tensor(order)] = torch.linspace(1, 0, size * size)
    return values.view(1, size, size)


HI, LO = 1 / (1 + math.exp(-2 * K)), 1 / (1 + math.exp(2 * K))   # p at pixel value +1 and -1


@pytest.mark.parametrize("rank, deleted_at", [(0, 1), (6, 2), (15, 4)])
def test_deletion_curve_steps_where_the_pixel_goes(rank, deleted_at):
    # 4x4 image, 4 steps: 0, 4, 8, 12, 16 pixels deleted; the pixel of rank r goes at the first step deleting > r
    model, image = OnePixel(1, 2), torch.ones(1, 2, 4, 4)
    maps, target = _map_with_rank(rank, (1, 2)), torch.tensor([0])
    curve = perturbation_curves(model, image, torch.full_like(image, -1.0), maps, target, steps=4)
    expected = [HI if k < deleted_at else LO for k in range(5)]
    torch.testing.assert_close(curve[0], torch.tensor(expected))
    torch.testing.assert_close(deletion_auc(model, image, maps, target, -1.0, steps=4),
                               torch.tensor([np.trapezoid(expected, dx=0.25)], dtype=torch.float32))


def test_perfect_map_is_best_and_reversed_map_is_worst():
    # the toy model reads one pixel of an 8x8 image; 16 steps (4 pixels a step)
    model, image, target = OnePixel(3, 5), torch.ones(1, 1, 8, 8), torch.tensor([0])
    perfect = torch.zeros(1, 8, 8)
    perfect[0, 3, 5] = 1
    reversed_ = 1 - perfect
    steps = 16
    best_deletion = (HI / 2 + LO / 2 + LO * (steps - 1)) / steps     # [HI, LO, ..., LO]
    worst_deletion = (HI / 2 + HI * (steps - 1) + LO / 2) / steps    # [HI, ..., HI, LO]
    scores = {name: (deletion_auc(model, image, m, target, -1.0, steps).item(),
                     insertion_auc(model, image, m, target, -1.0, steps).item())
              for name, m in (("perfect", perfect), ("reversed", reversed_))}
    assert scores["perfect"][0] == pytest.approx(best_deletion, abs=1e-6)
    assert scores["reversed"][0] == pytest.approx(worst_deletion, abs=1e-6)
    assert scores["perfect"][1] == pytest.approx(worst_deletion, abs=1e-6)   # insertion mirrors deletion
    assert scores["reversed"][1] == pytest.approx(best_deletion, abs=1e-6)
    assert scores["perfect"][0] < 0.04 and scores["perfect"][1] > 0.96


def test_curves_match_a_naive_loop_on_a_vit():
    # every (image, step) input built one at a time and run alone, integrated by numpy
    torch.manual_seed(0)
    model = vitlab.create_model("vl_test_vit", num_classes=10).eval()
    images, maps = torch.randn(3, 1, 16, 16), torch.rand(3, 16, 16)
    target, steps = torch.tensor([0, 3, 7]), 5
    baseline = blurred(images, 2.0)
    got = perturbation_curves(model, images, baseline, maps, target, steps, batch_size=7)   # chunks of 1 curve
    for b in range(3):
        order = np.argsort(-maps[b].flatten().numpy(), kind="stable")
        for k in range(steps + 1):
            x = images[b].clone().view(1, -1)                      # (C, HW)
            gone = order[:round(k * 256 / steps)]
            x[:, gone] = baseline[b].reshape(1, -1)[:, gone]
            with torch.no_grad():
                p = model(x.view(1, 1, 16, 16)).softmax(-1)[0, target[b]]
            assert got[b, k].item() == pytest.approx(p.item(), abs=1e-5)
    np.testing.assert_allclose(auc(got).numpy(), np.trapezoid(got.numpy(), dx=1 / steps, axis=1), rtol=1e-6)
    torch.testing.assert_close(perturbation_curves(model, images, baseline, maps, target, steps), got)


def test_average_drop_and_increase_by_hand():
    probs, masked = torch.tensor([0.8, 0.5, 0.2, 0.4]), torch.tensor([0.4, 0.6, 0.2, 0.1])
    # drops: 0.4/0.8 = 0.5, 0 (rise), 0 (equal), 0.3/0.4 = 0.75 -> mean 0.3125; one rise in four
    assert average_drop(probs, masked) == pytest.approx(31.25)
    assert increase_in_confidence(probs, masked) == pytest.approx(25.0)


def test_average_drop_increase_on_the_toy_model():
    # pixel = 0.5: p = sigmoid(5); map keeps m of it (x * m): p_m = sigmoid(10 * 0.5 * m)
    model, target = OnePixel(0, 0), torch.tensor([0, 0, 0])
    images = torch.full((3, 1, 2, 2), 0.5)
    maps = torch.tensor([1.0, 0.5, 0.0]).view(3, 1, 1).expand(3, 2, 2)
    p = 1 / (1 + math.exp(-5))
    p_m = [1 / (1 + math.exp(-5 * m)) for m in (1.0, 0.5, 0.0)]
    ad, ic = average_drop_increase(model, images, maps, target)
    assert ad == pytest.approx(100 * sum(max(0, p - q) / p for q in p_m) / 3, rel=1e-5)
    assert ic == 0.0
    # a negative pixel: keeping less of it raises p(class 0) -> two of three images increase
    ad, ic = average_drop_increase(model, -images, maps, target)
    assert ad == pytest.approx(0.0) and ic == pytest.approx(200 / 3)


def test_faithfulness_scores_and_baselines():
    torch.manual_seed(0)
    model = vitlab.create_model("vl_test_vit", num_classes=10).eval()
    images = torch.randn(4, 1, 16, 16)
    scores = faithfulness(model, images, random_maps(4, (16, 16)), steps=4,
                          deletion_baseline=mean_baseline(images), insertion_baseline=blurred(images, 3.0))
    assert scores.images == 4 and scores.steps == 4
    assert 0 <= scores.deletion_auc <= 1 and 0 <= scores.insertion_auc <= 1
    assert 0 <= scores.average_drop <= 100 and 0 <= scores.increase_in_confidence <= 100
    centre = centre_gaussian_maps(2, (5, 7), sigma=0.25)
    assert centre.shape == (2, 5, 7) and centre[0, 2, 3] == 1 and centre[0, 0, 0] < centre[0, 1, 1] < 1
    torch.testing.assert_close(random_maps(2, (3, 3), seed=1), random_maps(2, (3, 3), seed=1))
    torch.testing.assert_close(mean_baseline(images), images.mean(dim=(0, 2, 3), keepdim=True))


def test_mismatched_maps_are_refused():
    with pytest.raises(ExplainError, match=r"maps \(B, H, W\).*vitlab.explain"):
        deletion_auc(OnePixel(0, 0), torch.ones(2, 1, 4, 4), torch.ones(2, 3, 3), torch.tensor([0, 0]))


def test_black_baseline_masks_the_raw_pixels():
    # T-TAME's official AD / IC: un-normalize, multiply by the map, normalize again
    torch.manual_seed(0)
    model = vitlab.create_model("vl_test_vit", num_classes=10).eval()
    mean, std = (0.286,), (0.353,)
    images, maps, target = torch.randn(5, 1, 16, 16), torch.rand(5, 16, 16), torch.tensor([1, 2, 3, 4, 5])
    raw_masked = ((images * std[0] + mean[0]) * maps[:, None] - mean[0]) / std[0]
    with torch.no_grad():
        p = model(images).softmax(-1)[torch.arange(5), target]
        q = model(raw_masked).softmax(-1)[torch.arange(5), target]
    ad, ic = average_drop_increase(model, images, maps, target, baseline=pixel_baseline(0.0, mean, std))
    assert ad == pytest.approx(float(((p - q).clamp(min=0) / p).mean() * 100), rel=1e-4)
    assert ic == pytest.approx(float((q > p).float().mean() * 100))
