"""Simulated (fake-quant) quantization: thin adapters that put quantizers at the sites of a model.

Sites (names fixed; `vitlab.quant.base.make_quantizer` builds the quantizer for each):

* "weight" / "input": every `nn.Linear` and `nn.Conv2d` of the model outside its stem (patch embedding) and
  classifier head becomes a `QuantLinear` / `QuantConv2d` (class swap, weights and state_dict keys untouched) with
  `.weight_quant` (per output channel; grouped and depthwise convolutions too) and `.input_quant` (per tensor, or
  per token for Linear inputs with `per_token`). The input of a Linear `mlp.fc2` is the "post_gelu" site when the
  config asks for it.
* "q", "k", "attn_prob", "v": timm's `Attention` and every attention already in the attention seam
  (`vitlab.attention`: the token-reduced attentions of ToMe, EViT, ATS, MCTF, ...) get the seam's quantization sites,
  and Swin / Swin V2 `WindowAttention` become `QuantWindowAttention` / `QuantWindowAttentionV2`; their forwards run the
  two attention matmuls explicitly (QK^T, softmax·V) and quantize their inputs. The fused
  `scaled_dot_product_attention` path cannot be used here: it never materializes the post-softmax probabilities, so
  they cannot be fake-quantized. A token reduction and the quantization then act in one forward (both effects); an
  attention that replaces the seam's forward (Sparsifiner's) is refused by name.
* Any other attention module (a contract attention mixer, or a class / attribute name with "attention" / "attn")
  becomes a `QuantAttentionOps`: its own forward, with each `F.scaled_dot_product_attention` call run as quantized
  explicit attention (the four sites above) and each matmul of two activations with both operands quantized
  ("input"-like sites). Attention math written otherwise (einsum, elementwise products, FFTs) stays float;
  `quant_mac_fraction` (vitlab.quant.coverage) counts what does.

The stem and the head stay in float (the first and last layers, as in PTQ4ViT and RepQ-ViT): their module names
come from `vitlab.contract.describe(model)` where an adapter describes the model, else from timm's
`pretrained_cfg` ("first_conv", "classifier"). A model with neither gets every layer quantized. A layer that
the forward pass never calls (a Linear whose weight another module reads directly) stays float. Quantizers start
in mode "off" (the model computes exactly what it did); `vitlab.quant.calibrate` observes and finalizes them and switches them to "quant". A quantizer whose search needs
the consuming layer's operands (AdaLog's output objective: `wants_context`) also gets them while observing: fc2's
input quantizer the layer itself, the post-softmax quantizer V and V's quantizer (`observe_context`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention
from torch.overrides import TorchFunctionMode
from timm.models.swin_transformer import WindowAttention as SwinWindowAttention
from timm.models.swin_transformer_v2 import WindowAttention as SwinV2WindowAttention

from ..attention import (ATTN_SITES, AttentionSeam, SeamAttention, attention_ops_quantized, in_seam,
                         quantized_attention_scope, to_seam_)
from ..contract import ATTENTION_KINDS, describe
from ..techniques import TechniqueNotApplicable
from .base import Quantizer, QuantizerError, make_quantizer

__all__ = ["QuantLinear", "QuantConv2d", "QuantAttention", "QuantWindowAttention", "QuantWindowAttentionV2",
           "QuantAttentionOps", "wrap_model", "float_layer_names", "quantizers", "set_quant_mode", "quant_linears",
           "quant_layers", "is_quantized", "quantizes_attention_matmuls"]

TECHNIQUE = "quantization (ptq, w8a8, w8)"


class _QuantWeight:
    """Shared by QuantLinear and QuantConv2d: the fake-quantized (or int8-deployment) weight and bit changes."""

    weight_quant: Quantizer
    input_quant: Quantizer

    def quant_weight(self) -> torch.Tensor:
        if "weight_int8" in self._buffers:  # deployment form (vitlab.quant.deploy.int8_weight_form)
            return self.weight_int8.to(torch.float32) * self.weight_scale
        return self.weight_quant.fake_quant(self.weight) if self.weight_quant.mode == "quant" else self.weight

    def set_bits(self, w: int | None = None, a: int | None = None) -> None:
        """Change the weight and/or input bit width; call `finalize()` on the changed quantizers afterwards."""
        if w is not None:
            self.weight_quant.set_bits(w)
        if a is not None:
            self.input_quant.set_bits(a)

    @classmethod
    def _swap(cls, layer: nn.Module, base: type, weight_quant: Quantizer, input_quant: Quantizer):
        if type(layer) is not base:
            raise QuantizerError(f"{cls.__name__} wraps plain {base.__name__} layers, got {type(layer).__name__}")
        layer.__class__ = cls
        layer.weight_quant = weight_quant
        layer.input_quant = input_quant
        return layer

    def unwrap_(self) -> nn.Module:
        """Back to the float layer this was made from (quantizers dropped)."""
        del self.weight_quant, self.input_quant
        self.__class__ = self._float_class
        return self


class QuantLinear(_QuantWeight, nn.Linear):
    """nn.Linear whose weight and input pass through fake quantizers (`.weight_quant`, `.input_quant`).

    Made by `QuantLinear.wrap_(linear, weight_quant, input_quant)`, which swaps the class of an existing Linear so
    its parameters and state_dict keys are unchanged. The weight quantizer is calibrated on the weight itself (by
    `calibrate`), never by the forward pass.
    """

    _float_class = nn.Linear

    @classmethod
    def wrap_(cls, linear: nn.Linear, weight_quant: Quantizer, input_quant: Quantizer) -> "QuantLinear":
        return cls._swap(linear, nn.Linear, weight_quant, input_quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quant.mode == "observe" and getattr(self.input_quant, "wants_context", False):
            self.input_quant.observe_context(x, self)      # AdaLog's output objective: this layer's input rows
        return F.linear(self.input_quant(x), self.quant_weight(), self.bias)


class QuantConv2d(_QuantWeight, nn.Conv2d):
    """nn.Conv2d whose weight (per output channel, whatever `groups`) and input (per tensor) are fake-quantized;
    made by `QuantConv2d.wrap_(conv, weight_quant, input_quant)`, a class swap like QuantLinear's."""

    _float_class = nn.Conv2d

    @classmethod
    def wrap_(cls, conv: nn.Conv2d, weight_quant: Quantizer, input_quant: Quantizer) -> "QuantConv2d":
        if weight_quant.channel_axis != 0 or input_quant.channel_axis is not None:
            raise QuantizerError("QuantConv2d quantizes weights per output channel (axis 0) and inputs per tensor")
        return cls._swap(conv, nn.Conv2d, weight_quant, input_quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quant(x), self.quant_weight(), self.bias)


