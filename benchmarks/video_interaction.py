"""Pass-through vs bounce (`moving-fashion-mnist-cls:interaction=1`): a clip model against a single-frame baseline.

Every single frame has the same law in both classes by construction (vitlab/data/video.py: a bouncing frame is the
passing frame with the two images exchanged), so the single-frame model (the same architecture fed frame 0 only)
must stay at chance (50 %); the clip model has to follow which item comes out of the meeting on which side. Both
train for the same number of optimizer steps (seeded), at 1 thread.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/video_interaction.py --steps 400
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/video_interaction.py --steps 400 --save-results   # + BENCHMARKS.md

`--save-results` stores the two rows (keyed by model and frames) in BENCHMARKS.md's section
(benchmarks/results/*-pass-through-vs-bounce-*.json) and renders it.
"""
import argparse
import platform
import time

import torch
import torch.nn.functional as F

import vitlab
from vitlab.data.video import MovingFashionMNIST

from _results import machine_line, markdown_table, save_rows

SECTION = "pass-through-vs-bounce-moving-fashion-mnist-cls"


def _stack(ds) -> tuple[torch.Tensor, torch.Tensor]:
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def _train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, batch: int, lr: float) -> dict:
    """AdamW, constant learning rate, `steps` steps on seeded random batches."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(0)
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(len(x), (batch,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {"train_s": time.perf_counter() - start, "last_loss": float(loss.detach())}


@torch.no_grad()
def _top1(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float(torch.cat([model(x[i:i + 256]).argmax(1) for i in range(0, len(x), 256)]).eq(y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps per model")
    parser.add_argument("--clips", type=int, default=2000, help="train clips (test: clips // 5)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--model", default="vl_vivit_mfmnist", help="a video model for (1, 10, 32, 32) clips")
    parser.add_argument("--save-results", action="store_true", help="store the rows in BENCHMARKS.md's section")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    t0 = time.perf_counter()
    x_train, y_train = _stack(MovingFashionMNIST("classify", "train", img_size=32, clips=args.clips,
                                                 interaction=True))
    x_test, y_test = _stack(MovingFashionMNIST("classify", "test", img_size=32, clips=args.clips, interaction=True))
    data_s = time.perf_counter() - t0

    rows = []
    for name, frames, kwargs in (("10 frames", 10, {"num_classes": 2}),
                                 ("frame 0 only", 1,
                                  {"num_classes": 2, "num_frames": 1, "tubelet_size": (1, 8, 8)})):
        torch.manual_seed(0)
        model = vitlab.create_model(args.model, **kwargs)
        stats = _train(model, x_train[:, :, :frames], y_train, args.steps, args.batch, args.lr)
        rows.append((name, stats, _top1(model, x_train[:, :, :frames], y_train),
                     _top1(model, x_test[:, :, :frames], y_test)))

    print(f"moving-fashion-mnist-cls:interaction=1 (pass-through / bounce, chance 50 %), {len(x_train)} train / "
          f"{len(x_test)} test clips (1x10x32x32), {args.model}, AdamW lr {args.lr}, batch {args.batch}, "
          f"{args.steps} steps per model; {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread; data generation {data_s:.0f} s\n")
    columns = ["model", "steps", "train s", "train top-1", "test top-1"]
    table = [[f"{args.model}, {name}", args.steps, f"{stats['train_s']:.0f}", f"{100 * train_top1:.1f} %",
              f"{100 * top1:.1f} %"] for name, stats, train_top1, top1 in rows]
    print(markdown_table(columns, table))
    if args.save_results:
        print("saved to", save_rows(SECTION, columns, table, machine=machine_line(torch.get_num_threads())))


if __name__ == "__main__":
    main()
