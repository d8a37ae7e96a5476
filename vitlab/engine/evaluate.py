"""Evaluate a runner on a dataset: top-1, top-5, loss, per-class accuracy and the confusion matrix."""
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import DataError
from ..data.imagefolder import Skipped
from ..runner import as_runner
from ..utils.io import atomic_path

__all__ = ["evaluate", "check_input_shape", "check_num_classes", "plot_confusion"]


def check_input_shape(images: torch.Tensor, runner) -> None:
    """A batch whose (C, H, W) differs from what the runner expects is an error naming both shapes."""
    expected = tuple(getattr(runner, "input_size", ()) or ())
    got = tuple(images.shape[1:])
    frames = getattr(getattr(runner, "module", runner), "num_frames", None)  # a video model takes (C, T, H, W) clips
    if expected and frames is not None:
        expected = (expected[0], int(frames), *expected[1:])
    if expected and got != expected:
        raise DataError(
            f"data gives images of shape {'x'.join(map(str, got))} but the model expects "
            f"{'x'.join(map(str, expected))}: build the data with the model's input size and in_chans")


class _Items(torch.utils.data.Dataset):
    """(index, item or Skipped) for the first `n` items: a dataset with `get_or_skip` (an image folder) reports a file
    it cannot decode instead of substituting another image."""

    def __init__(self, dataset, n: int):
        self.dataset, self.n = dataset, n
        self.get = getattr(dataset, "get_or_skip", dataset.__getitem__)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        return index, self.get(index)


def _collate(batch):
    """(indices, images, targets, skipped): items that could not be read are dropped and listed, never replaced."""
    kept = [(i, item) for i, item in batch if not isinstance(item, Skipped)]
    skipped = [item for _, item in batch if isinstance(item, Skipped)]
    if not kept:
        return [], None, None, skipped
    images, targets = torch.utils.data.default_collate([item for _, item in kept])
    return [i for i, _ in kept], images, targets, skipped


def check_num_classes(runner, dataset) -> None:
    """A runner whose outputs are not one per class of the dataset is an error naming both (before any image)."""
    classes = list(getattr(dataset, "classes", None) or [])
    num_classes = int(getattr(runner, "num_classes", 0) or 0)
    if classes and num_classes and num_classes != len(classes):
        shown = ", ".join(map(str, classes[:20])) + (f", ... (+{len(classes) - 20} more)" if len(classes) > 20 else "")
        raise DataError(f"the model has {num_classes} classes but {getattr(dataset, 'spec', 'the dataset')} has "
                        f"{len(classes)} [{shown}]: evaluate it on data with the same classes, or fine-tune it on "
                        f"this data (vitlab train --init CHECKPOINT --data ... --out DIR)")


TTA = ("flip",)


def evaluate(model_or_runner, dataset, *, batch_size: int = 256, progress: bool = True, limit: int | None = None,
             predictions: bool = False, tta: str | None = None) -> dict:
    """Run the whole dataset (or its first `limit` images) through the runner; accuracies are fractions.

    An image file that cannot be read is dropped, never replaced: `n` counts the images evaluated, `skipped` those
    left out (files found bad when the dataset was built, and files that failed to decode here), `skipped_files`
    names them. `predictions=True` adds "predictions": {dataset index: top-1 class index} of every image evaluated.
    A model whose class count differs from the dataset's is an error before any image is read. `tta="flip"`
    (test-time augmentation) scores each image by the mean of the softmax of the image and of its horizontal mirror
    (two passes; the loss is the cross-entropy of that mean).
    """
    if tta is not None and tta not in TTA:
        raise ValueError(f"tta={tta!r} is not a test-time augmentation; use one of {', '.join(TTA)} or None")
    runner = as_runner(model_or_runner)
    check_num_classes(runner, dataset)
    classes = list(getattr(dataset, "classes", []))
    num_classes = runner.num_classes or len(classes)
    n_total = len(dataset) if limit is None else min(limit, len(dataset))
    loader = torch.utils.data.DataLoader(_Items(dataset, n_total), batch_size=batch_size, shuffle=False,
                                         collate_fn=_collate)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    loss_sum, top5_hits, n = 0.0, 0, 0
    skipped = list(getattr(dataset, "bad", None) or [])  # left out when the dataset was built
    top1_of = {}
    bar = _bar(progress, len(loader))
    try:
        for indices, images, targets, dropped in loader:
            skipped += [s.path for s in dropped if s.path not in skipped]
            if images is not None:
                if n == 0:
                    check_input_shape(images, runner)
                logits = runner(images)
                if tta == "flip":   # log of the mean probability: argmax, top-5 and the loss follow the mean
                    logits = ((logits.float().softmax(1) + runner(images.flip(-1)).float().softmax(1)) / 2).log()
                loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
                k = min(5, logits.shape[1])
                top5_hits += (logits.topk(k, dim=1).indices == targets[:, None]).any(dim=1).sum().item()
                top1 = logits.argmax(1)
                confusion += torch.bincount(targets * num_classes + top1, minlength=num_classes ** 2).view(
                    num_classes, num_classes)
                n += targets.numel()
                if predictions:
                    top1_of.update(zip(indices, top1.tolist()))
            if bar:
                bar[0].advance(bar[1])
    finally:
        if bar:
            bar[0].stop()
    if n == 0:
        if skipped:
            raise DataError(f"none of the {len(skipped)} images could be read (e.g. {skipped[0]}): check the files")
        raise DataError("the dataset is empty: nothing to evaluate")
    support = confusion.sum(1)
    per_class = (confusion.diag().double() / support.clamp(min=1)).tolist()
    names = classes if len(classes) == num_classes else [str(i) for i in range(num_classes)]
    result = {
        "top1": confusion.diag().sum().item() / n,
        "top5": top5_hits / n,
        "loss": loss_sum / n,
        "n": n,
        "skipped": len(skipped),
        "skipped_files": skipped,
        "per_class": {name: acc for name, acc in zip(names, per_class)},
        "confusion": confusion.tolist(),
        "classes": names,
    }
    if predictions:
        result["predictions"] = top1_of
    return result


def _bar(enabled: bool, total: int):
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("eval"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=Console(stderr=True), transient=True)
    task = bar.add_task("eval", total=total)
    bar.start()
    return bar, task


def plot_confusion(result: dict, path: str | Path, title: str = "") -> Path:
    """Save the confusion matrix (rows: true class, columns: predicted) as a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    confusion = torch.tensor(result["confusion"], dtype=torch.float64)
    rates = confusion / confusion.sum(1, keepdim=True).clamp(min=1)
    names = result["classes"]
    size = max(4.0, 0.55 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    if len(names) <= 30:
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        for i in range(len(names)):
            for j in range(len(names)):
                if confusion[i, j] > 0:
                    ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"top-1 {100 * result['top1']:.2f} % on {result['n']} images")
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of true class")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path
