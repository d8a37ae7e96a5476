"""kMaX-DeepLab's own training loss: PQ-style matching and class / mask-ID / dice terms, pixel-wise instance
discrimination and the auxiliary semantic loss (MaX-DeepLab, Wang et al., CVPR 2021, Sec. 3.2; kMaX-DeepLab, Yu et
al., ECCV 2022, Sec. 4 "training").

Written from bytedance/kmax-deeplab @ f8e1d0467fd35b4e81f5312748e616a48436beb4 (the PyTorch port of
google-research/deeplab2 `model/loss/max_deeplab_loss.py`): `kmax_deeplab/modeling/matcher.py`
(`compute_mask_similarity`, `compute_class_similarity`, `HungarianMatcher`), `kmax_deeplab/modeling/criterion.py`
(`focal_cross_entropy_loss`, `softmax_ce_loss`, `dice_loss`, `pixelwise_insdis_loss`, `aux_semantic_loss`,
`SetCriterion.process_gt` / `forward`) and the COCO weights of `configs/coco/panoptic_segmentation/kmax_r50.yaml`
(class 3, mask 0.3, dice 3, instance discrimination 1, auxiliary semantic 1, no-object 1e-5, matching shared from
the final output, deep supervision). tests/fixtures/kmax/official_kmax_loss.* hold the official criterion's losses
on tiny tensors; tests/dense/test_dense_kmax.py checks ours equal them.

The terms, for queries q matched to ground-truth segments by maximising (dice similarity x class probability):
- `loss_ce`: softmax cross-entropy of each query's class (unmatched: "no object"), weighted by the matched mask's
  dice (unmatched: its overlap with void pixels) and by 0.75 / 0.25 for object / no-object targets;
- `loss_mask`: the mask-ID cross-entropy, a softmax over the **queries** at every pixel against the one-hot of the
  segment covering it (masks compete for pixels, unlike Mask2Former's per-mask sigmoid);
- `loss_dice`: dice of the per-pixel softmax masks, weighted by the matched class probability, x 0.75 / Q;
- `loss_pixel_insdis`: pixels' L2-normalised embeddings must be similar (softmax over sampled pixels, temperature
  0.3) exactly to the pixels of the same segment; pixels sampled with weights (1 / segment area)^1.5;
- `loss_aux_semantic`: per-pixel cross-entropy of an auxiliary semantic head (final output only).

As officially, the losses are computed at the mask prediction's resolution against labels subsampled to it
(`pan_seg_gt[::4, ::4]` in the official dataset mapper; the auxiliary semantic labels further to its own
resolution, `aux_semantic_loss`); segments with no pixel left after subsampling are dropped, as the mapper drops
them. On 64 px scenes (16 x 16 masks) every pixel fits in the official sample of 4,096: the sampled losses are then
exact (the official Gumbel top-k only permutes them), so they are computed without sampling whenever `sample_k` >=
the pixel count.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError
from .matching import Match, hungarian_match, segments

__all__ = ["KMaXCriterion", "kmax_match", "focal_cross_entropy", "mask_id_cross_entropy", "softmax_dice",
           "pixel_instance_discrimination", "aux_semantic_cross_entropy"]

_MASKING = -99999.0  # official _SOFTMAX_MASKING_CONSTANT


def _nonzero_mean(loss: Tensor) -> Tensor:
    """Per sample: sum over the last axis / count of its non-zero entries (at least 1); mean over samples.

    The official reduction (`num_non_zero`, `divide_no_nan`) of every per-pixel / per-query loss: [B, N] -> []."""
    count = (loss != 0).to(loss).sum(-1).clamp(min=1.0)
    return torch.nan_to_num(loss.sum(-1) / count, nan=0.0, posinf=0.0, neginf=0.0).mean()


@torch.no_grad()
def kmax_match(logits: Tensor, masks: Tensor, labels: Tensor, target: Tensor) -> tuple[Match, Tensor, Tensor]:
    """PQ-style Hungarian matching of one image: cost = -(dice similarity x class probability).

    Dice similarity of the per-pixel softmax over queries (void pixels zeroed) with each segment,
    `2 |p t| / (|p| + |t|)` with eps 1e-5; class probability excludes "no object" (official `HungarianMatcher`).

    Args:
        logits: (Q, K + 1); masks: (Q, P) mask logits; labels: (M,); target: (M, P) float in {0, 1}.
    Returns:
        ((query indices, segment indices), matched dice (n,), matched class probability (n,)).
    """
    prob = masks.float().softmax(0) * (target.sum(0, keepdim=True) > 0)  # (Q, P), void pixels zeroed
    denominator = (prob.sum(-1)[:, None] + target.sum(-1)[None, :]) / 2.0  # (Q, M)
    mask_similarity = prob @ target.T / (denominator + 1e-5)
    class_similarity = logits.float().softmax(-1)[:, :-1][:, labels]  # (Q, M)
    (rows, cols), = hungarian_match([-mask_similarity * class_similarity])
    return (rows, cols), mask_similarity[rows, cols], class_similarity[rows, cols]


def focal_cross_entropy(logits: Tensor, classes: Tensor, weight: Tensor, alpha: float = 0.75) -> Tensor:
    """Class loss: CE per query x (alpha for an object target, 1 - alpha for "no object") x `weight`, reduced by
    `_nonzero_mean`. Official `focal_cross_entropy_loss` with gamma 0. logits (B, Q, K + 1), classes / weight (B, Q)."""
    loss = F.cross_entropy(logits.transpose(1, 2).float(), classes, reduction="none")  # (B, Q)
    void = (classes == logits.shape[-1] - 1).to(loss)
    return _nonzero_mean(loss * (alpha * (1 - void) + (1 - alpha) * void) * weight)


def mask_id_cross_entropy(masks: Tensor, target: Tensor, void: Tensor) -> Tensor:
    """Mask-ID cross-entropy: softmax over the Q queries at each pixel against the (soft) segment one-hot, void
    pixels dropped, reduced by `_nonzero_mean` (official `softmax_ce_loss`).
    masks / target (B, Q, P), void (B, P) bool."""
    loss = F.cross_entropy(masks.float(), target, reduction="none")  # (B, P)
    return _nonzero_mean(loss.masked_fill(void, 0.0))


def softmax_dice(masks: Tensor, target: Tensor, void: Tensor, weight: Tensor) -> Tensor:
    """Dice loss of the per-pixel softmax masks (void pixels zeroed, smooth 1) x `weight` per query, summed over
    queries x 0.75 / Q, mean over images (official `dice_loss`).
    masks / target (B, Q, P), void (B, P), weight (B, Q)."""
    prob = masks.float().softmax(1).masked_fill(void[:, None], 0.0)
    dice = (2 * (prob * target).sum(-1) + 1) / (prob.sum(-1) + target.sum(-1) + 1)  # (B, Q)
    return ((1 - dice) * weight).sum(1).mul(0.75 / masks.shape[1]).mean()


def _sample(weights_log: Tensor, k: int) -> Tensor | None:
    """Gumbel top-k indices (B, k) of pixels drawn by softmax(`weights_log`); None when k covers every pixel."""
    if k >= weights_log.shape[-1]:
        return None
    gumbel = -torch.log(-torch.log(torch.rand_like(weights_log)))
    return torch.topk(weights_log + gumbel, k).indices


def pixel_instance_discrimination(feature: Tensor, target: Tensor, void: Tensor, inverse_area: Tensor,
                                  sample_k: int = 4096, sample_temperature: float = 1.5,
                                  temperature: float = 0.3) -> Tensor:
    """Pixel-wise instance discrimination (official `pixelwise_insdis_loss`): on `sample_k` pixels drawn with
    log-weights `sample_temperature` * log(1 / area of their segment) (void pixels excluded), the softmax over pixels
    of embedding similarities / `temperature` against the same-segment indicator normalised to sum 1.

    feature (B, C, P) L2-normalised embeddings; target (B, Q, P); void (B, P); inverse_area (B, P)."""
    index = _sample(inverse_area.log() * sample_temperature + void.to(inverse_area) * _MASKING, sample_k)
    if index is not None:
        target = target.gather(2, index[:, None].expand(-1, target.shape[1], -1))  # (B, Q, k)
        feature = feature.gather(2, index[:, None].expand(-1, feature.shape[1], -1))  # (B, C, k)
    gt = torch.einsum("bnk,bnj->bkj", target, target)  # (B, k, k) same-segment indicator
    gt = gt / gt.sum(1, keepdim=True).clamp(min=1.0)
    similarity = torch.einsum("bck,bcj->bkj", feature.float(), feature.float()) / temperature  # (B, k, k)
    return _nonzero_mean(F.cross_entropy(similarity, gt, reduction="none"))


def aux_semantic_cross_entropy(logits: Tensor, semantic: Tensor, void: Tensor, inverse_area: Tensor,
                               ignore: int, sample_k: int = 4096, sample_temperature: float = 2.0) -> Tensor:
    """Auxiliary semantic loss (official `aux_semantic_loss`): per-pixel CE of `logits` (B, K, P) against
    `semantic` (B, P) on `sample_k` pixels drawn like the instance discrimination's, class `ignore` skipped."""
    index = _sample(inverse_area.log() * sample_temperature + void.to(inverse_area) * _MASKING, sample_k)
    if index is not None:
        semantic = semantic.gather(1, index)  # (B, k)
        logits = logits.gather(2, index[:, None].expand(-1, logits.shape[1], -1))  # (B, K, k)
    loss = F.cross_entropy(logits.float(), semantic, ignore_index=ignore, reduction="none")
    return _nonzero_mean(loss * (semantic != ignore).to(loss))


