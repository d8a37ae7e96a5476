"""ADI: layer-wise identifier tokens + gradient masking teach a conditional diffusion model an action.

Huang et al., "Learning Disentangled Identifiers for Action-Customized Text-to-Image Generation" (CVPR 2024,
arXiv 2311.15841, project adi-t2i.github.io/ADI). The abstract: "ADI first expands the semantic conditioning space
by introducing layer-wise identifier tokens, thereby increasing the representational richness while distributing the
inversion across different features. Then, to block the inversion of action-agnostic features, ADI extracts the
gradient invariance from the constructed sample triples and masks the updates of irrelevant channels." No official
code was found (none in the indexed repositories); the rule below is the paper's Sec. 3 as we read it:

- **Layer-wise identifier tokens.** Instead of one new word embedding shared by every cross-attention layer (textual
  inversion), one identifier embedding per conditioning layer is learned (the P+ conditioning space).
- **Gradient mask from a triple.** For an anchor exemplar x_a of the action, a *context-different* sample x_c (same
  action, other subject/context: another exemplar) and an *action-different* sample x_p (same subject/context, other
  action) are fed with the same identifier; g_a, g_c, g_p are the identifier's gradients of the denoising loss.
  x_a and x_c share only the action, so channels whose gradient differs most between them, the largest
  |g_a - g_c|, carry context: they are masked. x_a and x_p share only the context, so channels whose gradient
  hardly changes with the action, the smallest |g_a - g_p|, are action-agnostic: they are masked too. Per
  identifier token a fraction `mask_rate` (beta) of channels is taken from each end; the identifier is updated with
  g_a where neither rule masks (`gradient_mask`). The direction matters: masking the *small* |g_a - g_c| or the
  *large* |g_a - g_p| would keep exactly the context channels the method means to block.

The toy (`vitlab toy adi`): a class-conditional diffusion model on 16x16 Fashion-MNIST items, diffusers'
`UNet2DModel` (FiLM "scale_shift" time conditioning, no attention) + `DDPMScheduler` (cosine schedule), sampled with
`DDIMScheduler` and classifier-free guidance. Its conditioning is a subject word (the item class, added to the time
embedding once, as `class_embed_type="identity"` does) and an action token added to the time embedding at each
conditioning layer (each `ResnetBlock2D`): the analogue of a prompt's words reaching every cross-attention layer.
Items are shown under four actions, upright, rotated 90 degrees clockwise, rotated 90 degrees counter-clockwise and
upside down, each with its word (and the null word, "any action", for guidance). The clockwise rotation (`TARGET`)
is then learned without its word, starting from the null word, from 8 exemplars showing items of 2 classes rotated
(`make_exemplars`), with the subject word left null, so the identifier is free to absorb the exemplars' subjects; it
is scored on the 8 *other* classes by a classifier trained here on real items: "action present" (the classifier
sees the clockwise rotation) and "subject kept" (it sees the prompted class). Single-token textual inversion is the
baseline, at equal optimizer steps from the same initialisation (the null action word).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import create_model
from .reach import item_bank
from .registry import register_toy

__all__ = ["SIDE", "ACTIONS", "TARGET", "transform", "transform_batch", "load_items", "DiffusionConfig",
           "ConditionedUNet", "make_scheduler", "train_diffusion", "sample", "Identifier", "gradient_mask",
           "InversionConfig", "Exemplars", "make_exemplars", "invert", "train_classifier", "score", "ARMS",
           "train_models", "compare_arms", "run"]

SIDE = 16                                                       # image side (px)
ACTIONS = ("upright", "rotate-cw", "rotate-ccw", "upside-down")
TARGET = 1                                                      # the action to customise (its word is unused)
N_CLASSES = 10
NULL_SUBJECT = N_CLASSES                                        # subject word ids 0..9 + null
NULL_ACTION = len(ACTIONS)                                      # action word ids: the action's index, + null


def transform(x: torch.Tensor, action: int) -> torch.Tensor:
    """Apply ACTIONS[action] to images (..., H, W)."""
    if action == 0:
        return x
    if action == 1:
        return torch.rot90(x, -1, (-2, -1))                       # clockwise
    if action == 2:
        return torch.rot90(x, 1, (-2, -1))
    if action == 3:
        return torch.flip(x, (-2,))
    raise ValueError(f"action must be 0..{len(ACTIONS) - 1}, got {action}")


def transform_batch(x: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """x (B, 1, H, W), actions (B,) -> each image under its own action."""
    out = x.clone()
    for a in range(len(ACTIONS)):
        sel = actions == a
        if sel.any():
            out[sel] = transform(x[sel], a)
    return out


@lru_cache(maxsize=2)
def load_items(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST items of the `split` file at SIDE x SIDE in [-1, 1]: (N, 1, SIDE, SIDE), labels (N,) (cached:
    callers index them, which copies)."""
    images, labels = item_bank(split)
    x = F.interpolate(images[:, None].float() / 255, size=(SIDE, SIDE), mode="bilinear", antialias=True,
                      align_corners=False)
    return x.clamp(0, 1) * 2 - 1, labels


