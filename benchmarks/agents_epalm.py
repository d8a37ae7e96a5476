"""eP-ALM at toy scale: frozen reference ViT + frozen tiny GPT-2, one linear connector + soft prompt.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/agents_epalm.py [--seeds 0 1 2]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/agents_epalm.py --split val --steps 1200 --arms epalm --epalm-lr 5e-3

Runs `vitlab toy epalm`'s comparison (vitlab/agents/epalm.py `compare`) per seed: a 4-layer GPT-2 (width 128)
pretrained text-only on templated captions of Fashion-MNIST items (400 AdamW steps of 64; half the rows are two
captions of one item, "a photo of a coat . the coat is shown here"), then frozen; the CLS tokens of the reference
ViT's last 2 blocks injected through one shared linear connector into LM layers 2 and 3, plus a 10-vector soft
prompt, trained on 8,000 (train-split image, random-template caption) pairs for 1200 steps of 64 (`--steps`); the
full fine-tuning baseline trains the LM too (same connector, prompt, steps, data). Scored on 1,000 t10k images
(`--split val`: 1,000 images of the reference ViT's val hold-out, where settings are chosen): a greedy caption is
correct when the first class name in it is the image's class; the text-only prior is the frozen LM's own caption.
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

from vitlab.agents.epalm import LEARNING_RATES, STEPS, compare


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--steps", type=int, default=STEPS, help="optimizer steps of batch 64 per arm")
    ap.add_argument("--split", choices=("val", "test"), default="test", help="where naming is scored")
    ap.add_argument("--arms", nargs="+", choices=tuple(LEARNING_RATES), default=list(LEARNING_RATES))
    ap.add_argument("--epalm-lr", type=float, default=LEARNING_RATES["epalm"])
    ap.add_argument("--full-lr", type=float, default=LEARNING_RATES["full"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread; {args.steps} steps per "
          f"arm, scored on {args.split}\n")
    print("| seed | model | trainable params | trainable % | lr | item-naming acc | train s |")
    print("|---|---|---|---|---|---|---|")
    for seed in args.seeds:
        m = compare(seed, steps=args.steps, split=args.split, arms=tuple(args.arms),
                    lrs={"epalm": args.epalm_lr, "full": args.full_lr})
        print(f"| {seed} | frozen LM alone (text-only prior: \"{m['prior_caption']}\") | 0 | 0 % | - | "
              f"{m['prior_naming_acc']:.1%} | {m['lm_pretrain_s']:.0f} (LM pretraining) |")
        for arm, label in (("epalm", "eP-ALM (connector + soft prompt)"), ("full", "full fine-tuning (LM + "
                                                                                  "connector + prompt)")):
            if arm not in args.arms:
                continue
            print(f"| {seed} | {label} | {m[arm + '_trainable']:,} of {m[arm + '_total_params']:,} | "
                  f"{m[arm + '_trainable_pct']:.2f} % | {m[arm + '_lr']:g} | {m[arm + '_naming_acc']:.1%} | "
                  f"{m[arm + '_train_s']:.0f} |", flush=True)
    print(f"\nProcess CPU time {time.process_time():.0f} s.")


if __name__ == "__main__":
    main()
