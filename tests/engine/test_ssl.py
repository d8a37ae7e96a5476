"""Self-supervised pretraining (vitlab/engine/ssl.py): the losses against hand computations, SiT's rotations,
corruption and reconstruction, TOV-VICReg's frame sequences and order labels, and `vitlab pretrain` end to end."""
import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from vitlab import create_model
from vitlab.cli import main
from vitlab.engine.ssl import (SiT, TOVVICReg, corrupt, motion_sequences, nt_xent, off_diagonal,
                               order_verification_batch, rotate, uncertainty_weighted, vicreg_loss, vicreg_terms)


def _hand_vicreg(za: list[list[float]], zb: list[list[float]]) -> tuple[float, float, float]:
    """VICReg's terms with Python floats and loops (main_vicreg.py: unbiased variance, eps 1e-4, gamma 1)."""
    n, d = len(za), len(za[0])
    invariance = sum((a - b) ** 2 for ra, rb in zip(za, zb) for a, b in zip(ra, rb)) / (n * d)
    variance = covariance = 0.0
    for z in (za, zb):
        mean = [sum(row[j] for row in z) / n for j in range(d)]
        cov = [[sum((row[i] - mean[i]) * (row[j] - mean[j]) for row in z) / (n - 1) for j in range(d)]
               for i in range(d)]
        variance += sum(max(0.0, 1 - math.sqrt(cov[j][j] + 1e-4)) for j in range(d)) / d / 2
        covariance += sum(cov[i][j] ** 2 for i in range(d) for j in range(d) if i != j) / d
    return invariance, variance, covariance


def test_vicreg_terms_match_hand_computation():
    gen = torch.Generator().manual_seed(0)
    za = torch.randn(5, 3, generator=gen, dtype=torch.float64) * torch.tensor([0.3, 2.0, 0.8], dtype=torch.float64)
    zb = za + 0.1 * torch.randn(5, 3, generator=gen, dtype=torch.float64)
    terms = vicreg_terms(za, zb)
    inv, var, cov = _hand_vicreg(za.tolist(), zb.tolist())
    assert terms["invariance"].item() == pytest.approx(inv, rel=1e-12)
    assert terms["variance"].item() == pytest.approx(var, rel=1e-12)
    assert terms["covariance"].item() == pytest.approx(cov, rel=1e-12)
    # the hinge: dimension 1 (std ~2) contributes nothing, so the term is below the all-dims value
    assert 0 < terms["variance"].item() < 1
    assert vicreg_loss(za, zb, 25, 25, 1).item() == pytest.approx(25 * inv + 25 * var + cov, rel=1e-12)


def test_vicreg_collapse_and_off_diagonal():
    collapsed = torch.ones(8, 4)
    terms = vicreg_terms(collapsed, collapsed)
    assert terms["variance"].item() == pytest.approx(1 - math.sqrt(1e-4), abs=1e-6)   # the hinge at its maximum
    assert terms["covariance"].item() == 0 and terms["invariance"].item() == 0
    m = torch.arange(9.0).view(3, 3)
    assert off_diagonal(m).tolist() == [1.0, 2.0, 3.0, 5.0, 6.0, 7.0]


def test_nt_xent_matches_official_formula():
    """SiT losses.ContrastiveLoss (1aacd6a), written out: -log(exp(pos/t) / sum over the 2B-1 others)."""
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 6, generator=gen, dtype=torch.float64), torch.randn(4, 6, generator=gen, dtype=torch.float64)
    z = torch.cat([F.normalize(a, dim=1), F.normalize(b, dim=1)])
    sim = F.cosine_similarity(z[:, None], z[None], dim=2)
    positives = torch.cat([torch.diag(sim, 4), torch.diag(sim, -4)])
    denominator = ((~torch.eye(8, dtype=torch.bool)).double() * torch.exp(sim / 0.5)).sum(1)
    official = (-torch.log(torch.exp(positives / 0.5) / denominator)).sum() / 8
    assert nt_xent(a, b, 0.5).item() == pytest.approx(official.item(), rel=1e-10)


def test_uncertainty_weighting():
    loss, s = torch.tensor(2.0), torch.tensor(1.0, requires_grad=True)
    out = uncertainty_weighted(loss, s, 0.5)
    assert out.item() == pytest.approx(math.exp(-0.5) * 2 + 0.5)
    out.backward()   # d/ds = -adj * exp(-adj s) * L + 1/2
    assert s.grad.item() == pytest.approx(-0.5 * math.exp(-0.5) * 2 + 0.5)


