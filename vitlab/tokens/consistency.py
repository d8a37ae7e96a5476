"""MCTF's token-reduction consistency loss (Lee et al., CVPR 2024, "Token reduction consistency"), for fine-tuning
with a reduction applied: `vitlab train --init CKPT --apply mctf:r=16 --token-consistency 3.0`.

What the official code does (mlvlab/MCTF: `engine.py` train_one_epoch, `models/deit.py` forward/resetInfo, and the
README's training command `--mctf_type [16,8,0,...] --task_type [1,1,0.4] --task_weight [1.0,1.0,3.0]`), and what
`consistency_loss_step` reproduces: each step runs the same weights twice on the same images,
  * the "student": the configured reduction (r_student = the applied `r`, 16 there);
  * the "teacher": a weaker reduction, r_teacher drawn uniformly from {0, ..., r_teacher_max - 1} once per step and
    shared by every active block (`torch.randint(0, r_teacher_max)`; 8 there, i.e. r / 2; r_teacher = 0 is the
    unreduced model). The teacher is *not* the full model in general, and it is trained too;
and the loss is

    w_s * CE(student logits, y) + w_t * CE(teacher logits, y)
        + w_c * sum_i pass_i * mean_d (t_id.detach() - s_id)^2 / sum_i pass_i        (0 when no image passes)

with s, t the class-token features after the final norm (what the head reads; here `forward_head(pre_logits=True)`,
which for average-pool models is the pooled feature), pass_i = [p_student(y_i | x_i) > threshold] (0.4), with mixup
p(y_i) + p(y_flip(i)) as the official code does, and weights w_s = w_t = 1, w_c = 3. CE is the training criterion
(label smoothing / mixup soft targets as configured).

Checked: tests/tokens/test_tokens_consistency.py compares the loss with a hand computation on a tiny model (two explicit
forwards at r and r_teacher) and checks that one optimizer step changes the weights. The official code was read,
not run (it needs CUDA autocast and its own DeiT); the rule above is transcribed from it.
Works with the `r`-scheduled methods: MCTF (the paper's) and ToMe (same rule, not in any paper).
"""
import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

from ..techniques import TechniqueError
from .mctf import MCTFReduction
from .patch import ReducingBlockMixin, ToMeReduction

__all__ = ["TokenConsistency", "consistency_term", "reduction_r", "draw_teacher_r", "consistency_loss_step"]


@dataclass(frozen=True)
class TokenConsistency:
    """Weights and thresholds of the consistency loss; defaults are the official training command's."""

    weight: float = 3.0                 # w_c (task_weight[2])
    threshold: float = 0.4              # confidence a student prediction needs to enter the term (task_type[2])
    teacher_r_max: Optional[int] = None  # r_teacher in [0, teacher_r_max); None: r // 2 (official: 8 for r = 16)
    student_weight: float = 1.0         # w_s (task_weight[0])
    teacher_weight: float = 1.0         # w_t (task_weight[1])

    def __post_init__(self):
        if self.weight < 0:
            raise ValueError(f"token consistency weight must be >= 0, got {self.weight}")
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"token consistency threshold is a probability in [0, 1] (official 0.4), "
                             f"got {self.threshold}")
        if self.teacher_r_max is not None and self.teacher_r_max < 0:
            raise ValueError(f"token consistency teacher_r_max must be >= 0 (0: the teacher is the full model), "
                             f"got {self.teacher_r_max}")


def consistency_term(student_feat: torch.Tensor, teacher_feat: torch.Tensor, student_logits: torch.Tensor,
                     targets: torch.Tensor, threshold: float, mixed: bool = False) -> torch.Tensor:
    """The unweighted consistency term: mean over confident images of the per-image mean squared feature gap.

    student_feat / teacher_feat (B, D) (the teacher's is detached here), student_logits (B, K), targets (B,) class
    indices (the un-mixed labels; with `mixed`, image i is mixed with image B-1-i as timm's batch mixup does)."""
    per_image = ((teacher_feat.detach() - student_feat) ** 2).mean(dim=1)
    with torch.no_grad():
        prob = student_logits.softmax(dim=-1)
        rows = torch.arange(len(targets), device=targets.device)
        confidence = prob[rows, targets]
        if mixed:
            confidence = confidence + prob[rows, targets.flip(0)]
        passed = (confidence > threshold).to(per_image.dtype)
    if passed.sum() == 0:
        return per_image.sum() * 0.0
    return (per_image * passed).sum() / passed.sum()


def _r_reductions(model: nn.Module) -> list:
    reductions = [m.reduction for m in model.modules() if isinstance(m, ReducingBlockMixin)]
    found = [red for red in reductions if isinstance(red, (MCTFReduction, ToMeReduction))]
    if not found:
        kinds = sorted({type(red).__name__ for red in reductions if red is not None}) or ["none"]
        raise TechniqueError(f"token consistency needs a model with mctf (or tome) applied, e.g. --apply mctf:r=16; "
                             f"{type(model).__name__} has token reduction {', '.join(kinds)}")
    return found


@contextlib.contextmanager
def reduction_r(model: nn.Module, r: int):
    """Temporarily run every MCTF/ToMe block of `model` with `r` tokens per block (0: that block keeps all)."""
    reductions = _r_reductions(model)
    saved = [(red.r, red.active) for red in reductions]
    try:
        for red in reductions:
            red.r, red.active = r, r > 0
        yield model
    finally:
        for red, (r0, active) in zip(reductions, saved):
            red.r, red.active = r0, active


def draw_teacher_r(model: nn.Module, cfg: TokenConsistency, generator: Optional[torch.Generator] = None) -> int:
    """r_teacher ~ U{0, ..., r_max - 1} (the official `torch.randint(0, r_teacher_max)`), r_max = cfg's or r // 2."""
    r = max(red.r for red in _r_reductions(model))
    r_max = r // 2 if cfg.teacher_r_max is None else cfg.teacher_r_max
    if r_max <= 1:
        return 0
    return int(torch.randint(0, r_max, (1,), generator=generator))


def features_and_logits(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pre-logit features (B, D): the class token after the final norm, or the pooled feature; logits (B, K))."""
    feat = model.forward_head(model.forward_features(images), pre_logits=True)
    return feat, model.head(feat)


def consistency_loss_step(model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                          criterion: Callable[[torch.Tensor], torch.Tensor], cfg: TokenConsistency, teacher_r: int,
                          mixed: bool = False) -> torch.Tensor:
    """The full training loss of one step (student CE + teacher CE + consistency), see the module docstring."""
    student_feat, student_logits = features_and_logits(model, images)
    with reduction_r(model, teacher_r):
        teacher_feat, teacher_logits = features_and_logits(model, images)
    loss = cfg.student_weight * criterion(student_logits)
    if cfg.teacher_weight:
        loss = loss + cfg.teacher_weight * criterion(teacher_logits)
    if cfg.weight:
        loss = loss + cfg.weight * consistency_term(student_feat, teacher_feat, student_logits, targets,
                                                    cfg.threshold, mixed)
    return loss
