"""Pose on moving-fashion-mnist-pose: a ViViT host with vs without PAAB / PAAT, and the 3-D deformable cross-modal
model RGB-only vs RGB + skeleton. Test top-1 after the same number of optimizer steps (same batches, same seed).

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/video_pose.py [--clips 2000] [--steps 300] [--seeds 0]

Prints a markdown table (mean over seeds, and each seed's value) with the CPU, thread count and wall time.
"""
import argparse
import math
import platform
import time

import torch
import torch.nn.functional as F

import vitlab  # noqa: F401  (registers the vl_ models)
from vitlab.data import build_dataset
from vitlab.models.deform3d import CrossModalDeformable3D
from vitlab.models.paab import PAATHead, PoseAwareViViT, paat_loss, paat_targets
from vitlab.models.vivit import ViViT

HOST = dict(img_size=32, num_frames=10, in_chans=1, tubelet_size=(2, 8, 8), embed_dim=64, depth=4, num_heads=2,
            num_classes=6)
DEFORM = dict(img_size=32, num_frames=10, in_chans=1, tubelet_size=(2, 8, 8), embed_dim=64, depth=4, num_heads=2,
              num_classes=6, downsample=(1, 2, 2))
# name -> (builder, uses keypoints in the forward, PAAT after block k or 0)
VARIANTS = {
    "ViViT host": (lambda: ViViT(**HOST, temporal_depth=0), False, 0),
    "host + PAAT (after block 1)": (lambda: ViViT(**HOST, temporal_depth=0), False, 1),
    "host + PAAB (after block 4)": (lambda: PoseAwareViViT(paab_after=4, **HOST), True, 0),
    "host + PAAB + PAAT": (lambda: PoseAwareViViT(paab_after=4, **HOST), True, 1),
    "3-D deformable, RGB only": (lambda: CrossModalDeformable3D(**DEFORM, skeleton=False), False, 0),
    "3-D deformable, RGB + skeleton": (lambda: CrossModalDeformable3D(**DEFORM, skeleton=True), True, 0),
}


def load(split: str, clips: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    data = build_dataset(f"moving-fashion-mnist-pose:clips={clips}", split, img_size=32)
    items = [data[i] for i in range(len(data))]
    return (torch.stack([c for c, _, _ in items]), torch.tensor([y for _, y, _ in items]),
            torch.stack([k for _, _, k in items]))


def run(name: str, train, test, steps: int, batch: int, seed: int) -> float:
    """Train one variant for `steps` AdamW steps (warm-up + cosine) and return its test top-1 (%)."""
    build, with_pose, paat_after = VARIANTS[name]
    torch.manual_seed(seed)
    model = build()
    params = list(model.parameters())
    head, tokens = None, []
    if paat_after:
        head = PAATHead(model.embed_dim, train[2].shape[2], hidden=64)
        params += list(head.parameters())
        model.blocks[paat_after - 1].register_forward_hook(lambda module, args, out: tokens.append(out))
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    order = torch.Generator().manual_seed(seed)  # the same batches for every variant
    clips, labels, keypoints = train
    perm = torch.randperm(len(labels), generator=order)
    model.train()
    for step in range(steps):
        start = (step * batch) % len(labels)
        if start + batch > len(labels):
            perm = torch.randperm(len(labels), generator=order)
            start = 0
        idx = perm[start:start + batch]
        tokens.clear()
        logits = model(clips[idx], keypoints[idx]) if with_pose else model(clips[idx])
        loss = F.cross_entropy(logits, labels[idx])
        if head is not None:
            targets = paat_targets(keypoints[idx], model.patch_embed.grid_size, model.patch_embed.tubelet_size[0])
            loss = loss + paat_loss(head(tokens[-1][:, model.num_prefix_tokens:]), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(test[1]), 100):
            x, y, k = (t[i:i + 100] for t in test)
            correct += int(((model(x, k) if with_pose else model(x)).argmax(-1) == y).sum())
    return 100.0 * correct / len(test[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--only", nargs="*", default=None, help="variant names to run (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    began = time.perf_counter()
    train, test = load("train", args.clips), load("test", args.clips)
    print(f"data: {len(train[1])} train / {len(test[1])} test clips, {time.perf_counter() - began:.0f} s")
    rows = []
    for name in args.only or VARIANTS:
        t0 = time.perf_counter()
        accs = [run(name, train, test, args.steps, args.batch, seed) for seed in args.seeds]
        rows.append((name, accs, time.perf_counter() - t0))
        print(f"{name}: {accs} ({rows[-1][2]:.0f} s)", flush=True)
    print(f"\nmoving-fashion-mnist-pose:clips={args.clips} (test {len(test[1])} clips, 6 motion classes, chance "
          f"16.7 %), {args.steps} AdamW steps of batch {args.batch}, seeds {args.seeds}; "
          f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"wall {time.perf_counter() - began:.0f} s\n")
    print("| model | test top-1 % (mean) | per seed | wall s |")
    print("|---|---|---|---|")
    for name, accs, wall in rows:
        print(f"| {name} | {sum(accs) / len(accs):.1f} | {' / '.join(f'{a:.1f}' for a in accs)} | {wall:.0f} |")


if __name__ == "__main__":
    main()
