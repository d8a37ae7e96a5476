"""AlphaViT at toy scale: one network trained by self-play on Connect-4 5x4 and 6x5 (columns x rows), then matched
against random play and OpenSpiel's MCTSBot (25 simulations, one random rollout per leaf, UCT c=2, solver on) on
both boards, alternating who moves first. Seeded; prints a markdown table.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/agents_alphavit.py

Toy-scale targets: >= 90 % wins against random and >= 55 % against MCTS-25 on both boards. A draw counts as half a
win in `score`; `win` counts wins only.
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

from vitlab.agents.alphavit import AlphaViTNet, TrainConfig, play_match, train


def _cpu() -> str:
    """The CPU's model name (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=TrainConfig.iterations)
    ap.add_argument("--games", type=int, default=TrainConfig.games_per_iteration, help="self-play games per board")
    ap.add_argument("--simulations", type=int, default=TrainConfig.simulations, help="self-play PUCT simulations")
    ap.add_argument("--eval-games", type=int, default=100)
    ap.add_argument("--eval-simulations", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    start = time.perf_counter()

    cfg = TrainConfig(iterations=args.iterations, games_per_iteration=args.games, simulations=args.simulations)
    net = AlphaViTNet()
    stats = train(net, cfg, args.seed, log=print)
    n_params = sum(p.numel() for p in net.parameters())
    print(f"\nAlphaViT {n_params / 1e3:.0f}k params, {stats['iterations']} iterations, {stats['positions']} self-play "
          f"positions, {stats['train_steps']} optimizer steps, {stats['train_s']:.0f} s; "
          f"{_cpu()}, {torch.get_num_threads()} thread\n")
    print(f"| board (cols x rows) | opponent | games | win | draw | loss | score | eval s |")
    print("|---|---|---|---|---|---|---|---|")
    for g in cfg.games:
        for opp in ("random", "mcts"):
            t = time.perf_counter()
            r = play_match(net, g, opp, args.eval_games, args.eval_simulations, seed=args.seed)
            label = "random" if opp == "random" else "OpenSpiel MCTSBot-25"
            print(f"| {g.cols}x{g.rows} | {label} | {args.eval_games} | {r['win']:.0%} | {r['draw']:.0%} | "
                  f"{r['loss']:.0%} | {r['score']:.1%} | {time.perf_counter() - t:.0f} |", flush=True)
    print(f"\nAlphaViT plays {args.eval_simulations} PUCT simulations per move, most-visited move. "
          f"Process CPU time {time.process_time():.0f} s, wall {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main()
