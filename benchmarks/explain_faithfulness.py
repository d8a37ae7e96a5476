"""Faithfulness of every explanation method on a trained model and its token-reduced, int8 variants, on test images.

    python benchmarks/explain_faithfulness.py                       # reference ViT + tome:r=6, all methods
    python benchmarks/explain_faithfulness.py --variants none ptq w8a8 --limit 200   # int8 simulated and deployed
    python benchmarks/explain_faithfulness.py --checkpoint checkpoints/fashion-mnist-swin --variants none \
        --tame /tmp/tame_swin/explainer.safetensors                  # a hierarchical model (train-tame it first)
    python benchmarks/explain_faithfulness.py --methods rollout random centre --variants none
    python benchmarks/explain_faithfulness.py --tame /tmp/tame_reference/explainer.safetensors   # with T-TAME
    python benchmarks/explain_faithfulness.py --rows runs/faith.jsonl                # keep rows; rerun skips them

Images: the first --limit of a seeded permutation (--seed) of the test split, preprocessed as the checkpoint says.
Each method explains each image's top-1 class of the model it explains (`vitlab.explain`, in chunks of --chunk);
`random` (i.i.d. uniform maps, seed 0) and `centre` (a centred Gaussian, sigma 1/4 of the side) are the maps a
method has to beat. Scores (`vitlab.explain.faithfulness`): deletion AUC with pixels replaced by the dataset mean
(the per-channel mean of the subset, ~0 after normalization), insertion AUC from the image blurred with a Gaussian
of --blur-sigma pixels (RISE's baselines), both over --steps equal steps; AD / IC with the raw pixels multiplied by
the map (x * m: masked pixels become black, as T-TAME's official evaluation does). A method that refuses a model is
listed with its message. Variants that need calibration (ptq, w8a8) get --calib-images train images (seed 0). A
deployed variant (w8a8: a runner) is explained through its simulated twin (the engine exposes no attention or
gradients) and scored on the engine; its top-1, the class every method explains, is the engine's; the twin's
top-1 agreement with the engine is printed under the table.
"""
import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import vitlab
from vitlab.bench.measure import dataset_for
from vitlab.data.calibration import calibration_batches
from vitlab.data.transforms import resolve_preprocessing
from vitlab.explain import ExplainError, method_names
from vitlab.explain.core import explained_module
from vitlab.explain.faithfulness import (blurred, centre_gaussian_maps, faithfulness, mean_baseline, pixel_baseline,
                                         random_maps, scored_forward)
from vitlab.profiling.cpu import cpu_flags_text, cpu_name
from vitlab.techniques import deploys

BASELINE_MAPS = ("random", "centre")


def test_subset(model, data: str, limit: int, seed: int) -> torch.Tensor:
    """(limit, C, H, W) the first `limit` images of a `seed`-ed permutation of the test split."""
    test = dataset_for(model, data, "test")
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:limit]
    return torch.stack([test[int(i)][0] for i in order])


def top1(model, images: torch.Tensor, batch: int) -> torch.Tensor:
    """(B,) the class `model` (an nn.Module or a runner, as deployed) predicts for each image."""
    forward = scored_forward(model)
    with torch.inference_mode():
        return torch.cat([forward(images[i:i + batch]).argmax(-1) for i in range(0, len(images), batch)])


def explain_all(model, images: torch.Tensor, target: torch.Tensor, method: str, chunk: int,
                options: dict) -> torch.Tensor:
    """(B, H, W) [0, 1] maps of `method` explaining class `target` (B,), `chunk` images at a time."""
    if method == "random":
        return random_maps(len(images), tuple(images.shape[-2:]), seed=0)
    if method == "centre":
        return centre_gaussian_maps(len(images), tuple(images.shape[-2:]), sigma=0.25)
    return torch.cat([vitlab.explain(model, images[i:i + chunk], method=method, target=target[i:i + chunk],
                                     **options).maps
                      for i in range(0, len(images), chunk)])


