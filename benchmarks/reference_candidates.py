"""Train one reference candidate with the engine; print its val top-1 per epoch, its final val top-1 (raw and EMA
weights, each plain and with flip TTA) and its training cost relative to v2, as JSON and as a markdown row.

    OMP_NUM_THREADS=1 python benchmarks/reference_candidates.py NAME EPOCHS [base=v1|v2] [m.KEY=JSON ...] [KEY=JSON ...]
    python benchmarks/reference_candidates.py s4 2 'm.stem_widths=[32,48,64,96]' 'm.stem_strides=[1,2,1,2]'
    python benchmarks/reference_candidates.py ema 2 base=v2 ema=0.999
    python benchmarks/reference_candidates.py prog 3 base=v2 'progressive_sizes=[20,24,28]'

`m.` keys are vl_vit_fmnist constructor kwargs (`m.bn=true` swaps the stem's GroupNorm for BatchNorm), other keys
TrainConfig fields. `base=v1` (the default, as for the rows of BENCHMARKS.md measured before v2) starts from v1's
architecture and recipe at 1 thread; `base=v2` from v2's (benchmarks/train_reference_v2.py, eager). Runs go to
/tmp/r17/runs/NAME. The val split only: the test split is read once, by the train_reference_v*.py script of the
chosen candidate.

Relative cost: before training, forward + backward + AdamW step of one batch of the candidate (at each of its
progressive sizes) and of v2 at 28 px are timed alternately in this process (`rounds` rounds of 3 steps each, the
minimum per model), so a shared machine's load cancels out; `cost_v2_epochs` is the run's whole training cost in
units of one v2 epoch (multiply by v2's quiet 2-thread epoch time, 486 s / 7 = 69 s, to predict the run's wall time).
"""
import json
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.models import register_model

import vitlab
from vitlab.bench.measure import dataset_for
from vitlab.engine import TrainConfig, fit
from vitlab.engine.progressive import make_any_size, phase_size
from vitlab.models.vit_fmnist import _create_hybrid_vit

V1 = dict(embed_dim=96, depth=4, num_heads=3, mlp_ratio=2.0, stem_widths=[24, 48, 96], stem_strides=[1, 2, 2])
V2 = dict(V1, embed_dim=64, num_heads=2, stem_widths=[32, 48, 64, 64], stem_strides=[1, 2, 1, 2])
RECIPE = dict(batch_size=64, lr=2e-3, min_lr=1e-5, weight_decay=0.05, warmup_epochs=0.3, label_smoothing=0.1,
              hflip=0.5, crop_padding=0, clip_grad=1.0, seed=0, threads=1, progress=False)
TRAIN_IMAGES = 55_000


def to_bn(m: nn.Module) -> nn.Module:
    """GroupNorm -> BatchNorm2d in place (the stem)."""
    for name, child in m.named_children():
        if isinstance(child, nn.GroupNorm):
            setattr(m, name, nn.BatchNorm2d(child.num_channels))
        else:
            to_bn(child)
    return m


@register_model
def x_vit(pretrained: bool = False, bn: bool = False, **kw) -> nn.Module:
    m = _create_hybrid_vit("vl_vit_fmnist", pretrained, **kw)
    return to_bn(m) if bn else m


def step_seconds(models: dict[str, tuple[nn.Module, int, int]], rounds: int = 4) -> dict[str, float]:
    """Seconds per training step (forward, cross-entropy, backward, AdamW step) of each (model, image side, batch),
    timed alternately: `rounds` rounds of 3 steps per model after one warm-up step, the minimum round per model."""
    gen = torch.Generator().manual_seed(0)
    setups = {key: (model.train(), torch.optim.AdamW(model.parameters(), lr=1e-4),
                    torch.randn(batch, 1, size, size, generator=gen), torch.randint(0, 10, (batch,), generator=gen))
              for key, (model, size, batch) in models.items()}
    best = {key: float("inf") for key in models}
    for r in range(rounds + 1):
        for key, (model, opt, x, y) in setups.items():
            t0 = time.perf_counter()
            for _ in range(3 if r else 1):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                opt.step()
            if r:
                best[key] = min(best[key], (time.perf_counter() - t0) / 3)
    return best


