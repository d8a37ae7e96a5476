"""ShiftAddViT (You et al., NeurIPS 2023): a trained ViT reparameterized towards multiplication-free arithmetic.

    vitlab train --init CKPT --apply shiftadd --recipe shiftadd --data fashion-mnist --out RUN   # then fine-tune
    vitlab.apply_(model, ShiftAdd())                                                                # in Python

Three parts, each read against the official code (github.com/GATECH-EIC/ShiftAddViT, commit 47671cf, pvt/):

* **Shift layers** (DeepShift-PS, `deepshift/modules.py` `LinearShift`): a weight is `sign * 2**shift` with
  `shift` an integer in `[-(2**(weight_bits-1) - 2), 0]` and `sign` in {-1, 0, +1}, so a product is a bit shift
  and a sign flip. The trained parameters are real-valued `shift` and `sign`, rounded in the forward pass with
  straight-through gradients (`deepshift/ste.py`); a converted layer starts at `shift = round(log2|w|)`,
  `sign = sign(w)` (`deepshift/utils.py` `get_shift_and_sign`). Inputs and bias are rounded to 16.16 fixed point
  as in the official layer.
* **Binary attention** (`pvt_v2.py` `LinAngularAttention_binary`): q and k are L2-normalised per head and
  binarised, `1[q > mean(q)]` (straight-through through `clamp(q, 0, 1)`), so `q (k^T v)` needs only additions;
  the output is the linear angular attention `0.5 v + (1/pi) q_b (k_b^T v)`, normalised per token, plus a
  depthwise convolution of v along the token axis (kernel `kernel_size` x 1, one filter per head). The official
  code thresholds at the mean of the whole batch tensor, which makes an image's output depend on the other images
  of its batch; here each image is thresholded at its own mean (over heads, tokens and channels), the same value
  for a batch of one.
* **Mixture of experts** (`fmoe_fc.py` `PyTorchFMoE_FC`, `fmoe_new.py`): each linear layer of the blocks becomes
  two experts, the original (multiplication) layer and its shift copy, with a top-1 router per token. The
  forward pass equals the official `NaiveGate` (the chosen expert's output, weight 1); the router's logits get a
  straight-through gradient (ours: `NaiveGate` passes none) and the latency-aware load-balancing loss of
  `NoisyGate_V2`: `cv^2(importance) + cv^2(load)` with each expert's share weighted by its latency (mult 6,
  shift 4 in the official code), added to the training loss by `--recipe shiftadd:weight=W`.

All arithmetic is simulated in float32 PyTorch: the values are exactly those of shift/add hardware, the speed is
not (the paper's speed-ups come from TVM kernels on GPUs). vitlab/quant/shift_kernel.py runs trained shift layers
as integer shifts and additions on the CPU; `benchmarks/shiftadd_speed.py` times what that buys.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Attention

from ..contract import describe
from ..recipes import Recipe, Step, register_recipe
from ..techniques import Kind, TechniqueNotApplicable, format_technique, register_handler, register_technique

__all__ = ["ShiftAdd", "ShiftLinear", "ShiftAddMoE", "BinaryAngularAttention", "shiftadd_", "round_to_fixed",
           "balance_loss", "moe_layers", "shift_fraction"]

ACT_INTEGER_BITS = 16    # official defaults (fmoe_fc.py): activations and bias in 16.16 fixed point
ACT_FRACTION_BITS = 16


@register_technique("shiftadd", Kind.QUANTIZATION, reapply_on_load=True)
@dataclass(frozen=True)
class ShiftAdd:
    """ShiftAddViT: binary (add-only) attention and shift / mult mixture-of-experts linears; fine-tune after.

    `attention`: replace timm attention by binary linear angular attention. `linears`: "moe" (each block linear a
    router between itself and its shift copy), "shift" (every block linear a shift layer), "none". `weight_bits`:
    shift-layer bits (sign + shift; official 5). `kernel_size`: the depthwise conv on v (official 9).
    `mult_latency` / `shift_latency`: the load-balancing loss's expert weights (official 6 and 4).
    """

    attention: bool = True
    linears: Literal["moe", "shift", "none"] = "moe"
    weight_bits: int = 5
    kernel_size: int = 9
    mult_latency: float = 6.0
    shift_latency: float = 4.0
    adds_parameters: ClassVar[bool] = True   # dconv, routers and shift parameters are in the checkpoint
    needs_calibration: ClassVar[bool] = False

    def __post_init__(self):
        if not 3 <= self.weight_bits <= 8:
            raise ValueError(f"weight_bits={self.weight_bits} must be in 3..8 (sign + shift bits)")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size={self.kernel_size} must be a positive odd number")
        if self.mult_latency <= 0 or self.shift_latency <= 0:
            raise ValueError("mult_latency and shift_latency must be > 0")
        if not self.attention and self.linears == "none":
            raise ValueError("attention=false with linears=none changes nothing: enable one of them")


# ----------------------------------------------------------------------------------------------- shift layers

class _RoundSTE(torch.autograd.Function):
    """round() forward, identity backward (deepshift/ste.py RoundFunction)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.round()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class _SignSTE(torch.autograd.Function):
    """sign() forward, identity backward (deepshift/ste.py SignFunction)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.sign()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class _UnsymGradMul(torch.autograd.Function):
    """a * b; d/da = grad * b, d/db = grad (deepshift/ste.py UnsymmetricGradMulFunction)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(b)
        return a * b

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (b,) = ctx.saved_tensors
        return grad * b, grad


