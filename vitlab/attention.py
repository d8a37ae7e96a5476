"""One attention seam: the self-attention classes that token reduction and attention quantization both patch.

A seam class subclasses one attention class (timm's `Attention`, ConViT's `MHSA`, vitlab PVT v1's
`SpatialReductionAttention` at sr_ratio 1, VOLO's `Attention`), keeps its weights and state_dict keys (a class swap:
`to_seam_`) and runs one forward, `attend`, with hook points that are off (None) until a technique sets them:

* `bias_hook(attn_mask) -> attn_mask`: an additive bias on the attention logits (ToMe's and MCTF's log token size,
  ATS's -inf on padding rows; `vitlab.tokens.patch.TokenState.key_bias`);
* `observe_hook(q, k, v, scale, attn_mask)`: reads the float q, k, v (B, H, N, d) and the biased mask after the
  attention ran (ToMe's mean key, EViT's and ATS's class-token row);
* quantization sites (`add_quant_sites_`): child quantizers `q_quant`, `k_quant`, `attn_prob_quant`, `v_quant` on
  the inputs of the two matmuls, q after the 1/sqrt(d) scaling (`vitlab.quant.sim.wrap_model` sets them).

Fused `F.scaled_dot_product_attention` is kept unless quantization sites are present (SDPA never materializes the
post-softmax probabilities, so they cannot be fake-quantized) or `math_max_tokens` asks for the plain path; then
`logits` (q·kᵀ with the mask, causality and the q / k sites) and `mix` (softmax·v with the probability and v sites)
run explicitly. MCTF, which fuses the attention map itself, calls `logits` and `mix` directly, so its fused map is
quantized like any other. A token technique and a quantization applied one after the other set their own hooks on
the same instance, so both effects are present whatever the order. `is_causal` is honoured on every path.

Per family a seam class only says how the class computes q, k, v (`qkv_heads`, or `qk` and `v` separately) and its
output (`out`); the attention itself is written once, here. Checked against timm 1.0.31's `Attention.forward`
(timm/layers/attention.py: gate, q/k norm, scale norm, `resolve_self_attn_mask`): the seam with no hook set equals
the class it replaces (tests/test_attention_seam.py).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention
from timm.models import volo
from timm.models.convit import MHSA

from .models.pvt import SpatialReductionAttention

__all__ = ["ATTN_SITES", "AttentionSeam", "SeamAttention", "SeamMHSA", "SeamSRA", "SeamVOLOAttention",
           "SEAM_CLASSES", "in_seam", "to_seam_", "quantized_attention_scope", "attention_ops_quantized",
           "fused_qk", "fused_v"]

ATTN_SITES = ("q", "k", "attn_prob", "v")

BiasHook = Callable[[Optional[torch.Tensor]], Optional[torch.Tensor]]
ObserveHook = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, Optional[torch.Tensor]], None]

_busy = threading.local()   # depth > 0: attention ops being quantized already (an enclosing interceptor skips them)


@contextlib.contextmanager
def quantized_attention_scope() -> Iterator[None]:
    """Marks the ops run inside as attention that is quantized already: `vitlab.quant.sim.QuantAttentionOps`, which
    quantizes the SDPA calls and activation matmuls of modules without a seam, leaves them alone."""
    _busy.depth = getattr(_busy, "depth", 0) + 1
    try:
        yield
    finally:
        _busy.depth -= 1


def attention_ops_quantized() -> bool:
    """Whether the current ops run inside `quantized_attention_scope`."""
    return getattr(_busy, "depth", 0) > 0


def _additive(attn_mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """A boolean mask (True = attend) as an additive one (0 / -inf), as SDPA reads it; a float mask unchanged."""
    if attn_mask is None or attn_mask.dtype != torch.bool:
        return attn_mask
    return torch.zeros_like(attn_mask, dtype=dtype).masked_fill_(~attn_mask, float("-inf"))


def _causal(n: int, m: int, like: torch.Tensor) -> torch.Tensor:
    """(N, M) additive causal mask: -inf above the diagonal (SDPA's is_causal: the top-left aligned triangle)."""
    return like.new_full((n, m), float("-inf")).triu_(1)


class AttentionSeam:
    """Mixin over an attention class: one `attend` with a bias hook, an observation hook and quantization sites.

    A subclass says how its class computes q, k, v (`qk`, `v`, each (B, H, N, d); `qkv_heads` all three at once)
    and its output (`out`)."""

    bias_hook: Optional[BiasHook] = None
    observe_hook: Optional[ObserveHook] = None
    # On CPU, SDPA with a float mask (the size bias) may be slower than matmul + softmax at short sequences: at or
    # below this many tokens a masked attention takes the plain path. 0 (default) keeps SDPA everywhere; an
    # experiment knob timed by benchmarks/tokens_speed.py (per instance: `attn.math_max_tokens = 96`).
    math_max_tokens: int = 0

    # ---------------------------------------------------------------------------------------- quantization sites

    @property
    def quantized(self) -> bool:
        """Whether the two attention matmuls have quantization sites."""
        return "attn_prob_quant" in self._modules

    def add_quant_sites_(self, quants: dict[str, nn.Module]) -> "AttentionSeam":
        """Put the quantizers `quants` ({"q", "k", "attn_prob", "v"} -> module) on the matmul inputs; returns self."""
        for site in ATTN_SITES:
            setattr(self, f"{site}_quant", quants[site])
        return self

    def logits(self, q: torch.Tensor, k: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
               is_causal: bool = False) -> torch.Tensor:
        """Attention logits (B, H, N, M) = (q / sqrt(d)) kᵀ + mask (+ the causal mask), q and k through their
        quantizers when the sites are present."""
        if self.quantized:
            with quantized_attention_scope():
                attn = self.q_quant(q * self.scale) @ self.k_quant(k).transpose(-2, -1)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
        if is_causal:
            attn = attn + _causal(attn.shape[-2], attn.shape[-1], attn)
        attn_mask = _additive(attn_mask, attn.dtype)
        return attn if attn_mask is None else attn + attn_mask

    def mix(self, probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax·v (B, H, N, d) from probabilities (B, H, N, M), with attention dropout; both operands through their
        quantizers when the sites are present."""
        if not self.quantized:
            return self.attn_drop(probs) @ v
        with quantized_attention_scope():
            if self.attn_prob_quant.mode == "observe" and getattr(self.attn_prob_quant, "wants_context", False):
                self.attn_prob_quant.observe_context(probs, v, self.v_quant)   # AdaLog's output objective: softmax·V
            return self.attn_drop(self.attn_prob_quant(probs)) @ self.v_quant(v)

    # ---------------------------------------------------------------------------------------- the attention

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (*self.qk(x), self.v(x))

    def attend(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
               is_causal: bool = False) -> torch.Tensor:
        """The attention of x (B, N, C) with every hook that is set; (B, N, C_out)."""
        scope = quantized_attention_scope() if self.quantized else contextlib.nullcontext()
        with scope:
            N = x.shape[1]
            q, k, v = self.qkv_heads(x)                               # each (B, H, N, d)
            if self.bias_hook is not None:
                attn_mask = self.bias_hook(attn_mask)
            plain = (self.quantized or not getattr(self, "fused_attn", True) or (
                self.math_max_tokens > 0 and attn_mask is not None and N <= self.math_max_tokens
                and x.device.type == "cpu"))
            if plain:
                out = self.mix(self.logits(q, k, attn_mask, is_causal).softmax(dim=-1), v)
            else:
                if is_causal and attn_mask is not None:      # SDPA takes one of the two: fold causality into the mask
                    attn_mask = _additive(attn_mask, q.dtype) + _causal(N, k.shape[-2], q)
                    is_causal = False
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                                     dropout_p=self.attn_drop.p if self.training else 0.0)
            if self.observe_hook is not None:
                self.observe_hook(q, k, v, self.scale, attn_mask)
            return self.out(out, x)


def fused_qk(qkv: nn.Linear, x: torch.Tensor, H: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k (B, H, N, d) from a fused qkv Linear (rows q, k, v), without computing v."""
    B, N, _ = x.shape
    w, b = qkv.weight, qkv.bias
    qk = F.linear(x, w[:2 * H * d], None if b is None else b[:2 * H * d])
    q, k = qk.reshape(B, N, 2, H, d).permute(2, 0, 3, 1, 4).unbind(0)   # (B, H, N, d) each
    return q, k


def fused_v(qkv: nn.Linear, x: torch.Tensor, H: int, d: int) -> torch.Tensor:
    """v (B, H, N, d) from a fused qkv Linear, without computing q and k."""
    B, N, _ = x.shape
    w, b = qkv.weight, qkv.bias
    v = F.linear(x, w[2 * H * d:], None if b is None else b[2 * H * d:])
    return v.reshape(B, N, H, d).transpose(1, 2)


class SeamAttention(AttentionSeam, Attention):
    """timm Attention (fused qkv, optional q/k norm, scale norm and gate)."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        return self.attend(x, attn_mask, is_causal)

    def qkv_heads(self, x):
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                  # each (B, H, N, d)
        return self.q_norm(q), self.k_norm(k), v

    def qk(self, x):
        q, k = fused_qk(self.qkv, x, self.num_heads, self.head_dim)
        return self.q_norm(q), self.k_norm(k)

    def v(self, x):
        return fused_v(self.qkv, x, self.num_heads, self.head_dim)

    def out(self, out, x):
        B, H, N, d = out.shape
        out = self.norm(out.transpose(1, 2).reshape(B, N, H * d))
        if getattr(self, "gate", None) is not None:
            out = out * self.gate(x).sigmoid()
        return self.proj_drop(self.proj(out))


class _FusedQKVSeam(AttentionSeam):
    """The seam's q/k/v/output for an attention with one fused qkv Linear, no q/k norm and a projection after."""

    def qkv_heads(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)                                     # each (B, H, N, d)

    def qk(self, x):
        return fused_qk(self.qkv, x, self.num_heads, x.shape[-1] // self.num_heads)

    def v(self, x):
        return fused_v(self.qkv, x, self.num_heads, x.shape[-1] // self.num_heads)

    def out(self, out, x):
        B, H, N, d = out.shape
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, H * d)))


class SeamMHSA(_FusedQKVSeam, MHSA):
    """ConViT's MHSA (fused qkv, no q/k norm); runs as SDPA (the original computes the same map by matmuls)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attend(x)


class SeamSRA(AttentionSeam, SpatialReductionAttention):
    """vitlab PVT v1's attention at sr_ratio 1 (q and fused kv from the tokens themselves: global attention)."""

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        return self.attend(x)

    def qk(self, x):
        B, N, C = x.shape
        q = self.q(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)            # (B, H, N, d)
        k = F.linear(x, self.kv.weight[:C], None if self.kv.bias is None else self.kv.bias[:C])
        return q, k.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)

    def v(self, x):
        B, N, C = x.shape
        v = F.linear(x, self.kv.weight[C:], None if self.kv.bias is None else self.kv.bias[C:])
        return v.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)                 # (B, H, N, d)

    def qkv_heads(self, x):
        B, N, C = x.shape
        q = self.q(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)            # (B, H, N, d)
        k, v = self.kv(x).view(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def out(self, out, x):
        B, H, N, d = out.shape
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, H * d)))


class SeamVOLOAttention(_FusedQKVSeam, volo.Attention):
    """VOLO's Attention (fused qkv, global over the flattened map, no q/k norm) on a (B, N, C) sequence; a
    (B, H, W, C) map is flattened and restored."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            B, H, W, C = x.shape
            return self.attend(x.reshape(B, H * W, C)).reshape(B, H, W, C)
        return self.attend(x)


# original class -> its seam class (matched exactly: a subclass may have its own forward)
SEAM_CLASSES: dict[type, type] = {Attention: SeamAttention, MHSA: SeamMHSA, SpatialReductionAttention: SeamSRA,
                                  volo.Attention: SeamVOLOAttention}
_SEAMS = frozenset(SEAM_CLASSES.values())


def in_seam(module: nn.Module) -> bool:
    """Whether `module` runs the seam's own forward (a seam class exactly: a subclass may replace `attend`)."""
    return type(module) in _SEAMS


def to_seam_(module: nn.Module) -> AttentionSeam:
    """Swap `module`'s class for its seam class in place (weights untouched); a seam module is returned as it is.
    Raises KeyError for a class outside the seam (callers refuse by name)."""
    if not in_seam(module):
        module.__class__ = SEAM_CLASSES[type(module)]
    return module
