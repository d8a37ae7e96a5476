"""Token reduction for any timm ViT: ToMe (merging) and EViT (selection), behind `vitlab.apply_`.

    model = timm.create_model("deit_small_patch16_224")
    vitlab.apply_(model, ToMe(r=13))           # or: --apply tome:r=13
    vitlab.apply_(model, EViT(keep_rate=0.7))  # or: --apply evit:keep_rate=0.7

Supported: timm `VisionTransformer` models built from timm `Block` + `Attention` (ViT, DeiT, DeiT III with
LayerScale, distilled models, register tokens, class-token and average-pool heads) and `vl_vit_fmnist`. Prefix
tokens (class, distillation, registers) are never merged or dropped. EViT ranks tokens by the class token's
attention; a model without a class token uses the mean attention each token receives (this needs the full
attention map, computed beside the fused attention). Fused attention (SDPA) is kept: ToMe's proportional attention
is an additive bias (log token size) passed as SDPA's `attn_mask`.
"""
import math
from dataclasses import dataclass

from ..techniques import Kind, TechniqueError, register_handler, register_technique
from .patch import EViTReduction, TokenReducingViT, TokenState, ToMeReduction, check_supported, patch_vit

__all__ = ["ToMe", "EViT", "TokenState", "token_schedule"]


@register_technique("tome", Kind.TOKENS)
@dataclass(frozen=True)
class ToMe:
    """Token Merging (Bolya et al., ICLR 2023): merge `r` tokens in every block by bipartite soft matching."""

    r: int = 8
    prop_attn: bool = True       # proportional attention: bias each key by log(number of patches it stands for)
    trace_source: bool = False   # keep model.token_state.source (which input patches each token stands for)

    def __post_init__(self):
        if self.r < 0:
            raise ValueError(f"r must be >= 0 (tokens merged per block), got {self.r}")


@register_technique("evit", Kind.TOKENS)
@dataclass(frozen=True)
class EViT:
    """EViT (Liang et al., ICLR 2022): keep the most class-attended tokens at 3 depths; fuse the rest into one."""

    keep_rate: float = 0.7
    fuse: bool = True            # False: plain top-k pruning by class attention
    locations: tuple[float, ...] = (0.25, 0.5, 0.75)   # blocks 3, 6, 9 (0-based) of 12, as fractions of depth
    trace_source: bool = False

    def __post_init__(self):
        if not 0 < self.keep_rate <= 1:
            raise ValueError(f"keep_rate must be in (0, 1], got {self.keep_rate}")
        if any(not 0 <= f < 1 for f in self.locations):
            raise ValueError(f"locations are fractions of the depth in [0, 1), got {self.locations}")


def _num_tokens(model) -> int:
    return model.patch_embed.num_patches + model.num_prefix_tokens


def token_schedule(model, cfg) -> list[int]:
    """Token count after each block under `cfg`, for the model's configured input size; errors if impossible."""
    p, n = model.num_prefix_tokens, _num_tokens(model)
    counts = []
    for i in range(len(model.blocks)):
        if isinstance(cfg, ToMe):
            if cfg.r > (n - p) // 2:
                raise TechniqueError(
                    f"tome:r={cfg.r} would merge more tokens than exist: block {i} has {n} tokens ({p} prefix), so at "
                    f"most {(n - p) // 2} can merge there; use r <= {_max_tome_r(model)} for this model")
            n -= cfg.r
        elif i in _evit_blocks(model, cfg):
            keep = math.ceil(cfg.keep_rate * (n - p))
            if keep < 1:
                raise TechniqueError(f"evit:keep_rate={cfg.keep_rate} keeps no token at block {i}")
            n = p + keep + (1 if cfg.fuse and keep < n - p else 0)
        counts.append(n)
    return counts


def _max_tome_r(model) -> int:
    p, n0, depth = model.num_prefix_tokens, _num_tokens(model), len(model.blocks)
    return max((r for r in range(0, n0) if all((n0 - i * r - p) // 2 >= r for i in range(depth))), default=0)


def _evit_blocks(model, cfg: EViT) -> set[int]:
    depth = len(model.blocks)
    return {min(depth - 1, round(f * depth)) for f in cfg.locations}


def _apply(model, cfg, reductions: list):
    check_supported(model)
    if isinstance(model, TokenReducingViT):
        raise TechniqueError("the model already has a token-reduction technique; apply one per model")
    token_schedule(model, cfg)
    return patch_vit(model, reductions, trace_source=cfg.trace_source, prop_attn=getattr(cfg, "prop_attn", False))


@register_handler(ToMe)
def _apply_tome(model, cfg: ToMe):
    check_supported(model)
    return _apply(model, cfg, [ToMeReduction(cfg.r) for _ in model.blocks])


@register_handler(EViT)
def _apply_evit(model, cfg: EViT):
    check_supported(model)
    blocks = _evit_blocks(model, cfg)
    return _apply(model, cfg, [EViTReduction(cfg.keep_rate, cfg.fuse) if i in blocks else None
                               for i in range(len(model.blocks))])
