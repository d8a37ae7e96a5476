"""Knowledge distillation losses (DeiT: Touvron et al., ICML 2021, sec. 5; its `losses.DistillationLoss`).

* soft:  (1 - alpha) * CE(student, y) + alpha * tau^2 * KL(softmax(teacher / tau) || softmax(student / tau))
* hard:  (1 - alpha) * CE(student, y) + alpha * CE(student, argmax teacher)      (DeiT's default alpha is 0.5)
* token: hard distillation through a separate distillation token: the class token's head is trained on the labels
  and a second head on the distillation token on the teacher's argmax, each weighted 1/2; at inference the two
  heads' logits are averaged. `add_distill_token` adds the token and its head to a timm VisionTransformer.

The KL term uses `reduction="sum" / numel` of the student log-probabilities, as DeiT does.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DISTILL_MODES", "distill_loss", "DistillTokenViT", "add_distill_token"]

DISTILL_MODES = ("soft", "hard", "token")


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, mode: str,
                 alpha: float = 0.5, tau: float = 1.0, base_loss: torch.Tensor | None = None,
                 dist_logits: torch.Tensor | None = None) -> torch.Tensor:
    """DeiT's loss. `base_loss` (e.g. label-smoothed CE) replaces plain CE on the labels when given.

    For mode "token", `student_logits` is the class-token head's output and `dist_logits` the distillation head's.
    """
    if mode not in DISTILL_MODES:
        raise ValueError(f"--distill {mode!r}: choose one of {', '.join(DISTILL_MODES)}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"--distill-alpha {alpha} must be in [0, 1]")
    if tau <= 0:
        raise ValueError(f"--distill-tau {tau} must be > 0")
    base = F.cross_entropy(student_logits, targets) if base_loss is None else base_loss
    teacher_logits = teacher_logits.detach()
    if mode == "soft":
        t = tau
        kl = F.kl_div(F.log_softmax(student_logits / t, dim=-1), F.log_softmax(teacher_logits / t, dim=-1),
                      reduction="sum", log_target=True) * (t * t) / student_logits.numel()
        return (1 - alpha) * base + alpha * kl
    hard = teacher_logits.argmax(dim=-1)
    if mode == "hard":
        return (1 - alpha) * base + alpha * F.cross_entropy(student_logits, hard)
    if dist_logits is None:
        raise ValueError("--distill token needs a model with a distillation token (add_distill_token)")
    return 0.5 * base + 0.5 * F.cross_entropy(dist_logits, hard)


class DistillTokenViT(nn.Module):
    """Wraps a timm VisionTransformer with a DeiT distillation token (placed after the class token) and head.

    Training mode returns (class-head logits, distillation-head logits); eval mode returns their average.
    """

    def __init__(self, vit: nn.Module):
        super().__init__()
        if getattr(vit, "cls_token", None) is None or getattr(vit, "reg_token", None) is not None:
            raise ValueError("--distill token needs a timm VisionTransformer with a class token and no register tokens")
        self.vit = vit
        self.dist_token = nn.Parameter(vit.cls_token.detach().clone())
        self.head_dist = nn.Linear(vit.embed_dim, vit.num_classes)
        self.head_dist.load_state_dict(vit.head.state_dict())

    def forward(self, x: torch.Tensor):
        vit = self.vit
        x = vit.patch_embed(x)
        x = vit._pos_embed(x)                                    # (B, 1 + N, D): class token + patches
        x = torch.cat([x[:, :1], self.dist_token.expand(x.shape[0], -1, -1) + vit.pos_embed[:, :1], x[:, 1:]], 1)
        x = vit.norm_pre(x)
        x = vit.blocks(x)
        x = vit.norm(x)                                          # (B, 2 + N, D)
        cls_logits, dist_logits = vit.head(x[:, 0]), self.head_dist(x[:, 1])
        if self.training:
            return cls_logits, dist_logits
        return (cls_logits + dist_logits) / 2


def add_distill_token(model: nn.Module) -> DistillTokenViT:
    return DistillTokenViT(model)
