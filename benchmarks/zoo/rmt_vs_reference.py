"""vitlab RMT-T vs the official implementation: img/s at batch 8, 224 px, 2 threads, same weights.

    git --git-dir=<mirror of qhfan/RMT> archive HEAD classfication_release | tar -x -C /tmp/official-rmt
    PYTHONPATH=<dir with einops> python benchmarks/zoo/rmt_vs_reference.py --official /tmp/official-rmt

The official RMT.py imports einops and (unused) fvcore; fvcore is replaced by a stub module here. The two
implementations are timed in alternating rounds (official, vitlab, official, vitlab) and each keeps its best median,
so a neighbour's load on a shared CPU hits both alike.
"""
import argparse
import sys
import types
import warnings
from pathlib import Path

import torch

import vitlab
from vitlab.models.rmt import checkpoint_filter_fn
from vitlab.profiling import num_threads, time_callable

OFFICIAL_NAMES = {"tiny": "RMT_T3", "small": "RMT_S", "base": "RMT_M2", "large": "RMT_L6"}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, help="exported official tree (holds classfication_release/)")
    parser.add_argument("--variant", default="tiny", help=" | ".join(OFFICIAL_NAMES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)

    fvcore_nn = types.ModuleType("fvcore.nn")
    fvcore_nn.FlopCountAnalysis = fvcore_nn.flop_count_table = None
    sys.modules.setdefault("fvcore", types.ModuleType("fvcore"))
    sys.modules.setdefault("fvcore.nn", fvcore_nn)
    sys.path.insert(0, str(Path(args.official) / "classfication_release"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm's deprecated import paths in the official file
        import RMT

        torch.manual_seed(0)
        official = getattr(RMT, OFFICIAL_NAMES[args.variant])(None).eval()
    ours = vitlab.create_model(f"vl_rmt_{args.variant}").eval()
    ours.load_state_dict(checkpoint_filter_fn(official.state_dict(), ours))
    x = torch.randn(args.batch, 3, 224, 224)
    with torch.inference_mode(), num_threads(args.threads), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.meshgrid indexing warning from the official code
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
