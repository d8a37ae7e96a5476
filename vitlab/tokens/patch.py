"""Thin adapters that fit token reduction into a model's own blocks, keeping fused attention.

The model's class is swapped for a subclass (weights untouched) whose `forward_features` resets a small per-forward
state per token sequence and whose average pooling weights tokens by the patches they stand for; each reducible
block's class is swapped for a subclass that calls the block's own sublayers (`norm1`, `attn`, `ls1`, `drop_path1`,
`norm2`, `mlp`, ...) and reduces tokens between attention and MLP; each attention becomes its class in the
attention seam (`vitlab.attention`), whose bias hook adds ToMe's proportional-attention bias (log token size) to
SDPA's `attn_mask` and whose observation hook records what the reduction needs (the mean key per token for ToMe; the
class token's attention row for EViT, which costs one extra (1 x N) query against the keys, not the full attention
map). A quantization applied afterwards puts its sites on the same seam. Which blocks of which models:
`vitlab.tokens.families`.

Reducing classes exist for timm's `Block` + `Attention` (ViT, DeiT, ViTamin, CrossViT branches, T2T-ViT,
SpectFormer's attention blocks), ConViT's `Block` + `MHSA`, vitlab PVT v1's `Block` + `SpatialReductionAttention`
(sr_ratio 1) and VOLO's `Transformer` + `Attention` (its map flattened to a sequence: after a reduction the block
returns a (B, 1, N', C) map, which VOLO flattens back after its network), the attentions through the seam's classes;
a class is matched exactly, so a subclass with its own forward is never swapped.

Token sources: `model.token_state.source` (B, N, N0) when tracing is on; row i marks the input tokens (prefix tokens
first, then patches in raster order) of the first reducible block that the surviving token i stands for.
`model.token_state.size` (B, N, 1) counts them (ToMe), and `model.token_state.counts` lists the token count after
each reducible block. A model with several token sequences (CrossViT's branches) has one state per sequence in
`model.token_states`; `model.token_state` is the first.
"""
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from timm.models import volo
from timm.models.convit import Block as ConViTBlock
from timm.models.crossvit import CrossAttention
from timm.models.vision_transformer import Block, VisionTransformer

from ..attention import SEAM_CLASSES, SeamAttention, to_seam_
from ..models.pvt import Block as PvtBlock
from ..techniques import TechniqueError
from .merge import bipartite_soft_matching, merge_source, merge_wavg
from .select import evit_select, num_kept

__all__ = ["TokenState", "TokenReducingModel", "TokenReducingViT", "TokenReducingVOLO", "ReducingBlock",
           "ReducingAttention", "ReductionObserver",
           "REDUCING_BLOCKS", "REDUCING_ATTENTION", "patch_model"]


@dataclass
class TokenState:
    """Per-forward state of one token sequence of a token-reduced model (reset at the start of every forward)."""

    num_prefix: int
    trace_source: bool = False
    prop_attn: bool = False
    size: Optional[torch.Tensor] = None        # (B, N, 1) patches per token (ToMe, MCTF); 0 marks padding (ATS)
    source: Optional[torch.Tensor] = None      # (B, N, N0) input tokens per token (when tracing)
    counts: list[int] = field(default_factory=list)            # tokens executed after each block (batch max)
    padded: bool = False                       # some rows are padding (size 0): mask them as keys (ATS)
    image_counts: list[torch.Tensor] = field(default_factory=list)  # (B,) real tokens per image (ATS blocks)

    def reset(self) -> None:
        self.size, self.source, self.counts, self.padded, self.image_counts = None, None, [], False, []

    def key_bias(self, attn_mask: Optional[torch.Tensor], start: int = 0) -> Optional[torch.Tensor]:
        """`attn_mask` plus log(size) on every key from token `start` on (B, 1, 1, N - start), where proportional
        attention or padding asks."""
        if self.size is None or not (self.prop_attn or self.padded):
            return attn_mask
        bias = self.size[:, start:].log()[:, None, None, :, 0]      # log(0) = -inf masks padding rows (ATS)
        return bias if attn_mask is None else attn_mask + bias


# ----------------------------------------------------------------------------------------------- attention

