"""Which blocks of which models token reduction runs in, read from the model contract (`vitlab.contract`).

A model is supported when `describe(model)` finds token-reducible blocks (a (B, N, C) sequence, attention over all of
it, no use of the H x W grid) and this module knows what the rest of the model does with the tokens those blocks
return. Each family below names its token sequences: the blocks one sequence of tokens flows through, in order.
Reduction runs in the sequence's reducible tail (the longest run of reducible blocks that ends the sequence, so
no later block needs the grid or the full count) and needs reducing classes for its block and attention
(`vitlab.tokens.patch.REDUCING_BLOCKS`):

* timm VisionTransformer (ViT, DeiT, DeiT III, registers, ViTamin, vitlab's T2T-ViT): every block.
* ConViT: the MHSA blocks from `local_up_to_layer` on, where the class token has joined (the GPSA blocks before
  them need the grid).
* CrossViT: each branch is a sequence through every multi-scale block; the cross-attention fusion reads a branch's
  class token and, as keys and values, the other branch's tokens, which get the same size bias (and ATS padding
  mask) as in the branch's own attention.
* vitlab PVT v1: the last stage, whose attention is global (sr_ratio 1) and whose tokens go only to the head;
  earlier stages end on a grid (the next stage's patch embedding).
* vitlab SpectFormer: the attention blocks after the spectral (FFT over the grid) blocks.
* vitlab ViViT (video): model 1's joint space-time blocks over all tubelet tokens; model 2's spatial blocks (each
  tubelet-frame's tokens, frames folded into the batch, of which only the class token goes on) and its temporal
  blocks over the frames' class tokens, two sequences. The head reads the class token (global_pool="token").
* vitlab VideoMAE (video): every block, over the tubelet tokens (no class token; the mean-pooling head weights
  merged tokens by size).
* vitlab STPrivacy (video): every block, over the class token and the tubelets its selector kept (`num_keep` of
  them, set before any block runs); the head reads the class token, or the size-weighted mean of the rest ("avg").
  `forward_features` returns the published tokens, so the merged or dropped ones are published as they are.
* vitlab UniFormerV2 (video) is refused: every UniBlock's local MHRA convolves each patch token with the tokens at
  the same grid position in the neighbouring frames, and the query decoder's position conv reads that grid after
  each block of `return_list` (the last block in the official configs), so no block's tokens may be merged or
  dropped.
* timm VOLO: the Transformer blocks of the stages after the last Downsample (and after the position embedding,
  added before network[2]). They run on a (B, H, W, C) map but neither their attention (over the flattened map) nor
  their MLP uses the grid, so the contract calls them grid-free map blocks with global attention, and their reducing
  class flattens the map (`patch.ReducingVOLOBlock`). VOLO flattens the network's output; the post network's class
  attention reads the reduced tokens with their size bias and ATS padding mask, and the head's aux max skips padding
  (`patch.TokenReducingVOLO`).

Heads that average tokens ("avg") weight them by the patches each stands for (`patch.TokenReducingModel`).
"""
from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn
from timm.models import convit, crossvit, tnt, vision_transformer, volo

from ..contract import BlockSpec, describe
from ..models import hyena_nd, pvt, spectformer, stprivacy, uniformerv2, videomae, vivit
from ..techniques import TechniqueNotApplicable
from .patch import REDUCING_ATTENTION, REDUCING_BLOCKS, TokenReducingModel

__all__ = ["TokenSequence", "token_sequences", "reducible_blocks", "SUPPORTS", "FAMILIES"]

SUPPORTS = ("it supports models whose blocks attend globally over a token sequence without its grid (token-reducible "
            "in vitlab.contract): timm VisionTransformer (ViT, DeiT, ViTamin, T2T-ViT, registers), ConViT's MHSA "
            "blocks, CrossViT's branches, PVT v1's last stage (sr_ratio 1), SpectFormer's attention blocks, VOLO's "
            "transformer stages, ViViT's space-time, spatial and temporal blocks (class-token head), VideoMAE and "
            "STPrivacy's blocks over its kept tubelets")


