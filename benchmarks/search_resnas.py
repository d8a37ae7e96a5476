"""ViT-ResNAS at small scale on Fashion-MNIST (vitlab.search): supernet training, then evolution vs random search vs
Optuna NSGA-II at an equal number of evaluations under a MAC budget, then the searched net retrained from scratch
against a hand-designed vl_vit_fmnist of <= its MACs with the same recipe and step budget.

Shrunk from the paper for a 2-core CPU: supernet 200 steps (paper: 300 epochs of ImageNet-100 subsets), 24
evaluations per method on 1000 val images (paper: 500 + 20 x 150), retraining 300 steps of batch 64 (~0.35 epoch).

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/search_resnas.py [--seed 0] [--out /tmp/search_resnas]
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

import vitlab
from vitlab.profiling import count_flops, cpu_name
from vitlab.search import SearchSpace, Supernet, train_supernet
from vitlab.search.supernet import fmnist_tensors

from _search_common import compare_methods, retrain


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-macs", type=float, default=5e6)
    parser.add_argument("--evaluations", type=int, default=24)
    parser.add_argument("--supernet-steps", type=int, default=200)
    parser.add_argument("--retrain-steps", type=int, default=300)
    parser.add_argument("--out", default="/tmp/search_resnas")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    space = SearchSpace.fmnist()
    start = time.perf_counter()

    supernet = Supernet(space)
    images, labels = fmnist_tensors("train")
    log = train_supernet(supernet, images, labels, steps=args.supernet_steps, batch_size=64, nets_per_batch=4,
                         seed=args.seed)
    supernet_s = time.perf_counter() - start
    results = compare_methods(space, supernet, args.budget_macs, args.evaluations, args.seed)
    search_s = time.perf_counter() - start - supernet_s

    best = results["evolution"][0]
    searched_acc, searched_macs = retrain(out / "searched", "vl_resnas",
                                          {"network_def": best["network_def"], **space.model_kwargs()},
                                          args.retrain_steps, 64, args.seed)
    hand, hand_macs = None, 0  # the hand-designed vl_vit_fmnist (head width 16, MLP ratio 2) with most MACs that fit
    for width in (32, 48, 64, 80):
        for depth in range(1, 9):
            kwargs = dict(embed_dim=width, depth=depth, num_heads=width // 16, mlp_ratio=2.0, stem_widths=(16, 32),
                          stem_strides=(2, 2))
            macs = count_flops(vitlab.create_model("vl_vit_fmnist", **kwargs).eval(), torch.randn(1, 1, 28, 28)).macs
            if hand_macs < macs <= searched_macs:
                hand, hand_macs = kwargs, macs
    hand_acc, hand_macs = retrain(out / "hand", "vl_vit_fmnist", hand, args.retrain_steps, 64, args.seed)
    total_s = time.perf_counter() - start

    print(f"## ViT-ResNAS search (seed {args.seed}; {cpu_name()}, 1 thread; {total_s / 60:.1f} min in all)\n")
    print(f"Supernet: {args.supernet_steps} steps x 64 images, 4 nets per batch (sandwich), {supernet_s:.0f} s, "
          f"final loss {log[-1]['loss']:.3f}. Budget {args.budget_macs / 1e6:.1f}M MACs "
          f"(space: {space.macs(space.smallest()) / 1e6:.2f}M to {space.macs(space.largest()) / 1e6:.2f}M); "
          f"accuracy with inherited weights on 1000 val images; search {search_s:.0f} s.\n")
    print("| method | nets scored | best val acc (inherited) | its MACs | search s |")
    print("|---|---|---|---|---|")
    for name, (row, n, seconds) in results.items():
        print(f"| {name} | {n} | {row['accuracy']:.2f} % | {row['cost'] / 1e6:.2f}M | {seconds:.0f} |")
    print(f"\nRetrained from scratch, {args.retrain_steps} steps x 64, same recipe, Fashion-MNIST test:\n")
    print("| net | MACs | test top-1 |")
    print("|---|---|---|")
    print(f"| searched (evolution's best) | {searched_macs / 1e6:.2f}M | {searched_acc:.2f} % |")
    name = f"vl_vit_fmnist w{hand['embed_dim']} d{hand['depth']}"
    print(f"| {name} (hand-designed) | {hand_macs / 1e6:.2f}M | {hand_acc:.2f} % |")
    print(f"\nsearched network_def: {json.dumps(best['network_def'])}")
    evo, rnd = results["evolution"][0]["accuracy"], results["random"][0]["accuracy"]
    print(f"\nclaim 'evolution >= random at equal evaluations': {'reproduced' if evo >= rnd else 'not reproduced'} "
          f"({evo:.2f} vs {rnd:.2f} %)")
    print(f"claim 'searched net, retrained >= hand-designed net of <= its MACs': "
          f"{'reproduced' if searched_acc >= hand_acc else 'not reproduced'} ({searched_acc:.2f} vs {hand_acc:.2f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