class KMaXCriterion(nn.Module):
    """kMaX-DeepLab's SetCriterion (module docstring): `forward(outputs, targets)` returns each weighted term
    ("loss_ce", "loss_mask", "loss_dice", "loss_pixel_insdis", "loss_aux_semantic", then "loss_ce_0", ... for the
    auxiliary outputs, which reuse the final output's matching); their sum is the training loss.

    `outputs` is a kMaX head's training output: "pred_logits" (B, Q, K + 1), "pred_masks" (B, Q, h, w) mask logits,
    "pixel_feature" (B, C, h, w), "aux_semantic_pred" (B, K, h', w') and "aux" (dicts with the first three).

    Args:
        num_classes: K (queries have K + 1 logits). task: "panoptic" or "semantic" (which segments are targets).
        background: the stuff class (-1: K - 1).
    """

    def __init__(self, num_classes: int, task: str = "panoptic", background: int | None = -1,
                 class_weight: float = 3.0, mask_weight: float = 0.3, dice_weight: float = 3.0,
                 insdis_weight: float = 1.0, aux_semantic_weight: float = 1.0, no_object_weight: float = 1e-5,
                 sample_k: int = 4096):
        super().__init__()
        if task not in ("panoptic", "semantic"):
            raise UserError(f"KMaXCriterion task={task!r}: use 'panoptic' or 'semantic'")
        self.num_classes, self.task, self.eos, self.sample_k = num_classes, task, no_object_weight, sample_k
        self.background = num_classes - 1 if background == -1 else background
        self.weights = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight,
                        "loss_pixel_insdis": insdis_weight, "loss_aux_semantic": aux_semantic_weight}

    @staticmethod
    def _subsampled(labels: Tensor, size: tuple[int, ...]) -> Tensor:
        """`labels` (..., S, S') subsampled with the stride that gives `size` (..., h, w): `labels[..., ::s, ::s]`."""
        sy, sx = labels.shape[-2] // size[0], labels.shape[-1] // size[1]
        return labels[..., ::sy, ::sx][..., :size[0], :size[1]]

    @torch.no_grad()
    def prepare(self, outputs: dict, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Match the final output and pad the targets to the queries (official `process_gt`): target masks
        (B, Q, P) normalised to sum <= 1 per pixel, classes (B, Q), class-loss and dice weights (B, Q), void (B, P),
        inverse segment area (B, P), semantic labels (B, S, S) at label resolution."""
        size = tuple(outputs["pred_masks"].shape[-2:])
        segs = []
        for t in targets:  # at the prediction's resolution; segments subsampled away are dropped
            labels, seg = segments(t, self.task, self.background)
            seg = self._subsampled(seg, size).flatten(1)  # (M, P)
            keep = seg.any(1)
            segs.append((labels[keep], seg[keep]))
        masks = outputs["pred_masks"].detach().float().flatten(2)  # (B, Q, P)
        B, Q, P = masks.shape
        target = torch.zeros_like(masks)
        classes = torch.full((B, Q), self.num_classes, dtype=torch.long, device=masks.device)
        class_prob = torch.zeros(B, Q, device=masks.device)
        matched_dice, matched = [], []
        for b, (logits, mask, (labels, seg)) in enumerate(zip(outputs["pred_logits"].detach(), masks, segs)):
            seg = seg.to(masks)
            (q, t), dice, prob = kmax_match(logits, mask, labels.to(masks.device), seg)
            target[b, q] = seg[t]
            classes[b, q] = labels.to(masks.device)[t]
            class_prob[b, q] = prob.clamp(min=self.eos)
            matched_dice.append(dice)
            matched.append(q)
        target = target / target.sum(1, keepdim=True).clamp(min=1.0)
        void = target.sum(1) < 1  # (B, P)
        area = torch.einsum("bnp,bn->bp", target, target.sum(2))  # (B, P) area of each pixel's segment
        inverse_area = P / area.clamp(min=1.0)
        prob = masks.softmax(1)
        dice = torch.einsum("bnp,bp->bn", prob, void.to(prob)) / (prob.sum(-1) + 1e-5)  # unmatched: IoU with void
        for b, q in enumerate(matched):
            dice[b, q] = matched_dice[b]
        semantic = torch.stack([t["semantic"] for t in targets]).to(masks.device)  # (B, S, S)
        return {"masks": target, "labels": classes, "class_weight": dice.clamp(min=self.eos),
                "mask_weight": class_prob, "void": void, "inverse_area": inverse_area, "semantic": semantic}

    def _losses(self, outputs: dict, gt: dict[str, Tensor], final: bool) -> dict[str, Tensor]:
        masks = outputs["pred_masks"].flatten(2)  # (B, Q, P), aux layers already at the final size
        losses = {"loss_ce": focal_cross_entropy(outputs["pred_logits"], gt["labels"], gt["class_weight"]),
                  "loss_mask": mask_id_cross_entropy(masks, gt["masks"], gt["void"]),
                  "loss_dice": softmax_dice(masks, gt["masks"], gt["void"], gt["mask_weight"])}
        if self.weights["loss_pixel_insdis"] > 0:
            losses["loss_pixel_insdis"] = pixel_instance_discrimination(
                outputs["pixel_feature"].flatten(2), gt["masks"], gt["void"], gt["inverse_area"], self.sample_k)
        if final and self.weights["loss_aux_semantic"] > 0:
            logits = outputs["aux_semantic_pred"]  # (B, K, h', w'): labels, void and areas subsampled to it
            size, grid = tuple(logits.shape[-2:]), tuple(outputs["pred_masks"].shape[-2:])

            def down(x: Tensor) -> Tensor:
                return self._subsampled(x.unflatten(-1, grid), size).flatten(1)

            losses["loss_aux_semantic"] = aux_semantic_cross_entropy(
                logits.flatten(2), self._subsampled(gt["semantic"], size).flatten(1), down(gt["void"]),
                down(gt["inverse_area"]), ignore=self.num_classes, sample_k=self.sample_k)
        return losses

    def forward(self, outputs: dict, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        gt = self.prepare(outputs, targets)  # shared by every layer (official SHARE_FINAL_MATCHING: True)
        losses = {k: self.weights[k] * v for k, v in self._losses(outputs, gt, final=True).items()}
        for i, aux in enumerate(outputs.get("aux") or []):
            losses.update({f"{k}_{i}": self.weights[k] * v for k, v in self._losses(aux, gt, final=False).items()})
        return losses
