"""MPTQ-ViT (Tai & Wu, "MPTQ-ViT: Mixed-Precision Post-Training Quantization for Vision Transformer", 2024):
SmoothQuant with a bias term (SQ-b) and greedy mixed-precision bit allocation (Greedy MP).

No official code was found; this follows the paper's abstract and SmoothQuant (Xiao et al., 2023):

* SQ-b (`smooth_`): a Linear that reads a LayerNorm (attention qkv after norm1, mlp fc1 after norm2) sees
  activations that are asymmetric per channel. Each channel j is centred by z_j = (max_j + min_j) / 2 and divided
  by s_j = a_j ** alpha / w_j ** (1 - alpha), with a_j = (max_j - min_j) / 2 and w_j = max_i |W_ij|. The shift and
  scale fold into the LayerNorm (gamma / s, (beta - z) / s) and the Linear (W diag(s), b + W z), so the float
  function is unchanged (tested). The migration strength alpha is searched per layer on a grid (the
  "scaling-ratio search"): the alpha whose smoothed Linear, with uniform min-max fake quantization of its input
  (per tensor) and weight (per output channel) at the config's bit widths, has the least output error on the
  calibration activations. (The paper's OPT-m searches the ratio between the two post-GELU scaling factors; in
  vitlab that is the twin-uniform quantizer's m search, vitlab.quant.twin.)
* Greedy MP (`allocate_bits`): every QuantLinear in the blocks gets one bit width for its weight and input from
  {4, 6, 8}. Sensitivity of a layer at b bits = the increase of the logits' mean squared error against the float
  model when only that layer drops from 8 to b bits (calibration images). Starting from all 8, the step with the
  least sensitivity per saved weight-bit is taken until the average bit width, weighted by each layer's weight
  count (model size), is within the budget `cfg.bits`.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from ..record import update_record
from .base import QuantizerError
from .sim import QuantLinear, quant_linears, quantizers

__all__ = ["smooth_", "smooth_pair_", "sqb_factors", "search_alpha", "allocate_bits", "greedy_allocation",
           "BIT_CHOICES", "ALPHA_GRID"]

BIT_CHOICES = (4, 6, 8)
ALPHA_GRID = tuple(round(0.1 * i, 1) for i in range(11))      # 0.0 ... 1.0
SEARCH_TOKENS = 4096


# ----------------------------------------------------------------------------------------------- SQ-b math

def sqb_factors(x_min: Tensor, x_max: Tensor, weight: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """(shift z, scale s) per input channel: z centres each channel, s = a**alpha / w**(1-alpha) (SmoothQuant)."""
    shift = (x_max + x_min) / 2
    act = ((x_max - x_min) / 2).clamp(min=1e-5)
    wmax = weight.abs().amax(dim=0).clamp(min=1e-5)              # (C_in,)
    scale = (act.pow(alpha) / wmax.pow(1 - alpha)).clamp(min=1e-5)
    return shift, scale


@torch.no_grad()
def smooth_pair_(norm: nn.LayerNorm, linear: nn.Linear, shift: Tensor, scale: Tensor) -> None:
    """Fold X' = (X - shift) / scale into `norm` (which produces X) and `linear` (which reads it), in place."""
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype))
    linear.bias.add_(linear.weight @ shift)                       # b + W z, with the original W
    linear.weight.mul_(scale[None, :])                            # W diag(s)
    norm.weight.div_(scale)
    norm.bias.sub_(shift).div_(scale)


def _fake_uniform(x: Tensor, bits: int, dim: int | None) -> Tensor:
    """Asymmetric min-max fake quantization of activations (per tensor, dim=None)."""
    lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
    step = ((hi - lo) / (2 ** bits - 1)).clamp(min=1e-8)
    zero = torch.round(-lo / step)
    return (torch.clamp(torch.round(x / step) + zero, 0, 2 ** bits - 1) - zero) * step


