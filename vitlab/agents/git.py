"""GiT: a plain ViT that decodes boxes as tokens, beside a DETR-style L1/GIoU head on the same ViT.

Wang et al., "GiT: Towards Generalist Vision Transformer through Universal Language Interface" (ECCV 2024); official
code Haiyang-W/GiT@5facb57 (`mmdet/models/dense_heads/git_det_head.py`, `configs/GiT/single_detection_base.py`,
`mmdet/models/task_modules/assigners/match_cost.py` `PointsL1Cost`). Detection in GiT, as implemented here:

- **Boxes as tokens.** One vocabulary: coordinate tokens 0..B with B = 2 x image size bins (`num_vocal =
  base_img_size * 2 + 1 + 80 + 1` there), then the K class tokens and a no-object token (token B + 1 + k for class
  k, B + 1 + K for none). A box is 5 tokens: class, cx, cy, w, h, each coordinate in 0-1 quantised as
  round(v * B) (`box_tokens`, `tokens_to_boxes`); cx, cy are the residual from the query's grid point + 0.5.
- **Grid-point matching.** The queries are a G x G grid of reference points (cell centres in 0-1); targets are
  assigned to them by the Hungarian assignment of least L1 distance between grid point and box centre (weight 5,
  `HungarianAssigner` with `PointsL1Cost(box_format='xywh')`). Unassigned points must say "no object"; their
  coordinate tokens are ignored (`grid_match`, `git_targets`).
- **Teacher-forced parallel decoding.** Each grid point has a sequence [grid token, task token, class, cx, cy, w]
  appended to the image tokens of the same ViT; position t predicts token t of (class, cx, cy, w, h). One mask
  (`git_attention_mask`) makes every grid point's sequence causal and private: its token t sees all image tokens and
  its own tokens 0..t, never another grid point's; image tokens see only image tokens (`global_only_image`). So all
  grid points and positions train in one forward pass; inference runs the 5 steps with argmax (`GiT.generate`).
- **Local image feature.** Before every block the grid token gets the bilinear sample of that block's patch tokens at
  its grid point (`grid_interpolate=True` there) and, after the first block, its position embedding again.
- **Loss.** Cross-entropy over the class slice of the vocabulary for every grid point, over the coordinate slice for
  the matched ones, summed and divided by (grid points + 4 x matched), logits = hidden @ vocabulary embedding^T.

Scaled to 64 px scenes: GiT's ViT is SAM's with 6 new layers ("new_more_layers"); here the ViT is vitlab's
`vl_vit_fmnist` (checkpoint blocks, resized to 64 px) plus `extra_depth` new blocks, one global grid of G x G points
instead of 5 x 5 points per attention window, and learned grid / sequence position embeddings in place of BERT's.

Comparison protocol (`compare`, benchmarks/agents_git.py): both heads train for the same steps on the same scenes,
each at its own learning rate chosen by `sweep_lr` on scenes of the `val` split (never the test scenes); the ratio
GiT AP / DETR AP is reported per seed. The scoring path is exact: ground-truth boxes passed through `git_targets`,
`decode_boxes` and `box_inference` score AP 98.6 (half-bin quantisation), AP50 = AP75 = 100 on test scenes.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import timm.optim
from timm.models.vision_transformer import Block
from torch import Tensor
from torchvision.ops import box_convert

from ..checkpoint import create_model
from ..engine.train import muon_fallback_by_role
from ..data.scenes import FmnistScenes, collate_scenes
from ..dense.heads import build_dense_model
from ..dense.matching import BoxCriterion, box_inference, hungarian_match
from ..dense.metrics import DenseMetrics
from ..errors import UserError
from .registry import register_toy

__all__ = ["box_tokens", "tokens_to_boxes", "decode_boxes", "grid_points", "grid_match", "git_targets", "git_attention_mask",
           "GiT", "git_loss", "build", "train_detector", "evaluate_detector", "sweep_lr", "compare", "run"]

SEQ = 5  # class, cx, cy, w, h


def box_tokens(boxes: Tensor, num_bins: int) -> Tensor:
    """Coordinates in 0-1 (..., 4) -> coordinate tokens round(v * num_bins) clamped to 0..num_bins (official
    `bboxes_tokens = (bboxes * num_bins).round().long().clamp(0, num_bins)`)."""
    return (boxes * num_bins).round().long().clamp(0, num_bins)


def tokens_to_boxes(tokens: Tensor, num_bins: int) -> Tensor:
    """Coordinate tokens -> values in 0-1 (token / num_bins), within half a bin of what `box_tokens` quantised."""
    return tokens.float() / num_bins


def decode_boxes(coords: Tensor, points: Tensor, num_bins: int) -> Tensor:
    """Coordinate tokens (..., Q, 4) of (cx - point + 0.5, cy - point + 0.5, w, h) -> boxes (..., Q, 4) cx, cy, w, h
    in 0-1 (official `outputs_coords[..., :2] - 0.5 + references`)."""
    boxes = tokens_to_boxes(coords, num_bins)
    return torch.cat([boxes[..., :2] - 0.5 + points, boxes[..., 2:]], dim=-1)


def grid_points(grid: int) -> Tensor:
    """The (grid * grid, 2) reference points (x, y), cell centres in 0-1, row-major (y outer)."""
    c = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    y, x = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([x.flatten(), y.flatten()], dim=1)


def grid_match(points: Tensor, centres: Tensor, weight: float = 5.0) -> tuple[Tensor, Tensor]:
    """(point indices, target indices) of the assignment of least total weight x L1(point, box centre)."""
    return hungarian_match([weight * torch.cdist(points.float(), centres.float(), p=1)])[0]


def git_targets(points: Tensor, boxes: Tensor, labels: Tensor, num_classes: int,
                num_bins: int) -> tuple[Tensor, Tensor]:
    """Target tokens (Q, 5) and weights (Q, 5) of one image for grid `points` (Q, 2).

    `boxes` (N, 4) are normalised (cx, cy, w, h). Matched points: class token num_bins + 1 + label, the centre as the
    residual from the point + 0.5 (clamped to 0-1), w, h; weights 1. Other points: the no-object token with weight 1
    and coordinate weights 0 (their coordinate targets are set to 0 and never counted).
    """
    q = len(points)
    tokens = torch.zeros(q, SEQ, dtype=torch.long)
    tokens[:, 0] = num_bins + 1 + num_classes
    weights = torch.zeros(q, SEQ)
    weights[:, 0] = 1.0
    if len(boxes):
        pi, ti = grid_match(points, boxes[:, :2])
        goal = boxes[ti].clone().float()
        goal[:, :2] = (goal[:, :2] - points[pi] + 0.5).clamp(0, 1)
        tokens[pi, 0] = num_bins + 1 + labels[ti].long()
        tokens[pi, 1:] = box_tokens(goal, num_bins)
        weights[pi, 1:] = 1.0
    return tokens, weights


def git_attention_mask(num_image: int, num_points: int, seq: int = SEQ + 1) -> Tensor:
    """(L, L) bool, True where query i may attend to key j; L = num_image + num_points * seq, the grid tokens laid out
    point-major (token t of point q at num_image + q * seq + t). Image tokens see image tokens; token t of point q
    sees every image token and tokens 0..t of point q (official `decoder_inference`: `iter_pad_masks = 1 - eye`
    over grid points per step, plus causal order)."""
    length = num_image + num_points * seq
    idx = torch.arange(length)
    is_img = idx < num_image
    point = torch.where(is_img, -1, (idx - num_image) // seq)
    step = torch.where(is_img, -1, (idx - num_image) % seq)
    same_point_causal = (point[:, None] == point[None, :]) & (step[None, :] <= step[:, None]) & ~is_img[:, None]
    return is_img[None, :] | same_point_causal


class GiT(nn.Module):
    """A plain timm ViT (`vit`: patch_embed, _pos_embed, blocks, norm) that detects by decoding box tokens.

    `forward(image, tokens)` is the teacher-forced pass: `tokens` (B, Q, 4) the inputs class, cx, cy, w of every
    grid point; returns vocabulary logits (B, Q, 5, V). `generate(image)` decodes greedily and returns the dense
    detection dict {"pred_logits" (B, Q, K + 1) log-probabilities over the class tokens, "pred_boxes" (B, Q, 4)
    cx, cy, w, h in 0-1}, which `vitlab.dense.matching.box_inference` scores like any DETR head.
    """

    def __init__(self, vit: nn.Module, num_classes: int, img_size: int = 64, grid: int = 5, extra_depth: int = 2):
        super().__init__()
        self.vit = vit
        dim = vit.embed_dim
        ref = vit.blocks[0]
        heads = ref.attn.num_heads
        mlp_ratio = ref.mlp.fc1.out_features / dim
        self.extra = nn.ModuleList(Block(dim, heads, mlp_ratio, qkv_bias=True) for _ in range(extra_depth))
        self.num_classes, self.num_bins, self.grid = num_classes, 2 * img_size, grid
        self.register_buffer("points", grid_points(grid), persistent=False)
        vocab = self.num_bins + 1 + num_classes + 1
        self.vocab = nn.Parameter(torch.randn(vocab, dim) * 0.02)        # shared input / output embedding
        self.task = nn.Parameter(torch.randn(dim) * 0.02)                # the detection task token
        self.grid_pos = nn.Parameter(torch.randn(grid * grid, dim) * 0.02)
        self.seq_pos = nn.Parameter(torch.randn(SEQ + 1, dim) * 0.02)

    def _blocks(self) -> list[nn.Module]:
        return [*self.vit.blocks, *self.extra]

    def _local(self, x: Tensor, prefix: int) -> Tensor:
        """Bilinear sample (B, Q, dim) of the patch tokens of `x` at the grid points (official grid_interpolate)."""
        patches = x[:, prefix:]
        side = int(math.isqrt(patches.shape[1]))
        fmap = patches.transpose(1, 2).reshape(x.shape[0], -1, side, side)              # [B, dim, h, w]
        where = (self.points * 2 - 1)[None, :, None].expand(x.shape[0], -1, -1, -1)     # [B, Q, 1, 2] in -1..1
        return F.grid_sample(fmap, where, align_corners=False)[..., 0].transpose(1, 2)  # [B, Q, dim]

    def forward(self, image: Tensor, tokens: Tensor) -> Tensor:
        b, q = image.shape[0], len(self.points)
        x = self.vit.norm_pre(self.vit._pos_embed(self.vit.patch_embed(image)))         # [B, P, dim]
        n_img, prefix = x.shape[1], self.vit.num_prefix_tokens
        seq = torch.cat([self.grid_pos[None].expand(b, -1, -1)[:, :, None],             # grid token
                         self.task.expand(b, q, 1, -1),                                 # task token
                         self.vocab[tokens]], dim=2) + self.seq_pos                     # [B, Q, 6, dim]
        mask = git_attention_mask(n_img, q).to(image.device)
        bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(~mask, float("-inf"))
        for i, block in enumerate(self._blocks()):
            first = seq[:, :, 0] + self._local(x, prefix) + (self.grid_pos if i else 0)
            seq = torch.cat([first[:, :, None], seq[:, :, 1:]], dim=2)
            y = block(torch.cat([x, seq.flatten(1, 2)], dim=1), attn_mask=bias)         # [B, P + Q*6, dim]
            x, seq = y[:, :n_img], y[:, n_img:].reshape(b, q, SEQ + 1, -1)
        return self.vit.norm(seq[:, :, 1:]) @ self.vocab.t()                             # [B, Q, 5, V]

    @torch.no_grad()
    def generate(self, image: Tensor) -> dict[str, Tensor]:
        """Greedy decoding, one step per token: the class (argmax over the class tokens), then cx, cy, w, h (argmax
        over the coordinate tokens), each fed back as the next input; the causal mask makes the placeholder tokens
        after step t irrelevant to it."""
        b, q, nb = image.shape[0], len(self.points), self.num_bins
        tokens = torch.zeros(b, q, SEQ - 1, dtype=torch.long, device=image.device)
        coords, class_logp = [], None
        for t in range(SEQ):
            logits = self(image, tokens)[:, :, t]                                        # [B, Q, V]
            if t == 0:
                class_logp = logits[..., nb + 1:].log_softmax(-1)                        # [B, Q, K + 1]
                pred = class_logp.argmax(-1) + nb + 1
            else:
                pred = logits[..., :nb + 1].argmax(-1)
                coords.append(pred)
            if t < SEQ - 1:
                tokens[:, :, t] = pred
        boxes = decode_boxes(torch.stack(coords, -1), self.points, nb)                  # [B, Q, 4]
        return {"pred_logits": class_logp, "pred_boxes": boxes}


def git_loss(logits: Tensor, targets: Tensor, weights: Tensor, num_bins: int) -> Tensor:
    """GiT's detection loss (official `loss_by_feat_single`): class CE on the class slice of the vocabulary at step 0
    for every grid point, coordinate CE on the coordinate slice for weighted (matched) steps 1-4, the sum over both
    divided by (grid points + 4 x matched points)."""
    cls = F.cross_entropy(logits[..., 0, num_bins + 1:].flatten(0, 1), (targets[..., 0] - num_bins - 1).flatten(),
                          reduction="none") * weights[..., 0].flatten()
    reg = F.cross_entropy(logits[..., 1:, :num_bins + 1].flatten(0, 2), targets[..., 1:].flatten(),
                          reduction="none") * weights[..., 1:].flatten()
    avg = max(float(weights[..., 0].numel() + weights[..., 1:].sum()), 1.0)
    return (cls.sum() + reg.sum()) / avg


def _batch_targets(model: GiT, targets: list[dict[str, Tensor]], size: int) -> tuple[Tensor, Tensor]:
    """Stacked `git_targets` (B, Q, 5) tokens and weights of a batch of scene targets (xyxy pixel boxes)."""
    out = [git_targets(model.points.cpu(), box_convert(t["boxes"] / size, "xyxy", "cxcywh"), t["labels"],
                       model.num_classes, model.num_bins) for t in targets]
    return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])


def _vit(init: str, img_size: int) -> nn.Module:
    """The classification ViT `init` (a vitlab checkpoint or model name), resized to `img_size` px input."""
    vit = create_model(init)
    vit.set_input_size(img_size=img_size)
    return vit


def build(kind: str, init: str, num_classes: int = 10, img_size: int = 64, **options: Any) -> nn.Module:
    """`kind` "git" (GiT on the ViT `init`) or "detr" (the dense `detr-lite` head on the same ViT's simple feature
    pyramid, `vitlab.dense.heads.build_dense_model`)."""
    if kind == "git":
        return GiT(_vit(init, img_size), num_classes, img_size, **options)

    return build_dense_model(_vit(init, img_size), "detr-lite", "detection", num_classes, img_size=img_size,
                             head_options=options)


def _step_loss(model: nn.Module, images: Tensor, targets: list[dict[str, Tensor]],
               criterion: nn.Module | None) -> Tensor:
    """One batch's training loss: GiT's token loss on its grid-matched targets, or the box criterion's sum."""
    if isinstance(model, GiT):
        tokens, weights = _batch_targets(model, targets, images.shape[-1])
        return git_loss(model(images, tokens[..., :-1]), tokens, weights, model.num_bins)
    return sum(criterion(model(images), targets).values())


