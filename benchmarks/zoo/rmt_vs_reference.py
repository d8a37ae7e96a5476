"""vitlab RMT-T vs the official implementation: img/s at batch 8, 224 px, 2 threads, same weights.

    git --git-dir=<mirror of qhfan/RMT> archive HEAD classfication_release | tar -x -C /tmp/official-rmt
    PYTHONPATH=<dir with einops> python benchmarks/zoo/rmt_vs_reference.py --official /tmp/official-rmt

The official RMT.py imports einops and (unused) fvcore; fvcore is replaced by a stub module here. The two
implementations are timed in `--rounds` A-B-B-A rounds of one forward pass per slot (benchmarks/zoo/_interleaved.py);
the ratio is the median of the per-round ratios, so a neighbour's load on a shared CPU hits both alike.
"""
import argparse
import sys
import types
import warnings
from pathlib import Path

import torch

import vitlab
from vitlab.models.rmt import checkpoint_filter_fn
from vitlab.profiling import num_threads, tune_allocator

from _interleaved import interleaved_ratio, report

OFFICIAL_NAMES = {"tiny": "RMT_T3", "small": "RMT_S", "base": "RMT_M2", "large": "RMT_L6"}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, help="exported official tree (holds classfication_release/)")
    parser.add_argument("--variant", default="tiny", help=" | ".join(OFFICIAL_NAMES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10, help="A-B-B-A rounds (see _interleaved.py)")
    args = parser.parse_args(argv)
    print(f"allocator: {tune_allocator()}")   # vitlab.profiling.allocator; VITLAB_ALLOCATOR=default to compare

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
        result = interleaved_ratio(lambda: official(x), lambda: ours(x), rounds=args.rounds)
    print(report(result, args.batch))
    print(f"ratio vitlab / official: {result.ratio:.2f}  (max |logit diff| {diff:.2e})")


if __name__ == "__main__":
    main()
