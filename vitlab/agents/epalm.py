"""eP-ALM: a frozen ViT and a frozen language model joined by one linear connector and a soft prompt.

Shukor, Dancette & Cord, "eP-ALM: Efficient Perceptual Augmentation of Language Models" (ICCV 2023); official code
github.com/mshukor/eP-ALM at 9ecfeb9 (`models/epalm.py` `ePALM.forward`, `models/opt.py` `OPTDecoder.forward`,
`configs/image/ePALM_pt_L_caption.yaml`). Both pretrained models stay frozen; what trains is

- one linear connector (`shared_connector: True`) that maps the CLS token of each of the ViT's last
  `inject_vit_layers` blocks, taken after the ViT's final norm (official `models/vit.py`: `self.norm(x)` per block),
  to the LM width;
- a soft prompt of `prompt_len` vectors (`prompt_tuning: True, mlp: False`) prepended to the text embeddings, without
  positional embeddings (as in `OPTDecoder.forward`: the text keeps positions 0..L-1).

Injection (`OPTDecoder.forward`): at LM layer `start_layer` the projected CLS token is prepended to the hidden
states (position 0, before the prompt); at every later layer below `end_layer` position 0 is replaced by the
projected CLS token of the ViT block `injection_plan` assigns to it (consecutive runs of `step` LM layers per ViT
block, the last block for the deepest layers). One deliberate difference: the official code pads the additive mask
with zeros, so the visual token's row also attends to later text tokens; here every position, the visual token
included, attends causally (position 0 sees only itself), so a caption's token never depends on later tokens and
greedy generation with a KV cache equals teacher forcing on its own output (tested).

The toy (`vitlab toy epalm`): vitlab's reference ViT (`checkpoints/fashion-mnist-reference-v2`) is the vision
encoder; a 4-layer GPT-2 (transformers `GPT2LMHeadModel`, width 128, a word-level vocabulary) is pretrained here,
text only, on templated captions of Fashion-MNIST items ("a photo of a sneaker", ...), then frozen; eP-ALM trains the
connector + prompt on (image, caption) pairs. Half the pretraining rows name one item twice ("a photo of a coat . the
coat is shown here"): an LM pretrained on single captions only has learned that nothing before the item's name
predicts it, and the visual token barely moved its output (naming stayed at chance after 400 steps, class-logit
spread 0.001-0.02 across images); with context to read the item from, as in real text, the token can play that
context. It is scored by item-naming accuracy of greedy captions of test images,
beside the LM alone (the text-only prior) and full fine-tuning of the LM + connector + prompt at equal steps.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import create_model
from ..data.fashion_mnist import FMNIST_DIR, FMNIST_MEAN, FMNIST_STD, VAL_SIZE, load_split
from ..data.spec import holdout
from .registry import ToyError, register_toy

__all__ = ["CLASS_NAMES", "TEMPLATES", "Vocab", "EPALMConfig", "EPALM", "injection_plan", "lm_config",
           "captions", "lm_corpus", "split_rows", "load_images", "pretrain_lm", "train_captioner", "naming_accuracy",
           "prior_accuracy", "trainable_count", "compare", "run", "STEPS", "LEARNING_RATES"]

CHECKPOINT = "checkpoints/fashion-mnist-reference-v2"
FMNIST_SIZES = (60000, 10000)   # images in the train and t10k files
CLASS_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
TEMPLATES = ("a photo of a {}", "a picture of the {}", "this is a {}", "the {} is shown here",
             "a small grey image of a {}", "here we see a {}")
SPECIALS = ("<pad>", "<bos>", "<eos>")
SEPARATOR = "."     # joins two captions of one item in the LM's pretraining text


class Vocab:
    """Word-level vocabulary of the templated captions: ids 0/1/2 are <pad>/<bos>/<eos>."""

    def __init__(self) -> None:
        words = {w for t in TEMPLATES for w in t.format("").split()} | {w for c in CLASS_NAMES for w in c.split()}
        words = sorted(words | {SEPARATOR})
        self.words = list(SPECIALS) + words
        self.index = {w: i for i, w in enumerate(self.words)}
        self.pad, self.bos, self.eos = 0, 1, 2
        self.max_len = 2 + max(len(t.format(c).split()) for t in TEMPLATES for c in CLASS_NAMES)

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Captions -> (B, T) long: <bos> words <eos>, right-padded with <pad> to the longest."""
        out = torch.full((len(texts), 2 + max(len(t.split()) for t in texts)), self.pad, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.bos] + [self.index[w] for w in text.split()] + [self.eos]
            out[row, :len(ids)] = torch.tensor(ids)
        return out

    def decode(self, ids: torch.Tensor) -> list[str]:
        """(B, T) ids -> captions, read up to the first <eos> (specials dropped)."""
        texts = []
        for row in ids.tolist():
            words = []
            for i in row:
                if i == self.eos:
                    break
                if i >= len(SPECIALS):
                    words.append(self.words[i])
            texts.append(" ".join(words))
        return texts

    @staticmethod
    def named_class(text: str) -> int:
        """Index of the first class name in `text` (word-aligned), or -1 if it names none."""
        words = text.split()
        for start in range(len(words)):
            for c, name in enumerate(CLASS_NAMES):
                parts = name.split()
                if words[start:start + len(parts)] == parts:
                    return c
        return -1


