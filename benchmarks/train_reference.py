"""Train the reference Fashion-MNIST model `vl_vit_fmnist` and commit it as checkpoints/fashion-mnist-reference/.

    python benchmarks/train_reference.py                  # the recorded recipe (see BENCHMARKS.md)
    python benchmarks/train_reference.py --epochs 1 --out /tmp/ref --no-copy   # a quick smoke run

Trains with `vitlab.engine.fit` on the train split (55,000 images; the 5,000-image val hold-out is evaluated after
every epoch), then evaluates once on the 10,000-image test split, stores the test metrics in the checkpoint's
config.json, and copies the weights + config (nothing else) into the committed folder. Prints the wall-clock time
and the accuracy-vs-time curve.
"""
import argparse
import json
import shutil
import time
from pathlib import Path

import torch

import vitlab
from vitlab.bench.measure import dataset_for
from vitlab.checkpoint import CONFIG, WEIGHTS, load_config
from vitlab.engine import TrainConfig, evaluate, fit
from vitlab.profiling import cpu_flags_text, cpu_name, tune_allocator
from vitlab.utils.io import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]

RECIPE = dict(
    model="vl_vit_fmnist", data="fashion-mnist", epochs=5, batch_size=64, lr=2e-3, min_lr=1e-5, weight_decay=0.05,
    warmup_epochs=0.3, label_smoothing=0.1, hflip=0.5, crop_padding=0, clip_grad=1.0, ema=0.0, seed=0, threads=2,
)


def main(recipe: dict = RECIPE, name: str = "fashion-mnist-reference", doc: str = __doc__) -> None:
    """Train `recipe`, evaluate on the test split, record the test metrics in config.json and copy weights + config
    into checkpoints/NAME (other training benchmarks call this with their own recipe)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", default=f"runs/{name}", help="run folder")
    parser.add_argument("--dest", default=str(ROOT / "checkpoints" / name))
    parser.add_argument("--epochs", type=float, default=recipe["epochs"])
    parser.add_argument("--no-copy", action="store_true", help="do not copy into checkpoints/")
    args = parser.parse_args()
    # vitlab.profiling.allocator; VITLAB_ALLOCATOR=default to compare
    print(f"{cpu_name()} ({cpu_flags_text()}); allocator: {tune_allocator()}")

    cfg = TrainConfig(out=args.out, **{**recipe, "epochs": args.epochs})
    start = time.perf_counter()
    run = fit(cfg, overwrite=True)   # a rerun of this benchmark replaces its earlier run
    train_s = time.perf_counter() - start

    model = vitlab.create_model(run)
    test = evaluate(model, dataset_for(model, "fashion-mnist", "test"), progress=False)
    total_s = time.perf_counter() - start
    config = load_config(run)
    config["metrics"].update(test_top1=test["top1"], test_top5=test["top5"], test_loss=test["loss"], test_n=test["n"],
                             train_wall_s=round(train_s, 1), threads=torch.get_num_threads())
    atomic_write_json(run / CONFIG, config)

    curve = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    print(f"trained in {train_s / 60:.1f} min (train + test eval {total_s / 60:.1f} min); "
          f"test top-1 {100 * test['top1']:.2f} %, top-5 {100 * test['top5']:.2f} %")
    print("epoch  elapsed_min  train_img_per_s  val_top1_%")
    for row in curve:
        print(f"{row['epoch']:5.2f}  {row['elapsed_s'] / 60:11.1f}  {row.get('img_per_s', 0):15.0f}  "
              f"{100 * row['val_top1']:10.2f}")
    if not args.no_copy:
        dest = Path(args.dest)
        dest.mkdir(parents=True, exist_ok=True)
        for fname in (WEIGHTS, CONFIG):
            shutil.copyfile(run / fname, dest / f".{fname}.tmp")
            (dest / f".{fname}.tmp").replace(dest / fname)
        print(f"copied weights + config to {dest}")


if __name__ == "__main__":
    main()