def test_rotation_labels_turn_clockwise():
    img = torch.tensor([[1.0, 2.0], [3.0, 4.0]])[None, None].repeat(4, 1, 1, 1)
    out = rotate(img, torch.arange(4))
    assert out[0, 0].tolist() == [[1, 2], [3, 4]]
    assert out[1, 0].tolist() == [[3, 1], [4, 2]]      # 90 degrees clockwise (SiT: orientation 1 = rot90(-1))
    assert out[2, 0].tolist() == [[4, 3], [2, 1]]
    assert out[3, 0].tolist() == [[2, 4], [1, 3]]      # 270 clockwise = 90 anticlockwise


def test_corruption_changes_exactly_the_masked_pixels():
    values = torch.tensor([-1.0, 0.5, 2.0, 3.0])
    images = values[:, None, None, None].expand(4, 1, 12, 12).clone()   # blur leaves a constant image unchanged
    out, mask = corrupt(images, torch.Generator().manual_seed(3))
    assert torch.equal((out - images).abs() > 1e-5, mask[:, None])   # blur rounds a constant by ~1e-7 at most
    assert mask.any() and mask.float().mean() < 0.7
    again, mask2 = corrupt(images, torch.Generator().manual_seed(3))
    assert torch.equal(out, again) and torch.equal(mask, mask2)
    # a replaced block carries another image's value: some masked pixels equal another image's constant
    others = [(out[i][mask[i][None]][:, None] == values[torch.arange(4) != i][None]).any().item() for i in range(4)]
    assert any(others)


