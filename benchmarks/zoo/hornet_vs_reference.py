"""vitlab HorNet-T (7x7) vs the official implementation: img/s at batch 8, 224 px, 2 threads, same weights.

    git --git-dir=<mirror of raoyongming/HorNet> archive HEAD hornet.py | tar -x -C /tmp/official-hornet
    python benchmarks/zoo/hornet_vs_reference.py --official /tmp/official-hornet [--variant tiny_gf]

The two implementations are timed in alternating rounds (official, vitlab, official, vitlab) and each keeps its best
median, so a neighbour's load on a shared CPU hits both alike.
"""
import argparse
import contextlib
import io
import sys
import warnings

import torch

import vitlab
from vitlab.models.hornet import checkpoint_filter_fn
from vitlab.profiling import num_threads, time_callable, tune_allocator


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, help="exported official HorNet tree (holds hornet.py)")
    parser.add_argument("--variant", default="tiny_7x7", help="tiny_7x7 | tiny_gf | small_7x7 | small_gf")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    print(f"allocator: {tune_allocator()}")   # vitlab.profiling.allocator; VITLAB_ALLOCATOR=default to compare

    sys.path.insert(0, args.official)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # it prints every gnconv it builds
        warnings.simplefilter("ignore")
        import hornet

        torch.manual_seed(0)
        official = getattr(hornet, f"hornet_{args.variant}")().eval()
    ours = vitlab.create_model(f"vl_hornet_{args.variant}").eval()
    ours.load_state_dict(checkpoint_filter_fn(official.state_dict(), ours))
    x = torch.randn(args.batch, 3, 224, 224)
    with torch.inference_mode(), num_threads(args.threads):
        diff = (ours(x) - official(x)).abs().max().item()
        best = {}
        for _ in range(args.rounds):
            for name, model in (("official", official), ("vitlab", ours)):
                timing = time_callable(lambda: model(x), warmup=2, min_runs=5, min_time_s=3.0, max_time_s=15.0)
                best[name] = min(best.get(name, float("inf")), timing.median_s)
    for name, seconds in best.items():
        print(f"{name:9s} {args.batch / seconds:8.1f} img/s  (best median {seconds * 1e3:.1f} ms / batch {args.batch})")
    print(f"ratio vitlab / official: {best['official'] / best['vitlab']:.2f}  (max |logit diff| {diff:.2e})")


if __name__ == "__main__":
    main()
