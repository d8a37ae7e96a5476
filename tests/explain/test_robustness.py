"""Patch perturbations, ECE and temperature scaling against hand computations; `robustness` end to end."""
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import vitlab
from vitlab.explain import ExplainError
from vitlab.explain.robustness import (DEFAULT_SEVERITIES, adversarial_patches, expected_calibration_error,
                                       fit_temperature, occlude, patch_drop, patch_grid, patch_shuffle, robustness)


@pytest.fixture(autouse=True)
def _one_thread():
    """The models here are tiny: one thread is the fastest, and stays fast when the CPUs are shared (two threads
    on an oversubscribed machine made this file 10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _patches(images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) -> (B, gh * gw, C * ph * pw), row-major patches (written independently of the module's)."""
    gh, gw = grid
    b, c, h, w = images.shape
    return F.unfold(images, kernel_size=(h // gh, w // gw), stride=(h // gh, w // gw)).transpose(1, 2)


def test_ece_is_zero_on_a_perfectly_calibrated_toy():
    # 10 predictions at confidence 0.8 of which 8 are right, 4 at 0.5 of which 2 are right: accuracy = confidence
    probs = torch.tensor([[0.8, 0.2]] * 10 + [[0.5, 0.5]] * 4)   # ties go to class 0
    labels = torch.tensor([0] * 8 + [1] * 2 + [0, 0, 1, 1])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-6)


def test_ece_matches_a_hand_computation():
    # bin of 0.9: 4 samples, 2 right (gap 0.4); bin of 0.6: 4 samples, 3 right (gap 0.15) -> 0.5*0.4 + 0.5*0.15
    probs = torch.tensor([[0.9, 0.05, 0.05]] * 4 + [[0.6, 0.3, 0.1]] * 4)
    labels = torch.tensor([0, 0, 1, 2, 0, 0, 0, 1])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.275, abs=1e-6)
    # one bin only: with bins=1 the gaps cancel inside it: |5/8 - (4*0.9 + 4*0.6)/8| = |0.625 - 0.75|
    assert expected_calibration_error(probs, labels, bins=1) == pytest.approx(0.125, abs=1e-6)


def test_temperature_of_overconfident_logits_is_above_one_and_lowers_nll():
    g = _gen(1)
    true_logits = 2 * torch.randn(2000, 5, generator=g)
    labels = torch.multinomial(true_logits.softmax(1), 1, generator=g)[:, 0]   # calibrated at T = 1
    logits = 3 * true_logits                                                 # over-confident by 3x
    t = fit_temperature(logits, labels)
    assert 2.5 < t < 3.5
    nll = F.cross_entropy(logits, labels)
    assert F.cross_entropy(logits / t, labels) < nll - 0.1
    grid = torch.linspace(2.0, 4.0, 81)   # the LBFGS optimum is the NLL minimum over a 0.025 grid
    log_p = (logits[None] / grid[:, None, None]).log_softmax(-1)            # (81, n, classes)
    nll_grid = -log_p.gather(2, labels.expand(81, -1)[:, :, None]).mean((1, 2))   # (81,)
    best = grid[nll_grid.argmin()]
    assert t == pytest.approx(float(best), abs=0.025)


def test_patch_grid_comes_from_the_model_not_a_fixed_16():
    assert patch_grid(vitlab.create_model("vl_test_vit", num_classes=10), (1, 16, 16)) == (4, 4)
    reference = vitlab.create_model("checkpoints/fashion-mnist-reference")   # conv stem, stride 4: 7x7 at 28 px
    assert reference.patch_embed.patch_size == (1, 1)
    assert patch_grid(reference, (1, 28, 28)) == (7, 7)
    swin = vitlab.create_model("swin_tiny_patch4_window7_224", img_size=64, window_size=4, embed_dim=24,
                               depths=(1, 1), num_heads=(1, 2), num_classes=10)
    assert patch_grid(swin, (3, 64, 64)) == (16, 16)


def test_patch_grid_of_a_model_without_contract_is_refused():
    with pytest.raises(ExplainError, match="robustness cannot find the patch grid of Sequential"):
        patch_grid(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten()), (1, 8, 8))


def test_patch_drop_fraction_zero_is_identity_and_one_drops_every_patch():
    images = torch.randn(3, 2, 16, 16, generator=_gen())
    fill = torch.tensor([7.0, -7.0])
    assert torch.equal(patch_drop(images, (4, 4), 0.0, fill, _gen()), images)
    everything = patch_drop(images, (4, 4), 1.0, fill, _gen())
    assert torch.equal(everything, fill[None, :, None, None].expand_as(images))


def test_patch_drop_fills_whole_patches_of_the_grid():
    images = torch.randn(5, 1, 16, 16, generator=_gen())
    out = patch_drop(images, (4, 4), 0.25, torch.tensor([9.0]), _gen(3))
    filled = (_patches(out, (4, 4)) == 9.0)                          # (B, 16, 16 pixels)
    assert torch.equal(filled.all(2), filled.any(2))                  # a patch is filled entirely or not at all
    assert filled.all(2).sum(1).tolist() == [4] * 5                   # round(0.25 * 16) patches per image
    kept = ~filled.all(2)
    assert torch.equal(_patches(out, (4, 4))[kept], _patches(images, (4, 4))[kept])


def test_patch_drop_on_an_uneven_grid_covers_the_image():
    images = torch.randn(2, 1, 10, 10, generator=_gen())
    assert torch.equal(patch_drop(images, (3, 3), 1.0, torch.tensor([0.5]), _gen()), torch.full_like(images, 0.5))


