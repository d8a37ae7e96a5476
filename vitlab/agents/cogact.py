"""CogACT: a diffusion-transformer action head conditioned on a vision feature, beside an MSE regression head.

Li et al., "CogACT: A Foundational Vision-Language-Action Model for Synergizing Cognition and Action in Robotic
Manipulation" (2024); official code microsoft/CogACT@b174a1b (`action_model/`). A VLM reads the image and emits one
"cognition" feature z; a small DiT denoises a chunk of T future actions (T, d) conditioned on it:

- `ActionDiT` (`action_model/models.py` DiT): the condition token c = TimestepEmbed(t) + Linear(z) is prepended to
  the T embedded noisy actions, a learned position embedding is added and pre-norm transformer blocks (LayerNorm
  without affine, qkv bias, tanh-GELU MLP) run over the T + 1 tokens; a zero-initialised final linear reads the
  action tokens as the predicted noise. Conditioning is in-context (a prepended token), not adaLN-zero: the official
  `DiTBlock` has no modulation. With probability 0.1 in training z is replaced by a learned `uncondition` vector
  (classifier-free guidance dropout, `LabelEmbedder.token_drop`); sampling mixes eps_u + s (eps_c - eps_u), s = 1.5
  (`forward_with_cfg`, `vla/cogactvla.py`).
- Diffusion (`action_model/__init__.py` create_diffusion, `gaussian_diffusion.py`): 100 steps of the
  "squaredcos_cap_v2" schedule, epsilon prediction, loss = MSE(eps_pred, eps) with t uniform; each training sample is
  repeated with fresh (t, noise) draws (`repeated_diffusion_steps`); sampling is DDIM (eta = 0) over the timesteps
  0, 10, ..., 90 (`respace.py` "ddim10"), no clipping. The tests check the schedule and `q_sample` against diffusers'
  `DDPMScheduler`, `ddim_step` against `DDIMScheduler.step`, and the network and sampler against the official code
  (a fixture made from it on a tiny config).

The toy (`vitlab toy cogact`): a 28x28 image shows an obstacle (a Fashion-MNIST item at 10x10) somewhere in the
middle; the demonstrated 8-waypoint path from the bottom to the top of the image passes it on the left or on the
right, each with probability 1/2 (`demonstrations`). A small vitlab ViT (`vl_vit_fmnist` shrunk) gives the cognition
feature (its class token); it is trained jointly with the head. The baseline is the same ViT and the same DiT used
as a regressor (x = 0, t = 0, MSE to the path), trained for the same optimizer steps (`TOY_RECIPE`: 6000): it
averages the two modes and drives through the obstacle. Beyond the official head, `HeadConfig.prediction` trains an
x0 or a v target, `HeadConfig.eta` gives stochastic DDIM (eta = 1 over all 100 steps is DDPM ancestral sampling) and
`train_policy` takes a warm-up and an EMA of the weights: the ablation's candidates.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from ..checkpoint import create_model
from ..errors import UserError
from .reach import item_bank
from .registry import register_toy

__all__ = ["cosine_betas", "alphas_cumprod", "q_sample", "ddim_timesteps", "ddim_step", "TimestepEmbedder",
           "ActionDiT", "PREDICTIONS", "eps_from_output", "ddim_sample", "HeadConfig", "CogACTPolicy", "Demos",
           "demonstrations", "true_samples", "mode_scores", "mmd2", "MMD_BOUND", "TOY_RECIPE", "TOY_HEAD",
           "train_policy", "evaluate", "run"]


# --- diffusion (action_model/gaussian_diffusion.py, respace.py) -------------------------------------------------

def cosine_betas(steps: int, max_beta: float = 0.999) -> torch.Tensor:
    """The "squaredcos_cap_v2" betas (Nichol & Dhariwal 2021): 1 - abar((i+1)/T) / abar(i/T), abar(t) = cos²(...)."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return torch.tensor([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta) for i in range(steps)],
                        dtype=torch.float64)


