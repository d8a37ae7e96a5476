"""`vitlab.measure`: accuracy and speed of a model (plus its technique stack) as flat, comparable rows."""
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..record import record
from .. import loader
from ..data.calibration import calibration_batches  # re-exported: it moved to vitlab.data
from ..profiling import count_flops, environment, num_threads, peak_memory_mb, time_callable
from ..runner import item_shape
from ..techniques import format_technique
from ..data.transforms import dataset_for_model
from ..engine.evaluate import evaluate
from ..quant import quant_mac_fraction_of
from ..quant.engine_choice import EngineChoice, engine_trial as trial, trial_settings
from ..data import build_dense_dataset
from ..dense.engine import TASK_METRIC, evaluate_dense

__all__ = ["MeasureRow", "measure", "print_rows", "build_runner", "dataset_for", "calibration_batches",
           "needs_calibration", "task_accuracy", "throughput_unit", "item_noun", "IMAGE_UNIT", "CLIP_UNIT"]

IMAGE_UNIT, CLIP_UNIT = "img/s", "clips/s"   # what a row's `img_per_s` counts (its `unit`)


def throughput_unit(runner) -> str:
    """The unit of a runner's (or model's) throughput: "clips/s" when its items are clips (C, T, H, W) (a video model,
    one with `num_frames`: `vitlab.runner.item_shape`), "img/s" when they are images (C, H, W)."""
    return CLIP_UNIT if len(item_shape(runner)) == 4 else IMAGE_UNIT


def item_noun(unit: str) -> str:
    """What one item of a throughput `unit` is, for captions ("MACs per clip"): "clip" or "image"."""
    return "clip" if unit == CLIP_UNIT else "image"


@dataclass(frozen=True)
class MeasureRow:
    """One measured point. Accuracies are fractions; MACs are multiply-accumulates and FLOPs = 2 x MACs."""

    model: str
    source: str
    techniques: str                 # the applied stack as --apply text, joined by " + " ("none" if empty)
    engine: str
    data: str | None
    split: str | None
    top1: float | None
    top5: float | None
    loss: float | None
    n: int | None
    params: int
    macs: int
    flops: int
    attention_macs: int
    batch: int
    input_size: tuple[int, int, int]
    dtype: str
    channels_last: bool
    compile: bool
    img_per_s: float
    latency_ms: float
    peak_mem_mb: float | None
    threads: int
    torch: str
    timm: str
    vitlab: str
    cpu: str
    cpu_flags: str = ""             # ISA flags that change engine kernels (vitlab.profiling.cpu), e.g. "avx2 avx512_vnni"
    engine_choice: dict | None = None   # engine=auto: how the engine was chosen (trial timings, cache, or ISA rule)
    quant_mac_fraction: float | None = None   # quantized: MACs run by quantized ops / all MACs, stem and head excluded
    task_metric: str | None = None  # a dense model (vitlab.dense): "pq", "miou" or "ap", measured in place of top-1
    task_score: float | None = None
    unit: str = IMAGE_UNIT          # what img_per_s counts: "img/s", or "clips/s" for a video model (throughput_unit)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["input_size"] = list(self.input_size)
        return out


def needs_calibration(apply) -> bool:
    """Whether a technique stack (configs or --apply text) contains a technique that calibrates on images."""
    return loader.stack_needs_calibration(apply)


def task_accuracy(runner, data: str, split: str, *, data_dir: str | None = None, limit: int | None = None) -> dict:
    """The accuracy of a model or runner on `split` of `data` in its task's metric: {"metric", "score", "n", ...}.

    A classifier scores top-1 (and gives top5 and loss); a dense model (vitlab.dense) its task metric, "pq", "miou"
    or "ap", on the scenes of `data`, with that metric's other fields (sq, rq, ap50, ...) beside it."""
    module = runner if isinstance(runner, torch.nn.Module) else getattr(runner, "module", None)
    dense = record(module).dense
    if dense is not None:
        scenes = build_dense_dataset(data, split, data_dir=data_dir, in_chans=dense["in_chans"])
        result = evaluate_dense(runner, scenes, dense["task"], limit=limit)
        metric = TASK_METRIC[dense["task"]]
        return {**result, "metric": metric, "score": result[metric]}

    result = evaluate(runner, dataset_for(runner, data, split, data_dir=data_dir), limit=limit, progress=False)
    return {**result, "metric": "top1", "score": result["top1"]}


