"""Logarithmic quantizers for power-law activations: log2 and AdaLog (Wu et al., "AdaLog: Post-Training
Quantization for Vision Transformers with Adaptive Logarithm Quantizer", ECCV 2024).

Semantics read from the official code (github.com/GoatWu/AdaLog, `quantizers/logarithm.py`,
`quant_layers/matmul.py`, `quant_layers/linear.py`) and re-written here:

* A value x >= 0 is coded as k = round(-log2(x / scale) * r / q): the log base is 2 ** (q / r) with r = 37 fixed
  and the integer q searched (q = 37 is plain log2; the official search range is q = 10 ... 137).
* Dequantization is the paper's hardware-friendly form: 2 ** -floor(k q / r) (a shift) times a table entry
  T[(k q) mod r] = 2 ** (-((k q) mod r) / r) rounded to multiples of 1 / (2 ** (bits + 1) - 2).
* Post-softmax (scale 1, as in the official code): only q is searched, exhaustively.
* Post-GELU: the shift 0.16997 (= -min GELU) makes the values non-negative; "bias reparameterization" folds the
  -shift back into the next Linear's bias (`reparameterize_bias_`; on a calibrated model
  `reparameterize_post_gelu_`). Scale and q are found by the paper's Fast Progressive Combining Search
  (`fpcs_search`): keep the best q candidates, combine them with a grid of scales
  between the 90th and 100th percentile, keep the top combinations and refine their scales for a few steps.

Differences from the official code, on purpose:
* Strictly `bits` bits: codes 0 ... 2**bits - 2 are levels and one code is zero (the official code keeps 2**bits
  levels *and* a zero, one value more than the bit width holds).
* The searches score candidates like the official code (objective "output", the default): the MSE of the
  attention output softmax·V (quantized probabilities x V through its own quantizer, against the float product;
  official `PostSoftmaxAsymmetricallyBatchingQuantMatMul._search_best_A_log_base`) and of fc2's output (quantized
  input x quantized weight, against the float Linear; official `PostGeluLogBasedBatchingQuantLinear`). They run
  on a bounded sample of that context (32 images x 64 query rows of attention, 1024 fc2 input rows) where the
  official code uses all 32 calibration images. The official code also alternates the log-base search with
  re-searching V's / fc2's weight scales for 3 rounds (`search_round`); vitlab searches once, after V's and the
  weight's own quantizers are final. Objective "self" (the quantized values' own MSE) is kept as an option and is
  what a quantizer used outside a model (no recorded context) falls back to.
* The "self" searches run on at most 16384 seeded samples of what calibration kept (option `search_samples`).

Limit: a log grid is coarse near its top (AdaLog's smallest base is 2 ** (10 / 37) = 1.21), so these quantizers
are not the identity at 16 bits the way uniform ones are; they are meant for 3-6 bits.

Checked (tests/quant/test_quant_adv.py): log2 is exact on powers of two; AdaLog's search on softmax-of-Gaussian data
(50 keys) beats log2 and uniform min-max at 4 bits on MSE; the shifted post-GELU form keeps the negative part and
its bias reparameterization leaves a Linear's output unchanged; the output-objective searches pick the candidate
with the lowest softmax·V / fc2-output error among all they try, and are no worse on that error than the
"self" choice (tests/quant/test_quant_adalog_objective.py).
"""
from __future__ import annotations

import abc
from typing import Callable

import torch
from torch import Tensor, nn

from .base import Quantizer, QuantizerError, register_quantizer
from .sim import quant_linears

__all__ = [
    "ADALOG_R", "GELU_SHIFT", "log2_quantize", "adalog_quantize", "adalog_table", "search_adalog_base",
    "fpcs_search", "search_log2_scale", "self_error", "matmul_output_error", "linear_output_error", "OBJECTIVES",
    "reparameterize_bias_", "reparameterize_post_gelu_", "quantization_mse",
    "Log2Quantizer", "LogSqrt2Quantizer", "AdaLogQuantizer",
]

