"""VideoMAE pre-training then fine-tuning vs training from scratch on moving-fashion-mnist-cls, and what VideoMAE V2's
dual masking saves in pre-training (seed entries 35 and 51).

Three `vl_videomae_mfmnist` classifiers (width 96, 4 layers, clips (1, 10, 32, 32), tubelet 2x8x8: 80 tokens) are
fine-tuned for the same number of AdamW steps on the same batches of labelled train clips, and evaluated on held-out
test clips:

* `scratch`: random init;
* `videomae`: first pre-trained without labels on the same train clips with VideoMAE (tube masking 0.9, a 4-layer
  decoder of half the width, normalised-pixel MSE on the masked tubelets: the `vitlab pretrain --method videomae`
  settings);
* `videomae2`: the same pre-training steps with VideoMAE V2's dual masking (`--method videomae2`: the decoder
  reconstructs only the half of the tubelets a running-cell mask keeps, 10 + 40 decoder tokens instead of 80).

Both phases: AdamW (weight decay 0.05), 10 % linear warm-up then cosine decay, batch 32, one seed, one thread. Reports
test top-1 and process CPU seconds per step (`time.process_time`: wall time is noisy on a shared machine).

    OMP_NUM_THREADS=1 python benchmarks/video_videomae_gain.py      # ~3-4 min of CPU at 1 thread
"""
import argparse
import math
import platform
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import vitlab
from vitlab.data.video import MovingFashionMNIST
from vitlab.models.videomae import VideoMAEPretrainer


def video_clips(split: str, n: int, clips: int) -> TensorDataset:
    data = MovingFashionMNIST("classify", split, img_size=32, clips=clips)
    items = [data[i] for i in range(n)]
    return TensorDataset(torch.stack([c for c, _ in items]), torch.tensor([a for _, a in items]))


def batches(data: TensorDataset, batch: int, steps: int, seed: int):
    """`steps` shuffled batches, the same sequence for every run with the same seed."""
    g = torch.Generator().manual_seed(seed)
    done = 0
    while True:
        for index in torch.randperm(len(data), generator=g).split(batch):
            if len(index) < batch:
                continue
            yield data[index]
            done += 1
            if done == steps:
                return


def _optimizer(module: torch.nn.Module, lr: float, steps: int):
    """AdamW with a 10 % linear warm-up and cosine decay to 0 over `steps`."""
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.05)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (steps - warm))))
    return opt, sched


def pretrain(model: torch.nn.Module, data: TensorDataset, steps: int, batch: int, lr: float, seed: int,
             decoder_mask_ratio: float) -> tuple[float, float]:
    """VideoMAE (V2 with `decoder_mask_ratio` > 0) on the clips; returns (CPU s / step, final loss)."""
    torch.manual_seed(seed)
    trainer = VideoMAEPretrainer(model, decoder_dim=model.embed_dim // 2, decoder_depth=4,
                                 decoder_heads=max(1, model.blocks[0].attn.num_heads // 2), mask_ratio=0.9,
                                 decoder_mask_ratio=decoder_mask_ratio).train()
    opt, sched = _optimizer(trainer, lr, steps)
    cpu, losses = time.process_time(), []
    for step, (x, _) in enumerate(batches(data, batch, steps, seed)):
        loss = trainer.loss(x, generator=torch.Generator().manual_seed(seed * 100_003 + step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return (time.process_time() - cpu) / steps, sum(losses[-20:]) / len(losses[-20:])


def finetune(model: torch.nn.Module, data: TensorDataset, steps: int, batch: int, lr: float, seed: int) -> float:
    """Cross-entropy fine-tuning of every parameter; returns CPU s / step."""
    model.train()
    opt, sched = _optimizer(model, lr, steps)
    cpu = time.process_time()
    for x, y in batches(data, batch, steps, seed):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return (time.process_time() - cpu) / steps


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: TensorDataset) -> float:
    model.eval()
    return sum(int((model(x).argmax(1) == y).sum()) for x, y in DataLoader(data, batch_size=256)) / len(data)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pretrain-steps", type=int, default=500)
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps per run")
    p.add_argument("--train", type=int, default=3000)
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--pretrain-lr", type=float, default=1.5e-3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    clips = max(args.train, 5 * args.test)
    train_set, test_set = video_clips("train", args.train, clips), video_clips("test", args.test, clips)
    rows = []
    for name, ratio in (("scratch", None), ("videomae", 0.0), ("videomae2", 0.5)):
        torch.manual_seed(args.seed)
        model = vitlab.create_model("vl_videomae_mfmnist")
        pre_cpu, pre_loss = pretrain(model, train_set, args.pretrain_steps, args.batch, args.pretrain_lr,
                                     args.seed, ratio) if ratio is not None else (float("nan"), float("nan"))
        torch.manual_seed(args.seed + 1)
        model.reset_classifier(6)                    # every run's head starts from the same random init
        ft_cpu = finetune(model, train_set, args.steps, args.batch, args.lr, args.seed + 1)
        rows.append((name, pre_cpu, pre_loss, ft_cpu, accuracy(model, test_set)))
        print(rows[-1], flush=True)

    print(f"\n{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread, torch "
          f"{torch.__version__}, seed {args.seed}; {args.train} train / {args.test} test moving-fashion-mnist-cls "
          f"clips (1, 10, 32, 32); pre-training {args.pretrain_steps} steps (lr {args.pretrain_lr}), fine-tuning "
          f"{args.steps} steps (lr {args.lr}), batch {args.batch}; total wall {time.perf_counter() - start:.0f} s\n")
    print("| vl_videomae_mfmnist | pre-training | pre-train CPU s / step | final recon. loss | fine-tune CPU s / step "
          "| test top-1 (chance 0.167) |")
    print("|---|---|---|---|---|---|")
    for name, pre_cpu, pre_loss, ft_cpu, acc in rows:
        pre = {"scratch": "none", "videomae": f"VideoMAE, {args.pretrain_steps} steps",
               "videomae2": f"VideoMAE V2 dual masking, {args.pretrain_steps} steps"}[name]
        cpu = "-" if math.isnan(pre_cpu) else f"{pre_cpu:.3f}"
        loss = "-" if math.isnan(pre_loss) else f"{pre_loss:.3f}"
        print(f"| {name} | {pre} | {cpu} | {loss} | {ft_cpu:.3f} | {acc:.3f} |")


if __name__ == "__main__":
    main()
