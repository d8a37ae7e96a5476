"""How each token-reduction config is carried out: `vitlab.apply_` dispatches a config to its handler here, which
checks the schedule (`vitlab.tokens.schedule`) and patches the model's reducible blocks (`vitlab.tokens.patch`) or
hands over to the technique's own module (Slim, IA-RED², Sparsifiner, LookupViT)."""
import torch.nn as nn
from timm.layers import Attention, Mlp
from timm.models.vision_transformer import Block, VisionTransformer

from ..techniques import (Kind, TechniqueError, TechniqueNotApplicable, applied_techniques, format_technique,
                          register_handler, technique_kind)
from .ats import ATSReduction
from .configs import ATS, IARED, MCTF, EViT, LookupViT, Slim, Sparsifiner, ToMe
from .families import reducible_blocks, token_sequences
from .iared import apply_iared
from .lookupvit import compressed_grid, lookup_blocks
from .mctf import MCTFReduction
from .patch import EViTReduction, TokenReducingModel, TokenState, ToMeReduction, _reducing_class, patch_model
from .schedule import block_settings, token_schedule
from .slim import apply_slim
from .sparsifiner import sparsify_model


def _apply(model, cfg, make):
    """Patch `model` with `make(setting)` (a reduction, or None) in each reducible block."""
    if isinstance(model, TokenReducingModel):
        raise TechniqueError("the model already has a token-reduction technique; apply one per model")
    sequences = token_sequences(model, format_technique(cfg))
    token_schedule(model, cfg)
    where = {id(b.module): (i, j) for i, s in enumerate(sequences) for j, b in enumerate(s.blocks)}
    reductions = [[None] * len(s.blocks) for s in sequences]
    for (_, spec), setting in zip(reducible_blocks(sequences), block_settings(cfg, sequences)):
        i, j = where[id(spec.module)]
        reductions[i][j] = make(setting)
    patch_model(model, sequences, reductions, trace_source=cfg.trace_source,
                prop_attn=getattr(cfg, "prop_attn", False))
    model.token_sequences = sequences
    return model


@register_handler(ToMe)
def _apply_tome(model, cfg: ToMe):
    return _apply(model, cfg, ToMeReduction)


@register_handler(EViT)
def _apply_evit(model, cfg: EViT):
    return _apply(model, cfg, lambda active: EViTReduction(cfg.keep_rate, cfg.fuse) if active else None)


@register_handler(ATS)
def _apply_ats(model, cfg: ATS):
    return _apply(model, cfg, lambda active: ATSReduction(cfg.keep_rate) if active else None)


@register_handler(MCTF)
def _apply_mctf(model, cfg: MCTF):
    return _apply(model, cfg, lambda active: MCTFReduction(cfg.r, cfg.tau_sim, cfg.tau_info, cfg.tau_size,
                                                           cfg.bidirection) if active else None)


@register_handler(Slim)
def _apply_slim(model, cfg: Slim):
    return apply_slim(model, cfg)


@register_handler(IARED)
def _apply_iared(model, cfg: IARED):
    return apply_iared(model, cfg)


def _one_token_technique(model, cfg) -> None:
    """Sparsifiner and LookupViT rewrite attention: refuse a model that already has a token-reduction technique."""
    if isinstance(model, TokenReducingModel) or any(technique_kind(t) == Kind.TOKENS
                                                    for t in applied_techniques(model)):
        raise TechniqueError(f"{format_technique(cfg)}: the model already has a token-reduction technique; apply one "
                             "per model")


def _mark_token_reduced(model, sequences):
    """Swap in the token-reducing model class (token states without sizes: its forward and head are the model's),
    so that a later token technique is refused as the second one."""
    model.__class__ = _reducing_class(type(model))
    model.token_states = tuple(TokenState(num_prefix=s.num_prefix) for s in sequences)
    model.token_state = model.token_states[0]
    return model


@register_handler(Sparsifiner)
def _apply_sparsifiner(model, cfg: Sparsifiner):
    _one_token_technique(model, cfg)
    sequences = token_sequences(model, format_technique(cfg))
    sparsify_model(model, sequences, cfg.keep_rate, cfg.reduce_n, cfg.reduce_c)
    return _mark_token_reduced(model, sequences)


LOOKUP_SUPPORTS = ("it supports timm VisionTransformer models (ViT, DeiT, vitlab's hybrid ViTs) whose blocks are timm "
                   "Blocks with timm Attention and Mlp over one patch grid, with a class-token or average-pooling head")


@register_handler(LookupViT)
def _apply_lookupvit(model, cfg: LookupViT):
    _one_token_technique(model, cfg)
    text = format_technique(cfg)
    sequences = token_sequences(model, text)
    blocks = getattr(model, "blocks", None)
    why = None
    if not isinstance(model, VisionTransformer) or type(blocks) is not nn.Sequential:
        why = "it is not a timm VisionTransformer with a plain sequence of blocks"
    elif len(sequences) != 1 or [b.module for b in sequences[0].blocks] != list(blocks) or sequences[0].grid is None:
        why = "its blocks are not one token sequence over a patch grid"
    elif any(type(b) is not Block or type(b.attn) is not Attention or type(b.mlp) is not Mlp
             or getattr(b.attn, "gate", None) is not None for b in blocks):
        why = "a block is not a timm Block with timm Attention (no gate) and Mlp"
    elif model.global_pool not in ("token", "avg"):
        why = f"its head pools with global_pool={model.global_pool!r}"
    if why:
        raise TechniqueNotApplicable(text, model, f"{why}; {LOOKUP_SUPPORTS}")
    grid = sequences[0].grid
    compressed = compressed_grid(grid, cfg.tokens) if cfg.tokens < grid[0] * grid[1] else None
    if compressed is None:
        raise TechniqueError(f"{text}: {cfg.tokens} compressed tokens must be fewer than the {grid[0]}x{grid[1]} patch "
                             f"grid's {grid[0] * grid[1]} and form an h x w grid within it (e.g. tokens=16 or 49)")
    lookup_blocks(model, sequences[0].num_prefix, grid, compressed, cfg.lookup_mlp_ratio)
    return _mark_token_reduced(model, sequences)