def _fake_weight(w: Tensor, bits: int) -> Tensor:
    """Symmetric per-output-channel min-max fake quantization of a weight (as vitlab's weight quantizer)."""
    step = (w.abs().amax(dim=1, keepdim=True) / (2 ** (bits - 1) - 1)).clamp(min=1e-8)
    return torch.clamp(torch.round(w / step), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * step


@torch.no_grad()
def search_alpha(x: Tensor, weight: Tensor, w_bits: int, a_bits: int,
                 grid: Sequence[float] = ALPHA_GRID) -> tuple[float, float, float]:
    """The alpha of `grid` whose SQ-b-smoothed Linear has the least quantized output MSE on inputs x (T, C).

    Returns (alpha, error at alpha, error without smoothing).
    """
    reference = x @ weight.T
    x_min, x_max = x.amin(dim=0), x.amax(dim=0)
    plain = (_fake_uniform(x, a_bits, None) @ _fake_weight(weight, w_bits).T - reference).pow(2).mean().item()
    best = (0.0, float("inf"))
    for alpha in grid:
        shift, scale = sqb_factors(x_min, x_max, weight, alpha)
        xs = (x - shift) / scale
        ws = weight * scale[None, :]
        out = _fake_uniform(xs, a_bits, None) @ _fake_weight(ws, w_bits).T + weight @ shift
        err = (out - reference).pow(2).mean().item()
        if err < best[1]:
            best = (float(alpha), err)
    return best[0], best[1], plain


def _candidate_pairs(model: nn.Module) -> list[tuple[str, nn.LayerNorm, nn.Linear]]:
    """(name, LayerNorm, Linear) named like a timm Block's norm1 -> attn.qkv, norm2 -> mlp.fc1 (by name only: a
    post-norm block such as Swin V2's has the same names with the LayerNorm after the attention)."""
    pairs = []
    for name, block in model.named_modules():
        for norm_name, path in (("norm1", ("attn", "qkv")), ("norm2", ("mlp", "fc1"))):
            norm = getattr(block, norm_name, None)
            parent = getattr(block, path[0], None)
            linear = getattr(parent, path[1], None) if parent is not None else None
            if isinstance(norm, nn.LayerNorm) and isinstance(linear, nn.Linear) and norm.elementwise_affine \
                    and norm.bias is not None:
                pairs.append((f"{name}.{path[0]}.{path[1]}", norm, linear))
    return pairs


@torch.no_grad()
def observe_calibration(model: nn.Module, calib: Iterable[Tensor], hooks: list) -> None:
    """Run the calibration batches through `model` in eval mode for the given (already registered) hooks, then
    remove them and restore the training flag."""
    was_training = model.training
    model.eval()
    try:
        for batch in calib:
            model(batch)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)


def _flat(out: Any) -> Tensor:
    """A forward's output as one flat tensor (a dense model returns a dict of tensors)."""
    if isinstance(out, Tensor):
        return out.flatten().float()
    values = out.values() if isinstance(out, dict) else out
    return torch.cat([_flat(v) for v in values if isinstance(v, (Tensor, dict, list, tuple))])


def _same_values(a: list[Tensor], b: list[Tensor]) -> bool:
    """Whether the tensors of `a` and those of `b` hold the same multiset of values (a re-ordering of each other)."""
    if not a or not b:
        return False
    x, y = torch.cat(a), torch.cat(b)
    return x.numel() == y.numel() and torch.equal(x.sort().values, y.sort().values)


@torch.no_grad()
def _pairs(model: nn.Module, batch: Tensor, tolerance: float = 1e-4) -> list[tuple[str, nn.LayerNorm, nn.Linear]]:
    """The LayerNorm -> Linear pairs whose rescaling leaves `model` unchanged. A named candidate
    (`_candidate_pairs`) is kept when, on `batch`, (1) the Linear's inputs are exactly the LayerNorm's outputs,
    possibly re-ordered (Swin's window partition), and (2) with a strong random shift and scale folded in
    (`smooth_pair_`, then restored) the model's output moves by less than `tolerance` of its largest value: nothing
    else reads that LayerNorm. A post-norm block (Swin V2), a Linear reading pooled or padded tokens (STViT's super
    tokens) and a LayerNorm read twice are left out."""
    candidates = _candidate_pairs(model)
    outputs: dict[int, list[Tensor]] = {id(norm): [] for _, norm, _ in candidates}
    inputs: dict[int, list[Tensor]] = {id(linear): [] for _, _, linear in candidates}
    hooks = [norm.register_forward_hook(lambda m, a, out: outputs[id(m)].append(out.detach().flatten()))
             for _, norm, _ in candidates]
    hooks += [linear.register_forward_pre_hook(lambda m, a: inputs[id(m)].append(a[0].detach().flatten()))
              for _, _, linear in candidates]
    observe_calibration(model, [batch], hooks)       # what each LayerNorm wrote and each Linear read
    # the Linear must read exactly the LayerNorm's values (not pooled, padded or the un-normalized input) ...
    candidates = [c for c in candidates if _same_values(outputs[id(c[1])], inputs[id(c[2])])]
    was_training = model.training
    model.eval()
    try:
        reference = _flat(model(batch))
        bound = tolerance * reference.abs().max().clamp(min=1e-6)
        generator = torch.Generator().manual_seed(0)
        # ... and nothing else may read the LayerNorm: a random rescaling folded into the pair changes nothing
        return [(name, norm, linear) for name, norm, linear in candidates
                if _rescaled_output_change(model, batch, norm, linear, reference, generator) <= bound]
    finally:
        model.train(was_training)


