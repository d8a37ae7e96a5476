"""Self-supervised pretraining of a backbone without labels: SiT and TOV-VICReg (`vitlab pretrain`).

* **SiT** (Atito et al., "SiT: Self-supervised vIsion Transformer", 2021; github.com/Sara-Ahmed/SiT at 1aacd6a, the
  version with rotation and contrastive tokens: `engine.py`, `losses.py`, `vision_transformer_SiT.py`). Two views of
  each image are rotated by a random multiple of 90 degrees and corrupted (random blocks blurred, filled with noise
  or replaced by blocks of another image: `engine.distortImages`); the transformer predicts the rotation from a
  rotation token, maps a contrastive token to an embedding trained with NT-Xent (temperature 0.5) across the two
  views, and reconstructs the clean view from the patch tokens with a transposed convolution (L1). The three losses
  are combined with learned uncertainty weights, `exp(-adj * s) * L + s / 2` (`losses.LearnedLoss`, s starts at 1,
  adj = 1 for the cross-entropy and contrastive terms, 0.5 for L1). Here the backbone's class token plays the
  contrastive token (it is the token fine-tuning classifies from) and a rotation token with its own position
  embedding is inserted after it; both exist only while pretraining.
* **TOV-VICReg** (Goulão & Oliveira, "Pretraining the Vision Transformer using self-supervised methods for vision
  based Deep Reinforcement Learning", 2022; github.com/mgoulao/TOV-VICReg at 535b164, `tov_vicreg/models/builder.py`):
  VICReg (Bardes et al., 2022; github.com/facebookresearch/vicreg at 4e12602, `main_vicreg.py`) on two views of
  frame t, plus temporal order verification: the backbone representations of frames (t-1, t, t+1) are concatenated
  in one of the 6 orders and a linear layer says whether the order is the true one (BCE; 1 in 6 is). Our frame
  sequences come from Fashion-MNIST images moved smoothly (`motion_sequences`: a seeded shift and rotation per
  frame), standing in for the paper's Atari frames.
* **VideoMAE** (Tong et al., NeurIPS 2022; `vitlab.models.videomae`): tube masking at ratio 0.9, the encoder on the
  visible tubelets, a decoder half the encoder's width (4 layers, half its heads, as the official ViT-S/B configs)
  reconstructing the masked tubelets' normalised pixels (MSE). Backbones: `vl_videomae_*` on video data
  (`moving-fashion-mnist-cls`, whose labels are unused). `videomae2` adds VideoMAE V2's dual masking (Wang et al.,
  CVPR 2023): the decoder reconstructs only the tubelets a running-cell mask at ratio 0.5 keeps
  (`vitlab.models.videomae.running_cell_mask`), the loss over those the encoder did not see.

The heads are dropped at the end: the run folder holds a vitlab checkpoint of the backbone alone, which
`vitlab train --init RUN` fine-tunes (its classifier starts from the backbone's random init).

    vitlab pretrain vl_vit_fmnist --method sit --data fashion-mnist --epochs 1 --out runs/sit
    vitlab pretrain vl_videomae_mfmnist --method videomae --data moving-fashion-mnist-cls:clips=2000 --out runs/vmae
    vitlab train --init runs/sit --data fashion-mnist:fraction=0.1 --epochs 10 --out runs/sit-ft
"""
import dataclasses
import itertools
import json
import math
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import timm.optim
import timm.scheduler
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from ..checkpoint import create_model, default_preprocessing, is_checkpoint, save_checkpoint
from ..data import build_dataset, dataset_info
from ..errors import UserError
from ..models.videomae import VideoMAE, VideoMAEPretrainer
from ..utils.io import atomic_write_text
from ..utils.lock import lock_folder
from .runtime import seed_everything
from .train import _Progress

__all__ = ["METHODS", "PretrainConfig", "PretrainError", "pretrain", "vicreg_terms", "vicreg_loss", "off_diagonal",
           "nt_xent", "uncertainty_weighted", "rotate", "corrupt", "motion_sequences", "order_verification_batch",
           "SiT", "TOVVICReg", "VideoMAEMethod"]

