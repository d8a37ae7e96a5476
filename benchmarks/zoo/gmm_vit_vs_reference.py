"""vitlab GMM-ViT (vit) vs the official implementation: img/s at batch 64, 32 px, 2 threads, same weights.

    git --git-dir=<mirror of CatworldLee/Gaussian-Mixture-Mask-Attention> archive HEAD models utils/drop_path.py \
        utils/__init__.py | tar -x -C /tmp/official-gmm_vit
    PYTHONPATH=<dir with einops> python benchmarks/zoo/gmm_vit_vs_reference.py --official /tmp/official-gmm_vit

GMM-ViT is a CIFAR model (32 px, patch 4: 8 x 8 tokens; no ImageNet configuration exists), so this script
runs at 32 px and batch 64 instead of 224 px and batch 8. The official models/vit.py + models/gmm.py (commit
b06b199) run as committed (they need einops and the repo's utils/drop_path.py). The model is create_model.py's
`vit` (dim 192, depth 9, 12 heads, MLP ratio 2) with `is_GMM=True` and 5 kernels, as in every official run.

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
from vitlab.models.gmm_vit import checkpoint_filter_fn
from vitlab.profiling import num_threads, tune_allocator

from _interleaved import interleaved_ratio, report


def build_official(tree: Path, img_size: int):
    sys.path.insert(0, str(tree))
    from models.vit import ViT

    model = ViT(img_size=img_size, patch_size=4, num_classes=1000, dim=192, mlp_dim_ratio=2, depth=9, heads=12,
                dim_head=192 // 12, is_GMM=True, num_kernals=5)
    return model, model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True,
                        help="exported tree holding models/vit.py and utils/")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--img-size", type=int, default=32)
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
    ours = vitlab.create_model("vl_gmm_vit_d9").eval()
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
