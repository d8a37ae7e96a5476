"""ResFormer multi-resolution training, `vitlab train --recipe resformer:sizes=28/21/14`.

Tian et al., "ResFormer: Scaling ViTs with Multi-Resolution Training" (CVPR 2023), Sec. 3.2; verified against the
official code, github.com/ruitian12/resformer @ 33e2c09f6c2cfca264644f0948783ad33c8c8e64
(image_classification/engine.py `train_one_epoch`, losses.py `DistillationLoss`, README's training command).

Every batch is replicated at each size in `sizes` (bilinear, antialiased resize of the augmented batch) and the model
runs once per size. Largest size first, each size's loss is

    L_s = CE(logits_s, y) + weight * KD(f_s, sg(f_prev))

where f_prev is the output of the next larger size (detached; the largest size has no KD term) and the step's loss
is the mean of L_s over the sizes (engine.py: `loss /= n`). KD is the scale-consistency loss:

- target=cls (the README's `--distillation-type smooth-l1 --distillation-target cls`): smooth-L1 between the class
  feature that enters the classifier and the teacher's feature whitened by a parameter-free LayerNorm (eps 1e-6);
- target=logit: Hinton's KD on the logits at temperature tau, KL(softmax(t/tau) || softmax(s/tau)) * tau^2, summed
  and divided by the number of logits (DeiT's soft distillation, which losses.py builds on).

CE is the engine's: label smoothing `--label-smoothing`, or the mixup/cutmix targets. With a single size equal to
the training size the recipe computes exactly the engine's plain cross-entropy step. Pair it with a model that takes
any input size: `vl_vit_fmnist` with `pos_embed="glpe"` (ResFormer's global-local positional embedding,
vitlab/models/_glpe.py) or a timm ViT with `dynamic_img_size=True`.
"""
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..recipes import Recipe, RecipeError, Step, register_recipe

__all__ = ["ResFormer", "resize_batch", "scale_consistency"]


def resize_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size), bilinear with antialiasing (a downscale averages, as PIL's resize does)."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def scale_consistency(student: torch.Tensor, teacher: torch.Tensor, target: str = "cls",
                      tau: float = 1.0) -> torch.Tensor:
    """ResFormer's scale-consistency term between a smaller size's output and the next larger size's (detached).

    cls: smooth_l1(student, LayerNorm(teacher)) averaged over (B, D) — the official `smooth-l1` distillation.
    logit: sum KL(softmax(teacher/tau) || softmax(student/tau)) * tau^2 / (B * classes).
    """
    teacher = teacher.detach()
    if target == "cls":
        return F.smooth_l1_loss(student, F.layer_norm(teacher, teacher.shape[-1:], eps=1e-6))
    if target == "logit":
        kl = F.kl_div(F.log_softmax(student / tau, dim=-1), F.log_softmax(teacher / tau, dim=-1), reduction="sum",
                      log_target=True)
        return kl * (tau * tau) / student.numel()
    raise ValueError(f"target={target!r} is not one of cls, logit")


@register_recipe("resformer")
@dataclass
class ResFormer(Recipe):
    """Multi-resolution training with ResFormer's scale-consistency loss (defaults: the official README command)."""

    sizes: tuple[int, ...] = (28, 21, 14)   # square sizes every batch is trained at
    weight: float = 1.0                     # scale-consistency weight (official --distillation-alpha 1.0)
    target: Literal["cls", "logit"] = "cls"  # what is kept consistent: class features (official) or logits
    tau: float = 1.0                        # KD temperature (target=logit)

    def __post_init__(self) -> None:
        self.sizes = tuple(self.sizes)
        if not self.sizes or any(s < 1 for s in self.sizes) or len(set(self.sizes)) != len(self.sizes):
            raise ValueError(f"sizes={'/'.join(map(str, self.sizes))} must be distinct positive sizes, e.g. 28/21/14")
        if self.weight < 0:
            raise ValueError(f"weight={self.weight} must be >= 0 (0: multi-resolution cross-entropy only)")
        if self.tau <= 0:
            raise ValueError(f"tau={self.tau} must be > 0")
        if self.target not in ("cls", "logit"):
            raise ValueError(f"target={self.target!r} is not one of cls, logit")

    def setup(self, model: nn.Module, train_set: Any, cfg: Any, rt: Any) -> None:
        if cfg.teacher or cfg.l1 > 0:
            raise RecipeError("resformer computes the whole loss at every size (cross-entropy + scale consistency); "
                              "it does not combine with --teacher or --l1: drop one")
        self.label_smoothing = cfg.label_smoothing
        name = type(model).__name__
        if self.target == "cls" and not isinstance(getattr(model, "get_classifier", lambda: None)(), nn.Linear):
            raise RecipeError(f"resformer:target=cls reads the input of the classifier, and {name} has no Linear "
                              "classifier (timm get_classifier()); it supports timm-style models, or use target=logit")
        in_chans = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3,))[0]
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for size in self.sizes:
                    try:
                        model(torch.zeros(1, in_chans, size, size, device=device))
                    except (RuntimeError, AssertionError, ValueError) as e:
                        raise RecipeError(
                            f"resformer: {name} does not take {size}x{size} inputs ({str(e).splitlines()[0]}); "
                            "the recipe supports models that accept any input size: build vl_vit_fmnist with "
                            "--model-kwargs '{\"pos_embed\": \"glpe\"}' (ResFormer's GLPE) or a timm ViT with "
                            "'{\"dynamic_img_size\": true}'") from None
        finally:
            model.train(was_training)

    def _cross_entropy(self, logits: torch.Tensor, step: Step) -> torch.Tensor:
        """The engine's classification loss (train.py default_loss without a teacher)."""
        if step.soft is not None:
            return torch.sum(-step.soft * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, step.targets, label_smoothing=self.label_smoothing)

    def loss(self, step: Step) -> torch.Tensor:
        features: list[torch.Tensor] = []
        hook = None
        if self.target == "cls":   # the class feature is what enters the classifier (official pre_logits(x[:, 0]))
            hook = step.model.get_classifier().register_forward_hook(lambda m, args, out: features.append(args[0]))
        try:
            terms, previous = [], None
            for size in sorted(self.sizes, reverse=True):
                logits = step.train_model(resize_batch(step.images, size))   # DDP-synchronised forward
                output = features.pop() if hook is not None else logits
                term = self._cross_entropy(logits, step)
                if previous is not None:
                    term = term + self.weight * scale_consistency(output, previous, self.target, self.tau)
                terms.append(term)
                previous = output.detach()
        finally:
            if hook is not None:
                hook.remove()
        return torch.stack(terms).mean()
