"""Hungarian matching against brute force, the mask and box criteria on perfect and random predictions, inference
that reproduces the targets, and torchmetrics' PQ / mIoU / AP on cases counted by hand."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from vitlab.data.scenes import BACKGROUND, NUM_CLASSES, NUM_THINGS, FmnistScenes, collate_scenes
from vitlab.dense.matching import (BoxCriterion, MaskCriterion, box_inference, hungarian_match, inference,
                                   panoptic_inference, segments, semantic_inference)
from vitlab.errors import UserError

pytest.importorskip("torchmetrics")
from vitlab.dense.metrics import DenseMetrics  # noqa: E402

BIG = 20.0  # a logit that makes a probability 1 - 2e-9


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, list[dict]]:
    scenes = FmnistScenes("val", n=4, size=32, max_items=4)
    return collate_scenes([scenes[k] for k in range(4)])


def _brute_force(cost: torch.Tensor) -> float:
    """The least total cost of giving each of the N columns its own row of a (Q, N) matrix, by enumeration."""
    Q, N = cost.shape
    return min(sum(float(cost[r, c]) for c, r in enumerate(rows)) for rows in itertools.permutations(range(Q), N))


def test_hungarian_equals_brute_force():
    gen = torch.Generator().manual_seed(0)
    for Q, N in [(4, 4), (6, 3), (5, 1), (7, 5), (3, 0)]:
        cost = torch.rand(Q, N, generator=gen)
        (rows, cols), = hungarian_match([cost])
        assert len(rows) == N and len(set(rows.tolist())) == N and sorted(cols.tolist()) == list(range(N))
        assert float(cost[rows, cols].sum()) == pytest.approx(_brute_force(cost) if N else 0.0, abs=1e-6)


def _perfect_masks(targets: list[dict], task: str, queries: int, order=None) -> dict:
    """Mask-classification outputs that predict every segment exactly (query q <- segment order[q]), no-object else."""
    logits = torch.full((len(targets), queries, NUM_CLASSES + 1), -BIG)
    logits[..., -1] = BIG
    size = targets[0]["semantic"].shape
    masks = torch.full((len(targets), queries, *size), -BIG)
    for b, target in enumerate(targets):
        labels, segs = segments(target, task, BACKGROUND)
        slots = order[:len(labels)] if order is not None else range(len(labels))
        for q, label, seg in zip(slots, labels.tolist(), segs):
            logits[b, q] = -BIG
            logits[b, q, label] = BIG
            masks[b, q] = torch.where(seg, BIG, -BIG)
    return {"pred_logits": logits, "pred_masks": masks}


@pytest.mark.parametrize("task", ["panoptic", "semantic"])
def test_mask_criterion_is_zero_for_perfect_predictions(batch, task):
    _, targets = batch
    order = torch.randperm(8, generator=torch.Generator().manual_seed(1))  # segments in shuffled query slots
    perfect = _perfect_masks(targets, task, 8, order.tolist())
    criterion = MaskCriterion(NUM_CLASSES, task=task)
    losses = criterion({**perfect, "aux": [perfect]}, targets)
    assert float(sum(losses.values())) < 1e-5 and {"loss_ce_0", "loss_mask_0", "loss_dice_0"} <= set(losses)
    for b, (q, t) in enumerate(criterion.match(perfect, targets)):
        assert q.tolist() == order[t].tolist()  # each segment matched to the query that predicts it
    # swapping two predicted masks in one scene costs something
    swapped = {k: v.clone() for k, v in perfect.items()}
    swapped["pred_masks"][0, order[[0, 1]]] = perfect["pred_masks"][0, order[[1, 0]]]
    assert float(sum(criterion(swapped, targets).values())) > 1.0


def _pair_cost(logits, mask, label, target, weights) -> float:
    """Mask2Former's matching cost of one (query, segment) pair, written out per pair."""
    prob = logits.softmax(-1)[label]
    bce = F.binary_cross_entropy_with_logits(mask, target.float())
    p = mask.sigmoid()
    dice = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    return float(weights["loss_ce"] * -prob + weights["loss_mask"] * bce + weights["loss_dice"] * dice)


