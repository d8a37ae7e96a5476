"""Export a measured point (source model + stack) as a checkpoint folder that `vitlab eval` / `bench` accept."""
from pathlib import Path

import torch

from .. import loader
from ..checkpoint import create_model, load_config, save_checkpoint
from ..data.transforms import dataset_for_model, resolve_preprocessing
from ..explain import ExplainError, explain
from ..explain.plot import plot_explanations
from ..quant import save_quantized
from ..techniques import Kind, parse_apply, technique_kind
from ..utils.io import atomic_dir

__all__ = ["export_point"]


def export_point(cfg, row: dict, directory: str | Path) -> Path:
    """Rebuild the point and save it in `directory`, built in a fresh folder that then replaces `directory`: no file
    of an earlier export (a model.onnx of another recommendation) stays beside the new one."""
    directory = Path(directory)
    with atomic_dir(directory) as fresh:
        _export_into(cfg, row, fresh)
    return directory


def _export_into(cfg, row: dict, directory: str | Path) -> Path:
    """Rebuild the point and save it in `directory`.

    Structure and token techniques are saved as a normal checkpoint (weights + config; tokens re-applied on load).
    A quantization technique is saved by `vitlab.quant.save_quantized` (its calibrated scales, and the engine graph
    for deployed int8), calibrated exactly as in the sweep (same images, same seed).
    """
    directory = Path(directory)
    configs = parse_apply(row["apply"])
    torch.manual_seed(0)        # as in the sweep, for a model given by name
    model = create_model(row["source"])
    source_config = load_config(row["source"]) if Path(row["source"]).is_dir() else {}
    metrics = {k: row.get(k) for k in ("metric", "val_score", "test_score", "val_top1", "test_top1", "img_per_s",
                                       "unit", "latency_ms", "macs") if row.get(k)}
    metrics["measured_by"] = "vitlab pareto"
    quant = [c for c in configs if technique_kind(c) == Kind.QUANTIZATION]
    if not quant:
        model = loader.load(model, configs)
        return save_checkpoint(model, directory, preprocessing=source_config.get("preprocessing"),
                               data=source_config.get("data"), metrics=metrics,
                               training=source_config.get("training"))

    result = loader.load(model, configs, calibration=loader.Calibration(cfg.data, "train", cfg.calib_images,
                                                                         cfg.data_dir))
    return save_quantized(result, directory, metrics=metrics)


EXPLAIN_METHODS = ("rollout", "gradcam")   # tried in order: rollout where the model attends globally, else grad-CAM


def explain_point(directory: str | Path, data: str, out: str | Path, *, data_dir: str | None = None,
                  images: int = 4) -> tuple[Path, str]:
    """Draw the exported model at `directory` explaining its top-1 class on the first `images` validation images of
    `data`, with the first of EXPLAIN_METHODS that applies to it; returns (the picture, the method)."""
    model = create_model(str(directory))
    val = dataset_for_model(model, data, "val", data_dir=data_dir)
    x = torch.stack([val[i][0] for i in range(min(images, len(val)))])         # (B, C, H, W) normalized
    pre = resolve_preprocessing(model)
    mean, std = torch.tensor(pre.mean)[:, None, None], torch.tensor(pre.std)[:, None, None]
    refusals = []
    for method in EXPLAIN_METHODS:
        try:
            explanation = explain(model, x, method=method)
        except ExplainError as err:
            refusals.append(f"{method}: {err}")
            continue
        path = plot_explanations((x * std + mean).clamp(0, 1), [explanation], out, class_names=pre.class_names,
                                 titles=[f"val image {i}" for i in range(len(x))])
        return Path(path), method
    raise ExplainError("no explanation method applies to the recommended model: " + "; ".join(refusals))
