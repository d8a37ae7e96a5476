"""Sharpness-Aware Minimization (Foret et al., ICLR 2021), as used for ViTs by Chen et al. (ICLR 2022, "When Vision
Transformers Outperform ResNets without Pretraining or Strong Data Augmentations", rho = 0.05 for ViT-B/16).

One SAM step, for loss L at weights w with gradient g = grad L(w):
    e = rho * g / ||g||_2                 (the ascent to the worst-case neighbour; ||.|| over all parameters)
    g_sam = grad L(w + e)
    w <- base_optimizer step with g_sam, taken from w (not w + e)
Checked in tests/prune/test_prune.py against this formula on a quadratic, where grad L(w + e) is known in closed form.
"""
from typing import Callable

import torch

__all__ = ["SAM"]


class SAM(torch.optim.Optimizer):
    """Wraps a base optimizer: `step(closure)` where `closure()` recomputes the loss and calls backward()."""

    def __init__(self, params, base_optimizer: torch.optim.Optimizer | Callable, rho: float = 0.05, **kwargs):
        if rho < 0:
            raise ValueError(f"--sam-rho {rho} must be >= 0")
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer if isinstance(base_optimizer, torch.optim.Optimizer) else \
            base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups  # one set of groups: schedulers set lr on both
        for group in self.param_groups:
            group.setdefault("rho", rho)

    @torch.no_grad()
    def first_step(self) -> None:
        """w <- w + rho * g / ||g||."""
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.norm(torch.stack([gr.norm(2) for gr in grads]), 2) if grads else torch.tensor(0.0)
        for group in self.param_groups:
            scale = group["rho"] / (norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                e = p.grad * scale
                p.add_(e)
                self.state[p]["e"] = e

    @torch.no_grad()
    def second_step(self) -> None:
        """w <- w - e, then the base optimizer's step with the gradient taken at w + e."""
        for group in self.param_groups:
            for p in group["params"]:
                e = self.state[p].pop("e", None)
                if e is not None:
                    p.sub_(e)
        self.base_optimizer.step()

    def step(self, closure=None):
        if closure is None:
            raise ValueError("SAM needs a closure that recomputes the loss and calls backward()")
        self.first_step()
        with torch.enable_grad():
            self.zero_grad(set_to_none=True)
            loss = closure()
        self.second_step()
        return loss

    def state_dict(self):
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self.base_optimizer.load_state_dict(state_dict)
