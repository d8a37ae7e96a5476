"""ADI (layer-wise identifiers + gradient mask) vs single-token textual inversion, at equal optimizer steps.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/agents_adi.py [--seeds 0 1]

Runs `vitlab toy adi` (vitlab/agents/adi.py `run`) per seed: a judge ViT (class + action heads) trained on real
16x16 Fashion-MNIST items under the four actions; a class-conditional diffusers `UNet2DModel` trained on the same
items, captioned (class word, action word); then an identifier for the clockwise rotation, without its word,
learned from 8 exemplars (trousers and sneakers, rotated) by each arm for the same steps, from the null action word:
ADI (a token per conditioning layer + the triple gradient mask, beta 0.25), layer-wise tokens without the mask, and
one token (textual inversion). Each arm's identifier is then prompted with the 8 classes not among the exemplars
(16 samples each, DDIM 25 steps, guidance 3); the judge scores "action present" (it sees the rotation), "subject
kept" (it sees the prompted class) and both. The same prompts with the null action word and with the rotation's
own word are the references.
Toy-scale target: ADI beats single-token inversion on "action present" at equal "subject kept".
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time

import torch

from vitlab.agents import run_toy

ROWS = (("null_word", "no identifier (null action word)"), ("target_word", "the rotation's own word"),
        ("textual_inversion", "textual inversion (1 token)"),
        ("layerwise", "layer-wise tokens, no mask"), ("adi", "ADI (layer-wise + gradient mask)"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread\n")
    print("| seed | identifier | action present | subject kept | both | inversion CPU s |")
    print("|---|---|---|---|---|---|")
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as out:
            m = run_toy("adi", out, seed=seed)["metrics"]
        for key, label in ROWS:
            cpu = f"{m[f'{key}_cpu_s']:.0f}" if f"{key}_cpu_s" in m else "-"
            print(f"| {seed} | {label} | {m[f'{key}_action']:.1%} | {m[f'{key}_subject']:.1%} | "
                  f"{m[f'{key}_both']:.1%} | {cpu} |", flush=True)
        print(f"\nseed {seed}: judge accuracy on test items: class {m['judge_class_acc']:.1%}, action "
              f"{m['judge_action_acc']:.1%}; diffusion model {m['diffusion_params']} params, "
              f"{m['diffusion_steps']} steps, final loss {m['diffusion_final_loss']}; training CPU "
              f"{m['train_cpu_s']:.0f} s\n")
    print(f"Process CPU time {time.process_time():.0f} s.")


if __name__ == "__main__":
    main()
