"""TurboViT proxy search on Fashion-MNIST (vitlab.search, `--space hiera`): a Hiera-style space of timm Hiera blocks
with mask-unit attention searched with ViT-ResNAS's machinery. TurboViT's generated architecture and its generative
architecture search are unpublished, so this is not a reproduction of TurboViT: it is a proxy search.

Supernet training (step-budgeted), then evolution vs random search vs Optuna NSGA-II at an equal number of
evaluations under a MAC budget (accuracy with inherited supernet weights on val images), then evolution's best
retrained from scratch against a hand-designed Hiera-style net (Hiera's rules: widths b-2b-4b, heads 1-2-4, MLP
ratio 4, mask units in the first two stages) of <= its MACs, same recipe and step budget.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/search_turbovit.py [--seed 0] [--out /tmp/search_turbovit]
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

import vitlab
from vitlab.profiling import count_flops, cpu_name
from vitlab.search import HieraSpace, HieraSupernet, train_supernet
from vitlab.search.supernet import fmnist_tensors

from _search_common import compare_methods, retrain

HAND_DEPTHS = ((1, 1, 1), (1, 2, 1), (1, 2, 2), (1, 3, 1), (2, 2, 1), (2, 2, 2), (1, 3, 2), (2, 3, 2))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-macs", type=float, default=3.5e6)
    parser.add_argument("--evaluations", type=int, default=24)
    parser.add_argument("--supernet-steps", type=int, default=300)
    parser.add_argument("--retrain-steps", type=int, default=300)
    parser.add_argument("--out", default="/tmp/search_turbovit")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    space = HieraSpace.fmnist()
    start = time.perf_counter()

    supernet = HieraSupernet(space)
    images, labels = fmnist_tensors("train", img_size=space.img_size)
    log = train_supernet(supernet, images, labels, steps=args.supernet_steps, batch_size=64, nets_per_batch=4,
                         seed=args.seed)
    supernet_s = time.perf_counter() - start
    results = compare_methods(space, supernet, args.budget_macs, args.evaluations, args.seed, space.img_size)
    search_s = time.perf_counter() - start - supernet_s

    best = results["evolution"][0]
    geometry = space.model_kwargs()
    searched_acc, searched_macs = retrain(out / "searched", "vl_turbovit_proxy", {**best["network_def"], **geometry},
                                          args.retrain_steps, 64, args.seed, space.img_size)
    hand, hand_macs = None, 0  # the hand-designed net with most MACs that fit under the searched net's
    for base in (16, 24, 32):
        for depths in HAND_DEPTHS:
            d = {"embed_dims": [base, 2 * base, 4 * base], "depths": list(depths), "num_heads": [1, 2, 4],
                 "mlp_ratio": 4, "mask_unit_attn": [True, True, False]}
            macs = count_flops(vitlab.create_model("vl_turbovit_proxy", **d, **geometry).eval(),
                               torch.randn(1, 1, space.img_size, space.img_size)).macs
            if hand_macs < macs <= searched_macs:
                hand, hand_macs = d, macs
    hand_acc, hand_macs = retrain(out / "hand", "vl_turbovit_proxy", {**hand, **geometry}, args.retrain_steps, 64,
                                  args.seed, space.img_size)
    total_s = time.perf_counter() - start

    record = {"seed": args.seed, "budget_macs": args.budget_macs, "evaluations": args.evaluations,
              "supernet_steps": args.supernet_steps, "supernet_s": supernet_s, "final_loss": log[-1]["loss"],
              "search_s": search_s, "total_s": total_s,
              "methods": {k: {"best": r, "nets": n, "seconds": s} for k, (r, n, s) in results.items()},
              "searched": {"def": best["network_def"], "macs": searched_macs, "test_acc": searched_acc},
              "hand": {"def": hand, "macs": hand_macs, "test_acc": hand_acc}}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"result_seed{args.seed}.json").write_text(json.dumps(record, indent=1))

    print(f"## TurboViT proxy search, Hiera-style space (seed {args.seed}; {cpu_name()}, 1 thread; "
          f"{total_s / 60:.1f} min in all)\n")
    print(f"Supernet: {args.supernet_steps} steps x 64 images at {space.img_size} px, 4 nets per batch (sandwich), "
          f"{supernet_s:.0f} s, final loss {log[-1]['loss']:.3f}. Budget {args.budget_macs / 1e6:.2f}M MACs "
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
    print(f"| hand-designed w{hand['embed_dims'][0]} d{'-'.join(map(str, hand['depths']))} | "
          f"{hand_macs / 1e6:.2f}M | {hand_acc:.2f} % |")
    print(f"\nsearched network_def: {json.dumps(best['network_def'])}")
    evo, rnd = results["evolution"][0]["accuracy"], results["random"][0]["accuracy"]
    print(f"\nclaim 'evolution >= random at equal evaluations': {'reproduced' if evo >= rnd else 'not reproduced'} "
          f"({evo:.2f} vs {rnd:.2f} %)")
    print(f"claim 'searched net, retrained >= hand-designed net of <= its MACs': "
          f"{'reproduced' if searched_acc >= hand_acc else 'not reproduced'} ({searched_acc:.2f} vs {hand_acc:.2f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
