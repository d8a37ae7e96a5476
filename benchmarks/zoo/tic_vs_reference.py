"""vitlab TiC's MSA-Conv layer vs the official layer: img/s at batch 8, TiC-T's stage-1 shape, 2 threads, same weights.

    git --git-dir=<mirror of StriveZs/MSA-Conv> archive HEAD core/op pytorch_cpp_helper.hpp \
        | tar -x -C /tmp/official-tic
    # + core/op/cuda_stub.cpp (the CUDA im2col, never reached on CPU) and an einops stub, as
    #   tests/fixtures/zoo/tic/make_fixture.py describes; the op is built on first use into <official>/build
    python benchmarks/zoo/tic_vs_reference.py --official /tmp/official-tic

The official repository (commit 2d96f54) releases the MSA-Conv layer only (`MSA_Conv_2d`, with its C++ im2col op),
no TiC network, so this compares ONE LAYER, not the network: vitlab's `MSAConv2d` with the official layer's
settings (one head, no MDCS shift, no Inter-Pooling, ReLU) against the official `MSA_Conv_2d` at TiC-T's stage-1
shape (96 channels, 56 x 56 tokens at 224 px, 3 x 3 window, dilation 1), batch 8. vitlab's layer works on the NHWC
tokens of its network and is timed on them; the official layer takes NCHW and is timed on that. Seeded random
weights (official init + 0.02 * randn) converted by vitlab's `checkpoint_filter_fn`; timed in `--rounds` A-B-B-A
rounds of one forward per slot (benchmarks/zoo/_interleaved.py), ratio = median of the per-round ratios.
"""
import argparse
import sys
import warnings
from pathlib import Path

import torch

from vitlab.models.tic import MSAConv2d, checkpoint_filter_fn
from vitlab.profiling import num_threads, tune_allocator

from _interleaved import interleaved_ratio, report


def _official_layer_class(tree: Path):
    """Import the official `MSA_Conv_2d`, its C++ op (`msa_conv1`) built for CPU (cached in <tree>/build)."""
    build = tree / "build"
    if not (build / "msa_conv1.so").is_file():
        from torch.utils import cpp_extension

        op_dir = tree / "core" / "op"
        build.mkdir(exist_ok=True)
        cpp_extension.load("msa_conv1", [str(op_dir / "msa_conv.cpp"), str(op_dir / "cuda_stub.cpp")],
                           extra_include_paths=[str(op_dir)], build_directory=str(build))
    sys.path.insert(0, str(build))
    sys.path.insert(0, str(tree))
    import msa_conv1  # noqa: F401  (the official op module)
    from core.op.Transformer_in_Convolution import MSA_Conv_2d

    return MSA_Conv_2d


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, help="tree holding core/op/ (and build/ once built)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dim", type=int, default=96, help="channels (TiC-T stage 1: 96)")
    parser.add_argument("--grid", type=int, default=56, help="token grid side (224 px / 4)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10, help="A-B-B-A rounds (see _interleaved.py)")
    args = parser.parse_args(argv)
    print(f"allocator: {tune_allocator()}")   # vitlab.profiling.allocator; VITLAB_ALLOCATOR=default to compare

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        official_cls = _official_layer_class(Path(args.official))
    torch.manual_seed(0)
    official = official_cls(args.dim, args.dim, 3).eval()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for p in official.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    ours = MSAConv2d(args.dim, args.dim, 1, 3).eval()
    ours.load_state_dict(checkpoint_filter_fn(official.state_dict(), ours))
    x = torch.randn(args.batch, args.dim, args.grid, args.grid)
    x_nhwc = x.permute(0, 2, 3, 1).contiguous()  # vitlab's tokens
    with torch.inference_mode(), num_threads(args.threads):
        reference = official(x)
        diff = (ours(x_nhwc).permute(0, 3, 1, 2) - reference).abs().max().item()
        print(f"max |official output| {reference.abs().max().item():.3g}")
        result = interleaved_ratio(lambda: official(x), lambda: ours(x_nhwc), rounds=args.rounds)
    print("official ran on: the official MSA_Conv_2d layer alone (no official TiC network exists)")
    print(report(result, args.batch))
    print(f"ratio vitlab / official: {result.ratio:.2f}  (max |logit diff| {diff:.2e}; one layer's outputs)")


if __name__ == "__main__":
    main()
