"""vitlab SReT-T vs the official implementation: img/s at batch 8, 224 px, 2 threads, same weights.

    git --git-dir=<mirror of szq0214/SReT> archive HEAD | tar -x -C /tmp/official-sret
    pip install --target /tmp/zoo-extra einops      # the official code imports einops
    PYTHONPATH=/tmp/zoo-extra python benchmarks/zoo/sret_vs_reference.py --official /tmp/official-sret

Both models draw the same random slice permutations (official: torch.randperm at every forward), so the logits are
compared after the same seed.
"""
import argparse
import statistics
import sys
import warnings

import torch

import vitlab
from vitlab.models.sret import checkpoint_filter_fn
from vitlab.profiling import num_threads, time_callable, tune_allocator


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, help="exported official SReT tree (holds SReT.py)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    print(f"allocator: {tune_allocator()}")   # vitlab.profiling.allocator; VITLAB_ALLOCATOR=default to compare

    sys.path.insert(0, args.official)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from SReT import SReT_T

    torch.manual_seed(0)
    official = SReT_T().eval()
    ours = vitlab.create_model("vl_sret_tiny").eval()
    ours.load_state_dict(checkpoint_filter_fn(official.state_dict(), ours))
    x = torch.randn(args.batch, 3, 224, 224)
    with torch.inference_mode(), num_threads(args.threads):
        torch.manual_seed(1)
        expected = official(x)
        torch.manual_seed(1)
        diff = (ours(x) - expected).abs().max().item()
        for model in (official, ours, official, ours):  # warm-up
            model(x)
        # one timed call per model per round, alternating, so that load from other processes on a shared CPU hits
        # both alike; the median over rounds
        calls = {"official": [], "vitlab": []}
        for _ in range(args.rounds):
            for name, model in (("official", official), ("vitlab", ours)):
                timing = time_callable(lambda: model(x), warmup=0, min_runs=1, max_runs=1, min_time_s=0.0)
                calls[name].append(timing.median_s)
    seconds = {name: statistics.median(values) for name, values in calls.items()}
    paired = statistics.median(o / v for o, v in zip(calls["official"], calls["vitlab"]))
    for name, median_s in seconds.items():
        print(f"{name:9s} {args.batch / median_s:8.2f} img/s  (median of {args.rounds} alternating calls, "
              f"{median_s * 1e3:.0f} ms per batch)")
    print(f"median of per-round ratios vitlab / official: {paired:.2f}")
    print(f"ratio vitlab / official: {seconds['official'] / seconds['vitlab']:.2f}  (max |logit diff| {diff:.2e})")


if __name__ == "__main__":
    main()