def detector_muon_fallback(model: nn.Module) -> list[str]:
    """Parameter names Muon leaves to its AdamW fallback in a detector (`vitlab.engine.train.muon_fallback_by_role`):
    embeddings, position and query tables, GiT's shared vocabulary (also its output layer), and the DETR-style
    head's output Linears (class and last box layer), as `vitlab.engine.train.muon_fallback` does for a classifier."""
    outputs = []
    for name, m in model.named_modules():
        if hasattr(m, "bbox_embed") and hasattr(m, "class_embed"):
            last = [n for n, sub in m.bbox_embed.named_modules() if isinstance(sub, nn.Linear)][-1]
            outputs += [f"{name}.class_embed", f"{name}.bbox_embed.{last}"]
    return muon_fallback_by_role(model, tuple(outputs))


def detector_optimizer(model: nn.Module, opt: str, lr: float, weight_decay: float = 0.05) -> torch.optim.Optimizer:
    """AdamW, or timm's Muon on the hidden matrices with `detector_muon_fallback` on its AdamW fallback."""
    if opt == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    if opt == "muon":
        return timm.optim.create_optimizer_v2(model, opt="muon", lr=lr, weight_decay=weight_decay,
                                              fallback_list=detector_muon_fallback(model))
    raise UserError(f"optimizer {opt!r}: use 'adamw' or 'muon'")


