"""Train the 196-token Fashion-MNIST model and commit it as checkpoints/fashion-mnist-196/.

    python benchmarks/train_196.py                  # the recorded recipe (see BENCHMARKS.md, "Token reduction")
    python benchmarks/train_196.py --epochs 0.02 --out /tmp/m196 --no-copy   # a quick smoke run

Design: `vl_vit_fmnist` (conv stem with strides 1, 2, 2; embed 96, depth 4, heads 3, MLP ratio 2) built for
Fashion-MNIST upsampled to 56x56 px (bilinear), so the stem yields a 14x14 grid: 196 patch tokens + the class token,
4x the reference model's 49. Token reduction pays off with many tokens; this model is where its accuracy is measured.

Recipe: the model starts from the committed 49-token reference model (checkpoints/fashion-mnist-reference/): every
weight is reused as is (the stem is convolutional and size-agnostic) except `pos_embed`, whose 7x7 grid is resampled
to 14x14 (bicubic, timm's `resample_abs_pos_embed`). It is then trained with `vitlab.engine.fit` on the train split at
56 px (the committed run: one epoch, `--threads 1` on a shared, heavily loaded 2-core machine: 54.5 min), evaluated
on the 10,000-image test split, and its weights + config (nothing else) are copied into the committed folder.
"""
import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed

import vitlab
from vitlab.bench.measure import dataset_for
from vitlab.checkpoint import CONFIG, WEIGHTS, load_config, save_checkpoint
from vitlab.engine import TrainConfig, evaluate, fit
from vitlab.profiling import tune_allocator
from vitlab.utils.io import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "checkpoints" / "fashion-mnist-reference"

RECIPE = dict(
    data="fashion-mnist", epochs=1.0, batch_size=64, lr=1e-3, min_lr=1e-5, weight_decay=0.05,
    warmup_epochs=0.05, label_smoothing=0.1, hflip=0.5, crop_padding=0, clip_grad=1.0, ema=0.0, seed=0, threads=2,
)
IMG_SIZE = 56


def init_from_reference(reference: Path, img_size: int = IMG_SIZE) -> torch.nn.Module:
    """The reference model rebuilt for `img_size` px, its weights reused and its pos_embed resampled to the grid."""
    ref = vitlab.create_model(reference)
    spec = load_config(reference)["model"]
    model = vitlab.create_model(spec["name"], **{**spec["kwargs"], "img_size": img_size})
    state = ref.state_dict()
    grid = model.patch_embed.grid_size
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=list(grid),
                                                num_prefix_tokens=model.num_prefix_tokens)
    model.load_state_dict(state)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/fashion-mnist-196", help="run folder")
    parser.add_argument("--dest", default=str(ROOT / "checkpoints" / "fashion-mnist-196"))
    parser.add_argument("--reference", default=str(REFERENCE))
    parser.add_argument("--epochs", type=float, default=RECIPE["epochs"])
    parser.add_argument("--threads", type=int, default=RECIPE["threads"])
    parser.add_argument("--no-copy", action="store_true", help="do not copy into checkpoints/")
    args = parser.parse_args()
    print(f"allocator: {tune_allocator()}")   # vitlab.profiling.allocator; VITLAB_ALLOCATOR=default to compare

    out = Path(args.out)
    init_dir = out / "init"
    model = init_from_reference(Path(args.reference))
    save_checkpoint(model, init_dir, data={"spec": "fashion-mnist", "split": "train"},
                    preprocessing=load_config(args.reference)["preprocessing"] | {
                        "input_size": [1, IMG_SIZE, IMG_SIZE]})
    cfg = TrainConfig(out=str(out), init=str(init_dir),
                      **{**RECIPE, "epochs": args.epochs, "threads": args.threads})
    start = time.perf_counter()
    run = fit(cfg, overwrite=True)   # a rerun of this benchmark replaces its earlier run
    train_s = time.perf_counter() - start

    model = vitlab.create_model(run)
    test = evaluate(model, dataset_for(model, "fashion-mnist", "test"), progress=False)
    total_s = time.perf_counter() - start
    config = load_config(run)
    config["metrics"].update(test_top1=test["top1"], test_top5=test["top5"], test_loss=test["loss"], test_n=test["n"],
                             train_wall_s=round(train_s, 1), threads=torch.get_num_threads(),
                             init="checkpoints/fashion-mnist-reference (pos_embed resampled 7x7 -> 14x14)")
    atomic_write_json(run / CONFIG, config)

    curve = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    print(f"trained in {train_s / 60:.1f} min (train + test eval {total_s / 60:.1f} min); "
          f"test top-1 {100 * test['top1']:.2f} %, top-5 {100 * test['top5']:.2f} %")
    print("epoch  elapsed_min  val_top1_%")
    for row in curve:
        print(f"{row['epoch']:5.2f}  {row['elapsed_s'] / 60:11.1f}  {100 * row['val_top1']:10.2f}")
    if not args.no_copy:
        dest = Path(args.dest)
        dest.mkdir(parents=True, exist_ok=True)
        for name in (WEIGHTS, CONFIG):
            shutil.copyfile(run / name, dest / f".{name}.tmp")
            (dest / f".{name}.tmp").replace(dest / name)
        print(f"copied weights + config to {dest}")


if __name__ == "__main__":
    main()