def test_sit_reconstructs_a_tiny_image_set():
    torch.manual_seed(0)
    sit = SiT(create_model("vl_test_vit"))
    rot, emb, recon = sit(torch.randn(2, 1, 16, 16))
    assert rot.shape == (2, 4) and emb.shape == (2, 512) and recon.shape == (2, 1, 16, 16)
    images = torch.randn(8, 1, 16, 16).clamp(-1, 1)
    opt = torch.optim.AdamW(sit.parameters(), lr=3e-3)
    first = last = None
    for step in range(40):
        loss, terms = sit.loss(images, torch.Generator().manual_seed(step), fill=-1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = terms["reconstruction"].item() if first is None else first
        last = terms["reconstruction"].item()
    assert last < 0.8 * first


def test_sit_refuses_a_model_without_class_token_grid():
    with pytest.raises(Exception, match="supports timm VisionTransformer"):
        SiT(create_model("test_convnext", in_chans=1))


def test_motion_sequences_move_at_constant_velocity():
    img = torch.zeros(3, 1, 24, 24)
    img[:, :, 10:14, 10:14] = 1.0
    frames = motion_sequences(img, torch.Generator().manual_seed(0), fill=0.0, frames=3, max_angle=0.0)
    assert frames.shape == (3, 3, 1, 24, 24)
    torch.testing.assert_close(frames[:, 1], img)   # the middle frame is the image itself
    ys, xs = torch.meshgrid(torch.arange(24.0), torch.arange(24.0), indexing="ij")
    mass = frames.sum((-1, -2))
    centre = torch.stack([(frames * xs).sum((-1, -2)) / mass, (frames * ys).sum((-1, -2)) / mass], -1)  # (B, T, 1, 2)
    torch.testing.assert_close(centre[:, 2] - centre[:, 1], centre[:, 1] - centre[:, 0], atol=1e-3, rtol=0)
    assert (centre[:, 2] - centre[:, 0]).abs().max() > 0.5


def test_order_verification_labels():
    reps = torch.arange(3.0)[None, :, None].expand(600, 3, 2)   # frame k's representation is k
    shuffled, targets = order_verification_batch(reps, torch.Generator().manual_seed(0))
    in_order = (shuffled.view(600, 3, 2)[:, :, 0] == torch.arange(3.0)).all(1)
    assert torch.equal(targets == 0, in_order)
    assert 0.1 < in_order.float().mean() < 0.25     # one order of 6
    orders = {tuple(row) for row in shuffled.view(600, 3, 2)[:, :, 0].long().tolist()}
    assert orders == set(itertools.permutations(range(3)))


def test_tov_vicreg_loss_runs_on_any_pooled_backbone():
    tov = TOVVICReg(create_model("vl_test_vit"), mlp=(32, 16))
    loss, terms = tov.loss(torch.randn(6, 1, 16, 16), torch.Generator().manual_seed(0), fill=-0.8)
    loss.backward()
    assert set(terms) == {"invariance", "variance", "covariance", "temporal"}
    assert tov.order_head.weight.grad.abs().sum() > 0 and torch.isfinite(loss)


def test_percent_option_is_stratified_and_seeded():
    from vitlab.data import build_dataset

    full = build_dataset("fashion-mnist", "train")
    part = build_dataset("fashion-mnist:percent=10", "train")
    counts, full_counts = torch.bincount(part.targets, minlength=10), torch.bincount(full.targets, minlength=10)
    assert torch.equal(counts, torch.round(full_counts * 0.1).long())
    assert set(part.indices.tolist()) <= set(full.indices.tolist())
    assert torch.equal(part.indices, build_dataset("fashion-mnist:percent=10", "train").indices)
    assert len(build_dataset("fashion-mnist:percent=10", "val")) == 5000
    assert str(part.spec) == "fashion-mnist:percent=10"


@pytest.mark.parametrize("method", ["sit", "tov-vicreg"])
def test_pretrain_checkpoint_loads_and_fine_tunes(tmp_path, method):
    run = tmp_path / "pre"
    assert main(["pretrain", "vl_test_vit", "--method", method, "--data", "synthetic:n=64", "--batch-size", "16",
                 "--epochs", "1", "--out", str(run), "--no-progress", "--threads", "1"]) == 0
    backbone = create_model(str(run))
    fresh = create_model("vl_test_vit", num_classes=10)
    assert backbone.state_dict().keys() == fresh.state_dict().keys()   # the heads are not kept
    torch.manual_seed(0)
    init = create_model("vl_test_vit", num_classes=10)
    assert not torch.equal(backbone.blocks[0].attn.qkv.weight, init.blocks[0].attn.qkv.weight)
    lines = (run / "pretrain.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 4
    assert main(["train", "--init", str(run), "--data", "synthetic:n=64", "--epochs", "1", "--batch-size", "16",
                 "--out", str(tmp_path / "ft"), "--no-progress", "--threads", "1"]) == 0
    tuned = create_model(str(tmp_path / "ft"))
    assert not torch.equal(tuned.head.weight, backbone.head.weight)


def test_pretrain_bad_input(tmp_path, capsys):
    for bad in (["--method", "mae"], ["--method", "sit", "--epochs", "0"]):   # refused by argparse: exit 2
        with pytest.raises(SystemExit) as exit_info:
            main(["pretrain", "vl_test_vit", *bad, "--out", str(tmp_path / "x")])
        assert exit_info.value.code == 2
    assert "--epochs: must be a number > 0, got '0'" in capsys.readouterr().err
    assert main(["pretrain", "test_convnext", "--method", "sit", "--data", "synthetic:n=32", "--model-kwargs",
                 '{"in_chans": 1}', "--out", str(tmp_path / "c")]) == 2
    assert "supports" in capsys.readouterr().err
    run = tmp_path / "r"
    args = ["pretrain", "vl_test_vit", "--method", "sit", "--data", "synthetic:n=32", "--batch-size", "8",
            "--max-steps", "1", "--out", str(run), "--no-progress"]
    assert main(args) == 0
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0


def test_videomae_pretrains_a_video_backbone_that_fine_tunes(tmp_path, capsys):
    run = tmp_path / "vmae"
    data = "moving-fashion-mnist-cls:clips=32"
    assert main(["pretrain", "vl_test_videomae", "--method", "videomae", "--data", data, "--batch-size", "8",
                 "--max-steps", "3", "--out", str(run), "--no-progress", "--threads", "1"]) == 0
    record = json.loads((run / "pretrain.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 3 and record["reconstruction"] > 0
    backbone = create_model(str(run))
    torch.manual_seed(0)
    init = create_model("vl_test_videomae", num_classes=6)
    assert backbone.state_dict().keys() == init.state_dict().keys()   # the decoder is not kept
    assert not torch.equal(backbone.blocks[0].attn.qkv.weight, init.blocks[0].attn.qkv.weight)
    assert main(["train", "--init", str(run), "--data", data, "--epochs", "1", "--batch-size", "8",
                 "--out", str(tmp_path / "ft"), "--no-progress", "--threads", "1", "--no-val"]) == 0
    assert main(["pretrain", "vl_test_videomae", "--method", "videomae", "--data", "synthetic:n=32",
                 "--batch-size", "8", "--out", str(tmp_path / "img"), "--no-progress"]) == 2
    assert "clips" in capsys.readouterr().err
