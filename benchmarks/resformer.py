"""ResFormer at small scale: one model trained at 28/21/14 px with the scale-consistency loss vs the same model trained
at 28 px only (same seed, same steps), both evaluated on the Fashion-MNIST test split resized to 14, 21, 28, 35 px.

    OMP_NUM_THREADS=1 python benchmarks/resformer.py --steps 120 --learned              # the table in the report
    OMP_NUM_THREADS=1 python benchmarks/resformer.py --steps 20 --test-limit 1000      # smoke run

Model: vl_vit_fmnist with embed_dim 64, depth 3, 2 heads, stem widths 16/32/64 and ResFormer's global-local positional
embedding (`pos_embed="glpe"`), trained by `vitlab.engine.train.fit` (AdamW, lr 2e-3, batch 128, cosine over
--steps with 10 % warm-up, label smoothing 0.1, hflip) — row "28 only" without a recipe, row "ResFormer" with
`--recipe resformer:sizes=28/21/14` (official defaults: class-feature smooth-L1 consistency, weight 1). --learned adds
a third row: the default learned, interpolated pos-embed (`dynamic_img_size=True`) trained at 28 only. Test images are
resized from 28 px the way the recipe resizes training batches (bilinear, antialiased). The paper's claim (Tian et al.,
CVPR 2023, Table 1): multi-resolution training beats single-resolution training away from the training size.
Prints a markdown table (top-1 %, the CPU, threads and wall times) and writes --out/results.jsonl.
"""
import argparse
import json
import platform
import time
from pathlib import Path

import torch

import vitlab
from vitlab.data import build_dataset
from vitlab.engine.resformer import resize_batch
from vitlab.engine.train import TrainConfig, fit

ARCH = dict(embed_dim=64, depth=3, num_heads=2, mlp_ratio=2.0, stem_widths=(16, 32, 64))
TRAIN_IMAGES = 55000   # the fashion-mnist train split (val is the last 5k of the official 60k)


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


@torch.no_grad()
def top1_at_sizes(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, sizes: list[int],
                  batch: int = 500) -> dict[int, float]:
    """Test top-1 (%) with the 28 px test images resized to each size."""
    model.eval()
    result = {}
    for size in sizes:
        correct = sum((model(resize_batch(images[i:i + batch], size)).argmax(-1) == labels[i:i + batch]).sum().item()
                      for i in range(0, len(images), batch))
        result[size] = 100.0 * correct / len(images)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--sizes", default="28/21/14", help="the ResFormer row's training sizes")
    p.add_argument("--eval-sizes", default="14,21,28,35")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-limit", type=int, default=None, help="evaluate on the first N test images (smoke runs)")
    p.add_argument("--learned", action="store_true", help="add the learned interpolated pos-embed row (28 only)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="runs/resformer")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    eval_sizes = [int(s) for s in args.eval_sizes.split(",")]
    epochs = args.steps / (TRAIN_IMAGES // args.batch_size)   # the cosine schedule spans exactly --steps
    common = dict(model="vl_vit_fmnist", data="fashion-mnist", data_dir=args.data_dir, epochs=epochs,
                  batch_size=args.batch_size, lr=args.lr, warmup_epochs=0.1 * epochs, seed=args.seed,
                  threads=args.threads, eval_val=False, progress=False)
    rows = [("28 only (GLPE)", "glpe", None),
            (f"ResFormer {args.sizes} (GLPE)", "glpe", f"resformer:sizes={args.sizes}")]
    if args.learned:
        rows.append(("28 only (learned pos-embed, interpolated)", "learned", None))

    test = None
    results = []
    for label, pos, recipe in rows:
        kwargs = dict(ARCH, pos_embed="glpe") if pos == "glpe" else dict(ARCH, dynamic_img_size=True)
        run = out / ("resformer" if recipe else "28only") / pos
        start = time.perf_counter()
        fit(TrainConfig(out=str(run), model_kwargs=kwargs, recipe=recipe, **common), overwrite=True)
        train_s = time.perf_counter() - start
        model = vitlab.create_model(str(run))
        if test is None:
            pre = model.vitlab.checkpoint["config"]["preprocessing"]
            data = build_dataset("fashion-mnist", "test", img_size=tuple(pre["input_size"][1:]), in_chans=1,
                                 mean=pre["mean"], std=pre["std"], data_dir=args.data_dir)
            n = min(len(data), args.test_limit or len(data))
            test = (torch.stack([data[i][0] for i in range(n)]), torch.tensor([data[i][1] for i in range(n)]))
        start = time.perf_counter()
        top1 = top1_at_sizes(model, *test, eval_sizes)
        record = dict(row=label, pos_embed=pos, recipe=recipe, steps=args.steps, batch_size=args.batch_size,
                      threads=args.threads, train_s=round(train_s, 1), eval_s=round(time.perf_counter() - start, 1),
                      test_images=len(test[1]), top1={str(k): round(v, 2) for k, v in top1.items()})
        results.append(record)
        print(json.dumps(record), flush=True)
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    print(f"\n{cpu_name()}, {args.threads} thread(s); {args.steps} steps of batch {args.batch_size} per row, "
          f"seed {args.seed}; test top-1 % on {len(test[1])} test images resized to each size\n")
    print("| training | " + " | ".join(f"{s} px" for s in eval_sizes) + " | train wall |")
    print("|---|" + "---:|" * (len(eval_sizes) + 1))
    for r in results:
        cells = " | ".join(f"{r['top1'][str(s)]:.2f}" for s in eval_sizes)
        print(f"| {r['row']} | {cells} | {r['train_s'] / 60:.1f} min |")


if __name__ == "__main__":
    main()
