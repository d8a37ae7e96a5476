"""ED-ViT on the Fashion-MNIST reference: N class-wise pruned sub-models + fusion MLP vs the original (test top-1).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/edvit.py [--parts 2 5] [--steps 200]

Each configuration runs `vitlab.engine.edvit.split_checkpoint` (seeded): consecutive class subsets, NViT-style
pruning scored on the subset's images, `--steps` fine-tuning steps per sub-model, a fusion MLP trained on 8192
training images. Prints a markdown table (test split, read once per configuration) with each sub-model's MACs.
"""
import argparse
import platform
import tempfile
import time

import torch

from vitlab.engine.edvit import Split, split_checkpoint

TARGETS = {2: 0.5, 5: 0.4}   # MACs each sub-model keeps (0.38 is the floor without stem or embedding pruning)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", default="checkpoints/fashion-mnist-reference")
    parser.add_argument("--parts", type=int, nargs="+", default=[2, 5])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"CPU: {platform.processor() or platform.machine()}, torch threads: {torch.get_num_threads()}")
    print("| parts | MACs kept per part | sub-model MACs (M) | sum of parts (M) | original (M) | original top-1 | "
          "fused top-1 | wall |")
    print("|---|---|---|---|---|---|---|---|")
    for parts in args.parts:
        start = time.perf_counter()
        cfg = Split(parts=parts, target_flops=TARGETS.get(parts, 0.5), steps=args.steps)
        with tempfile.TemporaryDirectory() as out:
            _, s = split_checkpoint(args.checkpoint, out, cfg, data="fashion-mnist", eval_split="test")
        macs = [r["macs"] / 1e6 for r in s["parts"]]
        print(f"| {parts} | {cfg.target_flops} | {' / '.join(f'{m:.1f}' for m in macs)} | {sum(macs):.1f} | "
              f"{s['original_macs'] / 1e6:.1f} | {100 * s['original_top1']:.2f} % | {100 * s['fused_top1']:.2f} % | "
              f"{time.perf_counter() - start:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