def build_runner(source: str, apply=(), img_size: int | None = None, dtype: str = "fp32",
                 channels_last: bool = False, compile: bool = False, calib_data: str | None = None,
                 calib_split: str = "train", calib_images: int = 256, data_dir: str | None = None,
                 engine_batch: int | None = None, engine_trial: bool | None = None):
    """Model (name or checkpoint) + technique stack -> a runner. Also the peak-memory subprocess's factory.

    A stack with quantization calibrates on `calib_images` images of `calib_data`/`calib_split` (seeded).
    `engine_batch` / `engine_trial`: the batch engine=auto times its trial at, and whether it times one
    (`vitlab.quant.engine_choice.engine_trial`; None keeps the caller's setting).
    """
    settings = trial_settings()
    with trial(batch=engine_batch or settings.batch, enabled=settings.enabled if engine_trial is None else engine_trial,
               rounds=settings.rounds):
        return _build_runner(source, apply, img_size, dtype, channels_last, compile, calib_data, calib_split,
                             calib_images, data_dir)


def _build_runner(source, apply, img_size, dtype, channels_last, compile, calib_data, calib_split, calib_images,
                  data_dir):
    return loader.load_runner(
        source, list(apply), calibration=loader.Calibration(calib_data, calib_split, calib_images, data_dir),
        model_kwargs={"img_size": img_size} if img_size else {}, dtype=dtype, channels_last=channels_last,
        compile=compile, missing_data=lambda stack: ValueError(
            f"{stack} calibrates on images: give --data SPEC (calibration uses --calib-split, default train; --data "
            "synthetic for a speed-only run on random images)"))


def dataset_for(runner, data: str, split: str, *, data_dir: str | None = None, strict: bool = False):
    """The dataset `data`/`split`, preprocessed as the runner's checkpoint (or model) says, its classes checked
    against the model's (`vitlab.data.transforms.dataset_for_model`: the preprocessing every verb uses)."""
    return dataset_for_model(runner, data, split, data_dir=data_dir, strict=strict)


def _model_name(runner, source: str) -> str:
    module = getattr(runner, "module", None)
    spec = record(module).spec
    return spec["name"] if spec else Path(source).name


def measure(source: str, *, apply=(), data: str | None = None, split: str = "test", data_dir: str | None = None,
            eval_limit: int | None = None, batch: int | list[int] = 32, img_size: int | None = None,
            threads: int | None = None, dtype: str = "fp32", channels_last: bool = False, compile: bool = False,
            memory: bool = True, min_time_s: float = 1.0, calib_data: str | None = None,
            calib_split: str = "train", calib_images: int = 256) -> list["MeasureRow"]:
    """Measure `source` (model name or checkpoint folder) with `apply` stacked on it; one row per batch size.

    With `data`, accuracy on that split is measured too (test for final numbers; train/val for selection).
    Throughput is items/s at each batch size (images/s, or clips/s for a video model: the row's `unit`); latency is
    ms at batch 1; both are medians after warm-up.
    A stack with quantization calibrates on `calib_images` images of `calib_data` (default: `data`) from
    `calib_split` (train or val; never test).
    """
    apply = list(apply or [])
    batches = [batch] if isinstance(batch, int) else list(batch)
    rows = []
    with num_threads(threads):
        calib_data = calib_data or data
        calib = dict(calib_data=calib_data, calib_split=calib_split, calib_images=calib_images, data_dir=data_dir)

        # engine=auto times its trial at the first batch measured (unless the caller set one), and the memory
        # subprocess builds with the same settings (a cached choice there: only the winning engine is built)
        settings = trial_settings()
        calib.update(engine_batch=settings.batch or batches[0], engine_trial=settings.enabled)
        runner = build_runner(source, apply, img_size=img_size, dtype=dtype, channels_last=channels_last,
                              compile=compile, **calib)
        module = getattr(runner, "module", None)
        c, h, w = runner.input_size
        shape = item_shape(runner)   # (C, H, W), or (C, T, H, W) for a video model
        accuracy = {"top1": None, "top5": None, "loss": None, "n": None}
        if data is not None:
            result = task_accuracy(runner, data, split, data_dir=data_dir, limit=eval_limit)
            accuracy.update({k: result[k] for k in accuracy if k in result})
            if result["metric"] != "top1":   # a dense model: its task metric (PQ / mIoU / AP) in place of top-1
                accuracy.update(task_metric=result["metric"], task_score=result["score"])
        flops_model = module if module is not None else getattr(runner, "float_module", None)
        counted = count_flops(flops_model, torch.randn(1, *shape)) if flops_model is not None else None
        params = sum(p.numel() for p in flops_model.parameters()) if flops_model is not None else 0
        one = torch.randn(1, *shape)
        latency = time_callable(lambda: runner(one), min_time_s=min_time_s)
        env = environment()
        quant_fraction = quant_mac_fraction_of(runner)
        for b in batches:
            images = torch.randn(b, *shape)
            timing = time_callable(lambda: runner(images), min_time_s=min_time_s)
            peak = None
            if memory:
                peak = peak_memory_mb(
                    "vitlab.bench.measure:build_runner",
                    dict(source=str(source), apply=apply, img_size=img_size, dtype=dtype, channels_last=channels_last,
                         **calib),
                    (b, *shape), threads=torch.get_num_threads(), dtype=dtype)["peak_rss_mb"]
            stack = [format_technique(t) for t in runner.techniques]
            rows.append(MeasureRow(
                model=_model_name(runner, str(source)), source=str(source), techniques=" + ".join(stack) or "none",
                engine=runner.engine, data=data, split=split if data else None, **accuracy,
                params=params, macs=counted.macs if counted else 0, flops=counted.flops if counted else 0,
                attention_macs=counted.attention_macs if counted else 0, batch=b, input_size=(c, h, w), dtype=dtype,
                channels_last=channels_last, compile=compile, img_per_s=b / timing.median_s,
                latency_ms=1000 * latency.median_s, peak_mem_mb=peak, threads=env["threads"], torch=env["torch"],
                timm=env["timm"], vitlab=env["vitlab"], cpu=env["cpu"], cpu_flags=env["cpu_flags"],
                engine_choice=getattr(runner, "engine_choice", None), quant_mac_fraction=quant_fraction,
                unit=throughput_unit(runner)))
    return rows


