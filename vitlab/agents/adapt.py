"""ADAPT: modality-aligned action prompts for an instruction-following agent, on the instructed Reach toy.

Lin et al., "ADAPT: Vision-Language Navigation with Modality-Aligned Action Prompts" (CVPR 2022). An action prompt
is a pair (image sub-prompt, text sub-prompt); the prompts related to the instruction are retrieved from a prompt
base, encoded, and their features join the instruction features in the agent's transformer. Two auxiliary losses:

- modality alignment (`modality_alignment_loss`): symmetric InfoNCE between the image and text sub-prompt features
  of all prompts in the batch, CLIP's loss (Radford et al. 2021; open_clip `loss.ClipLoss`): with logits
  s * I T^T over the N present prompts, L = (CE(logits, arange N) + CE(logits^T, arange N)) / 2. Prompts that were
  not retrieved are masked out: they are dropped before the logits, so they contribute nothing (value or gradient).
  With none masked it equals `open_clip.loss.ClipLoss()(I, T, s)` (the test checks it).
- sequential consistency (`sequential_consistency_loss`): the agent should attend to the prompt that matters at the
  current step, in order. Our reading (no official code was found; the formula is not quoted from the paper): the
  agent's state feature is classified over its episode's present prompt features by cosine similarity / tau, the
  target being the prompt of the current phase; episodes whose target prompt is absent are skipped.

On the toy ("move the <class> to the <corner>", `reach` instruct variant) an instruction retrieves three prompts
from a base built from training data: the item ("the <class>", an exemplar image of that class from the train
file), the horizontal sub-goal ("to the left|right", the goal outline at that edge) and the vertical one ("to the
top|bottom", the outline at that edge). Retrieval is by phrase match, standing in for ADAPT's CLIP retrieval. The
expert closes the x gap, then the y gap, so the current phase's prompt is the horizontal one while x differs and the
vertical one after. During training each prompt is missing with probability 0.2 (retrieval misses). The agent is
`quarvla.TinyVLA` with the prompt features as extra tokens; the comparison is the same agent and prompts trained
with and without the two ADAPT losses, for the same optimizer steps.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import reach
from .registry import register_toy
from .quarvla import TOY_TOKENIZER, ActionTokenizer, TinyVLA, VLAConfig, token_accuracy, train_vla, vla_success

__all__ = ["modality_alignment_loss", "sequential_consistency_loss", "PromptBase", "PromptEncoder", "AdaptAgent",
           "adapt_losses", "phase_prompt", "run_arm", "run"]

N_PROMPTS = 3               # item, horizontal sub-goal, vertical sub-goal
ITEM_P, HORIZONTAL_P, VERTICAL_P = range(N_PROMPTS)


def modality_alignment_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor | float,
                            present: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE between paired image and text features (..., D) (normalise them first, as CLIP does),
    over the pairs where `present` (...) is True; 0 when none is."""
    image, text = image.reshape(-1, image.shape[-1]), text.reshape(-1, text.shape[-1])     # (N, D)
    if present is not None:
        keep = present.reshape(-1)
        image, text = image[keep], text[keep]
    if len(image) == 0:
        return image.sum() * 0.0
    logits = logit_scale * image @ text.T                                                 # (N, N) image -> text
    labels = torch.arange(len(image))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def sequential_consistency_loss(state: torch.Tensor, prompts: torch.Tensor, target: torch.Tensor,
                                present: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """Cross-entropy of the current phase's prompt `target` (B,) among the present prompts (B, P, D), scored by
    cos(state (B, D), prompt) / tau; rows whose target prompt is absent are skipped (0 when all are)."""
    sim = F.cosine_similarity(state[:, None], prompts, dim=-1) / tau                      # (B, P)
    sim = sim.masked_fill(~present, float("-inf"))
    rows = present[torch.arange(len(target)), target]
    if not rows.any():
        return sim.new_zeros(())
    return F.cross_entropy(sim[rows], target[rows])


def phase_prompt(scene: reach.Scene) -> torch.Tensor:
    """(B,) index of the prompt of the current phase: horizontal while the x gap is open, then vertical."""
    open_x = scene.goal[:, 0] != scene.target_pos[:, 0]
    return torch.where(open_x, HORIZONTAL_P, VERTICAL_P)


class PromptBase:
    """The action prompt base: exemplars of each class (train file) with "the <class>", and the edge sub-goals."""

    def __init__(self, exemplars: int = 20, seed: int = 0) -> None:
        images, labels = reach.item_bank("train")
        gen = torch.Generator().manual_seed(seed)
        rows = [torch.nonzero(labels == c).squeeze(1) for c in range(10)]
        rows = torch.stack([r[torch.randperm(len(r), generator=gen)[:exemplars]] for r in rows])   # (10, M)
        self.items = reach.resize_items(images[rows])                                  # (10, M, ITEM, ITEM)
        mid = reach.LATTICE // 2
        edge = reach.LATTICE - 1
        blank = reach.Scene(items=torch.zeros(4, 1, reach.ITEM, reach.ITEM), labels=torch.zeros(4, 1).long(),
                            pos=torch.zeros(4, 1, 2).long(),
                            goal=torch.tensor([[0, mid], [edge, mid], [mid, 0], [mid, edge]]),
                            target=torch.zeros(4).long(), corner=torch.full((4,), -1), show_goal=True)
        self.edges = reach.render(blank)                                          # left, right, top, bottom
        self.edge_words = reach.tokenize(["to the left", "to the right", "to the top", "to the bottom"])

    def retrieve(self, scene: reach.Scene, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompts of each scene's instruction: images (B, 3, 2, 40, 40) and words (B, 3, TEXT_LEN)."""
        B = len(scene.target)
        cls = scene.labels[torch.arange(B), scene.target]                          # (B,) named class
        pick = torch.randint(self.items.shape[1], (B,), generator=generator)
        item = reach.Scene(items=self.items[cls, pick][:, None], labels=cls[:, None],
                           pos=torch.full((B, 1, 2), reach.LATTICE // 2), goal=torch.zeros(B, 2).long(),
                           target=torch.zeros(B).long(), corner=torch.full((B,), -1), show_goal=False)
        item_words = reach.tokenize([f"the {reach.CLASS_WORDS[c]}" for c in cls.tolist()])
        corner = torch.tensor(list(reach.CORNERS.values()))[scene.corner]          # (B, 2) lattice corner
        horizontal = (corner[:, 0] > 0).long()                                     # 0 left, 1 right
        vertical = 2 + (corner[:, 1] > 0).long()                                   # 2 top, 3 bottom
        images = torch.stack([reach.render(item), self.edges[horizontal], self.edges[vertical]], 1)
        words = torch.stack([item_words, self.edge_words[horizontal], self.edge_words[vertical]], 1)
        return images, words


class PromptEncoder(nn.Module):
    """Image and text sub-prompt encoders (mean-pooled patch / word embeddings, then a linear map)."""

    def __init__(self, dim: int, patch: int = 10) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(2, dim, patch, patch)
        self.image_proj = nn.Linear(dim, dim)
        self.word_embed = nn.Embedding(len(reach.VOCAB), dim, padding_idx=0)
        self.text_proj = nn.Linear(dim, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))          # CLIP's initial temperature

    def forward(self, images: torch.Tensor, words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, P, 2, 40, 40), words (B, P, TEXT_LEN) -> image and text features (B, P, dim)."""
        B, P = words.shape[:2]
        img = self.patch_embed(images.flatten(0, 1)).flatten(2).mean(-1)           # (B*P, dim)
        mask = (words != 0).float()[..., None]                                     # (B, P, L, 1)
        txt = (self.word_embed(words) * mask).sum(2) / mask.sum(2).clamp(min=1)    # (B, P, dim)
        return self.image_proj(img).reshape(B, P, -1), self.text_proj(txt)


class AdaptAgent(TinyVLA):
    """TinyVLA whose extra tokens are the retrieved action prompts' features (image + text sub-prompt)."""

    def __init__(self, tokenizer: ActionTokenizer = TOY_TOKENIZER, cfg: VLAConfig = VLAConfig()) -> None:
        super().__init__(tokenizer, cfg)
        self.prompt_encoder = PromptEncoder(cfg.dim, cfg.patch)

    def act(self, images: torch.Tensor, prompt_words: torch.Tensor, present: torch.Tensor, frames: torch.Tensor,
            words: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits (B, D, bins), the state feature (B, dim: mean of the action-query outputs) and the prompt
        features (image, text, their sum) (B, P, dim)."""
        img, txt = self.prompt_encoder(images, prompt_words)
        prompt = img + txt
        logits, q = self(frames, words, extra=prompt, extra_present=present)
        return {"logits": logits, "state": q.mean(1), "image": img, "text": txt, "prompt": prompt}


def adapt_losses(out: dict[str, torch.Tensor], agent: AdaptAgent, target: torch.Tensor, present: torch.Tensor
                 ) -> dict[str, torch.Tensor]:
    """The two ADAPT losses of one batch: alignment of the normalised image/text sub-prompt features, and
    sequential consistency of the state feature with the current phase's prompt."""
    scale = agent.prompt_encoder.logit_scale.exp().clamp(max=100)
    align = modality_alignment_loss(F.normalize(out["image"], dim=-1), F.normalize(out["text"], dim=-1), scale,
                                    present)
    return {"alignment": align, "consistency": sequential_consistency_loss(out["state"], out["prompt"], target,
                                                                           present)}


def run_arm(with_losses: bool, train: reach.Episodes, test: reach.Episodes, base: PromptBase, steps: int,
            n_eval: int, seed: int, weight: float = 0.5, p_missing: float = 0.2) -> dict[str, float]:
    """Train one AdaptAgent (with or without the ADAPT losses) and score it."""
    torch.manual_seed(seed)
    agent = AdaptAgent()
    gen = torch.Generator().manual_seed(seed + 10)

    def extra_loss(model: AdaptAgent, scene, frames, words, actions):
        images, prompt_words = base.retrieve(scene, gen)
        present = torch.rand(len(words), N_PROMPTS, generator=gen) >= p_missing
        out = model.act(images, prompt_words, present, frames, words)
        if not with_losses:
            return out["logits"], torch.zeros(())
        aux = adapt_losses(out, model, phase_prompt(scene), present)
        return out["logits"], weight * (aux["alignment"] + aux["consistency"])

    eval_gen = torch.Generator().manual_seed(seed + 20)

    def act(model: AdaptAgent, scene, frames, words):
        images, prompt_words = base.retrieve(scene, eval_gen)
        present = torch.ones(len(words), N_PROMPTS, dtype=torch.bool)
        return model.act(images, prompt_words, present, frames, words)["logits"]

    start = time.perf_counter()
    losses = train_vla(agent, train, steps, seed=seed, extra_loss=extra_loss)
    return {"train_s": round(time.perf_counter() - start, 1),
            "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
            "token_acc": round(token_accuracy(agent, test, act=act), 4),
            "success": round(vla_success(agent, n_eval, seed + 2, act=act), 4)}


@register_toy("adapt", "ADAPT: action prompts with modality-alignment + sequential-consistency losses vs without")
def run(out: Path, seed: int, quick: bool) -> dict[str, float | str]:
    """The same prompted agent trained with and without the ADAPT losses for equal steps, on the instructed toy."""
    n_train, n_test, steps, n_eval = (16, 8, 3, 8) if quick else (4000, 300, 2000, 300)
    train = reach.expert_episodes(n_train, "train", instruct=True, seed=seed)
    test = reach.expert_episodes(n_test, "test", instruct=True, seed=seed + 1)
    base = PromptBase(seed=seed)
    metrics: dict[str, float | str] = {"train_episodes": n_train, "optimizer_steps": steps}
    for name, with_losses in (("adapt", True), ("plain", False)):
        for key, value in run_arm(with_losses, train, test, base, steps, n_eval, seed).items():
            metrics[f"{name}_{key}"] = value
    return metrics
