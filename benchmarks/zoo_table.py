"""The zoo table: every family's smallest variant beside four timm baselines, for speed at 224 px and accuracy.

    python benchmarks/zoo_table.py --speed                 # params, MACs, img/s (batch 32), latency (batch 1)
    python benchmarks/zoo_table.py --accuracy --threads 1  # Fashion-MNIST top-1 after one pass over 10k images (slow)
    python benchmarks/zoo_table.py --accuracy --table-only # print the cached accuracy table, train nothing
    python benchmarks/zoo_table.py --summarize benchmarks/results/zoo_accuracy_cuda*.json   # top-1 across seeds

Speed (`--speed`, random weights, 1000 classes, 3 channels, 224 px): parameters, MACs of one image from
`vitlab.profiling.count_flops` (attention and FFTs counted; papers' "FLOPs" are these MACs), throughput at batch 32
and latency at batch 1 from `vitlab.profiling.time_callable` (one warm-up call, median of the timed calls, at least
`--min-time` seconds). An estimated 3-4 minutes on 2 quiet cores (a 1-thread smoke run at batch 2 took 3 minutes
on a heavily shared CPU).

Accuracy (`--accuracy`): the same recipe for every model (`AccuracyRecipe`): Fashion-MNIST upsampled to 64 px
(bilinear), `in_chans=1` (every model here takes it), 10 classes, one pass over a fixed seeded 10,000-image subset of
the train split in a fixed seeded order, no augmentation, AdamW (lr 1e-3, weight decay 0.05 except on biases and
norms, betas 0.9/0.999), batch 64 (157 steps), linear warm-up over the first 10 % of the steps then cosine to zero,
label smoothing 0.1, gradient-norm clip 1.0; then top-1 on the whole 10,000-image test split. `--seed` (default 0)
sets the subset, its order and the initialisation. Models keep their registered regularisation defaults (timm's
Swin-T and SReT-T: stochastic depth 0.1; T2T-ViT-7: dropout 0.1 in its performers; the rest: none). Every model
runs at 64 px: the vitlab families follow their official code at small inputs (DiNAT zero-pads a stage smaller than
its 7x7 neighbourhood, CrossFormer makes a stage no larger than its 7x7 group one group), timm's Swin pads its 16x16
and 8x8 stages to whole 7x7 windows and uses one window on the 4x4 and 2x2 ones. Results are cached per model in
`benchmarks/results/zoo_accuracy.json` (with the recipe they were measured with; `zoo_accuracy_seed<N>.json` for
`--seed N`), so a rerun trains only the models not finished under the current recipe. `--device cuda` trains on a
GPU (same recipe; give it its own `--results` file to keep CPU and GPU numbers apart).
"""
import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import vitlab.models  # noqa: F401  (registers the vl_ families into timm)
from vitlab.data import build_dataset
from vitlab.profiling import count_flops, num_threads, time_callable, tune_allocator
from vitlab.profiling.timing import environment
from vitlab.utils.io import atomic_write_json

# (timm name, family label): vitlab's families' smallest published variants (GMM-ViT, a 32-px CIFAR model, is left out).
ZOO = (
    ("vl_cvt_13", "CvT-13"),
    ("vl_pvt_tiny", "PVT-Tiny"),
    ("vl_dinat_mini", "DiNAT-Mini"),
    ("vl_t2t_vit_7", "T2T-ViT-7"),
    ("vl_hornet_tiny_7x7", "HorNet-T 7x7"),
    ("vl_uniformer_small", "UniFormer-S"),
    ("vl_crossformer_tiny", "CrossFormer-T"),
    ("vl_rmt_tiny", "RMT-T"),
    ("vl_spectformer_tiny", "SpectFormer-T"),
    ("vl_sret_tiny", "SReT-T"),
)
# zoo wave 2 (no reference-speed scripts yet, not in the stored GPU accuracy runs)
ZOO_WAVE2 = (
    ("vl_channelvit_tiny_patch16", "ChannelViT-T/16"),
    ("vl_vit_small_ggem", "ViT-S + GGeM"),
    ("vl_fcaformer_l1", "FcaFormer-L1"),
    ("vl_favit_b0", "FaViT-B0"),
    ("vl_vir_small", "ViR-S"),
    ("vl_soft_tiny", "SOFT-Tiny"),
    ("vl_svt_small", "SVT-S"),
    ("vl_sgformer_small", "SG-Former-S"),
    ("vl_msvmamba_nano", "MSVMamba-Nano"),
    ("vl_activator_tiny", "Activator-T (abstract only)"),
    ("vl_hyena_nd_tiny", "Hyena N-D-T (abstract only)"),
    ("vl_stvit_small", "STViT-S"),
    ("vl_uniformer_xxs", "UniFormer-XXS (light)"),
    ("vl_crossformer_pp_s", "CrossFormer++-S"),
    ("vl_tic_tiny", "TiC-T (layer official, network ours)"),
    ("vl_maformer_small", "MAFormer-S (abstract only)"),
    ("vl_dualtoken_vit_small", "DualToken-ViT-S (abstract only)"),
    ("vl_fmvit_tiny", "FMViT-T (abstract only)"),
    ("vl_turbovit_proxy", "TurboViT proxy (Hiera-style; spec unpublished)"),
)
BASELINES = (
    ("deit_tiny_patch16_224", "DeiT-Ti (timm)"),
    ("swin_tiny_patch4_window7_224", "Swin-T (timm)"),
    ("pvt_v2_b0", "PVTv2-b0 (timm)"),
    ("convnext_atto", "ConvNeXt-atto (timm)"),
)
MODELS = ZOO + ZOO_WAVE2 + BASELINES
LABELS = dict(MODELS)
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def default_results(seed: int) -> Path:
    """benchmarks/results/zoo_accuracy.json for seed 0, zoo_accuracy_seed<N>.json for the others."""
    return RESULTS_DIR / ("zoo_accuracy.json" if seed == 0 else f"zoo_accuracy_seed{seed}.json")