def _rescaled_output_change(model: nn.Module, batch: Tensor, norm: nn.LayerNorm, linear: nn.Linear,
                            reference: Tensor, generator: torch.Generator) -> float:
    """Largest change of the model's output on `batch` with a random shift and scale folded into (norm, linear)
    by `smooth_pair_`; the parameters are restored afterwards (a bias smooth_pair_ had to add is removed)."""
    params = [norm.weight, norm.bias, linear.weight] + ([linear.bias] if linear.bias is not None else [])
    saved = [p.detach().clone() for p in params]
    shift = torch.randn(linear.in_features, generator=generator).to(linear.weight.dtype)
    scale = torch.exp2(torch.empty(linear.in_features).uniform_(-2, 2, generator=generator)).to(linear.weight.dtype)
    smooth_pair_(norm, linear, shift, scale)
    try:
        return float((_flat(model(batch)) - reference).abs().max())
    finally:
        for p, value in zip(params, saved):
            p.copy_(value)
        if len(params) == 3:
            linear.bias = None


@torch.no_grad()
def smooth_(model: nn.Module, calib: Iterable[Tensor], cfg: Any, *, grid: Sequence[float] = ALPHA_GRID,
            max_tokens: int = SEARCH_TOKENS) -> nn.Module:
    """SQ-b on every LayerNorm -> Linear pair, alpha searched per layer; in place, float function unchanged.

    Call before calibration (quantizers "off"); `cfg.w` / `cfg.a` are the bit widths the search scores at.
    Records {layer: alpha} in `model.vitlab.smoothing`.
    """
    if any(q.mode != "off" for _, q in quantizers(model)):
        raise QuantizerError("smooth_ runs before calibration (quantizers in mode 'off'): it changes the weights "
                             "the quantizers would be calibrated on")
    calib = list(calib)
    if not calib:
        raise QuantizerError("smooth_: saw no calibration tokens; pass calibration images")
    pairs = _pairs(model, calib[0][:8])
    if not pairs:
        raise QuantizerError(f"{type(model).__name__} has no LayerNorm -> Linear pairs (norm1 -> attn.qkv, "
                             "norm2 -> mlp.fc1, each LayerNorm read by that Linear alone) to smooth")
    inputs: dict[str, list[Tensor]] = {name: [] for name, _, _ in pairs}
    observe_calibration(model, calib, [linear.register_forward_pre_hook(
        lambda m, args, name=name: inputs[name].append(args[0].detach().reshape(-1, args[0].shape[-1])))
        for name, _, linear in pairs])
    generator = torch.Generator().manual_seed(0)
    chosen = {}
    for name, norm, linear in pairs:
        if not inputs[name]:
            raise QuantizerError(f"smooth_: {name} saw no calibration tokens; pass calibration images")
        x = torch.cat(inputs[name]).float()                       # (T, C) every calibration token
        x_min, x_max = x.amin(dim=0), x.amax(dim=0)
        sample = x[torch.randperm(x.shape[0], generator=generator)[:max_tokens]]
        alpha, _, _ = search_alpha(sample, linear.weight.float(), cfg.w, cfg.a, grid)
        shift, scale = sqb_factors(x_min, x_max, linear.weight.float(), alpha)
        smooth_pair_(norm, linear, shift.to(linear.weight.dtype), scale.to(linear.weight.dtype))
        chosen[name] = alpha
    update_record(model, smoothing=chosen)
    return model


# ----------------------------------------------------------------------------------------------- Greedy MP

