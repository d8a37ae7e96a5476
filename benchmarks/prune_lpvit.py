"""LPViT block-structured pruning on the Fashion-MNIST reference: one-shot accuracy vs magnitude pruning, and speed.

    python benchmarks/prune_lpvit.py --threads 2            # ~2-3 min on 2 quiet cores
    python benchmarks/prune_lpvit.py --recover-steps 100    # + a short mask-preserving recovery (several min)

1. Accuracy (always 1 thread, full 10,000-image test split, no recovery): the reference's qkv/proj/fc1/fc2 weights
   at ~50 % sparsity by unstructured magnitude (per layer), 16x16-block magnitude (per layer, uniform), and LPViT
   (vitlab.prune.LPViT: second-order distortion curves, power term, equal-slope allocation) with and without its
   power term, with 32x32 blocks, and with cross-entropy gradients. Calibration: 512 seeded train-split images.
2. Speed (--threads, batch 32, interleaved rounds; the table shows the median over rounds of the per-round ratio
   to the unpruned model): the LPViT model with its zero blocks in the dense kernel, and with every pruned Linear
   run by torch's BSR kernel (`to_sparse_bsr`, block 16x16).
3. With --recover-steps N: each pruned model trained N AdamW steps (lr 1e-4, batch 64, cross-entropy on seeded
   train-split batches) with its zero pattern re-applied after every step (LPViT's fine-tuning keeps the mask),
   then the test top-1 again.
"""
import argparse
import copy
import statistics
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import vitlab
from vitlab.data import build_dataset
from vitlab.prune import LPViT, labelled_calibration
from vitlab.prune.lpvit import prunable_linears
from vitlab.profiling import time_callable

REF = "checkpoints/fashion-mnist-reference"


def magnitude_(model: nn.Module, sparsity: float, block: tuple[int, int] | None) -> nn.Module:
    """Per-layer magnitude pruning of the same layers: single weights, or (bh x bw) blocks by their mean |w|."""
    with torch.no_grad():
        for _, lin in prunable_linears(model):
            w = lin.weight
            if block is None:
                k = int(sparsity * w.numel())
                w.view(-1)[w.abs().flatten().argsort()[:k]] = 0
            else:
                bh, bw = block
                score = w.abs().reshape(w.shape[0] // bh, bh, w.shape[1] // bw, bw).mean(dim=(1, 3))
                drop = torch.zeros(score.numel(), dtype=torch.bool)
                drop[score.flatten().argsort()[:int(sparsity * score.numel())]] = True
                keep = (~drop).view_as(score).repeat_interleave(bh, 0).repeat_interleave(bw, 1)
                w.mul_(keep)
    return model


class BsrLinear(nn.Module):
    """A Linear whose weight is a torch BSR sparse tensor (CPU sparse kernel); same outputs as the dense layer."""

    def __init__(self, lin: nn.Linear, block: tuple[int, int]):
        super().__init__()
        self.weight = lin.weight.detach().to_sparse_bsr(block)
        self.bias = None if lin.bias is None else lin.bias.detach()
        self.out_features = lin.out_features

    def forward(self, x):
        y = F.linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias)   # (B*N, in) -> (B*N, out)
        return y.reshape(*x.shape[:-1], self.out_features)


def to_bsr(model: nn.Module, block: tuple[int, int]) -> nn.Module:
    model = copy.deepcopy(model)
    for name, lin in prunable_linears(model):
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        setattr(parent, name.rsplit(".", 1)[1], BsrLinear(lin, block))
    return model


def recover_(model: nn.Module, train, steps: int, *, batch: int = 64, lr: float = 1e-4, seed: int = 0) -> nn.Module:
    """`steps` AdamW steps of cross-entropy on random train batches, the pruned weights held at zero."""
    keep = [(lin.weight, lin.weight.ne(0)) for _, lin in prunable_linears(model)]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(train), (batch,), generator=g).tolist()
        x = torch.stack([train[i][0] for i in idx])
        y = torch.tensor([int(train[i][1]) for i in idx])
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        with torch.no_grad():
            for w, m in keep:
                w.mul_(m)
    return model.eval()


def sparsity(model: nn.Module) -> float:
    ws = [lin.weight for _, lin in prunable_linears(model)]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


