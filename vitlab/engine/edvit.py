"""ED-ViT (Liu et al., 2024, arXiv 2410.11650): split a ViT into class-subset sub-models, prune each, fuse them.

    vitlab split checkpoints/fashion-mnist-reference --parts 2 --data fashion-mnist --out runs/split2

The paper's four steps, of which three are model-side (the fourth, assigning sub-models to devices by memory and
energy, is deployment and not modelled here):

1. *Splitting*: the C classes are divided evenly among N sub-models (`partition_classes`: consecutive class
   indices, sizes differing by at most one), each a copy of the trained ViT responsible for its subset.
2. *Class-wise pruning*: each copy is pruned with vitlab's structured pruning (`vitlab.prune.Prune`, NViT-style
   global ranking of heads and MLP channel groups) whose importance scores are computed on images of its own
   classes only, so units that matter for other classes go first. Its head keeps the original rows of its classes
   plus one "other" output (`class_head`), and it is fine-tuned briefly on batches half of its classes, half of the
   rest (labelled "other").
3. *Fusion*: the sub-models' outputs, each a log-softmax over its |S_k| + 1 outputs, are concatenated and a small
   MLP maps them to the C classes (the paper fuses the sub-models' results with an MLP; the per-part log-softmax,
   which puts the parts on one scale, is our choice). The MLP is trained on the frozen parts' outputs.

No official code was found (searched GitHub for ED-ViT / 2410.11650); the class assignment and the "other" output are
this module's reading of the paper, not verified against the authors' implementation.
"""
import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..checkpoint import create_model, model_spec, refuse_out_over_source
from ..data.transforms import dataset_for_model
from ..errors import UserError
from ..prune import CRITERIA, Prune, model_macs, prune_
from ..prune.applicable import check_prunable
from ..utils.io import atomic_path, atomic_write_json
from ..utils.lock import check_writable

__all__ = ["Split", "EdViT", "EdViTError", "partition_classes", "subset_targets", "class_head", "prune_for_classes",
           "finetune_part_", "train_fusion_", "split_checkpoint", "load_split"]

SPLIT_CONFIG = "split.json"
SPLIT_WEIGHTS = "split.safetensors"


class EdViTError(UserError):
    """A split that cannot be made: names the bad value and what to change."""


@dataclass(frozen=True)
class Split:
    """How `split_checkpoint` splits, prunes, fine-tunes and fuses (defaults sized for a few CPU minutes)."""
    parts: int = 2                 # N sub-models (edge devices)
    target_flops: float = 0.5      # fraction of the original MACs each sub-model keeps
    importance: str = "hessian"    # vitlab.prune criterion, scored on the sub-model's own classes
    calib_images: int = 256        # images of the subset for the importance scores
    steps: int = 200               # fine-tuning steps per sub-model
    batch_size: int = 64
    lr: float = 3e-4
    fusion_hidden: int = 64
    fusion_images: int = 8192      # training images whose part outputs train the fusion MLP
    fusion_steps: int = 600
    seed: int = 0

    def __post_init__(self):
        if self.parts < 2:
            raise EdViTError(f"--parts {self.parts}: a split needs at least 2 sub-models")
        if not 0 < self.target_flops <= 1:
            raise EdViTError(f"--target-flops {self.target_flops} must be in (0, 1]: the fraction of MACs each "
                             "sub-model keeps")
        if self.importance not in CRITERIA:
            raise EdViTError(f"--importance {self.importance!r}; choose one of {', '.join(CRITERIA)}")
        for name in ("calib_images", "batch_size", "fusion_hidden", "fusion_images"):
            if getattr(self, name) < 1:
                raise EdViTError(f"{name}={getattr(self, name)} must be >= 1")
        if self.steps < 0 or self.fusion_steps < 1 or not self.lr > 0:
            raise EdViTError(f"steps={self.steps} (>= 0), fusion_steps={self.fusion_steps} (>= 1) and lr={self.lr} "
                             "(> 0) are out of range")


def partition_classes(num_classes: int, parts: int) -> list[list[int]]:
    """Consecutive class indices in `parts` subsets of sizes differing by at most one (the first ones larger)."""
    if not 2 <= parts <= num_classes:
        raise EdViTError(f"--parts {parts}: give 2 to {num_classes} (the model has {num_classes} classes; every "
                         "sub-model needs at least one)")
    size, extra = divmod(num_classes, parts)
    bounds = [k * size + min(k, extra) for k in range(parts + 1)]
    return [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]


