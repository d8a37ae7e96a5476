"""Seer vs behaviour cloning on the Reach toy (a Fashion-MNIST item moved to a goal marker by discrete actions).

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/agents_seer.py [--seeds 0 1]

Runs `vitlab toy seer` (vitlab/agents/seer.py `run`) per seed: 3000 expert episodes on train-file items, Seer
(foresight + inverse dynamics, block-causal mask) and a BC policy on the same transformer, 1200 AdamW steps of 32
windows each; scored on test-file items: expert-action accuracy on 300 held-out expert episodes, inverse-dynamics
accuracy given the true next frame, and closed-loop success on 300 fresh scenes (goal within 16 steps).
Toy-scale targets: inverse dynamics given the true future >= 99 %; Seer success >= BC success at equal steps.
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
    print("| seed | policy | params | action acc | ID acc (true future) | success | train s |")
    print("|---|---|---|---|---|---|---|")
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as out:
            m = run_toy("seer", out, seed=seed)["metrics"]
        print(f"| {seed} | Seer (foresight + ID) | {m['seer_params']} | {m['seer_action_acc']:.1%} | "
              f"{m['seer_inverse_true_acc']:.1%} | {m['seer_success']:.1%} | {m['seer_train_s']:.0f} |")
        print(f"| {seed} | BC | {m['bc_params']} | {m['bc_action_acc']:.1%} | - | {m['bc_success']:.1%} | "
              f"{m['bc_train_s']:.0f} |", flush=True)
    print(f"\nProcess CPU time {time.process_time():.0f} s.")


if __name__ == "__main__":
    main()