def print_rows(rows: list[MeasureRow]) -> None:
    """A one-screen table of rows (rich)."""
    from rich.console import Console
    from rich.table import Table

    if not rows:
        return
    has_acc = any(r.top1 is not None for r in rows)
    task_metrics = sorted({r.task_metric for r in rows if r.task_metric})
    has_quant = any(r.quant_mac_fraction is not None for r in rows)
    units = sorted({r.unit for r in rows})
    unit = units[0] if len(units) == 1 else "items/s"     # images and clips in one table: each cell says which
    per = " / ".join(f"per {item_noun(u)}" for u in units)
    table = Table(title=f"vitlab measure  ({rows[0].cpu}; {rows[0].cpu_flags or 'no AVX2'}; {rows[0].threads} threads; "
                        f"torch {rows[0].torch})",
                  caption=f"MACs: multiply-accumulates {per} (papers' \"FLOPs\"); FLOPs = 2 x MACs; "
                          "latency at batch 1, throughput at the batch shown; medians after warm-up"
                          + ("; quant MACs: share of the MACs (stem and head excluded) run by quantized ops"
                             if has_quant else ""))
    for col in ["model", "techniques", "engine"] + (["quant MACs %"] if has_quant else []) + (
            ["top-1 %", "top-5 %"] if has_acc else []) + [f"{m} %" for m in task_metrics] + [
            "params M", "MMACs", "MFLOPs", "batch", unit, "latency ms", "peak MB"]:
        table.add_column(col, justify="left" if col in ("model", "techniques", "engine") else "right")
    for r in rows:
        acc = [f"{100 * r.top1:.2f}" if r.top1 is not None else "-",
               f"{100 * r.top5:.2f}" if r.top5 is not None else "-"] if has_acc else []
        quant = ([f"{100 * r.quant_mac_fraction:.1f}" if r.quant_mac_fraction is not None else "-"]
                 if has_quant else [])
        task = [f"{100 * r.task_score:.2f}" if r.task_metric == m else "-" for m in task_metrics]
        table.add_row(r.model, r.techniques, f"{r.engine} {r.dtype}", *quant, *acc, *task, f"{r.params / 1e6:.3f}",
                      f"{r.macs / 1e6:.1f}", f"{r.flops / 1e6:.1f}", str(r.batch),
                      f"{r.img_per_s:.0f}" + ("" if len(units) == 1 else f" {r.unit}"),
                      f"{r.latency_ms:.2f}", f"{r.peak_mem_mb:.0f}" if r.peak_mem_mb is not None else "-")
    console = Console(width=max(160, Console().width))
    console.print(table)

    for choice in {json.dumps(r.engine_choice, sort_keys=True) for r in rows if r.engine_choice}:
        console.print(EngineChoice(**json.loads(choice)).describe(), highlight=False, markup=False)
