"""Raw attention maps and attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", 2020).

The attention probabilities are captured, not recomputed from weights: a TorchFunctionMode around the forward of
every attention mixer the model contract names (`vitlab.contract.describe`) records the first attention that mixer
computes, either the probabilities of an `F.scaled_dot_product_attention` call (timm's fused path, the token-reduction
adapters' size-biased SDPA) or the output of a softmax over the last dimension (hand-written attention, the int8
simulation's explicit QK^T / softmax). No class is patched, so fused, pruned, token-reduced and fake-quantized
attention are all covered.

Token-reduced models (ToMe, EViT, ATS, MCTF: `vitlab.tokens.patch.TokenReducingModel`) run with source tracing on:
layer l's attention A_l (N_l x N_l over the surviving tokens) is mapped back to the N0 input tokens through the
source matrix S_l (N_l x N0, row i marks the input tokens token i stands for) as S_l^T A_l S_l / size: input token p
(inside token i) gives input token q (inside token j) the share A_l[i, j] / |j|, so rows still sum to one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..contract import ATTENTION_KINDS, describe
from ..techniques import TechniqueNotApplicable
from .core import ExplainError, register_method

__all__ = ["AttentionLayer", "capture_attention", "attention_saliency", "rollout", "sdpa_probs"]

_SOFTMAX = (torch.softmax, torch.Tensor.softmax, F.softmax)


@dataclass
class AttentionLayer:
    """One attention mixer's probabilities for one forward.

    name: the mixer's qualified module name; probs: (B', heads, N, M) as computed (B' = B x windows for window
    attention); source: (B, N, N0) the input tokens each of the N tokens stands for (token-reduced models; None where
    the tokens are the block's own); num_prefix: class/register tokens at the front of the queries and keys."""

    name: str
    probs: torch.Tensor
    source: torch.Tensor | None
    num_prefix: int

    def patch_space(self, batch: int) -> torch.Tensor | None:
        """(B, heads, N0, M0): the attention between input tokens (merged tokens spread over the tokens they stand
        for, weighted 1 / size), or None where it is not one map per image over one token set (window attention)."""
        if self.probs.dim() != 4 or self.probs.shape[0] != batch:           # windows: (B x windows, ...), 5-D
            return None
        if self.source is None:
            return self.probs
        S = self.source.to(self.probs.dtype)                                   # (B, N, N0)
        if self.probs.shape[-1] != S.shape[1] or self.probs.shape[-2] != S.shape[1]:
            return None
        size = S.sum(-1, keepdim=True).clamp(min=1)                            # (B, N, 1) input tokens per token
        return S.transpose(1, 2)[:, None] @ self.probs @ (S / size)[:, None]   # (B, heads, N0, N0)


def sdpa_probs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor | None = None, attn_mask=None,
               dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
               enable_gqa: bool = False) -> torch.Tensor:
    """The probabilities F.scaled_dot_product_attention uses, softmax(q k^T * scale + mask), (..., N, M) (no
    dropout: explanations run in eval mode)."""
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    logits = (query * scale) @ key.transpose(-2, -1)                           # (..., N, M)
    if is_causal:
        logits = logits.masked_fill(~torch.ones_like(logits, dtype=torch.bool).tril(), float("-inf"))
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else logits + attn_mask
    return logits.float().softmax(dim=-1)


class _Capture(TorchFunctionMode):
    """Records the first attention probabilities computed inside one mixer's forward; every call runs unchanged."""

    def __init__(self, state: Any = None):
        super().__init__()
        self.state = state                     # the mixer's TokenState: its sources are read when attention is
        self.probs: torch.Tensor | None = None  # computed (MCTF merges, then attends, in one forward)
        self.source: torch.Tensor | None = None

    def _record(self, probs: torch.Tensor) -> None:
        self.probs = probs[:, None] if probs.dim() == 3 else probs              # (B, N, M): one head (cascaded)
        if self.state is not None:  # nothing reduced yet: identity sources
            self.source = self.state.source if self.state.source is not None else \
                torch.eye(probs.shape[-1], device=probs.device).expand(probs.shape[0], -1, -1)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.probs is None:
            if func is F.scaled_dot_product_attention:
                self._record(sdpa_probs(*args, **kwargs).detach())
            elif func in _SOFTMAX and isinstance(out, torch.Tensor) and out.dim() >= 3:
                dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
                if dim is not None and dim % out.dim() == out.dim() - 1:
                    self._record(out.detach().float())
        return out