def subset_targets(labels: torch.Tensor, subset: list[int], num_classes: int) -> torch.Tensor:
    """A sub-model's targets: class subset[i] -> i, any other class -> len(subset) ("other")."""
    table = torch.full((num_classes,), len(subset), dtype=torch.long)
    table[torch.tensor(subset)] = torch.arange(len(subset))
    return table[labels]


def class_head(head: nn.Linear, subset: list[int]) -> nn.Linear:
    """A head with the original rows of `subset` and an "other" row (the mean of the remaining rows)."""
    rest = [c for c in range(head.out_features) if c not in subset]
    out = nn.Linear(head.in_features, len(subset) + 1, bias=head.bias is not None)
    with torch.no_grad():
        out.weight.copy_(torch.cat([head.weight[subset], head.weight[rest].mean(0, keepdim=True)]))
        if head.bias is not None:
            out.bias.copy_(torch.cat([head.bias[subset], head.bias[rest].mean(0, keepdim=True)]))
    return out


def _set_head_(model: nn.Module, head: nn.Linear) -> nn.Module:
    model.head = head
    model.num_classes = head.out_features
    return model


def prune_for_classes(model: nn.Module, subset: list[int], calib: list, cfg: Split) -> nn.Module:
    """A pruned copy of `model` for `subset`: importance scored on `calib` ((images, labels) batches of the subset's
    classes, original labels), then the head cut to the subset + "other"."""
    part = copy.deepcopy(model)
    if cfg.target_flops < 1:
        prune_(part, Prune(target_flops=cfg.target_flops, importance=cfg.importance), calib=calib)
    return _set_head_(part, class_head(part.head, subset))


def _images(dataset, indices: list[int]) -> torch.Tensor:
    return torch.stack([dataset[i][0] for i in indices])     # (B, C, H, W)


def _cosine(step: int, steps: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * step / max(1, steps)))