# token reduction's attention classes are the attention seam's (vitlab.attention): patch_model sets the seam's bias
# hook (the size bias) and observation hook (what the block's reduction needs), so a later quantization adds its
# sites to the same forward
REDUCING_ATTENTION = SEAM_CLASSES
ReducingAttention = SeamAttention


@dataclass
class ReductionObserver:
    """The seam's observation hook for one block: hands q, k, v (B, H, N, d) and the biased mask to the block's
    reduction while it is active and reduces after attention (ToMe, EViT, ATS; MCTF reads its own map)."""

    reduction: Any
    state: TokenState

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                 attn_mask: Optional[torch.Tensor]) -> None:
        if self.reduction.active and not self.reduction.before_attention:
            self.reduction.observe(q, k, v, scale, attn_mask, self.state)


# ----------------------------------------------------------------------------------------------- blocks

class ReducingBlockMixin:
    """A pre-norm block that reduces tokens after the attention residual, before the MLP (where ToMe and EViT do),
    or, for MCTF, fuses the block's input before attending. Subclasses pass their own residual branches."""

    reduction: Optional[Any] = None

    def run(self, x: torch.Tensor, attend: Callable, attn_residual: Callable, mlp_residual: Callable):
        reduction, state = self.reduction, self.attn.token_state
        if reduction is not None and reduction.active and reduction.before_attention:
            # MCTF: merge the block's input, then attend with the merged attention map (one-step-ahead)
            x, attn_out = reduction.merge_and_attend(self, x, state)
        else:
            attn_out = attend(self.norm1(x))
        x = x + attn_residual(attn_out)
        if reduction is not None and reduction.active and not reduction.before_attention:
            x = reduction.reduce(x, state)
        x = x + mlp_residual(x)
        if state is not None:
            state.counts.append(x.shape[1])
        return x


class ReducingBlock(ReducingBlockMixin, Block):
    """timm Block (LayerScale and drop path kept)."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        return self.run(x, lambda h: self.attn(h, attn_mask=attn_mask, is_causal=is_causal),
                        lambda a: self.drop_path1(self.ls1(a)),
                        lambda x: self.drop_path2(self.ls2(self.mlp(self.norm2(x)))))


class ReducingConViTBlock(ReducingBlockMixin, ConViTBlock):
    """ConViT Block with MHSA (the GPSA blocks before it need the grid and are never swapped)."""

    def forward(self, x: torch.Tensor):
        return self.run(x, self.attn, self.drop_path, lambda x: self.drop_path(self.mlp(self.norm2(x))))


class ReducingPvtBlock(ReducingBlockMixin, PvtBlock):
    """vitlab PVT v1 Block at sr_ratio 1 (the grid size `hw` goes unused)."""

    def forward(self, x: torch.Tensor, hw: tuple[int, int]):
        return self.run(x, lambda h: self.attn(h, hw), self.drop_path1,
                        lambda x: self.drop_path2(self._mlp(self.norm2(x))))


class ReducingVOLOBlock(ReducingBlockMixin, volo.Transformer):
    """VOLO's Transformer block (no LayerScale). It takes VOLO's (B, H, W, C) map, or the (B, 1, N, C) map an
    earlier reducing block returned, runs on the flattened tokens (neither its attention nor its MLP uses the grid)
    and returns the input's shape while the token count is unchanged, else a (B, 1, N', C) map: VOLO reshapes the
    network's output to (B, -1, C), so the post network reads the reduced tokens."""

    def forward(self, x: torch.Tensor):
        shape = x.shape
        x = self.run(x.reshape(shape[0], -1, shape[-1]), self.attn, self.drop_path1,
                     lambda x: self.drop_path2(self.mlp(self.norm2(x))))
        return x.reshape(shape) if x.shape[1] == math.prod(shape[1:-1]) else x[:, None]


# original class -> its reducing class (matched exactly: a subclass may have its own forward)
REDUCING_BLOCKS: dict[type, type] = {Block: ReducingBlock, ConViTBlock: ReducingConViTBlock, PvtBlock: ReducingPvtBlock,
                                     volo.Transformer: ReducingVOLOBlock}