def _attention_mixers(model: nn.Module, method: str) -> list[tuple[str, nn.Module, nn.Module, int]]:
    """(qualified name, module whose forward computes the attention, the mixer, prefix tokens) of every attention
    mixer the contract names, in execution order."""
    try:
        spec = describe(model, f"--method {method}")
    except TechniqueNotApplicable as e:
        raise ExplainError(f"--method {method} reads attention through the model contract: {e}; use --method gradcam "
                           "instead") from None
    # MCTF fuses a block's tokens before attending, computing the attention in the block, not in its mixer's
    # forward: there the block's forward is the one watched (its first softmax is the unfused tokens' attention)
    mixers = [(spec.qualified(b, m.name), b.module if getattr(getattr(b.module, "reduction", None),
                                                              "before_attention", False) else m.module,
               m.module, b.num_prefix_tokens) for b, m in spec.mixers(*ATTENTION_KINDS)]
    if not mixers:
        raise ExplainError(f"--method {method}: {type(model).__name__} ({spec.family}) has no attention mixer "
                           "(its token mixers are " + ", ".join(sorted({m.kind for _, m in spec.mixers()})) +
                           "); use --method gradcam instead")
    return mixers


def capture_attention(model: nn.Module, images: torch.Tensor, method: str = "attention") -> list[AttentionLayer]:
    """Run `images` (B, C, H, W) through `model` (eval, no grad) and return the attention of every contract attention
    mixer that computed one, in call order. Token-reduced models trace sources for this forward."""
    mixers = _attention_mixers(model, method)
    layers: list[AttentionLayer] = []
    states = tuple(getattr(model, "token_states", ()))
    previous = [s.trace_source for s in states]

    def wrap(name: str, mixer: nn.Module, num_prefix: int, forward):
        state = getattr(mixer, "token_state", None)

        def forward_capturing(*args, **kwargs):
            with _Capture(state) as capture:
                out = forward(*args, **kwargs)
            if capture.probs is not None:
                prefix = state.num_prefix if state is not None else num_prefix
                layers.append(AttentionLayer(name, capture.probs, capture.source, prefix))
            return out
        return forward_capturing

    wrapped = []
    try:
        for s in states:
            s.trace_source = True
        for name, module, mixer, num_prefix in mixers:
            wrapped.append((module, module.__dict__.get("forward")))         # an instance attribute already there
            module.forward = wrap(name, mixer, num_prefix, module.forward)    # an instance attribute: no class patched
        with torch.no_grad():
            model.eval()(images)
    finally:
        for module, own in wrapped:
            if own is None:
                del module.forward
            else:
                module.forward = own
        for s, p in zip(states, previous):
            s.trace_source = p
    if not layers:
        raise ExplainError(f"--method {method}: none of {type(model).__name__}'s {len(mixers)} attention mixers "
                           "computed attention probabilities vitlab can read (no softmax or "
                           "scaled_dot_product_attention call); use --method gradcam instead")
    return layers