def train_detector(model: nn.Module, dataset, steps: int, batch_size: int = 8, lr: float = 5e-4,
                   seed: int = 0, opt: str = "adamw") -> list[float]:
    """`opt` (AdamW or Muon, weight decay 0.05), linear warm-up over the first 10 % of steps then cosine, seeded
    batches; the same loop for GiT (its token loss) and the DETR-style head (`BoxCriterion`: class CE + L1 + GIoU,
    Hungarian)."""
    criterion = None if isinstance(model, GiT) else BoxCriterion(model.num_classes)
    opt = detector_optimizer(model, opt, lr)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, max(0, s - warm) / max(1, steps - warm)))))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses: list[float] = []
    while len(losses) < steps:
        for idx in torch.randperm(len(dataset), generator=gen).split(batch_size):
            if len(losses) == steps or len(idx) < batch_size:
                break
            images, targets = collate_scenes([dataset[int(i)] for i in idx])
            loss = _step_loss(model, images, targets, criterion)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
    return losses


@torch.no_grad()
def evaluate_detector(model: nn.Module, dataset, limit: int | None = None, batch_size: int = 32) -> dict[str, float]:
    """AP / AP50 / AP75 (torchmetrics MeanAveragePrecision, pycocotools) with the shared `DenseMetrics`."""
    model.eval()
    n = len(dataset) if limit is None else min(limit, len(dataset))
    metrics = DenseMetrics("detection", len(dataset.classes))
    for start in range(0, n, batch_size):
        images, targets = collate_scenes([dataset[k] for k in range(start, min(n, start + batch_size))])
        out = model.generate(images) if isinstance(model, GiT) else model(images)
        metrics.update(box_inference(out["pred_logits"], out["pred_boxes"], images.shape[-1]), targets)
    return metrics.compute()


