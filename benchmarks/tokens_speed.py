"""Token-reduction speed on one model, all variants timed in one run (ratios are comparable).

    python benchmarks/tokens_speed.py --model deit_small_patch16_224 --batch 32 --threads 2 \
        [--official-tome /tmp/official-tome]   # an exported facebookresearch/ToMe tree, timed beside vitlab's

Random weights (speed only). Prints img/s, the ratio to the unpatched model, and MACs (attention counted).
"""
import argparse
import sys

import timm
import torch

import vitlab
from vitlab.profiling import count_flops, time_callable
from vitlab.tokens import EViT, ToMe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-time", type=float, default=3.0)
    parser.add_argument("--official-tome", default=None, help="path of an exported facebookresearch/ToMe tree")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = timm.create_model(args.model).eval()
    state = base.state_dict()
    c, h, w = base.pretrained_cfg["input_size"]
    x = torch.randn(args.batch, c, h, w)

    variants = [("none", None), ("tome:r=0,trace_source=true (no-op overhead)", ToMe(r=0, trace_source=True))]
    variants += [(f"tome:r={r}", ToMe(r=r)) for r in (4, 8, 13, 15)]
    variants += [(f"evit:keep_rate={k}", EViT(keep_rate=k)) for k in (0.9, 0.7, 0.5)]
    variants += [("evit:keep_rate=0.7,fuse=false", EViT(keep_rate=0.7, fuse=False))]
    rows = []
    for name, cfg in variants:
        model = timm.create_model(args.model).eval()
        model.load_state_dict(state)
        if cfg is not None:
            vitlab.apply_(model, cfg)
        rows.append((name, model))
    if args.official_tome:
        sys.path.insert(0, args.official_tome)
        import tome

        for r in (0, 13):
            model = timm.create_model(args.model).eval()
            model.load_state_dict(state)
            tome.patch.timm(model)
            model.r = r
            rows.append((f"official ToMe patch r={r}", model))

    results = []
    with torch.inference_mode():
        for name, model in rows:
            timing = time_callable(lambda: model(x), min_time_s=args.min_time)
            macs = count_flops(model, x[:1]).macs
            results.append((name, args.batch / timing.median_s, macs))
            print(f"{name:<45} {args.batch / timing.median_s:8.1f} img/s  {macs / 1e9:6.3f} GMACs", flush=True)
    base_ips, base_macs = results[0][1], results[0][2]
    print(f"\n{args.model}, batch {args.batch}, {args.threads} threads, {torch.__version__}")
    print("| variant | img/s | speed-up | GMACs | MACs ratio |\n|---|---|---|---|---|")
    for name, ips, macs in results:
        print(f"| {name} | {ips:.1f} | {ips / base_ips:.2f}x | {macs / 1e9:.3f} | {base_macs / macs:.2f}x |")


if __name__ == "__main__":
    main()
