"""Trainable token reducers II on the 196-token model: Self-slimmed ViT (slim + FRD) and IA-RED² (REINFORCE), each
fine-tuned from checkpoints/fashion-mnist-196 for a fixed budget, beside EViT.

    OMP_NUM_THREADS=2 python benchmarks/tokens_train2.py --threads 2 --calibrate 20 --minutes 10  # steps in 10 min
    OMP_NUM_THREADS=1 python benchmarks/tokens_train2.py --steps evit=600 slim=300 iared=700 --save runs/tt2
    OMP_NUM_THREADS=1 python benchmarks/tokens_train2.py --minutes 2 --eval-limit 2000   # wall-clock budget, a quick look

Budget: `--steps` (per method, load-independent: the cosine runs over the steps) or else `--minutes` of wall clock
per method (depends on the machine's load). `--calibrate K` only times K steps per method (methods alternating)
and prints the --steps that fill --minutes, at the median wall pace and at the CPU pace (process CPU seconds /
threads; on a loaded machine the wall pace is inflated by other processes, and at several threads with OpenMP's
default active waiting so is the CPU time: use OMP_WAIT_POLICY=PASSIVE there). `--only` takes method names or
full --apply specs (e.g. slim:keep_rate=0.6,locations=0.25/0.5/0.75).

Each method: AdamW (lr --lr, cosine over the budget, weight decay 0.05, grad clip 1), batch --batch of the
training split (no augmentation), seed --seed. EViT trains with plain CE (label smoothing 0.1); slim with the FRD
recipe (vitlab.tokens.slim.FRD: CE + 2 MSE(reverse TSM) + 2 KL against the frozen un-slimmed model; reverse-TSM
MLP ratio --frd-ratio 1, not the official 4, which on this 4-block model costs more than the model itself);
IA-RED² first trains its interpreters with REINFORCE, backbone frozen (--policy-share of the budget, lr
--policy-lr), then fine-tunes the backbone with the interpreters frozen (lr --lr / 3). Throughput: batch 64 of
real test images, --threads threads, round-robin median (vitlab.profiling.time_callable) against the untouched
model timed in the same run; top-1 on the test split. `--save DIR` keeps each fine-tuned model as a checkpoint,
`--save DIR --reuse` evaluates and times those instead of training again.
"""
import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

import vitlab
from vitlab.bench.measure import dataset_for
from vitlab.engine.evaluate import evaluate
from vitlab.engine.recipes import Recipe, Step
from vitlab.profiling import count_flops, time_callable
from vitlab.tokens.iared import IAREDTraining
from vitlab.tokens.slim import FRD


