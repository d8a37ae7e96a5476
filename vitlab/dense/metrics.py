"""Dense metrics from torchmetrics: panoptic quality, mean IoU and COCO box AP (pycocotools), one object per task.

    metrics = DenseMetrics("panoptic", num_classes=11)
    metrics.update(panoptic_inference(out["pred_logits"], out["pred_masks"], 64), targets)
    metrics.compute()   # {"pq": ..., "sq": ..., "rq": ...} in 0-1

`num_classes` is the dataset's (things + the background stuff class, 11 on fmnist-scenes): panoptic counts classes
0..K-2 as things and K-1 as stuff; semantic scores all K; detection scores the things' boxes.

- panoptic: `PanopticQuality` (Kirillov et al., 2019): PQ = SQ x RQ per class over the whole set, then the mean over
  classes that occur (in targets or predictions).
- semantic: `miou` is the standard dataset-level mean IoU (per class: intersection / union summed over all images,
  then the mean over classes that occur), from torchmetrics' `MulticlassJaccardIndex`; `miou_per_image` is
  torchmetrics' `MeanIoU`, which averages per-image IoUs over (image, class present) pairs instead.
- detection: `MeanAveragePrecision(iou_type="bbox", backend="pycocotools")`: `ap` = AP@[.5:.95], `ap50`, `ap75`.
"""
from __future__ import annotations

import contextlib
import io

import torch
from torch import Tensor

from ..errors import UserError

__all__ = ["DenseMetrics", "METRIC_KEYS"]

METRIC_KEYS = {"panoptic": ("pq", "sq", "rq"), "semantic": ("miou", "miou_per_image"),
               "detection": ("ap", "ap50", "ap75")}


class DenseMetrics:
    """Accumulates one task's metric over batches: `update(predictions, targets)`, `compute() -> dict` of floats.

    Predictions are what `vitlab.dense.matching.inference` returns: panoptic (B, S, S, 2), semantic (B, S, S),
    detection a list of {"boxes" xyxy px, "scores", "labels"}; targets are the scenes' target dicts.
    """

    def __init__(self, task: str, num_classes: int):
        from torchmetrics.classification import MulticlassJaccardIndex
        from torchmetrics.detection import MeanAveragePrecision, PanopticQuality
        from torchmetrics.segmentation import MeanIoU

        if task not in METRIC_KEYS:
            raise UserError(f"task={task!r}: use one of {', '.join(METRIC_KEYS)}")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise UserError(f"num_classes={num_classes!r}: give things + background, e.g. 11 for fmnist-scenes")
        self.task, self.num_classes = task, num_classes
        if task == "panoptic":
            self.metrics = [PanopticQuality(things=set(range(num_classes - 1)), stuffs={num_classes - 1},
                                            return_sq_and_rq=True)]
        elif task == "semantic":
            self.metrics = [MulticlassJaccardIndex(num_classes, average="macro"),
                            MeanIoU(num_classes, input_format="index")]
        else:
            self.metrics = [MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")]

    def update(self, predictions: "Tensor | list[dict[str, Tensor]]", targets: list[dict[str, Tensor]]) -> None:
        """Add a batch: `predictions` as `inference` gives them, `targets` the batch's target dicts."""
        if self.task == "panoptic":
            self.metrics[0].update(predictions.cpu(), torch.stack([t["panoptic"] for t in targets]))
        elif self.task == "semantic":
            target = torch.stack([t["semantic"] for t in targets])
            for metric in self.metrics:
                metric.update(predictions.cpu(), target)
        else:
            self.metrics[0].update([{k: v.detach().cpu() for k, v in p.items()} for p in predictions],
                                   [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])

    def compute(self) -> dict[str, float]:
        """The task's metrics (METRIC_KEYS[task]) in 0-1; PQ is NaN and AP -1 before any segment or box was counted."""
        if self.task == "panoptic":
            pq, sq, rq = self.metrics[0].compute().tolist()
            return {"pq": pq, "sq": sq, "rq": rq}
        if self.task == "semantic":
            return {"miou": float(self.metrics[0].compute()), "miou_per_image": float(self.metrics[1].compute())}
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its summary table
            result = self.metrics[0].compute()
        return {"ap": float(result["map"]), "ap50": float(result["map_50"]), "ap75": float(result["map_75"])}

    def reset(self) -> None:
        for metric in self.metrics:
            metric.reset()
