"""eP-ALM at toy scale: frozen reference ViT + frozen tiny GPT-2, one linear connector + soft prompt.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/agents_epalm.py [--seeds 0 1]

Runs `vitlab toy epalm` (vitlab/agents/epalm.py `run`) per seed: a 4-layer GPT-2 (width 128) pretrained text-only on
templated captions of Fashion-MNIST items (400 AdamW steps of 64; half the rows are two captions of one item, "a photo
of a coat . the coat is shown here"), then frozen; the CLS tokens of the reference ViT's last 2 blocks injected through
one shared linear connector into LM layers 2 and 3, plus a 10-vector soft prompt, trained on 8,000 (train-file image,
random-template caption) pairs for 600 steps of 64; the full fine-tuning baseline trains the LM too (same connector,
prompt, steps, data). Scored on 1,000 t10k images: a greedy caption is
correct when the first class name in it is the image's class; the text-only prior is the frozen LM's own caption.
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time

import torch

from vitlab.agents import run_toy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread\n")
    print("| seed | model | trainable params | trainable % | item-naming acc | train s |")
    print("|---|---|---|---|---|---|")
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as out:
            m = run_toy("epalm", out, seed=seed)["metrics"]
        print(f"| {seed} | frozen LM alone (text-only prior: \"{m['prior_caption']}\") | 0 | 0 % | "
              f"{m['prior_naming_acc']:.1%} | {m['lm_pretrain_s']:.0f} (LM pretraining) |")
        for arm, label in (("epalm", "eP-ALM (connector + soft prompt)"), ("full", "full fine-tuning (LM + "
                                                                                  "connector + prompt)")):
            print(f"| {seed} | {label} | {m[arm + '_trainable']:,} of {m[arm + '_total_params']:,} | "
                  f"{m[arm + '_trainable_pct']:.2f} % | {m[arm + '_naming_acc']:.1%} | {m[arm + '_train_s']:.0f} |",
                  flush=True)
    print(f"\nProcess CPU time {time.process_time():.0f} s.")


if __name__ == "__main__":
    main()