ADALOG_R = 37                           # AdaLog's fixed denominator r: base = 2 ** (q / r)
ADALOG_Q_RANGE = (10, 137)              # the official q candidates (eq_n = 128)
GELU_SHIFT = 0.16997124254703522        # -min_x GELU(x); the official post-GELU shift (and PTQ4ViT's)
# What AdaLog's searches minimize: "output" (the paper's and official code's: the MSE of the attention output
# softmax·V at post-softmax, of the next Linear's output at post-GELU) or "self" (the quantized values' own MSE).
OBJECTIVES = ("output", "self")
CONTEXT_ROWS = 1024          # post-GELU: Linear input rows (tokens) kept for the output objective
CONTEXT_IMAGES = 32          # post-softmax: images whose attention (and V) are kept (the official calibration: 32)
CONTEXT_QUERY_ROWS = 64      # ... of which at most this many query rows per image and head
CONTEXT_NUMEL = 1 << 21      # ... and at most this many probabilities in all (big models keep fewer images)


def _max_code(bits: int) -> int:
    """Largest level code at `bits` bits: one code of the 2**bits is kept for zero."""
    if bits < 2:
        raise ValueError(f"log quantizers need bits >= 2, got bits={bits}; use 2 or more")
    return 2 ** bits - 2


def log2_quantize(x: Tensor, scale: float | Tensor, bits: int, step: float = 1.0) -> Tensor:
    """Fake-quantize x >= 0 to {0} U {scale * 2**(-k step) : k = 0 ... 2**bits - 2} (rounding in the log domain):
    log2 at step 1, RepQ-ViT's log-sqrt(2) at step 0.5."""
    k_max = _max_code(bits)
    ratio = (x / scale).clamp(min=1e-30, max=1.0)
    k = torch.round(-torch.log2(ratio) / step)
    return torch.where(k > k_max, torch.zeros_like(x), torch.exp2(-k.clamp(max=k_max) * step) * scale)


def adalog_table(bits: int, r: int = ADALOG_R, device=None) -> Tensor:
    """T[j] = 2 ** (-j / r) rounded to multiples of 1 / (2 ** (bits + 1) - 2): the dequantization table."""
    step = 1.0 / (2 ** (bits + 1) - 2)
    table = torch.exp2(-torch.arange(r, dtype=torch.float64) / r)
    return (torch.round(table / step) * step).to(device=device, dtype=torch.float32)


def adalog_quantize(x: Tensor, scale: float | Tensor, q: int | Tensor, bits: int, r: int = ADALOG_R) -> Tensor:
    """Fake-quantize x >= 0 with AdaLog: base 2 ** (q / r), table dequantization, values below the last level -> 0.

    `scale` and `q` broadcast against `x` (a leading candidate axis is how the searches evaluate many at once).
    """
    return _adalog_from_log(_neg_log2(x), scale, q, bits, r)


def _neg_log2(x: Tensor) -> Tensor:
    """-log2(x) for x > 0 (x <= 0 -> a huge value, i.e. quantized to 0); computed once per search."""
    return -torch.log2(x.clamp(min=1e-30))


def _adalog_from_log(neg_log: Tensor, scale: float | Tensor, q: int | Tensor, bits: int, r: int) -> Tensor:
    """AdaLog of x given -log2(x): k = round(-log2(min(x / scale, 1)) * r / q), value 2 ** -floor(kq/r) T[kq mod r]."""
    k_max = _max_code(bits)
    q = torch.as_tensor(q, device=neg_log.device, dtype=neg_log.dtype)
    scale = torch.as_tensor(scale, device=neg_log.device, dtype=neg_log.dtype)
    k = torch.round((neg_log + torch.log2(scale)).clamp(min=0.0) * (r / q)).clamp(max=k_max + 1).long()
    # the 2**bits - 1 levels (and a last 0 for "below the last level") of every candidate: (..., k_max + 2)
    kq = torch.arange(k_max + 1, device=neg_log.device, dtype=neg_log.dtype) * q.unsqueeze(-1)
    whole = torch.floor(kq / r + 1e-4)
    table = adalog_table(bits, r, neg_log.device)
    levels = torch.exp2(-whole) * table[(kq - whole * r).round().long().clamp(0, r - 1)] * scale.unsqueeze(-1)
    levels = torch.cat([levels, torch.zeros_like(levels[..., :1])], dim=-1)
    if levels.dim() == 1:                                         # scalar scale and q
        return levels[k]
    shape = torch.broadcast_shapes(k.shape, levels.shape[:-1])
    levels = levels.reshape((1,) * (len(shape) - levels.dim() + 1) + levels.shape)
    return torch.gather(levels.expand(*shape, k_max + 2), -1, k.expand(shape).unsqueeze(-1)).squeeze(-1)