def alphas_cumprod(steps: int = 100) -> torch.Tensor:
    """abar_t = prod_{s <= t} (1 - beta_s), float32 (T,)."""
    return torch.cumprod(1 - cosine_betas(steps), 0).float()


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; t (B,) indexes abar, x0 (B, ...)."""
    a = abar[t].view(-1, *[1] * (x0.dim() - 1))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def ddim_timesteps(train_steps: int, sample_steps: int) -> list[int]:
    """The DDIM timesteps, descending: range(0, T, stride) with the stride that gives exactly `sample_steps`."""
    for stride in range(1, train_steps + 1):
        if len(range(0, train_steps, stride)) == sample_steps:
            return list(range(0, train_steps, stride))[::-1]
    raise ValueError(f"cannot take exactly {sample_steps} DDIM steps out of {train_steps} with an integer stride")


def ddim_step(x: torch.Tensor, eps: torch.Tensor, abar_t: torch.Tensor, abar_prev: torch.Tensor, eta: float = 0.0,
              noise: torch.Tensor | None = None) -> torch.Tensor:
    """One DDIM update x_t -> x_prev (Song et al. 2021, eq. 12), from the predicted noise `eps`."""
    x0 = (x - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()
    sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).sqrt()
    out = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma ** 2).sqrt() * eps
    return out if noise is None or eta == 0 else out + sigma * noise


# --- the action DiT (action_model/models.py) -------------------------------------------------------------------

class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t (cos then sin, 256 of them, max period 1e4) through a SiLU MLP."""

    def __init__(self, dim: int, frequencies: int = 256):
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequencies // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]                           # (B, half)
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], -1))


