"""UNIT at toy scale: a CTC word reader added to the Fashion-MNIST reference ViT, with and without the vision decoder.

    OMP_NUM_THREADS=1 python benchmarks/agents_unit.py                   # seed 0, 300 steps per arm
    OMP_NUM_THREADS=1 python benchmarks/agents_unit.py --seeds 0 1 --steps 400

Both arms start from `checkpoints/fashion-mnist-reference-v2` and train the encoder and the CTC language decoder on
the same seeded batches of 32 rendered words (random lowercase words of 3-5 letters, Pillow's bundled font at 13-16
px, random places, 28 x 84 px; 4000 training words) for the same number of AdamW steps
(`vitlab.agents.unit.train_unit`). UNIT adds, every step, UNIT's vision-decoder loss (cosine + L1 to the frozen
original encoder's tokens) on 32 Fashion-MNIST training images; the baseline does not. Scored: character accuracy
(1 - edit distance / length) and whole-word accuracy on 1000 held-out rendered words, and the Fashion-MNIST test
top-1 (10k images) of the original, frozen classifier head on the trained encoder. Prints a markdown table, the
verdict on the toy-scale targets, CPU and threads.
"""
import argparse
import json
import time
from pathlib import Path

import torch

from vitlab.agents.unit import compare
from vitlab.profiling.cpu import cpu_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--lam", type=float, default=1.0, help="weight of the vision-decoder loss")
    parser.add_argument("--train-words", type=int, default=4000)
    parser.add_argument("--test-words", type=int, default=1000)
    parser.add_argument("--init", default="checkpoints/fashion-mnist-reference-v2")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    rows = []
    for seed in args.seeds:
        start = time.perf_counter()
        rows.append({"seed": seed, **compare(args.steps, args.init, seed=seed, train_words=args.train_words,
                                             test_words=args.test_words, batch_size=args.batch_size, lr=args.lr,
                                             lam=args.lam),
                     "wall_s": round(time.perf_counter() - start, 1)})
        print(f"# seed {seed}: {rows[-1]}", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")

    print(f"\nUNIT vs the text decoder alone, {args.steps} steps x {args.batch_size} words, init {args.init}, "
          f"{args.test_words} held-out words, Fashion-MNIST test top-1 of the original head; {cpu_name()}, "
          f"{torch.get_num_threads()} thread\n")
    print("| arm | seed | char acc | word acc | FMNIST top-1 (before) | top-1 after | drop | train s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        for kind, label in (("unit", "UNIT (language + vision decoder)"), ("text_only", "language decoder only")):
            print(f"| {label} | {r['seed']} | {r[f'{kind}_char_acc']:.1f} % | {r[f'{kind}_word_acc']:.1f} % "
                  f"| {r['teacher_top1']:.2f} % | {r[f'{kind}_top1']:.2f} % | {r[f'{kind}_top1_drop']:.2f} pt "
                  f"| {r[f'{kind}_train_s']:.0f} |")
    char_ok = all(r["unit_char_acc"] >= 90 for r in rows)
    keep_ok = all(r["unit_top1_drop"] <= 1 for r in rows)
    larger = all(r["text_only_top1_drop"] > r["unit_top1_drop"] for r in rows)
    print(f"\nUNIT char accuracy >= 90 %: {'reproduced' if char_ok else 'not reproduced'}; top-1 drop <= 1 pt with "
          f"the vision decoder: {'reproduced' if keep_ok else 'not reproduced'}; larger without: "
          f"{'reproduced' if larger else 'not reproduced'} ({len(rows)} seed(s)); "
          f"wall {sum(r['wall_s'] for r in rows):.0f} s")


if __name__ == "__main__":
    main()