def quantization_mse(x: Tensor, xq: Tensor) -> Tensor:
    """Mean squared error over the last axis (one value per candidate)."""
    return (xq - x).pow(2).mean(dim=-1)


# An error function scores candidates: (scales (c,), qs (c,)) -> errors (c,), lower is better. The default one is
# the MSE of the quantized values themselves; `matmul_output_error` / `linear_output_error` are the paper's.
ErrorFn = Callable[[Tensor, Tensor], Tensor]


def search_adalog_base(samples: Tensor, bits: int, scale: float | Tensor = 1.0,
                       q_range: tuple[int, int] = ADALOG_Q_RANGE, r: int = ADALOG_R, topk: int = 1,
                       error_fn: ErrorFn | None = None) -> Tensor:
    """The official post-softmax search: every integer q in `q_range` at a fixed scale; returns the best `topk` q.

    `samples`: 1-D tensor of values >= 0 (already shifted). `error_fn`: how candidates are scored (default: the MSE
    of the quantized samples). Returns a 1-D tensor of q, best first.
    """
    x = samples.flatten().float()
    q = torch.arange(q_range[0], q_range[1] + 1, device=x.device, dtype=x.dtype)               # (Q,)
    error_fn = error_fn or self_error(x, bits, r)
    errors = error_fn(torch.full_like(q, float(scale)), q)                                     # (Q,)
    return q[errors.argsort()[:topk]].round().long()


