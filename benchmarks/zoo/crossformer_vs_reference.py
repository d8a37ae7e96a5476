"""vitlab CrossFormer-T vs the official implementation: img/s at batch 8, 224 px, 2 threads, same weights.

    git --git-dir=<mirror of cheerss/CrossFormer> archive HEAD models | tar -x -C /tmp/official-crossformer
    python benchmarks/zoo/crossformer_vs_reference.py --official /tmp/official-crossformer [--variant small]

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
from vitlab.models.crossformer import checkpoint_filter_fn
from vitlab.profiling import num_threads, time_callable, tune_allocator

# configs/crossformer/{tiny,small}_patch4_group7_224.yaml on top of config.py's defaults
_CONFIGS = {
    "tiny": dict(embed_dim=64, depths=[1, 1, 8, 6], num_heads=[2, 4, 8, 16]),
    "small": dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24]),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, help="exported official CrossFormer tree (holds models/)")
    parser.add_argument("--variant", default="tiny", choices=sorted(_CONFIGS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    print(f"allocator: {tune_allocator()}")   # vitlab.profiling.allocator; VITLAB_ALLOCATOR=default to compare

    sys.path.insert(0, args.official)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # it prints its group sizes
        warnings.simplefilter("ignore")
        from models.crossformer import CrossFormer

        torch.manual_seed(0)
        official = CrossFormer(img_size=224, patch_size=[4, 8, 16, 32], group_size=[7, 7, 7, 7],
                               crs_interval=[8, 4, 2, 1], mlp_ratio=[4.0] * 4, merge_size=[[2, 4]] * 3,
                               use_acl=False, **_CONFIGS[args.variant]).eval()
    ours = vitlab.create_model(f"vl_crossformer_{args.variant}").eval()
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