def captions(labels: torch.Tensor, generator: torch.Generator) -> list[str]:
    """One caption per label: a random template filled with the class name."""
    picks = torch.randint(len(TEMPLATES), (len(labels),), generator=generator).tolist()
    return [TEMPLATES[t].format(CLASS_NAMES[c]) for t, c in zip(picks, labels.tolist())]


def lm_corpus(batch: int, generator: torch.Generator) -> list[str]:
    """The LM's text-only pretraining text: a caption of a random item, and for half the rows a second caption of
    the same item after a "." ("a photo of a coat . the coat is shown here"), so the LM learns to name an item
    from its context, as a large LM does; the visual token later has to play that context."""
    labels = torch.randint(len(CLASS_NAMES), (batch,), generator=generator)
    first, second = captions(labels, generator), captions(labels, generator)
    pair = torch.rand(batch, generator=generator) < 0.5
    return [f"{a} {SEPARATOR} {b}" if p else a for a, b, p in zip(first, second, pair.tolist())]


def lm_config(vocab_size: int, width: int = 128, depth: int = 4, heads: int = 4):
    """A tiny GPT-2 config (no dropout, eager attention so our explicit masks are used as given)."""
    from transformers import GPT2Config

    return GPT2Config(vocab_size=vocab_size, n_positions=32, n_embd=width, n_layer=depth, n_head=heads,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0, attn_implementation="eager")


@dataclass(frozen=True)
class EPALMConfig:
    inject_vit_layers: int = 2    # CLS tokens of the ViT's last k blocks (official injected_hidden_states: 6)
    start_layer: int = 2          # first LM layer that receives a visual token (official start_layer_idx: 19)
    end_layer: int = 4            # exclusive (official end_layer_idx: 31 of OPT-2.7B's 32 layers)
    prompt_len: int = 10          # soft prompt vectors (official prompt_len: 10)

    def __post_init__(self) -> None:
        if not 0 <= self.start_layer < self.end_layer:
            raise ValueError(f"need 0 <= start_layer < end_layer, got {self.start_layer}, {self.end_layer}")
        if self.inject_vit_layers < 1 or self.prompt_len < 0:
            raise ValueError(f"need inject_vit_layers >= 1 and prompt_len >= 0, got {self.inject_vit_layers}, "
                             f"{self.prompt_len}")


