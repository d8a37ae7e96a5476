"""ECO-M2F's three steps on fmnist-scenes panoptic, and its claim: a per-image gate over the encoder depth keeps PQ
at a lower expected encoder depth, its PQ-vs-encoder-MACs curve on or above that of fixed depths.

The claim (ECO-M2F, Yao et al., 2024, abstract and Tables 1-2: reduced expected encoder cost at maintained PQ on
COCO / Cityscapes; our small-scale targets: expected depth <= 4.5 of 6 with PQ within 1 pt of full depth, the
gate's curve on or above the fixed-depth curve), checked at small scale on vitlab/dense/eco_m2f.py (HF
`Mask2FormerForUniversalSegmentation`, tiny config, six masked-attention decoder layers, 6 encoder layers, over the
reference-v2 ViT through the simple pyramid by default), with the official code's semantics (GYeow/ECO-M2F@291f1e1):

1. early-exit training: `--steps` Muon (or `--opt adamw`) steps on the 6 exits' `MaskCriterion` losses, exit k's
   weighted by k (`--exit-weights depth`, official) or evenly (`uniform`);
2. the derived dataset: per-image PQ q_k of each exit k on `--derive` training scenes (torchmetrics
   `PanopticQuality` per image), utility u_k = q_k - beta k;
3. per beta a gate fitted on it with the official soft targets (MSE to softmax over exits of u, "soft") and with
   cross-entropy on argmax u ("hard"); on `--val` val scenes the dataset-level PQ with the gate's depths and the
   exits it chose, beside the PQ of every fixed depth; encoder MACs by vitlab's profiler (deformable sampling
   included), saved MACs against the full 6-layer encoder and against the whole model.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/dense_eco_m2f.py --seed 0       # about 950 s of CPU
    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/dense_eco_m2f.py --exit-weights uniform
    python benchmarks/dense_eco_m2f.py --steps 5 --derive 32 --val 32               # smoke run

Measured (BENCHMARKS.md, 1 thread, 2026-12-08): with these defaults (Muon lr 5e-3, 1200 steps x 8, six decoder
layers, reference-v2 ViT) all three seeds segment things (val PQ 12.5-14.6 at depth 6) and the soft gate keeps PQ
within 1 pt at <= 4.5 layers in 2 of 3 seeds. What stays background-only (val PQ 6.55 at every depth, so every
gate picks depth 1): HF's Swin from scratch with AdamW or Muon, two decoder layers (`--decoder-layers 3`), or
Muon lr 1e-2 in seeds 1 and 2.
"""
from __future__ import annotations

import argparse
import platform
import time

import timm.optim
import timm.scheduler
import torch

from vitlab.data.scenes import FmnistScenes, collate_scenes
from vitlab.dense.eco_m2f import (EXIT_WEIGHTS, GATE_TARGETS, EcoMask2Former, ExitGate, ExitWeightedCriterion,
                                  build_eco_m2f, dataset_pq, exit_predictions, fit_gate, ideal_depths, per_image_pq)
from vitlab.dense.engine import dense_loss
from vitlab.engine.train import muon_fallback_by_role
from vitlab.profiling.flops import per_module_macs

BETAS = (0.0, 0.01, 0.02, 0.05, 0.1)


