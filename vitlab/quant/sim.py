"""Simulated (fake-quant) quantization of timm ViTs: thin adapters that put quantizers at the sites of a ViT.

Sites (names fixed; `vitlab.quant.base.make_quantizer` builds the quantizer for each):

* "weight" / "input": every `nn.Linear` inside the transformer blocks becomes a `QuantLinear` (class swap, weights
  and state_dict keys untouched) with `.weight_quant` (per output channel) and `.input_quant` (per tensor, or per
  token). The input of `mlp.fc2` is the "post_gelu" site when the config asks for it.
* "q", "k", "attn_prob", "v": timm `Attention` becomes `QuantAttention`, whose forward runs the two attention
  matmuls explicitly (QK^T, softmax·V) and quantizes their inputs. The fused `scaled_dot_product_attention` path
  cannot be used here: it never materializes the post-softmax probabilities, so they cannot be fake-quantized.

The patch embedding and the classifier head stay in float (the first and last layers, as in PTQ4ViT and
RepQ-ViT). Quantizers start in mode "off" (the model computes exactly what it did), `vitlab.quant.calibrate`
observes and finalizes them and switches them to "quant". A quantizer whose search needs the consuming layer's
operands (AdaLog's output objective: `wants_context`) also gets them while observing: fc2's input quantizer the
layer itself, the post-softmax quantizer V and V's quantizer (`observe_context`).
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention

from ..techniques import TechniqueNotApplicable
from .base import Quantizer, QuantizerError, make_quantizer

__all__ = ["QuantLinear", "QuantAttention", "wrap_model", "quantizers", "set_quant_mode", "quant_linears",
           "is_quantized"]

ATTN_SITES = ("q", "k", "attn_prob", "v")


class QuantLinear(nn.Linear):
    """nn.Linear whose weight and input pass through fake quantizers (`.weight_quant`, `.input_quant`).

    Made by `QuantLinear.wrap_(linear, weight_quant, input_quant)`, which swaps the class of an existing Linear so
    its parameters and state_dict keys are unchanged. The weight quantizer is calibrated on the weight itself (by
    `calibrate`), never by the forward pass.
    """

    weight_quant: Quantizer
    input_quant: Quantizer

    @classmethod
    def wrap_(cls, linear: nn.Linear, weight_quant: Quantizer, input_quant: Quantizer) -> "QuantLinear":
        if type(linear) is not nn.Linear:
            raise QuantizerError(f"QuantLinear wraps plain nn.Linear layers, got {type(linear).__name__}")
        linear.__class__ = cls
        linear.weight_quant = weight_quant
        linear.input_quant = input_quant
        return linear

    def quant_weight(self) -> torch.Tensor:
        if "weight_int8" in self._buffers:  # deployment form (vitlab.quant.deploy.int8_weight_form)
            return self.weight_int8.to(torch.float32) * self.weight_scale
        return self.weight_quant.fake_quant(self.weight) if self.weight_quant.mode == "quant" else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quant.mode == "observe" and getattr(self.input_quant, "wants_context", False):
            self.input_quant.observe_context(x, self)      # AdaLog's output objective: this layer's input rows
        return F.linear(self.input_quant(x), self.quant_weight(), self.bias)

    def set_bits(self, w: int | None = None, a: int | None = None) -> None:
        """Change the weight and/or input bit width; call `finalize()` on the changed quantizers afterwards."""
        if w is not None:
            self.weight_quant.set_bits(w)
        if a is not None:
            self.input_quant.set_bits(a)


class QuantAttention(Attention):
    """timm Attention with explicit matmuls whose inputs are fake-quantized: q·kᵀ (sites "q", "k") and
    softmax·v (sites "attn_prob", "v"). The fused SDPA kernel cannot be used: it never exposes the post-softmax
    probabilities, which is where quantization of attention hurts most (FQ-ViT, PTQ4ViT).

    `q` is quantized after the 1/sqrt(d) scaling (a constant factor, so the grid is the same up to scale), and the
    optional timm features (qk-norm, scale-norm, gate, attention masks) are kept.
    """

    q_quant: Quantizer
    k_quant: Quantizer
    attn_prob_quant: Quantizer
    v_quant: Quantizer

    @classmethod
    def wrap_(cls, attn: Attention, quants: dict[str, Quantizer]) -> "QuantAttention":
        if type(attn) is not Attention:
            raise QuantizerError(
                f"quantizing the attention matmuls needs timm's own Attention, got {type(attn).__name__} (token "
                "reduction patches attention): apply ptq with attn=false to quantize only the Linear layers")
        attn.__class__ = cls
        for site in ATTN_SITES:
            setattr(attn, f"{site}_quant", quants[site])
        return attn

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask

        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                                   # (B, H, N, d) each
        q, k = self.q_norm(q), self.k_norm(k)
        q = self.q_quant(q * self.scale)
        attn = q @ self.k_quant(k).transpose(-2, -1)                              # (B, H, N, N)
        attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
        attn = attn.softmax(dim=-1)
        if self.attn_prob_quant.mode == "observe" and getattr(self.attn_prob_quant, "wants_context", False):
            self.attn_prob_quant.observe_context(attn, v, self.v_quant)   # AdaLog's output objective: softmax·V
        attn = self.attn_drop(self.attn_prob_quant(attn))
        x = attn @ self.v_quant(v)                                                # (B, H, N, d)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


def _blocks(model: nn.Module) -> nn.Module:
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        stages = getattr(model, "stages", None)
        if stages is None:
            raise TechniqueNotApplicable("quantization (ptq, w8a8, w8)", model, "it has no `blocks` (or `stages`); "
                                         "vitlab.quant supports models whose blocks hold Linear layers (ViT-style)")
        return stages
    return blocks


def wrap_model(model: nn.Module, cfg: Any) -> nn.Module:
    """Put quantizers (mode "off") at every site `cfg` asks for, in place; return the model.

    Linear layers inside `model.blocks` get weight and input quantizers ("post_gelu" for `mlp.fc2` when
    `cfg.post_gelu`); timm Attention modules get "q", "k", "attn_prob", "v" quantizers when `cfg.attn`. Attention
    classes patched by other techniques (token reduction's) keep float attention matmuls: only their Linears are
    quantized.
    """
    if is_quantized(model):
        raise QuantizerError("the model is already quantized (it has QuantLinear layers); quantize a float model")
    blocks = _blocks(model)
    n_linear = 0
    for name, module in list(blocks.named_modules()):
        if type(module) is nn.Linear:
            site = "post_gelu" if (getattr(cfg, "post_gelu", True) and name.endswith("mlp.fc2")) else "input"
            QuantLinear.wrap_(module, make_quantizer("weight", cfg), make_quantizer(site, cfg))
            n_linear += 1
        elif type(module) is Attention and getattr(cfg, "attn", True):
            # only timm's own Attention: a subclass (token reduction's) keeps its float matmuls, Linears quantized
            QuantAttention.wrap_(module, {site: make_quantizer(site, cfg) for site in ATTN_SITES})
    if n_linear == 0:
        raise TechniqueNotApplicable("quantization (ptq, w8a8, w8)", model, "its blocks have no nn.Linear layers; "
                                     "vitlab.quant supports Linear layers and attention matmuls, not convolutions")
    return model


def quantizers(model: nn.Module) -> Iterator[tuple[str, Quantizer]]:
    """(qualified name, quantizer) for every quantizer in the model, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, Quantizer):
            yield name, module


def quant_linears(model: nn.Module) -> Iterator[tuple[str, QuantLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            yield name, module


def is_quantized(model: nn.Module) -> bool:
    return any(True for _ in quantizers(model))


def set_quant_mode(model: nn.Module, mode: str, *, weights: bool = True) -> None:
    """Set every quantizer's mode; weights=False leaves weight quantizers alone."""
    weight_quants = {id(m.weight_quant) for _, m in quant_linears(model)}
    for _, q in quantizers(model):
        if weights or id(q) not in weight_quants:
            q.set_mode(mode)
