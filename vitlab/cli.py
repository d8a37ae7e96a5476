"""`vitlab <verb>`: each verb parses its arguments, calls one library function, and prints or writes the result."""
import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import sys
import traceback
from pathlib import Path

import torch
from timm.models import model_entrypoint

from .record import record
from ._version import __version__
from .engine.edvit import Split, split_checkpoint
from .engine.progressive import size_list
from .engine.speed import PRECISIONS
from .engine.ssl import METHODS, PretrainConfig, pretrain
from . import loader
from .engine.train import TrainConfig, fit
from .pareto import SweepConfig, run_sweep
from .prune import CRITERIA, Prune, prune_checkpoint, stem_time_weights
from .utils.args import (below_one, fraction, non_negative_int, positive_float, positive_int,
                         probability)
from .utils.cli_fields import ConfigFlags, Flag, arg
from .checkpoint import create_model, load_weights, refuse_out_over_source, save_checkpoint
from .data import build_dense_dataset
from .data.transforms import check_source_classes, dataset_for_model, display_name, resolve_preprocessing
from .engine.evaluate import evaluate, plot_confusion
from .errors import UserError, is_user_error, one_line
from .explain import explain, image_format, method_names, plot_token_sources, token_source_map
from .models.listing import list_models
from .pareto.sweep import metric_label, score, unit_label
from .profiling import tune_allocator
from .prune.lpvit import prunable_linears
from .techniques import Kind, format_technique, parse_apply, technique_kind
from .utils.io import atomic_write_json, atomic_write_text
from .utils.lock import check_writable
from .recipes import recipe_class, recipe_names
from .engine.fastkd import save_teacher_logits
from .engine.video_predict import (PredictTrainConfig, evaluate_predict, fit_predict, is_predict_checkpoint,
                                   load_predictor, predict_datasets)
from .explain.gradcam import CAM_METHODS
from .explain.heads import analyze_heads, write_heads_html
from .explain.plot import plot_explanations
from .explain.robustness import DEFAULT_SEVERITIES, format_rows, robustness
from .predict import load_image, predict

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse with vitlab's error format: one line, `vitlab VERB: error: MESSAGE (see vitlab VERB --help)`, exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        args, extra = self.parse_known_args(args, namespace)
        if extra:  # reported by the verb's parser: "vitlab eval: error: unrecognized arguments: ..."
            verbs = [a for a in self._actions if isinstance(a, argparse._SubParsersAction)]
            verb = verbs[0].choices.get(getattr(args, "verb", None)) if verbs else None
            (verb or self).error(f"unrecognized arguments: {' '.join(extra)}")
        return args


_APPLY_METAVAR = "NAME:key=value,..."
_APPLY_HELP = "technique to apply (repeatable, applied in order: structure -> tokens -> quantization)"


def _add_apply(p: argparse.ArgumentParser) -> None:
    p.add_argument("--apply", action="append", default=[], metavar=_APPLY_METAVAR, help=_APPLY_HELP)
    _add_engine_trial(p)


def _add_engine_trial(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine-trial", default=None, choices=("on", "off"),
                   help="engine=auto (w8a8, bf16): time each installed engine here and keep the fastest (on, the "
                        "default; cached per CPU, model, batch and threads) or use the ISA rule without timing (off)")