@dataclass
class TokenSequence:
    """One token sequence: the blocks reduction may run in (in order) and the tokens that enter the first."""

    name: str
    blocks: list[BlockSpec]
    num_tokens: int                    # at the model's configured input size, prefix tokens included
    num_prefix: int
    grid: tuple[int, int] | None = None   # the (H, W) its non-prefix tokens form at the first block (source maps)
    readers: list[nn.Module] = field(default_factory=list)   # other modules reading its tokens (patch.READERS)
    ranks: list[int] = field(default_factory=list)    # each block's position in the model's execution order


def _token_set(spec: BlockSpec) -> bool:
    """Token-reducible in the contract, or a map block ("nhwc") that does not use the grid and whose mixers all
    attend globally: it treats its map as a set of tokens (its reducing class flattens the map; VOLO)."""
    return spec.token_reducible or (spec.layout == "nhwc" and not spec.needs_grid and bool(spec.mixers)
                                    and all(m.global_tokens for m in spec.mixers))


def _reducible(spec: BlockSpec) -> bool:
    return (_token_set(spec) and type(spec.module) in REDUCING_BLOCKS
            and type(getattr(spec.module, "attn", None)) in REDUCING_ATTENTION)


def _tail(by_name: dict[str, BlockSpec], names: list[str]) -> list[BlockSpec]:
    """The longest run of reducible blocks that ends the sequence `names` (a block the contract does not describe
    breaks the run)."""
    tail = []
    for name in reversed(names):
        spec = by_name.get(name)
        if spec is None or not _reducible(spec):
            break
        tail.insert(0, spec)
    return tail


def _sequence(name, by_name, names, tokens_before_prefix: int, grid=None) -> list[TokenSequence]:
    tail = _tail(by_name, names)
    if not tail:
        return []
    p = tail[0].num_prefix_tokens
    grid = tuple(grid) if grid is not None and grid[0] * grid[1] == tokens_before_prefix else None
    return [TokenSequence(name, tail, tokens_before_prefix + p, p, grid)]


def _check_pool(model, allowed: tuple[str, ...]) -> None:
    pool = getattr(model, "global_pool", "")
    if pool not in allowed:
        raise TechniqueNotApplicable("token reduction", model, f"its head pools with global_pool={pool!r}; vitlab "
                                     f"weights merged tokens for {', '.join(map(repr, allowed))}; {SUPPORTS}")


def _vit(model, by_name) -> list[TokenSequence]:
    _check_pool(model, ("token", "avg", "", "map", "ggem"))   # ggem: vl_*_ggem, size-weighted
    names = [f"blocks.{i}" for i in range(len(model.blocks))]
    return _sequence("blocks", by_name, names, model.patch_embed.num_patches, _grid(model.patch_embed))


def _grid(patch_embed: nn.Module) -> tuple[int, int] | None:
    return getattr(patch_embed, "grid_size", None)


def _convit(model, by_name) -> list[TokenSequence]:
    _check_pool(model, ("token", "avg", ""))
    names = [f"blocks.{i}" for i in range(len(model.blocks))]
    return _sequence("blocks", by_name, names, model.patch_embed.num_patches, _grid(model.patch_embed))


def _crossvit(model, by_name) -> list[TokenSequence]:
    _check_pool(model, ("token", "avg", ""))
    msbs = list(model.blocks)
    if any(m.blocks is None or len(m.blocks) != m.num_branches for m in msbs):
        raise TechniqueNotApplicable("token reduction", model, "a multi-scale block has a branch without blocks; "
                                     f"{SUPPORTS}")
    sequences = []
    for b in range(model.num_branches):
        names = [f"blocks.{i}.blocks.{b}.{j}" for i, m in enumerate(msbs) for j in range(len(m.blocks[b]))]
        seq = _sequence(f"branch {b}", by_name, names, model.patch_embed[b].num_patches)
        if seq and len(seq[0].blocks) != len(names):
            raise TechniqueNotApplicable("token reduction", model, f"branch {b} has blocks that are not "
                                         f"token-reducible between multi-scale blocks; {SUPPORTS}")
        for s in seq:   # fusion d reads branch (d + 1) % n's tokens as keys: branch b is read by fusion b - 1
            s.readers.extend(_fusion_reader(m.fusion[(b - 1) % model.num_branches]) for m in msbs)
        sequences += seq
    return sequences


