"""vitlab SpectFormer-T vs the official implementation: img/s at batch 8, 224 px, 2 threads, same weights.

    git --git-dir=<mirror of badripatro/SpectFormers> archive HEAD vanilla_architecture/spectformer.py \
        | tar -x -C /tmp/official-spectformer
    python benchmarks/zoo/spectformer_vs_reference.py --official /tmp/official-spectformer

The official `Block_attention` hard-codes 6 heads, which cannot split spectformer-ti's width 256 (its comment says
"4 for tiny"); the script sets 4 heads on the built official modules. The official file imports
`numpy.lib.arraypad`, gone in numpy 2; a stand-in module is registered when it is missing. The two implementations
are timed in `--rounds` A-B-B-A rounds of one forward pass per slot (benchmarks/zoo/_interleaved.py); the ratio is the
median of the per-round ratios, so a neighbour's load hits both alike.
"""
import argparse
import contextlib
import io
import os
import sys
import types
import warnings
from functools import partial

import numpy as np
import torch
import torch.nn as nn

import vitlab
from vitlab.models.spectformer import checkpoint_filter_fn
from vitlab.profiling import num_threads, tune_allocator

from _interleaved import interleaved_ratio, report

CONFIGS = {  # vanilla_architecture/main_spectformer.py; heads per the Block_attention comment
    "tiny": dict(embed_dim=256, depth=12, heads=4),
    "xs": dict(embed_dim=384, depth=12, heads=6),
    "small": dict(embed_dim=384, depth=19, heads=6),
}


def _official_model(tree: str, embed_dim: int, depth: int, heads: int) -> nn.Module:
    folder = os.path.join(tree, "vanilla_architecture") if os.path.isdir(os.path.join(tree, "vanilla_architecture")) \
        else tree
    sys.path.insert(0, folder)
    if "numpy.lib.arraypad" not in sys.modules:
        try:
            import numpy.lib.arraypad  # noqa: F401
        except ImportError:
            sys.modules["numpy.lib.arraypad"] = types.SimpleNamespace(pad=np.pad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import spectformer

    with contextlib.redirect_stdout(io.StringIO()):  # it prints its drop-path schedule
        model = spectformer.SpectFormer(img_size=224, patch_size=16, embed_dim=embed_dim, depth=depth, mlp_ratio=4,
                                        norm_layer=partial(nn.LayerNorm, eps=1e-6))
    for block in model.blocks:
        if hasattr(block, "attn"):
            block.attn.num_heads = heads
            block.attn.scale = (embed_dim // heads) ** -0.5
    return model.eval()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, help="exported official tree (or its vanilla_architecture/)")
    parser.add_argument("--variant", default="tiny", choices=sorted(CONFIGS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10, help="A-B-B-A rounds (see _interleaved.py)")
    args = parser.parse_args(argv)
    print(f"allocator: {tune_allocator()}")   # vitlab.profiling.allocator; VITLAB_ALLOCATOR=default to compare

    torch.manual_seed(0)
    official = _official_model(args.official, **CONFIGS[args.variant])
    ours = vitlab.create_model(f"vl_spectformer_{args.variant}").eval()
    ours.load_state_dict(checkpoint_filter_fn(official.state_dict(), ours))
    x = torch.randn(args.batch, 3, 224, 224)
    with torch.inference_mode(), num_threads(args.threads):
        diff = (ours(x) - official(x)).abs().max().item()
        result = interleaved_ratio(lambda: official(x), lambda: ours(x), rounds=args.rounds)
    print(report(result, args.batch))
    print(f"ratio vitlab / official: {result.ratio:.2f}  (max |logit diff| {diff:.2e})")


if __name__ == "__main__":
    main()