@dataclass(frozen=True)
class AccuracyRecipe:
    """One short training recipe shared by every model (the budget a 2-core CPU affords for every model of the table)."""
    img_size: int = 64
    in_chans: int = 1
    train_images: int = 10_000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_frac: float = 0.1
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    eval_batch: int = 250

    @property
    def steps(self) -> int:
        return math.ceil(self.train_images / self.batch_size)


def build_model(name: str, *, img_size: int, in_chans: int, num_classes: int) -> nn.Module:
    """`timm.create_model` at `img_size`; size-agnostic models (no `img_size` argument) are built without it."""
    kwargs = dict(in_chans=in_chans, num_classes=num_classes)
    try:
        return timm.create_model(name, img_size=img_size, **kwargs)
    except TypeError as e:
        if "img_size" not in str(e):
            raise
        return timm.create_model(name, **kwargs)


def lr_at(step: int, recipe: AccuracyRecipe) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up to `lr`, then cosine to zero at the end."""
    total = recipe.steps
    warmup = max(1, round(recipe.warmup_frac * total))
    if step < warmup:
        return recipe.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return recipe.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_subset(recipe: AccuracyRecipe, data_dir=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed training images (N, 1, S, S) and labels, in training order: a seeded draw from the train split."""
    ds = build_dataset("fashion-mnist", "train", img_size=recipe.img_size, in_chans=1, data_dir=data_dir)
    if recipe.train_images > len(ds):
        raise ValueError(f"train_images={recipe.train_images} exceeds the {len(ds)} images of the train split: "
                         f"use at most {len(ds)}")
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(recipe.seed))[:recipe.train_images]
    images, labels = zip(*(ds[i] for i in order.tolist()))
    return torch.stack(images), torch.tensor(labels)


def expand_channels(images: torch.Tensor, in_chans: int) -> torch.Tensor:
    return images if in_chans == images.shape[1] else images.expand(-1, in_chans, -1, -1)


def train_one_pass(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, recipe: AccuracyRecipe,
                   log=print) -> dict:
    """One pass of AdamW over (images, labels) in the given order, on the model's device; returns the mean loss of
    the last 20 steps and the seconds taken."""
    device = next(model.parameters()).device
    model.train()
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]  # biases, norms, scalars: no weight decay
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr)
    losses, start = [], time.perf_counter()
    for step in range(recipe.steps):
        sl = slice(step * recipe.batch_size, (step + 1) * recipe.batch_size)
        x, y = expand_channels(images[sl], recipe.in_chans).to(device), labels[sl].to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe)
        loss = F.cross_entropy(model(x), y, label_smoothing=recipe.label_smoothing)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}: the recipe diverged for this model")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        losses.append(loss.item())
        if step % 20 == 0 or step == recipe.steps - 1:
            elapsed = time.perf_counter() - start
            log(f"  step {step + 1}/{recipe.steps} loss {loss.item():.3f} "
                f"({(step + 1) * recipe.batch_size / elapsed:.1f} img/s)")
    tail = losses[-20:]
    return {"train_loss_last20": sum(tail) / len(tail), "train_s": round(time.perf_counter() - start, 1)}