class _FixedSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, integer_bits: int, fraction_bits: int) -> torch.Tensor:
        return round_to_fixed(x, integer_bits, fraction_bits)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None


def round_to_fixed(x: torch.Tensor, integer_bits: int = ACT_INTEGER_BITS,
                   fraction_bits: int = ACT_FRACTION_BITS) -> torch.Tensor:
    """Floor to a multiple of 2**-fraction_bits, clipped to [-2**(integer_bits-1), 2**(integer_bits-1) - 1]
    (deepshift/utils.py round_to_fixed)."""
    delta = 2.0 ** -fraction_bits
    bound = 2.0 ** (integer_bits - 1)
    return torch.clamp(torch.floor(x / delta) * delta, -bound, bound - 1)


class ShiftLinear(nn.Module):
    """A linear layer whose weights are `sign * 2**shift` (DeepShift-PS), built from a trained `nn.Linear`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, weight_bits: int = 5):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.shift_range = (-(2 ** (weight_bits - 1) - 2), 0)   # sign is stored apart: a ternary weight
        self.shift = nn.Parameter(torch.zeros(out_features, in_features))
        self.sign = nn.Parameter(torch.zeros(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_bits: int = 5) -> "ShiftLinear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, weight_bits)
        w = linear.weight.detach()
        with torch.no_grad():
            layer.shift.copy_(torch.log2(w.abs()).round().clamp(*layer.shift_range))   # log2(0) = -inf -> the floor
            layer.sign.copy_(w.sign())
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        return layer.to(w.device)

    def weight_q(self) -> torch.Tensor:
        """The layer's effective weight: exactly sign * 2**shift, shift an integer in `shift_range`."""
        shift = _RoundSTE.apply(self.shift.clamp(*self.shift_range))
        sign = _SignSTE.apply(_RoundSTE.apply(self.sign))
        return _UnsymGradMul.apply(2.0 ** shift, sign)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shift.data.clamp_(*self.shift_range)   # official: the stored shift is clamped every forward (no autograd)
        bias = None if self.bias is None else _FixedSTE.apply(self.bias, ACT_INTEGER_BITS, ACT_FRACTION_BITS)
        return F.linear(_FixedSTE.apply(x, ACT_INTEGER_BITS, ACT_FRACTION_BITS), self.weight_q(), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, shift_range={self.shift_range}"


# ----------------------------------------------------------------------------------------------- experts

def _cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation (fmoe_new.py cv_squared)."""
    return x.float().var() / (x.float().mean() ** 2 + 1e-10)


def balance_loss(logits: torch.Tensor, choice: torch.Tensor, latency: torch.Tensor) -> torch.Tensor:
    """NoisyGate_V2's latency-aware load balance: cv^2 of the experts' importance (softmax mass) plus cv^2 of their
    load (tokens routed), each expert's share multiplied by its latency. (T, E) logits, (T,) choices."""
    importance = logits.softmax(-1).sum(0) * latency
    load = torch.bincount(choice, minlength=logits.shape[-1]).to(logits.dtype) * latency
    return _cv_squared(importance) + _cv_squared(load)


class ShiftAddMoE(nn.Module):
    """Top-1 routing of every token between a multiplication expert (the original linear) and its shift copy."""

    def __init__(self, linear: nn.Linear, weight_bits: int = 5, latency: tuple[float, float] = (6.0, 4.0)):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.experts = nn.ModuleList([linear, ShiftLinear.from_linear(linear, weight_bits)])
        self.gate = nn.Linear(linear.in_features, 2).to(linear.weight.device)
        with torch.no_grad():                      # official init (pvt_v2.py _init_weights): trunc_normal(0.02), 0
            nn.init.trunc_normal_(self.gate.weight, std=0.02)
            self.gate.bias.zero_()
        self.register_buffer("latency", torch.tensor(latency), persistent=False)
        self.last_balance_loss: torch.Tensor | None = None
        self.last_shift_fraction: float = float("nan")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])                                  # (T, C)
        logits = self.gate(tokens)                                         # (T, 2)
        choice = logits.argmax(-1)                                         # (T,) 0: mult, 1: shift
        out = tokens.new_empty(tokens.shape[0], self.out_features)
        for e, expert in enumerate(self.experts):
            rows = (choice == e).nonzero(as_tuple=True)[0]
            if rows.numel():
                out[rows] = expert(tokens[rows]).to(out.dtype)
        if torch.is_grad_enabled() and logits.requires_grad:
            # forward value 1 (official NaiveGate); gradient d out / d p_chosen = out (straight-through)
            p = logits.softmax(-1).gather(1, choice[:, None])
            out = out * (p - p.detach() + 1.0)
            self.last_balance_loss = balance_loss(logits, choice, self.latency.to(logits.dtype))
        self.last_shift_fraction = float((choice == 1).float().mean()) if choice.numel() else float("nan")
        return out.reshape(*shape[:-1], self.out_features)


