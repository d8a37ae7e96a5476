"""Speed of vitlab's PVT-Tiny against the reference it was checked against, at 224 px, batch 8, 2 threads, one run.

    python benchmarks/zoo/pvt_vs_reference.py                          # vs HF transformers' PvtForImageClassification
    python benchmarks/zoo/pvt_vs_reference.py --official /tmp/official-pvt   # + the official classification/pvt.py

The reference is HF transformers (random init, default config = PVT-Tiny); vitlab's model gets its weights through the
HF converter, so both compute the same function (checked here before timing). `--official PATH` (an export of
github.com/whai362/PVT) also times the official `pvt_tiny`, its weights loaded into vitlab through
`checkpoint_filter_fn`.

Timing: `--rounds` rounds; each round times every implementation in turn (`vitlab.profiling.time_callable`: one
warm-up call, the median of three), so all see the same load on a shared CPU. Reported: img/s of each
implementation's fastest round, and the ratio two ways (fastest rounds; median of the per-round ratios).
"""
import argparse
import statistics
import sys
from functools import partial

import torch

import vitlab.models
from vitlab.models.pvt import checkpoint_filter_fn
from vitlab.profiling import num_threads, time_callable, tune_allocator


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", default=None, help="export of github.com/whai362/PVT to time as well")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"allocator: {tune_allocator()}")   # vitlab.profiling.allocator; VITLAB_ALLOCATOR=default to compare
    from transformers import PvtConfig, PvtForImageClassification

    torch.manual_seed(0)
    hf = PvtForImageClassification(PvtConfig(num_labels=1000)).eval()
    ours = vitlab.models.from_transformers(hf).eval()
    candidates = {"vitlab vl_pvt_tiny (HF eps)": ours, "HF PvtForImageClassification": hf}
    if args.official:
        sys.path.insert(0, f"{args.official}/classification")
        import pvt as official_pvt

        official = official_pvt.pvt_tiny(num_classes=1000).eval()
        official_vl = vitlab.create_model("vl_pvt_tiny").eval()
        official_vl.load_state_dict(checkpoint_filter_fn(official.state_dict(), official_vl))
        candidates["vitlab vl_pvt_tiny"] = official_vl
        candidates["official pvt_tiny"] = official
    x = torch.randn(args.batch, 3, 224, 224)
    with torch.inference_mode():
        print(f"max |logits diff| vitlab vs HF: {(ours(x[:2]) - hf(x[:2]).logits).abs().max().item():.2e}")
        if args.official:
            diff = (official_vl(x[:2]) - official(x[:2])).abs().max().item()
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
    print(f"batch {args.batch}, 224 px, {args.threads} threads, {args.rounds} rounds, torch {torch.__version__}")
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