def _fusion_reader(fusion: nn.Module) -> nn.Module:
    """The cross-attention that reads the other branch's tokens (later blocks of a fusion see one token)."""
    return (fusion if isinstance(fusion, crossvit.CrossAttentionBlock) else fusion[0]).attn


def _pvt(model, by_name) -> list[TokenSequence]:
    _check_pool(model, ("token", "avg", ""))
    last = len(model.stages) - 1
    stage = model.stages[last]
    names = [f"stages.{last}.blocks.{j}" for j in range(len(stage.blocks))]
    return _sequence(f"stages.{last}", by_name, names, stage.grid_size[0] * stage.grid_size[1], stage.grid_size)


def _spectformer(model, by_name) -> list[TokenSequence]:
    _check_pool(model, ("avg", ""))
    names = [f"blocks.{i}" for i in range(len(model.blocks))]
    return _sequence("blocks", by_name, names, model.patch_embed.num_patches, _grid(model.patch_embed))


def _vivit(model, by_name) -> list[TokenSequence]:
    _check_pool(model, ("token",))
    t, h, w = model.patch_embed.grid_size
    spatial = [f"blocks.{i}" for i in range(len(model.blocks))]
    if not model.factorised:
        return _sequence("blocks", by_name, spatial, t * h * w)
    temporal = [f"temporal_blocks.{i}" for i in range(len(model.temporal_blocks))]
    return (_sequence("blocks", by_name, spatial, h * w, (h, w))
            + _sequence("temporal_blocks", by_name, temporal, t))


def _videomae(model, by_name) -> list[TokenSequence]:
    names = [f"blocks.{i}" for i in range(len(model.blocks))]
    return _sequence("blocks", by_name, names, model.patch_embed.num_patches)


def _stprivacy(model, by_name) -> list[TokenSequence]:
    _check_pool(model, ("token", "avg"))
    names = [f"blocks.{i}" for i in range(len(model.blocks))]
    return _sequence("blocks", by_name, names, model.num_keep)   # the kept tubelets: no grid left