def injection_plan(cfg: EPALMConfig) -> dict[int, int]:
    """{LM layer: index into the injected ViT CLS tokens (0 = the earliest of the last k blocks)}.

    `OPTDecoder.forward`: step = (end - start) // k if end - start > k else 1 (1 when k == 1), and layer i gets token
    min((i - start) // step, k - 1)."""
    k, n = cfg.inject_vit_layers, cfg.end_layer - cfg.start_layer
    step = 1 if k == 1 else (n // k if n > k else 1)
    return {i: min((i - cfg.start_layer) // step, k - 1) for i in range(cfg.start_layer, cfg.end_layer)}


def _causal_mask(q: int, past: int, dtype: torch.dtype) -> torch.Tensor:
    """(1, 1, q, past + q) additive mask: query i (absolute position past + i) sees keys 0..past + i."""
    allowed = torch.arange(past + q)[None, :] <= (past + torch.arange(q))[:, None]
    return torch.zeros(q, past + q, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


class EPALM(nn.Module):
    """Frozen timm ViT + frozen GPT-2, with a trainable linear connector and soft prompt."""

    def __init__(self, vit: nn.Module, lm: nn.Module, cfg: EPALMConfig = EPALMConfig()) -> None:
        super().__init__()
        n_lm = lm.config.n_layer
        if cfg.end_layer > n_lm or cfg.inject_vit_layers > len(vit.blocks):
            raise ValueError(f"{cfg} does not fit an LM of {n_lm} layers and a ViT of {len(vit.blocks)} blocks")
        self.cfg, self.vit, self.lm = cfg, vit, lm
        width = lm.config.n_embd
        self.connector = nn.Linear(vit.embed_dim, width)
        self.prompt = nn.Parameter(torch.randn(1, cfg.prompt_len, width) * lm.config.initializer_range)
        self.plan = injection_plan(cfg)
        self.freeze_backbones_()

    def freeze_backbones_(self, lm: bool = True) -> "EPALM":
        """Freeze the ViT (always) and the LM (unless `lm=False`, the full fine-tuning baseline); eval mode for both."""
        self.vit.requires_grad_(False).eval()
        self.lm.requires_grad_(not lm).eval()
        return self

    def train(self, mode: bool = True) -> "EPALM":
        super().train(mode)
        self.vit.eval()   # frozen encoder: no dropout / drop-path
        return self

    @torch.no_grad()
    def vit_cls(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 1, 28, 28) normalised -> (B, k, vit_dim): the CLS token after each of the last k blocks,
        through the ViT's final norm (timm `forward_intermediates(norm=True)` = official `self.norm(x)` per block)."""
        feats = self.vit.forward_intermediates(images, indices=self.cfg.inject_vit_layers, norm=True,
                                               return_prefix_tokens=True, intermediates_only=True, output_fmt="NLC")
        return torch.stack([p[:, 0] for _, p in feats], 1)                      # (B, k, vit_dim)

    def forward(self, ids: torch.Tensor, cls: torch.Tensor | None, cache=None, offset: int = 0) -> torch.Tensor:
        """ids (B, L) text tokens, cls (B, k, vit_dim) from `vit_cls` (None: text only, no visual token) ->
        logits (B, L, vocab). With a transformers `DynamicCache`: at `offset` 0 the empty cache is filled (prompt +
        visual token + ids); later calls pass the `offset` text tokens already cached and append ids after them
        (the prompt and visual token are in the cache already, `cls` is ignored)."""
        tf = self.lm.transformer
        prefill = offset == 0
        pos = offset + torch.arange(ids.shape[1])
        h = tf.wte(ids) + tf.wpe(pos)[None]                                      # (B, L, d)
        if prefill:
            h = torch.cat([self.prompt.expand(len(ids), -1, -1), h], 1)          # (B, P + L, d), prompt: no position
        visual = self.connector(cls) if cls is not None else None               # (B, k, d)
        for i, block in enumerate(tf.h):
            if prefill and visual is not None and i in self.plan:
                token = visual[:, self.plan[i]][:, None]                         # (B, 1, d)
                h = torch.cat([token, h if i == self.cfg.start_layer else h[:, 1:]], 1)   # (B, 1 + P + L, d)
            past = 0 if cache is None else cache.get_seq_length(i)
            h = block(h, cache, _causal_mask(h.shape[1], past, h.dtype), use_cache=cache is not None)
        return self.lm.lm_head(tf.ln_f(h[:, -ids.shape[1]:]))                    # (B, L, vocab)

    @torch.no_grad()
    def generate(self, cls: torch.Tensor | None, batch: int, max_len: int, bos: int, eos: int, pad: int
                 ) -> torch.Tensor:
        """Greedy captions with a KV cache: (B, <= 1 + max_len) ids starting with <bos>, <pad> after <eos>."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.lm.config)
        ids = torch.full((batch, 1), bos, dtype=torch.long)
        done = torch.zeros(batch, dtype=torch.bool)
        logits = self(ids, cls, cache)
        for _ in range(max_len):
            nxt = logits[:, -1].argmax(-1).masked_fill(done, pad)               # (B,)
            ids = torch.cat([ids, nxt[:, None]], 1)
            done |= nxt == eos
            if bool(done.all()):
                break
            logits = self(nxt[:, None], None, cache, offset=ids.shape[1] - 1)
        return ids


def split_rows(split: str, n: int, seed: int) -> torch.Tensor:
    """Row indices of a seeded random subset of `n` images of the reference ViT's own splits: 'train' (rows of the
    train file outside the 5,000-image val hold-out the ViT never trained on), 'val' (that hold-out, where the toy's
    settings are chosen) or 'test' (rows of the t10k file)."""
    if split not in ("train", "val", "test"):
        raise ToyError(f"split={split!r} is not one of train, val, test")
    pool = torch.arange(FMNIST_SIZES[split == "test"])
    if split != "test":
        train_idx, val_idx = holdout(len(pool), VAL_SIZE, 0)    # the reference checkpoints' split (seed 0)
        pool = train_idx if split == "train" else val_idx
    if not 0 < n <= len(pool):
        raise ToyError(f"asked for {n} {split} images; the split holds {len(pool)}")
    return pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:n]]


def load_images(split: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`split_rows`'s images, normalised as the reference ViT was trained: (images (n, 1, 28, 28), labels (n,))."""
    images, labels = load_split(FMNIST_DIR, "test" if split == "test" else "train")
    rows = split_rows(split, n, seed)
    return (images[rows].float() / 255 - FMNIST_MEAN[0]) / FMNIST_STD[0], labels[rows]


def _caption_loss(logits: torch.Tensor, ids: torch.Tensor, pad: int) -> torch.Tensor:
    """Next-token cross-entropy: logits (B, L - 1, V) predict ids[:, 1:], padding ignored."""
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), ignore_index=pad)


def pretrain_lm(lm: nn.Module, vocab: Vocab, steps: int, batch: int = 64, lr: float = 3e-3, seed: int = 0
                ) -> list[float]:
    """Text-only pretraining of the LM on `lm_corpus` (AdamW + cosine)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    lm.train()
    history = []
    for _ in range(steps):
        ids = vocab.encode(lm_corpus(batch, gen))
        inputs = ids[:, :-1]
        loss = _caption_loss(lm(inputs, attention_mask=(inputs != vocab.pad).long()).logits, ids, vocab.pad)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history.append(loss.item())
    return history


def train_captioner(model: EPALM, cls: torch.Tensor, labels: torch.Tensor, vocab: Vocab, steps: int,
                    batch: int = 64, lr: float = 1e-2, seed: int = 0) -> list[float]:
    """Train what `model` leaves trainable on (image, caption) pairs: `cls` (N, k, vit_dim) are the frozen ViT's
    CLS tokens of the N images (`EPALM.vit_cls`, computed once), each step draws a batch and a fresh template per
    item. AdamW + cosine; returns the loss per step."""
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    model.train()
    history = []
    for _ in range(steps):
        rows = torch.randint(len(labels), (batch,), generator=gen)
        ids = vocab.encode(captions(labels[rows], gen))
        loss = _caption_loss(model(ids[:, :-1], cls[rows]), ids, vocab.pad)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history.append(loss.item())
    return history


@torch.no_grad()
def naming_accuracy(model: EPALM, cls: torch.Tensor | None, labels: torch.Tensor, vocab: Vocab,
                    batch: int = 500) -> float:
    """Share of greedy captions whose first class name is the image's class (`cls=None`: no image shown)."""
    model.eval()
    hits = 0
    for start in range(0, len(labels), batch):
        part = labels[start:start + batch]
        ids = model.generate(None if cls is None else cls[start:start + batch], len(part), vocab.max_len,
                             vocab.bos, vocab.eos, vocab.pad)
        hits += sum(Vocab.named_class(t) == int(y) for t, y in zip(vocab.decode(ids), part))
    return hits / len(labels)


@torch.no_grad()
def prior_accuracy(lm: nn.Module, labels: torch.Tensor, vocab: Vocab) -> tuple[float, str]:
    """The text-only prior: the frozen LM's own greedy caption (transformers `generate`, no image, no prompt)
    scored against every label; returns (accuracy, caption)."""
    lm.eval()
    bos = torch.tensor([[vocab.bos]])
    out = lm.generate(bos, attention_mask=torch.ones_like(bos), max_new_tokens=vocab.max_len, do_sample=False,
                      eos_token_id=vocab.eos, pad_token_id=vocab.pad)
    text = vocab.decode(out)[0]
    return float((labels == Vocab.named_class(text)).float().mean()), text


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _vision_encoder(quick: bool) -> nn.Module:
    """The reference ViT (quick: a random-init `vl_vit_fmnist` of the same shape, so the smoke run needs no file)."""
    if quick:
        return create_model("vl_vit_fmnist")
    path = Path(__file__).resolve().parents[2] / CHECKPOINT
    if not path.is_dir():
        raise ToyError(f"the eP-ALM toy needs vitlab's reference ViT at {path}; run it from a vitlab checkout "
                       "(or use --quick, which uses a random-init ViT)")
    return create_model(str(path))


STEPS = 1200                                  # optimizer steps of batch 64 per arm
LEARNING_RATES = {"epalm": 5e-3, "full": 1e-3}  # AdamW + cosine, per arm (chosen on val)


def compare(seed: int, steps: int = STEPS, split: str = "test", lrs: dict[str, float] | None = None,
            arms: tuple[str, ...] = ("epalm", "full"), n_train: int = 8000, n_eval: int = 1000, lm_steps: int = 400,
            quick: bool = False) -> dict[str, float | str]:
    """Pretrain the LM on captions and freeze it; train each arm ("epalm": connector + prompt, "full": the LM too)
    for `steps` steps on `n_train` train-split images; score item naming on `n_eval` images of `split` ("val" to
    choose settings, "test" to report), beside the text-only prior."""
    from transformers import GPT2LMHeadModel

    lrs = {**LEARNING_RATES, **(lrs or {})}
    unknown = sorted(set(arms) - set(LEARNING_RATES)) or sorted(set(lrs) - set(LEARNING_RATES))
    if unknown:
        raise ToyError(f"unknown eP-ALM arm {unknown[0]!r}; arms are {', '.join(LEARNING_RATES)}")
    vocab = Vocab()
    torch.manual_seed(seed)
    vit = _vision_encoder(quick)
    lm = GPT2LMHeadModel(lm_config(len(vocab)))
    start = time.perf_counter()
    lm_loss = pretrain_lm(lm, vocab, lm_steps, seed=seed)
    metrics: dict[str, float | str] = {"lm_pretrain_s": round(time.perf_counter() - start, 1),
                                       "lm_final_loss": round(sum(lm_loss[-20:]) / len(lm_loss[-20:]), 4)}
    frozen_lm = {k: v.clone() for k, v in lm.state_dict().items()}
    train_images, train_labels = load_images("train", n_train, seed)
    eval_images, eval_labels = load_images(split, n_eval, seed + 1)
    prior, text = prior_accuracy(lm, eval_labels, vocab)
    metrics.update(prior_naming_acc=round(prior, 4), prior_caption=text)
    encoder = EPALM(vit, lm)
    cls_train, cls_eval = encoder.vit_cls(train_images), encoder.vit_cls(eval_images)   # frozen: computed once
    for arm in arms:
        lm.load_state_dict(frozen_lm)
        torch.manual_seed(seed)
        model = EPALM(vit, lm).freeze_backbones_(lm=arm == "epalm")
        start = time.perf_counter()
        losses = train_captioner(model, cls_train, train_labels, vocab, steps, lr=lrs[arm], seed=seed)
        total = sum(p.numel() for p in model.parameters())
        metrics.update({f"{arm}_train_s": round(time.perf_counter() - start, 1), f"{arm}_lr": lrs[arm],
                        f"{arm}_trainable": trainable_count(model), f"{arm}_total_params": total,
                        f"{arm}_trainable_pct": round(100 * trainable_count(model) / total, 3),
                        f"{arm}_final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
                        f"{arm}_naming_acc": round(naming_accuracy(model, cls_eval, eval_labels, vocab), 4)})
    metrics.update(train_images=n_train, eval_split=split, eval_images=n_eval, lm_steps=lm_steps,
                   optimizer_steps=steps)
    return metrics


@register_toy("epalm", "eP-ALM: frozen ViT + frozen tiny GPT-2, one linear connector + soft prompt (captions)",
              requires=("transformers",))
def run(out: Path, seed: int, quick: bool) -> dict[str, float | str]:
    """Pretrain the LM on captions, freeze it; train eP-ALM and the full fine-tuning baseline for the same steps;
    score item naming on test images."""
    if quick:
        return compare(seed, steps=3, n_train=64, n_eval=32, lm_steps=3, quick=True)
    return compare(seed)