class ActionDiT(nn.Module):
    """Predicts the noise of T noisy actions (B, T, action_dim) at step t (B,) given a condition z (B, cond_dim)."""

    def __init__(self, action_dim: int, horizon: int, cond_dim: int, dim: int = 64, depth: int = 3, heads: int = 4,
                 mlp_ratio: float = 4.0, cond_dropout: float = 0.1):
        super().__init__()
        self.cond_dropout = cond_dropout
        self.x_embedder = nn.Linear(action_dim, dim)
        self.t_embedder = TimestepEmbedder(dim)
        self.z_embedder = nn.Linear(cond_dim, dim)
        self.uncondition = nn.Parameter(torch.randn(cond_dim) * 0.02)
        self.positional_embedding = nn.Parameter(dim ** -0.5 * torch.randn(horizon + 1, dim))
        norm = partial(nn.LayerNorm, elementwise_affine=False, eps=1e-6)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=norm,
                                          act_layer=partial(nn.GELU, approximate="tanh")) for _ in range(depth))
        self.norm_final = norm(dim)
        self.final = nn.Linear(dim, action_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        """The official init: xavier linears, N(0, 0.02) embedders, a zero final layer."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for linear in (self.x_embedder, self.z_embedder, self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(linear.weight, std=0.02)
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.zeros_(self.z_embedder.bias)
        nn.init.zeros_(self.final.weight)
        nn.init.zeros_(self.final.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor, drop: torch.Tensor | None = None
                ) -> torch.Tensor:
        """`drop` (B,) bool replaces z by `uncondition`; in training it is drawn with p = cond_dropout."""
        if drop is None and self.training and self.cond_dropout > 0:
            drop = torch.rand(z.shape[0], device=z.device) < self.cond_dropout
        if drop is not None:
            z = torch.where(drop[:, None], self.uncondition.expand_as(z), z)
        c = self.t_embedder(t) + self.z_embedder(z)                       # (B, D)
        h = torch.cat([c[:, None], self.x_embedder(x)], 1)                # (B, T + 1, D)
        h = h + self.positional_embedding
        for block in self.blocks:
            h = block(h)
        return self.final(self.norm_final(h))[:, 1:]                      # (B, T, action_dim)

    def guided_eps(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """Classifier-free guidance: eps_u + s (eps_c - eps_u), both halves in one batch; s = 1 is the plain forward."""
        if cfg_scale == 1.0:
            return self(x, t, z, drop=torch.zeros(len(z), dtype=torch.bool, device=z.device))
        drop = torch.arange(2 * len(z), device=z.device) >= len(z)
        eps_c, eps_u = self(torch.cat([x, x]), torch.cat([t, t]), torch.cat([z, z]), drop=drop).chunk(2)
        return eps_u + cfg_scale * (eps_c - eps_u)


PREDICTIONS = ("epsilon", "sample", "v_prediction")


def eps_from_output(out: torch.Tensor, x: torch.Tensor, abar_t: torch.Tensor, prediction: str) -> torch.Tensor:
    """The noise implied by the network's output at x_t: the output itself ("epsilon"), from a predicted x0
    ("sample": eps = (x - sqrt(abar) x0) / sqrt(1 - abar)) or from a predicted v = sqrt(abar) eps - sqrt(1 - abar) x0
    ("v_prediction": eps = sqrt(1 - abar) x + sqrt(abar) v), as diffusers' `prediction_type`."""
    if prediction == "epsilon":
        return out
    if prediction == "sample":
        return (x - abar_t.sqrt() * out) / (1 - abar_t).sqrt()
    if prediction == "v_prediction":
        return (1 - abar_t).sqrt() * x + abar_t.sqrt() * out
    raise UserError(f"prediction={prediction!r} is not one of {PREDICTIONS}; pick one of them")


@torch.no_grad()
def ddim_sample(net: ActionDiT, z: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor, steps: int = 10,
                cfg_scale: float = 1.5, eta: float = 0.0, prediction: str = "epsilon",
                generator: torch.Generator | None = None) -> torch.Tensor:
    """DDIM from `noise` (B, T, d) to actions, over `ddim_timesteps(len(abar), steps)`; abar_prev of the last step
    is 1 (the respaced schedule's alphas_cumprod_prev[0]). eta = 0 is the official deterministic sampler; eta = 1
    with steps = len(abar) is DDPM ancestral sampling (posterior variance beta~_t), fresh noise from `generator`.
    Guidance mixes the raw outputs, which for every `prediction` equals mixing the implied noise."""
    x = noise
    timesteps = ddim_timesteps(len(abar), steps)
    for i, t in enumerate(timesteps):
        prev = abar[timesteps[i + 1]] if i + 1 < len(timesteps) else abar.new_tensor(1.0)
        out = net.guided_eps(x, torch.full((len(x),), t, device=x.device), z, cfg_scale)
        eps = eps_from_output(out, x, abar[t], prediction)
        fresh = torch.randn(x.shape, generator=generator).to(x.device) if eta > 0 else None
        x = ddim_step(x, eps, abar[t], prev, eta=eta, noise=fresh)
    return x


# --- the policy: a ViT's cognition feature + a diffusion or regression head ------------------------------------

@dataclass(frozen=True)
class HeadConfig:
    diffusion: bool = True        # False: the same ViT + DiT trained as an MSE regressor (x = 0, t = 0)
    horizon: int = 8              # T waypoints
    action_dim: int = 2
    dim: int = 64
    depth: int = 3
    heads: int = 4
    vit_dim: int = 32
    vit_depth: int = 2
    train_steps: int = 100        # diffusion steps
    repeats: int = 4              # (t, noise) draws per sample per optimizer step (repeated_diffusion_steps)
    ddim_steps: int = 10
    cfg_scale: float = 1.5
    eta: float = 0.0              # DDIM eta: 0 deterministic (official); 1 with ddim_steps = train_steps is DDPM
    prediction: str = "epsilon"   # what the DiT predicts: "epsilon" (official), "sample" (x0) or "v_prediction"


class CogACTPolicy(nn.Module):
    """Image (B, 1, 28, 28) -> cognition feature (the ViT's class token) -> T 2-D waypoints in [-1, 1]."""

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = create_model("vl_vit_fmnist", num_classes=0, embed_dim=cfg.vit_dim, depth=cfg.vit_depth,
                                   num_heads=2, stem_widths=(16, cfg.vit_dim), stem_strides=(2, 2))
        self.head = ActionDiT(cfg.action_dim, cfg.horizon, cfg.vit_dim, cfg.dim, cfg.depth, cfg.heads,
                              cond_dropout=0.1 if cfg.diffusion else 0.0)
        self.register_buffer("abar", alphas_cumprod(cfg.train_steps), persistent=False)
        if cfg.prediction not in PREDICTIONS:
            raise UserError(f"HeadConfig(prediction={cfg.prediction!r}) is not one of {PREDICTIONS}; pick one")

    def loss(self, images: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Diffusion: MSE of the predicted noise, x0 or v (`cfg.prediction`; each sample `repeats` times);
        regression: MSE to the actions."""
        z = self.vision(images)                                           # (B, vit_dim)
        if not self.cfg.diffusion:
            zeros = torch.zeros(len(z), dtype=torch.long, device=z.device)
            return F.mse_loss(self.head(torch.zeros_like(actions), zeros, z), actions)
        z, actions = z.repeat(self.cfg.repeats, 1), actions.repeat(self.cfg.repeats, 1, 1)
        t = torch.randint(0, self.cfg.train_steps, (len(z),), device=z.device)
        noise = torch.randn_like(actions)
        out = self.head(q_sample(actions, t, noise, self.abar), t, z)
        if self.cfg.prediction == "epsilon":
            target = noise
        elif self.cfg.prediction == "sample":
            target = actions
        else:
            a = self.abar[t].view(-1, 1, 1)
            target = a.sqrt() * noise - (1 - a).sqrt() * actions
        return F.mse_loss(out, target)

    @torch.no_grad()
    def sample(self, images: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, n, T, d): n action chunks per image (the regressor's n copies are identical)."""
        z = self.vision(images).repeat_interleave(n, 0)                   # (B * n, vit_dim)
        shape = (len(z), self.cfg.horizon, self.cfg.action_dim)
        if self.cfg.diffusion:
            noise = torch.randn(shape, generator=generator).to(z.device)
            out = ddim_sample(self.head, z, noise, self.abar, self.cfg.ddim_steps, self.cfg.cfg_scale, self.cfg.eta,
                              self.cfg.prediction, generator)
        else:
            zeros = torch.zeros(len(z), dtype=torch.long, device=z.device)
            out = self.head(torch.zeros(shape, device=z.device), zeros, z)
        return out.reshape(len(images), n, self.cfg.horizon, self.cfg.action_dim)


# --- the bimodal task ----------------------------------------------------------------------------------------

CANVAS, OBSTACLE = 28, 10     # image side and obstacle side, px
DETOUR = 0.25                 # lateral offset of the path at the obstacle's height (unit coordinates)
WIDTH = 0.18                  # how far (in y) the detour extends around the obstacle
NOISE = 0.01                  # std of the demonstrations' per-waypoint jitter


@dataclass(frozen=True)
class Demos:
    images: torch.Tensor      # (B, 1, 28, 28)
    centre: torch.Tensor      # (B, 2) obstacle centre (x, y) in unit coordinates
    actions: torch.Tensor     # (B, T, 2) one demonstrated path per scene, in [-1, 1]


def _paths(centre: torch.Tensor, side: torch.Tensor, horizon: int, generator: torch.Generator) -> torch.Tensor:
    """(B, T, 2) waypoints in [-1, 1]: y from bottom to top, x leaves 0.5 to pass at cx + side * DETOUR."""
    y = 1 - torch.arange(1, horizon + 1) / (horizon + 1)                  # (T,)
    g = torch.exp(-((y[None] - centre[:, 1:]) / WIDTH) ** 2)              # (B, T)
    x = 0.5 + (centre[:, :1] - 0.5 + side[:, None] * DETOUR) * g
    xy = torch.stack([x, y.expand_as(x)], -1)                            # (B, T, 2)
    return 2 * (xy + NOISE * torch.randn(xy.shape, generator=generator)) - 1


def demonstrations(n: int, split: str, seed: int, horizon: int = 8) -> Demos:
    """n scenes (items from the Fashion-MNIST `split` file), each with one path, left or right with p = 1/2."""
    gen = torch.Generator().manual_seed(seed)
    bank, _ = item_bank(split)
    items = bank[torch.randint(0, len(bank), (n,), generator=gen)].float()[:, None] / 255   # (n, 1, 28, 28)
    items = F.interpolate(items, size=(OBSTACLE, OBSTACLE), mode="bilinear", antialias=True, align_corners=False)
    corner = torch.randint(5, CANVAS - OBSTACLE - 4, (n, 2), generator=gen)   # top-left px: 5 .. 13
    images = torch.zeros(n, 1, CANVAS, CANVAS)
    for i in range(n):
        x, y = corner[i].tolist()
        images[i, 0, y:y + OBSTACLE, x:x + OBSTACLE] = items[i, 0].clamp(0, 1)
    centre = (corner + OBSTACLE / 2) / CANVAS
    side = torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1
    return Demos(images, centre, _paths(centre, side, horizon, gen))


def true_samples(centre: torch.Tensor, n: int, horizon: int, generator: torch.Generator) -> torch.Tensor:
    """(B, n, T, 2) draws from the true path distribution of each scene (sides 50/50)."""
    c = centre.repeat_interleave(n, 0)
    side = torch.randint(0, 2, (len(c),), generator=generator).float() * 2 - 1
    return _paths(c, side, horizon, generator).reshape(len(centre), n, horizon, 2)


def mode_scores(paths: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """(B, n) signed detour of each path in units of DETOUR: about +1 right of the obstacle, -1 left, 0 through it
    (the least-squares fit of side in x - 0.5 - (cx - 0.5) g = side * DETOUR * g)."""
    horizon = paths.shape[-2]
    y = 1 - torch.arange(1, horizon + 1) / (horizon + 1)
    g = torch.exp(-((y[None] - centre[:, 1:]) / WIDTH) ** 2)[:, None]    # (B, 1, T)
    x = (paths[..., 0] + 1) / 2                                          # (B, n, T)
    residual = x - 0.5 - (centre[:, None, :1] - 0.5) * g
    return (residual * g).sum(-1) / (DETOUR * (g * g).sum(-1))


def mmd2(a: torch.Tensor, b: torch.Tensor, bandwidth: float = 0.05) -> torch.Tensor:
    """Unbiased squared MMD (Gretton et al. 2012) between sample sets a (n, D) and b (m, D) in unit coordinates,
    RBF kernel exp(-mean((u - v)^2) / (2 h^2)) (the mean over D makes h a per-coordinate RMS distance)."""
    def k(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.exp(-torch.cdist(u, v) ** 2 / u.shape[1] / (2 * bandwidth ** 2))
    n, m = len(a), len(b)
    kaa, kbb = k(a, a), k(b, b)
    return ((kaa.sum() - kaa.diagonal().sum()) / (n * (n - 1)) + (kbb.sum() - kbb.diagonal().sum()) / (m * (m - 1))
            - 2 * k(a, b).mean())


def train_policy(model: CogACTPolicy, demos: Demos, steps: int, batch: int = 32, lr: float = 1e-3,
                 seed: int = 0, warmup: int = 0, ema: float = 0.0) -> list[float]:
    """AdamW, linear warm-up over `warmup` steps then cosine decay, `steps` optimizer steps on random minibatches;
    with `ema` > 0 the model ends with the exponential moving average of its weights (decay `ema`). Returns the
    losses."""
    if not 0 <= warmup < max(steps, 1):
        raise UserError(f"warmup={warmup} must be in [0, steps={steps}); lower it")
    if not 0 <= ema < 1:
        raise UserError(f"ema={ema} must be in [0, 1) (0: off); use e.g. 0.999")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: (i + 1) / warmup if i < warmup else
                                              0.5 * (1 + math.cos(math.pi * (i - warmup) / (steps - warmup))))
    swa = torch.optim.swa_utils
    average = swa.AveragedModel(model, multi_avg_fn=swa.get_ema_multi_avg_fn(ema)) if ema > 0 else None
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(demos.images), (batch,), generator=gen)
        loss = model.loss(demos.images[idx], demos.actions[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if average is not None:
            average.update_parameters(model)
        losses.append(loss.item())
    if average is not None:
        model.load_state_dict(average.module.state_dict())
    return losses


@torch.no_grad()
def evaluate(model: CogACTPolicy, demos: Demos, samples: int = 64, seed: int = 0) -> dict[str, float]:
    """Per test scene, `samples` paths: share of left / right / neither (|score| < 0.5) and the mean MMD² to as many
    true paths (unit coordinates, bandwidth 0.05)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    paths = model.sample(demos.images, samples, gen)                     # (B, n, T, 2)
    truth = true_samples(demos.centre, samples, model.cfg.horizon, gen)
    score = mode_scores(paths, demos.centre)
    flat = lambda p: ((p + 1) / 2).flatten(1)                            # (n, T * 2) in unit coordinates
    mmd = torch.stack([mmd2(flat(p), flat(q)) for p, q in zip(paths, truth)]).mean()
    return {"left": float((score < -0.5).float().mean()), "right": float((score > 0.5).float().mean()),
            "neither": float((score.abs() <= 0.5).float().mean()), "mmd2": float(mmd)}


MMD_BOUND = 0.1   # stated before the first run: a one-mode model scores about 0.5, a 70/30 split about 0.08
# The toy's training recipe, the same for both heads (the MSE head has the same parameters and optimizer steps),
# and the diffusion head's settings on top of HeadConfig's official ones (none changed). At 2000 steps the head is
# under-trained: a fifth of its samples stop between the modes and the rest miss the path by ~1.4 px (MMD² 0.145 on
# seed 0); 4000 steps give 0.027 / 0.167 / 0.025 on seeds 0 / 1 / 2 (seed 1 still under-trained), 6000 steps
# 0.019 / 0.021 / 0.014. Sampler, CFG, v-prediction and EMA changes did not help (benchmarks/agents_cogact.py).
TOY_RECIPE: dict[str, float] = {"steps": 6000, "lr": 1e-3, "warmup": 0, "ema": 0.0}
TOY_HEAD: dict[str, float | str] = {}


@register_toy("cogact", "CogACT: diffusion action head on a ViT feature vs an MSE head (bimodal detours)")
def run(out: Path, seed: int, quick: bool) -> dict[str, float | str]:
    """Train the diffusion and the regression policy on the same demonstrations for the same steps; score both."""
    n_train, n_test, steps, samples = (64, 4, 3, 8) if quick else (4000, 50, TOY_RECIPE["steps"], 32)
    warmup = min(TOY_RECIPE["warmup"], steps - 1)
    train = demonstrations(n_train, "train", seed)
    test = demonstrations(n_test, "test", seed + 1)
    metrics: dict[str, float | str] = {"train_scenes": n_train, "optimizer_steps": steps, "mmd2_bound": MMD_BOUND,
                                       "lr": TOY_RECIPE["lr"], "warmup": warmup, "ema": TOY_RECIPE["ema"]}
    for name, cfg in (("diffusion", HeadConfig(diffusion=True, **TOY_HEAD)), ("mse", HeadConfig(diffusion=False))):
        torch.manual_seed(seed)
        model = CogACTPolicy(cfg)
        start = time.perf_counter()
        losses = train_policy(model, train, steps, lr=TOY_RECIPE["lr"], seed=seed, warmup=warmup,
                              ema=TOY_RECIPE["ema"])
        metrics[f"{name}_params"] = sum(p.numel() for p in model.parameters())
        metrics[f"{name}_train_s"] = round(time.perf_counter() - start, 1)
        metrics[f"{name}_final_loss"] = round(sum(losses[-20:]) / len(losses[-20:]), 5)
        for key, value in evaluate(model, test, samples, seed + 2).items():
            metrics[f"{name}_{key}"] = round(value, 4)
    return metrics
