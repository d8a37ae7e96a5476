"""ViViT factorised encoder with a frozen spatial encoder vs trained end to end (the paper's claim; seed entry 11).

1. Image pre-training of the spatial encoder: `vl_vivit_mfmnist` built for one-tubelet-deep clips learns
   the 10 Fashion-MNIST classes from static clips of one item pasted at a random place on the 64x64 canvas and
   resized to 32x32, as in moving-fashion-mnist-cls (items from the train file's train split only).
2. Its spatial part (tubelet embedding, class token, position embedding, spatial blocks, spatial norm) initialises
   three 10-frame `vl_vivit_mfmnist` classifiers on moving-fashion-mnist-cls, each trained for the same number of
   AdamW steps on the same batches: `frozen` (`freeze_spatial=True`), `end-to-end` (all trained, same init) and
   `scratch` (all trained, random init).

Reports test top-1 and process CPU seconds per training step (`time.process_time`: wall time is noisy on a shared
machine), plus trainable parameters.

    OMP_NUM_THREADS=1 python benchmarks/video_vivit_frozen.py       # ~4 min of CPU at 1 thread
"""
import argparse
import platform
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import vitlab
from vitlab.data.fashion_mnist import FMNIST_MEAN, FMNIST_STD, VAL_SIZE, load_split
from vitlab.data.spec import holdout
from vitlab.data.video import CANVAS, FMNIST_DIR, ITEM, MovingFashionMNIST, render

SPATIAL = ("patch_embed.", "blocks.", "spatial_norm.", "cls_token", "pos_embed")


def static_clips(n: int, split: str, depth: int, seed: int) -> TensorDataset:
    """n (clip (1, depth, 32, 32), class) pairs: one item of the train file's `split` ("train" or "val", as
    fashion-mnist splits it) at a random corner of the canvas, every frame the same."""
    images, labels = load_split(FMNIST_DIR, "train")
    rows = holdout(len(images), VAL_SIZE, 0)[0 if split == "train" else 1]
    g = torch.Generator().manual_seed(seed)
    picks = rows[torch.randint(len(rows), (n,), generator=g)]
    corners = torch.randint(CANVAS - ITEM + 1, (n, 1, 1, 2), generator=g)  # (n, T=1, K=1, (x, y))
    frames = torch.stack([render(images[i], c) for i, c in zip(picks, corners)]).float()  # (n, 1, 64, 64)
    frames = F.interpolate(frames, size=(32, 32), mode="bilinear", antialias=True).clamp_(0, 255)
    x = (frames / 255.0 - FMNIST_MEAN[0]) / FMNIST_STD[0]  # (n, 1, 32, 32)
    clips = x[:, :, None].expand(-1, -1, depth, -1, -1).contiguous()  # (n, 1, depth, 32, 32)
    return TensorDataset(clips, labels[picks])


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


def train(model: torch.nn.Module, data: TensorDataset, steps: int, batch: int, lr: float, seed: int,
          warmup: int = 50) -> float:
    """AdamW with linear warm-up on the parameters that require grad; returns process CPU seconds per step. (Without
    warm-up, at lr 1e-3, the factorised model's class-token path stayed at chance loss on these sets.)"""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
    cpu = time.process_time()
    for x, y in batches(data, batch, steps, seed):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
    return (time.process_time() - cpu) / steps


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: TensorDataset) -> float:
    model.eval()
    return sum(int((model(x).argmax(1) == y).sum()) for x, y in DataLoader(data, batch_size=256)) / len(data)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-steps", type=int, default=800)
    p.add_argument("--steps", type=int, default=600, help="video training steps per run")
    p.add_argument("--train", type=int, default=3000)
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--tubelet", type=int, nargs=3, default=[5, 8, 8], help="tubelet (t, h, w) of every model")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()

    torch.manual_seed(args.seed)
    tubelet = tuple(args.tubelet)
    image_model = vitlab.create_model("vl_vivit_mfmnist", num_frames=tubelet[0], tubelet_size=tubelet,
                                      temporal_depth=1, num_classes=10)
    image_cpu = train(image_model, static_clips(args.image_steps * args.batch, "train", tubelet[0], args.seed),
                      args.image_steps, args.batch, args.lr, args.seed)
    image_acc = accuracy(image_model, static_clips(1000, "val", tubelet[0], args.seed + 1))
    spatial = {k: v for k, v in image_model.state_dict().items() if k.startswith(SPATIAL)}

    clips = max(args.train, 5 * args.test)
    train_set, test_set = video_clips("train", args.train, clips), video_clips("test", args.test, clips)
    rows = []
    for name in ("frozen", "end-to-end", "scratch"):
        torch.manual_seed(args.seed)
        model = vitlab.create_model("vl_vivit_mfmnist", tubelet_size=tubelet, freeze_spatial=name == "frozen")
        if name != "scratch":
            model.load_state_dict(spatial, strict=False)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        cpu = train(model, train_set, args.steps, args.batch, args.lr, args.seed + 1)
        rows.append((name, trainable, sum(p.numel() for p in model.parameters()), accuracy(model, test_set), cpu))
        print(rows[-1], flush=True)

    print(f"\n{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread, "
          f"torch {torch.__version__}, seed {args.seed}; spatial encoder pre-trained {args.image_steps} steps on "
          f"static Fashion-MNIST clips "
          f"(val-image top-1 {image_acc:.3f}, {image_cpu:.3f} CPU s/step); video: {args.train} train / {args.test} "
          f"test moving-fashion-mnist-cls clips (1, 10, 32, 32), {args.steps} steps at batch {args.batch}, "
          f"tubelet {tubelet}, lr {args.lr}; total {time.perf_counter() - start:.0f} wall s, "
          f"{time.process_time():.0f} CPU s\n")
    print("| vl_vivit_mfmnist | spatial init | trainable / total params | test top-1 (chance 0.167) | CPU s / step |")
    print("|---|---|---|---|---|")
    for name, trainable, total, acc, cpu in rows:
        init = "random" if name == "scratch" else "image pre-trained"
        print(f"| {name} | {init} | {trainable:,} / {total:,} | {acc:.3f} | {cpu:.3f} |")


if __name__ == "__main__":
    main()