def moe_layers(model: nn.Module) -> list[ShiftAddMoE]:
    return [m for m in model.modules() if isinstance(m, ShiftAddMoE)]


def shift_fraction(model: nn.Module) -> float:
    """Share of the tokens the model's routers sent to shift experts in its last forward pass (NaN: no router)."""
    values = [m.last_shift_fraction for m in moe_layers(model) if not math.isnan(m.last_shift_fraction)]
    return sum(values) / len(values) if values else float("nan")


# ----------------------------------------------------------------------------------------------- attention

def _binarize(t: torch.Tensor) -> torch.Tensor:
    """1[t > mean(t)] per image, straight-through clamp(t, 0, 1) (LinAngularAttention_binary)."""
    mean = t.mean(dim=(1, 2, 3), keepdim=True)                        # (B, 1, 1, 1): one threshold per image
    clipped = t.clamp(0.0, 1.0)
    return (t > mean).to(t.dtype).detach() - clipped.detach() + clipped


class BinaryAngularAttention:
    """Mixin over timm's `Attention` (a class swap keeps its qkv / proj weights): binary linear angular attention
    with a depthwise conv of v, `self.dconv` (added by `shiftadd_`)."""

    dconv: nn.Conv2d
    _float_class: type

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("ShiftAddViT's binary attention is global: it takes no attention mask")
        B, N, C = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                            # (B, heads, N, head_dim) each
        q, k = self.q_norm(q), self.k_norm(k)
        q = _binarize(q / q.norm(dim=-1, keepdim=True))
        k = _binarize(k / k.norm(dim=-1, keepdim=True))
        kv = k.transpose(-2, -1) @ v                                       # (B, heads, head_dim, head_dim): adds
        out = 0.5 * v + (1.0 / math.pi) * (q @ kv)                         # (B, heads, N, head_dim)
        out = out / out.norm(dim=-1, keepdim=True)
        out = out + self.dconv(v)                                          # depthwise along the token axis
        out = out.transpose(1, 2).reshape(B, N, self.attn_dim)
        out = self.norm(out)
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))


