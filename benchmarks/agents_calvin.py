"""CALVIN vs VIN at toy scale: the constrained value-iteration layer checked against exact shortest paths, then both
planners trained on the same BFS-expert demonstrations on random 15x15 mazes (same data, same optimizer steps, same
number of value iterations K) and rolled out greedily on unseen mazes. Seeded; prints a markdown table.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/agents_calvin.py

Toy-scale targets: exact-VI equality to 1e-5; CALVIN >= 90 % success on unseen mazes and >= VIN.
"""
from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from vitlab.agents.calvin import CALVIN, VIN, exact_vi_error, fit, make_data, success_rate


def _cpu() -> str:
    """The CPU's model name (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=15)
    ap.add_argument("--train-mazes", type=int, default=1000)
    ap.add_argument("--test-mazes", type=int, default=200)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-mazes", type=int, default=16)
    ap.add_argument("--k", type=int, default=40, help="value iterations (both models)")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    err = exact_vi_error(args.size, 20, rng)
    train_data = make_data(args.train_mazes, args.size, rng)
    test_data = make_data(args.test_mazes, args.size, rng)
    print(f"{args.size}x{args.size} mazes: {args.train_mazes} train ({len(train_data.demos)} expert pairs), "
          f"{args.test_mazes} unseen; K={args.k}, {args.steps} Adam steps of {args.batch_mazes} mazes, lr {args.lr}; "
          f"{_cpu()}, {torch.get_num_threads()} thread\n")
    print(f"Known transitions: max |V + shortest-path distance| over 20 random mazes = {err:.1e}\n")
    print("| planner | params | success (unseen) | train s |")
    print("|---|---|---|---|")
    for name, model in (("CALVIN", CALVIN(k=args.k)), ("VIN", VIN(k=args.k))):
        torch.manual_seed(args.seed)
        seconds = fit(model, train_data, args.steps, args.batch_mazes, args.lr, args.seed)
        rate = success_rate(model, test_data, np.random.default_rng(args.seed + 1))
        n = sum(p.numel() for p in model.parameters())
        print(f"| {name} | {n} | {rate:.1%} | {seconds:.0f} |", flush=True)
    print(f"\nProcess CPU time {time.process_time():.0f} s.")


if __name__ == "__main__":
    main()