def relative_cost(arch: dict, train: dict, epochs: float) -> dict:
    """The candidate's per-image training cost at each of its sizes relative to v2's (28 px, batch 64), and its
    whole run's cost in v2 epochs."""
    sizes = list(train.get("progressive_sizes") or [28])
    batch = train["batch_size"]
    models = {"v2": (vitlab.create_model("x_vit", **V2, num_classes=10), 28, 64)}
    for s in sorted(set(sizes)):
        model = vitlab.create_model("x_vit", **arch, num_classes=10)
        if s != 28:
            make_any_size(model)   # as the engine does for --progressive-sizes
        models[f"c{s}"] = (model, s, batch)
    t = step_seconds(models)
    per_image = {s: (t[f"c{s}"] / batch) / (t["v2"] / 64) for s in set(sizes)}
    steps = int(epochs * (TRAIN_IMAGES // batch))
    counts: dict[int, int] = {}
    for i in range(steps):   # the engine's phases (vitlab/engine/progressive.py)
        s = phase_size(sizes, i, steps)
        counts[s] = counts.get(s, 0) + 1
    cost = sum(n * batch * per_image[s] for s, n in counts.items()) / TRAIN_IMAGES
    return dict(rel_cost_per_image={str(s): round(v, 3) for s, v in sorted(per_image.items())},
                cost_v2_epochs=round(cost, 2), v2_ms_per_step=round(1000 * t["v2"], 1))


def val_top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Val top-1 (%) plain and with flip TTA (mean of the softmax of the image and its mirror)."""
    model.eval()
    with torch.no_grad():
        l1 = torch.cat([model(x[i:i + 500]) for i in range(0, len(x), 500)])
        l2 = torch.cat([model(x[i:i + 500].flip(-1)) for i in range(0, len(x), 500)])
    plain = (l1.argmax(1) == y).float().mean().item()
    tta = ((l1.softmax(1) + l2.softmax(1)).argmax(1) == y).float().mean().item()
    return round(100 * plain, 2), round(100 * tta, 2)


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    name, epochs = argv[0], float(argv[1])
    base, mk, tk = "v1", {}, {}
    for a in argv[2:]:
        k, v = a.split("=", 1)
        if k == "base":
            base = v
            continue
        (mk if k.startswith("m.") else tk)[k.removeprefix("m.")] = json.loads(v)
    arch = dict({"v1": V1, "v2": V2}[base], **mk)
    train = dict(RECIPE, **tk)
    cost = relative_cost(arch, train, epochs)
    t0 = time.perf_counter()
    run = fit(TrainConfig(out=f"/tmp/r17/runs/{name}", model="x_vit", model_kwargs=arch, epochs=epochs, **train),
              overwrite=True)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
    model = vitlab.create_model("x_vit", **arch, num_classes=10)
    val = dataset_for(model, "fashion-mnist", "val")
    x = torch.stack([val[i][0] for i in range(len(val))])   # [5000, 1, 28, 28]
    y = torch.tensor([val[i][1] for i in range(len(val))])
    state = torch.load(f"{run}/train_state.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    result = dict(name=name, base=base, epochs=epochs, overrides={**{"m." + k: v for k, v in mk.items()}, **tk})
    result["val"], result["val_tta"] = val_top1(model, x, y)
    if train.get("ema"):
        model.load_state_dict(load_file(f"{run}/model.safetensors"))
        result["val_ema"], result["val_ema_tta"] = val_top1(model, x, y)
    result.update(curve=[round(100 * r.get("val_top1", 0), 2) for r in rows], wall_s=round(wall),
                  img_s=[round(r["img_per_s"]) for r in rows], params=sum(p.numel() for p in model.parameters()),
                  threads=torch.get_num_threads(), **cost)
    print(json.dumps(result))
    ema = f" | {result['val_ema']} | {result['val_ema_tta']}" if "val_ema" in result else " | - | -"
    print(f"| {name} | {json.dumps(result['overrides'])} | {epochs:g} | {cost['cost_v2_epochs']} | "
          f"{' / '.join(map(str, result['curve']))} | {result['val']} | {result['val_tta']}{ema} |")


if __name__ == "__main__":
    main(sys.argv[1:])
