"""Token-reduction speed on one model, all variants timed in one run (ratios are comparable).

    python benchmarks/tokens_speed.py --model deit_small_patch16_224 --batch 32 --threads 2 --rounds 3 \
        [--official-tome /tmp/official-tome]   # an exported facebookresearch/ToMe tree, timed beside vitlab's
        [--compile]                            # also none / tome:r=13 / evit:keep_rate=0.7 under torch.compile

Random weights (speed only). Every method across its strength (ToMe, EViT, ATS, MCTF) and the official ToMe patch
(when its tree is given), timed round-robin in one run: --rounds rounds over all variants, each round a
time_callable median over min-time / rounds seconds (one warm-up call in the first round only; at ~3 s per batch
of 32 on 2 cores a round is usually one call per variant); the table shows the median of the rounds. Prints img/s,
the ratio to the unpatched model, and MACs (attention counted; for ATS the executed MACs of this batch, padding
included). Run time on 2 quiet cores, estimated from the quiet run's img/s: ~32 s per round (one call per variant),
one warm-up round, ~60 s of set-up and MAC counting: ~3 min at --rounds 3, ~3.5 min at --rounds 4 (--compile adds
the compilation, minutes).

    fetch github:facebookresearch/ToMe; git --git-dir=<path> archive HEAD | tar -x -C /tmp/official-tome
"""
import argparse
import sys

import timm
import torch

import vitlab
from vitlab.profiling import count_flops, time_callable, tune_allocator
from vitlab.tokens import ATS, EViT, MCTF, ToMe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-time", type=float, default=3.0, help="seconds of timing per variant, over all rounds")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--official-tome", default=None, help="path of an exported facebookresearch/ToMe tree")
    parser.add_argument("--compile", action="store_true", help="add compiled none, tome:r=13, evit:keep_rate=0.7")
    parser.add_argument("--only", nargs="*", default=None,
                        help="time only the rows whose name starts with one of these (none always runs), e.g. "
                             "--only tome:r=13 'official ToMe patch r=13' for a longer focused run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"allocator: {tune_allocator()}")   # vitlab.profiling.allocator; VITLAB_ALLOCATOR=default to compare
    torch.manual_seed(0)
    base = timm.create_model(args.model).eval()
    state = base.state_dict()
    c, h, w = base.pretrained_cfg["input_size"]
    x = torch.randn(args.batch, c, h, w)

    variants = [("none", None), ("tome:r=0,trace_source=true (no-op overhead)", ToMe(r=0, trace_source=True))]
    variants += [(f"tome:r={r}", ToMe(r=r)) for r in (8, 13, 15)]
    variants += [(f"evit:keep_rate={k}", EViT(keep_rate=k)) for k in (0.7, 0.5)]
    variants += [("evit:keep_rate=0.7,fuse=false", EViT(keep_rate=0.7, fuse=False))]
    variants += [(f"ats:keep_rate={k}", ATS(keep_rate=k)) for k in (0.7, 0.5)]
    variants += [(f"mctf:r={r}", MCTF(r=r)) for r in (13, 16)]
    rows = []
    for name, cfg in variants:
        model = timm.create_model(args.model).eval()
        model.load_state_dict(state)
        if cfg is not None:
            vitlab.apply_(model, cfg)
        rows.append((name, model))
    # experiment: the size-biased attention of short sequences on the plain matmul + softmax path (see patch.py)
    model = timm.create_model(args.model).eval()
    model.load_state_dict(state)
    vitlab.apply_(model, ToMe(r=13))
    for blk in model.blocks:
        blk.attn.math_max_tokens = 96
    rows.append(("tome:r=13, masked attention <= 96 tokens unfused", model))
    if args.official_tome:
        sys.path.insert(0, args.official_tome)
        import tome

        for r in (0, 13):
            model = timm.create_model(args.model).eval()
            model.load_state_dict(state)
            tome.patch.timm(model)
            model.r = r
            rows.append((f"official ToMe patch r={r}", model))
    if args.compile:
        for name, cfg in [("none", None), ("tome:r=13", ToMe(r=13)), ("evit:keep_rate=0.7", EViT(keep_rate=0.7))]:
            model = timm.create_model(args.model).eval()
            model.load_state_dict(state)
            if cfg is not None:
                vitlab.apply_(model, cfg)
            compiled = torch.compile(model)
            with torch.inference_mode():
                torch.testing.assert_close(compiled(x), model(x), rtol=1e-3, atol=1e-3)   # compiles; equals eager
            rows.append((f"{name} (torch.compile)", compiled))

    if args.only:
        rows = [(name, model) for name, model in rows
                if name == "none" or any(name.startswith(prefix) for prefix in args.only)]
    times = {name: [] for name, _ in rows}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, model in rows:
                times[name].append(time_callable(lambda: model(x), min_time_s=args.min_time / args.rounds,
                                                  warmup=0 if times[name] else 1, min_runs=1).median_s)
        results = []
        for name, model in rows:
            median = sorted(times[name])[len(times[name]) // 2]
            macs = count_flops(getattr(model, "_orig_mod", model), x).macs / len(x)
            results.append((name, args.batch / median, macs))
            print(f"{name:<45} {args.batch / median:8.1f} img/s  {macs / 1e9:6.3f} GMACs", flush=True)
    base_ips, base_macs = results[0][1], results[0][2]
    print(f"\n{args.model}, batch {args.batch}, {args.threads} threads, {torch.__version__}")
    print("| variant | img/s | speed-up | GMACs | MACs ratio |\n|---|---|---|---|---|")
    for name, ips, macs in results:
        print(f"| {name} | {ips:.1f} | {ips / base_ips:.2f}x | {macs / 1e9:.3f} | {base_macs / macs:.2f}x |")


if __name__ == "__main__":
    main()
