"""Adversarial anonymisation for STPrivacy (vitlab/models/stprivacy.py) and the attack that measures it.

Training is a min-max game, written as one loss with a gradient reversal layer (Ganin & Lempitsky, 2015, eq. 9-10;
the usual single-step form of the min-max in adversarial privacy learning):

    loss = CE(action_head(z), action) + CE(adversary(GRL_w(z)), identity),   z = model.forward_features(clip)

The adversary descends its cross-entropy on the published tokens z; `GRL_w` is the identity forward and multiplies
the gradient by -w backward, so the STPrivacy model ascends the adversary's loss with weight w while it descends the
action loss. Privacy is then measured the way the paper's threat model asks: a *fresh* attacker, trained on the
frozen model's published tokens, tries to recover the identity.

Toy labels (moving-fashion-mnist-cls): the action is the motion class; the identity is the set of Fashion-MNIST
classes of the clip's two items (`ClipIdentities`). Targets are the set as a distribution (0.5 / 0.5, or 1 when both
items share a class); an identity prediction is a hit when its top class is in the set (chance ~0.19).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch.utils.data import DataLoader, Dataset

from ..data.fashion_mnist import FMNIST_CLASSES, load_split
from ..data.video import MovingFashionMNIST

__all__ = ["ClipIdentities", "GradientReversal", "PrivacyAdversary", "grad_reverse", "identity_hits",
           "train_stprivacy", "train_attacker", "evaluate_privacy"]


class GradientReversal(torch.autograd.Function):
    """y = x forward; dL/dx = -weight * dL/dy backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.weight * grad, None


def grad_reverse(x: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """Gradient reversal: the identity forward, the gradient times -weight backward."""
    return GradientReversal.apply(x, weight)


class PrivacyAdversary(nn.Module):
    """Privacy-attribute classifier on published tokens (B, N, D): one attention block, mean pool, linear head."""

    def __init__(self, dim: int, num_classes: int = len(FMNIST_CLASSES), num_heads: int = 2):
        super().__init__()
        self.block = Block(dim, num_heads, qkv_bias=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.block(tokens)).mean(dim=1))  # (B, classes)


class ClipIdentities(Dataset):
    """(clip, action, identity) items of a `moving-fashion-mnist-cls` dataset; identity (10,) is the distribution
    over the Fashion-MNIST classes of the clip's items (their labels in the idx file the split draws from)."""

    def __init__(self, clips: MovingFashionMNIST):
        if clips.task != "classify":
            raise ValueError("ClipIdentities needs moving-fashion-mnist-cls clips (an action label per clip)")
        self.clips = clips
        self.labels = load_split(clips.data_dir, "test" if clips.split == "test" else "train")[1]

    def __len__(self) -> int:
        return len(self.clips)

    def identity(self, index: int) -> torch.Tensor:
        picks, _ = self.clips.trajectory(index)
        return F.one_hot(self.labels[picks], len(FMNIST_CLASSES)).float().mean(dim=0)  # (10,) sums to 1

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        clip, action = self.clips[index]
        return clip, action, self.identity(index)


def identity_hits(logits: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the top predicted class is one of the clip's item classes."""
    return identity.gather(1, logits.argmax(dim=1, keepdim=True)).squeeze(1) > 0


def _warmed_adamw(params: list, lr: float, warmup: int) -> tuple[torch.optim.Optimizer, object]:
    """AdamW and a linear warm-up over `warmup` steps (constant after)."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / max(warmup, 1)))


def _batches(loader: DataLoader, steps: int):
    """`steps` batches, cycling through the loader."""
    done = 0
    while done < steps:
        for batch in loader:
            yield batch
            done += 1
            if done == steps:
                return


def train_stprivacy(model: nn.Module, adversary: PrivacyAdversary, loader: DataLoader, steps: int,
                    adv_weight: float, lr: float = 1e-3, warmup: int = 50) -> None:
    """Train STPrivacy and its in-training adversary jointly for `steps` steps (one AdamW over both; the gradient
    reversal makes it the min-max). adv_weight=0 trains the action task alone: the adversary then learns but its
    gradient never reaches the model."""
    model.train()
    adversary.train()
    opt, schedule = _warmed_adamw(list(model.parameters()) + list(adversary.parameters()), lr, warmup)
    for clips, action, identity in _batches(loader, steps):
        z = model.forward_features(clips)
        loss = F.cross_entropy(model.forward_head(z), action)
        loss = loss + F.cross_entropy(adversary(grad_reverse(z, adv_weight)), identity)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()


def train_attacker(model: nn.Module, loader: DataLoader, steps: int, lr: float = 1e-3, seed: int = 0,
                   warmup: int = 50) -> PrivacyAdversary:
    """A fresh `PrivacyAdversary` trained for `steps` steps on the frozen model's published tokens."""
    torch.manual_seed(seed)
    attacker = PrivacyAdversary(model.embed_dim).train()
    model.eval()
    opt, schedule = _warmed_adamw(list(attacker.parameters()), lr, warmup)
    for clips, _, identity in _batches(loader, steps):
        with torch.no_grad():
            z = model.forward_features(clips)
        loss = F.cross_entropy(attacker(z), identity)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
    return attacker.eval()


@torch.no_grad()
def evaluate_privacy(model: nn.Module, attacker: PrivacyAdversary, loader: DataLoader) -> dict[str, float]:
    """Action top-1 of the model and identity hit rate of the attacker on the loader's clips."""
    model.eval()
    action_ok = identity_ok = total = 0
    for clips, action, identity in loader:
        z = model.forward_features(clips)
        action_ok += int((model.forward_head(z).argmax(dim=1) == action).sum())
        identity_ok += int(identity_hits(attacker(z), identity).sum())
        total += len(action)
    return {"action_acc": action_ok / total, "identity_acc": identity_ok / total}