class _QuantMatmuls:
    """Shared by the window-attention adapters: the four quantizers of QK^T and softmax·V, and softmax·V itself."""

    q_quant: Quantizer
    k_quant: Quantizer
    attn_prob_quant: Quantizer
    v_quant: Quantizer

    @classmethod
    def wrap_(cls, attn: nn.Module, quants: dict[str, Quantizer]):
        if type(attn) is not cls._float_class:
            raise QuantizerError(
                f"quantizing the attention matmuls needs timm's own {cls._float_class.__name__}, got "
                f"{type(attn).__name__}: apply ptq with attn=false to quantize only the Linear and Conv2d layers")
        attn.__class__ = cls
        for site in ATTN_SITES:
            setattr(attn, f"{site}_quant", quants[site])
        return attn

    def forward(self, *args, **kwargs):
        with quantized_attention_scope():     # an enclosing QuantAttentionOps leaves these matmuls alone
            return self._quant_forward(*args, **kwargs)

    def _prob_times_v(self, attn: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Quantized softmax(attn) · v, (B, H, N, d)."""
        if self.attn_prob_quant.mode == "observe" and getattr(self.attn_prob_quant, "wants_context", False):
            self.attn_prob_quant.observe_context(attn, v, self.v_quant)   # AdaLog's output objective: softmax·V
        return self.attn_drop(self.attn_prob_quant(attn)) @ self.v_quant(v)


# timm Attention with quantized matmuls is the attention seam's class with quantization sites (vitlab.attention)
QuantAttention = SeamAttention


def _add_window_mask(attn: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Swin's shifted-window mask (num_windows, N, N) added to attn (B * num_windows, H, N, N)."""
    if mask is None:
        return attn
    num_win, n = mask.shape[0], attn.shape[-1]
    attn = attn.view(-1, num_win, attn.shape[1], n, n) + mask.unsqueeze(1).unsqueeze(0)
    return attn.view(-1, attn.shape[2], n, n)


class QuantWindowAttention(_QuantMatmuls, SwinWindowAttention):
    """timm Swin's window attention (relative position bias, shifted-window mask) with fake-quantized matmuls."""

    _float_class = SwinWindowAttention

    def _quant_forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B_, N, _ = x.shape                                                        # (B * windows, tokens, C)
        q, k, v = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = self.q_quant(q * self.scale) @ self.k_quant(k).transpose(-2, -1)   # (B_, H, N, N)
        attn = _add_window_mask(attn + self._get_rel_pos_bias(), mask)
        x = self._prob_times_v(self.softmax(attn), v)                             # (B_, H, N, d)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B_, N, -1)))


class QuantWindowAttentionV2(_QuantMatmuls, SwinV2WindowAttention):
    """timm Swin V2's cosine window attention with fake-quantized matmuls: the L2-normalized q and k are quantized.
    The qkv bias (q_bias, zero k_bias, v_bias; timm adds it through F.linear on qkv's weight) is added to the
    output of the quantized `qkv` Linear, which has no bias of its own."""

    _float_class = SwinV2WindowAttention

    def _quant_forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B_, N, C = x.shape                                                        # (B * windows, tokens, C)
        qkv = self.qkv(x)
        if self.q_bias is not None:
            qkv = qkv + torch.cat((self.q_bias, self.k_bias, self.v_bias))
        q, k, v = qkv.reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = self.q_quant(F.normalize(q, dim=-1)) @ self.k_quant(F.normalize(k, dim=-1)).transpose(-2, -1)
        attn = attn * torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()  # as timm
        bias = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        bias = bias[self.relative_position_index.view(-1)].view(N, N, -1).permute(2, 0, 1).contiguous()
        attn = _add_window_mask(attn + 16 * torch.sigmoid(bias).unsqueeze(0), mask)
        x = self._prob_times_v(self.softmax(attn), v)                             # (B_, H, N, d)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B_, N, C)))


ATTENTION_ADAPTERS = {cls._float_class: cls for cls in (QuantWindowAttention, QuantWindowAttentionV2)}


class _SDPASites(nn.Module):
    """The four quantizers of one `scaled_dot_product_attention` call site."""

    def __init__(self, cfg: Any):
        super().__init__()
        for site in ATTN_SITES:
            setattr(self, f"{site}_quant", make_quantizer(site, cfg))


class _MatmulSites(nn.Module):
    """The two operand quantizers (uniform, per tensor, asymmetric: "input" sites) of one matmul call site."""

    def __init__(self, cfg: Any):
        super().__init__()
        cfg = dataclasses.replace(cfg, per_token=False) if getattr(cfg, "per_token", False) else cfg
        self.a_quant, self.b_quant = make_quantizer("input", cfg), make_quantizer("input", cfg)


_MATMULS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm)


