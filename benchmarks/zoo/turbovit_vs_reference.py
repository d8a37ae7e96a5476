"""vitlab TurboViT proxy vs the official implementation: img/s at batch 8, 224 px, 2 threads, same weights.

    git --git-dir=<mirror of facebookresearch/hiera> archive HEAD hiera | tar -x -C /tmp/official-turbovit
    python benchmarks/zoo/turbovit_vs_reference.py --official /tmp/official-turbovit

TurboViT has no official code; vitlab's proxy is Hiera's topology (mask-unit attention, Q-pooling), so the
reference is the official Hiera (facebookresearch/hiera, hiera/hiera.py, commit b12b842) built with the proxy's
shape: width 64, one head, stages 1-2-7-2, Q-pooling 3, 8 x 8 mask units, mask-unit attention in stages 1-2.
Nothing is stubbed; its head's eval-mode softmax is switched off so that both return logits.

The official model gets seeded random weights (its own init, then trainable parameters + 0.02 * randn so that the
logits are of order 1), which vitlab's `checkpoint_filter_fn` converts; the logits are compared, then the two are
timed in `--rounds` A-B-B-A rounds of one forward pass per slot (benchmarks/zoo/_interleaved.py); the ratio is the
median of the per-round ratios, so a neighbour's load on a shared CPU hits both alike.
"""
import argparse
import sys
import warnings
from pathlib import Path

import torch

import vitlab
from vitlab.models.turbovit import checkpoint_filter_fn
from vitlab.profiling import num_threads, tune_allocator

from _interleaved import interleaved_ratio, report


def build_official(tree: Path, img_size: int):
    sys.path.insert(0, str(tree))
    import hiera

    model = hiera.Hiera(input_size=(img_size, img_size), embed_dim=64, num_heads=1, stages=(1, 2, 7, 2))
    model.head.act_func = lambda logits: logits  # the official head returns softmax probabilities in eval mode
    return model, model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True,
                        help="exported tree holding hiera/hiera.py")
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
    ours = vitlab.create_model("vl_turbovit_proxy").eval()
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