_ATTN_CLASSES: dict[type, type] = {}


def _binary_class(base: type) -> type:
    if base not in _ATTN_CLASSES:
        _ATTN_CLASSES[base] = type(f"ShiftAdd{base.__name__}", (BinaryAngularAttention, base), {"_float_class": base})
    return _ATTN_CLASSES[base]


# ----------------------------------------------------------------------------------------------- apply

def _timm_attention_class() -> type:
    return Attention


def shiftadd_(model: nn.Module, cfg: ShiftAdd) -> nn.Module:
    """Reparameterize `model` in place as `cfg` says (through the model contract); returns it."""
    text = format_technique(cfg)
    spec = describe(model, text)
    attention_cls = _timm_attention_class()
    attentions = [m for _, m in spec.mixers("attention") if type(m.module) is attention_cls and m.global_tokens]
    if cfg.attention and not attentions:
        kinds = sorted({m.kind + ("" if type(m.module) is attention_cls else f" ({type(m.module).__name__})")
                        for _, m in spec.mixers()})
        raise TechniqueNotApplicable(
            text, model, "binary attention supports timm's global `Attention` only; this model's mixers are "
            f"{', '.join(kinds) or 'none'}: use shiftadd:attention=false for the shift / MoE linears alone")
    linears = []
    if cfg.linears != "none":
        for block in spec.blocks:
            for name, module in block.module.named_modules():
                if isinstance(module, nn.Linear) and type(module) is nn.Linear:
                    linears.append((block.module, name))
        if not linears:
            raise TechniqueNotApplicable(text, model, "shift / MoE linears supports blocks with nn.Linear layers; "
                                         "this model's blocks have none: use linears=none")
    for block_module, name in linears:       # qkv and proj too (the official --moe_attn), fc1 and fc2 (--moe_mlp)
        parent_name, _, leaf = name.rpartition(".")
        parent = block_module.get_submodule(parent_name) if parent_name else block_module
        linear = getattr(parent, leaf)
        if cfg.linears == "moe":
            new = ShiftAddMoE(linear, cfg.weight_bits, (cfg.mult_latency, cfg.shift_latency))
        else:
            new = ShiftLinear.from_linear(linear, cfg.weight_bits)
        setattr(parent, leaf, new)
    if cfg.attention:
        for mixer in attentions:
            attn = mixer.module
            weight = next(attn.parameters())
            attn.__class__ = _binary_class(type(attn))
            attn.dconv = nn.Conv2d(attn.num_heads, attn.num_heads, (cfg.kernel_size, 1),
                                   padding=(cfg.kernel_size // 2, 0), groups=attn.num_heads, bias=False)
            attn.dconv.to(weight.device)
            with torch.no_grad():                  # official init (pvt_v2.py _init_weights): N(0, 2 / fan_out)
                attn.dconv.weight.normal_(0.0, math.sqrt(2.0 / cfg.kernel_size))
    return model


@register_handler(ShiftAdd)
def _apply_shiftadd(model: nn.Module, cfg: ShiftAdd, calib=None) -> nn.Module:
    return shiftadd_(model, cfg)


# ----------------------------------------------------------------------------------------------- training


@register_recipe("shiftadd")
@dataclass
class ShiftAddRecipe(Recipe):
    """ShiftAddViT fine-tuning: the step's loss plus `weight` x the mean latency-aware load-balancing loss of the
    model's mult / shift routers (`balance_loss`); a model without routers (linears=shift or none) trains as is."""

    weight: float = 0.01

    def __post_init__(self):
        if self.weight < 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")

    def loss(self, step: Step) -> torch.Tensor:
        loss = step.default_loss()
        terms = [m.last_balance_loss for m in moe_layers(step.model) if m.last_balance_loss is not None]
        if self.weight and terms:
            loss = loss + self.weight * torch.stack(terms).mean()
        for m in moe_layers(step.model):
            m.last_balance_loss = None
        return loss