@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_patch_shuffle_is_a_permutation_of_patches(fraction):
    images = torch.randn(4, 3, 16, 12, generator=_gen())
    grid = (4, 3)
    before, after = _patches(images, grid), _patches(patch_shuffle(images, grid, fraction, _gen(2)), grid)
    # each output patch equals exactly one input patch, and every input patch is used once
    match = (after[:, :, None] == before[:, None]).all(-1)           # (B, N out, N in)
    assert (match.sum(2) == 1).all()
    source = match.float().argmax(2)
    assert torch.equal(source.sort(1).values, torch.arange(12).expand(4, 12))
    moved = (source != torch.arange(12)).sum(1)
    assert (moved <= round(fraction * 12)).all() and (moved > 0).all()


def test_occlusion_fills_one_box_of_the_asked_area():
    images = torch.randn(6, 1, 20, 20, generator=_gen())
    out = occlude(images, 0.25, torch.tensor([9.0]), _gen(4))
    box = out == 9.0
    assert box.flatten(1).sum(1).tolist() == [100] * 6                # round(20 * sqrt(0.25))^2 pixels
    rows, cols = box.any(3)[:, 0], box.any(2)[:, 0]                   # a rectangle: 10 rows x 10 columns
    assert rows.sum(1).tolist() == [10] * 6 and cols.sum(1).tolist() == [10] * 6


def test_adversarial_patches_change_only_their_patches_and_raise_the_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).eval()             # a linear classifier on 8x8 images
    images = torch.rand(6, 1, 8, 8, generator=_gen())
    labels = model(images).argmax(1)
    pixel_range = (torch.tensor([0.0]), torch.tensor([1.0]))
    out = adversarial_patches(model, images, labels, (4, 4), 0.25, pixel_range, _gen(5))
    changed = (_patches(out, (4, 4)) != _patches(images, (4, 4))).any(2)   # (B, 16) patches touched
    assert (changed.sum(1) <= 4).all() and changed.any()
    assert out.min() >= 0 and out.max() <= 1
    # a linear model's loss rises with every signed-gradient step: the attack must beat the clean loss
    assert F.cross_entropy(model(out), labels) > F.cross_entropy(model(images), labels) + 0.1


def _toy_data(n: int, seed: int) -> list[tuple[torch.Tensor, int]]:
    g = _gen(seed)
    return [(torch.randn(1, 16, 16, generator=g), int(torch.randint(0, 10, (1,), generator=g))) for _ in range(n)]


def test_robustness_rows_are_seeded_and_the_clean_row_is_the_model_s_accuracy():
    torch.manual_seed(0)
    model = vitlab.create_model("vl_test_vit", num_classes=10).eval()
    test, val = _toy_data(24, 0), _toy_data(24, 1)
    rows = robustness(model, test, val, batch_size=24, name="vl_test_vit")
    assert [(r.perturbation, r.severity) for r in rows] == [("none", 0.0)] + [
        (p, s) for p, levels in DEFAULT_SEVERITIES.items() for s in levels]
    images, labels = torch.stack([x for x, _ in test]), torch.tensor([y for _, y in test])
    with torch.no_grad():
        logits = model(images)
    clean = rows[0]
    assert clean.accuracy == pytest.approx(float((logits.argmax(1) == labels).float().mean()))
    assert clean.nll == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-5)
    assert clean.nll_scaled == pytest.approx(float(F.cross_entropy(logits / clean.temperature, labels)), rel=1e-5)
    assert clean.grid == (4, 4) and all(math.isfinite(r.ece_scaled) for r in rows)
    few = {"drop_mean": (0.5,), "occlusion": (0.5,)}
    again = robustness(model, test, val, severities=few, batch_size=24, name="vl_test_vit")
    assert again == [rows[0], rows[6], rows[12]]                         # same seed: the same perturbed images
    other = robustness(model, test, val, severities=few, batch_size=24, name="vl_test_vit", seed=1)
    assert [r.nll for r in other[1:]] != [r.nll for r in again[1:]]


@pytest.mark.parametrize("technique", ["tome:r=2", "prune:target_flops=0.8", "ptq"])
def test_robustness_runs_on_compressed_variants(technique):
    torch.manual_seed(0)
    model = vitlab.create_model("vl_test_vit", num_classes=10).eval()
    test, val = _toy_data(8, 0), _toy_data(8, 1)
    model = vitlab.apply_(model, vitlab.parse_apply([technique]), calib=[torch.stack([x for x, _ in val])])
    rows = robustness(model, test, val, severities={"shuffle": (1.0,)}, batch_size=8)
    assert len(rows) == 2 and rows[0].grid == (4, 4)
    assert all(0.0 <= r.accuracy <= 1.0 and r.temperature > 0 for r in rows)


def test_cli_robustness_writes_the_table(tmp_path, capsys):
    from vitlab.cli import main

    out = tmp_path / "table.json"
    assert main(["robustness", "checkpoints/fashion-mnist-reference", "--data", "fashion-mnist", "--limit", "40",
                 "--val-limit", "40", "--perturbations", "shuffle", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["perturbation"] == "none" and rows[0]["n"] == 40 and rows[0]["grid"] == [7, 7]
    assert rows[0]["accuracy"] > 0.7                              # the 89.6 % model on clean images
    assert [r["perturbation"] for r in rows] == ["none"] + ["shuffle"] * 3
    assert "patch grid 7x7" in capsys.readouterr().out
    assert main(["robustness", "checkpoints/fashion-mnist-reference", "--perturbations", "blur"]) == 2
    assert "--perturbations blur: choose from drop_zero" in capsys.readouterr().err
