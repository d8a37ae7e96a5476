"""vitlab ChannelViT-T/16 vs the official implementation: img/s at batch 8, 224 px, 2 threads, same weights.

    mkdir -p /tmp/official-channelvit/channelvit/{backbone,utils}
    git --git-dir=<mirror of insitro/ChannelViT> archive HEAD channelvit/backbone/channel_vit.py \
        channelvit/backbone/vit.py channelvit/utils/optim.py | tar -x -C /tmp/official-channelvit
    echo 'from channelvit.utils.optim import trunc_normal_' > /tmp/official-channelvit/channelvit/utils/__init__.py
    touch /tmp/official-channelvit/channelvit/__init__.py /tmp/official-channelvit/channelvit/backbone/__init__.py
    python benchmarks/zoo/channelvit_vs_reference.py --official /tmp/official-channelvit

The official channel_vit.py (commit 1077a10) is imported as the fixture does (the one stub: a
`channelvit/utils/__init__.py` importing just `trunc_normal_`). The official `channelvit_tiny` (3 channels, 1000
classes) returns the class-token features: its head is applied after it, with all channels passed as
`extra_tokens["channels"]`, as vitlab's forward does by default.

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
from vitlab.models.channelvit import checkpoint_filter_fn
from vitlab.profiling import num_threads, tune_allocator

from _interleaved import interleaved_ratio, report


def build_official(tree: Path, img_size: int):
    sys.path.insert(0, str(tree))
    from channelvit.backbone.channel_vit import channelvit_tiny

    model = channelvit_tiny(img_size=[img_size], in_chans=3, num_classes=1000)
    channels = {"channels": torch.tensor([[0, 1, 2]])}
    return model, lambda x: model.head(model(x, {"channels": channels["channels"].expand(x.shape[0], -1)}))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True,
                        help="tree holding channelvit/backbone/channel_vit.py")
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
    ours = vitlab.create_model("vl_channelvit_tiny_patch16").eval()
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