def split_tensors(split: str, recipe: AccuracyRecipe, data_dir=None) -> tuple[torch.Tensor, torch.Tensor]:
    """All images (N, 1, S, S) and labels of a Fashion-MNIST split at the recipe's size, in file order."""
    ds = build_dataset("fashion-mnist", split, img_size=recipe.img_size, in_chans=1, data_dir=data_dir)
    images, labels = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(images), torch.tensor(labels)


@torch.inference_mode()
def top_k(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, recipe: AccuracyRecipe) -> dict:
    """Top-1 / top-5 accuracy (fractions) and mean cross-entropy of `model` in eval mode."""
    model.eval()
    device = next(model.parameters(), torch.empty(0)).device
    top1 = top5 = 0
    loss = 0.0
    for i in range(0, len(images), recipe.eval_batch):
        x, y = expand_channels(images[i:i + recipe.eval_batch], recipe.in_chans), labels[i:i + recipe.eval_batch]
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        top5_idx = logits.topk(5, dim=1).indices
        top1 += (top5_idx[:, 0] == y).sum().item()
        top5 += (top5_idx == y[:, None]).any(dim=1).sum().item()
    n = len(images)
    return {"top1": top1 / n, "top5": top5 / n, "loss": loss / n}


def accuracy_run(name: str, recipe: AccuracyRecipe, images, labels, test_images, test_labels, log=print,
                 device: str = "cpu") -> dict:
    """Train `name` from scratch with `recipe` on `device` and evaluate it on the test split."""
    torch.manual_seed(recipe.seed)
    model = build_model(name, img_size=recipe.img_size, in_chans=recipe.in_chans, num_classes=10)
    params = sum(p.numel() for p in model.parameters())
    macs = count_flops(model.eval(), expand_channels(images[:1], recipe.in_chans)).macs
    model.to(device)
    result = train_one_pass(model, images, labels, recipe, log=log)
    start = time.perf_counter()
    metrics = top_k(model, test_images, test_labels, recipe)
    return {"top1": metrics["top1"], "top5": metrics["top5"], "test_loss": metrics["loss"], "params": params,
            "macs_64px": macs, **result, "eval_s": round(time.perf_counter() - start, 1),
            "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
            "threads": torch.get_num_threads(), "recipe": dataclasses.asdict(recipe),
            "torch": torch.__version__, "timm": timm.__version__}


def load_results(path: Path) -> dict:
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def cached(results: dict, name: str, recipe: AccuracyRecipe) -> dict | None:
    """The stored result of `name`, if it was measured with this exact recipe."""
    entry = results.get(name)
    return entry if entry and entry.get("recipe") == dataclasses.asdict(recipe) else None


def accuracy_table(results: dict, recipe: AccuracyRecipe, names) -> str:
    lines = ["| model | params (10 classes, 1 ch) | MACs at 64 px | train s (1 pass) | final train loss "
             "| **test top-1** | test top-5 |", "|---|---|---|---|---|---|---|"]
    for name in names:
        r = cached(results, name, recipe)
        if r is None:
            lines.append(f"| {LABELS.get(name, name)} `{name}` | | | | | not run | |")
            continue
        lines.append(f"| {LABELS.get(name, name)} `{name}` | {r['params'] / 1e6:.2f} M | {r['macs_64px'] / 1e6:.0f} M "
                     f"| {r['train_s']:.0f} | {r['train_loss_last20']:.3f} | **{100 * r['top1']:.2f} %** "
                     f"| {100 * r['top5']:.2f} % |")
    return "\n".join(lines)


def run_accuracy(args, names) -> None:
    recipe = AccuracyRecipe(seed=args.seed)
    args.results = args.results or default_results(args.seed)
    results = load_results(args.results)
    todo = [n for n in names if cached(results, n, recipe) is None]
    if todo and not args.table_only:
        print(f"recipe: {recipe}; to train: {todo}", flush=True)
        images, labels = train_subset(recipe, args.data_dir)
        test_images, test_labels = split_tensors("test", recipe, args.data_dir)
        for name in todo:
            print(f"{name}:", flush=True)
            with num_threads(args.threads):
                results[name] = accuracy_run(name, recipe, images, labels, test_images, test_labels,
                                             log=lambda s: print(s, flush=True), device=args.device)
            print(f"  top-1 {100 * results[name]['top1']:.2f} %", flush=True)
            atomic_write_json(args.results, results)  # after every model: a rerun resumes
    print(accuracy_table(results, recipe, names))