def train(model: EcoMask2Former, train_set, args: argparse.Namespace) -> float:
    """Step 1: early-exit training (the exits' losses weighted by `model.exit_weights`); returns the wall time."""
    if args.opt == "muon":   # hidden matrices on Muon; tables, class predictor and last mask-embedder layer on AdamW
        outputs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                   and (n.endswith("class_predictor") or "mask_embedder" in n)]
        outputs = [n for n in outputs if "mask_embedder" not in n] + [n for n in outputs if "mask_embedder" in n][-1:]
        optimizer = timm.optim.create_optimizer_v2(model, opt="muon", lr=args.lr, weight_decay=0.05,
                                                   fallback_list=muon_fallback_by_role(model, tuple(outputs)))
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    warmup = max(1, args.steps // 20)
    scheduler = timm.scheduler.CosineLRScheduler(optimizer, t_initial=args.steps - warmup, lr_min=1e-5,
                                                 warmup_t=warmup, warmup_lr_init=1e-5, warmup_prefix=True,
                                                 t_in_epochs=False)
    criterion = ExitWeightedCriterion(11, task="panoptic")
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(args.seed))
    model.train()
    start = time.perf_counter()
    for step in range(args.steps):
        idx = order[(step * args.batch) % len(order):][:args.batch]
        images, targets = collate_scenes([train_set[int(i)] for i in idx])
        loss = dense_loss(model(images), targets, criterion)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step_update(step + 1)
        if (step + 1) % max(1, args.steps // 5) == 0:
            print(f"  step {step + 1}/{args.steps} loss {loss.item():.2f} ({time.perf_counter() - start:.0f} s)")
    return time.perf_counter() - start


def layer_and_model_macs(model: EcoMask2Former) -> tuple[int, int]:
    """(MACs of one encoder layer, of the whole model at full depth) on one 64 px scene, with vitlab's counter
    (all encoder layers are alike)."""
    model.eval()
    model.depth = model.num_exits
    total, per_module = per_module_macs(model, torch.zeros(1, 1, 64, 64))
    model.depth = None
    return per_module["m2f.model.pixel_level_module.decoder.encoder.layers.0"], total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--opt", choices=("adamw", "muon"), default="muon",
                        help="optimizer of the early-exit training (muon: timm's Muon on the hidden matrices)")
    parser.add_argument("--train", type=int, default=4000, help="training scenes (fmnist-scenes:n=N)")
    parser.add_argument("--derive", type=int, default=128, help="training scenes of the derived dataset")
    parser.add_argument("--val", type=int, default=192, help="val scenes the gate and the fixed depths are scored on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dim", type=int, default=32,
                        help="Mask2Former's width (pixel decoder, encoder, queries; a multiple of 32)")
    parser.add_argument("--decoder-layers", type=int, default=7,
                        help="HF's decoder_layers: the masked-attention decoder runs decoder_layers - 1 layers")
    parser.add_argument("--backbone", default="checkpoints/fashion-mnist-reference-v2",
                        help="hf-swin (HF's Swin from scratch) or a timm / vitlab model or checkpoint folder, e.g. "
                             "checkpoints/fashion-mnist-swin (its Fashion-MNIST classification weights)")
    parser.add_argument("--exit-weights", choices=EXIT_WEIGHTS, default="depth",
                        help="step 1's exit loss weights: depth (exit k x k, the official code's) or uniform")
    parser.add_argument("--score-on", choices=("val", "train"), default="val",
                        help="score on --val val scenes, or on the --val training scenes after the derived set's "
                             "(seen in step 1, unseen by the gate): a small --train set the model memorises makes "
                             "the exits differ where it does not yet generalise")
    parser.add_argument("--score-threshold", type=float, default=0.8,
                        help="panoptic inference's query score threshold (Mask2Former's 0.8)")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be >= 2 (a warm-up step, then the cosine schedule)")
    if args.score_on == "train" and args.derive + args.val > args.train:
        parser.error(f"--score-on train needs --train >= --derive + --val ({args.derive + args.val})")
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    begin = time.perf_counter()
    train_set, val_set = FmnistScenes("train", n=args.train), FmnistScenes("val", n=args.val)
    model = build_eco_m2f(args.backbone, 11, encoder_layers=6, dim=args.dim, decoder_layers=args.decoder_layers,
                          exit_weights=args.exit_weights)
    print(f"step 1: early-exit training, {args.steps} steps x batch {args.batch}, exit weights "
          f"{args.exit_weights} {model.exit_weights}")
    train_s = train(model, train_set, args)

    start = time.perf_counter()
    derive_maps, derive_pooled, derive_targets = exit_predictions(model, train_set, args.derive,
                                                                  args.score_threshold)
    quality = per_image_pq(derive_maps, derive_targets).T          # (n, K)
    scored, first = (val_set, 0) if args.score_on == "val" else (train_set, args.derive)
    val_maps, val_pooled, val_targets = exit_predictions(model, scored, args.val, args.score_threshold, first)
    derive_s = time.perf_counter() - start
    layer_macs, model_macs = layer_and_model_macs(model)
    K = model.num_exits

    def row(kind: str, setting: str, depths: torch.Tensor, pq: float) -> tuple:
        """A table row for per-image depths (n,) in 1..K."""
        share = torch.bincount(depths - 1, minlength=K).float() / len(depths)
        return kind, setting, depths.float().mean().item(), share, pq

    n = len(val_targets)
    fixed = [dataset_pq(val_maps[k], val_targets) for k in range(K)]
    rows = [row("fixed", f"k={k + 1}", torch.full((n,), k + 1), fixed[k]) for k in range(K)]
    for target in GATE_TARGETS:
        for beta in BETAS:
            gate = fit_gate(ExitGate(val_pooled.shape[1], K), derive_pooled, quality, beta, target=target)
            with torch.no_grad():
                depths = gate(val_pooled).argmax(1) + 1              # (n,) encoder layers run
            chosen = val_maps[depths - 1, torch.arange(n)]
            ideal = ideal_depths(quality, beta).float().mean()
            rows.append(row(f"gate ({target})", f"beta={beta:g} (ideal {ideal:.2f})", depths,
                            dataset_pq(chosen, val_targets)))
    oracle = ideal_depths(per_image_pq(val_maps, val_targets).T, 0.0)
    rows.append(row("oracle", "beta=0, val labels (upper bound)", oracle,
                    dataset_pq(val_maps[oracle - 1, torch.arange(n)], val_targets)))

    backbone = "HF Swin from scratch" if args.backbone == "hf-swin" else f"backbone {args.backbone}"
    print(f"\nECO-M2F on fmnist-scenes panoptic: HF Mask2Former ({backbone}, dim {args.dim}, 6 encoder layers, "
          f"decoder_layers {args.decoder_layers}, "
          f"{args.opt} lr {args.lr:g}), "
          f"{args.steps} steps x batch {args.batch} on {args.train} scenes, exit loss weights {args.exit_weights}; "
          f"derived set {args.derive} train scenes (mean per-image PQ by exit: "
          f"{' / '.join(f'{100 * q:.1f}' for q in quality.mean(0))}); scored on {n} {args.score_on} scenes "
          f"(score threshold {args.score_threshold}); seed {args.seed}; {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} thread(s); training {train_s:.0f} s, derived set + exits {derive_s:.0f} s, "
          f"total {time.perf_counter() - begin:.0f} s\n")
    print("| depth | setting | expected depth | images at depth 1 / 2 / 3 / 4 / 5 / 6 (%) | encoder MMACs | "
          "encoder MACs saved | model MACs saved | PQ | PQ - PQ(k=6) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, setting, depth, share, pq in rows:
        saved = (K - depth) * layer_macs
        print(f"| {kind} | {setting} | {depth:.2f} | {' / '.join(f'{100 * s:.0f}' for s in share)} | "
              f"{depth * layer_macs / 1e6:.2f} | {100 * saved / (K * layer_macs):.0f} % | "
              f"{100 * saved / model_macs:.1f} % | {100 * pq:.2f} | {100 * (pq - fixed[-1]):+.2f} |")
    print(f"\none encoder layer: {layer_macs / 1e6:.3f} MMACs per scene, the whole model at depth 6 "
          f"{model_macs / 1e6:.1f} MMACs (vitlab.profiling per_module_macs); the gate adds "
          f"{val_pooled.shape[1] * K / 1e6:.4f} MMACs")


if __name__ == "__main__":
    main()