METHODS = ("sit", "tov-vicreg", "videomae", "videomae2")
METRICS_FILE = "pretrain.jsonl"


class PretrainError(UserError):
    """A pretraining method that cannot run on this model or data, or a bad setting."""


# ---------------------------------------------------------------------------------------------------------------------
# losses: pure tensor functions


def off_diagonal(m: torch.Tensor) -> torch.Tensor:
    """The off-diagonal entries of a square matrix, flattened (VICReg's `off_diagonal`)."""
    n = m.shape[0]
    return m.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def vicreg_terms(z_a: torch.Tensor, z_b: torch.Tensor, gamma: float = 1.0, eps: float = 1e-4) -> dict:
    """VICReg's three terms for embeddings (B, D) of two views (`main_vicreg.VICReg.forward`):

    invariance = mean (z_a - z_b)^2; variance = mean_d relu(gamma - sqrt(Var_d + eps)), averaged over the two views;
    covariance = sum of squared off-diagonal covariances / D, summed over the two views (covariance over B - 1).
    """
    invariance = F.mse_loss(z_a, z_b)
    variance, covariance = z_a.new_zeros(()), z_a.new_zeros(())
    for z in (z_a, z_b):
        z = z - z.mean(dim=0)
        std = torch.sqrt(z.var(dim=0) + eps)
        variance = variance + F.relu(gamma - std).mean() / 2
        cov = (z.T @ z) / (z.shape[0] - 1)  # (D, D)
        covariance = covariance + off_diagonal(cov).pow(2).sum() / z.shape[1]
    return {"invariance": invariance, "variance": variance, "covariance": covariance}


def vicreg_loss(z_a: torch.Tensor, z_b: torch.Tensor, sim_coeff: float = 25.0, std_coeff: float = 25.0,
                cov_coeff: float = 1.0) -> torch.Tensor:
    """sim * invariance + std * variance + cov * covariance (VICReg's defaults 25 / 25 / 1)."""
    terms = vicreg_terms(z_a, z_b)
    return sim_coeff * terms["invariance"] + std_coeff * terms["variance"] + cov_coeff * terms["covariance"]


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's NT-Xent over 2B embeddings, the positive of row i being its other view (SiT `losses.ContrastiveLoss`)."""
    z = F.normalize(torch.cat([a, b]), dim=1)  # (2B, E)
    sim = z @ z.T / temperature  # (2B, 2B) cosine similarities / t
    n = a.shape[0]
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))  # no self-pairs
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, positives)


def uncertainty_weighted(loss: torch.Tensor, s: torch.Tensor, adj: float) -> torch.Tensor:
    """SiT's learned task weighting `exp(-adj * s) * loss + s / 2` (`losses.LearnedLoss.calculate_weighted_loss`)."""
    return torch.exp(-adj * s) * loss + 0.5 * s


# ---------------------------------------------------------------------------------------------------------------------
# image transforms drawn from one torch.Generator (batched)