def _activation_matmul(func, args) -> bool:
    """A matmul of two activations (no parameter operand: a weight product is a layer's business)."""
    return (func in _MATMULS and len(args) == 2 and all(isinstance(a, torch.Tensor) for a in args)
            and not any(isinstance(a, nn.Parameter) for a in args) and min(a.dim() for a in args) >= 2)


class _Intercept(TorchFunctionMode):
    """Routes the F.scaled_dot_product_attention calls and activation matmuls made inside one module's forward
    to their quantized forms, numbered by call order. In nested attention modules (a block named like attention
    around its attention) the innermost one handles a call; the ops its quantized form runs pass through the
    outer ones untouched (`vitlab.attention.quantized_attention_scope`)."""

    def __init__(self, owner: "QuantAttentionOps"):
        super().__init__()
        self.owner, self.sdpa_calls, self.matmul_calls = owner, 0, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if attention_ops_quantized():
            return func(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            self.sdpa_calls += 1
            return self._handle(self.owner.quant_sdpa, self.sdpa_calls - 1, *args, **kwargs)
        if _activation_matmul(func, args) and not kwargs:
            self.matmul_calls += 1
            return self._handle(self.owner.quant_matmul, self.matmul_calls - 1, *args)
        return func(*args, **kwargs)

    def _handle(self, quantized, *args, **kwargs):
        with quantized_attention_scope():
            return quantized(*args, **kwargs)


class QuantAttentionOps:
    """Any other attention module (PVT v2's spatial-reduction attention, TinyViT's, VOLO's, Next-ViT's, ConViT's
    GPSA, TNT's, vitlab's CvT / PVT / CrossFormer / DiNAT / RMT / T2T attentions, ...): its forward runs unchanged
    except that

    * each `F.scaled_dot_product_attention` call becomes explicit QK^T, softmax and softmax·V with fake-quantized
      inputs (q after scaling, k, the probabilities, v: one `_SDPASites` per call site in `.sdpa_quants`);
    * each matmul of two activations (hand-written q @ kᵀ, attn @ v) gets both operands fake-quantized, uniform per
      tensor (one `_MatmulSites` per call site in `.matmul_quants`).

    Call sites are numbered in call order and counted once, by `vitlab.quant.coverage.settle_`'s forward pass; a
    module that makes no such call goes back to its float class. Made by `QuantAttentionOps.wrap_(module, cfg)`
    (a class swap to a per-class subclass, so parameters and state_dict keys stay). `.quantized_macs` counts the
    MACs of the intercepted calls since it was last reset (settle_ reads it).
    """

    _classes: dict[type, type] = {}
    sdpa_quants: nn.ModuleList
    matmul_quants: nn.ModuleList

    @classmethod
    def wrap_(cls, module: nn.Module, cfg: Any) -> nn.Module:
        base = type(module)
        if base not in cls._classes:
            cls._classes[base] = type(f"QuantOps{base.__name__}", (cls, base), {"_float_class": base})
        module.__class__ = cls._classes[base]
        module.sdpa_quants, module.matmul_quants = nn.ModuleList(), nn.ModuleList()
        module.ops_cfg, module.ops_open, module.quantized_macs = cfg, True, 0
        return module

    def unwrap_(self) -> nn.Module:
        del self.sdpa_quants, self.matmul_quants, self.ops_cfg, self.ops_open, self.quantized_macs
        self.__class__ = self._float_class
        return self

    @property
    def num_call_sites(self) -> int:
        return len(self.sdpa_quants) + len(self.matmul_quants)

    def forward(self, *args, **kwargs):
        with _Intercept(self):
            return super().forward(*args, **kwargs)

    def _sites(self, sites: nn.ModuleList, i: int, make) -> nn.Module:
        if i >= len(sites):
            if not self.ops_open:
                raise QuantizerError(f"{type(self).__name__} made more attention calls than when it was quantized "
                                     f"({len(sites)} of this kind): quantize the model at the input size it runs at")
            sites.append(make(self.ops_cfg))
        return sites[i]

    def quant_matmul(self, i: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        sites = self._sites(self.matmul_quants, i, _MatmulSites)
        out = sites.a_quant(a) @ sites.b_quant(b)
        self.quantized_macs += out.numel() * a.shape[-1]
        return out

    def quant_sdpa(self, i: int, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False):
        """F.scaled_dot_product_attention's math (mask, causality, scale, grouped-query heads) with the inputs of
        its two matmuls fake-quantized by call site `i`'s quantizers."""
        sites = self._sites(self.sdpa_quants, i, _SDPASites)
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            key = key.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)
            value = value.repeat_interleave(query.shape[-3] // value.shape[-3], dim=-3)
        scale = query.shape[-1] ** -0.5 if scale is None else scale
        attn = sites.q_quant(query * scale) @ sites.k_quant(key).transpose(-2, -1)     # (..., N, M)
        if is_causal:
            attn = attn.masked_fill(~torch.ones_like(attn, dtype=torch.bool).tril(), float("-inf"))
        if attn_mask is not None:
            attn = attn.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else attn + attn_mask
        attn = attn.softmax(dim=-1)
        self.quantized_macs += attn.numel() * (query.shape[-1] + value.shape[-1])
        if sites.attn_prob_quant.mode == "observe" and getattr(sites.attn_prob_quant, "wants_context", False):
            sites.attn_prob_quant.observe_context(attn, value, sites.v_quant)
        attn = F.dropout(sites.attn_prob_quant(attn), dropout_p) if dropout_p else sites.attn_prob_quant(attn)
        return attn @ sites.v_quant(value)                                             # (..., N, dv)


def _ops_candidate(name: str, module: nn.Module, contract_attention: set[int]) -> bool:
    """An attention module that vitlab has no dedicated adapter for: a contract attention mixer, or a module whose
    class or attribute name says attention (T2T's `attention1` is a TokenPerformer). timm Attention's subclasses,
    the attention seam's classes (they have quantization sites) and nn.MultiheadAttention (its fused fast path) are
    left alone."""
    names = (type(module).__name__.lower(), name.rsplit(".", 1)[-1].lower())
    named = any("attention" in n or "attn" in n for n in names) or id(module) in contract_attention
    return (named and not isinstance(module, (Attention, AttentionSeam, nn.MultiheadAttention, _QuantMatmuls,
                                              QuantAttentionOps))
            and type(module) not in ATTENTION_ADAPTERS)


def _outside_seam(model: nn.Module) -> None:
    """Refuse a model with an attention that subclasses the seam but replaces its forward (Sparsifiner's masked
    attention): quantization sites put there would be skipped silently."""
    for name, module in model.named_modules():
        if isinstance(module, AttentionSeam) and not in_seam(module):
            raise TechniqueNotApplicable(
                TECHNIQUE, model, f"its attention {name} ({type(module).__name__}) computes attention outside the "
                "attention seam (vitlab.attention), so its matmuls cannot be quantized; quantized attention supports "
                "timm Attention and the seam's token-reduced attentions (tome, evit, ats, mctf, slim, iared), Swin "
                "(V2) window attention and the SDPA calls / matmuls of other attention modules: apply ptq with "
                "attn=false to quantize only the Linear and Conv2d layers")


def quantizes_attention_matmuls(module: nn.Module) -> bool:
    """Whether `module`'s own forward runs quantized attention matmuls (a window adapter, a seam with sites)."""
    return isinstance(module, _QuantMatmuls) or (isinstance(module, AttentionSeam) and module.quantized)


# ----------------------------------------------------------------------------------------------- where

def _names(value) -> tuple[str, ...]:
    if not value:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def _spec(model: nn.Module):
    """The model contract's description of `model`, or None (no contract, or no adapter for this model)."""
    try:
        return describe(model)
    except TechniqueNotApplicable:
        return None


def float_layer_names(model: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(stem, head) module names that stay float: from the model contract (`vitlab.contract.describe`: the layers
    that see pixels, the classifier) where an adapter describes the model, else timm's pretrained_cfg
    "first_conv" and "classifier"; names that are not modules of `model` are dropped. ((), ()) when neither
    source names any: then every layer is quantized."""
    spec = _spec(model)
    if spec is not None:
        stem, head = _names(spec.stem), _names(spec.head)
    else:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        stem, head = _names(cfg.get("first_conv")), _names(cfg.get("classifier"))
    modules = dict(model.named_modules())
    return tuple(n for n in stem if n in modules), tuple(n for n in head if n in modules)


def _contract_attention(model: nn.Module) -> set[int]:
    """ids of the modules the contract names as attention mixers (ConViT's GPSA / MHSA, whose class names do not
    say attention)."""
    spec = _spec(model)
    blocks = spec.blocks if spec is not None else ()
    return {id(m.module) for b in blocks for m in b.mixers if m.kind in ATTENTION_KINDS}


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


# ----------------------------------------------------------------------------------------------- wrap

def wrap_model(model: nn.Module, cfg: Any) -> nn.Module:
    """Put quantizers (mode "off") at every site `cfg` asks for, in place; return the model.

    Every nn.Linear and nn.Conv2d outside the stem and head (`float_layer_names`) gets weight and input
    quantizers ("post_gelu" for a Linear `mlp.fc2` when `cfg.post_gelu`; Conv2d inputs per tensor even with
    `cfg.per_token`); timm Attention, the attention seam's classes (token-reduced attention: the reduction keeps
    working) and Swin (V2) WindowAttention modules get "q", "k", "attn_prob", "v" quantizers when `cfg.attn`.
    """
    if is_quantized(model):
        raise QuantizerError("the model is already quantized (it has QuantLinear layers); quantize a float model")
    if getattr(cfg, "attn", True):
        _outside_seam(model)
    stem, head = float_layer_names(model)
    contract_attention = _contract_attention(model)
    conv_cfg = dataclasses.replace(cfg, per_token=False) if getattr(cfg, "per_token", False) else cfg
    n_layers = 0
    for name, module in list(model.named_modules()):
        if _under(name, stem + head):
            continue
        if type(module) is nn.Linear:
            site = "post_gelu" if (getattr(cfg, "post_gelu", True) and name.endswith("mlp.fc2")) else "input"
            QuantLinear.wrap_(module, make_quantizer("weight", cfg), make_quantizer(site, cfg))
            n_layers += 1
        elif type(module) is nn.Conv2d:
            QuantConv2d.wrap_(module, make_quantizer("weight", cfg), make_quantizer("input", conv_cfg))
            n_layers += 1
        elif (type(module) is Attention or in_seam(module)) and getattr(cfg, "attn", True):
            to_seam_(module).add_quant_sites_({site: make_quantizer(site, cfg) for site in ATTN_SITES})
        elif type(module) in ATTENTION_ADAPTERS and getattr(cfg, "attn", True):
            ATTENTION_ADAPTERS[type(module)].wrap_(module, {site: make_quantizer(site, cfg) for site in ATTN_SITES})
        elif _ops_candidate(name, module, contract_attention) and getattr(cfg, "attn", True):
            QuantAttentionOps.wrap_(module, cfg)
    if n_layers == 0:
        raise TechniqueNotApplicable(TECHNIQUE, model, "it has no nn.Linear or nn.Conv2d layer outside its stem and "
                                     "head; vitlab.quant supports Linear and Conv2d layers and timm's attention "
                                     "matmuls")
    return model


def unwrap_uncalled_(model: nn.Module, called: set[str]) -> list[str]:
    """Turn quantized layers whose forward never ran (a Linear whose weight another module reads directly, as
    timm's Swin V2 does with qkv outside vitlab's adapter) and QuantAttentionOps modules that made no attention
    call back into float modules: calibration could not observe them. Close the others' call sites. Returns the
    names turned back."""
    gone = [name for name, m in quant_layers(model) if name not in called]
    gone += [name for name, m in model.named_modules() if isinstance(m, QuantAttentionOps) and not m.num_call_sites]
    for name in gone:
        model.get_submodule(name).unwrap_()
    for m in model.modules():
        if isinstance(m, QuantAttentionOps):
            m.ops_open = False
    return gone


# ----------------------------------------------------------------------------------------------- queries

def quantizers(model: nn.Module) -> Iterator[tuple[str, Quantizer]]:
    """(qualified name, quantizer) for every quantizer in the model, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, Quantizer):
            yield name, module


def quant_linears(model: nn.Module) -> Iterator[tuple[str, QuantLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            yield name, module


def quant_layers(model: nn.Module) -> Iterator[tuple[str, QuantLinear | QuantConv2d]]:
    """Every weight-quantized layer: QuantLinear and QuantConv2d, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, _QuantWeight):
            yield name, module


def is_quantized(model: nn.Module) -> bool:
    return any(True for _ in quantizers(model))


def set_quant_mode(model: nn.Module, mode: str, *, weights: bool = True) -> None:
    """Set every quantizer's mode; weights=False leaves weight quantizers alone."""
    weight_quants = {id(m.weight_quant) for _, m in quant_layers(model)}
    for _, q in quantizers(model):
        if weights or id(q) not in weight_quants:
            q.set_mode(mode)
