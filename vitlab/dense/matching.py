"""Set prediction: Hungarian matching, the mask and box criteria, and inference from query outputs to labels.

Conventions of DETR (facebookresearch/detr@29901c5 `models/matcher.py`, `models/detr.py` SetCriterion / PostProcess)
and Mask2Former (facebookresearch/Mask2Former@9b0651c `mask2former/modeling/matcher.py`, `criterion.py`,
`maskformer_model.py` panoptic_inference / semantic_inference, whose outputs ours equal on the random queries of
tests/fixtures/mask2former_inference.pt). Queries carry K + 1 logits, the last "no object".
`num_classes` is K, the classes a head predicts: things + the background stuff class for panoptic and semantic
(11 on fmnist-scenes; the background is class K - 1), things for detection (10).

Deviations, each because our scenes are 64 px: mask losses and costs use every pixel of the target (pred masks are
upsampled bilinearly to it, as MaskFormer does) instead of Mask2Former's 12,544 sampled points; the focal box loss
reads the first K of the K + 1 logits (Deformable DETR's heads have no no-object logit).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from ..errors import UserError
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

__all__ = ["hungarian_match", "segments", "MaskCriterion", "BoxCriterion", "panoptic_inference",
           "semantic_inference", "box_inference", "inference"]

Match = tuple[Tensor, Tensor]


def hungarian_match(cost: list[Tensor]) -> list[Match]:
    """Per image, the (query indices, target indices) of the assignment of least total cost.

    Args:
        cost: per image a (Q, N) cost matrix; with Q >= N every target gets a query.
    """
    pairs = []
    for matrix in cost:
        rows, cols = linear_sum_assignment(matrix.detach().cpu().double().numpy())
        pairs.append((torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)))
    return pairs


def segments(target: dict[str, Tensor], task: str, background: int | None) -> tuple[Tensor, Tensor]:
    """(labels (M,), masks (M, S, S) bool) a mask-classification head should predict for one scene.

    panoptic: each thing instance, then the background stuff region as one segment (when `background` is not None
    and the region is not empty); semantic: one segment per class present (Mask2Former's semantic targets).
    """
    semantic = target["semantic"]
    if task == "semantic":
        labels = semantic.unique()
        return labels, semantic[None] == labels[:, None, None]  # (M, S, S)
    labels, masks = target["labels"], target["masks"]
    if background is not None:
        stuff = semantic == background
        if stuff.any():
            labels = torch.cat([labels, labels.new_tensor([background])])
            masks = torch.cat([masks, stuff[None]])
    return labels, masks


def _mask_costs(logits: Tensor, masks: Tensor, labels: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(class, sigmoid BCE, dice) costs (Q, M) of Mask2Former's HungarianMatcher, over all P pixels.

    Args:
        logits: (Q, K + 1); masks: (Q, P) mask logits; labels: (M,); target: (M, P) float in {0, 1}.
    """
    cost_class = -logits.softmax(-1)[:, labels]
    P = masks.shape[1]
    pos = F.binary_cross_entropy_with_logits(masks, torch.ones_like(masks), reduction="none")
    neg = F.binary_cross_entropy_with_logits(masks, torch.zeros_like(masks), reduction="none")
    cost_mask = (pos @ target.T + neg @ (1 - target).T) / P
    prob = masks.sigmoid()
    cost_dice = 1 - (2 * prob @ target.T + 1) / (prob.sum(-1)[:, None] + target.sum(-1)[None, :] + 1)
    return cost_class, cost_mask, cost_dice


def _with_aux(losses_of, outputs: dict, weights: dict[str, float]) -> dict[str, Tensor]:
    """The final layer's weighted loss terms and each aux layer's as "{term}_{i}": their sum is the training loss."""
    losses = {k: weights[k] * v for k, v in losses_of(outputs).items()}
    for i, aux in enumerate(outputs.get("aux") or []):
        losses.update({f"{k}_{i}": weights[k] * v for k, v in losses_of(aux).items()})
    return losses


class MaskCriterion(nn.Module):
    """Mask2Former's SetCriterion: match queries to segments, then class CE (no-object weighted) + sigmoid BCE +
    dice on matched masks, for the final output and each auxiliary output in `outputs["aux"]`.

    Losses are normalised by the number of target segments in the batch (Mask2Former's `num_masks`); the weights
    default to Mask2Former's (class 2, mask 5, dice 5, no-object 0.1). `forward` returns each weighted term
    ("loss_ce", "loss_mask", "loss_dice", then "loss_ce_0", ... for the aux outputs); their sum is the loss.

    Args:
        num_classes: K (queries have K + 1 logits).
        task: "panoptic" (instances + background segment) or "semantic" (one segment per class present).
        background: the stuff class (-1: K - 1); None trains things only.
    """

    def __init__(self, num_classes: int, task: str = "panoptic", background: int | None = -1,
                 class_weight: float = 2.0, mask_weight: float = 5.0, dice_weight: float = 5.0,
                 no_object_weight: float = 0.1):
        super().__init__()
        if task not in ("panoptic", "semantic"):
            raise UserError(f"MaskCriterion task={task!r}: use 'panoptic' or 'semantic'")
        self.num_classes, self.task = num_classes, task
        self.background = num_classes - 1 if background == -1 else background
        self.weights = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = no_object_weight
        self.register_buffer("empty_weight", empty_weight)

    def targets(self, targets: list[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """(labels (M,), masks (M, S, S) bool) of each scene's segments."""
        return [segments(t, self.task, self.background) for t in targets]

    def _upsampled(self, pred_masks: Tensor, size: tuple[int, int]) -> Tensor:
        """(B, Q, P) mask logits at the target size."""
        if pred_masks.shape[-2:] != size:
            pred_masks = F.interpolate(pred_masks, size=size, mode="bilinear", align_corners=False)
        return pred_masks.flatten(2)

    @torch.no_grad()
    def match(self, outputs: dict, targets: list[dict[str, Tensor]]) -> list[Match]:
        """Hungarian matching of `outputs` (one layer's dict) to the scenes' segments."""
        return self._match(outputs, self.targets(targets))

    @torch.no_grad()
    def _match(self, outputs: dict, segs: list[tuple[Tensor, Tensor]]) -> list[Match]:
        masks = self._upsampled(outputs["pred_masks"], segs[0][1].shape[-2:])
        cost = []
        for logits, mask, (labels, target) in zip(outputs["pred_logits"], masks, segs):
            target = target.flatten(1).to(mask.device, torch.float32)
            c_class, c_mask, c_dice = _mask_costs(logits.float(), mask.float(), labels.to(mask.device), target)
            cost.append(self.weights["loss_ce"] * c_class + self.weights["loss_mask"] * c_mask
                        + self.weights["loss_dice"] * c_dice)
        return hungarian_match(cost)

    def _losses(self, outputs: dict, segs: list[tuple[Tensor, Tensor]], num_masks: float) -> dict[str, Tensor]:
        logits = outputs["pred_logits"]  # (B, Q, K + 1)
        pairs = self._match(outputs, segs)
        classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.long, device=logits.device)
        for b, (q, t) in enumerate(pairs):
            classes[b, q] = segs[b][0][t].to(logits.device)
        loss_ce = F.cross_entropy(logits.transpose(1, 2).float(), classes, self.empty_weight)
        masks = self._upsampled(outputs["pred_masks"], segs[0][1].shape[-2:])  # (B, Q, P)
        pred = torch.cat([masks[b, q] for b, (q, _) in enumerate(pairs)]).float()  # (matched, P)
        target = torch.cat([segs[b][1][t].flatten(1) for b, (_, t) in enumerate(pairs)]).to(pred)
        loss_mask = F.binary_cross_entropy_with_logits(pred, target, reduction="none").mean(1).sum() / num_masks
        prob = pred.sigmoid()
        dice = 1 - (2 * (prob * target).sum(1) + 1) / (prob.sum(1) + target.sum(1) + 1)
        return {"loss_ce": loss_ce, "loss_mask": loss_mask, "loss_dice": dice.sum() / num_masks}

    def forward(self, outputs: dict, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        segs = self.targets(targets)
        num_masks = max(float(sum(len(labels) for labels, _ in segs)), 1.0)
        return _with_aux(lambda out: self._losses(out, segs, num_masks), outputs, self.weights)


def _normalised_cxcywh(target: dict[str, Tensor]) -> Tensor:
    """A scene's boxes (N, 4) as (cx, cy, w, h) in 0-1 of its image size."""
    h, w = target["semantic"].shape[-2:] if "semantic" in target else target["masks"].shape[-2:]
    scale = target["boxes"].new_tensor([w, h, w, h])
    return box_convert(target["boxes"] / scale, "xyxy", "cxcywh")


class BoxCriterion(nn.Module):
    """DETR's SetCriterion for boxes: match queries to boxes, then class CE (no-object weight 0.1) or sigmoid focal
    loss (Deformable DETR, alpha 0.25, gamma 2) + L1 + GIoU on normalised (cx, cy, w, h) boxes, for the final
    output and each dict of `outputs["aux"]`. Normalised by the number of target boxes in the batch; `forward`
    returns each weighted term ("loss_ce", "loss_bbox", "loss_giou", then "loss_ce_0", ...), summing to the loss.

    Weights default to DETR's (class 1, L1 5, GIoU 2); with `focal`, Deformable DETR's class weight is 2.
    """

    def __init__(self, num_classes: int, class_weight: float | None = None, l1_weight: float = 5.0,
                 giou_weight: float = 2.0, no_object_weight: float = 0.1, focal: bool = False):
        super().__init__()
        self.num_classes, self.focal = num_classes, focal
        class_weight = (2.0 if focal else 1.0) if class_weight is None else class_weight
        self.weights = {"loss_ce": class_weight, "loss_bbox": l1_weight, "loss_giou": giou_weight}
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = no_object_weight
        self.register_buffer("empty_weight", empty_weight)

    def _class_cost(self, logits: Tensor, labels: Tensor) -> Tensor:
        if not self.focal:
            return -logits.softmax(-1)[:, labels]
        prob = logits[:, :self.num_classes].sigmoid()[:, labels]  # Deformable DETR's focal matching cost
        pos = 0.25 * (1 - prob) ** 2 * -(prob + 1e-8).log()
        neg = 0.75 * prob ** 2 * -(1 - prob + 1e-8).log()
        return pos - neg

    @torch.no_grad()
    def match(self, outputs: dict, targets: list[dict[str, Tensor]]) -> list[Match]:
        """Hungarian matching of `outputs` (one layer's dict) to the scenes' boxes."""
        cost = []
        for logits, boxes, target in zip(outputs["pred_logits"], outputs["pred_boxes"], targets):
            goal = _normalised_cxcywh(target).to(boxes)
            c_giou = -generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"), box_convert(goal, "cxcywh", "xyxy"))
            cost.append(self.weights["loss_ce"] * self._class_cost(logits.float(), target["labels"])
                        + self.weights["loss_bbox"] * torch.cdist(boxes.float(), goal.float(), p=1)
                        + self.weights["loss_giou"] * c_giou)
        return hungarian_match(cost)

    def _losses(self, outputs: dict, targets: list[dict[str, Tensor]], num_boxes: float) -> dict[str, Tensor]:
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]  # (B, Q, K + 1), (B, Q, 4)
        pairs = self.match(outputs, targets)
        classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.long, device=logits.device)
        for b, (q, t) in enumerate(pairs):
            classes[b, q] = targets[b]["labels"][t].to(logits.device)
        if self.focal:
            onehot = F.one_hot(classes, self.num_classes + 1)[..., :self.num_classes].to(logits.dtype)
            loss_ce = sigmoid_focal_loss(logits[..., :self.num_classes], onehot, reduction="sum") / num_boxes
        else:
            loss_ce = F.cross_entropy(logits.transpose(1, 2).float(), classes, self.empty_weight)
        pred = torch.cat([boxes[b, q] for b, (q, _) in enumerate(pairs)])  # (matched, 4)
        goal = torch.cat([_normalised_cxcywh(targets[b])[t] for b, (_, t) in enumerate(pairs)]).to(pred)
        giou = torch.diag(generalized_box_iou(box_convert(pred, "cxcywh", "xyxy"), box_convert(goal, "cxcywh", "xyxy")))
        return {"loss_ce": loss_ce, "loss_bbox": F.l1_loss(pred, goal, reduction="sum") / num_boxes,
                "loss_giou": (1 - giou).sum() / num_boxes}

    def forward(self, outputs: dict, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        num_boxes = max(float(sum(len(t["labels"]) for t in targets)), 1.0)
        return _with_aux(lambda out: self._losses(out, targets, num_boxes), outputs, self.weights)


# ---------------------------------------------------------------------------------------------------------------------
# inference: query outputs -> panoptic / semantic maps and scored boxes


def _size(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


@torch.no_grad()
def panoptic_inference(pred_logits: Tensor, pred_masks: Tensor, size: int | tuple[int, int], *,
                       background: int | None = None, score_threshold: float = 0.8,
                       overlap_threshold: float = 0.8) -> Tensor:
    """Mask2Former's panoptic_inference: (B, S, S, 2) maps of (category, instance id).

    Queries whose best class is not "no object" and scores above `score_threshold` compete per pixel by
    score x mask probability; a query keeps its pixels if they are >= `overlap_threshold` of its own mask (p >= 0.5).
    Thing segments get ids 1, 2, ...; the stuff class `background` (default K - 1) has id 0, and so has every
    pixel no query claims, which is labelled `background`.

    Args:
        pred_logits: (B, Q, K + 1); pred_masks: (B, Q, h, w) logits, resized to `size` bilinearly.
    """
    background = pred_logits.shape[-1] - 2 if background is None else background
    masks = F.interpolate(pred_masks.float(), size=_size(size), mode="bilinear", align_corners=False).sigmoid()
    scores, labels = pred_logits.float().softmax(-1).max(-1)  # (B, Q)
    out = torch.zeros(masks.shape[0], *masks.shape[-2:], 2, dtype=torch.long)
    out[..., 0] = background
    for b in range(len(out)):
        keep = (labels[b] != pred_logits.shape[-1] - 1) & (scores[b] > score_threshold)
        if not keep.any():
            continue
        cur_masks, cur_labels = masks[b, keep], labels[b, keep].cpu()
        owner = (scores[b, keep][:, None, None] * cur_masks).argmax(0)  # (S, S) winning query
        segment = 0
        for k in range(len(cur_masks)):
            own = cur_masks[k] >= 0.5
            mask = ((owner == k) & own).cpu()
            if not mask.any() or int((owner == k).sum()) < overlap_threshold * int(own.sum()):
                continue
            label = int(cur_labels[k])
            if label != background:
                segment += 1
            out[b][mask] = torch.tensor([label, segment if label != background else 0])
    return out


@torch.no_grad()
def semantic_inference(pred_logits: Tensor, pred_masks: Tensor | None, size: int | tuple[int, int]) -> Tensor:
    """(B, S, S) class per pixel. Mask classification (Mask2Former's semantic_inference): argmax over classes of
    sum_q softmax(logits_q)[:K] * sigmoid(mask_q). Per-pixel logits (`pred_masks` None, `pred_logits` the
    (B, K, h, w) sem_logits): argmax after bilinear resizing."""
    if pred_masks is None:
        logits = F.interpolate(pred_logits.float(), size=_size(size), mode="bilinear", align_corners=False)
        return logits.argmax(1)
    masks = F.interpolate(pred_masks.float(), size=_size(size), mode="bilinear", align_corners=False).sigmoid()
    scores = torch.einsum("bqc,bqhw->bchw", pred_logits.float().softmax(-1)[..., :-1], masks)  # (B, K, S, S)
    return scores.argmax(1)


@torch.no_grad()
def box_inference(pred_logits: Tensor, pred_boxes: Tensor, size: int | tuple[int, int],
                  focal: bool = False) -> list[dict[str, Tensor]]:
    """DETR's PostProcess: per image {"boxes" (Q, 4) xyxy in pixels, "scores" (Q,), "labels" (Q,)}, each query's
    best real class (softmax over K + 1, or with `focal` the sigmoid of the first K logits)."""
    h, w = _size(size)
    probs = pred_logits.float()[..., :-1].sigmoid() if focal else pred_logits.float().softmax(-1)[..., :-1]
    scores, labels = probs.max(-1)
    boxes = box_convert(pred_boxes.float(), "cxcywh", "xyxy") * pred_boxes.new_tensor([w, h, w, h]).float()
    return [{"boxes": b, "scores": s, "labels": c} for b, s, c in zip(boxes, scores, labels)]


def inference(outputs: dict, task: str, size: int | tuple[int, int]) -> "Tensor | list[dict[str, Tensor]]":
    """A head's output dict -> what `DenseMetrics(task, ...).update` takes: panoptic (B, S, S, 2), semantic (B, S, S)
    (from mask classification or `sem_logits`), detection a list of scored boxes."""
    if task == "panoptic":
        return panoptic_inference(outputs["pred_logits"], outputs["pred_masks"], size)
    if task == "semantic":
        if "sem_logits" in outputs:
            return semantic_inference(outputs["sem_logits"], None, size)
        return semantic_inference(outputs["pred_logits"], outputs["pred_masks"], size)
    if task == "detection":
        return box_inference(outputs["pred_logits"], outputs["pred_boxes"], size)
    raise UserError(f"task={task!r}: use panoptic, semantic or detection")
