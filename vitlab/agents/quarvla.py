"""QUAR-VLA: a vision-language-action model that predicts discretised action tokens, on the instructed Reach toy.

Ding et al., "QUAR-VLA: Vision-Language-Action Model for Quadruped Robots" (2023). QUART maps an image and an
instruction to actions through a transformer whose outputs are action tokens: every continuous action dimension is
cut into uniform bins (as in RT-2) and the model classifies each dimension's bin; the bin centres are executed.

`ActionTokenizer` is that discretiser: `encode` clamps each dimension to [low, high] and returns
floor((a - low) / width), the top edge falling into the last bin; `decode` returns the bin centres, so a round trip
is within half a bin of the clamped action. `TinyVLA` is the model: ViT patch tokens of the frame (10x10
patches of the 40x40 frame), word tokens of the instruction, optional extra tokens (ADAPT's action prompts), and one
query token per action dimension, through timm transformer blocks (padding keys masked); each query's output is
classified over the bins. On the toy an action is the target's move (dx, dy) in lattice steps, tokenised with 3
bins per dimension over [-1.5, 1.5] (centres -1, 0, 1: the toy's moves; QUART's 256 bins would only add classes no
expert ever uses). The model is trained by cross-entropy on the expert's tokens and scored by closed-loop success
on test-split items, beside the same model given another scene's instruction (does it follow the words?).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from . import reach
from .registry import register_toy

__all__ = ["ActionTokenizer", "TOY_TOKENIZER", "TinyVLA", "VLAConfig", "vla_batch", "train_vla", "vla_success",
           "token_accuracy", "run"]


@dataclass(frozen=True)
class ActionTokenizer:
    """Uniform per-dimension action bins: `bins` bins over [low[d], high[d]] for each action dimension d."""
    low: tuple[float, ...]
    high: tuple[float, ...]
    bins: int = 256

    def __post_init__(self) -> None:
        if len(self.low) != len(self.high) or not all(h > lo for lo, h in zip(self.low, self.high)):
            raise ValueError(f"need low < high per dimension, got low={self.low} high={self.high}")
        if self.bins < 1:
            raise ValueError(f"bins must be >= 1, got {self.bins}")

    @property
    def dims(self) -> int:
        return len(self.low)

    @property
    def width(self) -> torch.Tensor:
        """(D,) bin width per dimension."""
        return (torch.tensor(self.high) - torch.tensor(self.low)) / self.bins

    def encode(self, actions: torch.Tensor) -> torch.Tensor:
        """actions (..., D) float -> tokens (..., D) long in [0, bins): floor((clamp(a) - low) / width)."""
        low, high = torch.tensor(self.low), torch.tensor(self.high)
        a = torch.maximum(torch.minimum(actions.float(), high), low)
        return torch.floor((a - low) / self.width).long().clamp(0, self.bins - 1)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (..., D) -> the bin centres (..., D): low + (token + 0.5) * width."""
        return torch.tensor(self.low) + (tokens.float() + 0.5) * self.width


TOY_TOKENIZER = ActionTokenizer(low=(-1.5, -1.5), high=(1.5, 1.5), bins=3)    # (dx, dy) lattice steps


@dataclass(frozen=True)
class VLAConfig:
    dim: int = 64
    depth: int = 2
    heads: int = 4
    patch: int = 10