def summary_table(paths, names) -> str:
    """Top-1 % of each model in each result file (any recipe), with the mean and the spread (max - min), and the
    params / MACs of the first file that has the model."""
    files = [load_results(Path(p)) for p in paths]
    head = " | ".join(f"`{Path(p).name}`" for p in paths)
    lines = [f"| model | params | MACs at 64 px | {head} | mean | max - min |", "|---|" + "---|" * (len(paths) + 4)]
    for name in names:
        top1 = [100 * f[name]["top1"] if name in f else None for f in files]
        got = [t for t in top1 if t is not None]
        first = next((f[name] for f in files if name in f), {})
        size = (f"{first['params'] / 1e6:.2f} M | {first['macs_64px'] / 1e6:.0f} M" if "params" in first
                else " | ")
        cells = " | ".join("" if t is None else f"{t:.2f}" for t in top1)
        stats = f"{sum(got) / len(got):.2f} | {max(got) - min(got):.2f}" if got else " | "
        lines.append(f"| {LABELS.get(name, name)} `{name}` | {size} | {cells} | {stats} |")
    return "\n".join(lines)


def speed_row(name: str, batch: int, min_time: float) -> dict:
    """Params, MACs (one image) and timings of `name` as registered: its pretrained_cfg input size (3x224x224 for
    every model of the table), 1000 classes."""
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = torch.randn(batch, *model.pretrained_cfg["input_size"])
    with torch.inference_mode():
        flops = count_flops(model, x[:1])
        thr = time_callable(lambda: model(x), warmup=1, min_runs=3, max_runs=20, min_time_s=min_time)
        lat = time_callable(lambda: model(x[:1]), warmup=2, min_runs=5, max_runs=200, min_time_s=min_time)
    return {"params": sum(p.numel() for p in model.parameters()), "macs": flops.macs,
            "attention_macs": flops.attention_macs, "img_s": batch / thr.median_s, "latency_ms": 1e3 * lat.median_s}


def run_speed(args, names) -> None:
    rows = {}
    with num_threads(args.threads):
        env = environment()
        for name in names:
            rows[name] = r = speed_row(name, args.batch, args.min_time)
            print(f"{name:32s} {r['params'] / 1e6:6.2f} M {r['macs'] / 1e9:6.3f} GMACs {r['img_s']:7.1f} img/s "
                  f"{r['latency_ms']:7.1f} ms", flush=True)
    print(f"\n224 px, batch {args.batch} (img/s) and 1 (latency), {args.threads} threads, fp32, "
          f"torch {env['torch']}, timm {env['timm']}, {env['cpu']}")
    print(f"| model | params | GMACs (attention) | img/s (batch {args.batch}) | latency (batch 1) |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {LABELS.get(name, name)} `{name}` | {r['params'] / 1e6:.2f} M | {r['macs'] / 1e9:.3f} "
              f"({r['attention_macs'] / 1e9:.3f}) | {r['img_s']:.1f} | {r['latency_ms']:.1f} ms |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speed", action="store_true", help="params, MACs, img/s and latency at 224 px")
    parser.add_argument("--accuracy", action="store_true", help="Fashion-MNIST top-1 after one short pass (cached)")
    parser.add_argument("--table-only", action="store_true", help="--accuracy: print the cached table, train nothing")
    parser.add_argument("--models", nargs="+", default=[n for n, _ in MODELS],
                        help="timm names (default: every model of the table)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32, help="--speed: batch of the throughput measurement")
    parser.add_argument("--min-time", type=float, default=1.0, help="--speed: seconds timed per measurement")
    parser.add_argument("--results", type=Path, default=None,
                        help="--accuracy: the JSON cache (default benchmarks/results/zoo_accuracy[_seedN].json)")
    parser.add_argument("--device", default="cpu", help="--accuracy: where to train (cpu, cuda)")
    parser.add_argument("--seed", type=int, default=0,
                        help="--accuracy: seed of the training subset, its order and the initialisation")
    parser.add_argument("--summarize", type=Path, nargs="+", default=None,
                        help="print top-1 of each model across these result files (e.g. seeds), train nothing")
    parser.add_argument("--data-dir", default=None, help="--accuracy: folder of the Fashion-MNIST idx files")
    args = parser.parse_args(argv)
    print(f"allocator: {tune_allocator()}")   # vitlab.profiling.allocator; VITLAB_ALLOCATOR=default to compare
    if args.summarize:
        print(summary_table(args.summarize, args.models))
        return
    if not (args.speed or args.accuracy):
        parser.error("choose --speed and/or --accuracy (or --summarize FILES)")
    unknown = [n for n in args.models if not timm.is_model(n)]
    if unknown:
        parser.error(f"unknown model(s) {unknown}: use timm names, e.g. {MODELS[0][0]}")
    if args.speed:
        run_speed(args, args.models)
    if args.accuracy:
        run_accuracy(args, args.models)


if __name__ == "__main__":
    sys.exit(main())
