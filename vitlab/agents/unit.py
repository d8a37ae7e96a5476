"""UNIT: teach a trained image ViT to read rendered words without forgetting its images.

Zhu et al., "UNIT: Unifying Image and Text Recognition in One Vision Encoder" (NeurIPS 2024, arXiv 2409.04095). The
official repository (yeezhu/UNIT@b26f2dc) releases only the trained encoder and its inference code (`unit/hf_model.py`,
RADIO's patch generator), no training code, so what follows implements the paper's text, checked here by tests:

- **Language decoder.** A lightweight decoder reads the encoder's tokens of text images and is trained to output
  the text (the paper: OPT-125M, autoregressive, L_lan = -sum_t log P(y_t | y_<t, z)). Here the decoder is a CTC
  head (Graves et al., 2006) on the ViT's tokens: the token grid (h x w) of a word image is read as w columns left
  to right, each column's h tokens concatenated, and one linear layer gives each column a distribution over blank +
  the alphabet; the loss is torch's `ctc_loss` (blank 0) and decoding is best path (argmax per column, repeats merged,
  blanks dropped, `ctc_greedy_decode`). A CTC head is the lightest decoder that reads a word; the paper's
  autoregressive decoder is not reproduced.
- **Vision decoder against forgetting.** On ordinary images the trained encoder's tokens go through a lightweight
  vision decoder f_pi and must reproduce the tokens x_hat of a frozen copy of the original encoder,
  L_vis = sum_i L_cos(f_pi(x_i), x_hat_i) + mu L_l1(f_pi(x_i), x_hat_i) over the natural images i. Here f_pi is
  a residual 2-layer MLP whose last layer starts at zero, so it starts as the identity and L_vis is exactly 0 for
  the unchanged encoder; the sum over tokens is a mean and L_cos = 1 - cosine similarity.
- **Joint training.** Every step takes one batch of word images (L_lan) and one batch of ordinary images (lambda
  L_vis); the decoders are dropped afterwards, so the encoder keeps the original architecture (the paper's "cost-free
  deployment") and its original classifier head (frozen here) still reads its class token. The paper's two stages
  (intra-scale pretraining, inter-scale fine-tuning on scale-exchanged data) and its captioning task are not
  reproduced: there is one scale here (28 px high words, 28x28 items).

Toy: the Fashion-MNIST reference ViT (`checkpoints/fashion-mnist-reference-v2`, 4-conv stem of stride 4, 64 wide, 4
blocks) reads random lowercase words of 3-5 letters rendered white on black with Pillow's bundled font
(`ImageFont.load_default(size=N)`, no system fonts; sizes and positions drawn from a seeded generator) on 28 x 84
images (7 x 21 tokens; the 7 x 7 position embedding resampled to the grid, timm's `resample_abs_pos_embed`). The
baseline trains the same encoder and language decoder on the same word batches for the same steps without the
vision decoder. Reported: character accuracy (1 - edit distance / length) on held-out words and Fashion-MNIST top-1
of the original head on the trained encoder.
"""
from __future__ import annotations

import copy
import math
import time
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from timm.layers import resample_abs_pos_embed
from torch import Tensor

from ..checkpoint import create_model
from ..data.fashion_mnist import FMNIST_DIR, load_split
from .registry import register_toy

__all__ = ["ALPHABET", "random_words", "render_word", "render_words", "encode_text", "ctc_collapse",
           "ctc_greedy_decode", "edit_distance", "char_accuracy", "vit_tokens", "VisionDecoder", "vision_loss",
           "UNIT", "train_unit", "read_words", "top1", "compare", "run"]

ALPHABET = "abcdefghijklmnopqrstuvwxyz"
BLANK = 0                     # CTC blank; letter k of ALPHABET is class k + 1
HEIGHT, WIDTH = 28, 84        # word images: 7 x 21 tokens after the stride-4 stem
FONT_SIZES = (13, 16)         # inclusive range of font sizes; 'mmmmm' at 16 px is 70 px wide, so every word fits
WORD_LENGTHS = (3, 5)         # inclusive range of word lengths


# ------------------------------------------------------------------------------------------------ rendered words
def random_words(n: int, generator: torch.Generator, lengths: tuple[int, int] = WORD_LENGTHS,
                 alphabet: str = ALPHABET) -> list[str]:
    """`n` words of uniformly random length in `lengths` (inclusive) and uniformly random letters of `alphabet`."""
    sizes = torch.randint(lengths[0], lengths[1] + 1, (n,), generator=generator).tolist()
    letters = torch.randint(0, len(alphabet), (sum(sizes),), generator=generator).tolist()
    words, start = [], 0
    for size in sizes:
        words.append("".join(alphabet[i] for i in letters[start:start + size]))
        start += size
    return words


@lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled font (Aileron) at `size` px; needs no system font."""
    return ImageFont.load_default(size=size)


def render_word(word: str, size: int, fx: float, fy: float, height: int = HEIGHT, width: int = WIDTH) -> Tensor:
    """uint8 (height, width): `word` in white on black at font `size`; `fx`, `fy` in 0-1 place the text's ink box
    within the free room (0 = left / top, 1 = right / bottom)."""
    font = _font(size)
    left, top, right, bottom = font.getbbox(word)
    room_x, room_y = width - (right - left), height - (bottom - top)
    if room_x < 0 or room_y < 0:
        raise ValueError(f"{word!r} at font size {size} ({right - left}x{bottom - top} px) does not fit "
                         f"{width}x{height}")
    image = Image.new("L", (width, height), 0)
    ImageDraw.Draw(image).text((round(fx * room_x) - left, round(fy * room_y) - top), word, fill=255, font=font)
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(height, width)


def render_words(n: int, seed: int, height: int = HEIGHT, width: int = WIDTH, sizes: tuple[int, int] = FONT_SIZES,
                 lengths: tuple[int, int] = WORD_LENGTHS) -> tuple[Tensor, list[str]]:
    """(uint8 images (n, 1, height, width), words): `n` random words, each at a random font size in `sizes`
    (inclusive) and a random place; the same `seed` gives the same images and words."""
    gen = torch.Generator().manual_seed(seed)
    words = random_words(n, gen, lengths)
    font_sizes = torch.randint(sizes[0], sizes[1] + 1, (n,), generator=gen).tolist()
    places = torch.rand(n, 2, generator=gen).tolist()
    images = torch.stack([render_word(w, s, fx, fy, height, width)
                          for w, s, (fx, fy) in zip(words, font_sizes, places)])
    return images[:, None], words


def encode_text(words: list[str], alphabet: str = ALPHABET) -> tuple[Tensor, Tensor]:
    """(targets (sum of lengths,), lengths (B,)): the concatenated class ids (letter k -> k + 1) that `ctc_loss`
    takes."""
    index = {c: i + 1 for i, c in enumerate(alphabet)}
    return (torch.tensor([index[c] for w in words for c in w], dtype=torch.long),
            torch.tensor([len(w) for w in words], dtype=torch.long))


# ------------------------------------------------------------------------------------------------------ CTC
def ctc_collapse(path: list[int], blank: int = BLANK) -> list[int]:
    """CTC's many-to-one map B: merge runs of equal labels, then drop blanks ([a, a, -, a, b] -> [a, a, b])."""
    out: list[int] = []
    prev = None
    for label in path:
        if label != prev and label != blank:
            out.append(label)
        prev = label
    return out


def ctc_greedy_decode(logits: Tensor, alphabet: str = ALPHABET) -> list[str]:
    """Best-path decoding of (B, T, 1 + len(alphabet)) column scores: B(argmax per column), as text."""
    return ["".join(alphabet[k - 1] for k in ctc_collapse(path)) for path in logits.argmax(-1).tolist()]


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (unit-cost insertions, deletions, substitutions) by dynamic programming."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def char_accuracy(predicted: list[str], truth: list[str]) -> float:
    """1 - (total edit distance) / (total characters of `truth`): 1 - the character error rate, clamped at 0."""
    errors = sum(edit_distance(p, t) for p, t in zip(predicted, truth))
    return max(0.0, 1.0 - errors / max(1, sum(len(t) for t in truth)))


