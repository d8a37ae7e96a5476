"""Speed of vitlab's CvT-13 against the reference it was checked against, at 224 px, batch 8, 2 threads, one run.

    python benchmarks/zoo/cvt_vs_reference.py                          # vs HF transformers' CvtForImageClassification
    PYTHONPATH=/tmp/zoo-extra python benchmarks/zoo/cvt_vs_reference.py --official /tmp/official-cvt   # + official

The reference is HF transformers (random init, default config = CvT-13); vitlab's model gets its weights through the
HF converter, so both compute the same function (checked here before timing). `--official PATH` (an export of
github.com/microsoft/CvT; needs einops) also times the official `ConvolutionalVisionTransformer` with QuickGELU,
weights loaded through `checkpoint_filter_fn`.

Timing: `--rounds` rounds; each round times every implementation in turn (`vitlab.profiling.time_callable`: one
warm-up call, the median of three), so all see the same load on a shared CPU. Reported: img/s of each
implementation's fastest round, and the ratio two ways (fastest rounds; median of the per-round ratios).
"""
import argparse
import statistics
import collections.abc
import sys
import types
from functools import partial

import torch

import vitlab.models
from vitlab.models.cvt import checkpoint_filter_fn
from vitlab.profiling import num_threads, time_callable, tune_allocator


def _official_cvt13(path: str) -> torch.nn.Module:
    """The official CvT-13 (QuickGELU, LayerNorm eps 1e-5, as its `get_cls_model` builds it), random init."""
    import yaml

    sys.modules.setdefault("torch._six", types.ModuleType("torch._six"))
    sys.modules["torch._six"].container_abcs = collections.abc  # torch 2 dropped torch._six
    sys.modules.setdefault("scipy", types.ModuleType("scipy"))  # imported, used only to resize pos-embeds on load
    sys.path.insert(0, f"{path}/lib")
    from models import cls_cvt

    spec = yaml.safe_load(open(f"{path}/experiments/imagenet/cvt/cvt-13-224x224.yaml"))["MODEL"]["SPEC"]
    return cls_cvt.ConvolutionalVisionTransformer(
        num_classes=1000, act_layer=cls_cvt.QuickGELU, norm_layer=partial(cls_cvt.LayerNorm, eps=1e-5), spec=spec)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", default=None, help="export of github.com/microsoft/CvT to time as well")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"allocator: {tune_allocator()}")   # vitlab.profiling.allocator; VITLAB_ALLOCATOR=default to compare
    from transformers import CvtConfig, CvtForImageClassification

    torch.manual_seed(0)
    hf = CvtForImageClassification(CvtConfig(num_labels=1000)).eval()
    ours = vitlab.models.from_transformers(hf).eval()
    candidates = {"vitlab vl_cvt_13 (GELU)": ours, "HF CvtForImageClassification": hf}
    if args.official:
        official = _official_cvt13(args.official).eval()
        official_vl = vitlab.create_model("vl_cvt_13").eval()  # official activation (QuickGELU)
        official_vl.load_state_dict(checkpoint_filter_fn(official.state_dict(), official_vl))
        candidates["vitlab vl_cvt_13 (QuickGELU)"] = official_vl
        candidates["official cls_cvt (QuickGELU)"] = official
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    with torch.inference_mode():
        # the same function before timing it: vitlab vs HF, and (with --official) vitlab vs official after the filter
        diff = (ours(x[:2]) - hf(x[:2]).logits).abs().max().item()
        print(f"max |logits diff| vitlab vs HF: {diff:.2e}")
        if args.official:
            diff = (candidates["vitlab vl_cvt_13 (QuickGELU)"](x[:2])
                    - candidates["official cls_cvt (QuickGELU)"](x[:2])).abs().max().item()
            print(f"max |logits diff| vitlab vs official: {diff:.2e}")

    def call(model):
        out = model(x)
        return out if isinstance(out, torch.Tensor) else out.logits

    medians = {name: [] for name in candidates}  # per round; rounds alternate the implementations
    with num_threads(args.threads), torch.inference_mode():
        for _ in range(args.rounds):
            for name, model in candidates.items():
                timing = time_callable(partial(call, model), warmup=1, min_runs=3, max_runs=3, min_time_s=0.0)
                medians[name].append(timing.median_s)
    print(f"batch {args.batch}, {args.img_size} px, {args.threads} threads, {args.rounds} rounds, torch {torch.__version__}")
    for name, rounds in medians.items():
        print(f"  {name:32s} {args.batch / min(rounds):8.1f} img/s  (fastest round median {min(rounds) * 1e3:.0f} ms)")
    names = list(medians)
    pairs = [("HF", names[0], names[1])] + ([("official", names[2], names[3])] if args.official else [])
    for label, ours, ref in pairs:
        per_round = sorted(r / o for o, r in zip(medians[ours], medians[ref]))
        print(f"ratio vitlab / {label} (img/s): {min(medians[ref]) / min(medians[ours]):.2f} fastest rounds, "
              f"{statistics.median(per_round):.2f} median of per-round ratios")

if __name__ == "__main__":
    main()
