"""Self-supervised pretraining vs training from scratch with 10 % of the Fashion-MNIST labels.

    python benchmarks/ssl_fewlabel.py                       # ~10 min at 1 thread on a shared 2-core Xeon
    python benchmarks/ssl_fewlabel.py --quick               # a 1-minute smoke run (not the table)

A small vl_vit_fmnist (embed 64, depth 3, 2 heads, stem 16-32-64: 49 tokens + class token) is pretrained without
labels on the 55k train images with SiT and with TOV-VICReg (`vitlab.engine.ssl.pretrain`, batch 64, AdamW lr 1e-3,
cosine, warm-up 10 % of the steps), each for a fixed number of steps (about 2-3 minutes here). Each pretrained backbone, and a randomly
initialized one, is then fine-tuned (`vitlab.engine.train.fit`, the `vitlab train --init` path) on
`fashion-mnist:percent=10` (a seeded stratified 10 % of the train split: 5,499 images) for the same number of steps
(AdamW lr 1e-3, batch 64, label smoothing 0.1, flip + crop augmentation, warm-up 0.3 epoch, cosine), and the final
weights are evaluated once on the 10k test images. Seeded; one thread; prints a markdown table and writes
--out/results.json.
"""
import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

ARCH = dict(embed_dim=64, depth=3, num_heads=2, mlp_ratio=2.0, stem_widths=[16, 32, 64])


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/vitlab-ssl-fewlabel")
    p.add_argument("--sit-steps", type=int, default=160, help="SiT pretraining steps (batch 64, two views each)")
    p.add_argument("--tov-steps", type=int, default=100, help="TOV-VICReg pretraining steps (batch 64, four views)")
    p.add_argument("--finetune-epochs", type=float, default=3.0, help="epochs over the 10 %% subset")
    p.add_argument("--percent", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inits", default="scratch,sit,tov-vicreg", help="which rows to run (comma-separated)")
    p.add_argument("--quick", action="store_true", help="10 pretraining steps, 0.3 fine-tuning epochs, 1000 test images")
    args = p.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from vitlab import create_model
    from vitlab.bench.measure import dataset_for
    from vitlab.engine.evaluate import evaluate
    from vitlab.engine.ssl import PretrainConfig, pretrain
    from vitlab.engine.train import TrainConfig, fit

    if args.quick:
        args.sit_steps = args.tov_steps = 10
        args.finetune_epochs = 0.3
    out = Path(args.out)
    rows = []
    steps_of = {"scratch": 0, "sit": args.sit_steps, "tov-vicreg": args.tov_steps}
    for method in args.inits.split(","):
        steps = steps_of[method]
        init, pre_s = None, 0.0
        if method != "scratch":
            start = time.perf_counter()
            # epochs chosen so that the cosine schedule ends at `steps` (859 steps of 64 per epoch)
            init = pretrain(PretrainConfig(out=str(out / f"pre-{method}"), model="vl_vit_fmnist", method=method,
                                           model_kwargs=ARCH, epochs=steps / (55_000 // 64), batch_size=64, lr=1e-3,
                                           warmup_epochs=0.1 * steps / (55_000 // 64), seed=args.seed, threads=1,
                                           progress=False), overwrite=True)
            pre_s = time.perf_counter() - start
        start = time.perf_counter()
        cfg = TrainConfig(out=str(out / f"ft-{method}"), model=None if init else "vl_vit_fmnist",
                          init=str(init) if init else None, model_kwargs={} if init else dict(ARCH),
                          data=f"fashion-mnist:percent={args.percent}", epochs=args.finetune_epochs, batch_size=64,
                          lr=1e-3, warmup_epochs=0.3, seed=args.seed, threads=1, eval_val=False, progress=False)
        run = fit(cfg, overwrite=True)
        ft_s = time.perf_counter() - start
        model = create_model(str(run))
        test = evaluate(model, dataset_for(model, "fashion-mnist", "test"), progress=False,
                        limit=1000 if args.quick else None)
        rows.append({"init": method, "pretrain_steps": steps, "pretrain_s": round(pre_s, 1),
                     "finetune_steps": json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"],
                     "finetune_s": round(ft_s, 1), "test_top1": test["top1"], "test_n": test["n"]})
        print(json.dumps(rows[-1]), flush=True)

    (out / "results.json").write_text(json.dumps({"rows": rows, "arch": ARCH, "percent": args.percent,
                                                  "threads": 1, "cpu": _cpu(), "torch": torch.__version__}, indent=1))
    print(f"\n{_cpu()}, 1 thread, torch {torch.__version__}; fine-tuning on fashion-mnist:percent={args.percent}\n")
    print("| init | pretraining (steps, batch 64) | pretrain wall | fine-tune steps | fine-tune wall | test top-1 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['init']} | {r['pretrain_steps']} | {r['pretrain_s']:.0f} s | {r['finetune_steps']} | "
              f"{r['finetune_s']:.0f} s | {100 * r['test_top1']:.2f} % |")


if __name__ == "__main__":
    main()
