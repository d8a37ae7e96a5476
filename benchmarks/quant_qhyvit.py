"""Q-HyViT against vitlab's plain PTQ on small hybrid ViTs trained on Fashion-MNIST.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quant_qhyvit.py                  # train (cached) + the table
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quant_qhyvit.py --models tinyvit --test-images 2000

Three timm hybrids rebuilt at Fashion-MNIST scale (one input channel, the data normalized with Fashion-MNIST's
mean / std and resized bilinearly, as the committed checkpoints are):

* `efficientformer`: efficientformer_l1 with widths (16, 48, 48, 48), depths (1, 1, 2, 2), one Meta3D block, on a
  56x56 input (timm fixes the attention-bias grid at 7x7, so one downsample is dropped: 14x14 -> 7x7 = 49 tokens);
* `tinyvit`: tiny_vit_5m_224 with widths (32, 64, 96), depths (1, 2, 2), 4x4 windows, on 32x32;
* `efficientvit`: efficientvit_m0 with widths (32, 64, 96), one block per stage, 4x4 windows, on 64x64.

Each is trained from scratch with AdamW (lr 2e-3, cosine, batch 64, seed 0) for `--epochs` epochs of the 55,000-image
train split at one thread (<= 5 min each; the weights are cached under `--cache`). Then, on the same float model:
`ptq:w=B,a=B` (vitlab's PTQ: uniform min-max, per-tensor activations, per-channel weights) and `qhyvit:bits=B`
(vitlab.quant.qhyvit), both calibrated on the same 256 seeded train images, for B = 8, 6, 4; top-1 on the 10,000-image
test split and `quant_mac_fraction`. Prints a markdown table with the CPU and the thread count.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import time

import torch
import torch.nn.functional as F

MEAN, STD = 0.2860, 0.3530
MODELS = {
    "efficientformer": ("efficientformer_l1", 56, 1.0, dict(
        img_size=56, depths=(1, 1, 2, 2), embed_dims=(16, 48, 48, 48), num_vit=1,
        downsamples=(False, True, False, False))),
    "tinyvit": ("tiny_vit_5m_224", 32, 2.0, dict(
        embed_dims=(32, 64, 96), depths=(1, 2, 2), num_heads=(1, 2, 3), window_sizes=(4, 4, 4), drop_path_rate=0.0)),
    "efficientvit": ("efficientvit_m0", 64, 2.0, dict(
        img_size=64, embed_dim=(32, 64, 96), depth=(1, 1, 1), num_heads=(2, 2, 2), window_size=(4, 4, 4),
        key_dim=(8, 8, 8))),
}


def build(key: str) -> torch.nn.Module:
    import vitlab

    name, size, _, kwargs = MODELS[key]
    overlay = dict(input_size=(1, size, size), mean=(MEAN,), std=(STD,), interpolation="bilinear")
    return vitlab.create_model(name, num_classes=10, in_chans=1, pretrained_cfg_overlay=overlay, **kwargs)


def load(split: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 1, size, size) normalized, labels (N,)) of a Fashion-MNIST split, as vitlab's dataset splits it."""
    from vitlab.data.fashion_mnist import FashionMNIST

    ds = FashionMNIST(split, img_size=size)
    raw = ds.images[ds.indices].float().div_(255.0).sub_(MEAN).div_(STD)        # (N, 1, 28, 28)
    labels = torch.tensor(ds._labels)
    if size != 28:
        raw = torch.cat([F.interpolate(c, size=(size, size), mode="bilinear", align_corners=False)
                         for c in raw.split(2048)])
    return raw, labels


def train(key: str, epochs: float, cache: str) -> tuple[torch.nn.Module, float]:
    """The trained float model (cached as CACHE/KEY.pt) and the training wall time (0 when cached)."""
    model = build(key)
    path = os.path.join(cache, f"{key}.pt")
    if os.path.exists(path):
        model.load_state_dict(torch.load(path))
        return model.eval(), 0.0
    size = MODELS[key][1]
    x, y = load("train", size)
    torch.manual_seed(0)
    steps = int(math.ceil(epochs * len(x) / 64))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    model.train()
    start = time.time()
    order = torch.cat([torch.randperm(len(x)) for _ in range(int(math.ceil(epochs)))])
    for step in range(steps):
        idx = order[step * 64:(step + 1) * 64]
        xb = x[idx]
        flip = torch.rand(len(idx)) < 0.5
        xb[flip] = xb[flip].flip(-1)                                              # horizontal flip
        loss = F.cross_entropy(model(xb), y[idx], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    wall = time.time() - start
    os.makedirs(cache, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval(), wall


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    hits = sum(int((model(xb).argmax(-1) == yb).sum()) for xb, yb in zip(x.split(250), y.split(250)))
    return 100.0 * hits / len(y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--bits", nargs="+", type=int, default=[8, 6, 4])
    parser.add_argument("--calib-images", type=int, default=256)
    parser.add_argument("--test-images", type=int, default=10000)
    parser.add_argument("--cache", default="/tmp/vitlab-qhyvit-bench")
    parser.add_argument("--epochs", type=float, default=None, help="training epochs (default: per model)")
    parser.add_argument("--train-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import vitlab
    from vitlab.quant import PTQ

    from vitlab.profiling.cpu import cpu_flags_text, cpu_name

    print(f"CPU: {cpu_name()} ({cpu_flags_text()}), torch threads: {torch.get_num_threads()}, "
          f"load average at start: {os.getloadavg()[0]:.1f}")
    rows = []
    for key in args.models:
        epochs = MODELS[key][2] if args.epochs is None else args.epochs
        model, wall = train(key, epochs, args.cache)
        print(f"{key}: trained {epochs} epochs in {wall:.0f} s" if wall else f"{key}: cached weights", flush=True)
        if args.train_only:
            continue
        from vitlab.quant.qhyvit import QHyViT

        size = MODELS[key][1]
        xt, yt = load("test", size)
        xt, yt = xt[:args.test_images], yt[:args.test_images]
        xc, _ = load("train", size)
        pick = torch.randperm(len(xc), generator=torch.Generator().manual_seed(0))[:args.calib_images]
        calib = list(xc[pick].split(32))
        fp = accuracy(model, xt, yt)
        rows.append((key, "float", "-", fp, 0.0, None, 0.0))
        for bits in args.bits:
            for label, cfg in (("ptq (min-max)", PTQ(w=bits, a=bits)), ("qhyvit", QHyViT(bits=bits))):
                start = time.time()
                q = vitlab.apply_(copy.deepcopy(model), cfg, calib=calib)
                cal = time.time() - start
                acc = accuracy(q, xt, yt)
                rows.append((key, label, f"W{bits}A{bits}", acc, acc - fp, q.quant_mac_fraction, cal))
                print(rows[-1], flush=True)
    print("\n| model | method | bits | top-1 (%) | vs float (pt) | quantized MACs | calibration (s) |")
    print("|---|---|---|---|---|---|---|")
    for key, label, bits, acc, d, frac, cal in rows:
        frac_text = "-" if frac is None else f"{100 * frac:.1f} %"
        print(f"| {key} | {label} | {bits} | {acc:.2f} | {d:+.2f} | {frac_text} | {cal:.1f} |")


if __name__ == "__main__":
    main()
