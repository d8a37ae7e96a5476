"""Evaluate a runner on a dataset: top-1, top-5, loss, per-class accuracy and the confusion matrix."""
from pathlib import Path

import torch
import torch.nn.functional as F

from ..runner import as_runner

__all__ = ["evaluate", "check_input_shape", "plot_confusion"]


def check_input_shape(images: torch.Tensor, runner) -> None:
    """A batch whose (C, H, W) differs from what the runner expects is an error naming both shapes."""
    expected = tuple(getattr(runner, "input_size", ()) or ())
    got = tuple(images.shape[1:])
    if expected and got != expected:
        raise ValueError(
            f"data gives images of shape {'x'.join(map(str, got))} but the model expects "
            f"{'x'.join(map(str, expected))}: build the data with the model's input size and in_chans")


def evaluate(model_or_runner, dataset, *, batch_size: int = 256, progress: bool = True, limit: int | None = None) -> dict:
    """Run the whole dataset (or its first `limit` images) through the runner; accuracies are fractions."""
    runner = as_runner(model_or_runner)
    classes = list(getattr(dataset, "classes", []))
    num_classes = runner.num_classes or len(classes)
    n_total = len(dataset) if limit is None else min(limit, len(dataset))
    subset = dataset if n_total == len(dataset) else torch.utils.data.Subset(dataset, range(n_total))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    loss_sum, top5_hits, n = 0.0, 0, 0
    bar = _bar(progress, len(loader))
    try:
        for images, targets in loader:
            if n == 0:
                check_input_shape(images, runner)
            logits = runner(images)
            loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
            k = min(5, logits.shape[1])
            top5_hits += (logits.topk(k, dim=1).indices == targets[:, None]).any(dim=1).sum().item()
            confusion += torch.bincount(targets * num_classes + logits.argmax(1), minlength=num_classes ** 2).view(
                num_classes, num_classes)
            n += targets.numel()
            if bar:
                bar[0].advance(bar[1])
    finally:
        if bar:
            bar[0].stop()
    if n == 0:
        raise ValueError("the dataset is empty: nothing to evaluate")
    support = confusion.sum(1)
    per_class = (confusion.diag().double() / support.clamp(min=1)).tolist()
    names = classes if len(classes) == num_classes else [str(i) for i in range(num_classes)]
    return {
        "top1": confusion.diag().sum().item() / n,
        "top5": top5_hits / n,
        "loss": loss_sum / n,
        "n": n,
        "per_class": {name: acc for name, acc in zip(names, per_class)},
        "confusion": confusion.tolist(),
        "classes": names,
    }


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

    from ..utils.io import atomic_path

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
