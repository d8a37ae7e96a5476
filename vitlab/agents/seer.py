"""Seer: a predictive inverse-dynamics policy (foresight + inverse dynamics) on the Reach toy, beside behaviour cloning.

Tian et al., "Predictive Inverse Dynamics Models are Scalable Learners for Robotic Manipulation" (2024); official code
OpenRobotLab/Seer@ee228e1 (`models/seer_model.py`). Seer runs one causal transformer over per-timestep blocks
[observation tokens, foresight tokens, action token]. The foresight tokens of step t are decoded into the frame at
t+1 (the "foresight", an MSE loss on pixels); the action token of step t reads the observations up to t and that
foresight, so its head is an inverse-dynamics model conditioned on the predicted future. The attention mask
(`generate_attention_mask` there, with `atten_goal=0`, `atten_only_obs=False`), from a query of step t and kind q to
a key of step s and kind k:

    allowed  <=>  s <= t  and  (k is an observation  or  (q is the action, k a foresight token and s == t))

i.e. nobody attends to a later step, foresight and action tokens are never keys except the action token reading its
own step's foresight, and observation tokens attend to all observations of steps <= t (both directions within a
step: the official GPT-2 copy, `models/gpt2.py`, drops GPT-2's own causal mask). `block_causal_mask` computes it in
one vectorised expression; the tests compare it with a brute-force loop and with the official function's output.

Here a frame (2 x 40 x 40, `reach.render`) is cut into 10x10 patches (16 observation tokens), one foresight token
predicts the next frame's item channel at 20x20, and the inverse-dynamics head maps (action token, current frame,
future frame) to one of the 5 actions. The future frame is the foresight's prediction when acting; given the true
future frame instead (teacher forcing, trained alongside, with the action token zeroed in `id_token_drop` of the
rows so the head cannot answer from the current frame alone) the same head measures how well inverse dynamics
recovers the expert's action. The behaviour-cloning baseline is the same transformer and embeddings with blocks
[observations, action] and an action head on the action token alone, trained on the same demonstrations for the
same number of optimizer steps.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Block

from . import reach
from .registry import register_toy

__all__ = ["OBS", "FORESIGHT", "ACTION", "token_layout", "block_causal_mask", "SeerPolicy", "SeerConfig",
           "windows", "seer_losses", "train_policy", "action_accuracy", "success_rate", "run"]

OBS, FORESIGHT, ACTION = 0, 1, 2
FUTURE = (reach.CANVAS // 2) ** 2       # the foresight target: the next frame's item channel at 20x20 (400 pixels)


def token_layout(steps: int, n_obs: int, n_foresight: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(step (L,), kind (L,)) of each token of the sequence [obs * n_obs, foresight * n_foresight, action] * steps."""
    kinds = torch.tensor([OBS] * n_obs + [FORESIGHT] * n_foresight + [ACTION])
    block = len(kinds)
    return torch.arange(steps).repeat_interleave(block), kinds.repeat(steps)


def block_causal_mask(steps: int, n_obs: int, n_foresight: int = 1) -> torch.Tensor:
    """Seer's attention mask (L, L) bool, True where query i may attend to key j (see the module docstring)."""
    step, kind = token_layout(steps, n_obs, n_foresight)
    q_step, k_step = step[:, None], step[None, :]
    q_kind, k_kind = kind[:, None], kind[None, :]
    own_foresight = (q_kind == ACTION) & (k_kind == FORESIGHT) & (k_step == q_step)
    return (k_step <= q_step) & ((k_kind == OBS) | own_foresight)


def _small(frames: torch.Tensor) -> torch.Tensor:
    """(..., 2, 40, 40) frames -> (..., 400): the item channel average-pooled to 20x20 (the foresight's target)."""
    lead = frames.shape[:-3]
    x = F.avg_pool2d(frames.reshape(-1, 2, reach.CANVAS, reach.CANVAS)[:, :1], 2)     # (N, 1, 20, 20)
    return x.reshape(*lead, FUTURE)


@dataclass(frozen=True)
class SeerConfig:
    foresight: bool = True      # False: the behaviour-cloning baseline (no foresight token, no inverse dynamics)
    steps: int = 2              # frames in the context window (t-1, t)
    dim: int = 64
    depth: int = 2
    heads: int = 4
    patch: int = 10
    fore_weight: float = 0.05   # weight of the foresight MSE (summed over the 400 pixels) beside the action CEs
    id_token_drop: float = 0.5  # training: chance the teacher-forced ID branch sees a zero action token (see forward)