# ------------------------------------------------------------------------------------------- encoder, decoders
def vit_tokens(vit: nn.Module, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """(tokens (B, 1 + h*w, dim) after the final norm, (h, w)) of a timm ViT with a `HybridEmbed` stem (vitlab's
    `vl_vit_fmnist`) at any input size: the stem's feature grid sets (h, w) and the learned position embedding is
    resampled to it (timm's `resample_abs_pos_embed`, bicubic). At the trained size it equals `forward_features`."""
    feat = vit.patch_embed.proj(vit.patch_embed.backbone(x))                    # [B, dim, h, w]
    h, w = feat.shape[-2:]
    patches = feat.flatten(2).transpose(1, 2)                                  # [B, h*w, dim]
    prefix = vit.num_prefix_tokens
    pos = vit.pos_embed
    if pos.shape[1] - prefix != h * w:
        pos = resample_abs_pos_embed(pos, (h, w), num_prefix_tokens=prefix)     # [1, prefix + h*w, dim]
    tokens = torch.cat([vit.cls_token.expand(len(x), -1, -1), patches], dim=1) + pos
    tokens = vit.blocks(vit.norm_pre(tokens))
    return vit.norm(tokens), (int(h), int(w))


class VisionDecoder(nn.Module):
    """f_pi: x + fc2(GELU(fc1(x))) per token; fc2 starts at zero, so the decoder starts as the identity."""

    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden or 2 * dim)
        self.fc2 = nn.Linear(hidden or 2 * dim, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(F.gelu(self.fc1(x)))


def vision_loss(pred: Tensor, target: Tensor, mu: float = 1.0) -> Tensor:
    """UNIT's L_vis over tokens (..., dim): mean of (1 - cos(pred, target)) + mu * mean |pred - target|."""
    cos = F.cosine_similarity(pred, target, dim=-1)
    return (1.0 - cos).mean() + mu * (pred - target).abs().mean()


class UNIT(nn.Module):
    """A trained timm ViT (`encoder`, trained; its classifier head frozen), a frozen copy of it (`teacher`), the CTC
    language decoder (`text_head`) and, when `vision_decoder`, the anti-forgetting vision decoder."""

    def __init__(self, vit: nn.Module, alphabet: str = ALPHABET, vision_decoder: bool = True, text_rows: int = 7):
        super().__init__()
        self.alphabet, self.text_rows = alphabet, text_rows
        self.encoder = vit
        self.teacher = copy.deepcopy(vit).eval().requires_grad_(False)
        vit.get_classifier().requires_grad_(False)
        self.text_head = nn.Linear(text_rows * vit.embed_dim, 1 + len(alphabet))
        self.vision_decoder = VisionDecoder(vit.embed_dim) if vision_decoder else None

    def train(self, mode: bool = True) -> "UNIT":
        super().train(mode)
        self.teacher.eval()
        return self

    def text_logits(self, words: Tensor) -> Tensor:
        """Column scores (B, w, 1 + len(alphabet)) of word images: each column's h tokens, concatenated top to
        bottom, through one linear layer."""
        tokens, (h, w) = vit_tokens(self.encoder, words)
        if h != self.text_rows:
            raise ValueError(f"word images give {h} token rows; this text head reads {self.text_rows} "
                             f"(build UNIT(text_rows={h}) for these images)")
        grid = tokens[:, self.encoder.num_prefix_tokens:].reshape(len(words), h, w, -1)   # [B, h, w, dim]
        columns = grid.permute(0, 2, 1, 3).flatten(2)                                     # [B, w, h*dim]
        return self.text_head(columns)                                                    # [B, w, C]

    def text_loss(self, words: Tensor, text: list[str]) -> Tensor:
        """CTC loss (torch `ctc_loss`, blank 0, mean over the batch of the per-word loss / its length)."""
        logp = self.text_logits(words).log_softmax(-1).transpose(0, 1)                    # [T, B, C]
        targets, lengths = encode_text(text, self.alphabet)
        inputs = torch.full((len(text),), logp.shape[0], dtype=torch.long)
        return F.ctc_loss(logp, targets, inputs, lengths, blank=BLANK, zero_infinity=True)

    def vision_loss(self, images: Tensor, mu: float = 1.0) -> Tensor:
        """L_vis between f_pi(the encoder's tokens) and the frozen teacher's tokens of ordinary `images`."""
        if self.vision_decoder is None:
            raise ValueError("this UNIT has no vision decoder (vision_decoder=False)")
        with torch.no_grad():
            target, _ = vit_tokens(self.teacher, images)
        tokens, _ = vit_tokens(self.encoder, images)
        return vision_loss(self.vision_decoder(tokens), target, mu)

    def classify(self, images: Tensor) -> Tensor:
        """Class logits of the original (frozen) head on the trained encoder."""
        return self.encoder.forward_head(vit_tokens(self.encoder, images)[0])


# ---------------------------------------------------------------------------------------------------- training
def _normalise(x: Tensor, vit: nn.Module) -> Tensor:
    """uint8 images -> the encoder's input (its pretrained_cfg mean / std)."""
    cfg = vit.pretrained_cfg
    return (x.float() / 255.0 - cfg["mean"][0]) / cfg["std"][0]


def train_unit(model: UNIT, words: tuple[Tensor, list[str]], images: Tensor, steps: int, batch_size: int = 32,
               image_batch: int = 32, lr: float = 2e-3, head_lr_scale: float = 5.0, lam: float = 1.0,
               mu: float = 1.0, seed: int = 0) -> list[float]:
    """AdamW (weight decay 0.05; the new text head at `head_lr_scale` x `lr`, which gets CTC past its all-blank
    plateau sooner), warm-up over 10 % of the steps then cosine, gradient norm clipped at 1. Each step:
    L_lan on `batch_size` seeded random word images, plus lam * L_vis on `image_batch` seeded random ordinary
    `images` (uint8 (N, 1, 28, 28)) when the model has a vision decoder. Returns the per-step total loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    head = {id(p) for p in model.text_head.parameters()}
    opt = torch.optim.AdamW([{"params": [p for p in params if id(p) not in head], "lr": lr},
                             {"params": list(model.text_head.parameters()), "lr": lr * head_lr_scale}],
                            weight_decay=0.05)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, max(0, s - warm) / max(1, steps - warm)))))
    word_gen = torch.Generator().manual_seed(seed)            # own generators: both arms see the same word batches
    image_gen = torch.Generator().manual_seed(seed + 1)
    word_images, text = words
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(text), (batch_size,), generator=word_gen)
        loss = model.text_loss(_normalise(word_images[idx], model.encoder), [text[i] for i in idx.tolist()])
        if model.vision_decoder is not None:
            pick = torch.randint(0, len(images), (image_batch,), generator=image_gen)
            loss = loss + lam * model.vision_loss(_normalise(images[pick], model.encoder), mu)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def read_words(model: UNIT, word_images: Tensor, batch_size: int = 256) -> list[str]:
    """Best-path CTC reading of uint8 word images (N, 1, H, W)."""
    model.eval()
    out: list[str] = []
    for chunk in word_images.split(batch_size):
        out += ctc_greedy_decode(model.text_logits(_normalise(chunk, model.encoder)), model.alphabet)
    return out


@torch.no_grad()
def top1(model: UNIT, images: Tensor, labels: Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy (%) of the original head on the trained encoder over uint8 images (N, 1, 28, 28)."""
    model.eval()
    correct = sum(int((model.classify(_normalise(x, model.encoder)).argmax(-1) == y).sum())
                  for x, y in zip(images.split(batch_size), labels.split(batch_size)))
    return 100.0 * correct / len(labels)


def compare(steps: int, init: str, seed: int = 0, train_words: int = 4000, test_words: int = 1000,
            test_images: int | None = None, batch_size: int = 32, lr: float = 2e-3, lam: float = 1.0,
            mu: float = 1.0) -> dict[str, float]:
    """UNIT (language + vision decoder) and the language decoder alone, trained from the ViT `init` on the same
    word batches for the same steps; character / word accuracy on held-out words and Fashion-MNIST test top-1 of
    the original head (the teacher's = before training)."""
    train_images, _ = load_split(FMNIST_DIR, "train")
    train_images = train_images[:55000]                       # vitlab's train split (the last 5k are validation)
    test_x, test_y = load_split(FMNIST_DIR, "test")
    if test_images is not None:
        test_x, test_y = test_x[:test_images], test_y[:test_images]
    words = render_words(train_words, seed=1000 + seed)
    held_out, truth = render_words(test_words, seed=10_000_000 + seed)
    metrics: dict[str, float] = {"steps": steps, "batch_size": batch_size, "test_words": test_words,
                                 "test_images": len(test_y)}
    for name, decoder in (("unit", True), ("text_only", False)):
        torch.manual_seed(seed)
        model = UNIT(create_model(init), vision_decoder=decoder)
        if name == "unit":
            metrics["teacher_top1"] = round(top1(model, test_x, test_y), 2)
        start = time.perf_counter()
        losses = train_unit(model, words, train_images, steps, batch_size, lr=lr, lam=lam, mu=mu, seed=seed)
        metrics[f"{name}_train_s"] = round(time.perf_counter() - start, 1)
        metrics[f"{name}_final_loss"] = round(sum(losses[-10:]) / max(1, len(losses[-10:])), 4)
        read = read_words(model, held_out)
        metrics[f"{name}_char_acc"] = round(100 * char_accuracy(read, truth), 2)
        metrics[f"{name}_word_acc"] = round(100 * sum(r == t for r, t in zip(read, truth)) / len(truth), 2)
        metrics[f"{name}_top1"] = round(top1(model, test_x, test_y), 2)
        metrics[f"{name}_top1_drop"] = round(metrics["teacher_top1"] - metrics[f"{name}_top1"], 2)
    return metrics


@register_toy("unit", "UNIT: a CTC word reader added to the Fashion-MNIST ViT, with/without the anti-forgetting "
              "vision decoder")
def run(out: Path, seed: int, quick: bool) -> dict[str, float | str]:
    """Train UNIT and the text-only baseline for the same steps on the reference ViT; character accuracy on held-out
    rendered words and the Fashion-MNIST top-1 drop of both (targets: >= 90 %; drop <= 1 pt with the vision decoder,
    larger without)."""
    if quick:
        return compare(steps=2, init="vl_vit_fmnist", seed=seed, train_words=16, test_words=8, test_images=64,
                       batch_size=4)
    return compare(steps=300, init="checkpoints/fashion-mnist-reference-v2", seed=seed)