class TinyVLA(nn.Module):
    """Image + instruction (+ extra tokens) -> action-token logits (B, D, bins)."""

    def __init__(self, tokenizer: ActionTokenizer = TOY_TOKENIZER, cfg: VLAConfig = VLAConfig()) -> None:
        super().__init__()
        self.tokenizer, self.cfg = tokenizer, cfg
        dim = cfg.dim
        self.n_img = (reach.CANVAS // cfg.patch) ** 2
        self.patch_embed = nn.Conv2d(2, dim, cfg.patch, cfg.patch)
        self.img_pos = nn.Parameter(torch.randn(1, self.n_img, dim) * 0.02)
        self.word_embed = nn.Embedding(len(reach.VOCAB), dim, padding_idx=0)
        self.text_pos = nn.Parameter(torch.randn(1, reach.TEXT_LEN, dim) * 0.02)
        self.extra_type = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.action_queries = nn.Parameter(torch.randn(1, tokenizer.dims, dim) * 0.02)
        self.blocks = nn.ModuleList([Block(dim, cfg.heads, mlp_ratio=2.0, qkv_bias=True) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, tokenizer.bins)

    def forward(self, frames: torch.Tensor, words: torch.Tensor, extra: torch.Tensor | None = None,
                extra_present: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """frames (B, 2, 40, 40), words (B, TEXT_LEN), extra (B, P, dim) with extra_present (B, P) bool ->
        (logits (B, D, bins), action-query features (B, D, dim))."""
        B = len(frames)
        img = self.patch_embed(frames).flatten(2).transpose(1, 2) + self.img_pos      # (B, n_img, dim)
        txt = self.word_embed(words) + self.text_pos                                   # (B, TEXT_LEN, dim)
        parts, keep = [img, txt], [torch.ones(B, self.n_img, dtype=torch.bool), words != 0]
        if extra is not None:
            parts.append(extra + self.extra_type)
            keep.append(extra_present if extra_present is not None else torch.ones(extra.shape[:2], dtype=torch.bool))
        parts.append(self.action_queries.expand(B, -1, -1))
        keep.append(torch.ones(B, self.tokenizer.dims, dtype=torch.bool))
        x = torch.cat(parts, 1)                                                        # (B, L, dim)
        mask = torch.cat(keep, 1)[:, None, None, :]                                    # (B, 1, 1, L) keys to attend
        for block in self.blocks:
            x = block(x, attn_mask=mask)
        q = self.norm(x[:, -self.tokenizer.dims:])                                     # (B, D, dim)
        return self.head(q), q


def vla_batch(ep: reach.Episodes, rows: torch.Tensor) -> tuple[reach.Scene, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scenes, frames (B, 2, 40, 40), instruction words (B, TEXT_LEN), expert action index (B,)) at the
    transitions `rows` (B, 2) = (episode, t)."""
    e, t = rows[:, 0], rows[:, 1]
    scene = ep.scene.select(e)
    scene = replace(scene, pos=ep.pos[e, t])
    return scene, reach.render(scene), reach.tokenize(reach.instructions(scene)), ep.actions[e, t]


def train_vla(model: TinyVLA, ep: reach.Episodes, steps: int, batch: int = 64, lr: float = 1e-3, seed: int = 0,
              extra_loss=None) -> list[float]:
    """AdamW + cosine on random expert transitions: cross-entropy of the expert's action tokens, plus
    `extra_loss(model, scene, frames, words, actions) -> (logits, loss)` when given (ADAPT), which then also
    computes the logits. Returns the loss per step."""
    gen = torch.Generator().manual_seed(seed)
    rows = ep.transitions()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    history = []
    model.train()
    for _ in range(steps):
        scene, frames, words, actions = vla_batch(ep, rows[torch.randint(len(rows), (batch,), generator=gen)])
        target = model.tokenizer.encode(reach.ACTIONS[actions])                       # (B, D)
        if extra_loss is None:
            logits, aux = model(frames, words)[0], torch.zeros(())
        else:
            logits, aux = extra_loss(model, scene, frames, words, actions)
        loss = F.cross_entropy(logits.flatten(0, 1), target.flatten()) + aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history.append(loss.item())
    return history


def _moves(model: TinyVLA, logits: torch.Tensor) -> torch.Tensor:
    """Action-token logits (B, D, bins) -> executed lattice moves (B, 2): decoded bin centres, rounded."""
    return model.tokenizer.decode(logits.argmax(-1)).round().long()


@torch.no_grad()
def token_accuracy(model: TinyVLA, ep: reach.Episodes, act=None) -> float:
    """Share of `ep`'s transitions whose every action token equals the expert's; `act(model, scene, frames, words)`
    -> logits overrides the plain forward (ADAPT adds its prompts)."""
    model.eval()
    scene, frames, words, actions = vla_batch(ep, ep.transitions())
    logits = act(model, scene, frames, words) if act else model(frames, words)[0]
    return float((logits.argmax(-1) == model.tokenizer.encode(reach.ACTIONS[actions])).all(-1).float().mean())


@torch.no_grad()
def vla_success(model: TinyVLA, episodes: int, seed: int, shuffle_instructions: bool = False, act=None) -> float:
    """Closed-loop success on fresh test-split scenes; `shuffle_instructions` gives each scene the instruction of
    the next scene (success still judged by its own), to check that the model follows the words."""
    model.eval()
    scene = reach.reset(episodes, "test", instruct=True, generator=torch.Generator().manual_seed(seed))
    shown = scene.select(torch.roll(torch.arange(episodes), 1)) if shuffle_instructions else scene
    words = reach.tokenize(reach.instructions(shown))

    def policy(scene: reach.Scene, history: list[torch.Tensor]) -> torch.Tensor:
        logits = act(model, shown, history[-1], words) if act else model(history[-1], words)[0]
        return _moves(model, logits)

    return float(reach.rollout(policy, scene).float().mean())


@register_toy("quar-vla", "QUAR-VLA: image + instruction -> discretised action tokens (instructed Reach)")
def run(out: Path, seed: int, quick: bool) -> dict[str, float | str]:
    """Train TinyVLA on expert demonstrations of the instructed toy; report token accuracy and success rates."""
    n_train, n_test, steps, n_eval = (16, 8, 3, 8) if quick else (4000, 300, 2000, 300)
    train = reach.expert_episodes(n_train, "train", instruct=True, seed=seed)
    test = reach.expert_episodes(n_test, "test", instruct=True, seed=seed + 1)
    torch.manual_seed(seed)
    model = TinyVLA()
    start = time.perf_counter()
    losses = train_vla(model, train, steps, seed=seed)
    return {"train_episodes": n_train, "optimizer_steps": steps, "bins": model.tokenizer.bins,
            "params": sum(p.numel() for p in model.parameters()),
            "train_s": round(time.perf_counter() - start, 1),
            "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
            "token_acc": round(token_accuracy(model, test), 4),
            "success": round(vla_success(model, n_eval, seed + 2), 4),
            "success_wrong_instruction": round(vla_success(model, n_eval, seed + 2, shuffle_instructions=True), 4)}
