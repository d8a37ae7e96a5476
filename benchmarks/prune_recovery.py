"""Prune the Fashion-MNIST reference with each criterion x FLOPs target, recover with DeiT soft distillation, evaluate.

    python benchmarks/prune_recovery.py --plan table --epochs 0.5 --out runs/prune_recovery   # criterion x target table
    python benchmarks/prune_recovery.py --plan main --epochs 3 --out runs/prune_recovery      # 50 % candidates, 3 epochs
    python benchmarks/prune_recovery.py --plan table --quick --threads 2                      # <= 4 min smoke on 2 cores
    python benchmarks/prune_recovery.py --plan stem --epochs 2 --threads 1 --out runs           # -> runs/pruned50-stem

--plan stem: hessian + blocks + conv-stem groups (stem=true, stem ranking weights --stem-weight, default the ones
`vitlab.prune.stem_time_weights` measured on this CPU) to --target of the MACs (default 0.5), one recovery; the
recovered checkpoint is --out/pruned50-stem (target 0.5) or --out/pruned{100*target}-stem. `train_s` in the JSON
line is the recovery's wall time: the number to compare with the <= 10 min recovery budget.

Each run: `vitlab.prune_` on 512 seeded train images (labels; hessian / taylor / ablation use them), top-1 on val and
test before recovery, then `vitlab.engine.train.fit` with --init the pruned checkpoint and --teacher the reference
(soft distillation, alpha 0.8, tau 2, AdamW lr 1e-3, batch 64, warm-up 0.1 epoch, cosine), top-1 after.
Targets below ~0.4 of the MACs need block removal (every kept block keeps one head and one MLP group), so the 0.3
column prunes with blocks=true. Uses CUDA when present (the numbers in BENCHMARKS.md came from an H200: this
CPU was shared by five jobs); writes one JSON line per run to --out/results.jsonl (speed: benchmarks/prune_speed.py
--results). --quick: 40 recovery steps and 1000 evaluation images per split (a smoke run, not the table).
"""
import argparse
import json
import time
from pathlib import Path

import torch

import vitlab
from vitlab.data import build_dataset
from vitlab.engine.evaluate import evaluate
from vitlab.engine.train import TrainConfig, fit
from vitlab.profiling import tune_allocator
from vitlab.prune import Prune, labelled_calibration, model_macs, prune_

REF = "checkpoints/fashion-mnist-reference"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plan", choices=("table", "main", "stem"), default="table")
    p.add_argument("--target", type=float, default=0.5, help="--plan stem: fraction of the MACs to keep")
    p.add_argument("--stem-weight", default="14.85,0.95,0.82",
                   help="--plan stem: stem ranking weights, one per stem layer (vitlab.prune.stem_time_weights)")
    p.add_argument("--epochs", type=float, default=None, help="recovery epochs (default: table 0.5, main 3)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="runs/prune_recovery")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"allocator: {tune_allocator()}")   # vitlab.profiling.allocator; VITLAB_ALLOCATOR=default to compare
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ref = vitlab.create_model(REF)
    pre = ref.vitlab.checkpoint["config"]["preprocessing"]
    sets = {s: build_dataset("fashion-mnist", s, img_size=tuple(pre["input_size"][1:]), in_chans=1, mean=pre["mean"],
                             std=pre["std"], data_dir=args.data_dir) for s in ("val", "test")}
    limit = 1000 if args.quick else None
    calib = labelled_calibration(ref, "fashion-mnist", "train", 512, data_dir=args.data_dir)
    ref_macs = model_macs(ref)

    def acc(model):
        return {s: evaluate(model.cpu().eval(), d, batch_size=500, progress=False, limit=limit)["top1"]
                for s, d in sets.items()}

    def run(name, importance, target, epochs, blocks=False, **extra):
        model = vitlab.create_model(REF)
        t0 = time.time()
        prune_(model, Prune(target_flops=target, importance=importance, blocks=blocks, **extra), calib=calib)
        row = dict(name=name, importance=importance, target=target, blocks=blocks, macs=model_macs(model),
                   macs_frac=model_macs(model) / ref_macs, prune_s=time.time() - t0,
                   arch={k: model.vitlab.arch[k] for k in ("num_heads", "mlp_hidden")}, **extra)
        row["arch"]["stem_widths"] = model.vitlab.arch["base_kwargs"].get("stem_widths")
        row["arch"]["embed_dim"] = model.vitlab.arch["base_kwargs"].get("embed_dim")
        pruned_dir = out / f"{name}_pruned"
        vitlab.save_checkpoint(model, pruned_dir, preprocessing=pre)
        row["before"] = acc(vitlab.create_model(pruned_dir))
        t0 = time.time()
        cfg = TrainConfig(out=str(out / name), init=str(pruned_dir), data="fashion-mnist", data_dir=args.data_dir,
                          epochs=epochs, batch_size=64, lr=1e-3, warmup_epochs=0.1, teacher=REF, distill="soft",
                          distill_alpha=0.8, distill_tau=2.0, threads=args.threads, workers=args.workers,
                          eval_val=False, progress=False, max_steps=40 if args.quick else None)
        fit(cfg, overwrite=True)   # a rerun replaces the earlier run of this plan
        row.update(epochs=epochs, train_s=time.time() - t0, device="cuda" if torch.cuda.is_available() else "cpu",
                   steps=json.loads((out / name / "config.json").read_text())["training"]["global_step"],
                   after=acc(vitlab.create_model(out / name)))
        print(json.dumps(row), flush=True)
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        return row

    rows = []
    if args.plan == "stem":
        weights = tuple(float(v) for v in args.stem_weight.split(","))
        name = "pruned50-stem" if args.target == 0.5 else f"pruned{round(100 * args.target)}-stem"
        rows.append(run(name, "hessian", args.target, args.epochs or 2, blocks=True, stem=True, stem_weight=weights))
    elif args.plan == "main":
        for importance, blocks in (("hessian", False), ("taylor", False), ("l1", False), ("hessian", True)):
            name = f"p50_{importance}{'_blocks' if blocks else ''}_e{args.epochs or 3:g}"
            rows.append(run(name, importance, 0.5, args.epochs or 3, blocks))
    else:
        for importance in ("l1", "l2", "taylor", "hessian", "ablation"):
            for target in (0.75, 0.5, 0.3):
                rows.append(run(f"t_{importance}_{int(target * 100)}", importance, target, args.epochs or 0.5,
                                blocks=target < 0.4))
    print("\n| criterion | target | MACs kept | widths (heads / MLP / stem) | test top-1 before | after | recovery steps "
          "| recovery s |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['importance']}{' +blocks' if r['blocks'] else ''} | {r['target']:.2f} | {100 * r['macs_frac']:.1f} % "
              f"| {r['arch']['num_heads']} / {r['arch']['mlp_hidden']} / {r['arch']['stem_widths']} "
              f"| {100 * r['before']['test']:.2f} % | {100 * r['after']['test']:.2f} % | {r['steps']} "
              f"| {r['train_s']:.0f} |")


if __name__ == "__main__":
    main()