class SizedCrossAttention(CrossAttention):
    """CrossViT's fusion attention (class-token query; keys: its own class token, then the other branch's tokens)
    with the other branch's size bias on the keys: log(size), -inf for ATS padding."""

    token_state: Optional[TokenState] = None

    def forward(self, x):
        B, N, C = x.shape
        H = self.num_heads
        q = self.wq(x[:, 0:1]).reshape(B, 1, H, C // H).permute(0, 2, 1, 3)      # (B, H, 1, d)
        k = self.wk(x).reshape(B, N, H, C // H).permute(0, 2, 1, 3)             # (B, H, N, d)
        v = self.wv(x).reshape(B, N, H, C // H).permute(0, 2, 1, 3)
        attn = (q @ k.transpose(-2, -1)) * self.scale                            # (B, H, 1, N)
        state = self.token_state
        if state is not None and state.size is not None and state.size.shape[1] == N:
            attn = state.key_bias(attn)
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(B, 1, C)
        return self.proj_drop(self.proj(x))


class SizedClassAttention(volo.ClassAttention):
    """VOLO's class attention (post network: the class token queries; keys are the class token, then the reduced
    tokens) with the tokens' size bias on the keys: log(size), -inf for ATS padding; the class token has size 1."""

    token_state: Optional[TokenState] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        kv = self.kv(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        q = self.q(x[:, :1, :]).reshape(B, self.num_heads, 1, self.head_dim) * self.scale
        attn = q @ k.transpose(-2, -1)                                           # (B, H, 1, N)
        state = self.token_state
        if state is not None and state.size is not None and state.size.shape[1] == N - 1:
            bias = state.key_bias(None)                                          # (B, 1, 1, N - 1) or None
            if bias is not None:
                attn = attn + F.pad(bias, (1, 0))                                # log 1 = 0 for the class token
        attn = self.attn_drop(attn.softmax(dim=-1))
        cls_embed = (attn @ v).transpose(1, 2).reshape(B, 1, self.head_dim * self.num_heads)
        return self.proj_drop(self.proj(cls_embed))


# modules outside the reducible blocks that read a sequence's tokens -> the class that weights them by size
READERS: dict[type, type] = {CrossAttention: SizedCrossAttention, volo.ClassAttention: SizedClassAttention}


# ----------------------------------------------------------------------------------------------- models

def size_weighted(x: torch.Tensor, state: TokenState) -> torch.Tensor:
    """x (B, N, C) with its non-prefix tokens scaled by size x n / total size: their plain mean is then the mean
    over the patches they stand for, so a head that averages tokens (`x[:, prefix:].mean(1)`) stays exact."""
    if state.size is None:
        return x
    p = state.num_prefix
    size = state.size[:, p:]                                     # (B, n, 1); 0 for padding (ATS)
    rest = x[:, p:] * (size * (size.shape[1] / size.sum(dim=1, keepdim=True)))
    return torch.cat([x[:, :p], rest], dim=1)


class TokenReducingModel:
    """Mixin over the model's own class: the forward resets the token states, and average pooling ("avg") weights
    each token by the patches it stands for. A head fed a list of sequences (CrossViT) gets each weighted by its
    own state; a head fed one tensor reads the last sequence."""

    token_state: TokenState
    token_states: tuple[TokenState, ...]

    def forward_features(self, x: torch.Tensor, *args, **kwargs):
        for state in self.token_states:
            state.reset()
        return super().forward_features(x, *args, **kwargs)

    def forward_head(self, x, *args, **kwargs):
        if getattr(self, "global_pool", None) == "avg":
            if isinstance(x, (list, tuple)):
                x = [size_weighted(t, s) for t, s in zip(x, self.token_states)]
            else:
                x = size_weighted(x, self.token_states[-1])
        return super().forward_head(x, *args, **kwargs)


class TokenReducingViT(TokenReducingModel, VisionTransformer):
    """timm VisionTransformer (and subclasses: distilled DeiT, T2T-ViT): average pooling weights each token by size
    before `fc_norm`, as the official ToMe does; attention pooling adds the size bias to its keys."""

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        size = self.token_state.size
        if self.attn_pool is not None and size is not None:
            # attention pooling ("map"): its keys get the size bias and padding mask the blocks' attention gets
            p = 0 if getattr(self, "pool_include_prefix", False) else self.num_prefix_tokens
            x = self.attn_pool(x[:, p:], attn_mask=self.token_state.key_bias(None, start=p))
            x = self.head_drop(self.fc_norm(x))
            return x if pre_logits else self.head(x)
        if self.global_pool == "avg" and size is not None:
            # each merged token stands for `size` patches: weight the average so it equals the mean over patches
            patch_size = size[:, self.num_prefix_tokens:]
            x = (x[:, self.num_prefix_tokens:] * patch_size).sum(1) / patch_size.sum(1)
            x = self.fc_norm(x)
            x = self.head_drop(x)
            return x if pre_logits else self.head(x)
        return super().forward_head(x, pre_logits=pre_logits)


class TokenReducingVOLO(TokenReducingModel, volo.VOLO):
    """timm VOLO: the head reads the class token (or the mean of all tokens, "avg") plus, with `aux_head`, half the
    max over tokens of the aux classifier. With sizes (ToMe, MCTF, ATS) the mean weights each token by the patches
    it stands for (the class token by 1) and the max skips ATS padding (size 0); a merged token enters the max as
    the one token it is."""

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        size = self.token_states[-1].size
        if size is None or not self.global_pool or not 0 <= x.shape[1] - size.shape[1] <= 1:
            return volo.VOLO.forward_head(self, x, pre_logits=pre_logits)
        B, p = x.shape[0], x.shape[1] - size.shape[1]          # p = 1: the post network's class token
        weight = torch.cat([size.new_ones(B, p, 1), size], dim=1)   # (B, N, 1)
        out = (x * weight).sum(1) / weight.sum(1) if self.global_pool == "avg" else x[:, 0]
        out = self.head_drop(out)
        if pre_logits:
            return out
        out = self.head(out)
        if self.aux_head is not None:
            aux = self.aux_head(self.head_drop(x)[:, 1:])       # VOLO's aux head skips the first token
            aux = aux.masked_fill(weight[:, 1:] == 0, float("-inf"))
            out = out + 0.5 * aux.max(1)[0]
        return out

    def forward_train(self, x: torch.Tensor):
        if self.training:
            raise TechniqueError("VOLO's forward_train (token labeling, mix token) needs one output per patch; with "
                                 "token reduction applied, train through forward (class-token logits)")
        return self.forward(x)


def init_state(x: torch.Tensor, state: TokenState, with_size: bool = True) -> None:
    """Sizes of one and identity sources for a fresh token sequence x (B, N, C)."""
    B, N, _ = x.shape
    if with_size and state.size is None:
        state.size = torch.ones(B, N, 1, dtype=x.dtype, device=x.device)
    if state.trace_source and state.source is None:
        state.source = torch.eye(N, dtype=x.dtype, device=x.device).expand(B, N, N)


_CLASSES: dict[type, type] = {}


def _reducing_class(cls: type) -> type:
    """The token-reducing mixin over `cls`, so subclasses (e.g. timm's distilled DeiT) keep their own methods."""
    if issubclass(cls, TokenReducingModel):
        return cls
    if cls not in _CLASSES:
        mixin = (TokenReducingViT if issubclass(cls, VisionTransformer) else
                 TokenReducingVOLO if issubclass(cls, volo.VOLO) else TokenReducingModel)
        _CLASSES[cls] = type(f"TokenReducing{cls.__name__}", (mixin, cls), {"__module__": __name__})
    return _CLASSES[cls]


def patch_model(model, sequences: list, reductions: list, *, trace_source: bool, prop_attn: bool):
    """Swap classes in place; `sequences` are `vitlab.tokens.families.TokenSequence`s, `reductions` one list per
    sequence with one reduction object per block of it (None: that block keeps every token)."""
    states = tuple(TokenState(num_prefix=seq.num_prefix, trace_source=trace_source, prop_attn=prop_attn)
                   for seq in sequences)
    model.__class__ = _reducing_class(type(model))
    model.token_states, model.token_state = states, states[0]
    for seq, state, per_block in zip(sequences, states, reductions):
        for spec, reduction in zip(seq.blocks, per_block):
            blk = spec.module
            blk.__class__ = REDUCING_BLOCKS[type(blk)]
            attn = to_seam_(blk.attn)
            blk.reduction = reduction
            attn.token_state = state
            attn.bias_hook = state.key_bias
            attn.observe_hook = None if reduction is None else ReductionObserver(reduction, state)
        for reader in seq.readers:
            reader.__class__ = READERS[type(reader)]
            reader.token_state = state
    return model


def class_attention(q: torch.Tensor, k: torch.Tensor, scale: float, attn_mask: Optional[torch.Tensor],
                    num_prefix: int, queries: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, H, N): the class token's attention row, or, without a class token, the mean attention each token receives.

    With a class token this costs one extra (1 x N) query against the keys, not the full attention map. `queries`
    (B, N) weights the mean over queries (0 for padding rows, ATS).
    """
    if num_prefix > 0:
        logits = (q[:, :, :1] * scale) @ k.transpose(-2, -1)     # (B, H, 1, N): the class token's row only
        if attn_mask is not None:
            logits = logits + attn_mask[..., :1, :]              # a (.., 1, N) bias slices to itself
        return logits.softmax(dim=-1)[:, :, 0]
    logits = (q * scale) @ k.transpose(-2, -1)                   # no class token: the full map is needed
    if attn_mask is not None:
        logits = logits + attn_mask
    if queries is None:
        return logits.softmax(dim=-1).mean(dim=2)
    w = (queries / queries.sum(dim=1, keepdim=True))[:, None, :, None]
    return (logits.softmax(dim=-1) * w).sum(dim=2)


class ToMeReduction:
    """Merge `r` tokens in one block by bipartite soft matching on the mean attention keys."""

    before_attention = False

    def __init__(self, r: int):
        self.r, self.metric = r, None
        self.active = r > 0

    def observe(self, q, k, v, scale, attn_mask, state) -> None:
        self.metric = k.mean(1)                                 # (B, N, d): keys averaged over heads

    def reduce(self, x: torch.Tensor, state: TokenState) -> torch.Tensor:
        init_state(x, state)
        n_rest = x.shape[1] - state.num_prefix
        r = min(self.r, n_rest // 2)  # schedule checked at apply time; inputs larger than planned may merge less
        merge = bipartite_soft_matching(self.metric, r, state.num_prefix)
        self.metric = None
        if state.trace_source:
            state.source = merge_source(merge, state.source)
        x, state.size = merge_wavg(merge, x, state.size)
        return x


class EViTReduction:
    """Keep the tokens the class token attends to most (EViT); fuse the rest into one token if `fuse`."""

    before_attention = False

    def __init__(self, keep_rate: float, fuse: bool):
        self.keep_rate, self.fuse, self.cls_attn = keep_rate, fuse, None
        self.active = keep_rate < 1.0

    def observe(self, q, k, v, scale, attn_mask, state) -> None:
        attn = class_attention(q, k, scale, attn_mask, state.num_prefix)
        self.cls_attn = attn.mean(dim=1)[:, state.num_prefix:]       # (B, N - prefix), mean over heads

    def reduce(self, x: torch.Tensor, state: TokenState) -> torch.Tensor:
        init_state(x, state, with_size=False)
        p = state.num_prefix
        keep = num_kept(x.shape[1] - p, self.keep_rate)
        x_new, kept_idx, dropped_idx = evit_select(x, self.cls_attn, keep, p, self.fuse)
        self.cls_attn = None
        # sizes and sources follow the tokens: kept tokens keep theirs, the fused token sums the dropped ones
        for name in ("size", "source"):
            value = getattr(state, name)
            if value is None:
                continue
            rest = value[:, p:]
            parts = [value[:, :p], rest.gather(1, kept_idx[..., None].expand(-1, -1, value.shape[-1]))]
            if self.fuse and dropped_idx.shape[1] > 0:
                dropped = rest.gather(1, dropped_idx[..., None].expand(-1, -1, value.shape[-1]))
                parts.append(dropped.sum(1, keepdim=True) if name == "size" else dropped.amax(1, keepdim=True))
            setattr(state, name, torch.cat(parts, dim=1))
        return x_new