def test_mask_criterion_matches_the_hungarian_optimum(batch):
    _, targets = batch
    gen = torch.Generator().manual_seed(2)
    outputs = {"pred_logits": torch.randn(4, 7, NUM_CLASSES + 1, generator=gen, requires_grad=True),
               "pred_masks": torch.randn(4, 7, 8, 8, generator=gen, requires_grad=True)}  # upsampled to 32 x 32
    criterion = MaskCriterion(NUM_CLASSES)
    masks = F.interpolate(outputs["pred_masks"].detach(), size=(32, 32), mode="bilinear", align_corners=False)
    for b, (q, t) in enumerate(criterion.match(outputs, targets)):
        labels, segs = segments(targets[b], "panoptic", BACKGROUND)
        cost = torch.tensor([[_pair_cost(outputs["pred_logits"][b, i].detach(), masks[b, i], labels[j], segs[j],
                                         criterion.weights) for j in range(len(labels))] for i in range(7)])
        assert float(cost[q, t].sum()) == pytest.approx(_brute_force(cost), abs=1e-4)
    losses = criterion(outputs, targets)
    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice"}
    unweighted = {k: v.detach() / criterion.weights[k] for k, v in losses.items()}
    assert float(unweighted["loss_dice"]) < 1 and float(unweighted["loss_mask"]) > 0.5  # random masks: BCE ~ 0.9
    sum(losses.values()).backward()
    assert outputs["pred_logits"].grad.abs().sum() > 0 and outputs["pred_masks"].grad.abs().sum() > 0


def _perfect_boxes(targets: list[dict], queries: int, order: list[int]) -> dict:
    size = targets[0]["semantic"].shape[-1]
    logits = torch.full((len(targets), queries, NUM_THINGS + 1), -BIG)
    logits[..., -1] = BIG
    boxes = torch.rand(len(targets), queries, 4, generator=torch.Generator().manual_seed(3)) * 0.5 + 0.25
    for b, target in enumerate(targets):
        for q, label, box in zip(order, target["labels"].tolist(), target["boxes"]):
            logits[b, q] = -BIG
            logits[b, q, label] = BIG
            x0, y0, x1, y1 = (box / size).tolist()
            boxes[b, q] = torch.tensor([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0])
    return {"pred_logits": logits, "pred_boxes": boxes}


@pytest.mark.parametrize("focal", [False, True])
def test_box_criterion_and_inference(batch, focal):
    _, targets = batch
    order = [5, 2, 7, 0, 3, 1]
    perfect = _perfect_boxes(targets, 8, order)
    criterion = BoxCriterion(NUM_THINGS, focal=focal)
    losses = criterion({**perfect, "aux": [perfect]}, targets)
    assert float(losses["loss_bbox"]) < 1e-6 and float(losses["loss_giou"]) < 1e-6 and "loss_giou_0" in losses
    assert float(losses["loss_ce"]) < (1e-5 if not focal else 1e-3) and len(losses) == 6
    for b, (q, t) in enumerate(criterion.match(perfect, targets)):
        assert q.tolist() == [order[i] for i in t.tolist()]
    detections = box_inference(perfect["pred_logits"], perfect["pred_boxes"], 32, focal=focal)
    torch.testing.assert_close(detections[0]["boxes"][order[:len(targets[0]["boxes"])]], targets[0]["boxes"])
    metrics = DenseMetrics("detection", NUM_CLASSES)
    metrics.update(detections, targets)
    assert metrics.compute()["ap"] == pytest.approx(1.0)
    shifted = [dict(d, boxes=d["boxes"] + 3.0) for d in detections]  # every box 3 px off: fewer true positives
    metrics.reset()
    metrics.update(shifted, targets)
    assert metrics.compute()["ap"] < 0.9


def test_panoptic_and_semantic_inference_reproduce_targets(batch):
    _, targets = batch
    perfect = _perfect_masks(targets, "panoptic", 8)
    panoptic = panoptic_inference(perfect["pred_logits"], perfect["pred_masks"], 32)
    assert torch.equal(panoptic, torch.stack([t["panoptic"] for t in targets]))
    things_only = _perfect_masks([dict(t, semantic=torch.full_like(t["semantic"], -1)) for t in targets],
                                 "panoptic", 8)  # no background query: unclaimed pixels become background
    assert torch.equal(inference(things_only, "panoptic", 32), panoptic)
    pq = DenseMetrics("panoptic", NUM_CLASSES)
    pq.update(panoptic, targets)
    assert pq.compute() == {"pq": 1.0, "sq": 1.0, "rq": 1.0}

    semantic = torch.stack([t["semantic"] for t in targets])
    by_masks = _perfect_masks(targets, "semantic", 12)
    assert torch.equal(semantic_inference(by_masks["pred_logits"], by_masks["pred_masks"], 32), semantic)
    sem_logits = F.one_hot(semantic, NUM_CLASSES).permute(0, 3, 1, 2).float()  # (B, K, S, S)
    assert torch.equal(inference({"sem_logits": sem_logits}, "semantic", 32), semantic)
    miou = DenseMetrics("semantic", NUM_CLASSES)
    miou.update(semantic, targets)
    assert miou.compute() == {"miou": 1.0, "miou_per_image": 1.0}