@torch.no_grad()
def top1(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    hits = sum(int((model(x).argmax(-1) == y).sum()) for x, y in zip(images.split(500), labels.split(500)))
    return hits / len(labels)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="threads for the speed table (accuracy uses 1)")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--recover-steps", type=int, default=0, help="mask-preserving recovery steps (0: one-shot only)")
    args = p.parse_args()
    warnings.filterwarnings("ignore", message="Sparse BSR tensor support is in beta")
    torch.manual_seed(0)
    torch.set_num_threads(1)

    ref = vitlab.create_model(REF)
    pre = ref.vitlab.checkpoint["config"]["preprocessing"]
    test = build_dataset("fashion-mnist", "test", img_size=tuple(pre["input_size"][1:]), in_chans=1,
                         mean=pre["mean"], std=pre["std"])
    images = torch.stack([test[i][0] for i in range(len(test))])
    labels = torch.tensor([int(test[i][1]) for i in range(len(test))])
    calib = labelled_calibration(ref, "fashion-mnist", "train", 512)
    s = args.sparsity
    variants = [
        ("unpruned", lambda m: m),
        ("magnitude, unstructured, per layer", lambda m: magnitude_(m, s, None)),
        ("magnitude, 16x16 blocks, uniform per layer", lambda m: magnitude_(m, s, (16, 16))),
        ("LPViT 16x16, distortion only (power=0)", lambda m: vitlab.apply_(m, LPViT(s, power=0.0), calib=calib)),
        ("LPViT 16x16 (defaults: power term on)", lambda m: vitlab.apply_(m, LPViT(s), calib=calib)),
        ("LPViT 16x16, loss=ce", lambda m: vitlab.apply_(m, LPViT(s, loss="ce"), calib=calib)),
        ("LPViT 32x32", lambda m: vitlab.apply_(m, LPViT(s, block=(32, 32)), calib=calib)),
    ]
    print(f"reference {REF}, target sparsity {s} of the blocks' qkv/proj/fc1/fc2 weights, test split "
          f"({len(labels)} images), 1 thread, torch {torch.__version__}\n")
    print("| method | weights zeroed | per-layer sparsity (min-max) | test top-1 | prune time s |")
    print("|---|---:|---|---:|---:|")
    models = {}
    for name, fn in variants:
        t0 = time.perf_counter()
        model = fn(vitlab.create_model(REF))
        dt = time.perf_counter() - t0
        per = [float((lin.weight == 0).float().mean()) for _, lin in prunable_linears(model)]
        print(f"| {name} | {100 * sparsity(model):.1f} % | {min(per):.2f}-{max(per):.2f} | "
              f"{100 * top1(model, images, labels):.2f} % | {dt:.1f} |", flush=True)
        models[name] = model
    lp = models["LPViT 16x16 (defaults: power term on)"]
    print("\nLPViT 16x16 per-layer pruned fraction (block: qkv / proj / fc1 / fc2):")
    for i in range(len(lp.blocks)):
        row = [lp.vitlab.lpvit["layers"][f"blocks.{i}.{n}"] for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
        print(f"- block {i}: " + " / ".join(f"{a:.2f}" for a in row))

    if args.recover_steps:
        train = build_dataset("fashion-mnist", "train", img_size=tuple(pre["input_size"][1:]), in_chans=1,
                              mean=pre["mean"], std=pre["std"])
        print(f"\nafter {args.recover_steps} mask-preserving recovery steps (AdamW lr 1e-4, batch 64, 1 thread):\n")
        print("| method | weights zeroed | test top-1 | recovery s |")
        print("|---|---:|---:|---:|")
        for name, model in models.items():
            if name == "unpruned":
                continue
            t0 = time.perf_counter()
            model = recover_(copy.deepcopy(model), train, args.recover_steps)
            print(f"| {name} | {100 * sparsity(model):.1f} % | {100 * top1(model, images, labels):.2f} % | "
                  f"{time.perf_counter() - t0:.0f} |", flush=True)

    torch.set_num_threads(args.threads)
    x = images[:args.batch]
    bsr = to_bsr(lp, (16, 16))
    with torch.no_grad():
        torch.testing.assert_close(bsr(x), lp(x), rtol=1e-4, atol=1e-4)
    speed = [("unpruned (dense)", models["unpruned"]), ("LPViT 16x16, zeros in the dense kernel", lp),
             ("LPViT 16x16, torch BSR kernel", bsr)]
    times = {n: [] for n, _ in speed}
    with torch.no_grad():
        for _ in range(args.rounds):
            for n, m in speed:
                times[n].append(time_callable(lambda: m(x), warmup=2, min_runs=3, min_time_s=0.3).median_s)
    base = times["unpruned (dense)"]
    print(f"\nspeed: batch {args.batch}, {args.threads} threads, {args.rounds} interleaved rounds "
          "(preliminary unless run on a quiet machine)\n")
    print("| model | ms / batch | img/s | speed-up vs unpruned |")
    print("|---|---:|---:|---:|")
    for n, _ in speed:
        med = statistics.median(times[n])
        ratio = statistics.median(b / t for b, t in zip(base, times[n]))
        print(f"| {n} | {1e3 * med:.1f} | {args.batch / med:.0f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