def _add_data(p: argparse.ArgumentParser, default: str | None = "fashion-mnist", split: str = "test") -> None:
    p.add_argument("--data", default=default, metavar="SPEC",
                   help="fashion-mnist | imagefolder:PATH | synthetic[:n=N,classes=K] (default: %(default)s)")
    p.add_argument("--split", default=split, choices=("train", "val", "test"),
                   help="train, val (a fixed seeded hold-out of train) or test (default: %(default)s)")
    p.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST idx files (default: Debian's)")
    p.add_argument("--strict", action="store_true", help="a bad image file is an error instead of a skipped warning")


def _add_calib(p: argparse.ArgumentParser) -> None:
    """How `--apply` techniques that calibrate (ptq, w8a8, prune, ...) draw their images from --data."""
    p.add_argument("--calib-images", type=positive_int, default=256, metavar="N",
                   help="calibration images when --apply calibrates, a seeded subset of --data (default: %(default)s)")
    p.add_argument("--calib-split", default="train", choices=("train", "val"),
                   help="split the calibration images come from (never test; default: %(default)s)")


def _add_calib_data(p: argparse.ArgumentParser) -> None:
    """--data only for calibration (verbs that read their images from files: explain, predict)."""
    p.add_argument("--data", default=None, metavar="SPEC", help="images that --apply techniques calibrate on "
                   "(ptq, prune, ...), e.g. fashion-mnist")
    p.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST idx files (default: Debian's)")
    _add_calib(p)


def _add_speed(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=positive_int, default=32, help="batch size for throughput (default: %(default)s)")
    p.add_argument("--img-size", type=positive_int, default=None, help="input size (default: the model's)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads (default: torch's, i.e. all cores)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the model before timing")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocess")
    p.add_argument("--min-time", type=positive_float, default=1.0, metavar="S",
                   help="time each measurement for at least S seconds (default: %(default)s)")
    p.add_argument("--calib-images", type=positive_int, default=256, metavar="N",
                   help="images for calibrating quantization, a seeded subset of --data (default: %(default)s)")
    p.add_argument("--calib-split", default="train", choices=("train", "val"),
                   help="split the calibration images come from (never test; default: %(default)s)")


# `vitlab train` flags: the TrainConfig fields (type and default from the field) in --help order, with the flags
# that are no field (--resume, --overwrite, --engine-trial and the dense / predict task's) at their places
_TRAIN = ConfigFlags(TrainConfig, {
    "model": Flag(help="model name (timm or vitlab)"),
    "init": Flag(metavar="CHECKPOINT", help="start from this checkpoint's weights"),
    "resume": arg("--resume", default=None, metavar="RUN_DIR",
                  help="continue the run in RUN_DIR (with its settings; --epochs may extend it)"),
    "out": Flag(default=None, metavar="RUN_DIR", help="run folder (checkpoint, train_state.pt, metrics.jsonl)"),
    "overwrite": arg("--overwrite", action="store_true",
                     help="replace the run already in --out (deleted only once the new run has finished)"),
    "data": Flag(metavar="SPEC"),
    "data_dir": Flag(),
    "model_kwargs": Flag(default="{}", metavar="JSON", help='constructor kwargs, e.g. \'{"depth": 4}\'',
                         to_field=lambda text: _json_arg(text, "--model-kwargs")),
    "epochs": Flag(type=positive_float),
    "batch_size": Flag(type=positive_int, help="global batch over all processes"),
    "lr": Flag(type=positive_float),
    "min_lr": Flag(),
    "weight_decay": Flag(),
    "warmup_epochs": Flag(),
    "opt": Flag(names=("--opt", "--optimizer"),
                help="any timm.optim name (muon: Muon on hidden weight matrices, AdamW on the classifier, position "
                     "embeddings and tokens), or sam (SAM around AdamW, with --sam-rho); dense tasks: adamw or muon "
                     "(default: %(default)s)"),
    "sam_rho": Flag(help="SAM neighbourhood radius (default: %(default)s)"),
    "teacher": Flag(metavar="CHECKPOINT", help="distill from this checkpoint (DeiT)"),
    "distill": Flag(choices=("soft", "hard", "token"), help="distillation loss"),
    "distill_alpha": Flag(type=probability, help="weight of the distillation term"),
    "distill_tau": Flag(type=positive_float, help="soft distillation temperature"),
    "l1": Flag(metavar="LAMBDA", help="L1 penalty on the blocks' Linear weights (Sparse-then-Prune, before pruning)"),
    "keep_zeros": Flag(help="hold the blocks' zero Linear weights at zero while training (a block-sparse LPViT "
                            "model stays sparse); default: on for an --init checkpoint written by vitlab prune "
                            "--apply lpvit"),
    "token_consistency": Flag(metavar="WEIGHT", help="MCTF token-reduction consistency loss weight (official 3.0; "
                                                     "needs --apply mctf:r=... or tome)"),
    "token_consistency_threshold": Flag(type=probability, help="student confidence an image needs to enter the "
                                                               "consistency term (default: %(default)s)"),
    "token_consistency_teacher_r": Flag(metavar="R_MAX", help="the teacher merges r ~ U{0..R_MAX-1} tokens per block "
                                                              "(default: r // 2, as MCTF's 16/8)"),
    "precision": Flag(choices=PRECISIONS, help="bf16 autocast; auto: bf16 only where a trial on the first batch "
                                               "measures it faster on this machine (default: %(default)s)"),
    "compile": Flag(help="torch.compile the training forward (falls back to eager, with a warning, where it fails)"),
    "channels_last": Flag(help="channels-last memory format (convolutions)"),
    "progressive_sizes": Flag(type=size_list, metavar="PX,PX,...",
                              help="train equal phases of the run at these image sides, e.g. 20,24,28 (the model "
                                   "must take any size)"),
    "recipe": Flag(metavar="NAME[:key=value,...]", help="a training recipe that changes each step's loss "
                                                        "(vitlab.engine.recipes; `vitlab models --recipes` lists "
                                                        "them)"),
    "label_smoothing": Flag(type=below_one),
    "mixup": Flag(help="mixup alpha (0: off)"),
    "cutmix": Flag(help="cutmix alpha (0: off)"),
    "hflip": Flag(type=probability),
    "crop_padding": Flag(),
    "re_prob": Flag(type=probability, help="random erasing probability"),
    "drop_path": Flag(type=below_one),
    "ema": Flag(type=below_one, help="EMA decay, e.g. 0.999 (0: off)"),
    "clip_grad": Flag(to_field=lambda value: value or None),   # 0: no clipping
    "seed": Flag(),
    "threads": Flag(type=positive_int),
    "workers": Flag(help="data-loading processes (0: in the main process)"),
    "eval_val": Flag(names=("--no-val",), help="skip the per-epoch evaluation on the val split"),
    "save_every": Flag(metavar="STEPS", help="also save resume state every STEPS"),
    "max_steps": Flag(type=positive_int, help="stop after this many steps (smoke runs)"),
    "progress": Flag(),
    "apply": Flag(action="append", default=[], metavar=_APPLY_METAVAR, help=_APPLY_HELP),
    "engine_trial": _add_engine_trial,
    "task": arg("--task", default="classify", choices=("classify", "panoptic", "semantic", "detection", "predict"),
                help="classify (default), or a dense task on --data fmnist-scenes / coco:PATH with --head; --model "
                     "is then the backbone, --init a classification checkpoint to start it from (docs/dense.md); "
                     "predict: next-frame prediction on --data moving-fashion-mnist (docs/video.md)"),
    "head": arg("--head", default=None, metavar="NAME[:key=value,...]",
                help="dense head (vitlab.dense; docs/dense.md lists them and the tasks each does)"),
    "steps": arg("--steps", type=positive_int, default=None,
                 help="dense and predict tasks: optimizer steps (default: 2000)"),
    "warmup_steps": arg("--warmup-steps", type=non_negative_int, default=None,
                        help="dense and predict tasks: linear warm-up steps (default: steps // 20)"),
    "eval_every": arg("--eval-every", type=non_negative_int, default=0, metavar="STEPS",
                      help="dense and predict tasks: evaluate on val and save every STEPS (0, the default: at the "
                           "end)"),
}, exclude={"log_every": "how often metrics.jsonl gets a training row: a library setting, no flag"})


def _add_train_parser(verbs: argparse._SubParsersAction) -> None:
    _TRAIN.add_to(verbs.add_parser("train", help="train or fine-tune a model"))


def _add_distill_logits_parser(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("distill-logits", help="run a teacher once over a training run's augmented images and store "
                         "its top-k probabilities for vitlab train --recipe fastkd:store=STORE (TinyViT)")
    p.add_argument("teacher", metavar="TEACHER", help="teacher checkpoint folder (or model name)")
    p.add_argument("--out", required=True, metavar="STORE", help="store folder (logits.safetensors + manifest.json)")
    p.add_argument("--overwrite", action="store_true", help="replace the store already in --out")
    p.add_argument("--topk", type=positive_int, default=10, help="probabilities kept per image (default: %(default)s)")
    p.add_argument("--data", default="fashion-mnist", metavar="SPEC")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=positive_float, default=10, help="the student run's --epochs")
    p.add_argument("--batch-size", type=positive_int, default=128, help="the student run's global --batch-size")
    p.add_argument("--seed", type=non_negative_int, default=0, help="the student run's --seed")
    p.add_argument("--hflip", type=probability, default=0.5)
    p.add_argument("--crop-padding", type=non_negative_int, default=None)
    p.add_argument("--re-prob", type=probability, default=0.0, help="random erasing probability")
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--workers", type=non_negative_int, default=0, help="data-loading processes")
    p.add_argument("--no-progress", action="store_true")


def _stem_weight(text: str) -> float | tuple[float, ...] | str:
    """--stem-weight: one number, one per stem layer, or "auto" (cmd_prune measures it on the model)."""
    if text == "auto":
        return text
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--stem-weight {text!r}: give numbers (1 or one per stem layer, e.g. 14.8,0.95,0.82) or "
                         "auto") from None
    return values[0] if len(values) == 1 else values


# `vitlab prune` flags: the Prune fields in --help order, with the flags that are no field at their places
_PRUNE = ConfigFlags(Prune, {
    "checkpoint": arg("checkpoint", help="checkpoint folder (or model name)"),
    "target_flops": Flag(type=fraction, group="target", help="fraction of MACs to keep (default: %(default)s)"),
    "target_params": Flag(type=fraction, group="target", help="fraction of parameters to keep instead"),
    "importance": Flag(help="criterion, ranked globally across layers (default: %(default)s, NViT)"),
    "blocks": Flag(help="also remove whole blocks"),
    "heads": Flag(help="keep every attention head"),
    "mlp": Flag(help="keep every MLP channel"),
    "mlp_group": Flag(type=positive_int, help="MLP channels pruned together (default: %(default)s)"),
    "stem": Flag(help="also prune conv-stem channels (whole GroupNorm groups)"),
    "stem_weight": Flag(default="1", metavar="W[,W...]|auto", to_field=_stem_weight,
                        help="ranking cost of a stem MAC vs a block MAC, one or one per stem layer; auto: measure CPU "
                             "time per MAC here (default: %(default)s = MACs)"),
    "embed": Flag(help="also prune embedding (residual) channels"),
    "embed_group": Flag(type=positive_int, help="embedding channels pruned together (default: %(default)s)"),
    "apply": arg("--apply", default=None, metavar="TECHNIQUE",
                 help="another pruning technique in --apply syntax instead of the options above, e.g. "
                      "lpvit:sparsity=0.5 (LPViT block-structured pruning)"),
    "data": arg("--data", default=None, metavar="SPEC", help="images for taylor / hessian / ablation"),
    "split": arg("--split", default="train", choices=("train", "val"), help="(never test; default: %(default)s)"),
    "data_dir": arg("--data-dir", default=None),
    "calib_images": arg("--calib-images", type=positive_int, default=512, metavar="N", help="(default: %(default)s)"),
    "threads": arg("--threads", type=positive_int, default=None),
    "out": arg("--out", required=True, metavar="DIR", help="folder for the pruned checkpoint"),
})


def _add_prune_parser(verbs: argparse._SubParsersAction) -> None:
    _PRUNE.add_to(verbs.add_parser("prune", help="structured pruning (heads, MLP channels, blocks, stem/embedding "
                                   "channels) to a FLOPs/params target"))


def _add_eval_parser(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("eval", help="accuracy, loss, per-class accuracy and confusion matrix of a checkpoint")
    p.add_argument("checkpoint")
    _add_data(p)
    _add_apply(p)
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N images")
    p.add_argument("--tta", choices=("flip",), default=None,
                   help="test-time augmentation: flip scores each image by the mean softmax of it and its mirror")
    p.add_argument("--out", default=None, metavar="DIR", help="write metrics.json and confusion.png here")
    _add_calib(p)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def _add_bench_parser(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("bench", help="parameters, MACs/FLOPs, throughput, latency and peak memory")
    p.add_argument("model", help="model name or checkpoint folder")
    p.add_argument("--data", default=None, metavar="SPEC",
                   help="calibration images for a quantization technique (synthetic: random images, speed only)")
    p.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST idx files (default: Debian's)")
    _add_speed(p)
    _add_apply(p)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def _add_measure_parser(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("measure", help="accuracy and speed of a model in one table (the main job)")
    p.add_argument("models", nargs="+", help="model names or checkpoint folders")
    _add_data(p)
    _add_speed(p)
    _add_apply(p)
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N images")
    p.add_argument("--out", default=None, metavar="FILE.jsonl", help="append the rows to this file")
    p.add_argument("--json", action="store_true", help="print the rows as JSON lines")


def _add_predict_parser(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("predict", help="top-5 classes of images")
    p.add_argument("checkpoint")
    p.add_argument("images", nargs="+")
    p.add_argument("--top", type=positive_int, default=5)
    p.add_argument("--json", action="store_true")
    _add_apply(p)
    _add_calib_data(p)
    p.add_argument("--out", default=None, metavar="FILE.png|DIR",
                   help="dense checkpoints: the PNG with masks and boxes drawn (a folder for several images)")
    p.add_argument("--threshold", type=probability, default=0.5,
                   help="dense detection: draw boxes scoring at least this (default: %(default)s)")


def _add_explain_parser(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("explain", help="explanations: attention rollout, attention maps, CAMs, token sources")
    p.add_argument("checkpoint", help="checkpoint folder or model name")
    p.add_argument("--image", required=True, action="append", help="image file (repeatable: one row each)")
    p.add_argument("--method", default=None, help="rollout (default), attention, sources, or any other of "
                   "vitlab.explain.method_names() (gradcam, tame, ...)")
    p.add_argument("--tokens", action="store_true", help="same as --method sources: draw which input patches each "
                   "surviving token of a token-reduced model stands for")
    p.add_argument("--layer", type=non_negative_int, default=None, help="--method attention: attention layer; grad-CAM family "
                   "(gradcam, gradcam++, layercam, eigencam): block index (default: the last)")
    p.add_argument("--head", type=non_negative_int, default=None, help="--method attention: head (default: mean over heads)")
    p.add_argument("--tame", default=None, metavar="DIR", help="--method tame: the explainer `vitlab train-tame` wrote")
    p.add_argument("--out", required=True, metavar="FILE.png")
    _add_calib_data(p)
    _add_apply(p)


def _add_robustness_parser(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("robustness", help="accuracy and calibration (ECE, temperature scaling) under patch "
                         "drop, shuffle and occlusion")
    p.add_argument("model", help="checkpoint folder or model name")
    p.add_argument("--data", default="fashion-mnist", metavar="SPEC",
                   help="fashion-mnist | imagefolder:PATH | synthetic[:n=N,classes=K] (default: %(default)s)")
    p.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST idx files (default: Debian's)")
    p.add_argument("--limit", type=positive_int, default=1000, help="first N test images (default: %(default)s)")
    p.add_argument("--val-limit", type=positive_int, default=1000,
                   help="first N val images the temperature is fitted on (default: %(default)s)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the perturbations (default: %(default)s)")
    p.add_argument("--perturbations", nargs="+", default=None, metavar="NAME",
                   help="drop_zero drop_mean shuffle occlusion adversarial (default: all, at the severities of "
                        "vitlab.explain.robustness.DEFAULT_SEVERITIES)")
    p.add_argument("--batch-size", type=positive_int, default=250)
    p.add_argument("--threads", type=positive_int, default=None)
    _add_calib(p)
    p.add_argument("--out", default=None, metavar="FILE.json", help="write the table's rows here")
    _add_apply(p)


def _add_heads_parser(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("heads", help="attention-head analytics (ablation and gradient importance, attention "
                         "distance and entropy) as one HTML page")
    p.add_argument("model", help="checkpoint folder or model name")
    _add_data(p, split="val")
    p.add_argument("--images", type=positive_int, default=500, help="first N images of --split (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=100)
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--calib-images", type=positive_int, default=256, metavar="N",
                   help="calibration images when --apply calibrates, a seeded subset of --data (default: %(default)s)")
    p.add_argument("--calib-split", default="train", choices=("train", "val"))
    p.add_argument("--out", required=True, metavar="FILE.html")
    _add_apply(p)


def _add_convert_parser(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("convert", help="wrap a weights file (safetensors, or pickle with --allow-pickle) as a checkpoint")
    p.add_argument("model", help="model name the weights belong to")
    p.add_argument("weights", help="weights file: .safetensors, or .pt/.pth/.bin with --allow-pickle")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--model-kwargs", default="{}", metavar="JSON")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read a pickle-based file (only with torch.load(weights_only=True))")


# `vitlab pareto` flags: the SweepConfig fields in --help order, with the flags that are no field at their places
_PARETO = ConfigFlags(SweepConfig, {
    "source": Flag(names=("model",), help="model name or checkpoint folder (the base)"),
    "data": Flag(metavar="SPEC", help="dataset: val split for selection, train for calibration, test for the final "
                                      "number"),
    "data_dir": Flag(help="folder of the Fashion-MNIST idx files (default: Debian's)"),
    "out": Flag(metavar="DIR", help="output folder (an existing sweep there resumes)"),
    "max_drop_pt": Flag(metavar="PT", help="accuracy budget: points within PT percentage points of the base top-1 "
                                           "(default: %(default)s)"),
    "techniques": Flag(action="append", metavar="STACKS",
                       help="stacks to measure, ';'-separated, techniques in a stack joined by '+', e.g. "
                            "\"none; tome:r=4; w8a8; tome:r=4+w8a8\" (default: a sweep chosen for the model)"),
    "candidates": Flag(nargs="*", metavar="DIR", to_field=list,
                       help="more checkpoint folders (e.g. pruned models) measured with the candidate stacks"),
    "confirm_rounds": Flag(metavar="N", help="at the end, time every deployable point again round-robin over N "
                                             "rounds and rank by the median (0: keep each point's single pass) "
                                             "(default: %(default)s)"),
    "budget_minutes": Flag(type=positive_float, metavar="N", help="stop starting new points when N minutes have "
                                                                  "passed; report what was measured"),
    "batch": Flag(type=positive_int, help="batch size for throughput (default: %(default)s)"),
    "threads": Flag(type=positive_int, help="torch threads (default: all cores)"),
    "calib_images": Flag(type=positive_int, metavar="N", help="quantization calibration images from the train split "
                                                              "(default: %(default)s)"),
    "min_time_s": Flag(names=("--min-time",), type=positive_float, metavar="S",
                       help="seconds per timing (default: %(default)s)"),
    "memory": Flag(help="skip the peak-memory subprocess of each point"),
    "val_limit": Flag(type=positive_int, metavar="N", help="validate on the first N images only"),
    "export": Flag(help="do not export the recommended point"),
    "restart": Flag(help="discard the results already in --out"),
    "progress": arg("--no-progress", action="store_true"),
    "engine_trial": _add_engine_trial,
})


def _add_pareto_parser(verbs: argparse._SubParsersAction) -> None:
    _PARETO.add_to(verbs.add_parser(
        "pareto", help="the main job: sweep techniques and stacks, find the accuracy/speed front, recommend one",
        description="Measure a model and a sweep of technique stacks on the validation split, draw the "
                    "accuracy/throughput Pareto front, recommend the fastest point within --max-drop-pt of the base, "
                    "report its test accuracy, and export it. Writes report.html, results.json/.csv and PNG plots."))


def _add_quantize_parser(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("quantize", help="post-training quantization: simulated (ptq) or real int8 (w8a8, w8)")
    p.add_argument("checkpoint", help="checkpoint folder or model name")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the quantized model (reload: create_model)")
    _add_apply(p)
    _add_data(p, default=None, split="train")
    p.add_argument("--calib-images", type=positive_int, default=256, metavar="N",
                   help="calibration images, a seeded subset of --data/--split (default: %(default)s)")
    p.add_argument("--threads", type=positive_int, default=None)


def _add_export_parser(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("export", help="export a float or quantized model to ONNX or OpenVINO IR")
    p.add_argument("checkpoint", help="checkpoint folder (a quantized one too) or model name")
    p.add_argument("--format", required=True, choices=("onnx", "openvino"))
    p.add_argument("--out", required=True, metavar="DIR")
    _add_apply(p)
    _add_data(p, default=None, split="train")
    p.add_argument("--calib-images", type=positive_int, default=256, metavar="N",
                   help="calibration images when --apply quantizes (default: %(default)s)")
    p.add_argument("--threads", type=positive_int, default=None)


# `vitlab pretrain` flags: the PretrainConfig fields in --help order
_PRETRAIN = ConfigFlags(PretrainConfig, {
    "model": Flag(names=("model",), metavar="MODEL", help="model name or checkpoint folder (the backbone)"),
    "method": Flag(default=None, required=True, choices=METHODS,
                   help="sit: rotation + contrastive + corrupted-image reconstruction; tov-vicreg: VICReg + "
                        "temporal-order verification on generated frame sequences; videomae: masked tubelet "
                        "reconstruction on clips (vl_videomae_* backbones, video data); videomae2: VideoMAE "
                        "with V2's dual masking (the decoder reconstructs a running-cell half of the tubelets)"),
    "out": Flag(metavar="RUN_DIR", help="folder for the backbone checkpoint"),
    "overwrite": arg("--overwrite", action="store_true", help="replace a checkpoint already in --out"),
    "data": Flag(metavar="SPEC", help="images of its train split (labels unused)"),
    "data_dir": Flag(),
    "model_kwargs": Flag(default="{}", metavar="JSON", help='constructor kwargs, e.g. \'{"depth": 4}\'',
                         to_field=lambda text: _json_arg(text, "--model-kwargs")),
    "epochs": Flag(type=positive_float),
    "batch_size": Flag(type=positive_int),
    "lr": Flag(type=positive_float),
    "weight_decay": Flag(),
    "warmup_epochs": Flag(),
    "seed": Flag(),
    "threads": Flag(type=positive_int),
    "max_steps": Flag(type=positive_int, help="stop after this many steps (smoke runs)"),
    "progress": Flag(),
}, exclude={"min_lr": "the cosine schedule's floor: a library setting, no flag",
            "clip_grad": "SiT's gradient clipping (3.0): a library setting, no flag"})


def _add_pretrain_parser(verbs: argparse._SubParsersAction) -> None:
    _PRETRAIN.add_to(verbs.add_parser("pretrain", help="self-supervised pretraining of a backbone without labels "
                                      "(SiT, TOV-VICReg); fine-tune the result with `vitlab train --init RUN`"))


def _add_train_tame_parser(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("train-tame", help="train a T-TAME explainer (attention mechanism on the frozen model)")
    p.add_argument("checkpoint", help="checkpoint folder or model name")
    p.add_argument("--data", required=True, help="dataset spec, e.g. fashion-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", required=True, metavar="DIR", help="writes DIR/explainer.safetensors and metrics.json")
    p.add_argument("--epochs", type=positive_float, default=1.0)
    p.add_argument("--steps", type=positive_int, default=None, help="stop after N steps (overrides --epochs)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--lr", type=positive_float, default=1e-3, help="one-cycle peak of SGD (default: %(default)s)")
    p.add_argument("--eval-images", type=non_negative_int, default=1000, help="AD/IC on the first N test images")
    p.add_argument("--mask", choices=("pixels", "input"), default="pixels", help="training masks the raw pixels "
                   "(as AD/IC do; the official 'renormalize' policy) or the preprocessed image (official 'new')")
    p.add_argument("--threads", type=positive_int, default=None)


# `vitlab split` flags: the Split fields in --help order, with the flags that are no field at their places
_SPLIT = ConfigFlags(Split, {
    "checkpoint": arg("checkpoint", help="checkpoint folder (or model name)"),
    "parts": Flag(type=positive_int, help="sub-models (devices) (default: %(default)s)"),
    "data": arg("--data", required=True, metavar="SPEC", help="training data (calibration, fine-tuning, fusion)"),
    "data_dir": arg("--data-dir", default=None),
    "out": arg("--out", required=True, metavar="DIR", help="writes DIR/split.json and DIR/split.safetensors"),
    "target_flops": Flag(type=fraction, help="fraction of the MACs each sub-model keeps (default: %(default)s)"),
    "importance": Flag(choices=CRITERIA),
    "calib_images": Flag(type=positive_int, metavar="N"),
    "steps": Flag(help="fine-tuning steps per sub-model"),
    "batch_size": Flag(type=positive_int),
    "lr": Flag(type=positive_float),
    "fusion_images": Flag(type=positive_int, metavar="N"),
    "fusion_steps": Flag(type=positive_int),
    "eval_split": arg("--eval-split", default="val", choices=("val", "test")),
    "seed": Flag(),
    "threads": arg("--threads", type=positive_int, default=None),
}, exclude={"fusion_hidden": "the fusion MLP's width: a library setting, no flag"})


def _add_split_parser(verbs: argparse._SubParsersAction) -> None:
    _SPLIT.add_to(verbs.add_parser("split", help="ED-ViT: split a ViT into class-subset sub-models, prune each for "
                                   "its classes, fine-tune, fuse with an MLP"))


def _add_toy_parser(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("toy", help="the seeds' agents, multimodal models and generators at toy scale (AlphaViT, "
                         "CALVIN, Seer, ...): run one, or list them")
    p.add_argument("name", nargs="?", default=None, metavar="NAME", help="the toy to run (omit to list them)")
    p.add_argument("--out", default=None, metavar="DIR", help="folder for metrics.json and artefacts "
                   "(default: toy-out/NAME)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--quick", action="store_true", help="a smoke run of a few seconds instead of the full toy")
    p.add_argument("--threads", type=positive_int, default=None)


def _add_search_parser(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("search", help="ViT-ResNAS architecture search: supernet, then evolution / random / NSGA-II "
                         "under a MAC or CPU-latency budget (docs/search.md)")
    p.add_argument("--space", default="resnas", choices=["resnas", "tiny", "hiera", "hiera-tiny"],
                   help="search space: resnas (ViT-ResNAS), hiera (Hiera blocks with mask-unit attention, the TurboViT "
                   "proxy search), tiny / hiera-tiny for tests (default: %(default)s)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-macs", type=positive_float, default=None, metavar="M", help="MAC budget per image")
    budget.add_argument("--latency-ms", type=positive_float, default=None, metavar="L",
                        help="batch-1 latency budget on this CPU at --threads threads")
    p.add_argument("--evaluations", type=positive_int, default=30, help="nets scored per method (default: %(default)s)")
    p.add_argument("--methods", default="evolution,random,nsga2", help="comma-separated (default: %(default)s)")
    p.add_argument("--supernet", default=None, metavar="DIR", help="reuse the supernet of an earlier search's --out")
    p.add_argument("--steps", type=positive_int, default=300, help="supernet training steps (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--nets-per-batch", type=positive_int, default=4, help="sampled nets per batch (default: %(default)s)")
    p.add_argument("--val-images", type=positive_int, default=1000, help="val images that score a net (default: %(default)s)")
    p.add_argument("--out", required=True, metavar="DIR", help="search.json, supernet/ and the best net's checkpoint best/")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--threads", type=positive_int, default=1)


def _add_models_parser(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("models", help="list model names with parameter counts")
    p.add_argument("pattern", nargs="?", default="vl_*", help="glob, e.g. 'deit*' or '*' (default: %(default)s)")
    p.add_argument("--no-params", action="store_true", help="names only")
    p.add_argument("--recipes", action="store_true", help="list the training recipes (vitlab train --recipe) instead")



_VERBS = (_add_train_parser, _add_distill_logits_parser, _add_prune_parser, _add_eval_parser, _add_bench_parser,
          _add_measure_parser, _add_predict_parser, _add_explain_parser, _add_robustness_parser, _add_heads_parser,
          _add_convert_parser, _add_pareto_parser, _add_quantize_parser, _add_export_parser, _add_pretrain_parser,
          _add_train_tame_parser, _add_split_parser, _add_toy_parser, _add_search_parser, _add_models_parser)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vitlab", description="Vision Transformers that are accurate and fast.")
    parser.add_argument("--version", action="version", version=f"vitlab {_version()}")
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of a user error too (or set VITLAB_DEBUG=1)")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for add in _VERBS:   # the order of `vitlab --help`
        add(verbs)
    for p in verbs.choices.values():  # `vitlab --debug VERB ...` and `vitlab VERB ... --debug` both work
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _version() -> str:
    return __version__


def _threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)


def _check_out(out: str) -> None:
    """An --out folder that cannot be written is an error before any work (train, prune and pareto check it when
    they lock it)."""
    check_writable(out, "--out")


def _engine_trial(args):
    """engine=auto's trial runs at the batch this verb will run (--batch, else --batch-size) with --engine-trial."""
    if not hasattr(args, "engine_trial"):   # a verb that deploys nothing
        return contextlib.nullcontext()
    from .quant.engine_choice import engine_trial

    batch = getattr(args, "batch", None) or getattr(args, "batch_size", None)
    flag = getattr(args, "engine_trial", None)
    return engine_trial(batch=batch if isinstance(batch, int) and batch > 0 else None,
                        enabled=None if flag is None else flag == "on")


def _given_flags(args, verb: str) -> set[str] | None:
    """The dests of `verb`'s options given on the command line (main() keeps argv as args._argv), or None."""
    argv = getattr(args, "_argv", None)
    if argv is None:
        return None
    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[verb]
    dests = {a.dest for a in sub._actions} - {a.dest for a in parser._actions}   # not help, --debug, ...
    for action in sub._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) & dests


def cmd_train(args) -> int:
    if args.task == "predict" or (args.resume and _is_predict(args.resume)):
        return _train_predict(args)
    if args.task != "classify" or (args.resume and _is_dense(args.resume)):
        return _train_dense(args)
    if args.resume and args.overwrite:
        raise UserError("--resume continues a run and --overwrite replaces one: give one of them")
    if not args.resume and not args.out:
        raise ValueError("give --out RUN_DIR (or --resume RUN_DIR)")
    settings = _TRAIN.values(args)
    if args.resume:
        # every flag given with --resume is either applied (epochs, threads, ...) or refused by name: never ignored
        given = _given_flags(args, "train")
        if given is None:   # called without main(): flags that differ from their defaults count as given
            defaults = vars(_parser().parse_args(["train"]))
            given = {k for k, v in vars(args).items() if k in defaults and defaults[k] != v}
        given -= {"resume"}
        to_field = _TRAIN.dests
        unknown = sorted(d for d in given if d not in to_field)
        if unknown:
            raise UserError(f"--resume {args.resume}: {', '.join('--' + d.replace('_', '-') for d in unknown)} "
                             "cannot be changed for a resumed run; drop it")
        changes = {to_field[d]: settings[to_field[d]] for d in given}
        out = fit(resume=args.resume, changes=changes)
    else:
        out = fit(TrainConfig(**settings), overwrite=args.overwrite)
    if os.environ.get("RANK", "0") == "0":
        print(f"checkpoint: {out}")
    return 0


# flags of `vitlab train` a dense task reads (dest -> DenseTrainConfig field); any other given is refused by name
_DENSE_TRAIN_FIELDS = {"head": "head", "model": "backbone", "init": "init", "model_kwargs": "backbone_kwargs",
                       "data": "data", "data_dir": "data_dir", "steps": "steps", "batch_size": "batch_size",
                       "lr": "lr", "min_lr": "min_lr", "weight_decay": "weight_decay", "opt": "opt", "warmup_steps": "warmup",
                       "clip_grad": "clip_grad", "seed": "seed", "threads": "threads", "eval_every": "eval_every",
                       "no_progress": "progress"}


def _given_train_flags(args) -> set[str]:
    """The `vitlab train` flags the user gave, less --task (called without main(): those that differ from their
    defaults)."""
    given = _given_flags(args, "train")
    if given is None:
        defaults = vars(_parser().parse_args(["train"]))
        given = {k for k, v in vars(args).items() if k in defaults and defaults[k] != v}
    return given - {"task"}


def _refuse_flags_on_resume(args, given: set[str], what: str) -> None:
    """A step-budgeted run (dense, prediction) resumes with its saved settings: any other flag given is refused."""
    extra = sorted(given - {"resume"})
    if extra:
        raise UserError(f"--resume {args.resume}: a {what} run continues with its own settings; drop "
                        f"{', '.join('--' + d.replace('_', '-') for d in extra)}")


def _step_settings(args, fields: dict[str, str], given: set[str]) -> dict:
    """The config fields of a step-budgeted run (dense, prediction) from the flags in `given`; `fields` maps flag
    dest -> config field."""
    values = {"model_kwargs": _json_arg(args.model_kwargs, "--model-kwargs"), "no_progress": not args.no_progress,
              "clip_grad": args.clip_grad or None}
    return {field: values.get(dest, getattr(args, dest)) for dest, field in fields.items() if dest in given}


def _train_dense(args) -> int:
    """`vitlab train --task panoptic|semantic|detection --head NAME`: vitlab.dense.engine.fit_dense."""
    from .dense.engine import DenseTrainConfig, fit_dense
    from .dense.heads import head_names

    given = _given_train_flags(args)
    if args.resume:
        _refuse_flags_on_resume(args, given, "dense")
        print(f"checkpoint: {fit_dense(resume=args.resume)}")
        return 0
    other = sorted(given - set(_DENSE_TRAIN_FIELDS) - {"out", "overwrite"})
    if other:
        raise UserError(f"--task {args.task}: {', '.join('--' + d.replace('_', '-') for d in other)}: for "
                        "classification only (--task classify); drop them")
    if not args.head:
        raise UserError(f"--task {args.task} needs --head NAME; heads for it: {', '.join(head_names(args.task))}")
    if not args.out:
        raise UserError("give --out RUN_DIR (or --resume RUN_DIR)")
    settings = _step_settings(args, _DENSE_TRAIN_FIELDS, given | {"head"})
    out = fit_dense(DenseTrainConfig(out=args.out, task=args.task, **settings), overwrite=args.overwrite)
    print(f"checkpoint: {out}")
    return 0


# flags of `vitlab train` --task predict reads (dest -> PredictTrainConfig field); any other given is refused by name
_PREDICT_TRAIN_FIELDS = {"model": "model", "model_kwargs": "model_kwargs", "data": "data", "data_dir": "data_dir",
                         "steps": "steps", "batch_size": "batch_size", "lr": "lr", "min_lr": "min_lr",
                         "weight_decay": "weight_decay", "warmup_steps": "warmup", "clip_grad": "clip_grad",
                         "seed": "seed", "threads": "threads", "eval_every": "eval_every", "no_progress": "progress"}


def _is_predict(checkpoint: str) -> bool:
    """Whether `checkpoint` is a frame-prediction checkpoint (vitlab train --task predict)."""
    return is_predict_checkpoint(checkpoint)


def _train_predict(args) -> int:
    """`vitlab train --task predict`: vitlab.engine.video_predict.fit_predict (MSE on the next frames)."""
    given = _given_train_flags(args)
    if args.resume:
        _refuse_flags_on_resume(args, given, "prediction")
        print(f"checkpoint: {fit_predict(resume=args.resume)}")
        return 0
    other = sorted(given - set(_PREDICT_TRAIN_FIELDS) - {"out", "overwrite"})
    if other:
        raise UserError(f"--task predict: {', '.join('--' + d.replace('_', '-') for d in other)}: not used by "
                        "frame prediction; drop them")
    if not args.out:
        raise UserError("give --out RUN_DIR (or --resume RUN_DIR)")
    settings = _step_settings(args, _PREDICT_TRAIN_FIELDS, given)
    out = fit_predict(PredictTrainConfig(out=args.out, **settings), overwrite=args.overwrite)
    print(f"checkpoint: {out}")
    return 0


def _eval_predict(args) -> int:
    """`vitlab eval` of a prediction checkpoint: MSE / MAE per frame and SSIM on --data (default: its own data)."""
    _threads(args.threads)
    if args.out:
        _check_out(args.out)
    model = load_predictor(args.checkpoint)
    config = record(model).config
    given = _given_flags(args, "eval")
    data = args.data if given is None or "data" in given else config["data"].get("spec", args.data)
    (dataset,) = predict_datasets(model, data, (args.split,), args.data_dir)
    if args.apply:   # techniques on the predictor; calibration: the input frames of --calib-split clips of data
        def frames(model):
            (source,) = predict_datasets(model, data, (args.calib_split,), args.data_dir)
            return [torch.stack([source[i][0] for i in range(min(args.calib_images, len(source)))])]

        model = loader.load(model, args.apply, calibration=frames)
    result = evaluate_predict(model, dataset, batch_size=min(args.batch_size, 64), limit=args.limit,
                              progress=not args.json)
    print(f"{args.checkpoint} (predict, {config['model']['name']}) on {data} [{args.split}], "
          f"{result['n']} clips")
    print(f"  MSE/frame {result['mse']:.2f}   MAE/frame {result['mae']:.2f}   MSE/pixel {result['mse_pixel']:.5f}   "
          f"SSIM {result['ssim']:.4f}")
    print("  MSE/frame by step: " + " ".join(f"{v:.1f}" for v in result["mse_per_frame"]))
    if args.out:
        atomic_write_json(Path(args.out) / "metrics.json", {**result, "data": data, "split": args.split})
        print(f"  wrote {Path(args.out) / 'metrics.json'}")
    if args.json:
        print(json.dumps({**result, "task": "predict", "data": data, "split": args.split,
                          "checkpoint": args.checkpoint}))
    return 0


def cmd_distill_logits(args) -> int:
    _threads(args.threads)
    m = save_teacher_logits(args.teacher, args.out, data=args.data, data_dir=args.data_dir, epochs=args.epochs,
                            batch_size=args.batch_size, seed=args.seed, topk=args.topk, hflip=args.hflip,
                            crop_padding=args.crop_padding, re_prob=args.re_prob, workers=args.workers,
                            overwrite=args.overwrite, progress=not args.no_progress)
    print(f"stored top-{m['topk']} teacher probabilities for {m['steps']} steps x {m['settings']['batch_size']} "
          f"images in {m['teacher_seconds']:.0f} s (teacher top-1 on them {100 * m['teacher_top1_augmented']:.1f} %); "
          f"train with --recipe fastkd:store={args.out}")
    return 0


def _load_runner(source, apply: list[str], calib_args=None):
    """`source` (a name, a checkpoint folder or a model already loaded) with the `--apply` stack; techniques that
    calibrate take seeded images of `calib_args.data` from `calib_args.calib_split` (train or val, never test:
    eval's own --split says what is measured)."""
    calibration = None if calib_args is None else loader.Calibration(
        calib_args.data, calib_args.calib_split, calib_args.calib_images, calib_args.data_dir)
    return loader.load(source, apply, calibration=calibration, missing_data=lambda stack: ValueError(
        f"{stack} calibrates on images: apply it with `--data SPEC` (eval, explain, ...) or save it first "
        "(`vitlab quantize` / `vitlab prune`)"))


def cmd_prune(args) -> int:
    _threads(args.threads)
    refuse_out_over_source(args.out, args.checkpoint)
    if args.apply:
        return _prune_with_technique(args)
    settings = _PRUNE.values(args)
    if settings["stem_weight"] == "auto":
        settings["stem_weight"] = stem_time_weights(create_model(args.checkpoint))
        print(f"stem weights (CPU time per MAC vs the rest, measured): {list(settings['stem_weight'])}")
    cfg = Prune(**settings)
    model, s = prune_checkpoint(args.checkpoint, args.out, cfg, data=args.data, split=args.split,
                                num_images=args.calib_images, data_dir=args.data_dir)
    arch = record(model).arch
    print(f"{args.checkpoint} -> {args.out}: {s['target']} {s['before']:,} -> {s['after']:,} "
          f"({s['after'] / s['before']:.3f}), importance {s['importance']}, {s['removed']} units removed")
    print(f"  depth {len(arch['num_heads'])}  heads {arch['num_heads']}  mlp hidden {arch['mlp_hidden']}"
          f"  embed {arch['base_kwargs'].get('embed_dim')}  stem {arch['base_kwargs'].get('stem_widths')}")
    return 0


def _prune_with_technique(args) -> int:
    """`vitlab prune CKPT --apply lpvit:... --out DIR`: any registered pruning technique, calibrated and saved."""
    configs = parse_apply([args.apply])
    if len(configs) != 1 or technique_kind(configs[0]) != Kind.STRUCTURE:
        raise ValueError(f"--apply {args.apply!r}: give one pruning technique (e.g. lpvit:sparsity=0.5); "
                         "quantize with `vitlab quantize`, and use prune's own options for `prune`")
    model, _ = prune_checkpoint(args.checkpoint, args.out, configs[0], data=args.data, split=args.split,
                                num_images=args.calib_images, data_dir=args.data_dir)
    weights = [m.weight for _, m in prunable_linears(model)]
    zero = sum(int(w.eq(0).sum()) for w in weights) / max(1, sum(w.numel() for w in weights))
    print(f"{args.checkpoint} -> {args.out}: {format_technique(configs[0])}; {100 * zero:.1f} % of the blocks' "
          f"Linear weights are zero")
    return 0


def cmd_eval(args) -> int:
    dense, predict = _is_dense(args.checkpoint), _is_predict(args.checkpoint)
    if args.tta and (dense or predict):
        raise UserError(f"--tta {args.tta} is for classifiers; {args.checkpoint} is a "
                        f"{'dense-prediction' if dense else 'frame-prediction'} checkpoint: drop --tta")
    if dense:
        return _eval_dense(args)
    if predict:
        return _eval_predict(args)
    _threads(args.threads)
    if args.out:
        _check_out(args.out)
    check_source_classes(args.checkpoint, args.data, data_dir=args.data_dir)  # before loading or calibrating
    runner = _load_runner(args.checkpoint, args.apply, calib_args=args)
    dataset = dataset_for_model(runner, args.data, args.split, data_dir=args.data_dir, strict=args.strict)
    result = evaluate(runner, dataset, batch_size=args.batch_size, limit=args.limit, progress=not args.json,
                      tta=args.tta)
    skipped = f", {result['skipped']} unreadable file(s) skipped (listed in --json / metrics.json)" \
        if result["skipped"] else ""
    tta = f", {args.tta} TTA" if args.tta else ""
    print(f"{args.checkpoint} on {args.data} [{args.split}], {result['n']} images{skipped}{tta}")
    print(f"  top-1 {100 * result['top1']:.2f} %   top-5 {100 * result['top5']:.2f} %   loss {result['loss']:.4f}")
    width = max(len(c) for c in result["classes"])
    for name, acc in result["per_class"].items():
        print(f"  {name:<{width}}  {100 * acc:6.2f} %")
    if args.out:
        out = Path(args.out)
        atomic_write_json(out / "metrics.json", {k: v for k, v in result.items()})
        plot_confusion(result, out / "confusion.png", title=f"{Path(args.checkpoint).name} [{args.split}]")
        print(f"  wrote {out / 'metrics.json'} and {out / 'confusion.png'}")
    if args.json:
        summary = {k: result[k] for k in ("top1", "top5", "loss", "n", "skipped", "skipped_files")}
        summary.update(per_class=result["per_class"], data=args.data, split=args.split, checkpoint=args.checkpoint,
                       tta=args.tta)
        print(json.dumps(summary))
    return 0


def _is_dense(checkpoint: str) -> bool:
    """Whether `checkpoint` is a dense-prediction checkpoint (vitlab train --task panoptic|semantic|detection)."""
    from .dense.engine import is_dense_checkpoint

    return is_dense_checkpoint(checkpoint)


def _eval_dense(args) -> int:
    """`vitlab eval` of a dense checkpoint: PQ / mIoU / AP on --data (default: the scenes it was trained on)."""
    from .dense.engine import evaluate_dense, load_dense

    _threads(args.threads)
    if args.out:
        _check_out(args.out)
    model = load_dense(args.checkpoint)
    info, config = record(model).dense, record(model).config
    given = _given_flags(args, "eval")
    data = args.data if given is None or "data" in given else config["data"].get("spec", args.data)
    dataset = build_dense_dataset(data, args.split, data_dir=args.data_dir, in_chans=info["in_chans"])
    classes = config["preprocessing"]["class_names"]
    if list(dataset.classes) != list(classes) or dataset.input_size[-1] != info["img_size"]:
        raise UserError(f"--data {data} has classes {list(dataset.classes)} at {dataset.input_size[-1]} px, the "
                        f"checkpoint {classes} at {info['img_size']} px: evaluate on the data it was trained on")
    if args.apply:   # techniques on the dense model (vitlab.dense.apply); calibration: --calib-split scenes of data
        model = loader.load(model, args.apply,
                            calibration=loader.Calibration(data, args.calib_split, args.calib_images, args.data_dir))
    result = evaluate_dense(model, dataset, info["task"], batch_size=min(args.batch_size, 64), limit=args.limit,
                            progress=not args.json)
    print(f"{args.checkpoint} ({info['task']}, head {info['head']}, backbone {info['backbone']}) on {data} "
          f"[{args.split}], {result['n']} scenes")
    print("  " + "   ".join(f"{k} {100 * v:.2f}" for k, v in result.items() if k != "n"))
    if args.out:
        atomic_write_json(Path(args.out) / "metrics.json", {**result, "data": data, "split": args.split})
        print(f"  wrote {Path(args.out) / 'metrics.json'}")
    if args.json:
        print(json.dumps({**result, "task": info["task"], "data": data, "split": args.split,
                          "checkpoint": args.checkpoint}))
    return 0


def _speed_kwargs(args) -> dict:
    return dict(batch=args.batch, img_size=args.img_size, threads=args.threads, dtype=args.dtype,
                channels_last=args.channels_last, compile=args.compile, memory=not args.no_memory,
                min_time_s=args.min_time, calib_split=args.calib_split, calib_images=args.calib_images)


def cmd_bench(args) -> int:
    from .bench.measure import measure, print_rows

    if args.data and args.data.startswith("synthetic"):
        print(f"calibration: {args.calib_images} random images ({args.data}): speed only, accuracy meaningless")
    rows = measure(args.model, apply=args.apply, calib_data=args.data, data_dir=args.data_dir,
                   **_speed_kwargs(args))
    print_rows(rows)
    if args.json:
        print(json.dumps(rows[-1].to_dict()))
    return 0


def cmd_measure(args) -> int:
    from .bench.measure import measure, print_rows

    rows = []
    for source in args.models:
        rows += measure(source, apply=args.apply, data=args.data, split=args.split, data_dir=args.data_dir,
                        eval_limit=args.limit, **_speed_kwargs(args))
    print_rows(rows)
    if args.out:
        out = Path(args.out)
        previous = out.read_text() if out.exists() else ""
        atomic_write_text(out, previous + "".join(json.dumps(r.to_dict()) + "\n" for r in rows))
        print(f"appended {len(rows)} row(s) to {out}")
    if args.json:
        for row in rows:
            print(json.dumps(row.to_dict()))
    return 0


def cmd_predict(args) -> int:
    calib_args = args if args.data else None
    if _is_dense(args.checkpoint):
        from .dense.engine import load_dense
        from .dense.predict import predict_files

        if not args.out:
            raise UserError(f"{args.checkpoint} is a dense checkpoint: give --out FILE.png (a folder for several "
                            "images) for the drawn prediction")
        model = load_dense(args.checkpoint)
        runner = _load_runner(model, args.apply, calib_args=calib_args)
        for path in predict_files(model, args.images, args.out, threshold=args.threshold, runner=runner):
            print(f"wrote {path}")
        return 0

    model = create_model(args.checkpoint)
    results = predict(model, args.images, top=args.top, runner=_load_runner(model, args.apply, calib_args))
    for path, top in results.items():
        print(display_name(path))  # a non-UTF-8 file name prints with \xNN escapes
        for name, prob in top:
            print(f"  {100 * prob:6.2f} %  {name}")
    if args.json:
        print(json.dumps({p: [{"class": n, "prob": q} for n, q in top] for p, top in results.items()}))
    return 0


def cmd_explain(args) -> int:
    if args.tokens and args.method not in (None, "sources"):
        raise ValueError(f"--tokens is --method sources; it cannot be combined with --method {args.method}")
    method = "sources" if args.tokens else args.method or "rollout"
    names = sorted({*method_names(), "sources"})
    if method not in names:
        raise ValueError(f"--method {method!r} is not an explanation method; choose one of {', '.join(names)}")
    cams = tuple(CAM_METHODS)
    if args.head is not None and method != "attention":
        raise ValueError("--head chooses the map of --method attention")
    if args.layer is not None and method not in ("attention", *cams):
        raise ValueError(f"--layer chooses the layer of --method attention or {', '.join(cams)}")
    if (args.tame is None) != (method != "tame"):
        raise ValueError("--method tame needs --tame DIR (an explainer from `vitlab train-tame`), and --tame only "
                         "goes with --method tame")
    if method == "sources" and len(args.image) != 1:
        raise ValueError("--method sources draws one image: pass one --image")
    image_format(args.out)  # an --out suffix that names no image format is refused before any work
    model = _load_runner(args.checkpoint, args.apply, calib_args=args if args.data else None)
    pre = resolve_preprocessing(model)  # the preprocessing eval and predict use
    x = torch.stack([load_image(path, pre) for path in args.image])          # (B, C, H, W) normalized
    mean = torch.tensor(pre.mean)[:, None, None]
    std = torch.tensor(pre.std)[:, None, None]
    pictures = (x * std + mean).clamp(0, 1)                                   # (B, C, H, W) in [0, 1]
    stack = " + ".join(args.apply) or "no technique"
    if method != "sources":
        options = {k: v for k, v in (("layer", args.layer), ("head", args.head), ("tame", args.tame))
                   if v is not None}
        explanation = explain(model, x, method=method, **options)
        out = plot_explanations(pictures, [explanation], args.out, class_names=pre.class_names,
                                titles=[f"{display_name(str(p))} ({stack})" for p in args.image])
        print(f"wrote {out}")
        return 0
    x, picture = x[0], pictures[0]
    labels = token_source_map(model, x)
    kept = int((labels >= 0).sum())
    out = plot_token_sources(picture, labels, args.out,
                             title=f"{stack}: {len(labels.unique()[labels.unique() >= 0])} tokens, {kept} patches kept")
    print(f"wrote {out}")
    return 0


def cmd_robustness(args) -> int:
    severities = None  # all of DEFAULT_SEVERITIES
    if args.perturbations:
        unknown = sorted(set(args.perturbations) - set(DEFAULT_SEVERITIES))
        if unknown:
            raise ValueError(f"--perturbations {' '.join(unknown)}: choose from {' '.join(DEFAULT_SEVERITIES)}")
        severities = {p: DEFAULT_SEVERITIES[p] for p in args.perturbations}
    _threads(args.threads)
    check_source_classes(args.model, args.data, data_dir=args.data_dir)  # before loading or calibrating
    runner = _load_runner(args.model, args.apply, calib_args=args)
    test = dataset_for_model(runner, args.data, "test", data_dir=args.data_dir)
    val = dataset_for_model(runner, args.data, "val", data_dir=args.data_dir)
    name = " + ".join([args.model, *args.apply])
    rows = robustness(runner, test, val, severities=severities, limit=args.limit, val_limit=args.val_limit,
                      batch_size=args.batch_size, seed=args.seed, name=name)
    print(f"{name} on {args.data} [test, {rows[0].n} images], patch grid {rows[0].grid[0]}x{rows[0].grid[1]}, "
          f"T = {rows[0].temperature:.3f} (fitted on {args.val_limit} val images)")
    print(format_rows(rows))
    if args.out:
        atomic_write_json(Path(args.out), {"rows": [r.to_dict() for r in rows]})
        print(f"wrote {args.out}")
    return 0


def cmd_heads(args) -> int:
    _threads(args.threads)
    if not args.out.endswith((".html", ".htm")) or Path(args.out).is_dir():
        raise ValueError(f"--out {args.out}: give an .html file name, e.g. heads.html")
    check_source_classes(args.model, args.data, data_dir=args.data_dir)  # before loading or calibrating
    runner = _load_runner(args.model, args.apply, calib_args=args)
    dataset = dataset_for_model(runner, args.data, args.split, data_dir=args.data_dir, strict=args.strict)
    n = min(args.images, len(dataset))
    images, labels = map(torch.stack, zip(*((dataset[i][0], torch.tensor(dataset[i][1])) for i in range(n))))
    name = " + ".join([args.model, *args.apply])
    report = analyze_heads(runner, images, labels, batch_size=args.batch_size, name=name, progress=print)
    report = dataclasses.replace(report, command="vitlab " + shlex.join(args._argv))
    out = write_heads_html(report, args.out)
    top = max(((layer.ablation_loss[h], layer.name, h) for layer in report.layers for h in range(layer.num_heads)))
    print(f"{sum(layer.num_heads for layer in report.layers)} heads in {len(report.layers)} layers, {n} images "
          f"[{args.split}], {report.seconds:.1f} s; most important by ablation: {top[1]} head {top[2]} "
          f"(loss {top[0]:+.4f}); Spearman rho gradient vs ablation {report.spearman_loss:+.3f}")
    print(f"wrote {out}")
    return 0


def _json_arg(text: str, flag: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} {text!r} is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object like '{{\"depth\": 4}}', got {text!r}")
    return value


def cmd_convert(args) -> int:
    refuse_out_over_source(args.out, args.weights)
    model = create_model(args.model, **_json_arg(args.model_kwargs, "--model-kwargs"))
    # a vitlab family's checkpoint_filter_fn maps its official checkpoints to vitlab's layout; timm models load as
    # saved (timm's own filters expect its hub layouts)
    module = sys.modules.get(model_entrypoint(args.model).__module__) if args.model.startswith("vl_") else None
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    load_weights(model, args.weights, allow_pickle=args.allow_pickle, filter_fn=filter_fn)
    out = save_checkpoint(model, args.out, data={"source_weights": str(args.weights)})
    print(f"checkpoint: {out}")
    return 0


def cmd_pareto(args) -> int:
    refuse_out_over_source(args.out, args.model, *args.candidates)
    cfg = SweepConfig(**_PARETO.values(args))
    summary = run_sweep(cfg, progress=not args.no_progress and sys.stderr.isatty())
    _print_pareto(summary)
    return 0


def _print_pareto(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table


    rows = summary["rows"]
    metric, unit = metric_label(rows), unit_label(rows)
    table = Table(title=f"vitlab pareto (validation {metric}; * on the front; >> recommended)")
    for col in ("", "point", f"val {metric} %", unit, "speed-up", "latency ms", "MMACs"):
        table.add_column(col, justify="left" if col in ("", "point") else "right")
    for r in rows:
        mark = (">>" if r.get("recommended") else "") + ("*" if r.get("on_front") else "")
        if r.get("status") != "ok":
            table.add_row(mark, r["key"], "error", "", "", "", "")
            continue
        table.add_row(mark, r["key"], f"{100 * score(r):.2f}", f"{r['img_per_s']:.0f}",
                      f"{r.get('speedup', 0):.2f}x", f"{r['latency_ms']:.2f}", f"{r['macs'] / 1e6:.1f}")
    Console(width=max(140, Console().width)).print(table)
    by_key = {r["key"]: r for r in rows}
    base, rec = by_key.get(summary.get("base")), by_key.get(summary.get("recommended"))
    if rec:
        print(f"recommended: {rec['key']}  {rec['speedup']:.2f}x the base's throughput; "
              f"val {metric} {100 * score(rec):.2f} % (base {100 * score(base):.2f} %), "
              f"test {100 * score(rec, 'test'):.2f} % (base {100 * score(base, 'test'):.2f} %)")
    else:
        print(f"no point within --max-drop-pt {summary.get('max_drop_pt')} of the base")
    for note in summary.get("notes", []):
        print(f"note: {note}")
    if summary.get("exported"):
        print(f"exported: {summary['exported']}")
    print(f"report: {summary['report']}")


def cmd_quantize(args) -> int:
    from .quant.export import quantize_checkpoint

    _threads(args.threads)
    _check_out(args.out)
    result = quantize_checkpoint(args.checkpoint, args.out, args.apply, data=args.data, split=args.split,
                                 calib_images=args.calib_images, data_dir=args.data_dir)
    kind = getattr(result, "engine", "simulated (PyTorch fake-quant)")
    print(f"{args.checkpoint} -> {args.out}: {' + '.join(args.apply)}, {kind}, calibrated on {args.calib_images} "
          f"images of {args.data} [{args.split}]")
    return 0


def cmd_export(args) -> int:
    from .quant.export import export_checkpoint

    _threads(args.threads)
    _check_out(args.out)
    path = export_checkpoint(args.checkpoint, args.out, args.format, args.apply, data=args.data, split=args.split,
                             calib_images=args.calib_images, data_dir=args.data_dir)
    print(f"{args.checkpoint} -> {path}")
    return 0


def cmd_models(args) -> int:
    if args.recipes:
        for name in recipe_names():
            doc = (recipe_class(name).__doc__ or "").strip().splitlines()
            print(f"{name:<16} {doc[0] if doc else ''}")
        return 0
    rows = list_models(args.pattern, params=not args.no_params)
    if not rows:
        print(f"no model matches {args.pattern!r}")
        return 1
    width = max(len(name) for name, _ in rows)
    for name, params in rows:
        print(name if params is None else f"{name:<{width}}  {params / 1e6:10.2f} M")
    return 0


def cmd_train_tame(args) -> int:
    from .explain.tame import train_tame_checkpoint

    _threads(args.threads)
    _check_out(args.out)
    m = train_tame_checkpoint(args.checkpoint, args.data, args.out, data_dir=args.data_dir,
                              eval_images=args.eval_images, mask=args.mask, epochs=args.epochs,
                              max_steps=args.steps, batch_size=args.batch_size, lr=args.lr)
    scores = f"; AD {m['AD']:.2f} %, IC {m['IC']:.1f} % on {m['images']} test images" if "AD" in m else ""
    print(f"trained T-TAME in {m['train_s']:.0f} s{scores}; wrote {m['explainer']}")
    return 0


COMMANDS = {"train": cmd_train, "prune": cmd_prune, "eval": cmd_eval, "bench": cmd_bench, "measure": cmd_measure,
            "predict": cmd_predict, "convert": cmd_convert, "explain": cmd_explain, "models": cmd_models,
            "pareto": cmd_pareto, "quantize": cmd_quantize, "export": cmd_export,
            "robustness": cmd_robustness}
COMMANDS["train-tame"] = cmd_train_tame
COMMANDS["heads"] = cmd_heads
COMMANDS["distill-logits"] = cmd_distill_logits


def cmd_split(args) -> int:
    _threads(args.threads)
    cfg = Split(**_SPLIT.values(args))
    _, s = split_checkpoint(args.checkpoint, args.out, cfg, data=args.data, data_dir=args.data_dir,
                            eval_split=args.eval_split)
    for row in s["parts"]:
        print(f"  part {row['part']}: classes {row['classes']}  {row['macs']:,} MACs "
              f"({row['macs'] / s['original_macs']:.2f})  {row['params']:,} params  {row['seconds']:.0f} s")
    print(f"{args.checkpoint} -> {args.out}: fused top-1 {100 * s['fused_top1']:.2f} % vs original "
          f"{100 * s['original_top1']:.2f} % ({s['eval_split']})")
    return 0


COMMANDS["split"] = cmd_split


def cmd_pretrain(args) -> int:
    cfg = PretrainConfig(**_PRETRAIN.values(args))
    out = pretrain(cfg, overwrite=args.overwrite)
    print(f"backbone checkpoint: {out} (fine-tune it with `vitlab train --init {out} ...`)")
    return 0


COMMANDS["pretrain"] = cmd_pretrain

def cmd_toy(args) -> int:
    from .agents import get_toy, missing_packages, run_toy, toy_names

    if args.name is None:
        for name in toy_names():
            toy = get_toy(name)
            missing = missing_packages(toy)
            note = f"  (needs {', '.join(missing)}: pip install -e '.[agents]')" if missing else ""
            print(f"{name:<12} {toy.summary}{note}")
        return 0
    _threads(args.threads)
    out = args.out or os.path.join("toy-out", args.name)
    result = run_toy(args.name, out, seed=args.seed, quick=args.quick)
    width = max((len(k) for k in result["metrics"]), default=0)
    for key, value in result["metrics"].items():
        print(f"{key:<{width}}  {value:.4g}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    print(f"({result['wall_s']:.1f} s, {result['threads']} threads; {out}/metrics.json)")
    return 0


COMMANDS["toy"] = cmd_toy


def cmd_search(args) -> int:
    from .search.run import search

    _threads(args.threads)
    _check_out(args.out)
    record = search(args.out, space=args.space, budget_macs=args.budget_macs, latency_ms=args.latency_ms,
                    evaluations=args.evaluations, methods=tuple(m for m in args.methods.split(",") if m),
                    supernet=args.supernet, steps=args.steps, batch_size=args.batch_size,
                    nets_per_batch=args.nets_per_batch, val_images=args.val_images, threads=args.threads,
                    seed=args.seed)
    best = record["best"]
    latency = f", {best['cost']:.3f} ms" if record["budget"]["unit"] == "ms" else ""
    print(f"best ({best['method']}): {best['accuracy']:.2f}% on {record['val']}, {best['macs']:,} MACs{latency}")
    print(f"{args.out}/search.json; checkpoint {args.out}/best (retrain: vitlab train --init {args.out}/best ...)")
    return 0


COMMANDS["search"] = cmd_search


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done; 2 a user error (one line on stderr: `vitlab VERB: error: MESSAGE`); 1 a bug in vitlab
    (a traceback). `--debug` or VITLAB_DEBUG=1 prints the traceback of a user error too."""
    args = _parser().parse_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)   # which flags were given (train --resume)


    debug = args.debug or os.environ.get("VITLAB_DEBUG", "") not in ("", "0")
    tune_allocator()   # keep freed memory in the process: see vitlab.profiling.allocator

    try:
        with _engine_trial(args):
            return COMMANDS[args.verb](args)
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except Exception as e:  # noqa: BLE001  (the CLI boundary: every exception ends here)
        if not is_user_error(e):
            traceback.print_exc()
            print(f"vitlab {args.verb}: internal error (a bug in vitlab; please report it with the traceback "
                  f"above): {type(e).__name__}: {one_line(e)}", file=sys.stderr)
            return 1
        if debug:
            traceback.print_exc()
        print(f"vitlab {args.verb}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vitlab {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
