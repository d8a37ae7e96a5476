"""EventTransAct's Event-Contrastive Loss (ECL), `vitlab train --recipe ecl[:weight=W,temperature=T,segments=S]`.

de Blegiers et al., "EventTransAct: A Video Transformer-based Framework for Event-camera Based Action Recognition"
(IROS 2023); read against github.com/tristandb8/EventTransAct @ 0264d26f92c86825b8c8b10a7c7a086fa6554b85
(train.py's ECL branch, nt_xent_original.py `NTXentLoss`, configs/config_DVS_wECL.py).

Every clip is loaded twice, each view with its own random event augmentation (`data.events.event_augment`; the
official loader draws `numClips = 2` clips with `train_temp_align = True`: the same frames, augmented independently).
Both views run through the model; the spatial backbone's per-frame features (the class token after its LayerNorm)
go through a projection MLP, and for each clip S frames spread over it (every T/S-th: the official slice
`[ii : ii + T : num_segments]` with T = 16, S = 4) are contrasted with SimCLR's NT-Xent: frame f of view 1 and frame
f of view 2 are the positive pair, the other frames of the same clip, in both views, are the negatives: temporally
misaligned frames must have distinct features. With z the 2S projected features, s_ij = z_i . z_j / tau (dot
product, official `use_cosine_similarity=False`, tau = 0.1):

    ECL(clip) = 1/(2S) sum_i -log( exp(s_{i,p(i)}) / sum_{j != i} exp(s_ij) )

averaged over the batch's clips (train.py: summed over clips, divided by B). The step's loss is
CE(view 1) + weight * ECL (train.py: `ce_loss * ECL_weight + con_loss` with ECL_weight = 1, the same at weight=1).

The official projection `twoDmlp = mlp(feature_size=embed_dim)` is imported from an `mlp` module that the
repository does not contain; here it is SimCLR's head, Linear(D, D) -> ReLU -> Linear(D, proj_dim). It is trained
with the model and not kept in the checkpoint (inference does not use it).
"""
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..recipes import Recipe, RecipeError, Step, register_recipe

__all__ = ["EventContrastive", "nt_xent", "event_contrastive_loss"]


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, cosine: bool = False) -> torch.Tensor:
    """SimCLR's NT-Xent of paired rows z1[i] <-> z2[i] (N, D): the mean over the 2N rows of the cross-entropy of
    picking the partner among the other 2N - 1 rows (nt_xent_original.py, which sums and divides by 2N)."""
    z = torch.cat([z1, z2])  # (2N, D)
    sim = F.cosine_similarity(z[:, None], z[None], dim=-1) if cosine else z @ z.T  # (2N, 2N)
    n = z1.shape[0]
    self_pair = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = (sim / temperature).masked_fill(self_pair, float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, partner)


def event_contrastive_loss(z1: torch.Tensor, z2: torch.Tensor, segments: int, temperature: float = 0.1,
                           cosine: bool = False) -> torch.Tensor:
    """ECL of projected frame features of two views (B, T, P): NT-Xent over `segments` frames of each clip
    (every T // segments-th from frame 0), averaged over the B clips."""
    B, T, _ = z1.shape
    if not 2 <= segments <= T:
        raise ValueError(f"segments={segments} must be between 2 and the {T} frames of a clip")
    frames = torch.arange(0, T, T // segments)[:segments]  # official: [ii : ii + T : num_segments], T = S^2
    return torch.stack([nt_xent(z1[b, frames], z2[b, frames], temperature, cosine) for b in range(B)]).mean()


@register_recipe("ecl")
@dataclass
class EventContrastive(Recipe):
    """CE on one event-augmented view + weight * ECL between two (defaults: configs/config_DVS_wECL.py)."""

    weight: float = 1.0         # ECL weight (official: loss = CE + ECL)
    temperature: float = 0.1    # NT-Xent tau (train.py: temperature=0.1)
    segments: int = 4           # frames per clip contrasted (num_segments)
    proj_dim: int = 128         # projection output width (SimCLR's default out_dim)
    cosine: bool = False        # cosine instead of dot-product similarity (official: dot product)

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"weight={self.weight} must be >= 0")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0")
        if self.segments < 2 or self.proj_dim < 1:
            raise ValueError(f"segments={self.segments} must be >= 2 and proj_dim={self.proj_dim} >= 1")

    def setup(self, model: nn.Module, train_set: Any, cfg: Any, rt: Any) -> None:
        name = type(model).__name__
        if not (getattr(model, "factorised", False) and isinstance(getattr(model, "spatial_norm", None), nn.Module)):
            raise RecipeError(f"ecl contrasts per-frame features of a spatial backbone, and {name} has none; it "
                              "supports factorised video models (vl_eventtransact_*, ViViT model 2 vl_vivit_*)")
        frames = model.patch_embed.grid_size[0]
        if self.segments > frames:
            raise RecipeError(f"ecl:segments={self.segments} is more than the {frames} frame features of {name}: "
                              f"use segments <= {frames}")
        if not callable(getattr(train_set, "view", None)):
            raise RecipeError(f"ecl needs a second, independently augmented view of each clip, and --data "
                              f"{cfg.data} cannot draw one; it supports event clips: "
                              "--data moving-fashion-mnist-events")
        if cfg.mixup > 0 or cfg.cutmix > 0 or cfg.teacher:
            raise RecipeError("ecl computes the whole loss (cross-entropy + ECL); it does not combine with --mixup, "
                              "--cutmix or --teacher: drop one")
        self.train_set, self.seed, self.label_smoothing = train_set, cfg.seed, cfg.label_smoothing
        d = model.embed_dim
        self.proj = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, self.proj_dim)).to(rt.device)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.proj.parameters())

    def second_view(self, step: Step) -> torch.Tensor:
        """The batch's clips again, each augmented with a generator seeded by (seed, global step, clip index)."""
        views = [self.train_set.view(i, torch.Generator().manual_seed(
            (self.seed * 1_000_003 + step.global_step) * 1_000_003 + i)) for i in step.indices]
        return torch.stack(views).to(step.images.device)  # (B, C, T, H, W)

    def loss(self, step: Step) -> torch.Tensor:
        features: list[torch.Tensor] = []
        hook = step.model.spatial_norm.register_forward_hook(lambda m, args, out: features.append(out))
        try:
            logits = step.train_model(step.images)            # DDP-synchronised forwards of both views
            step.train_model(self.second_view(step))
        finally:
            hook.remove()
        B = step.images.shape[0]
        z1, z2 = (self.proj(f).reshape(B, -1, self.proj_dim) for f in features)  # (B*T', D) -> (B, T', P)
        ce = F.cross_entropy(logits, step.targets, label_smoothing=self.label_smoothing)
        return ce + self.weight * event_contrastive_loss(z1, z2, self.segments, self.temperature, self.cosine)