def _curve(losses: list[float], points: int = 8) -> list[float]:
    """`points` means of consecutive windows of the loss curve (the first window at step 0, the last at the end)."""
    if not losses:
        return []
    size = max(1, len(losses) // points)
    return [round(sum(w) / len(w), 3) for w in (losses[i:i + size] for i in range(0, len(losses), size))][:points]


def sweep_lr(kind: str, lrs: list[float], steps: int, train_scenes: int, val_scenes: int, init: str, seed: int = 0,
             batch_size: int = 8, img_size: int = 64, opt: str = "adamw",
             **options: Any) -> dict[float, dict[str, float]]:
    """Each learning rate's AP (percent) on `val_scenes` scenes of the `val` split (items from the fashion-mnist
    hold-out, disjoint from the train scenes' items and from the test file) after `steps` steps of `kind` ("git" or
    "detr") on `train_scenes` train scenes; pick a head's LR by this, never by the test scenes."""
    if not lrs or any(lr <= 0 for lr in lrs):
        raise UserError(f"sweep_lr lrs={lrs!r}: give one or more positive learning rates, e.g. [1e-3, 3e-3]")
    train = FmnistScenes("train", n=train_scenes, size=img_size, seed=seed)
    val = FmnistScenes("val", n=val_scenes, size=img_size)
    out: dict[float, dict[str, float]] = {}
    for lr in lrs:
        torch.manual_seed(seed)
        model = build(kind, init, img_size=img_size, **options)
        losses = train_detector(model, train, steps, batch_size, lr, seed, opt=opt)
        out[lr] = {k: round(100 * v, 2) for k, v in evaluate_detector(model, val).items()}
        out[lr]["curve"] = _curve(losses)
    return out


def compare(steps: int, train_scenes: int, test_scenes: int, init: str, seed: int = 0, batch_size: int = 8,
            lr: float = 5e-4, grid: int = 5, extra_depth: int = 2, img_size: int = 64, git_lr: float | None = None,
            detr_lr: float | None = None, heads: tuple[str, ...] = ("git", "detr"),
            opt: str = "adamw") -> dict[str, Any]:
    """GiT and the DETR-style head on the same ViT, trained for the same steps on the same scenes; their test AP.

    Each head trains at its own learning rate (`git_lr`, `detr_lr`; `lr` where not given), which should come from
    `sweep_lr` on the val split. `heads` runs a subset (the ratio needs both). `opt` ("adamw" or "muon") trains both
    heads. `{kind}_curve` is the loss curve as 8 window means."""
    unknown = set(heads) - {"git", "detr"}
    if unknown or not heads:
        raise UserError(f"compare heads={heads!r}: use 'git', 'detr' or both")
    train = FmnistScenes("train", n=train_scenes, size=img_size, seed=seed)
    test = FmnistScenes("test", n=test_scenes, size=img_size)
    metrics: dict[str, Any] = {"steps": steps, "batch_size": batch_size, "test_scenes": test_scenes, "opt": opt}
    lrs = {"git": lr if git_lr is None else git_lr, "detr": lr if detr_lr is None else detr_lr}
    for kind, options in (("git", {"grid": grid, "extra_depth": extra_depth}), ("detr", {})):
        if kind not in heads:
            continue
        torch.manual_seed(seed)
        model = build(kind, init, img_size=img_size, **options)
        start = time.perf_counter()
        losses = train_detector(model, train, steps, batch_size, lrs[kind], seed, opt=opt)
        metrics[f"{kind}_lr"] = lrs[kind]
        metrics[f"{kind}_train_s"] = round(time.perf_counter() - start, 1)
        metrics[f"{kind}_params"] = sum(p.numel() for p in model.parameters())
        metrics[f"{kind}_final_loss"] = round(sum(losses[-10:]) / max(1, len(losses[-10:])), 4)
        metrics[f"{kind}_curve"] = _curve(losses)
        for key, value in evaluate_detector(model, test).items():
            metrics[f"{kind}_{key}"] = round(100 * value, 2)
    if "git_ap" in metrics and "detr_ap" in metrics:
        metrics["ap_ratio"] = (round(metrics["git_ap"] / metrics["detr_ap"], 3) if metrics["detr_ap"] > 0
                               else float("nan"))
    return metrics


@register_toy("git", "GiT: boxes as tokens on a plain ViT vs a DETR-style head (fmnist-scenes detection)",
              requires=("pycocotools", "torchmetrics"))
def run(out: Path, seed: int, quick: bool) -> dict[str, float | str]:
    """Train GiT and the DETR-style head on the reference ViT for the same steps, each at its val-selected lr; AP of
    both on test scenes."""
    if quick:
        return compare(steps=1, train_scenes=4, test_scenes=4, init="vl_vit_fmnist", seed=seed, batch_size=2, grid=3,
                       extra_depth=1, img_size=32)
    # Muon, each head's lr the best of a 1000-step sweep scored on 200 val scenes (benchmarks/agents_git.py
    # --sweep-only --opt muon), 3000 steps (BENCHMARKS.md, "GiT")
    return compare(steps=3000, train_scenes=6000, test_scenes=200, init="checkpoints/fashion-mnist-reference-v4",
                   seed=seed, git_lr=3e-3, detr_lr=3e-3, opt="muon")