class Finetune:
    """One method's training loop: AdamW over the model's trainable parameters and the recipe's (reverse TSMs),
    cosine lr over the budget (`steps` steps, or `seconds` of wall clock when `steps` is None), grad clip 1.
    `new_lr`: the lr of the modules the technique and recipe add (TSMs, reverse TSMs), when given."""

    def __init__(self, model: nn.Module, recipe: Recipe, train_set, lr: float, batch: int, seed: int,
                 new_lr: float | None = None):
        recipe.setup(model, train_set, SimpleNamespace(label_smoothing=0.1), None)
        new = [p for n, p in model.named_parameters() if p.requires_grad and "token_slimming" in n] + recipe.parameters()
        old = [p for n, p in model.named_parameters() if p.requires_grad and "token_slimming" not in n]
        self.model, self.recipe, self.lr, self.params = model, recipe, lr, old + new
        self.opt = torch.optim.AdamW([{"params": old, "scale": 1.0},
                                      {"params": new, "scale": (new_lr or lr) / lr}], lr=lr, weight_decay=0.05)
        self.loader = torch.utils.data.DataLoader(train_set, batch_size=batch, shuffle=True, drop_last=True,
                                                  generator=torch.Generator().manual_seed(seed))
        self.batches = iter(())
        self.steps = 0
        self.log: tuple[str, int] | None = None      # (name, every): print progress every that many steps

    def step(self, progress: float) -> tuple[float, float]:
        """One optimizer step at lr cosine(`progress` in [0, 1]); returns its wall seconds and the process's CPU
        seconds (all threads; batch loading excluded)."""
        try:
            images, targets = next(self.batches)
        except StopIteration:
            self.batches = iter(self.loader)
            images, targets = next(self.batches)
        t0, c0 = time.perf_counter(), time.process_time()
        self.model.train()
        for group in self.opt.param_groups:
            group["lr"] = group["scale"] * self.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        model = self.model

        def default_loss() -> torch.Tensor:
            return F.cross_entropy(model(images), targets, label_smoothing=0.1)

        step = Step(model, model, images, targets, None, [], 0, self.steps, self.steps, default_loss)
        loss = self.recipe.loss(step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.steps += 1
        return time.perf_counter() - t0, time.process_time() - c0

    def run(self, steps: int | None = None, seconds: float | None = None) -> int:
        """Train for `steps` steps (cosine over the steps) or, when `steps` is None, `seconds` of wall clock
        (cosine over the time); returns the steps taken."""
        start = time.perf_counter()
        while True:
            if steps is not None:
                if self.steps >= steps:
                    break
                progress = self.steps / steps
            else:
                progress = (time.perf_counter() - start) / seconds
                if progress >= 1:
                    break
            self.step(progress)
            if self.log and self.steps % self.log[1] == 0:
                print(f"  {self.log[0]}: step {self.steps}, {time.perf_counter() - start:.0f} s, load "
                      f"{os.getloadavg()[0]:.1f}", flush=True)
        self.model.eval()
        return self.steps


def method_of(spec: str) -> str:
    """'evit', 'slim' or 'iared': the technique an --only entry names (a bare name or a full --apply spec)."""
    name = spec.split(":", 1)[0]
    if name not in ("evit", "slim", "iared"):
        raise SystemExit(f"--only takes evit, slim, iared or an --apply spec of one of them, got {spec!r}")
    return name


def step_budgets(values: list[str], specs: list[str]) -> dict[str, int | None]:
    """--steps: 'N' for every method, or 'SPEC=N' (SPEC an --only entry or its method name) per method."""
    out: dict[str, int | None] = {spec: None for spec in specs}
    for value in values:
        key, _, n = value.rpartition("=")
        if not n.isdigit() or int(n) < 1:
            raise SystemExit(f"--steps takes N or SPEC=N with N a positive integer, got {value!r}")
        hits = [s for s in specs if not key or key in (s, method_of(s))]
        if not hits:
            raise SystemExit(f"--steps {value!r}: {key!r} is none of --only {specs}")
        for s in hits:
            out[s] = int(n)
    return out


def trainers(spec: str, model: nn.Module, train_set, args) -> list[tuple[Finetune, float]]:
    """The training phases of one method with their share of the budget: IA-RED² trains its interpreters with
    REINFORCE (backbone frozen, lr --policy-lr), then the backbone (interpreters frozen, lr --lr / 3); slim trains
    with FRD; EViT with plain CE."""
    name = method_of(spec)
    if name == "iared":
        return [(Finetune(model, IAREDTraining(phase="policy"), train_set, args.policy_lr, args.batch, args.seed),
                 args.policy_share),
                (None, 1 - args.policy_share)]      # the backbone phase is built after the policy phase ran
    recipe = FRD(ratio=args.frd_ratio) if name == "slim" else Recipe()
    return [(Finetune(model, recipe, train_set, args.lr, args.batch, args.seed, args.new_lr), 1.0)]


def backbone_phase(model: nn.Module, train_set, args) -> Finetune:
    return Finetune(model, IAREDTraining(phase="backbone"), train_set, args.lr / 3, args.batch, args.seed + 1)


def calibrate(specs: list[str], checkpoint: str, train_set, args) -> None:
    """Seconds per training step of each method (each phase of IA-RED²) at --threads, the methods alternating in
    rounds of 5 steps after 3 warm-up steps each, and the steps that fill --minutes at that pace. Two paces: the
    median wall seconds (inflated by other processes on a shared machine), and the median CPU seconds of the process
    divided by --threads (the wall time of a step with every thread on its own core; other processes inflate it much
    less, but it assumes perfect scaling over the threads, so it is a lower bound on the quiet wall time)."""
    phases = []
    for spec in specs:
        torch.manual_seed(args.seed)
        model = vitlab.apply_(vitlab.create_model(checkpoint), vitlab.parse_apply([spec]))
        if method_of(spec) == "iared":
            phases.append((spec, "policy", Finetune(model, IAREDTraining(phase="policy"), train_set,
                                                    args.policy_lr, args.batch, args.seed), args.policy_share))
            torch.manual_seed(args.seed)
            model2 = vitlab.apply_(vitlab.create_model(checkpoint), vitlab.parse_apply([spec]))
            phases.append((spec, "backbone", backbone_phase(model2, train_set, args), 1 - args.policy_share))
        else:
            phases.append((spec, "", trainers(spec, model, train_set, args)[0][0], 1.0))
    times = {id(t): [] for _, _, t, _ in phases}
    for _, _, t, _ in phases:
        for _ in range(3):
            t.step(0.0)
    load0 = os.getloadavg()
    while any(len(v) < args.calibrate for v in times.values()):
        for _, _, t, _ in phases:
            for _ in range(min(5, args.calibrate - len(times[id(t)]))):
                times[id(t)].append(t.step(0.0))
    load1 = os.getloadavg()
    threads = torch.get_num_threads()
    print(f"\ncalibration: {args.calibrate} timed steps per phase, batch {args.batch}, {threads} thread(s), "
          f"load average before {load0[0]:.2f} / after {load1[0]:.2f}")
    print("| method | phase | share | median wall s/step | min wall s/step | median CPU s/step | CPU s / threads |")
    print("|---|---|---|---|---|---|---|")
    wall, cpu = {}, {}
    for spec, phase, t, share in phases:
        w = statistics.median(x[0] for x in times[id(t)])
        c = statistics.median(x[1] for x in times[id(t)])
        wall[spec] = wall.get(spec, 0.0) + share * w
        cpu[spec] = cpu.get(spec, 0.0) + share * c / threads
        print(f"| {spec} | {phase or '-'} | {share:g} | {w:.3f} | {min(x[0] for x in times[id(t)]):.3f} | "
              f"{c:.3f} | {c / threads:.3f} |")
    budget = args.minutes * 60
    print(f"\nsteps in {args.minutes:g} min at the median wall pace: --steps "
          + " ".join(f"{spec}={round(budget / s)}" for spec, s in wall.items()))
    print(f"steps in {args.minutes:g} min at the CPU pace / {threads}: --steps "
          + " ".join(f"{spec}={round(budget / s)}" for spec, s in cpu.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="checkpoints/fashion-mnist-196")
    parser.add_argument("--minutes", type=float, default=8.0,
                        help="training budget per method (wall clock), unless --steps gives it in steps")
    parser.add_argument("--steps", nargs="*", default=[],
                        help="step budget: N for every method, or SPEC=N per --only entry (or per method name); "
                             "IA-RED² splits its N by --policy-share. Load-independent, unlike --minutes")
    parser.add_argument("--calibrate", type=int, default=0, metavar="K",
                        help="only time K training steps per method at --threads and print the --steps that fill "
                             "--minutes")
    parser.add_argument("--keep-rate", type=float, default=0.5)
    parser.add_argument("--locations", default="0.25/0.5/0.75", help="EViT's and slim's stage locations")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--policy-lr", type=float, default=2e-3, help="IA-RED²: the interpreters' lr (REINFORCE)")
    parser.add_argument("--new-lr", type=float, default=None, help="lr of the TSMs and reverse TSMs (default --lr)")
    parser.add_argument("--frd-ratio", type=float, default=1.0, help="FRD reverse-TSM MLP ratio (official 4)")
    parser.add_argument("--policy-share", type=float, default=0.5, help="IA-RED²: share of the budget for REINFORCE")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-limit", type=int, default=None)
    parser.add_argument("--save", default=None, metavar="DIR",
                        help="save each fine-tuned model as a checkpoint DIR/<spec> (its steps in the metrics)")
    parser.add_argument("--reuse", action="store_true",
                        help="with --save: load a method's checkpoint from DIR when there is one instead of training")
    parser.add_argument("--train-only", action="store_true",
                        help="with --save: train and save, no evaluation (evaluate them together later with --reuse)")
    parser.add_argument("--log-every", type=int, default=100, help="print progress every N training steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", default=["evit", "slim", "iared"],
                        help="methods: evit, slim, iared (at --keep-rate / --locations), or full --apply specs, "
                             "e.g. slim:keep_rate=0.7,locations=0.25/0.5/0.75")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()

    base = vitlab.create_model(args.checkpoint).eval()
    train_set = dataset_for(base, "fashion-mnist", "train")
    test_set = dataset_for(base, "fashion-mnist", "test")
    x = torch.stack([test_set[i][0] for i in range(64)])
    defaults = {"evit": f"evit:keep_rate={args.keep_rate},locations={args.locations}",
                "slim": f"slim:keep_rate={args.keep_rate},locations={args.locations}",
                "iared": "iared"}
    specs = [defaults.get(s, s) for s in args.only]
    for s in specs:
        method_of(s)
    budgets = step_budgets(args.steps, specs)
    if args.calibrate:
        calibrate(specs, args.checkpoint, train_set, args)
        return
    seconds = args.minutes * 60
    rows = [("none (fine-tuned 196 model)", base, None, 0)]
    if args.reuse and not args.save:
        raise SystemExit("--reuse loads the checkpoints --save DIR wrote; give --save DIR")
    if args.train_only and not args.save:
        raise SystemExit("--train-only keeps the models only with --save DIR")
    for spec in specs:
        saved = Path(args.save) / spec.replace(":", "_").replace(",", "_").replace("/", "-") if args.save else None
        if args.reuse and saved is not None and (saved / "config.json").exists():
            model = vitlab.create_model(saved).eval()
            info = json.loads((saved / "config.json").read_text())["metrics"]
            print(f"{spec}: loaded {saved} ({info['steps']} steps, {info['train_s']:.0f} s)", flush=True)
            rows.append((spec, model, info["steps"], info["train_s"]))
            continue
        torch.manual_seed(args.seed)
        model = vitlab.apply_(vitlab.create_model(args.checkpoint), vitlab.parse_apply([spec]))
        n, t0, c0, steps = budgets[spec], time.perf_counter(), time.process_time(), 0
        phases = trainers(spec, model, train_set, args)
        for k, (trainer, share) in enumerate(phases):
            trainer = trainer or backbone_phase(model, train_set, args)
            trainer.log = (spec, args.log_every)
            last = k == len(phases) - 1          # the last phase takes the rest of the step budget
            budget = None if n is None else (n - steps if last else max(1, round(n * share)))
            steps += trainer.run(steps=budget, seconds=seconds * share)
        secs = time.perf_counter() - t0
        print(f"{spec}: {steps} steps in {secs:.0f} s ({time.process_time() - c0:.0f} CPU s)", flush=True)
        if saved is not None:
            vitlab.save_checkpoint(model, saved, metrics={"steps": steps, "train_s": secs})
        rows.append((spec, model.eval(), steps, secs))
    if args.train_only:
        return

    results = []
    with torch.inference_mode():
        for spec, model, steps, secs in rows:
            top1 = evaluate(model, test_set, batch_size=256, progress=False, limit=args.eval_limit)["top1"]
            macs = count_flops(model, x).macs / len(x)
            counts = list(getattr(getattr(model, "token_state", None), "counts", []))
            results.append([spec, model, steps, secs, top1, macs, counts, []])
        load0 = os.getloadavg()
        for _ in range(4):   # round-robin: each variant timed in every round
            for r in results:
                r[7].append(time_callable(lambda: r[1](x), min_time_s=1.5, warmup=2, min_runs=3).median_s)
        load1 = os.getloadavg()
    budget = "steps " + " ".join(f"{budgets[s]}" for s in specs) if any(budgets.values()) else \
        f"train {args.minutes:g} min/method"
    print(f"\n{args.checkpoint}: {platform.processor() or platform.machine()}, {args.threads} thread(s), "
          f"torch {torch.__version__}, {budget}, batch {args.batch}, lr {args.lr:g}, seed {args.seed}; throughput at "
          f"batch 64 (load average {load0[0]:.2f} / {load1[0]:.2f} around the timing); "
          f"total wall {(time.perf_counter() - wall) / 60:.1f} min")
    print("| method | steps | train s | test top-1 | Δ pt | img/s | speed-up | MMACs/img | tokens after each block |")
    print("|---|---|---|---|---|---|---|---|---|")
    base_ips = base_top1 = None
    for spec, _, steps, secs, top1, macs, counts, times in results:
        ips = 64 / sorted(times)[len(times) // 2]
        base_ips, base_top1 = base_ips or ips, base_top1 if base_top1 is not None else top1
        print(f"| {spec} | {steps or '-'} | {secs:.0f} | {100 * top1:.2f} | {100 * (top1 - base_top1):+.2f} | "
              f"{ips:.0f} | {ips / base_ips:.2f}x | {macs / 1e6:.1f} | {counts or ''} |")


if __name__ == "__main__":
    main()
