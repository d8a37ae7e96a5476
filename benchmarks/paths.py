"""A ViT as an ensemble of paths (Chang et al., ICCV 2023) on the Fashion-MNIST reference: per-path analysis,
path pruning and EnsembleScale.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/paths.py [--train-images 10000]

Caches the pooled path features (embedding + each block's attention and MLP branch) of a seeded subset of the
training split (fits EnsembleScale), the val split (chooses the pruned paths) and the test split (read once for the
tables). Prints the per-path table on test and the effect of pruning / scaling on test top-1.
"""
import argparse
import platform
import time

import torch
import torch.nn.functional as F

import vitlab
from vitlab.data.transforms import dataset_for_model
from vitlab.explain.paths import ensemble_logits, ensemble_scale, path_features, path_names, path_report, prune_paths


def cache(model, dataset, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    feats, labels = [], []
    for start in range(0, len(indices), 256):
        items = [dataset[i] for i in indices[start:start + 256]]
        feats.append(path_features(model, torch.stack([x for x, _ in items])))
        labels += [int(y) for _, y in items]
    return torch.cat(feats), torch.tensor(labels)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", default="checkpoints/fashion-mnist-reference")
    parser.add_argument("--train-images", type=int, default=10000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    model = vitlab.create_model(args.checkpoint).eval()
    splits = {s: dataset_for_model(model, "fashion-mnist", s) for s in ("train", "val", "test")}
    train_idx = torch.randperm(len(splits["train"]), generator=torch.Generator().manual_seed(0))
    train = cache(model, splits["train"], train_idx[:args.train_images].tolist())
    val = cache(model, splits["val"], list(range(len(splits["val"]))))
    test = cache(model, splits["test"], list(range(len(splits["test"]))))

    print(f"CPU: {platform.processor() or platform.machine()}, torch threads: {torch.get_num_threads()}")
    print("\n| path | length | top-1 alone | top-1 without it | top-1 of paths up to it |\n|---|---|---|---|---|")
    for r in path_report(model, *test):
        print(f"| {r['path']} | {r['length']} | {100 * r['alone']:.2f} % | {100 * r['without']:.2f} % | "
              f"{100 * r['up_to']:.2f} % |")

    def row(name: str, weights: torch.Tensor | None) -> str:
        with torch.no_grad():
            logits = ensemble_logits(model, test[0], weights)
            top1 = (logits.argmax(-1) == test[1]).float().mean()
            loss = F.cross_entropy(logits, test[1])
        shown = "all 1" if weights is None else " ".join(f"{n}={float(w):.2f}" for n, w in
                                                         zip(path_names(model), weights) if float(w) != 1.0)
        return f"| {name} | {100 * top1:.2f} % | {float(loss):.4f} | {shown or 'all 1'} |"

    pruned = prune_paths(model, *val)
    scaled = ensemble_scale(model, *train, steps=300)
    print("\n| ensemble | test top-1 | test loss | weights (those not 1) |\n|---|---|---|---|")
    print(row("original (all paths)", None))
    print(row("path pruning (greedy on val)", pruned))
    print(row(f"EnsembleScale ({args.train_images} train images, 300 steps)", scaled))
    print(f"\n{time.perf_counter() - start:.0f} s wall")


if __name__ == "__main__":
    main()