class SeerPolicy(nn.Module):
    """Block-causal transformer over `steps` frames with foresight and action tokens (or actions only, for BC)."""

    def __init__(self, cfg: SeerConfig = SeerConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.n_obs = (reach.CANVAS // cfg.patch) ** 2
        self.n_foresight = 1 if cfg.foresight else 0
        self.patch_embed = nn.Conv2d(2, dim, cfg.patch, cfg.patch)
        self.pos_embed = nn.Parameter(torch.randn(1, 1, self.n_obs, dim) * 0.02)
        self.step_embed = nn.Parameter(torch.randn(1, cfg.steps, 1, dim) * 0.02)
        self.foresight_query = nn.Parameter(torch.randn(1, 1, self.n_foresight, dim) * 0.02)
        self.action_query = nn.Parameter(torch.randn(1, 1, 1, dim) * 0.02)
        self.blocks = nn.ModuleList([Block(dim, cfg.heads, mlp_ratio=2.0, qkv_bias=True) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(dim)
        self.register_buffer("mask", block_causal_mask(cfg.steps, self.n_obs, self.n_foresight), persistent=False)
        if cfg.foresight:
            self.foresight_head = nn.Linear(dim, FUTURE)
            self.frame_embed = nn.Linear(FUTURE, dim)                   # embeds a (true or predicted) small frame
            self.action_head = Mlp(3 * dim, dim, len(reach.ACTIONS))    # inverse dynamics: (token, o_t, o_t+1)
        else:
            self.action_head = Mlp(dim, dim, len(reach.ACTIONS))

    def forward(self, frames: torch.Tensor, future: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """frames (B, S, 2, 40, 40) -> per step: `logits` (B, S, 5) and, with foresight, `future_pred` (B, S, 400);
        with `future` (B, S, 2, 40, 40) the true next frames, also `logits_true` (B, S, 5) from inverse dynamics."""
        B, S = frames.shape[:2]
        x = self.patch_embed(frames.flatten(0, 1))                       # (B*S, D, 4, 4)
        x = x.flatten(2).transpose(1, 2).reshape(B, S, self.n_obs, -1)   # (B, S, 16, D)
        x = x + self.pos_embed
        tokens = [x, self.foresight_query.expand(B, S, -1, -1), self.action_query.expand(B, S, -1, -1)]
        x = torch.cat(tokens, dim=2) + self.step_embed                   # (B, S, 16 + F + 1, D)
        x = x.flatten(1, 2)                                              # (B, L, D), L = S * (16 + F + 1)
        for block in self.blocks:
            x = block(x, attn_mask=self.mask)
        x = self.norm(x).reshape(B, S, self.n_obs + self.n_foresight + 1, -1)
        act = x[:, :, -1]                                                # (B, S, D) action tokens
        if not self.cfg.foresight:
            return {"logits": self.action_head(act)}
        future_pred = self.foresight_head(x[:, :, self.n_obs])           # (B, S, 400)
        now = self.frame_embed(_small(frames))                           # (B, S, D)
        out = {"future_pred": future_pred,
               "logits": self.action_head(torch.cat([act, now, self.frame_embed(future_pred)], -1))}
        if future is not None:
            # On expert data the action token alone predicts the action (the expert is a function of the frame), so
            # a head trained only with it ignores the future and repeats the policy's errors. Zeroing the token in
            # a random `id_token_drop` share of the teacher-forced rows makes the head learn the action from
            # (o_t, o_t+1), i.e. inverse dynamics proper; the acting branch always sees the token.
            act_id = act
            if self.training and self.cfg.id_token_drop > 0:
                keep = torch.rand(B, 1, 1, device=act.device) >= self.cfg.id_token_drop     # (B, 1, 1)
                act_id = act * keep.to(act.dtype)
            out["logits_true"] = self.action_head(torch.cat([act_id, now, self.frame_embed(_small(future))], -1))
        return out


def windows(ep: reach.Episodes, rows: torch.Tensor, steps: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Frames (B, S, 2, 40, 40), their next frames (B, S, 2, 40, 40), actions (B, S) and validity (B, S) of the
    windows ending at the transitions `rows` (B, 2) = (episode, t); steps before t = 0 repeat the first frame and
    are not scored."""
    e, t = rows[:, 0], rows[:, 1]
    ts = t[:, None] + torch.arange(-steps + 1, 1)                       # (B, S) times of the window
    valid = ts >= 0
    ts = ts.clamp(min=0)
    sub = ep.scene.select(e)
    now = torch.stack([reach.frames(sub, ep.pos[e, ts[:, s]]) for s in range(steps)], 1)
    nxt = torch.stack([reach.frames(sub, ep.pos[e, ts[:, s] + 1]) for s in range(steps)], 1)
    return now, nxt, ep.actions[e[:, None], ts], valid


def seer_losses(model: SeerPolicy, now: torch.Tensor, nxt: torch.Tensor, actions: torch.Tensor,
                valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Seer's losses on valid window steps: foresight MSE (pixels of the next frame, summed over pixels) and the
    inverse-dynamics cross-entropy given the predicted future, plus the same head given the true future
    (teacher-forced); BC has the action cross-entropy only. `loss` is their weighted sum."""
    out = model(now, nxt if model.cfg.foresight else None)
    a = actions[valid]
    losses = {"action": F.cross_entropy(out["logits"][valid], a)}
    if model.cfg.foresight:
        losses["foresight"] = (out["future_pred"][valid] - _small(nxt)[valid]).pow(2).sum(-1).mean()
        losses["inverse_true"] = F.cross_entropy(out["logits_true"][valid], a)
        losses["loss"] = losses["action"] + losses["inverse_true"] + model.cfg.fore_weight * losses["foresight"]
    else:
        losses["loss"] = losses["action"]
    return losses


def train_policy(model: SeerPolicy, ep: reach.Episodes, steps: int, batch: int = 64, lr: float = 1e-3,
                 seed: int = 0) -> list[float]:
    """AdamW with a cosine schedule for `steps` steps on random expert transitions; returns the loss per step."""
    gen = torch.Generator().manual_seed(seed)
    rows = ep.transitions()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    history = []
    model.train()
    for _ in range(steps):
        pick = rows[torch.randint(len(rows), (batch,), generator=gen)]
        loss = seer_losses(model, *windows(ep, pick, model.cfg.steps))["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history.append(loss.item())
    return history


@torch.no_grad()
def action_accuracy(model: SeerPolicy, ep: reach.Episodes, batch: int = 256) -> dict[str, float]:
    """Accuracy of the expert's action at every transition of `ep`: `policy` (acting head: foresight + inverse
    dynamics, or BC) and, with foresight, `inverse_true` (inverse dynamics given the true next frame)."""
    model.eval()
    rows = ep.transitions()
    hits = {"policy": 0, "inverse_true": 0}
    for i in range(0, len(rows), batch):
        now, nxt, actions, _ = windows(ep, rows[i:i + batch], model.cfg.steps)
        out = model(now, nxt if model.cfg.foresight else None)
        hits["policy"] += int((out["logits"][:, -1].argmax(-1) == actions[:, -1]).sum())
        if model.cfg.foresight:
            hits["inverse_true"] += int((out["logits_true"][:, -1].argmax(-1) == actions[:, -1]).sum())
    keys = ("policy", "inverse_true") if model.cfg.foresight else ("policy",)
    return {k: hits[k] / len(rows) for k in keys}


@torch.no_grad()
def success_rate(model: SeerPolicy, episodes: int, seed: int) -> float:
    """Closed-loop success rate on `episodes` fresh test-split scenes (items the model never saw)."""
    model.eval()
    scene = reach.reset(episodes, "test", instruct=False, generator=torch.Generator().manual_seed(seed))

    def policy(scene: reach.Scene, history: list[torch.Tensor]) -> torch.Tensor:
        window = [history[0]] * max(0, model.cfg.steps - len(history)) + history[-model.cfg.steps:]
        logits = model(torch.stack(window, 1))["logits"][:, -1]
        return reach.ACTIONS[logits.argmax(-1)]

    return float(reach.rollout(policy, scene).float().mean())


@register_toy("seer", "Seer: foresight + inverse-dynamics policy vs behaviour cloning (Reach, Fashion-MNIST items)")
def run(out: Path, seed: int, quick: bool) -> dict[str, float | str]:
    """Train Seer and the BC baseline on the same expert demonstrations for the same steps; score both."""
    n_train, n_test, steps, n_eval = (16, 8, 3, 8) if quick else (3000, 300, 1200, 300)
    train = reach.expert_episodes(n_train, "train", instruct=False, seed=seed)
    test = reach.expert_episodes(n_test, "test", instruct=False, seed=seed + 1)
    metrics: dict[str, float | str] = {"train_episodes": n_train, "optimizer_steps": steps}
    for name, cfg in (("seer", SeerConfig(foresight=True)), ("bc", SeerConfig(foresight=False))):
        torch.manual_seed(seed)
        model = SeerPolicy(cfg)
        start = time.perf_counter()
        losses = train_policy(model, train, steps, batch=32, seed=seed)
        metrics[f"{name}_params"] = sum(p.numel() for p in model.parameters())
        metrics[f"{name}_train_s"] = round(time.perf_counter() - start, 1)
        metrics[f"{name}_final_loss"] = round(sum(losses[-20:]) / len(losses[-20:]), 4)
        acc = action_accuracy(model, test)
        metrics[f"{name}_action_acc"] = round(acc["policy"], 4)
        if "inverse_true" in acc:
            metrics["seer_inverse_true_acc"] = round(acc["inverse_true"], 4)
        metrics[f"{name}_success"] = round(success_rate(model, n_eval, seed + 2), 4)
    return metrics
