"""What is cut decides the speed-up: structured-pruning speed on this CPU, all variants timed in one run.

    python benchmarks/prune_speed.py --threads 2 [--batch 32] [--results benchmarks/results/prune_recovery.jsonl]

Three tables, each timed round-robin (--rounds rounds over its variants, a time_callable median per round; the table
shows the median over rounds of the per-round ratio to the unpruned model, which cancels slow drifts of a shared CPU):

1. The "what is cut" table: a plain timm ViT (embed 128, 6 blocks, 4 heads, MLP ratio 4, 28x28 input in
   4x4 patches: 49 tokens + class token) cut to ~50 % of its MACs three ways: embedding width 128 -> 88, depth
   6 -> 3, heads 4 -> 2 with MLP ratio 4 -> 2. Built through `vl_pruned_vit` on the timm base (random weights).
2. The Fashion-MNIST reference vs the committed checkpoints/fashion-mnist-pruned50 and runs/pruned50-stem (stem
   channels pruned too; benchmarks/prune_recovery.py --plan stem), with the time of the conv stem + patch projection
   alone (`patch_embed`, timed in the same rounds) to show what share of each model's time the stem is.
3. With --results: every criterion x target of benchmarks/prune_recovery.py, rebuilt from its recorded widths.
"""
import argparse
import json
import statistics
from pathlib import Path

import torch

import vitlab
from vitlab.profiling import count_flops, time_callable, tune_allocator

PLAIN = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=128, depth=6, num_heads=4, mlp_ratio=4.0)


def plain_variants() -> list[tuple[str, torch.nn.Module]]:
    def build(depth=6, heads=4, head_dim=32, hidden=512, embed=128):
        kw = dict(PLAIN, embed_dim=embed, depth=depth, num_heads=4)
        return vitlab.create_model("vl_pruned_vit", base="vit_tiny_patch16_224", base_kwargs=kw,
                                   num_heads=[heads] * depth, head_dim=[head_dim] * depth, mlp_hidden=[hidden] * depth)

    return [("unpruned (128 wide, 6 blocks, 4 heads, MLP 512)", build()),
            ("embed width 128 -> 88", build(embed=88, head_dim=22, hidden=352)),
            ("depth 6 -> 3", build(depth=3)),
            ("heads 4 -> 2, MLP ratio 4 -> 2", build(heads=2, hidden=256))]


def time_table(variants, x, rounds: int, min_time: float, stem: bool = False) -> list[dict]:
    times = {name: [] for name, _ in variants}
    stem_times = {name: [] for name, _ in variants}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, model in variants:
                times[name].append(time_callable(lambda: model(x), warmup=2, min_runs=3,
                                                 min_time_s=min_time / rounds).median_s)
                if stem:
                    stem_times[name].append(time_callable(lambda: model.patch_embed(x), warmup=2, min_runs=3,
                                                          min_time_s=min_time / rounds / 3).median_s)
    base_name, base_model = variants[0]
    base_macs = count_flops(base_model, x[:1]).macs
    rows = []
    for name, model in variants:
        macs = count_flops(model, x[:1]).macs
        ratio = statistics.median(b / t for b, t in zip(times[base_name], times[name]))
        med = statistics.median(times[name])
        rows.append(dict(variant=name, macs=macs, macs_frac=macs / base_macs,
                         params=sum(p.numel() for p in model.parameters()), ms=1000 * med,
                         img_s=x.shape[0] / med, speedup=ratio,
                         stem_ms=1000 * statistics.median(stem_times[name]) if stem else None))
    return rows


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n### {title}\n")
    stem = rows[0].get("stem_ms") is not None
    print("| variant | MMACs/img | MACs vs unpruned | params | ms/batch | img/s | speed-up |"
          + (" stem + patch proj ms (share) |" if stem else ""))
    print("|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if stem else ""))
    for r in rows:
        print(f"| {r['variant']} | {r['macs'] / 1e6:.2f} | {100 * r['macs_frac']:.1f} % | {r['params']:,} | "
              f"{r['ms']:.1f} | {r['img_s']:.0f} | {r['speedup']:.2f}x |"
              + (f" {r['stem_ms']:.1f} ({100 * r['stem_ms'] / r['ms']:.0f} %) |" if stem else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=3.0, help="seconds of timing per variant, over all rounds")
    parser.add_argument("--reference", default="checkpoints/fashion-mnist-reference")
    parser.add_argument("--pruned", nargs="+", default=["checkpoints/fashion-mnist-pruned50", "runs/pruned50-stem"],
                        help="pruned checkpoint folders for table 2 (missing ones are skipped with a note)")
    parser.add_argument("--results", default=None, help="prune_recovery.py's JSON lines: time every criterion x target")
    parser.add_argument("--json", default=None, help="also write all rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"allocator: {tune_allocator()}")   # vitlab.profiling.allocator; VITLAB_ALLOCATOR=default to compare
    torch.manual_seed(0)
    print(f"threads {args.threads}, batch {args.batch}, {args.rounds} rounds, torch {torch.__version__}")
    out = {}
    x = torch.randn(args.batch, 1, 28, 28)
    out["what_is_cut"] = time_table([(n, m.eval()) for n, m in plain_variants()], x, args.rounds, args.min_time)
    print_table("What is cut decides the speed-up (plain ViT, 49 tokens, random weights)", out["what_is_cut"])

    ref = vitlab.create_model(args.reference).eval()
    variants = [(Path(args.reference).name, ref)]
    for folder in args.pruned:
        if not Path(folder, "config.json").exists():
            print(f"(skipped {folder}: no checkpoint there)")
            continue
        pruned = vitlab.create_model(folder).eval()
        arch = pruned.vitlab.arch
        variants.append((f"{Path(folder).name} (heads {arch['num_heads']}, MLP {arch['mlp_hidden']}, stem "
                         f"{arch['base_kwargs'].get('stem_widths')})", pruned))
    out["reference"] = time_table(variants, x, args.rounds, args.min_time, stem=True)
    print_table("Reference vs pruned checkpoints (trained weights)", out["reference"])

    if args.results:
        base_kwargs = ref.vitlab.arch
        variants = [(Path(args.reference).name, ref)]
        for line in Path(args.results).read_text().splitlines():
            r = json.loads(line)
            a = r["arch"]
            kw = dict(base_kwargs, depth=len(a["num_heads"]))
            model = vitlab.create_model("vl_pruned_vit", base="vl_vit_fmnist", base_kwargs=kw, num_heads=a["num_heads"],
                                        head_dim=[32] * len(a["num_heads"]), mlp_hidden=a["mlp_hidden"]).eval()
            variants.append((r["name"], model))
        out["criteria"] = time_table(variants, x, args.rounds, args.min_time / 2)
        print_table("Every criterion x target (widths from --results)", out["criteria"])
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
