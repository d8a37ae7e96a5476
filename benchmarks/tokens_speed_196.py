"""Token-reduction speed on the 196-token model (checkpoints/fashion-mnist-196), all variants timed in one run.

    python benchmarks/tokens_speed_196.py                       # batch 32, 2 threads, 4 rounds (~2 min quiet)
    python benchmarks/tokens_speed_196.py --rounds 6 --compile  # also each variant under torch.compile

One batch of --batch real test images (EViT/ATS choices depend on the content; token counts are printed). Every
variant is timed round-robin: --rounds rounds, each a time_callable median over --min-time / --rounds seconds; the
table shows the median of the rounds and the ratio to the untouched model of the same run (`none`). Weights do not
change the cost of a fixed schedule, so the fine-tuned runs time the same as their off-the-shelf rows.
MACs: executed MACs per image on this batch (count_flops; ATS includes the padding to the batch maximum).
"""
import argparse

import torch

import vitlab
from vitlab.bench.measure import dataset_for
from vitlab.profiling import count_flops, time_callable, tune_allocator

DEFAULT = ["none", "tome:r=31", "tome:r=39", "tome:r=80/50/25/20", "tome:r=98/40/20/19", "evit:keep_rate=0.5",
           "evit:keep_rate=0.4", "evit:keep_rate=0.3", "ats:keep_rate=0.5", "mctf:r=39"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="checkpoints/fashion-mnist-196")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--min-time", type=float, default=4.0, help="seconds of timing per variant, over all rounds")
    parser.add_argument("--only", nargs="*", default=None, help="--apply specs to time (default: %s)" % DEFAULT)
    parser.add_argument("--compile", action="store_true", help="also time each variant under torch.compile")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"allocator: {tune_allocator()}")   # vitlab.profiling.allocator; VITLAB_ALLOCATOR=default to compare

    specs = args.only or DEFAULT
    if specs[0] != "none":
        specs = ["none", *specs]
    base = vitlab.create_model(args.checkpoint).eval()
    test = dataset_for(base, "fashion-mnist", "test")
    x = torch.stack([test[i][0] for i in range(args.batch)])
    rows = []
    with torch.inference_mode():
        for spec in specs:
            model = vitlab.create_model(args.checkpoint).eval()
            if spec != "none":
                vitlab.apply_(model, vitlab.parse_apply([spec]))
            macs = count_flops(model, x).macs / len(x)
            counts = list(getattr(getattr(model, "token_state", None), "counts", []))
            rows.append((spec, model, macs, counts))
            if args.compile:
                compiled = torch.compile(model)
                torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
                rows.append((spec + " (compiled)", compiled, macs, counts))
        times = {name: [] for name, *_ in rows}
        for _ in range(args.rounds):
            for name, model, *_ in rows:
                times[name].append(time_callable(lambda: model(x), min_time_s=args.min_time / args.rounds,
                                                  warmup=1 if times[name] else 2, min_runs=2).median_s)
    base_ips, base_macs = None, rows[0][2]
    print(f"\n{args.checkpoint}: batch {args.batch}, {args.threads} threads, {args.rounds} rounds, "
          f"torch {torch.__version__}")
    print("| variant | img/s | speed-up | MMACs/img | MACs ratio | tokens after each block (batch max) |")
    print("|---|---|---|---|---|---|")
    for name, _, macs, counts in rows:
        ips = args.batch / sorted(times[name])[len(times[name]) // 2]
        base_ips = base_ips or ips
        print(f"| {name} | {ips:.1f} | {ips / base_ips:.2f}x | {macs / 1e6:.1f} | {base_macs / macs:.2f}x | "
              f"{counts or ''} |")


if __name__ == "__main__":
    main()