def _volo(model, by_name) -> list[TokenSequence]:
    _check_pool(model, ("token", "avg", ""))
    if model.pos_embed is None:
        raise TechniqueNotApplicable("token reduction", model, "it has no position embedding to tell the grid its "
                                     f"transformer stages start from; {SUPPORTS}")
    # forward_tokens adds the (1, H, W, C) position embedding before network[2]: reduction runs after it. A
    # Downsample (not a block) breaks the run of reducible blocks; the grid at the run's first block is the
    # position embedding's, divided by each Downsample's stride in between.
    grid = tuple(model.pos_embed.shape[1:3])
    names, grids = [], {}
    for i, stage in enumerate(model.network):
        if i < 2:
            continue
        if isinstance(stage, nn.Sequential):
            for j in range(len(stage)):
                names.append(f"network.{i}.{j}")
                grids[names[-1]] = grid
        else:
            names.append(f"network.{i}")
            stride = getattr(getattr(stage, "proj", None), "stride", None)
            if stride is None:
                raise TechniqueNotApplicable("token reduction", model, f"network.{i} ({type(stage).__name__}) is "
                                             f"neither a stage nor a Downsample; {SUPPORTS}")
            grid = (grid[0] // stride[0], grid[1] // stride[1])
    tail = _tail(by_name, names)
    if not tail:
        return []
    grid = grids[tail[0].name]
    seq = TokenSequence("network", tail, grid[0] * grid[1], 0, grid)
    if model.post_network is not None:
        seq.readers.extend(b.attn for b in model.post_network if type(b.attn) is volo.ClassAttention)
        if len(seq.readers) != len(model.post_network):
            raise TechniqueNotApplicable("token reduction", model, "its post network has blocks other than VOLO's "
                                         f"class attention blocks; {SUPPORTS}")
    return [seq]


FAMILIES: dict[type, Callable] = {
    vision_transformer.VisionTransformer: _vit,
    convit.ConVit: _convit,
    crossvit.CrossVit: _crossvit,
    pvt.PyramidVisionTransformer: _pvt,
    spectformer.SpectFormer: _spectformer,
    hyena_nd.HyenaViT: _spectformer,          # Hyena blocks first, timm attention blocks last: the same layout
    volo.VOLO: _volo,
    vivit.ViViT: _vivit,
    videomae.VideoMAE: _videomae,
    stprivacy.STPrivacy: _stprivacy,
}


# block classes whose reason to refuse is not in the contract's terms
_REFUSED = {
    # a merged or fused outer token would need one set of pixel embeddings, and each block adds
    # proj(LayerNorm(pixels)) of that set to the token: no averaging of the pixels is exact (ToMe, MCTF, EViT's fused
    # token); selection alone (ATS, EViT without fusing) would be exact by gathering the kept tokens' pixels
    tnt.Block: "its inner pixel embeddings follow each outer token and feed it through LayerNorm and a projection in "
               "every block, so merging outer tokens has no exact rule for them",
    uniformerv2.UniBlock: "its local MHRA convolves each patch token with the tokens at the same grid position in the "
                          "neighbouring frames, and the query decoder's position conv reads the grid of the blocks "
                          "in return_list, so every frame must keep its full grid",
}


def _why_not(spec) -> str:
    """Why none of the model's blocks is reducible, one phrase per kind of block."""
    reasons = {}
    for b in spec.blocks:
        kinds = "+".join(m.kind for m in b.mixers) or "no mixer"
        if type(b.module) in _REFUSED:
            why = _REFUSED[type(b.module)]
        elif _token_set(b):
            why = "no reducing adapter for its classes"
        elif b.layout != "sequence":
            why = f"{b.layout} layout"
        elif b.needs_grid:
            why = "needs the token grid"
        else:
            why = "attention not global over its sequence"
        reasons.setdefault(f"{type(b.module).__name__} ({kinds}: {why})", None)
    return ", ".join(reasons) or "no blocks"


def token_sequences(model: nn.Module, technique: str = "token reduction") -> list[TokenSequence]:
    """The model's token sequences where reduction may run; `TechniqueNotApplicable` naming why when none."""
    plan = getattr(model, "token_sequences", None)
    if plan is not None and isinstance(model, TokenReducingModel):
        return plan                                   # classes are swapped: the plan made at apply time
    try:
        spec = describe(model, technique)
    except TechniqueNotApplicable:
        raise TechniqueNotApplicable(technique, model, "not a plain ViT nor any model the contract describes "
                                     f"(vitlab.contract has no adapter for it); {SUPPORTS}") from None
    family = next((FAMILIES[c] for c in type(model).__mro__ if c in FAMILIES), None)
    if not any(_reducible(b) for b in spec.blocks):
        raise TechniqueNotApplicable(technique, model, f"none of its blocks is token-reducible: {_why_not(spec)}; "
                                     f"{SUPPORTS}")
    if family is None:
        raise TechniqueNotApplicable(technique, model, f"its family ({spec.family}) has token-reducible blocks but "
                                     "vitlab.tokens has not checked what the rest of the model does with reduced "
                                     f"tokens; {SUPPORTS}")
    try:
        sequences = family(model, {b.name: b for b in spec.blocks})
    except TechniqueNotApplicable as e:
        raise TechniqueNotApplicable(technique, model, e.why) from None
    rank = {id(b.module): k for k, b in enumerate(spec.blocks)}
    for seq in sequences:
        seq.ranks = [rank[id(b.module)] for b in seq.blocks]
    if not sequences:
        raise TechniqueNotApplicable(technique, model, "no token sequence ends in token-reducible blocks (those it "
                                     "has are followed by blocks or layers that need the grid or every token); "
                                     f"{SUPPORTS}")
    return sequences


def reducible_blocks(sequences: list[TokenSequence]) -> list[tuple[int, BlockSpec]]:
    """(sequence index, block) for every block reduction may run in, in the model's execution order."""
    ranked = [(rank, i, b) for i, s in enumerate(sequences) for rank, b in zip(s.ranks, s.blocks)]
    return [(i, b) for _, i, b in sorted(ranked, key=lambda t: t[0])]

