"""vitlab STViT-S vs the official implementation: img/s at batch 8, 224 px, 2 threads, same weights.

    mkdir -p /tmp/official-stvit
    git --git-dir=<mirror of hhb072/STViT> show HEAD:models/stvit.py > /tmp/official-stvit/stvit.py
    python benchmarks/zoo/stvit_vs_reference.py --official /tmp/official-stvit

The official stvit.py (commit c9ed9a4) imports fvcore (for a FLOP table in its unused `test()`) and scipy.io
(unused): stub modules stand in when they are missing. The model is the official `stvit_small` (its `args` only
give drop rates, 0 here).

The official model gets seeded random weights (its own init, then trainable parameters + 0.02 * randn so that the
logits are of order 1), which vitlab's `checkpoint_filter_fn` converts; the logits are compared, then the two are
timed in `--rounds` A-B-B-A rounds of one forward pass per slot (benchmarks/zoo/_interleaved.py); the ratio is the
median of the per-round ratios, so a neighbour's load on a shared CPU hits both alike.
"""
import argparse
import sys
import types
import warnings
from pathlib import Path

import torch

import vitlab
from vitlab.models.stvit import checkpoint_filter_fn
from vitlab.profiling import num_threads, tune_allocator

from _interleaved import interleaved_ratio, report


def build_official(tree: Path, img_size: int):
    import importlib.util
    if importlib.util.find_spec("fvcore") is None:
        fvcore_nn = types.ModuleType("fvcore.nn")
        fvcore_nn.FlopCountAnalysis = fvcore_nn.flop_count_table = None
        sys.modules.setdefault("fvcore", types.ModuleType("fvcore"))
        sys.modules.setdefault("fvcore.nn", fvcore_nn)
    if importlib.util.find_spec("scipy") is None:
        sys.modules.setdefault("scipy", types.ModuleType("scipy"))
        sys.modules.setdefault("scipy.io", types.ModuleType("scipy.io"))
    sys.path.insert(0, str(tree))
    import stvit

    model = stvit.stvit_small(types.SimpleNamespace(drop=0.0, drop_path=0.0))
    return model, model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True,
                        help="folder holding the official stvit.py")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10, help="A-B-B-A rounds (see _interleaved.py)")
    args = parser.parse_args(argv)
    print(f"allocator: {tune_allocator()}")   # vitlab.profiling.allocator; VITLAB_ALLOCATOR=default to compare

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm's deprecated import paths, re-registered model names
        torch.manual_seed(0)
        official, run_official = build_official(Path(args.official), args.img_size)
    official.eval()
    with torch.no_grad():  # away from the init (zero biases, unit norms, tiny classifier): logits of order 1
        generator = torch.Generator().manual_seed(1)
        for p in (p for p in official.parameters() if p.requires_grad):  # not frozen tables / identity kernels
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    ours = vitlab.create_model("vl_stvit_small").eval()
    ours.load_state_dict(checkpoint_filter_fn(official.state_dict(), ours))
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    with torch.inference_mode(), num_threads(args.threads), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = run_official(x)
        diff = (ours(x) - reference).abs().max().item()
        print(f"max |official logit| {reference.abs().max().item():.3g}")
        result = interleaved_ratio(lambda: run_official(x), lambda: ours(x), rounds=args.rounds)
    print(report(result, args.batch))
    print(f"ratio vitlab / official: {result.ratio:.2f}  (max |logit diff| {diff:.2e})")


if __name__ == "__main__":
    main()
