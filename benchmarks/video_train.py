"""Train a small factorised ViViT on moving-fashion-mnist-cls and compare it with a single-frame baseline.

The classes (axis x speed of the motion) are invisible in any single frame by construction (vitlab/data/video.py),
so the single-frame model (the same architecture fed only frame 0, tubelet depth 1) should stay at chance (1/6)
while the clip model learns the motion. Each model trains for the same wall-clock budget at 1 thread.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/video_train.py --budget-s 150
"""
import argparse
import platform
import time

import torch
import torch.nn.functional as F

import vitlab
from vitlab.data import build_dataset


def _stack(ds) -> tuple[torch.Tensor, torch.Tensor]:
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def _train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, budget_s: float, batch: int, lr: float) -> dict:
    """AdamW with a constant learning rate until `budget_s` seconds have passed (whole steps)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(0)
    model.train()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < budget_s:
        idx = torch.randint(len(x), (batch,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
    return {"steps": steps, "train_s": time.perf_counter() - start, "last_loss": float(loss.detach())}


@torch.no_grad()
def _top1(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float(torch.cat([model(x[i:i + 256]).argmax(1) for i in range(0, len(x), 256)]).eq(y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=150.0, help="training seconds per model")
    parser.add_argument("--clips", type=int, default=2500, help="train clips (test: clips // 5)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    t0 = time.perf_counter()
    spec = f"moving-fashion-mnist-cls:clips={args.clips}"
    x_train, y_train = _stack(build_dataset(spec, "train", img_size=32))
    x_test, y_test = _stack(build_dataset(spec, "test", img_size=32))
    data_s = time.perf_counter() - t0

    rows = []
    for name, frames, kwargs in (("ViViT-FE, 10 frames", 10, {}),
                                 ("single frame (frame 0)", 1, {"num_frames": 1, "tubelet_size": (1, 8, 8)})):
        torch.manual_seed(0)
        model = vitlab.create_model("vl_vivit_mfmnist", **kwargs)
        stats = _train(model, x_train[:, :, :frames], y_train, args.budget_s, args.batch, args.lr)
        rows.append((name, stats, _top1(model, x_test[:, :, :frames], y_test)))

    print(f"moving-fashion-mnist-cls (6 classes, chance 16.7 %), {len(x_train)} train / {len(x_test)} test clips "
          f"(1x10x32x32), vl_vivit_mfmnist, AdamW lr {args.lr}, batch {args.batch}, {args.budget_s:.0f} s per model; "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread; data generation {data_s:.0f} s\n")
    print("| model | train steps | train s | test top-1 |")
    print("|---|---:|---:|---:|")
    for name, stats, top1 in rows:
        print(f"| {name} | {stats['steps']} | {stats['train_s']:.0f} | {100 * top1:.1f} % |")


if __name__ == "__main__":
    main()