def _grid(n: int, images: torch.Tensor, model: nn.Module, what: str) -> tuple[int, int]:
    """The (gh, gw) grid n patch tokens form over images of this aspect ratio."""
    H, W = images.shape[-2:]
    gh = max(1, round(math.sqrt(n * H / W)))
    if n % gh or abs(n // gh / gh - W / H) > 0.5 * W / H:
        raise ExplainError(f"{what}: the {n} key tokens (after the prefix tokens) of {type(model).__name__}'s layer "
                           f"form no grid over a {H}x{W} image (padding or extra tokens); use --method gradcam instead")
    return gh, n // gh


def _from_prefix(attn: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """(B, N, M) attention -> (B, M - prefix): the class token's row over the patch keys, or, without a prefix
    token, the mean attention each patch key receives."""
    if num_prefix > 0:
        return attn[:, 0, num_prefix:]
    return attn.mean(1)


def attention_saliency(layers: list[AttentionLayer], images: torch.Tensor, model: nn.Module,
                       layer: int = -1, head: int | None = None) -> torch.Tensor:
    """(B, gh, gw): layer `layer`'s attention (head `head`, default the mean over heads) from the class token to the
    patches, or the mean attention each patch receives without a class token; keys on a reduced grid (spatial-
    reduction attention) give that grid."""
    B = len(images)
    if not -len(layers) <= layer < len(layers):
        raise ExplainError(f"--layer {layer}: {type(model).__name__} has {len(layers)} attention layers "
                           f"(0..{len(layers) - 1}, or negative from the last)")
    chosen = layers[layer]
    attn = chosen.patch_space(B)                                               # (B, heads, N, M)
    if attn is None:
        usable = [i for i, L in enumerate(layers) if L.patch_space(B) is not None]
        raise ExplainError(f"--method attention: layer {layer % len(layers)} ({chosen.name}) computes "
                           f"{tuple(chosen.probs.shape)} probabilities for {B} image(s): it attends within windows or "
                           "groups, not over the image's token grid; "
                           + (f"choose --layer among {usable} or use --method gradcam" if usable else
                              "it has no global attention layer: use --method gradcam instead"))
    if head is not None and not -attn.shape[1] <= head < attn.shape[1]:
        raise ExplainError(f"--head {head}: layer {layer % len(layers)} ({chosen.name}) has {attn.shape[1]} heads")
    attn = attn.mean(1) if head is None else attn[:, head]                     # (B, N, M)
    keys = _from_prefix(attn, chosen.num_prefix)                               # (B, M - prefix)
    gh, gw = _grid(keys.shape[-1], images, model, "--method attention")
    return keys.reshape(B, gh, gw)                                             # (B, gh, gw)


def rollout(attentions: list[torch.Tensor]) -> torch.Tensor:
    """Attention rollout: R = Â_L ... Â_1 with Â = row-normalised (0.5 A + 0.5 I), A each layer's (B, heads, N, N)
    attention averaged over heads; returns R (B, N, N)."""
    B, _, N, _ = attentions[0].shape
    eye = torch.eye(N, dtype=attentions[0].dtype, device=attentions[0].device)
    R = eye.expand(B, N, N)
    for A in attentions:
        A_hat = 0.5 * A.mean(1) + 0.5 * eye                                    # (B, N, N)
        A_hat = A_hat / A_hat.sum(-1, keepdim=True)
        R = A_hat @ R
    return R


def _square(layer: AttentionLayer, batch: int) -> torch.Tensor | None:
    """(B, heads, N, N) for rollout: the layer's attention between input tokens; a class-attention layer (CaiT,
    VOLO's post network: only the class token queries, (1 x N)) leaves the other tokens unchanged (identity rows)."""
    attn = layer.patch_space(batch)
    if attn is not None and attn.shape[-2] == 1 and layer.num_prefix > 0:
        eye = torch.eye(attn.shape[-1], dtype=attn.dtype, device=attn.device)
        full = eye.repeat(*attn.shape[:2], 1, 1)                               # (B, heads, N, N)
        full[:, :, :1] = attn
        return full
    return attn


def _global_run(layers: list[AttentionLayer], batch: int) -> list[int]:
    """Indices of the trailing layers whose attention is global over one and the same token set (the whole model
    for a ViT, token-reduced or not; the last stage's global blocks for a hierarchical model)."""
    run: list[int] = []
    size = None
    for i in range(len(layers) - 1, -1, -1):
        attn = _square(layers[i], batch)
        if attn is None or attn.shape[-1] != attn.shape[-2] or (size is not None and attn.shape[-1] != size):
            break
        size = attn.shape[-1]
        run.insert(0, i)
    return run


@register_method("attention")
def attention_method(model: nn.Module, images: torch.Tensor, target: torch.Tensor, layer: int = -1,
                     head: int | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Raw attention of one layer (default the last) and head (default the mean); extras["attention"] lists every
    layer's (B', heads, N, M) probabilities, extras["layers"] their mixer names. Class-independent: `target` unused."""
    layers = capture_attention(model, images, "attention")
    saliency = attention_saliency(layers, images, model, layer, head)
    return saliency, {"attention": [L.probs for L in layers], "layers": [L.name for L in layers]}


@register_method("rollout")
def rollout_method(model: nn.Module, images: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """Attention rollout over the trailing layers that attend globally over one token set (merged tokens mapped back
    to the input tokens); saliency = the class token's rollout row over the patches (mean over rows without a class
    token). extras["rollout"]: R (B, N0, N0); extras["layers"]: the mixers rolled out. Class-independent."""
    B = len(images)
    layers = capture_attention(model, images, "rollout")
    run = _global_run(layers, B)
    if not run:
        last = layers[-1]
        raise ExplainError(f"--method rollout multiplies attention maps over one token set; {type(model).__name__}'s "
                           f"last attention layer ({last.name}, probabilities {tuple(last.probs.shape)}) attends "
                           "within windows or over a reduced key set, not over all its tokens; use --method gradcam "
                           "instead (or --method attention on a global layer)")
    R = rollout([_square(layers[i], B) for i in run])                          # (B, N0, N0)
    patches = _from_prefix(R, layers[run[-1]].num_prefix)                      # (B, N0 - prefix)
    gh, gw = _grid(patches.shape[-1], images, model, "--method rollout")
    return patches.reshape(B, gh, gw), {"rollout": R, "layers": [layers[i].name for i in run]}

