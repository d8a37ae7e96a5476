"""QUAR-VLA and ADAPT on the instructed Reach toy ("move the <class> to the <corner>", three items on the canvas).

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/agents_vla.py [--seeds 0 1] [--only quar-vla|adapt]

Runs `vitlab toy quar-vla` and `vitlab toy adapt` (vitlab/agents/quarvla.py, adapt.py `run`) per seed: 4000 expert
episodes on train-file items, 2000 AdamW steps of 64 transitions; scored on test-file items: action-token accuracy
on 300 held-out expert episodes and closed-loop success on 300 fresh scenes (16 steps). QUAR-VLA is also run with
each scene given another scene's instruction (success judged by its own), to show the words are followed. ADAPT:
the same prompted agent trained with and without the modality-alignment + sequential-consistency losses.
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
    ap.add_argument("--only", choices=("quar-vla", "adapt"), default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread\n")
    print("| seed | model | token acc | success | train s |")
    print("|---|---|---|---|---|")
    for seed in args.seeds:
        if args.only in (None, "quar-vla"):
            with tempfile.TemporaryDirectory() as out:
                m = run_toy("quar-vla", out, seed=seed)["metrics"]
            print(f"| {seed} | QUAR-VLA ({m['bins']} bins/dim, {m['params']} params) | {m['token_acc']:.1%} | "
                  f"{m['success']:.1%} (other scene's instruction: {m['success_wrong_instruction']:.1%}) | "
                  f"{m['train_s']:.0f} |", flush=True)
        if args.only in (None, "adapt"):
            with tempfile.TemporaryDirectory() as out:
                m = run_toy("adapt", out, seed=seed)["metrics"]
            for arm, label in (("adapt", "prompts + ADAPT losses"), ("plain", "prompts, no ADAPT losses")):
                print(f"| {seed} | {label} | {m[arm + '_token_acc']:.1%} | {m[arm + '_success']:.1%} | "
                      f"{m[arm + '_train_s']:.0f} |", flush=True)
    print(f"\nProcess CPU time {time.process_time():.0f} s.")


if __name__ == "__main__":
    main()
