"""Speed of any points (checkpoint or model + technique stack), timed round-robin in one run against the first.

    python benchmarks/points_speed.py checkpoints/fashion-mnist-reference \
        "checkpoints/fashion-mnist-pruned50|w8a8" "checkpoints/fashion-mnist-reference|w8a8" --rounds 15

A point is SOURCE or SOURCE|APPLY[|APPLY...] (the Pareto lab's notation; APPLY as for --apply). The first point is
the baseline. Quantized points calibrate on --calib-images seeded images of --data's train split. Every point
runs the same batch of --batch real test images; each round times every point once (a time_callable median over
--min-time / --rounds seconds) and the table shows the median of the rounds, so slow drifts of this machine hit
all points alike. `vitlab pareto` times each point once, in sequence; this script is the check for its headline.
"""
import argparse

import torch

from vitlab.bench.measure import build_runner, dataset_for
from vitlab.profiling import time_callable, tune_allocator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("points", nargs="+", help="SOURCE or SOURCE|APPLY[|APPLY...]; the first is the baseline")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--min-time", type=float, default=15.0, help="seconds of timing per point, over all rounds")
    parser.add_argument("--calib-images", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"allocator: {tune_allocator()}")   # vitlab.profiling.allocator; VITLAB_ALLOCATOR=default to compare

    runners = []
    for point in args.points:
        source, *apply = point.split("|")
        runners.append(build_runner(source, apply, calib_data=args.data, calib_images=args.calib_images))
    test = dataset_for(runners[0], args.data, "test")
    x = torch.stack([test[i][0] for i in range(args.batch)])
    times = [[] for _ in runners]
    with torch.inference_mode():
        for _ in range(args.rounds):
            for i, runner in enumerate(runners):
                times[i].append(time_callable(lambda: runner(x), min_time_s=args.min_time / args.rounds,
                                              warmup=1 if times[i] else 3, min_runs=3).median_s)
    print(f"\nbatch {args.batch}, {args.threads} threads, {args.rounds} rounds, torch {torch.__version__}")
    print("| point | engine | img/s | speed-up | per-round speed-up (min-max) |\n|---|---|---|---|---|")
    base = sorted(times[0])[len(times[0]) // 2]
    for point, runner, t in zip(args.points, runners, times):
        median = sorted(t)[len(t) // 2]
        per_round = [b / s for b, s in zip(times[0], t)]
        print(f"| {point} | {getattr(runner, 'engine', 'torch')} | {args.batch / median:.0f} | {base / median:.2f}x | "
              f"{min(per_round):.2f}-{max(per_round):.2f}x |")


if __name__ == "__main__":
    main()