def fpcs_search(samples: Tensor, bits: int, q_range: tuple[int, int] = ADALOG_Q_RANGE, r: int = ADALOG_R,
                base_keep: int = 8, scale_count: int = 16, keep: int = 32, steps: int = 6,
                percentiles: tuple[float, float] = (0.9, 1.0), error_fn: ErrorFn | None = None) -> tuple[float, int]:
    """Fast Progressive Combining Search (AdaLog, Sec. 3.3) for (scale, q) of values >= 0.

    1. the `base_keep` best q at the initial scale (the official start: next-to-largest scale candidate);
    2. their product with `scale_count` scales evenly spaced between the `percentiles` of the positive values;
    3. keep the `keep` best (scale, q) pairs, around each try new scales at a shrinking step, `steps` rounds.
    Candidates are scored by `error_fn` (default: MSE of the quantized samples; the official code scores them on
    the next layer's output, `linear_output_error`). Returns (scale, q) of the best pair.
    """
    x = samples.flatten().float()
    positive = x[x > 0]
    if positive.numel() == 0:
        return 1.0, ADALOG_R
    lo, hi = torch.quantile(positive, torch.tensor(percentiles, dtype=x.dtype)).tolist()
    hi = max(hi, 1e-12)
    lo = min(lo, hi)
    scales = torch.linspace(lo, hi, scale_count, dtype=x.dtype)
    start_scale = float(scales[-2]) if scale_count > 1 else hi
    error_fn = error_fn or self_error(x, bits, r)
    qs = search_adalog_base(x, bits, start_scale, q_range, r, topk=base_keep, error_fn=error_fn).to(x.dtype)
    cand_scale = scales.repeat(len(qs))                       # (base_keep * scale_count,)
    cand_q = qs.repeat_interleave(scale_count)
    step = float(scales[1] - scales[0]) if scale_count > 1 else hi / 8
    new_per_pair = max(2, (base_keep * scale_count) // keep)
    for round_index in range(steps):
        errors = error_fn(cand_scale, cand_q)
        order = errors.argsort()[: (1 if round_index == steps - 1 else keep)]
        cand_scale, cand_q = cand_scale[order], cand_q[order]
        if round_index == steps - 1:
            break
        offsets = (torch.linspace(0, 1, new_per_pair, dtype=x.dtype) - 0.5) * step      # (new_per_pair,)
        step = step / (new_per_pair - 0.5)
        cand_scale = (cand_scale[:, None] + offsets[None]).flatten().clamp(min=1e-12)
        cand_q = cand_q.repeat_interleave(new_per_pair)
    return float(cand_scale[0]), int(cand_q[0])


def self_error(x: Tensor, bits: int, r: int = ADALOG_R, chunk: int = 64) -> ErrorFn:
    """Error function: MSE of AdaLog(x) against x itself, per (scale, q) candidate (x: 1-D, values >= 0)."""
    x = x.flatten().float()
    neg_log = _neg_log2(x)[None]                                                       # (1, n)

    def errors(scales: Tensor, qs: Tensor) -> Tensor:
        out = []
        for start in range(0, len(scales), chunk):
            s = scales[start:start + chunk, None]                                      # (c, 1)
            q = qs[start:start + chunk, None]
            out.append(quantization_mse(x, _adalog_from_log(neg_log, s, q, bits, r)))
        return torch.cat(out)

    return errors


def _chunk_for(numel: int, budget: int = 1 << 22) -> int:
    """Candidates per chunk so a chunk's quantized copies hold about `budget` values."""
    return max(1, budget // max(1, numel))


def matmul_output_error(a: Tensor, b: Tensor, b_quant: Tensor | None, bits: int, r: int = ADALOG_R) -> ErrorFn:
    """Error function of the post-softmax search, as in the official `_search_best_A_log_base`: the MSE of the
    attention output, ``AdaLog(a) @ b_quant`` against the float ``a @ b``.

    `a`: post-softmax probabilities (..., rows, keys); `b`: the values V (..., keys, d), float; `b_quant`: V as its
    own quantizer computes it (None: float V).
    """
    a, b = a.float(), b.float()
    bq = b if b_quant is None else b_quant.float()
    ref = a @ b
    neg_log = _neg_log2(a)[None]
    chunk = _chunk_for(a.numel())
    extra = (1,) * a.dim()

    def errors(scales: Tensor, qs: Tensor) -> Tensor:
        out = []
        for start in range(0, len(scales), chunk):
            s = scales[start:start + chunk].reshape(-1, *extra)
            q = qs[start:start + chunk].reshape(-1, *extra)
            sim = _adalog_from_log(neg_log, s, q, bits, r) @ bq                        # (c, ..., rows, d)
            out.append((sim - ref).pow(2).flatten(1).mean(dim=1))
        return torch.cat(out)

    return errors


def linear_output_error(x: Tensor, weight: Tensor, weight_quant: Tensor | None, shift: float, bits: int,
                        r: int = ADALOG_R) -> ErrorFn:
    """Error function of the post-GELU search, as in the official `PostGeluLogBasedBatchingQuantLinear`
    (`_search_best_log_base`, `_search_best_scale_logbase`): the MSE of the next Linear's output,
    ``(AdaLog(x + shift) - shift) @ W_q^T`` against the float ``x @ W^T`` (the bias cancels).

    `x`: (rows, in_features) inputs of the Linear (unshifted); `weight`: its float weight; `weight_quant`: the
    weight as its quantizer computes it (None: float).
    """
    x, weight = x.float(), weight.float()
    wq = weight if weight_quant is None else weight_quant.float()
    ref = x @ weight.t()
    neg_log = _neg_log2(x + shift)[None]
    chunk = _chunk_for(x.numel())

    def errors(scales: Tensor, qs: Tensor) -> Tensor:
        out = []
        for start in range(0, len(scales), chunk):
            s = scales[start:start + chunk].reshape(-1, 1, 1)
            q = qs[start:start + chunk].reshape(-1, 1, 1)
            sim = (_adalog_from_log(neg_log, s, q, bits, r) - shift) @ wq.t()          # (c, rows, out_features)
            out.append((sim - ref).pow(2).flatten(1).mean(dim=1))
        return torch.cat(out)

    return errors


def search_log2_scale(samples: Tensor, bits: int, count: int = 100,
                      percentiles: tuple[float, float] = (0.9, 1.0), step: float = 1.0) -> float:
    """Scale of a log2 (`step` 1) or log-sqrt(2) (`step` 0.5) quantizer: the MSE-best of `count` scales between two
    percentiles of the positive values."""
    x = samples.flatten().float()
    positive = x[x > 0]
    if positive.numel() == 0:
        return 1.0
    lo, hi = torch.quantile(positive, torch.tensor(percentiles, dtype=x.dtype)).tolist()
    scales = torch.linspace(min(lo, hi), max(hi, 1e-12), count, dtype=x.dtype)[:, None]     # (count, 1)
    errors = quantization_mse(x, log2_quantize(x[None], scales, bits, step))
    return float(scales[errors.argmin(), 0])


@torch.no_grad()
def reparameterize_bias_(linear: nn.Linear, shift: float) -> nn.Linear:
    """Fold a quantizer's input shift into the Linear that reads its output (AdaLog's bias reparameterization).

    The quantizer returns Q(x + shift) instead of Q(x + shift) - shift; the Linear's bias becomes b - W @ (shift 1),
    so W (Q(x + shift) - shift) + b is unchanged. Returns `linear`.
    """
    correction = linear.weight.sum(dim=1) * shift               # W @ (shift * ones)
    if linear.bias is None:
        linear.bias = nn.Parameter(-correction)
    else:
        linear.bias.sub_(correction)
    return linear


# ---------------------------------------------------------------------------------------------- quantizers


SEARCH_SAMPLES = 1 << 14   # values the searches run on: a seeded subsample of what calibration kept


def search_data(quantizer: Quantizer) -> Tensor:
    """At most `search_samples` (option, default 16384) of the quantizer's observed values, seeded."""
    data = quantizer.samples().flatten()
    cap = int(quantizer.options.get("search_samples", SEARCH_SAMPLES))
    if data.numel() <= cap:
        return data
    generator = torch.Generator().manual_seed(quantizer.seed)
    return data[torch.randperm(data.numel(), generator=generator)[:cap]]


def _site_shift(quantizer: Quantizer) -> float:
    """The input shift that makes a site's values non-negative: GELU's -min at post_gelu, else 0 (or -min seen)."""
    site = quantizer.options.get("site")
    if site == "post_gelu":
        return GELU_SHIFT
    if site == "attn_prob":
        return 0.0
    return max(0.0, -float(quantizer.min_val.min()))


class _LogBase(Quantizer):
    """Shared shift / bias-reparameterization handling of the log-domain quantizers (per tensor only)."""

    def __init__(self, bits: int, **kwargs):
        super().__init__(bits, **kwargs)
        if self.channel_axis is not None:
            raise QuantizerError(f"{type(self).__name__} is per tensor; got channel_axis={self.channel_axis}: "
                                 "use it at the attn_prob / post_gelu sites (per_token applies to Linear inputs)")
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("shift", torch.tensor(0.0))
        # True after `reparameterize_bias_` folded -shift into the next Linear: output Q(x + shift) as is.
        self.register_buffer("bias_reparameterized", torch.tensor(False))

    @abc.abstractmethod
    def _code(self, x: Tensor) -> Tensor:
        """Quantize-dequantize x + shift in the log domain (Log2 / AdaLog)."""

    def fake_quant(self, x: Tensor) -> Tensor:
        y = self._code(x + self.shift)
        return y if bool(self.bias_reparameterized) else y - self.shift


@register_quantizer("log2")
class Log2Quantizer(_LogBase):
    """log2 quantizer: levels scale * 2**-k (k = 0 ... 2**bits - 2) and 0. Post-softmax: scale 1 (the values' bound,
    as in AdaLog's and RepQ-ViT's log2 baselines); elsewhere the MSE-best scale between the 90th and 100th
    percentile. At post_gelu the input is shifted by 0.17 so GELU's negative part is kept."""

    step: float = 1.0      # log2 of the ratio between neighbouring levels

    @torch.no_grad()
    def finalize(self) -> None:
        self._require_observed()
        self.shift = torch.tensor(_site_shift(self))
        if self.options.get("site") == "attn_prob":
            self.scale = torch.tensor(1.0)
        else:
            self.scale = torch.tensor(search_log2_scale(search_data(self) + self.shift, self.bits, step=self.step))
        self.calibrated = True

    def _code(self, x: Tensor) -> Tensor:
        return log2_quantize(x, self.scale, self.bits, self.step)


@register_quantizer("logsqrt2")
class LogSqrt2Quantizer(Log2Quantizer):
    """RepQ-ViT's post-softmax quantizer: levels scale * 2**(-k/2) (k = 0 ... 2**bits - 2) and 0, i.e. log base
    sqrt(2), twice as fine as log2 over half the range; RepQ-ViT deploys it as log2 by splitting odd and even codes
    (the same values). Scale 1 at post-softmax, searched like log2's elsewhere (`ptq:repq=true,quantizer=logsqrt2`
    with `post_gelu=false` is the paper's recipe: vitlab.quant.repq)."""

    step = 0.5


@register_quantizer("adalog")
class AdaLogQuantizer(_LogBase):
    """AdaLog (Wu et al., ECCV 2024): log base 2 ** (q / 37) searched on the calibration values.

    Post-softmax (`site="attn_prob"`): scale 1 and q from an exhaustive search over q = 10 ... 137 (official).
    Post-GELU (`site="post_gelu"`): values shifted by 0.17 (bias reparameterization), scale and q from the Fast
    Progressive Combining Search. Options: `q_range=(lo, hi)` widens/narrows the q candidates; `objective`:

    * "output" (default, the paper's): candidates are scored on the output of the layer that consumes the values,
      as the official code does: at post-softmax the MSE of softmax·V (quantized probabilities times V as the
      `v` quantizer computes it, against the float product), at post-GELU the MSE of the fc2 output (quantized
      input times the quantized weight, against the float Linear). The adapters in `vitlab.quant.sim` record that
      context during calibration (`observe_context`): up to 32 images' attention rows (64 query rows per head)
      and V, or 1024 input rows of fc2. Without recorded context (a quantizer used on its own) it falls back to
      "self".
    * "self": the MSE of the quantized values themselves.
    """

    def __init__(self, bits: int, *, q_range: tuple[int, int] = ADALOG_Q_RANGE, objective: str = "output", **kwargs):
        super().__init__(bits, **kwargs)
        if not (1 <= q_range[0] <= q_range[1]):
            raise QuantizerError(f"AdaLog q_range={q_range} must satisfy 1 <= lo <= hi (the official one is 10..137)")
        if objective not in OBJECTIVES:
            raise QuantizerError(f"AdaLog objective={objective!r} is not one of {', '.join(OBJECTIVES)}")
        self.q_range = (int(q_range[0]), int(q_range[1]))
        self.objective = objective
        self.register_buffer("q", torch.tensor(float(ADALOG_R)))
        self._context: dict | None = None      # recorded by observe_context (plain attribute: not in state_dict)
        self._context_seen = 0
        self.searched_with = "self"            # which objective the last finalize() used

    @property
    def wants_context(self) -> bool:
        """True when the adapter should call `observe_context` during calibration (objective "output")."""
        return self.objective == "output" and self.options.get("site") in ("attn_prob", "post_gelu")

    def reset_observations(self) -> None:
        super().reset_observations()
        self._context, self._context_seen = None, 0

    @torch.no_grad()
    def observe_context(self, x: Tensor, partner: Tensor | nn.Module, partner_quant: Quantizer | None = None) -> None:
        """Record what the output objective needs, next to `observe(x)`.

        post_gelu: `x` is the input of the next Linear, `partner` that Linear (its weight and weight quantizer are
        read at finalize); a seeded reservoir of at most 1024 rows of x is kept. attn_prob: `x` is the post-softmax
        probabilities (B, H, N, N), `partner` V (B, H, N, d) and `partner_quant` V's quantizer; the first 32 images
        (fewer when the attention is large) are kept, at most 64 seeded query rows each.
        """
        ctx = self._context or {}
        if self.options.get("site") == "post_gelu":
            rows = x.detach().reshape(-1, x.shape[-1]).float()
            cap = int(self.options.get("context_rows", CONTEXT_ROWS))
            ctx["x"] = _reservoir_rows(ctx.get("x"), rows, cap, self._context_seen, self._generator)
            ctx["layer"] = partner
            self._context_seen += rows.shape[0]
        else:
            b, h, n, m = x.shape
            per_image = h * min(n, CONTEXT_QUERY_ROWS) * m
            limit = min(int(self.options.get("context_images", CONTEXT_IMAGES)), max(1, CONTEXT_NUMEL // per_image))
            take = min(b, limit - self._context_seen)
            if take <= 0:
                return
            rows = torch.randperm(n, generator=self._generator)[:CONTEXT_QUERY_ROWS].sort().values
            a = x.detach()[:take, :, rows].float()
            v = partner.detach()[:take].float()
            ctx["a"] = a if "a" not in ctx else torch.cat([ctx["a"], a])
            ctx["v"] = v if "v" not in ctx else torch.cat([ctx["v"], v])
            ctx["v_quant"] = partner_quant
            self._context_seen += take
        self._context = ctx

    def _output_error(self, shift: float) -> ErrorFn | None:
        """The paper's error function from the recorded context, or None (no context: use "self")."""
        ctx = self._context
        if self.objective != "output" or not ctx:
            return None
        if "x" in ctx:
            layer = ctx["layer"]
            wq = layer.weight_quant
            w_q = wq.fake_quant(layer.weight) if wq.calibrated else None
            return linear_output_error(ctx["x"], layer.weight, w_q, shift, self.bits)
        vq = ctx.get("v_quant")
        v_q = vq.fake_quant(ctx["v"]) if (vq is not None and vq.calibrated) else None
        return matmul_output_error(ctx["a"], ctx["v"], v_q, self.bits)

    @property
    def finalize_last(self) -> bool:
        """The output objective reads the partner's quantizer (V's, the Linear weight's): finalize after them."""
        return self._context is not None and self.objective == "output"

    @torch.no_grad()
    def finalize(self) -> None:
        self._require_observed()
        shift = _site_shift(self)
        data = search_data(self) + shift
        error_fn = self._output_error(shift)
        if self.options.get("site") == "attn_prob":
            scale, q = 1.0, int(search_adalog_base(data, self.bits, 1.0, self.q_range, error_fn=error_fn)[0])
        else:
            scale, q = fpcs_search(data, self.bits, self.q_range, error_fn=error_fn)
        self.shift, self.scale, self.q = torch.tensor(shift), torch.tensor(scale), torch.tensor(float(q))
        self.searched_with = "output" if error_fn is not None else "self"
        self.calibrated = True

    @property
    def base(self) -> float:
        """The searched log base 2 ** (q / 37)."""
        return 2.0 ** (float(self.q) / ADALOG_R)

    def _code(self, x: Tensor) -> Tensor:
        return adalog_quantize(x, self.scale, self.q, self.bits)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, q={int(self.q)}, base={self.base:.4f}, objective={self.objective}"


def _reservoir_rows(pool: Tensor | None, rows: Tensor, cap: int, seen: int, generator: torch.Generator) -> Tensor:
    """Keep a uniform random sample of at most `cap` rows over all batches (each batch replaces its share)."""
    n = rows.shape[0]
    if pool is None or pool.shape[0] + n <= cap:
        keep = rows if n <= cap else rows[torch.randperm(n, generator=generator)[:cap]]
        return keep.clone() if pool is None else torch.cat([pool, keep])
    room = cap - pool.shape[0]
    if room > 0:
        pool = torch.cat([pool, rows[torch.randperm(n, generator=generator)[:room]]])
    k_new = min(n, max(1, round(cap * n / (seen + n))))
    chosen = rows[torch.randperm(n, generator=generator)[:k_new]]
    pool = pool.clone()
    pool[torch.randperm(cap, generator=generator)[:k_new]] = chosen
    return pool


@torch.no_grad()
def reparameterize_post_gelu_(model: nn.Module) -> nn.Module:
    """Bias reparameterization on a calibrated model: every Linear whose input quantizer is a shifted log quantizer
    (AdaLog / log2 at post_gelu) gets -W_q @ (shift 1) in its bias (W_q: its fake-quantized weight, what it computes
    with), and the quantizer then emits the non-negative Q(x + shift). The outputs do not change. Returns `model`.
    """
    for _, layer in quant_linears(model):
        quantizer = layer.input_quant
        if not isinstance(quantizer, _LogBase) or bool(quantizer.bias_reparameterized) or float(quantizer.shift) == 0:
            continue
        correction = layer.quant_weight().sum(dim=1) * float(quantizer.shift)
        if layer.bias is None:
            layer.bias = nn.Parameter(-correction)
        else:
            layer.bias.sub_(correction)
        quantizer.bias_reparameterized.fill_(True)
    return model
