"""GiT (vitlab/agents/git.py): box tokens, grid-point matching, the per-point causal mask, teacher forcing = greedy."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab.errors import UserError
from vitlab.agents import git

pytest.importorskip("torchmetrics")
pytest.importorskip("pycocotools")


def _tiny(grid: int = 3, img_size: int = 32, num_classes: int = 4) -> git.GiT:
    torch.manual_seed(0)
    vit = vitlab.create_model("vl_vit_fmnist", embed_dim=32, depth=1, num_heads=2)
    vit.set_input_size(img_size=img_size)
    return git.GiT(vit, num_classes=num_classes, img_size=img_size, grid=grid, extra_depth=1).eval()


def test_box_tokens_round_trip_within_half_a_bin():
    boxes = torch.rand(1000, 4, generator=torch.Generator().manual_seed(0))
    for num_bins in (128, 2 * 224):
        tokens = git.box_tokens(boxes, num_bins)
        assert tokens.min() >= 0 and tokens.max() <= num_bins
        err = (git.tokens_to_boxes(tokens, num_bins) - boxes).abs().max()
        assert err <= 0.5 / num_bins + 1e-7
    assert git.box_tokens(torch.tensor([-0.2, 1.3]), 10).tolist() == [0, 10]   # clamped into the vocabulary


def test_grid_points_are_cell_centres():
    pts = git.grid_points(2)
    assert torch.equal(pts, torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]))


@pytest.mark.parametrize("seed", range(5))
def test_grid_match_equals_brute_force_assignment(seed):
    gen = torch.Generator().manual_seed(seed)
    points, centres = git.grid_points(2), torch.rand(3, 2, generator=gen)   # 4 points, 3 boxes
    pi, ti = git.grid_match(points, centres)
    cost = torch.cdist(points, centres, p=1)
    got = float(cost[pi, ti].sum())
    best = min(sum(float(cost[p, t]) for t, p in enumerate(perm))
               for perm in itertools.permutations(range(len(points)), len(centres)))
    assert sorted(ti.tolist()) == [0, 1, 2] and len(set(pi.tolist())) == 3
    assert got == pytest.approx(best, abs=1e-6)


def test_git_targets_tokens_residual_and_weights():
    points = git.grid_points(2)
    boxes = torch.tensor([[0.80, 0.30, 0.2, 0.4]])   # nearest to point 1 (0.75, 0.25)
    tokens, weights = git.git_targets(points, boxes, torch.tensor([2]), num_classes=4, num_bins=100)
    assert tokens[:, 0].tolist() == [105, 103, 105, 105]   # class 2 -> 100 + 1 + 2; no object -> 100 + 1 + 4
    assert tokens[1, 1:].tolist() == [55, 55, 20, 40]      # residual (0.05, 0.05) + 0.5, then w, h
    assert weights.tolist() == [[1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 0, 0, 0, 0]]


def test_targets_decode_back_to_the_boxes_within_half_a_bin():
    gen = torch.Generator().manual_seed(1)
    points, nb = git.grid_points(4), 128
    centres = torch.rand(5, 2, generator=gen) * 0.8 + 0.1
    boxes = torch.cat([centres, torch.rand(5, 2, generator=gen) * 0.4 + 0.05], 1)
    tokens, weights = git.git_targets(points, boxes, torch.arange(5), num_classes=10, num_bins=nb)
    matched = weights[:, 1] > 0
    decoded = git.decode_boxes(tokens[matched, 1:], points[matched], nb)
    labels = tokens[matched, 0] - nb - 1
    assert torch.allclose(decoded, boxes[labels], atol=0.5 / nb + 1e-6)


def test_attention_mask_equals_its_rules():
    n_img, n_pts, seq = 3, 2, 4
    mask = git.git_attention_mask(n_img, n_pts, seq)
    length = n_img + n_pts * seq
    assert mask.shape == (length, length)
    for i in range(length):
        for j in range(length):
            if i < n_img:
                want = j < n_img
            else:
                qi, ti = divmod(i - n_img, seq)
                want = j < n_img or (divmod(j - n_img, seq)[0] == qi and (j - n_img) % seq <= ti)
            assert bool(mask[i, j]) == want, (i, j)


def test_decoding_is_causal_and_private_per_grid_point():
    model = _tiny()
    image = torch.randn(1, 1, 32, 32)
    tokens = torch.randint(0, 60, (1, 9, 4))
    base = model(image, tokens)
    later = tokens.clone()
    later[0, 4, 2:] = 7                                      # change point 4's inputs from step 2 on
    out = model(image, later)
    assert torch.allclose(out[0, 4, :3], base[0, 4, :3], atol=1e-5)   # steps 0-2 see inputs 0..1 only
    assert not torch.allclose(out[0, 4, 3:], base[0, 4, 3:])
    others = [q for q in range(9) if q != 4]
    assert torch.allclose(out[0, others], base[0, others], atol=1e-5)  # no other grid point sees point 4


def test_greedy_generation_equals_teacher_forcing_its_own_tokens():
    model = _tiny()
    image = torch.randn(2, 1, 32, 32)
    out = model.generate(image)
    nb = model.num_bins
    assert out["pred_logits"].shape == (2, 9, 5) and out["pred_boxes"].shape == (2, 9, 4)
    cls = out["pred_logits"].argmax(-1) + nb + 1
    coords = torch.round((out["pred_boxes"] - torch.cat([model.points - 0.5, torch.zeros(9, 2)], 1)) * nb).long()
    forced = model(image, torch.cat([cls[..., None], coords[..., :3]], -1))
    assert torch.equal(forced[..., 0, nb + 1:].argmax(-1) + nb + 1, cls)
    assert torch.equal(forced[..., 1:, :nb + 1].argmax(-1), coords)


def test_git_loss_equals_hand_computation():
    torch.manual_seed(0)
    nb, k = 6, 2
    logits = torch.randn(1, 2, 5, nb + 1 + k + 1)
    targets = torch.tensor([[[nb + 2, 1, 2, 3, 4], [nb + 3, 0, 0, 0, 0]]])   # point 0 class 1, point 1 no object
    weights = torch.tensor([[[1.0, 1, 1, 1, 1], [1.0, 0, 0, 0, 0]]])
    want = (F.cross_entropy(logits[0, 0, 0, nb + 1:], torch.tensor(1), reduction="sum")
            + F.cross_entropy(logits[0, 1, 0, nb + 1:], torch.tensor(2), reduction="sum")
            + sum(F.cross_entropy(logits[0, 0, s, :nb + 1], torch.tensor(s), reduction="sum") for s in range(1, 5)))
    assert git.git_loss(logits, targets, weights, nb) == pytest.approx(float(want) / (2 + 4), rel=1e-6)


def test_training_step_lowers_the_loss_and_toy_quick(tmp_path):
    from vitlab.agents import run_toy
    from vitlab.data.scenes import FmnistScenes

    model = _tiny(num_classes=10)   # fmnist-scenes: 10 thing classes
    losses = git.train_detector(model, FmnistScenes("train", n=8, size=32), steps=8, batch_size=4, lr=3e-3)
    assert sum(losses[-3:]) < sum(losses[:3])
    result = run_toy("git", tmp_path, quick=True)
    assert (tmp_path / "metrics.json").exists()
    assert {"git_ap", "detr_ap", "git_params", "detr_params"} <= set(result["metrics"])


def test_muon_keeps_embeddings_and_output_layers_on_its_adamw_fallback():
    model = _tiny()
    fallback = set(git.detector_muon_fallback(model))
    assert fallback == {"vocab", "grid_pos", "seq_pos", "vit.pos_embed", "vit.cls_token"}   # vocab is also the output
    opt = git.detector_optimizer(model, "muon", 1e-3)
    on_fallback = {id(p) for g in opt.param_groups if g.get("use_fallback") for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in on_fallback}
    assert fallback <= names and "extra.0.attn.qkv.weight" not in names and "vit.blocks.0.mlp.fc1.weight" not in names
    assert all(p.ndim < 2 for n, p in model.named_parameters() if n in names - fallback)   # the rest: biases, norms

    detr = git.build("detr", "vl_vit_fmnist", img_size=32)
    fallback = set(git.detector_muon_fallback(detr))
    assert {"head.class_embed.weight", "head.bbox_embed.4.weight", "head.query_embed.weight"} <= fallback
    assert not any("in_proj_weight" in n or ".blocks." in n for n in fallback)
    with pytest.raises(UserError, match="'sgd'"):
        git.detector_optimizer(detr, "sgd", 1e-3)


def test_muon_training_lowers_the_loss():
    from vitlab.data.scenes import FmnistScenes

    model = _tiny(num_classes=10)
    losses = git.train_detector(model, FmnistScenes("train", n=8, size=32), steps=8, batch_size=4, lr=3e-3, opt="muon")
    assert sum(losses[-3:]) < sum(losses[:3])


def test_curve_is_window_means_from_first_to_last_step():
    assert git._curve([4.0, 2.0, 3.0, 1.0], points=2) == [3.0, 2.0]
    assert git._curve([5.0, 1.0, 2.0], points=8) == [5.0, 1.0, 2.0]
    assert git._curve([]) == []


def _stub_training(monkeypatch, seen: dict) -> None:
    """Replace training and scoring by recorders: which head trained at which lr, on which split it was scored."""
    def train(model, dataset, steps, batch_size=8, lr=5e-4, seed=0, opt="adamw"):
        seen.setdefault("lr", {})["git" if isinstance(model, git.GiT) else "detr"] = lr
        seen.setdefault("opt", []).append(opt)
        return [2.0, 1.0]

    def evaluate(model, dataset, limit=None, batch_size=32):
        seen.setdefault("scored", []).append(dataset.split)
        lr = seen["lr"]["git" if isinstance(model, git.GiT) else "detr"]
        return {"ap": lr, "ap50": 2 * lr, "ap75": 0.0}

    monkeypatch.setattr(git, "train_detector", train)
    monkeypatch.setattr(git, "evaluate_detector", evaluate)


def test_sweep_lr_scores_each_lr_on_val_never_test_and_rejects_bad_lrs(monkeypatch):
    seen = {}
    _stub_training(monkeypatch, seen)
    res = git.sweep_lr("git", [1e-3, 2e-3], steps=2, train_scenes=2, val_scenes=2, init="vl_vit_fmnist",
                       batch_size=2, img_size=32, grid=2, extra_depth=1)
    assert res == {1e-3: {"ap": 0.1, "ap50": 0.2, "ap75": 0.0, "curve": [2.0, 1.0]},
                   2e-3: {"ap": 0.2, "ap50": 0.4, "ap75": 0.0, "curve": [2.0, 1.0]}}
    assert seen["scored"] == ["val", "val"]
    for bad in ([], [0.0], [1e-3, -1e-3]):
        with pytest.raises(UserError, match="lrs"):
            git.sweep_lr("git", bad, 1, 2, 2, "vl_vit_fmnist")


def test_compare_trains_each_head_at_its_own_lr(monkeypatch):
    seen = {}
    _stub_training(monkeypatch, seen)
    m = git.compare(steps=2, train_scenes=2, test_scenes=2, init="vl_vit_fmnist", batch_size=2, grid=2,
                    extra_depth=1, img_size=32, git_lr=3e-3, detr_lr=6e-3)
    assert seen["lr"] == {"git": 3e-3, "detr": 6e-3} and seen["scored"] == ["test", "test"]
    assert m["git_lr"] == 3e-3 and m["detr_lr"] == 6e-3 and m["ap_ratio"] == pytest.approx(0.5)
    assert m["git_curve"] == [2.0, 1.0] and m["git_final_loss"] == 1.5
    assert seen["opt"] == ["adamw", "adamw"] and m["opt"] == "adamw"
    git.compare(steps=2, train_scenes=2, test_scenes=2, init="vl_vit_fmnist", img_size=32, heads=("detr",), opt="muon")
    assert seen["opt"][-1] == "muon"
    only = git.compare(steps=2, train_scenes=2, test_scenes=2, init="vl_vit_fmnist", img_size=32, heads=("detr",))
    assert "detr_ap" in only and "git_ap" not in only and "ap_ratio" not in only
    with pytest.raises(UserError, match="heads"):
        git.compare(1, 2, 2, "vl_vit_fmnist", heads=("yolo",))


def test_ground_truth_tokens_score_full_ap50_through_the_benchmark_scoring_path():
    from torchvision.ops import box_convert

    from vitlab.data.scenes import FmnistScenes
    from vitlab.dense.matching import box_inference
    from vitlab.dense.metrics import DenseMetrics

    ds, points, nb = FmnistScenes("test", n=12, size=64), git.grid_points(5), 128
    metrics = DenseMetrics("detection", len(ds.classes))
    for k in range(len(ds)):
        _, target = ds[k]
        tokens, _ = git.git_targets(points, box_convert(target["boxes"] / 64, "xyxy", "cxcywh"), target["labels"],
                                    10, nb)
        logits = torch.full((25, 11), -20.0)
        logits[torch.arange(25), tokens[:, 0] - nb - 1] = 0.0
        boxes = git.decode_boxes(tokens[:, 1:], points, nb)
        metrics.update(box_inference(logits[None], boxes[None], 64), [target])
    out = metrics.compute()
    assert out["ap50"] == pytest.approx(1.0) and out["ap75"] == pytest.approx(1.0) and out["ap"] > 0.95
