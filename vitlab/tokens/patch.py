"""Thin adapters that fit token reduction into timm's `VisionTransformer`, keeping fused attention.

The model's class is swapped for a subclass (weights untouched) whose `forward_features` resets a small per-forward
state; each block's class is swapped for a subclass that calls timm's own sublayers (`norm1`, `attn`, `ls1`,
`drop_path1`, `norm2`, `mlp`, `ls2`, `drop_path2`) and reduces tokens between attention and MLP; each attention's
class is swapped for one that adds ToMe's proportional-attention bias (log token size) to SDPA's `attn_mask` and
records what the reduction needs (the mean key per token for ToMe; the class token's attention row for EViT, which
costs one extra (1 x N) query against the keys, not the full attention map).

Token sources: `model.token_state.source` (B, N, N0) when tracing is on; row i marks the input tokens (prefix tokens
first, then patches in raster order) that the surviving token i stands for. `model.token_state.size` (B, N, 1)
counts them (ToMe), and `model.token_state.counts` lists the token count after each block.
"""
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from .merge import bipartite_soft_matching, merge_source, merge_wavg
from .select import evit_select, num_kept

__all__ = ["TokenState", "TokenReducingViT", "ReducingBlock", "ReducingAttention", "patch_vit", "check_supported"]


@dataclass
class TokenState:
    """Per-forward state of a token-reduced model (reset at the start of every forward)."""

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


def check_supported(model: Any, technique: str = "token reduction") -> None:
    """Token reduction works on timm VisionTransformer models whose blocks are timm Blocks with timm Attention;
    anything else raises `TechniqueNotApplicable` naming `technique`, the model class and why."""
    from ..techniques import TechniqueNotApplicable

    supported = ("it supports timm VisionTransformer models whose blocks are timm Block + Attention (ViT, DeiT, "
                 "DeiT III, register tokens, vl_vit_fmnist, vl_test_vit, ...)")
    if not isinstance(model, VisionTransformer):
        raise TechniqueNotApplicable(technique, model, f"not a plain ViT; {supported}")
    for i, blk in enumerate(model.blocks):
        if type(blk) not in (Block, ReducingBlock) or type(blk.attn) not in (Attention, ReducingAttention):
            raise TechniqueNotApplicable(technique, model, f"block {i} is {type(blk).__name__} with "
                                         f"{type(blk.attn).__name__}; {supported}")


class ReducingAttention(Attention):
    """timm Attention plus a size bias on the keys and the statistics token reduction needs."""

    reduction: Optional[Any] = None   # the block's reduction (set by patch_vit)
    token_state: Optional[TokenState] = None
    # On CPU, SDPA with a float mask (the size bias) may be slower than matmul + softmax at short sequences: at or
    # below this many tokens a masked attention takes the plain path. 0 (default) keeps SDPA everywhere; an
    # experiment knob timed by benchmarks/tokens_speed.py (per instance: `attn.math_max_tokens = 96`).
    math_max_tokens: int = 0

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        state, reduction = self.token_state, self.reduction
        B, N, C = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                  # each (B, H, N, d)
        q, k = self.q_norm(q), self.k_norm(k)
        if state is not None and state.size is not None and (state.prop_attn or state.padded):
            # (B, 1, 1, N): log(size) added to every key; log(0) = -inf masks padding rows (ATS)
            bias = state.size.log()[:, None, None, :, 0]
            attn_mask = bias if attn_mask is None else attn_mask + bias
        if self.fused_attn and not (attn_mask is not None and N <= self.math_max_tokens and x.device.type == "cpu"):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                                 dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if attn_mask is not None:
                attn = attn + attn_mask
            attn = self.attn_drop(attn.softmax(dim=-1))
            out = attn @ v
        if reduction is not None and reduction.active and not reduction.before_attention:
            reduction.observe(q, k, v, self.scale, attn_mask, state)
        out = out.transpose(1, 2).reshape(B, N, self.attn_dim)
        out = self.norm(out)
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))


class ReducingBlock(Block):
    """timm Block that reduces tokens after the attention residual, before the MLP (where ToMe and EViT do)."""

    reduction: Optional[Any] = None

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        reduction = self.reduction
        if reduction is not None and reduction.active and reduction.before_attention:
            # MCTF: merge the block's input, then attend with the merged attention map (one-step-ahead)
            x, attn_out = reduction.merge_and_attend(self, x, self.attn.token_state)
            x = x + self.drop_path1(self.ls1(attn_out))
        else:
            x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        if reduction is not None and reduction.active and not reduction.before_attention:
            x = reduction.reduce(x, self.attn.token_state)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        state = self.attn.token_state
        if state is not None:
            state.counts.append(x.shape[1])
        return x


class TokenReducingViT(VisionTransformer):
    """Mixin over the model's own class (VisionTransformer, VisionTransformerDistilled, ...): the forward resets the
    token state, and average pooling weights each token by the patches it stands for."""

    token_state: TokenState

    def forward_features(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        self.token_state.reset()
        return super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        size = self.token_state.size
        if self.global_pool == "avg" and size is not None:
            # each merged token stands for `size` patches: weight the average so it equals the mean over patches
            patch_size = size[:, self.num_prefix_tokens:]
            x = (x[:, self.num_prefix_tokens:] * patch_size).sum(1) / patch_size.sum(1)
            x = self.fc_norm(x)
            x = self.head_drop(x)
            return x if pre_logits else self.head(x)
        return super().forward_head(x, pre_logits=pre_logits)


def init_state(x: torch.Tensor, state: TokenState, with_size: bool = True) -> None:
    """Sizes of one and identity sources for a fresh token sequence x (B, N, C)."""
    B, N, _ = x.shape
    if with_size and state.size is None:
        state.size = torch.ones(B, N, 1, dtype=x.dtype, device=x.device)
    if state.trace_source and state.source is None:
        state.source = torch.eye(N, dtype=x.dtype, device=x.device).expand(B, N, N)


_CLASSES: dict[type, type] = {}


def _reducing_class(cls: type) -> type:
    """TokenReducingViT mixed over `cls`, so subclasses (e.g. timm's distilled DeiT) keep their own methods."""
    if issubclass(cls, TokenReducingViT):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"TokenReducing{cls.__name__}", (TokenReducingViT, cls), {"__module__": __name__})
    return _CLASSES[cls]


def patch_vit(model: VisionTransformer, reductions: list, *, trace_source: bool, prop_attn: bool) -> VisionTransformer:
    """Swap classes in place and attach one reduction object per block (None: that block keeps every token)."""
    check_supported(model)
    state = TokenState(num_prefix=model.num_prefix_tokens, trace_source=trace_source, prop_attn=prop_attn)
    model.__class__ = _reducing_class(type(model))
    model.token_state = state
    for blk, reduction in zip(model.blocks, reductions):
        blk.__class__ = ReducingBlock
        blk.attn.__class__ = ReducingAttention
        blk.reduction = reduction
        blk.attn.reduction = reduction
        blk.attn.token_state = state
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