def finetune_part_(part: nn.Module, subset: list[int], dataset, labels: torch.Tensor, num_classes: int, cfg: Split,
                   generator: torch.Generator) -> nn.Module:
    """Fine-tune a sub-model for `cfg.steps` AdamW steps (cosine decay) on batches half of its classes and half of
    the rest, with `subset_targets` labels; returns it in eval mode."""
    inside = torch.isin(labels, torch.tensor(subset))
    pools = [inside.nonzero().flatten(), (~inside).nonzero().flatten()]
    optimizer = torch.optim.AdamW(part.parameters(), lr=cfg.lr, weight_decay=0.05)
    part.train()
    half = cfg.batch_size // 2
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * _cosine(step, cfg.steps)
        picks = [pool[torch.randint(len(pool), (n,), generator=generator)]
                 for pool, n in zip(pools, (cfg.batch_size - half, half))]
        index = torch.cat(picks)
        targets = subset_targets(labels[index], subset, num_classes)
        loss = F.cross_entropy(part(_images(dataset, index.tolist())), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return part.eval()


class EdViT(nn.Module):
    """Sub-models and the fusion MLP: logits = MLP(concat_k log_softmax(part_k(x))), shape (B, num_classes)."""

    def __init__(self, parts: list[nn.Module], subsets: list[list[int]], num_classes: int, hidden: int = 64):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.subsets = [list(s) for s in subsets]
        self.num_classes = num_classes
        width = sum(len(s) + 1 for s in subsets)
        self.fusion = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, num_classes))

    def part_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """What the devices send: (B, sum_k |S_k| + 1), each part's log-softmax over its subset + "other"."""
        return torch.cat([part(x).log_softmax(-1) for part in self.parts], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fusion(self.part_outputs(x))


@torch.inference_mode()
def _outputs(fn, dataset, indices: list[int], batch: int = 256) -> torch.Tensor:
    return torch.cat([fn(_images(dataset, indices[i:i + batch])) for i in range(0, len(indices), batch)])


def train_fusion_(model: EdViT, dataset, labels: torch.Tensor, cfg: Split, generator: torch.Generator) -> EdViT:
    """Train the fusion MLP (AdamW, cosine) on the frozen parts' outputs for `cfg.fusion_images` training images."""
    model.eval()
    picked = torch.randperm(len(labels), generator=generator)[:cfg.fusion_images]
    features = _outputs(model.part_outputs, dataset, picked.tolist())       # (n, sum |S_k| + 1)
    targets = labels[picked]
    optimizer = torch.optim.AdamW(model.fusion.parameters(), lr=1e-3, weight_decay=1e-4)
    with torch.enable_grad():
        for step in range(cfg.fusion_steps):
            for group in optimizer.param_groups:
                group["lr"] = 1e-3 * _cosine(step, cfg.fusion_steps)
            index = torch.randint(len(targets), (256,), generator=generator)
            loss = F.cross_entropy(model.fusion(features[index]), targets[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model


def _accuracy(model: nn.Module, dataset) -> float:
    labels = dataset.targets
    predicted = _outputs(model, dataset, list(range(len(labels)))).argmax(-1)
    return float((predicted == labels).float().mean())


def _fusion_macs(model: EdViT) -> int:
    return sum(m.in_features * m.out_features for m in model.fusion if isinstance(m, nn.Linear))


def split_checkpoint(source: str, out: str, cfg: Split, *, data: str, data_dir: str | None = None,
                     eval_split: str = "val") -> tuple[EdViT, dict]:
    """Split `source` into `cfg.parts` class-wise pruned, fine-tuned sub-models and a fusion MLP, save to `out`
    (split.json + split.safetensors), and return (model, summary with each part's MACs and the fused and original
    top-1 on `eval_split`)."""
    refuse_out_over_source(out, source)
    check_writable(out)
    model = create_model(source).eval()
    if cfg.target_flops < 1:
        check_prunable(model, "split")
    num_classes = int(model.num_classes)
    subsets = partition_classes(num_classes, cfg.parts)
    train = dataset_for_model(model, data, "train", data_dir=data_dir)
    labels = train.targets
    generator = torch.Generator().manual_seed(cfg.seed)
    parts, rows = [], []
    for k, subset in enumerate(subsets):
        start = time.perf_counter()
        pool = torch.isin(labels, torch.tensor(subset)).nonzero().flatten()
        picked = pool[torch.randperm(len(pool), generator=generator)[:cfg.calib_images]]
        calib = [(_images(train, chunk.tolist()), labels[chunk]) for chunk in picked.split(64)]
        part = prune_for_classes(model, subset, calib, cfg)
        spec = model_spec(part if cfg.target_flops < 1 else model)    # rebuilt from it, then the head is cut
        parts.append(finetune_part_(part, subset, train, labels, num_classes, cfg, generator))
        rows.append({"part": k, "classes": subset, "macs": model_macs(part),
                     "params": sum(p.numel() for p in part.parameters()), "spec": spec,
                     "seconds": round(time.perf_counter() - start, 1)})
    fused = train_fusion_(EdViT(parts, subsets, num_classes, cfg.fusion_hidden), train, labels, cfg, generator)
    evaluation = dataset_for_model(model, data, eval_split, data_dir=data_dir)
    summary = {"config": dataclasses.asdict(cfg), "source": str(source), "data": data, "parts": rows,
               "original_macs": model_macs(model), "original_params": sum(p.numel() for p in model.parameters()),
               "fusion_macs": _fusion_macs(fused), "eval_split": eval_split,
               "original_top1": _accuracy(model, evaluation), "fused_top1": _accuracy(fused, evaluation)}
    _save(fused, out, summary)
    return fused, summary


def _save(model: EdViT, out: str, summary: dict) -> None:
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(Path(out) / SPLIT_WEIGHTS) as tmp:
        save_file(state, str(tmp))
    atomic_write_json(Path(out) / SPLIT_CONFIG, {**summary, "format": "vitlab-edvit-split", "version": 1})


def load_split(directory: str) -> EdViT:
    """Rebuild a saved split (each part from its recorded spec, its head cut to its subset + "other")."""
    path = Path(directory) / SPLIT_CONFIG
    if not path.is_file():
        raise EdViTError(f"{directory} has no {SPLIT_CONFIG}: give a folder written by `vitlab split`")
    config = json.loads(path.read_text())
    parts = []
    for row in config["parts"]:
        part = create_model(row["spec"]["name"], **row["spec"]["kwargs"])
        parts.append(_set_head_(part, nn.Linear(part.head.in_features, len(row["classes"]) + 1)))
    num_classes = sum(len(row["classes"]) for row in config["parts"])
    model = EdViT(parts, [row["classes"] for row in config["parts"]], num_classes, config["config"]["fusion_hidden"])
    model.load_state_dict(load_file(str(Path(directory) / SPLIT_WEIGHTS)))
    return model.eval()
