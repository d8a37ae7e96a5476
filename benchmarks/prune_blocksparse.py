"""Block sparsity on this CPU: is a 50 %-block-sparse Linear faster than the dense one? (LPViT's premise, measured.)

    python benchmarks/prune_blocksparse.py --threads 2

For the reference model's Linear shapes (qkv 96->288, fc1 96->192, fc2 192->96, 32 images x 50 tokens), half of
the (b x b) weight blocks zeroed at random, timed interleaved against the dense layer: the masked weight in the dense
kernel, and the same weight as a torch BSR sparse tensor (`to_sparse_bsr`). Prints the speed-up over dense (median
over rounds of per-round ratios). Random weights and masks (speed only); no pruning criterion is involved.
"""
import argparse
import statistics

import torch
import torch.nn.functional as F

from vitlab.profiling import time_callable, tune_allocator

SHAPES = (("qkv", 288, 96), ("fc1", 192, 96), ("fc2", 96, 192))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=32 * 50)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"allocator: {tune_allocator()}")   # vitlab.profiling.allocator; VITLAB_ALLOCATOR=default to compare
    torch.manual_seed(0)
    print(f"threads {args.threads}, {args.tokens} tokens, torch {torch.__version__}\n")
    print("| layer | block | blocks kept | dense µs | masked dense speed-up | BSR sparse speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, out_f, in_f in SHAPES:
        x = torch.randn(args.tokens, in_f)
        w = torch.randn(out_f, in_f)
        for bs in (16, 32):
            keep = torch.rand(out_f // bs, in_f // bs) > 0.5
            wm = w * keep.repeat_interleave(bs, 0).repeat_interleave(bs, 1)
            wb = wm.to_sparse_bsr((bs, bs))
            torch.testing.assert_close(F.linear(x, wb), F.linear(x, wm), rtol=1e-4, atol=1e-3)
            fns = {"dense": lambda: F.linear(x, w), "masked": lambda: F.linear(x, wm), "bsr": lambda: F.linear(x, wb)}
            t = {k: [] for k in fns}
            for _ in range(args.rounds):
                for k, fn in fns.items():
                    t[k].append(time_callable(fn, warmup=2, min_runs=5, min_time_s=0.1).median_s)
            ratio = {k: statistics.median(d / v for d, v in zip(t["dense"], t[k])) for k in fns}
            print(f"| {name} {out_f}x{in_f} | {bs} | {keep.float().mean():.2f} | {1e6 * statistics.median(t['dense']):.0f} "
                  f"| {ratio['masked']:.2f}x | {ratio['bsr']:.2f}x |")


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore", message="Sparse BSR tensor support is in beta")
    main()
