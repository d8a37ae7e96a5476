"""Speed of models across batch sizes and threads, in one process run (ratios measured together are comparable).

    python benchmarks/bench_measure.py checkpoints/fashion-mnist-reference deit_tiny_patch16_224 \
        --batch 1 32 256 --threads 1 2 --out benchmarks/results/measure.jsonl

Prints one table; appends JSON rows (vitlab.measure's MeasureRow) to --out.
"""
import argparse
import json
from pathlib import Path

import vitlab
from vitlab.bench.measure import print_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--data", default=None, help="also measure accuracy on this data's test split")
    parser.add_argument("--apply", action="append", default=[])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for model in args.models:
        for threads in args.threads:
            rows += vitlab.measure(model, apply=args.apply, data=args.data, batch=args.batch, threads=threads)
    print_rows(rows)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as f:
            f.writelines(json.dumps(r.to_dict()) + "\n" for r in rows)


if __name__ == "__main__":
    main()
