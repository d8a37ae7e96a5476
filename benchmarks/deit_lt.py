"""DeiT-LT at small scale: plain CE vs DeiT-LT on long-tailed Fashion-MNIST (imbalance 100), head / mid / tail.

    OMP_NUM_THREADS=1 python benchmarks/deit_lt.py                                     # 10-15 min at 1 thread
    OMP_NUM_THREADS=1 python benchmarks/deit_lt.py --epochs 0.05 --teacher-epochs 0.05   # a quick smoke run

Data: `fashion-mnist:imbalance=100`, 13,573 training images (5,471 T-shirts ... 54 ankle boots, class i keeps
n_max * 0.01^(i/9)); val and test stay balanced. Head = classes 0-2 (the 3 most frequent), mid = 3-6, tail = 7-9.
Teacher: a small timm ResNet-10t (widths 16-128, in_chans 1), trained on the same split with SAM around AdamW
(`--opt sam`) and DRW (`--recipe drw`: effective-number re-weighted CE for the last third), as the paper's teachers
(theirs: LDAM-DRW or PaCo, with SAM).
Students: the same small vl_vit_fmnist (width 64, depth 2, stem 16/32/64), same seed, steps and learning rate:
  CE       the engine's default loss (label-smoothed cross-entropy on weakly augmented images)
  CE+DRW   the same, then effective-number re-weighted CE from epoch E (`--recipe drw:drw=E`)
  DeiT-LT  `--teacher T --distill token --recipe deitlt:drw=E` (engine/deit_lt.py): strongly augmented + mixed
           images, CE on the class token, hard distillation from the teacher's prediction on the same image on the
           distillation token, DRW (effective-number weights on the distillation loss, no mixing) from epoch E
The DeiT-LT student is read three ways: the paper's inference (mean of the two heads' logits), each head alone.
Prints a markdown table of test top-1 (10,000 images, read once per model) and the training wall time.
"""
import argparse
import time
from pathlib import Path

import torch

import vitlab
from vitlab.bench.measure import dataset_for
from vitlab.engine import TrainConfig, fit
from vitlab.engine.deit_lt import two_head_model
from vitlab.profiling import cpu_flags_text, cpu_name

DATA = "fashion-mnist:imbalance=100"
GROUPS = {"head": range(0, 3), "mid": range(3, 7), "tail": range(7, 10)}
TEACHER = dict(model="resnet10t", opt="sam", model_kwargs=dict(
    channels=[16, 32, 64, 128], stem_width=16,
    pretrained_cfg_overlay=dict(input_size=[1, 28, 28], mean=[0.286], std=[0.353])))
STUDENT = dict(model="vl_vit_fmnist", model_kwargs=dict(embed_dim=64, depth=2, num_heads=2, stem_widths=[16, 32, 64]))
RUN = dict(data=DATA, batch_size=128, lr=2e-3, warmup_epochs=0.1, seed=0, threads=1, eval_val=False, progress=False)


@torch.no_grad()
def per_class_logits(model: torch.nn.Module, dataset, two_heads: bool = False) -> dict[str, torch.Tensor]:
    """Logits of every test image: {"": model output} or, for a DistillTokenViT, {"cls", "dist", "avg"}."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=256)
    out: dict[str, list[torch.Tensor]] = {}
    for images, _ in loader:
        if two_heads:
            model.train()       # a DistillTokenViT returns (class head, distillation head) in train mode; no dropout
            cls, dist = model(images)
            heads = {"avg": (cls + dist) / 2, "cls": cls, "dist": dist}
        else:
            model.eval()
            heads = {"": model(images)}
        for name, logits in heads.items():
            out.setdefault(name, []).append(logits)
    return {name: torch.cat(parts) for name, parts in out.items()}


def accuracies(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Overall top-1 and the mean per-class top-1 of each group (test is balanced: 1,000 images per class)."""
    correct = (logits.argmax(-1) == targets).double()
    per_class = torch.stack([correct[targets == c].mean() for c in range(10)])
    return {"all": correct.mean().item(), **{g: per_class[list(r)].mean().item() for g, r in GROUPS.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=float, default=2.0, help="student epochs (of the 13,573-image split)")
    p.add_argument("--teacher-epochs", type=float, default=2.0)
    p.add_argument("--drw", type=float, default=None, help="DRW start epoch (default: 2/3 of --epochs)")
    p.add_argument("--out", default="/tmp/vitlab-bench-deit-lt")
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    drw = args.epochs * 2 / 3 if args.drw is None else args.drw
    walls: dict[str, float] = {}

    def train(name: str, **kw) -> Path:
        start = time.perf_counter()
        run = fit(TrainConfig(out=str(out / name), **RUN, **kw), overwrite=True)
        walls[name] = time.perf_counter() - start
        return run

    teacher = train("teacher", epochs=args.teacher_epochs, recipe=f"drw:drw={args.teacher_epochs * 2 / 3:g}",
                    **TEACHER)
    ce = train("ce", epochs=args.epochs, **STUDENT)
    ce_drw = train("ce_drw", epochs=args.epochs, recipe=f"drw:drw={drw:g}", **STUDENT)
    dlt = train("deitlt", epochs=args.epochs, teacher=str(teacher), distill="token", recipe=f"deitlt:drw={drw:g}",
                **STUDENT)

    rows = []
    for label, run, two in (("teacher: ResNet-10t (16-128), SAM + DRW", teacher, False),
                            ("ViT, plain CE", ce, False), ("ViT, CE + DRW", ce_drw, False),
                            ("ViT, DeiT-LT", dlt, True)):
        model = two_head_model(run) if two else vitlab.create_model(run)
        test = dataset_for(model.vit if two else model, "fashion-mnist", "test")
        for head, logits in per_class_logits(model, test, two).items():
            name = {"avg": " (mean of both heads, the paper's)", "cls": " (class head)", "dist": " (dist head)"}
            rows.append((label + name.get(head, ""), accuracies(logits, test.targets), walls[run.name]))

    steps = int(args.epochs * (13573 // 128))
    print(f"\nDeiT-LT on {DATA} (test: balanced 10,000), students {args.epochs:g} epochs = {steps} steps of 128, "
          f"teacher {args.teacher_epochs:g} epochs, DRW from epoch {drw:g}; seed 0, 1 thread, "
          f"{cpu_name()} ({cpu_flags_text()})\n")
    print("| model | top-1 | head (0-2) | mid (3-6) | tail (7-9) | train wall |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, acc, wall in rows:
        print(f"| {label} | {100 * acc['all']:.2f} | {100 * acc['head']:.2f} | {100 * acc['mid']:.2f} | "
              f"{100 * acc['tail']:.2f} | {wall / 60:.1f} min |")


if __name__ == "__main__":
    main()
