"""Token reduction on a trained model: every method x strength -> test top-1, img/s, executed MACs, in one run.

    python benchmarks/tokens_accuracy.py                  # the 196-token model, first 2,000 test images, 2 threads
    python benchmarks/tokens_accuracy.py --limit 0        # all 10,000 test images (~4x longer)
    python benchmarks/tokens_accuracy.py --checkpoint checkpoints/fashion-mnist-reference --limit 0   # the 49-token curve
    python benchmarks/tokens_accuracy.py --finetuned tome:r=31=runs/ft-tome31 ...   # add fine-tuned runs' top-1

Strengths scale with the model's token count N (patches): ToMe and MCTF merge r = f x N tokens per block for
f in --merge-fractions; EViT keeps --keep-rates at its 3 locations; ATS samples --ats-rates x tokens per block
from block depth/4 on. img/s: one batch of --batch test images; --rounds round-robin rounds over all variants, each
a time_callable median; the table shows the median of the rounds (ratios are comparable within one run; absolute
numbers depend on the machine). MACs: the batch's executed MACs per image (count_flops on the same batch; for ATS
that includes the padding to the batch maximum). Accuracy: top-1 on the test split (first --limit images).
Fine-tuned models (`vitlab train --init ... --apply ...`) are evaluated the same way when given with
--finetuned SPEC=RUN_DIR.
"""
import argparse
import math

import torch

import vitlab
from vitlab.bench.measure import dataset_for
from vitlab.engine import evaluate
from vitlab.profiling import count_flops, time_callable, tune_allocator


def variants(num_patches: int, args) -> list[str]:
    rows = ["none"]
    rows += [f"tome:r={max(1, round(f * num_patches))}" for f in args.merge_fractions]
    rows += [f"evit:keep_rate={k}" for k in args.keep_rates]
    rows += [f"ats:keep_rate={k}" for k in args.ats_rates]
    rows += [f"mctf:r={max(1, round(f * num_patches))}" for f in args.merge_fractions]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="checkpoints/fashion-mnist-196")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--limit", type=int, default=2000,
                        help="evaluate the first N test images (0: all 10,000; the default keeps the run < 4 min)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64, help="batch for img/s and MACs")
    parser.add_argument("--min-time", type=float, default=1.5, help="seconds of timing per variant, over all rounds")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--merge-fractions", type=float, nargs="+", default=[0.06, 0.12, 0.16])
    parser.add_argument("--keep-rates", type=float, nargs="+", default=[0.9, 0.7, 0.5])
    parser.add_argument("--ats-rates", type=float, nargs="+", default=[1.0, 0.7, 0.5])
    parser.add_argument("--only", nargs="*", default=None, help="evaluate only these --apply specs")
    parser.add_argument("--finetuned", nargs="*", default=[], help="SPEC=RUN_DIR: a fine-tuned run of that variant")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"allocator: {tune_allocator()}")   # vitlab.profiling.allocator; VITLAB_ALLOCATOR=default to compare

    base = vitlab.create_model(args.checkpoint).eval()
    test = dataset_for(base, args.data, "test")
    n = len(test) if not args.limit else min(args.limit, len(test))
    images, labels = map(torch.stack, zip(*((test[i][0], torch.tensor(test[i][1])) for i in range(n))))
    data = torch.utils.data.TensorDataset(images, labels)
    x = images[:args.batch]
    finetuned = {}
    for item in args.finetuned:
        spec, _, run = item.rpartition("=")
        finetuned[spec] = run
    specs = args.only or variants(base.patch_embed.num_patches, args)
    rows, models = [], []
    with torch.inference_mode():
        for spec in specs:
            model = vitlab.create_model(args.checkpoint).eval()
            if spec != "none":
                vitlab.apply_(model, vitlab.parse_apply([spec]))
            top1 = evaluate(model, data, progress=False)["top1"]
            macs = count_flops(model, x).macs / len(x)
            counts = list(getattr(getattr(model, "token_state", None), "counts", []))
            ft = None
            if spec in finetuned:
                ft = evaluate(vitlab.create_model(finetuned[spec]).eval(), data, progress=False)["top1"]
            models.append(model)
            rows.append([spec, top1, ft, math.nan, macs, counts])
            print(f"{spec:<22} top-1 {100 * top1:6.2f} %  {macs / 1e6:7.1f} MMACs  tokens {counts}"
                  + (f"  fine-tuned {100 * ft:.2f} %" if ft is not None else ""), flush=True)
        # timing: round-robin over all variants, median of the rounds (a busy machine slows all of them alike)
        times = [[] for _ in models]
        for _ in range(args.rounds):
            for i, model in enumerate(models):
                times[i].append(time_callable(lambda: model(x), min_time_s=args.min_time / args.rounds,
                                                  warmup=1 if times[i] else 2, min_runs=2).median_s)
        for row, t in zip(rows, times):
            row[3] = len(x) / sorted(t)[len(t) // 2]
    base = rows[0] if rows[0][0] == "none" else None
    base_top1, base_ips, base_macs = (base[1], base[3], base[4]) if base else (None, math.nan, math.nan)
    print(f"\n{args.checkpoint}: {n} test images, batch {args.batch} for img/s and MACs, {args.threads} threads, "
          f"torch {torch.__version__}")
    print("| variant | top-1 % | Δ top-1 | fine-tuned top-1 % | img/s | speed-up | MMACs/img | MACs ratio | "
          "tokens after each block (batch max) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for spec, top1, ft, ips, macs, counts in rows:
        delta = "" if base_top1 is None else f"{100 * (top1 - base_top1):+.2f}"
        print(f"| {spec} | {100 * top1:.2f} | {delta} | {'' if ft is None else f'{100 * ft:.2f}'} | {ips:.1f} | "
              f"{ips / base_ips:.2f}x | {macs / 1e6:.1f} | {base_macs / macs:.2f}x | {counts or ''} |")


if __name__ == "__main__":
    main()