# --- the conditional diffusion model ---------------------------------------------------------------------------

@dataclass(frozen=True)
class DiffusionConfig:
    channels: tuple[int, ...] = (32, 64)    # UNet2DModel block_out_channels; the token width is 4 * channels[0]
    layers_per_block: int = 1
    timesteps: int = 1000
    p_drop: float = 0.15                    # each word is replaced by its null word with this probability (CFG)


class ConditionedUNet(nn.Module):
    """diffusers `UNet2DModel` conditioned on a subject word and one action token per conditioning layer.

    The subject word's embedding is added to the time embedding once (`class_embed_type="identity"`); the action
    tokens (B, L, D) are added to the time embedding that conditioning layer l (the l-th `ResnetBlock2D`, in forward
    order) receives, by a forward pre-hook. A word gives the same token to every layer; an ADI identifier one each.
    """

    def __init__(self, cfg: DiffusionConfig = DiffusionConfig()):
        super().__init__()
        from diffusers import UNet2DModel
        from diffusers.models.resnet import ResnetBlock2D

        self.cfg = cfg
        n = len(cfg.channels)
        self.unet = UNet2DModel(sample_size=SIDE, in_channels=1, out_channels=1, block_out_channels=cfg.channels,
                                layers_per_block=cfg.layers_per_block, down_block_types=("DownBlock2D",) * n,
                                up_block_types=("UpBlock2D",) * n, norm_num_groups=8, add_attention=False,
                                class_embed_type="identity", resnet_time_scale_shift="scale_shift")
        self.dim = 4 * cfg.channels[0]                                    # UNet2DModel's time-embedding width
        self.subject_words = nn.Embedding(N_CLASSES + 1, self.dim)
        self.action_words = nn.Embedding(len(ACTIONS) + 1, self.dim)
        layers = [m for m in self.unet.modules() if isinstance(m, ResnetBlock2D)]
        self.n_layers = len(layers)
        for index, layer in enumerate(layers):
            layer.register_forward_pre_hook(partial(self._inject, index), with_kwargs=True)
        self._tokens: torch.Tensor | None = None

    def _inject(self, index: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """temb -> temb + tokens[:, index] for conditioning layer `index`."""
        if self._tokens is None:
            raise RuntimeError("ConditionedUNet's layers were called outside its forward")
        token = self._tokens[:, index]                                    # (B, D)
        if "temb" in kwargs:
            kwargs = {**kwargs, "temb": kwargs["temb"] + token}
        else:
            args = (args[0], args[1] + token, *args[2:])
        return args, kwargs

    def word_tokens(self, action_words: torch.Tensor) -> torch.Tensor:
        """(B,) action word ids -> (B, L, D): the word's embedding at every layer."""
        return self.action_words(action_words)[:, None].expand(-1, self.n_layers, -1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, subject: torch.Tensor, tokens: torch.Tensor
                ) -> torch.Tensor:
        """Predicted noise for x (B, 1, S, S) at steps t (B,), subject word ids (B,), action tokens (B, L, D)."""
        self._tokens = tokens
        try:
            return self.unet(x, t, class_labels=self.subject_words(subject)).sample
        finally:
            self._tokens = None


def make_scheduler(timesteps: int = 1000):
    """The training schedule: diffusers `DDPMScheduler`, cosine ("squaredcos_cap_v2") betas, epsilon prediction."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=timesteps, beta_schedule="squaredcos_cap_v2")


def train_diffusion(model: ConditionedUNet, images: torch.Tensor, labels: torch.Tensor, steps: int,
                    batch: int = 32, lr: float = 2e-3, seed: int = 0) -> list[float]:
    """Epsilon-MSE training on items under random actions, captioned (class word, action word); each word is
    dropped to its null word with probability `p_drop` (classifier-free guidance)."""
    gen = torch.Generator().manual_seed(seed)
    sched = make_scheduler(model.cfg.timesteps)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    lr_sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.05)
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        actions = torch.randint(0, len(ACTIONS), (batch,), generator=gen)
        x0 = transform_batch(images[idx], actions)
        subject = torch.where(torch.rand(batch, generator=gen) < model.cfg.p_drop, NULL_SUBJECT, labels[idx])
        words = torch.where(torch.rand(batch, generator=gen) < model.cfg.p_drop, NULL_ACTION, actions)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, model.cfg.timesteps, (batch,), generator=gen)
        loss = F.mse_loss(model(sched.add_noise(x0, noise, t), t, subject, model.word_tokens(words)), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_sched.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def sample(model: ConditionedUNet, subject: torch.Tensor, tokens: torch.Tensor, steps: int = 25,
           cfg_scale: float = 3.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """DDIM (eta 0, diffusers `DDIMScheduler`) with classifier-free guidance against (null subject, null action):
    eps_u + s (eps_c - eps_u). subject (B,), tokens (B, L, D) -> images (B, 1, S, S) in [-1, 1]."""
    from diffusers import DDIMScheduler

    model.eval()
    ddim = DDIMScheduler.from_config(make_scheduler(model.cfg.timesteps).config)
    ddim.set_timesteps(steps)
    b = len(subject)
    null_subject = torch.full_like(subject, NULL_SUBJECT)
    null_tokens = model.word_tokens(torch.full_like(subject, NULL_ACTION))
    x = torch.randn((b, 1, SIDE, SIDE), generator=generator)
    for t in ddim.timesteps:
        tt = torch.full((2 * b,), int(t))
        eps_c, eps_u = model(torch.cat([x, x]), tt, torch.cat([subject, null_subject]),
                             torch.cat([tokens, null_tokens])).chunk(2)
        x = ddim.step(eps_u + cfg_scale * (eps_c - eps_u), t, x).prev_sample
    return x


# --- ADI: identifiers, the gradient mask, inversion -------------------------------------------------------------

class Identifier(nn.Module):
    """A learned action token: one embedding per conditioning layer (ADI) or one shared by all (textual inversion)."""

    def __init__(self, init: torch.Tensor, n_layers: int, layerwise: bool):
        super().__init__()
        self.n_layers = n_layers
        self.tokens = nn.Parameter(init.detach().clone().reshape(1, -1).repeat(n_layers if layerwise else 1, 1))

    def forward(self, batch: int) -> torch.Tensor:
        """(batch, L, D): row l is layer l's token (the single token repeated when not layer-wise)."""
        return self.tokens.expand(self.n_layers, -1)[None].expand(batch, -1, -1)


def gradient_mask(g_anchor: torch.Tensor, g_context: torch.Tensor, g_action: torch.Tensor, mask_rate: float
                  ) -> torch.Tensor:
    """ADI's update mask (True = the channel is updated) for identifier gradients (..., D), per token (last dim).

    Masked: the round(mask_rate * D) channels with the largest |g_anchor - g_context| (anchor and context-different
    sample share the action: what differs is context) and the round(mask_rate * D) channels with the smallest
    |g_anchor - g_action| (anchor and action-different sample share the context: what stays is action-agnostic).
    """
    k = round(mask_rate * g_anchor.shape[-1])
    keep = torch.ones_like(g_anchor, dtype=torch.bool)
    if k == 0:
        return keep
    context = torch.topk((g_anchor - g_context).abs(), k, dim=-1).indices
    agnostic = torch.topk((g_anchor - g_action).abs(), k, dim=-1, largest=False).indices
    keep.scatter_(-1, context, False)
    keep.scatter_(-1, agnostic, False)
    return keep


@dataclass(frozen=True)
class InversionConfig:
    layerwise: bool = True              # ADI's layer-wise tokens; False = one token (textual inversion)
    mask_rate: float | None = 0.25      # ADI's beta; None = no gradient mask
    steps: int = 200
    batch: int = 8
    lr: float = 2e-2


@dataclass(frozen=True)
class Exemplars:
    items: torch.Tensor       # (N, 1, S, S) the exemplar items, upright
    labels: torch.Tensor      # (N,) their classes (the exemplars' subjects)


def make_exemplars(images: torch.Tensor, labels: torch.Tensor, classes: tuple[int, ...], per_class: int,
                   seed: int) -> Exemplars:
    """`per_class` random items of each of `classes`; the exemplars of the action are these items under TARGET."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.cat([torch.nonzero(labels == c)[:, 0][torch.randperm(int((labels == c).sum()), generator=gen)
                                                       [:per_class]] for c in classes])
    return Exemplars(images[idx], labels[idx])


def _triples(ex: Exemplars, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(anchor, context-different, action-different), each (B, 1, S, S): an exemplar under TARGET; another
    exemplar of a different class under TARGET; the anchor's own item under a random other action."""
    a = torch.randint(0, len(ex.items), (batch,), generator=gen)
    other = torch.stack([torch.nonzero(ex.labels != ex.labels[i])[:, 0] for i in a.tolist()])   # (B, M)
    c = other[torch.arange(batch), torch.randint(0, other.shape[1], (batch,), generator=gen)]
    others = torch.tensor([k for k in range(len(ACTIONS)) if k != TARGET])
    p = others[torch.randint(0, len(others), (batch,), generator=gen)]
    anchor = transform(ex.items[a], TARGET)
    return anchor, transform(ex.items[c], TARGET), transform_batch(ex.items[a], p)


def invert(model: ConditionedUNet, ex: Exemplars, cfg: InversionConfig, seed: int = 0
           ) -> tuple[Identifier, list[float]]:
    """Learn an identifier for TARGET from the exemplars with the model frozen (prompt: null subject + identifier).

    Each step draws `batch` triples and one (t, noise) per triple, shared by its three samples. Without a mask the
    update is the anchors' loss gradient; with one it is g_anchor masked by `gradient_mask` (ADI). Adam on the
    identifier only; the model's parameters get no gradient (`requires_grad_(False)`).
    """
    gen = torch.Generator().manual_seed(seed)
    model.eval().requires_grad_(False)
    sched = make_scheduler(model.cfg.timesteps)
    ident = Identifier(model.action_words.weight[NULL_ACTION], model.n_layers, cfg.layerwise)
    opt = torch.optim.Adam(ident.parameters(), lr=cfg.lr)
    subject = torch.full((cfg.batch,), NULL_SUBJECT)
    losses = []
    for _ in range(cfg.steps):
        anchor, context, action = _triples(ex, cfg.batch, gen)
        noise = torch.randn(anchor.shape, generator=gen)
        t = torch.randint(0, model.cfg.timesteps, (cfg.batch,), generator=gen)

        def loss_of(x0: torch.Tensor) -> torch.Tensor:
            return F.mse_loss(model(sched.add_noise(x0, noise, t), t, subject, ident(cfg.batch)), noise)

        loss = loss_of(anchor)
        (g_anchor,) = torch.autograd.grad(loss, ident.tokens)
        if cfg.mask_rate is not None:
            (g_context,) = torch.autograd.grad(loss_of(context), ident.tokens)
            (g_action,) = torch.autograd.grad(loss_of(action), ident.tokens)
            g_anchor = g_anchor * gradient_mask(g_anchor, g_context, g_action, cfg.mask_rate)
        ident.tokens.grad = g_anchor
        opt.step()
        losses.append(loss.item())
    return ident, losses


# --- the judge: a classifier of item class and action, trained on real items -----------------------------------

def train_classifier(images: torch.Tensor, labels: torch.Tensor, steps: int, batch: int = 64, lr: float = 2e-3,
                     seed: int = 0) -> nn.Module:
    """A small vitlab ViT (`vl_vit_fmnist` at 16 px) with N_CLASSES + len(ACTIONS) logits: class and action heads,
    trained on items under random actions (cross-entropy on each)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = create_model("vl_vit_fmnist", num_classes=N_CLASSES + len(ACTIONS), img_size=SIDE, embed_dim=48, depth=2,
                       num_heads=2, stem_widths=(16, 48), stem_strides=(2, 2))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    lr_sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        actions = torch.randint(0, len(ACTIONS), (batch,), generator=gen)
        logits = net(transform_batch(images[idx], actions))
        loss = F.cross_entropy(logits[:, :N_CLASSES], labels[idx]) + F.cross_entropy(logits[:, N_CLASSES:], actions)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_sched.step()
    return net.eval()


@torch.no_grad()
def score(classifier: nn.Module, images: torch.Tensor, subjects: torch.Tensor) -> dict[str, float]:
    """Shares of images the classifier sees as TARGET ("action present"), as their prompted subject ("subject
    kept") and as both."""
    logits = classifier(images.clamp(-1, 1))
    action = logits[:, N_CLASSES:].argmax(1) == TARGET
    subject = logits[:, :N_CLASSES].argmax(1) == subjects
    return {"action": float(action.float().mean()), "subject": float(subject.float().mean()),
            "both": float((action & subject).float().mean())}


# --- the toy ----------------------------------------------------------------------------------------------------

EXEMPLAR_CLASSES = (1, 7)            # trouser, sneaker: the subjects the action is shown on
ARMS = {"adi": InversionConfig(layerwise=True, mask_rate=0.25),
        "layerwise": InversionConfig(layerwise=True, mask_rate=None),
        "textual_inversion": InversionConfig(layerwise=False, mask_rate=None)}


def train_models(seed: int, diffusion_steps: int, judge_steps: int, judge_test: int = 2000
                 ) -> tuple[ConditionedUNet, nn.Module, dict[str, float]]:
    """The judge (scored on `judge_test` test-file items under the four actions) and the diffusion model."""
    images, labels = load_items("train")
    test_images, test_labels = load_items("test")
    start = time.process_time()
    judge = train_classifier(images, labels, judge_steps, seed=seed)
    actions = torch.arange(judge_test) % len(ACTIONS)
    with torch.no_grad():
        logits = judge(transform_batch(test_images[:judge_test], actions))
    metrics = {"judge_class_acc": float((logits[:, :N_CLASSES].argmax(1) == test_labels[:judge_test]).float().mean()),
               "judge_action_acc": float((logits[:, N_CLASSES:].argmax(1) == actions).float().mean())}
    torch.manual_seed(seed)
    model = ConditionedUNet(DiffusionConfig())
    losses = train_diffusion(model, images, labels, diffusion_steps, seed=seed)
    metrics["diffusion_params"] = sum(p.numel() for p in model.parameters())
    metrics["diffusion_final_loss"] = sum(losses[-50:]) / len(losses[-50:])
    metrics["train_cpu_s"] = time.process_time() - start
    return model, judge, metrics


def compare_arms(model: ConditionedUNet, judge: nn.Module, seed: int, inversion_steps: int, per_class: int,
                 per_exemplar_class: int = 4, ddim_steps: int = 25, arms: dict[str, InversionConfig] = ARMS
                 ) -> dict[str, float]:
    """Learn TARGET with each arm for `inversion_steps` from the same exemplars; score `per_class` samples of each
    class not among the exemplars, and as references the same prompts with the null word and with TARGET's word."""
    images, labels = load_items("train")
    ex = make_exemplars(images, labels, EXEMPLAR_CLASSES, per_exemplar_class, seed)
    unseen = torch.tensor([c for c in range(N_CLASSES) if c not in EXEMPLAR_CLASSES]).repeat_interleave(per_class)
    metrics = {}
    for name, word in (("null_word", NULL_ACTION), ("target_word", TARGET)):
        gen = torch.Generator().manual_seed(seed + 1)
        reference = sample(model, unseen, model.word_tokens(torch.full_like(unseen, word)), ddim_steps, generator=gen)
        metrics.update({f"{name}_{key}": value for key, value in score(judge, reference, unseen).items()})
    for name, cfg in arms.items():
        start = time.process_time()
        cfg = InversionConfig(cfg.layerwise, cfg.mask_rate, inversion_steps, cfg.batch, cfg.lr)
        ident, _ = invert(model, ex, cfg, seed=seed)
        metrics[f"{name}_cpu_s"] = time.process_time() - start
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            generated = sample(model, unseen, ident(len(unseen)), ddim_steps, generator=gen)
        metrics.update({f"{name}_{key}": value for key, value in score(judge, generated, unseen).items()})
    return metrics


@register_toy("adi", "ADI: layer-wise identifiers + gradient mask vs textual inversion (a rotation on Fashion-MNIST)",
              requires=("diffusers",))
def run(out: Path, seed: int, quick: bool) -> dict[str, float | str]:
    """Train the judge and the diffusion model, then compare the arms at equal inversion steps (`compare_arms`)."""
    diffusion_steps, judge_steps, inversion_steps, per_class, ddim_steps = (
        (4, 4, 2, 2, 2) if quick else (1000, 600, 200, 16, 25))
    model, judge, metrics = train_models(seed, diffusion_steps, judge_steps, 64 if quick else 2000)
    metrics.update(compare_arms(model, judge, seed, inversion_steps, per_class, 2 if quick else 4, ddim_steps))
    return {"diffusion_steps": diffusion_steps, "inversion_steps": inversion_steps,
            "exemplar_classes": ",".join(map(str, EXEMPLAR_CLASSES)),
            **{k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}}
