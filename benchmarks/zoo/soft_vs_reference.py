"""vitlab SOFT-Tiny vs the official implementation: img/s at batch 8, 224 px, 2 threads, same weights.

    git --git-dir=<mirror of fudan-zvg/SOFT> archive HEAD models SOFT/kernel | tar -x -C /tmp/official-soft
    touch /tmp/official-soft/SOFT/__init__.py
    PYTHONPATH=<dir with einops> python benchmarks/zoo/soft_vs_reference.py --official /tmp/official-soft

The official files (commit d3febc3) run on CPU with the fixture's stubs, kept in this script: `cv2` (imported,
unused) and `SOFT._C` (the compiled CUDA extension) are empty modules; the pure-torch Gaussian kernel
(`kernel_method="torch"`) is used with its `.cuda()` all-ones matrices made on the input's device; the CUDA-only
`newton_inverse_kernel` autograd op is replaced by its forward, the official `newton_inv`. The model is the official
`soft_tiny`.

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
from vitlab.models.soft import checkpoint_filter_fn
from vitlab.profiling import num_threads, tune_allocator

from _interleaved import interleaved_ratio, report


def build_official(tree: Path, img_size: int):
    sys.path.insert(0, str(tree))
    sys.modules.setdefault("cv2", types.ModuleType("cv2"))
    import SOFT  # noqa: F401  (the package must exist before its missing extension is stubbed)
    sys.modules.setdefault("SOFT._C", types.ModuleType("SOFT._C"))
    from SOFT.kernel import inverse
    from models import softmax_free_transformer as sft
    from models import softmax_free_vision_transformer as sfvt

    def subtraction_gaussian_kernel_torch(q, k):  # the official function, ones on q's device instead of .cuda()
        matA_square = q ** 2. @ torch.ones(k.shape[-2:], device=q.device)
        matB_square = torch.ones(q.shape[-2:], device=q.device) @ k ** 2.
        return matA_square + matB_square - 2. * (q @ k)

    sft.subtraction_gaussian_kernel_torch = subtraction_gaussian_kernel_torch
    sft.newton_inverse_kernel = inverse.newton_inv
    model = sfvt.soft_tiny(kernel_method="torch")
    return model, model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True,
                        help="tree holding models/ and SOFT/kernel/")
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
    ours = vitlab.create_model("vl_soft_tiny").eval()
    ours.load_state_dict(checkpoint_filter_fn(official.state_dict(), ours))
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    with torch.inference_mode(), num_threads(args.threads), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = run_official(x)
        diff = (ours(x) - reference).abs().max().item()
        print(f"max |official logit| {reference.abs().max().item():.3g}")
        result = interleaved_ratio(lambda: run_official(x), lambda: ours(x), rounds=args.rounds)
    print("official ran on: its pure-torch kernel (kernel_method=\"torch\"; the CUDA kernels need a GPU)")
    print(report(result, args.batch))
    print(f"ratio vitlab / official: {result.ratio:.2f}  (max |logit diff| {diff:.2e})")


if __name__ == "__main__":
    main()