def rotate(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Rotate image i by labels[i] * 90 degrees clockwise (SiT `datasets_utils.RandomRotation`: 1 = rot90(-1))."""
    out = images.clone()
    for k in range(1, 4):
        sel = labels == k
        out[sel] = torch.rot90(images[sel], -k, dims=(2, 3))
    return out


def _boxes(b: int, h: int, w: int, fraction: torch.Tensor, gen: torch.Generator, max_block: float = 0.25,
           tolerance: float = 0.05, slots: int = 32) -> torch.Tensor:
    """(B, H, W) mask of random rectangles covering about `fraction` (B,) of each image: rectangles of side
    tolerance..max_block of the image are added until their summed area reaches the target (`drop_rand_patches`)."""
    th, tw = max(1, int(tolerance * h)), max(1, int(tolerance * w))
    mh, mw = max(th + 1, int(max_block * h)), max(tw + 1, int(max_block * w))
    top = torch.randint(0, h - th + 1, (b, slots), generator=gen)
    left = torch.randint(0, w - tw + 1, (b, slots), generator=gen)
    bottom = (top + torch.randint(th, mh, (b, slots), generator=gen)).clamp(max=h)
    right = (left + torch.randint(tw, mw, (b, slots), generator=gen)).clamp(max=w)
    area = ((bottom - top) * (right - left)).float()  # (B, slots)
    keep = (area.cumsum(1) - area) < (fraction * h * w)[:, None]  # a rectangle is drawn while the target is not met
    ys, xs = torch.arange(h)[None, None, :, None], torch.arange(w)[None, None, None, :]
    inside = ((ys >= top[..., None, None]) & (ys < bottom[..., None, None]) &
              (xs >= left[..., None, None]) & (xs < right[..., None, None]))  # (B, slots, H, W)
    return (inside & keep[..., None, None]).any(1)


def corrupt(images: torch.Tensor, gen: torch.Generator, max_drop: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """SiT's `distortImages` for a batch (B, C, H, W): a random rectangle blurred, up to `max_drop` of the area
    filled with N(0, 1) noise, up to `max_drop` replaced by the same pixels of another image of the batch.

    Returns (corrupted images, (B, H, W) bool mask of the pixels changed by noise or replacement). Needs B >= 2.
    """
    b, c, h, w = images.shape
    if b < 2:
        raise ValueError(f"corrupt needs a batch of at least 2 images (blocks come from another image), got {b}")
    out = images.clone()
    # blur: a 3x3 Gaussian with sigma ~ U(0.1, 2) per image, over one random rectangle (the grayscale step is a no-op)
    sigma = 0.1 + 1.9 * torch.rand(b, generator=gen)
    taps = torch.exp(-torch.tensor([1.0, 0.0, 1.0])[None] / (2 * sigma[:, None] ** 2))  # (B, 3)
    taps = taps / taps.sum(1, keepdim=True)
    kernel = (taps[:, :, None] * taps[:, None, :]).repeat_interleave(c, 0)[:, None]  # (B*C, 1, 3, 3)
    blurred = F.conv2d(F.pad(out.reshape(1, b * c, h, w), (1, 1, 1, 1), mode="replicate"), kernel,
                       groups=b * c).reshape(b, c, h, w)
    region = _boxes(b, h, w, torch.full((b,), 1e-6), gen, max_block=1.0, slots=1)[:, None]
    out = torch.where(region, blurred, out)
    noise = _boxes(b, h, w, max_drop * torch.rand(b, generator=gen), gen)[:, None]  # (B, 1, H, W)
    out = torch.where(noise, torch.randn(out.shape, generator=gen), out)
    other = (torch.arange(b) + torch.randint(1, b, (1,), generator=gen)) % b  # another image for each
    swap = _boxes(b, h, w, max_drop * torch.rand(b, generator=gen), gen)[:, None]
    out = torch.where(swap, out[other], out)
    return out, (noise | swap)[:, 0]


def _affine(images: torch.Tensor, shift: torch.Tensor, angle: torch.Tensor, scale: torch.Tensor,
            fill: float) -> torch.Tensor:
    """Warp (N, C, H, W) by a rotation `angle` (rad), zoom `scale` and `shift` (N, 2) in pixels (x, y); the area
    uncovered takes the value `fill` (the normalized black)."""
    n, _, h, w = images.shape
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin * h / w, -2 * shift[:, 0] / w], 1),
                         torch.stack([sin * w / h, cos, -2 * shift[:, 1] / h], 1)], 1)  # (N, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images - fill, grid, align_corners=False) + fill


def random_views(images: torch.Tensor, gen: torch.Generator, fill: float, max_shift: float = 2.0,
                 scale: tuple[float, float] = (0.85, 1.0), hflip: float = 0.5) -> torch.Tensor:
    """One random view per image: zoom out to `scale`, shift by up to `max_shift` px, flip horizontally."""
    n = images.shape[0]
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * max_shift
    zoom = scale[0] + (scale[1] - scale[0]) * torch.rand(n, generator=gen)
    out = _affine(images, shift, torch.zeros(n), zoom, fill)
    flip = torch.rand(n, generator=gen) < hflip
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def motion_sequences(images: torch.Tensor, gen: torch.Generator, fill: float, frames: int = 3,
                     max_shift: float = 2.5, max_angle: float = 12.0) -> torch.Tensor:
    """Frame sequences (B, T, C, H, W): each image moves at a constant seeded velocity (up to `max_shift` px and
    `max_angle` degrees per frame), frames centred on the original image."""
    b = images.shape[0]
    velocity = (torch.rand(b, 3, generator=gen) * 2 - 1) * torch.tensor([max_shift, max_shift, math.radians(max_angle)])
    steps = torch.arange(frames, dtype=torch.float32) - (frames - 1) / 2  # (T,) e.g. -1, 0, 1
    motion = steps[None, :, None] * velocity[:, None, :]  # (B, T, 3): dx, dy, angle of each frame
    tiled = images[:, None].expand(-1, frames, -1, -1, -1).flatten(0, 1)  # (B*T, C, H, W)
    moved = _affine(tiled, motion[..., :2].flatten(0, 1), motion[..., 2].flatten(), torch.ones(b * frames), fill)
    return moved.unflatten(0, (b, frames))


_ORDERS = torch.tensor(list(itertools.permutations(range(3))))  # (6, 3); row 0 is the true order


def order_verification_batch(reps: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """TOV: representations (B, 3, D) of frames in temporal order -> (B, 3D) concatenated in one of the 6 orders,
    each drawn with probability 1/6, and targets (B,) 0 for the true order, 1 for a shuffled one (`builder.py`)."""
    b, t, d = reps.shape
    which = torch.randint(0, len(_ORDERS), (b,), generator=gen)
    order = _ORDERS[which].to(reps.device)  # (B, 3)
    shuffled = torch.gather(reps, 1, order[:, :, None].expand(-1, -1, d))  # (B, 3, D)
    return shuffled.flatten(1), (which != 0).float().to(reps.device)


# ---------------------------------------------------------------------------------------------------------------------
# the methods: heads around a backbone; `loss(images, gen)` -> (loss, {term: value})


def _check_vit(model: nn.Module, method: str) -> None:
    why = None
    if not isinstance(model, VisionTransformer):
        why = f"{type(model).__name__} is not a timm VisionTransformer"
    elif model.cls_token is None or model.num_prefix_tokens != 1 or model.no_embed_class or model.dynamic_img_size:
        why = "its tokens are not one class token + a fixed patch grid"
    if why:
        raise PretrainError(f"--method {method} supports timm VisionTransformer backbones with one class token "
                            f"(e.g. vl_vit_fmnist, vl_test_vit); {why}: use --method tov-vicreg, which needs only "
                            "pooled features")


class SiT(nn.Module):
    """SiT's pretraining heads around a timm VisionTransformer `backbone` (see the module docstring)."""

    def __init__(self, backbone: nn.Module, contrastive_dim: int = 512, temperature: float = 0.5):
        super().__init__()
        _check_vit(backbone, "sit")
        self.backbone, self.temperature = backbone, temperature
        c, h, w = default_preprocessing(backbone)["input_size"]
        gh, gw = backbone.patch_embed.grid_size
        if h != w or h % gh or w % gw:
            raise PretrainError(f"--method sit supports square inputs whose size is a multiple of the token grid; "
                                f"{h}x{w} over a {gh}x{gw} grid is not")
        d = backbone.embed_dim
        self.grid = (gh, gw)
        self.rot_token = nn.Parameter(torch.zeros(1, 1, d))
        self.rot_pos = nn.Parameter(torch.zeros(1, 1, d))
        nn.init.trunc_normal_(self.rot_token, std=0.02)
        nn.init.trunc_normal_(self.rot_pos, std=0.02)
        self.rot_head = nn.Linear(d, 4)
        self.contrastive_head = nn.Linear(d, contrastive_dim)
        self.recons = nn.ConvTranspose2d(d, c, kernel_size=(h // gh, w // gw), stride=(h // gh, w // gw))
        self.task_weights = nn.Parameter(torch.ones(3))  # s of rotation, contrastive, reconstruction

    def no_weight_decay(self) -> set[str]:
        return {"rot_token", "rot_pos"} | {f"backbone.{n}" for n in self.backbone.no_weight_decay()}

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rotation logits (B, 4), contrastive embedding (B, E), reconstruction (B, C, H, W))."""
        vit = self.backbone
        x = vit._pos_embed(vit.patch_embed(images))  # (B, 1 + N, D): class token first
        rot = (self.rot_token + self.rot_pos).expand(x.shape[0], -1, -1)
        x = torch.cat([x[:, :1], rot, x[:, 1:]], dim=1)  # (B, 2 + N, D)
        x = vit.norm(vit.blocks(vit.norm_pre(vit.patch_drop(x))))
        patches = x[:, 2:].transpose(1, 2).unflatten(2, self.grid)  # (B, D, gh, gw)
        return self.rot_head(x[:, 1]), self.contrastive_head(x[:, 0]), self.recons(patches)

    def loss(self, images: torch.Tensor, gen: torch.Generator, fill: float) -> tuple[torch.Tensor, dict]:
        """SiT's weighted sum over two rotated, corrupted views of each image (B, C, H, W); `fill`: black, normalized."""
        b = images.shape[0]
        labels = torch.randint(0, 4, (2 * b,), generator=gen)
        clean = rotate(random_views(images.repeat(2, 1, 1, 1), gen, fill), labels)  # (2B, C, H, W): view 1, view 2
        corrupted, _ = corrupt(clean, gen)
        rot_logits, embedding, recon = self(corrupted.to(images.device))
        labels, clean = labels.to(images.device), clean.to(images.device)
        terms = {"rotation": F.cross_entropy(rot_logits, labels),
                 "contrastive": nt_xent(embedding[:b], embedding[b:], self.temperature),
                 "reconstruction": F.l1_loss(recon, clean)}
        s = self.task_weights
        loss = (uncertainty_weighted(terms["rotation"], s[0], 1.0) + uncertainty_weighted(terms["contrastive"], s[1], 1.0)
                + uncertainty_weighted(terms["reconstruction"], s[2], 0.5))
        return loss, terms


class TOVVICReg(nn.Module):
    """VICReg projector and temporal-order head around any timm `backbone` (pooled pre-logits features).

    Defaults are TOV-VICReg's ViT run (`run_tov-vicreg.sh`: sim = std = cov = 10, temporal 0.1) with a smaller
    projector (`mlp`: hidden and output widths of the Linear-BN-ReLU-Linear projector; the run's was 1024-1024-512).
    """

    def __init__(self, backbone: nn.Module, mlp: tuple[int, ...] = (512, 512), sim_coeff: float = 10.0,
                 std_coeff: float = 10.0, cov_coeff: float = 10.0, temporal_coeff: float = 0.1):
        super().__init__()
        self.backbone = backbone
        d = backbone.num_features
        dims = (d, *mlp)
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-2], dims[1:-1]):
            layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
        self.projector = nn.Sequential(*layers, nn.Linear(dims[-2], dims[-1], bias=False))
        self.order_head = nn.Linear(3 * d, 1)
        self.coeffs = dict(invariance=sim_coeff, variance=std_coeff, covariance=cov_coeff, temporal=temporal_coeff)

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{n}" for n in getattr(self.backbone, "no_weight_decay", set)()}

    def represent(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_head(self.backbone.forward_features(images), pre_logits=True)

    def loss(self, images: torch.Tensor, gen: torch.Generator, fill: float) -> tuple[torch.Tensor, dict]:
        """VICReg on two views of frame t + order verification of (t-1, t, t+1), each frame a random view."""
        b = images.shape[0]
        frames = motion_sequences(images.cpu(), gen, fill)  # (B, 3, C, H, W): t-1, t, t+1
        views = torch.cat([frames[:, 1], frames[:, 1], frames[:, 0], frames[:, 2]])  # x, y (frame t), z, w
        reps = self.represent(random_views(views, gen, fill).to(images.device))  # (4B, D)
        x, y, before, after = reps.split(b)
        terms = vicreg_terms(self.projector(x), self.projector(y))
        ordered = torch.stack([before, x, after], dim=1)  # (B, 3, D) in temporal order
        shuffled, targets = order_verification_batch(ordered, gen)
        terms["temporal"] = F.binary_cross_entropy_with_logits(self.order_head(shuffled)[:, 0], targets)
        return sum(self.coeffs[k] * v for k, v in terms.items()), terms


# ---------------------------------------------------------------------------------------------------------------------
# the run


@dataclass
class PretrainConfig:
    out: str
    model: str                              # model name or checkpoint folder (the backbone to pretrain)
    method: str = "sit"
    model_kwargs: dict = field(default_factory=dict)
    data: str = "fashion-mnist"
    data_dir: str | None = None
    epochs: float = 1.0
    batch_size: int = 128
    lr: float = 5e-4                        # SiT's and TOV-VICReg-with-AdamW's base lr
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 0.1
    clip_grad: float | None = 3.0           # SiT's
    seed: int = 0
    threads: int | None = None
    max_steps: int | None = None            # stop early (smoke runs); the schedule still spans `epochs`
    progress: bool = True

    def validate(self) -> None:
        if self.method not in METHODS:
            raise PretrainError(f"--method {self.method!r} is unknown: use one of {', '.join(METHODS)}")
        for name in ("epochs", "batch_size", "lr"):
            if getattr(self, name) <= 0:
                raise PretrainError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.batch_size < 4:
            raise PretrainError(f"--batch-size {self.batch_size}: contrastive and VICReg losses compare images of a "
                                "batch; use at least 4 (e.g. 128)")


class VideoMAEMethod(nn.Module):
    """VideoMAE pre-training of a `vl_videomae_*` backbone (see the module docstring)."""

    def __init__(self, backbone: nn.Module, mask_ratio: float = 0.9, decoder_depth: int = 4,
                 decoder_mask_ratio: float = 0.0):
        super().__init__()

        if not isinstance(backbone, VideoMAE):
            method = "videomae2" if decoder_mask_ratio else "videomae"
            raise PretrainError(f"--method {method} supports VideoMAE backbones (vl_videomae_*), not "
                                f"{type(backbone).__name__}: e.g. vitlab pretrain vl_videomae_mfmnist --data "
                                "moving-fashion-mnist-cls ...")
        heads = max(1, backbone.blocks[0].attn.num_heads // 2) if len(backbone.blocks) else 1
        self.trainer = VideoMAEPretrainer(backbone, decoder_dim=backbone.embed_dim // 2, decoder_depth=decoder_depth,
                                          decoder_heads=heads, mask_ratio=mask_ratio,
                                          decoder_mask_ratio=decoder_mask_ratio)

    def no_weight_decay(self) -> set[str]:
        return {"trainer.mask_token"}

    def loss(self, images: torch.Tensor, gen: torch.Generator, fill: float) -> tuple[torch.Tensor, dict]:
        if images.dim() != 5:
            raise PretrainError(f"--method videomae pretrains on clips (B, C, T, H, W); the data gives "
                                f"{tuple(images.shape)}: use a video set, e.g. --data moving-fashion-mnist-cls")
        loss = self.trainer.loss(images, generator=gen)
        return loss, {"reconstruction": loss.detach()}


def _build(cfg: PretrainConfig) -> tuple[nn.Module, nn.Module, torch.utils.data.Dataset, dict]:
    """(backbone, method module, unlabelled train split, preprocessing)."""
    info = dataset_info(cfg.data, data_dir=cfg.data_dir)
    kwargs = dict(cfg.model_kwargs)
    if not is_checkpoint(cfg.model):
        kwargs.setdefault("num_classes", info["num_classes"])
    backbone = create_model(cfg.model, **kwargs)
    pre = default_preprocessing(backbone, class_names=info["classes"])
    c, h, w = pre["input_size"]
    data = build_dataset(cfg.data, "train", img_size=(h, w), in_chans=c, mean=pre["mean"], std=pre["std"],
                         data_dir=cfg.data_dir)
    method = {"sit": SiT, "tov-vicreg": TOVVICReg, "videomae": VideoMAEMethod,
              "videomae2": partial(VideoMAEMethod, decoder_mask_ratio=0.5)}[cfg.method](backbone)
    return backbone, method, data, pre


def pretrain(cfg: PretrainConfig, overwrite: bool = False) -> Path:
    """Pretrain `cfg.model` with `cfg.method` on the images of `cfg.data`'s train split (labels unused); write the
    backbone's checkpoint (each epoch, atomically) and `pretrain.jsonl` (the loss terms per epoch) into `cfg.out`."""
    cfg.validate()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise PretrainError("vitlab pretrain runs in one process: launch it without torchrun")
    out = Path(cfg.out)
    if not overwrite and (is_checkpoint(out) or (out / METRICS_FILE).exists()):
        raise PretrainError(f"--out {out} already holds a checkpoint or a pretraining run: choose another --out or "
                            "pass --overwrite")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    backbone, method, data, pre = _build(cfg)
    steps_per_epoch = len(data) // cfg.batch_size
    if steps_per_epoch == 0:
        raise PretrainError(f"--batch-size {cfg.batch_size} is larger than the {len(data)} training images")
    total = max(2, math.ceil(cfg.epochs * steps_per_epoch))
    optimizer = timm.optim.create_optimizer_v2(method, opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total - 1)
    scheduler = timm.scheduler.CosineLRScheduler(
        optimizer, t_initial=total - warmup, lr_min=cfg.min_lr, warmup_t=warmup, warmup_lr_init=cfg.lr * 1e-3,
        warmup_prefix=True, t_in_epochs=False)
    fill = -pre["mean"][0] / pre["std"][0]  # a black pixel, normalized
    lock = lock_folder(out, "vitlab pretrain", "--out")
    progress = _Progress(enabled=cfg.progress, total=total, done=0, every=max(1, steps_per_epoch // 10))
    history, step, start = [], 0, time.perf_counter()
    stop = min(total, cfg.max_steps or total)
    try:
        for epoch in itertools.count():
            method.train()
            perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
            sums, seen, epoch_start = {}, 0, time.perf_counter()
            for i in range(steps_per_epoch):
                rows = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size].tolist()
                images = torch.stack([data[r][0] for r in rows])  # (B, C, H, W)
                gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
                loss, terms = method.loss(images, gen, fill)
                if not torch.isfinite(loss):
                    raise PretrainError(f"the {cfg.method} loss became {loss.item()} at step {step}: lower --lr "
                                        f"(now {cfg.lr:g})")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.clip_grad:
                    nn.utils.clip_grad_norm_(method.parameters(), cfg.clip_grad)
                optimizer.step()
                step += 1
                scheduler.step_update(step)
                for k, v in {"loss": loss, **terms}.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(rows)
                seen += len(rows)
                progress.update(step, epoch, loss.item(), optimizer.param_groups[0]["lr"],
                                seen / (time.perf_counter() - epoch_start))
                if step >= stop:
                    break
            record = {"epoch": epoch + seen / (steps_per_epoch * cfg.batch_size), "step": step,
                      **{k: v / seen for k, v in sums.items()}, "elapsed_s": time.perf_counter() - start}
            history.append(record)
            progress.log(record)
            save_checkpoint(backbone, out, preprocessing=pre, data={"spec": str(cfg.data), "split": "train"},
                            training={"pretrain": dataclasses.asdict(cfg), "global_step": step})
            atomic_write_text(out / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in history))
            if step >= stop:
                return out
    finally:
        progress.close()
        lock.release()
