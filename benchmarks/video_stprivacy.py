"""STPrivacy at toy scale: action accuracy vs identity leakage as sparsity and adversarial weight vary.

Data: moving-fashion-mnist-cls clips (1, 10, 32, 32); the action is the motion class (6 classes, chance 1/6), the
identity the Fashion-MNIST classes of the two items (`vitlab.engine.privacy.ClipIdentities`; a hit is a top-1 class
among them, chance ~0.19). For every (keep_ratio, adv_weight) a fresh `vl_stprivacy_mfmnist` is trained for the same
number of steps with its in-training adversary behind gradient reversal, then frozen; a fresh attacker (one
attention block + linear) is trained on its published tokens for the same number of steps in every cell, and both
are scored on the test split.

    OMP_NUM_THREADS=1 python benchmarks/video_stprivacy.py            # ~4 min of CPU at 1 thread
"""
import argparse
import platform
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

import vitlab
from vitlab.data.video import MovingFashionMNIST
from vitlab.engine.privacy import (ClipIdentities, PrivacyAdversary, evaluate_privacy, train_attacker,
                                   train_stprivacy)


def cached(split: str, n: int, clips: int) -> TensorDataset:
    """The first n (clip, action, identity) items of a split, rendered once."""
    data = ClipIdentities(MovingFashionMNIST("classify", split, img_size=32, clips=clips))
    items = [data[i] for i in range(n)]
    return TensorDataset(torch.stack([c for c, _, _ in items]), torch.tensor([a for _, a, _ in items]),
                         torch.stack([i for _, _, i in items]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=3000)
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--steps", type=int, default=500, help="STPrivacy training steps per cell")
    p.add_argument("--attack-steps", type=int, default=300, help="fresh attacker's training steps per cell")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--keeps", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    p.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.3, 1.0])
    p.add_argument("--tubelet", type=int, nargs=3, default=[5, 8, 8], help="tubelet (t, h, w) of the model")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    train = cached("train", args.train, max(args.train, 5 * args.test))
    test = cached("test", args.test, max(args.train, 5 * args.test))
    rows = []
    for keep in args.keeps:
        for weight in args.weights:
            t0, cpu0 = time.perf_counter(), time.process_time()
            torch.manual_seed(args.seed)
            model = vitlab.create_model("vl_stprivacy_mfmnist", keep_ratio=keep, tubelet_size=tuple(args.tubelet))
            adversary = PrivacyAdversary(model.embed_dim)
            loader = DataLoader(train, batch_size=args.batch, shuffle=True,
                                generator=torch.Generator().manual_seed(args.seed))
            train_stprivacy(model, adversary, loader, args.steps, weight, lr=args.lr)
            attacker = train_attacker(model, loader, args.attack_steps, lr=args.lr, seed=args.seed)
            scores = evaluate_privacy(model, attacker, DataLoader(test, batch_size=256))
            rows.append((keep, model.num_keep, weight, scores, time.process_time() - cpu0))
            print(f"keep={keep} weight={weight}: {scores} ({rows[-1][-1]:.0f} CPU s, "
                  f"{time.perf_counter() - t0:.0f} wall s)", flush=True)
    print(f"\n{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread, "
          f"torch {torch.__version__}, "
          f"seed {args.seed}, {args.train} train / {args.test} test clips, {args.steps} STPrivacy steps + "
          f"{args.attack_steps} attacker steps at batch {args.batch}, lr {args.lr} (50 warm-up steps), "
          f"total {time.perf_counter() - start:.0f} wall s, "
          f"{time.process_time():.0f} CPU s\n")
    print("| keep ratio | tubelets kept | adversarial weight | action top-1 (chance 0.167) | "
          "identity hit, fresh attacker (chance ~0.19) | cell CPU s |")
    print("|---|---|---|---|---|---|")
    total = round(rows[0][1] / rows[0][0]) if rows else 0
    for keep, kept, weight, s, sec in rows:
        print(f"| {keep:.2f} | {kept} / {total} | {weight:g} | {s['action_acc']:.3f} | {s['identity_acc']:.3f} "
              f"| {sec:.0f} |")


if __name__ == "__main__":
    main()
