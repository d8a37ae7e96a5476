"""Dependency-graph pruning speed: Swin-T- and PVT-v2-b0-shaped models cut to 50 % of their MACs, vs unpruned.

    python benchmarks/prune_graph_speed.py --threads 2 [--batch 32] [--target 0.5] [--rounds 5]
    OMP_WAIT_POLICY=PASSIVE python benchmarks/prune_graph_speed.py --threads 1 --batch 8 --models nextvit_small

Any contract-described timm / vitlab model name works in --models: Next-ViT-S (grouped-conv channels in whole
positions, MLP channels) reaches 50 %; EfficientViT-M0 only ~59 % (its cascaded attention keeps every channel, and
only the block FFNs prune), so give it --target 0.6.

Each model (random init, 224 px, 1000 classes) is pruned with `prune:target_flops=0.5,importance=l1` through
vitlab.prune.graph (heads, MLP channels; blocks=false), saved, and reloaded in a fresh process (the logits must
match). The unpruned and reloaded pruned models are then timed round-robin: --rounds rounds, a time_callable median
per round; the row shows the median over rounds of the per-round throughput ratio (cancels drifts of a shared CPU).
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import vitlab
from vitlab.prune import Prune, model_macs
from vitlab.profiling import cpu_name, time_callable, tune_allocator

MODELS = ("swin_tiny_patch4_window7_224", "pvt_v2_b0")
RELOAD = """
import json, sys, torch, vitlab
model = vitlab.create_model(sys.argv[1])
x = torch.load(sys.argv[2])
with torch.no_grad():
    print(json.dumps(model(x).tolist()))
"""


def prune_and_reload(name: str, target: float, folder: Path) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """(unpruned, pruned reloaded in a fresh process, facts); the reload must give the pruned model's logits."""
    torch.manual_seed(0)
    base = vitlab.create_model(name).eval()
    pruned = vitlab.create_model(name).eval()
    pruned.load_state_dict(base.state_dict())
    pruned = vitlab.apply_(pruned, [Prune(target_flops=target, importance="l1")])
    out = folder / name
    vitlab.save_checkpoint(pruned, out)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    torch.save(x, folder / "x.pt")
    res = subprocess.run([sys.executable, "-c", RELOAD, str(out), str(folder / "x.pt")], capture_output=True,
                         text=True, check=True, timeout=600)
    with torch.no_grad():
        want = pruned(x)
    got = torch.tensor(json.loads(res.stdout.strip().splitlines()[-1]))
    reloaded = vitlab.create_model(str(out)).eval()
    facts = {"macs_before": model_macs(base), "macs_after": model_macs(reloaded),
             "reload_max_diff": (got - want).abs().max().item(), "prune": pruned.vitlab.prune}
    return base, reloaded, facts


def throughput_ratio(base, pruned, batch: int, rounds: int) -> tuple[float, float, float]:
    """(median pruned/unpruned throughput ratio over rounds, unpruned img/s, pruned img/s), timed round-robin."""
    x = torch.randn(batch, 3, 224, 224)
    ratios, speeds = [], {0: [], 1: []}
    with torch.inference_mode():
        for _ in range(rounds):
            times = [time_callable(lambda m=m: m(x), warmup=2, min_runs=3, min_time_s=1.0).median_s
                     for m in (base, pruned)]
            ratios.append(times[0] / times[1])
            for i, t in enumerate(times):
                speeds[i].append(batch / t)
    return statistics.median(ratios), statistics.median(speeds[0]), statistics.median(speeds[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    args = parser.parse_args()
    tune_allocator()
    torch.set_num_threads(args.threads)
    print(f"# {cpu_name()}, {args.threads} threads, batch {args.batch}, torch {torch.__version__}")
    print("| model | MACs (G) before -> after | reload max diff | units removed | img/s unpruned | img/s pruned "
          "| speed-up |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            base, pruned, facts = prune_and_reload(name, args.target, Path(tmp))
            ratio, before, after = throughput_ratio(base, pruned, args.batch, args.rounds)
            print(f"| {name} | {facts['macs_before'] / 1e9:.3f} -> {facts['macs_after'] / 1e9:.3f} "
                  f"({facts['macs_after'] / facts['macs_before']:.3f}) | {facts['reload_max_diff']:.1e} | "
                  f"{facts['prune'].get('units')} | {before:.1f} | {after:.1f} | {ratio:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