def test_miou_equals_a_hand_count():
    target = torch.tensor([[[0, 0, 1], [1, 2, 2]], [[0, 0, 0], [0, 0, 2]]])  # 2 images, 3 classes
    pred = torch.tensor([[[0, 1, 1], [1, 2, 0]], [[0, 0, 0], [0, 2, 2]]])
    metrics = DenseMetrics("semantic", 3)
    metrics.update(pred, [{"semantic": t} for t in target])
    # over both images: class 0 I=5 U=8 (pred 6 + target 7 - 5), class 1 I=2 U=3, class 2 I=2 U=4
    # per image: image 1 IoUs 1/3, 2/3, 1/2; image 2: 4/5, -, 1/2 (class 1 absent) -> mean of 5 values
    assert metrics.compute()["miou"] == pytest.approx((5 / 8 + 2 / 3 + 2 / 4) / 3)
    assert metrics.compute()["miou_per_image"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2 + 4 / 5 + 1 / 2) / 5)


def test_pq_equals_a_hand_count():
    target = torch.zeros(1, 4, 4, 2, dtype=torch.long)
    target[..., 0] = 2  # background stuff class of a 3-class set
    target[0, :2, :2] = torch.tensor([0, 1])  # thing 0, instance 1: 4 px
    target[0, 2:, 2:] = torch.tensor([1, 2])  # thing 1, instance 2: 4 px
    pred = target.clone()
    pred[0, 0, 2] = torch.tensor([0, 1])  # instance 1 grows by a pixel: IoU 4/5
    pred[0, 2:, 2:] = torch.tensor([2, 0])  # thing 1 missed: a false negative, its pixels called background
    metrics = DenseMetrics("panoptic", 3)
    metrics.update(pred, [{"panoptic": target[0]}])
    # class 0: TP IoU 0.8 -> PQ 0.8; class 1: FN only -> 0; background: I = 7, U = 8 + 11 - 7 px -> 7 / 12
    result = metrics.compute()
    assert result["pq"] == pytest.approx((0.8 + 0 + 7 / 12) / 3) and result["rq"] == pytest.approx((1 + 0 + 1) / 3)


def test_bad_input():
    with pytest.raises(UserError, match="task='depth'"):
        DenseMetrics("depth", 11)
    with pytest.raises(UserError, match="num_classes=1"):
        DenseMetrics("semantic", 1)
    with pytest.raises(UserError, match="task='detection'"):
        MaskCriterion(11, task="detection")
    with pytest.raises(UserError, match="task='depth'"):
        inference({}, "depth", 32)


def test_inference_equals_mask2former_official():
    """panoptic / semantic inference against Mask2Former@9b0651c's own methods, run on seeded random queries
    (tests/fixtures/mask2former_inference.pt; its "source" says how it was made)."""
    fixture = torch.load("tests/fixtures/mask2former_inference.pt", weights_only=True)
    ids, table = fixture["segment_ids"].long(), fixture["segment_table"]  # (B, S, S); (B, Q + 1, 2)
    expected = torch.zeros(*ids.shape, 2, dtype=torch.long)
    expected[..., 0] = BACKGROUND  # official: id 0 = no segment; ours: background
    for b in range(len(ids)):
        things = [i for i in range(1, len(table[b])) if table[b, i, 1] == 1]  # thing segments, in id order
        for i in range(1, len(table[b])):
            if table[b, i, 0] >= 0:
                instance = things.index(i) + 1 if i in things else 0
                expected[b][ids[b] == i] = torch.tensor([int(table[b, i, 0]), instance])
    assert (table[..., 1] == 0).any() and (table[..., 1] == 1).sum() > 8  # stuff and things both occur
    panoptic = panoptic_inference(fixture["pred_logits"], fixture["pred_masks"], 32)
    assert torch.equal(panoptic, expected)
    semantic = semantic_inference(fixture["pred_logits"], fixture["pred_masks"], 32)
    assert torch.equal(semantic, fixture["semantic"].long())