def greedy_allocation(sizes: dict[str, int], sensitivity: dict[str, dict[int, float]], budget: float,
                      choices: Sequence[int] = BIT_CHOICES) -> dict[str, int]:
    """Bits per layer: from all max(choices), repeatedly lower the layer whose next step down costs the least
    sensitivity per saved weight-bit, until sum(size * bits) / sum(size) <= budget.

    `sensitivity[layer][b]`: measured loss increase with that layer alone at b bits (the top choice costs 0).
    """
    choices = sorted(choices)
    if budget < choices[0]:
        raise ValueError(f"bit budget {budget} is below the smallest choice {choices[0]}; "
                         f"use bits >= {choices[0]} (choices {choices})")
    bits = {name: choices[-1] for name in sizes}
    total = sum(sizes.values())

    def average() -> float:
        return sum(sizes[n] * b for n, b in bits.items()) / total

    while average() > budget + 1e-9:
        best, best_cost = None, float("inf")
        for name, b in bits.items():
            i = choices.index(b)
            if i == 0:
                continue
            lower = choices[i - 1]
            cost_now = 0.0 if b == choices[-1] else sensitivity[name][b]
            cost = (sensitivity[name][lower] - cost_now) / (sizes[name] * (b - lower))
            if cost < best_cost:
                best, best_cost = (name, lower), cost
        if best is None:
            break
        bits[best[0]] = best[1]
    return bits


class _LayerStates:
    """Each layer's weight and input quantizer parameters finalized once per bit width, swapped in on demand."""

    def __init__(self, layers: dict[str, QuantLinear], choices: Sequence[int]):
        self.layers = layers
        self.states: dict[tuple[str, int], tuple[dict, dict]] = {}
        for name, layer in layers.items():
            for b in choices:
                layer.set_bits(b, b)
                layer.weight_quant.finalize()
                layer.input_quant.finalize()
                self.states[name, b] = ({k: v.clone() for k, v in layer.weight_quant.state_dict().items()},
                                        {k: v.clone() for k, v in layer.input_quant.state_dict().items()})

    def use(self, name: str, bits: int) -> None:
        layer = self.layers[name]
        layer.set_bits(bits, bits)
        weight_state, input_state = self.states[name, bits]
        layer.weight_quant.load_state_dict(weight_state)
        layer.input_quant.load_state_dict(input_state)


@torch.no_grad()
def _logit_error(model: nn.Module, images: Sequence[Tensor], reference: Sequence[Tensor]) -> float:
    return sum((model(x) - r).pow(2).mean().item() for x, r in zip(images, reference)) / len(images)


@torch.no_grad()
def allocate_bits(model: nn.Module, calib: Iterable[Tensor], cfg: Any, *, choices: Sequence[int] = BIT_CHOICES,
                  max_images: int = 128) -> dict[str, int]:
    """MPTQ's Greedy MP on a calibrated model: per-layer bits from `choices` under the average budget `cfg.bits`.

    Each QuantLinear's weight and input quantizers get the layer's bits and are re-finalized on their kept
    observations. Returns {layer name: bits} and records it as `model.vitlab.bit_allocation`.
    """
    if cfg.bits is None:
        raise ValueError("allocate_bits needs an average bit budget: ptq:bits=5.5 (for example)")
    layers = dict(quant_linears(model))
    if not layers:
        raise QuantizerError("allocate_bits: the model has no QuantLinear layers; quantize and calibrate it first")
    images, seen = [], 0
    for batch in calib:
        images.append(batch[: max_images - seen])
        seen += len(images[-1])
        if seen >= max_images:
            break
    if seen == 0:
        raise QuantizerError("allocate_bits measures each layer's sensitivity on calibration images; got none")
    modes = {name: q.mode for name, q in quantizers(model)}
    was_training = model.training
    model.eval()
    try:
        for _, q in quantizers(model):
            q.mode = "off"
        reference = [model(x) for x in images]                    # float logits
        for name, q in quantizers(model):
            q.mode = modes[name]
        top = max(choices)
        states = _LayerStates(layers, choices)
        for name in layers:
            states.use(name, top)
        base_error = _logit_error(model, images, reference)
        sensitivity: dict[str, dict[int, float]] = {}
        for name in layers:
            sensitivity[name] = {}
            for b in sorted(choices)[:-1]:
                states.use(name, b)
                sensitivity[name][b] = _logit_error(model, images, reference) - base_error
            states.use(name, top)
        sizes = {name: layer.weight.numel() for name, layer in layers.items()}
        allocation = greedy_allocation(sizes, sensitivity, float(cfg.bits), choices)
        for name, b in allocation.items():
            states.use(name, b)
    finally:
        model.train(was_training)
    update_record(model, bit_allocation=allocation, bit_sensitivity=sensitivity)
    return allocation