def parse_options(items: list[str], tame: str | None) -> dict[str, dict]:
    """--option METHOD:KEY=VALUE ... (and --tame PATH) -> {method: {key: value}}."""
    options: dict[str, dict] = {}
    for item in items:
        method, _, pair = item.partition(":")
        key, _, value = pair.partition("=")
        options.setdefault(method, {})[key] = value
    if tame:
        options.setdefault("tame", {})["tame"] = tame
    return options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="checkpoints/fashion-mnist-reference")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=["none", "tome:r=6"], help="--apply specs ('none': as is)")
    parser.add_argument("--methods", nargs="*", default=None,
                        help="default: every vitlab.explain.method_names() plus random and centre")
    parser.add_argument("--steps", type=int, default=10, help="deletion / insertion steps (28x28: ~78 pixels a step)")
    parser.add_argument("--blur-sigma", type=float, default=5.0, help="insertion baseline blur, pixels")
    parser.add_argument("--chunk", type=int, default=100, help="images per vitlab.explain call")
    parser.add_argument("--batch", type=int, default=512, help="images per forward pass while scoring")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tame", default=None, help="T-TAME explainer for this checkpoint: vitlab.explain(tame=PATH)")
    parser.add_argument("--option", nargs="*", default=[], help="METHOD:KEY=VALUE passed to vitlab.explain")
    parser.add_argument("--rows", type=Path, default=None, help="JSON-lines file: rows found there are not rerun")
    parser.add_argument("--calib-images", type=int, default=256, help="train images calibrating ptq / w8a8 variants")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = parse_options(args.option, args.tame)
    methods = args.methods if args.methods is not None else method_names() + list(BASELINE_MAPS)
    done = {}
    if args.rows and args.rows.exists():
        done = {(r.get("checkpoint"), r["variant"], r["method"], r["images"]): r
                for r in map(json.loads, args.rows.read_text().splitlines())}
    started, load = datetime.now(timezone.utc), open("/proc/loadavg").read().split()[:3]

    base = vitlab.create_model(args.checkpoint).eval()
    images = test_subset(base, args.data, args.limit, args.seed)
    deletion_to, insertion_from = mean_baseline(images), blurred(images, args.blur_sigma)
    pre = resolve_preprocessing(base)
    black = pixel_baseline(0.0, pre.mean, pre.std)
    calib = None
    if any(v != "none" for v in args.variants):
        calib = calibration_batches(base, args.data, "train", args.calib_images, seed=0)
    rows, twin_notes = [], []
    for variant in args.variants:
        model = vitlab.create_model(args.checkpoint).eval()
        if variant != "none":
            stack = vitlab.parse_apply([variant])
            if any(map(deploys, stack)):                                   # w8a8, w8, bf16: an engine runner
                model = vitlab.deploy(model, stack, calib=calib)
            else:
                vitlab.apply_(model, stack, calib=calib)
        target = top1(model, images, args.batch)
        if not isinstance(model, torch.nn.Module):
            twin = top1(explained_module(model), images, args.batch)
            twin_notes.append(f"{variant}: engine {getattr(model, 'engine', type(model).__name__)}, explained "
                              f"through its simulated twin, whose top-1 agrees with the engine's on "
                              f"{int((twin == target).sum())} / {len(images)} images")
        for method in methods:
            if (args.checkpoint, variant, method, len(images)) in done:
                rows.append(done[(args.checkpoint, variant, method, len(images))])
                continue
            row = dict(checkpoint=args.checkpoint, variant=variant, method=method, images=len(images),
                       steps=args.steps, date=str(started), options=options.get(method, {}))
            try:
                t0 = time.perf_counter()
                maps = explain_all(model, images, target, method, args.chunk, options.get(method, {}))
                t1 = time.perf_counter()
                scores = faithfulness(model, images, maps, target, steps=args.steps, deletion_baseline=deletion_to,
                                      insertion_baseline=insertion_from, mask_baseline=black,
                                      batch_size=args.batch)
                row.update(deletion_auc=scores.deletion_auc, insertion_auc=scores.insertion_auc,
                           average_drop=scores.average_drop, increase_in_confidence=scores.increase_in_confidence,
                           explain_s=t1 - t0, score_s=time.perf_counter() - t1)
            except ExplainError as e:
                row["refused"] = str(e)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.rows:
                with args.rows.open("a") as f:
                    f.write(json.dumps(row) + "\n")

    print(f"\n{args.checkpoint}, {len(images)} test images (seed {args.seed}), {args.steps} steps, deletion to the "
          f"dataset mean, insertion from blur sigma {args.blur_sigma}, {args.threads} threads, torch "
          f"{torch.__version__}, {started:%Y-%m-%d %H:%M} UTC, load average at start {' '.join(load)}")
    print(f"CPU: {cpu_name()} ({cpu_flags_text() or 'no listed ISA flags'})")
    print("| model | method | deletion AUC (lower better) | insertion AUC (higher) | AD % (lower) | IC % (higher) | "
          "explain s | score s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        name = Path(args.checkpoint).name + ("" if r["variant"] == "none" else f" + {r['variant']}")
        if "refused" in r:
            print(f"| {name} | {r['method']} | refused: {r['refused'].replace('|', '/')} | | | | | |")
        else:
            print(f"| {name} | {r['method']} | {r['deletion_auc']:.3f} | {r['insertion_auc']:.3f} | "
                  f"{r['average_drop']:.1f} | {r['increase_in_confidence']:.1f} | {r['explain_s']:.1f} | "
                  f"{r['score_s']:.1f} |")

    for note in twin_notes:
        print(f"\n{note}")

if __name__ == "__main__":
    main()
