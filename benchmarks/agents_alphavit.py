"""AlphaViT at toy scale: one network trained by self-play on Connect-4 5x4 and 6x5 (columns x rows), then matched
against random play and OpenSpiel's MCTSBot (25 simulations, one random rollout per leaf, UCT c=2, solver on) on
both boards, alternating who moves first. Seeded; prints a markdown table.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/agents_alphavit.py

Toy-scale targets: >= 90 % wins against random and >= 55 % against MCTS-25 on both boards. A draw counts as half a
win in `score`; `win` counts wins only. AlphaViT searches `--eval-simulations` (default 200, the official
`num_mcts_sims` of Connect4_54 / Connect4_65) per move in the matches; `--save` / `--load` keep the trained weights so
other evaluation settings can be matched without retraining (training is deterministic for a seed).
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

from vitlab.agents.alphavit import EVAL_SIMULATIONS, AlphaViTNet, TrainConfig, play_match, train


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
    ap.add_argument("--steps", type=int, default=TrainConfig.steps_per_iteration, help="AdamW steps per iteration")
    ap.add_argument("--eval-games", type=int, default=100)
    ap.add_argument("--eval-simulations", type=int, default=EVAL_SIMULATIONS,
                    help="AlphaViT's PUCT simulations per match move (the official test-time count for Connect-4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", help="write the trained weights here (a state_dict)")
    ap.add_argument("--load", help="skip training: match these weights (written by --save with the same settings)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    start = time.perf_counter()

    cfg = TrainConfig(iterations=args.iterations, games_per_iteration=args.games, simulations=args.simulations,
                      steps_per_iteration=args.steps)
    net = AlphaViTNet()
    n_params = sum(p.numel() for p in net.parameters())
    if args.load:
        net.load_state_dict(torch.load(args.load))
        print(f"\nAlphaViT {n_params / 1e3:.0f}k params, weights from {args.load}; "
              f"{_cpu()}, {torch.get_num_threads()} thread\n")
    else:
        stats = train(net, cfg, args.seed, log=print)
        if args.save:
            torch.save(net.state_dict(), args.save)
        print(f"\nAlphaViT {n_params / 1e3:.0f}k params, {stats['iterations']} iterations, {stats['positions']} "
              f"self-play positions, {stats['train_steps']} optimizer steps, {stats['train_s']:.0f} s; "
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
