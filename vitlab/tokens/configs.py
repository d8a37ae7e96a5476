"""The token-reduction configs: ToMe and MCTF (merging), EViT and ATS (selection), Slim, IA-RED², Sparsifiner and
LookupViT, registered techniques behind `vitlab.apply_`, on ViTs and every model with token-reducible blocks.

    model = timm.create_model("deit_small_patch16_224")
    vitlab.apply_(model, ToMe(r=13))           # or: --apply tome:r=13
    vitlab.apply_(model, EViT(keep_rate=0.7))  # or: --apply evit:keep_rate=0.7
    vitlab.apply_(model, ATS(keep_rate=0.5))   # or: --apply ats:keep_rate=0.5   (per-image token counts, padded)
    vitlab.apply_(model, MCTF(r=16))           # or: --apply mctf:r=16           (needs the full attention map)
    vitlab.apply_(model, Sparsifiner())        # or: --apply sparsifiner         (top-k sparse attention)
    vitlab.apply_(model, LookupViT(tokens=49)) # or: --apply lookupvit:tokens=49 (compressed tokens; ViTs only)

Supported: every model whose blocks `vitlab.contract.describe` calls token-reducible (a token sequence, attention
over all of it, no use of the grid) in a family `vitlab.tokens.families` has checked: timm `VisionTransformer`
(ViT, DeiT, DeiT III with LayerScale, distilled models, register tokens, ViTamin, class-token, average- and
attention-pool heads), vitlab's T2T-ViT, ConViT's MHSA blocks, CrossViT's branches, PVT v1's last stage and
SpectFormer's attention blocks; other models are refused by name (`TechniqueNotApplicable`, saying why). The
schedule (which blocks, r per block) runs over the model's reducible blocks in execution order as if they were its
depth: `ToMe(r=(a, b))` is the first two reducible blocks, EViT's `locations`, ATS's and MCTF's `start` are
fractions of the reducible blocks (MCTF never fuses in the model's very first block). Prefix tokens (class,
distillation, registers) are never merged or dropped. EViT and ATS rank tokens by the class token's
attention; a model without a class token uses the mean attention each token receives (this needs the full
attention map, computed beside the fused attention). Fused attention (SDPA) is kept: ToMe's proportional attention
is an additive bias (log token size) passed as SDPA's `attn_mask`, and so is ATS's padding mask (log 0 = -inf).
MCTF computes the full attention map in its active blocks (its one-step-ahead attention fuses the map itself).

Fine-tuning with a method applied: `vitlab train --init CKPT --apply evit:keep_rate=0.5 ...`; MCTF's
token-reduction consistency loss (student at r, a weaker-r teacher, feature consistency) with
`--apply mctf:r=16 --token-consistency 3` (vitlab.tokens.consistency).

Checked against the official code on the same weights and inputs (tests/fixtures/tokens/): ToMe, EViT and MCTF
outputs within 1e-5; ATS's sampler against a transcription of the official functions and hand-made scores.
"""
from dataclasses import dataclass
from typing import ClassVar

from ..techniques import Kind, TechniqueError, format_technique, register_technique

__all__ = ["ToMe", "EViT", "ATS", "MCTF", "Slim", "IARED", "Sparsifiner", "LookupViT"]


@register_technique("tome", Kind.TOKENS)
@dataclass(frozen=True)
class ToMe:
    """Token Merging (Bolya et al., ICLR 2023): merge `r` tokens in every block by bipartite soft matching.

    `r` takes the official code's forms: one count for every block (`r=13`), one count per block (`r=80/50/30/18`;
    a shorter list leaves the last blocks unmerged), or with `inflect` in [-1, 1] a linear trend over depth from
    r * (1 - inflect) in the first block to r * (1 + inflect) in the last (`r=16,inflect=-0.5`; -1 is the paper's
    "decreasing schedule"), rounded as the official `parse_r` rounds. See `ToMe.per_block`.

    On a class-token model, merging in the last block does not change the logits (the head reads the class token,
    which has attended to every token before the merge): it only saves the last MLP's work on the merged tokens.
    """

    r: int | tuple[int, ...] = 8
    prop_attn: bool = True       # proportional attention: bias each key by log(number of patches it stands for)
    trace_source: bool = False   # keep model.token_state.source (which input patches each token stands for)
    inflect: float = 0.0

    def __post_init__(self):
        values = self.r if isinstance(self.r, tuple) else (self.r,)
        if not values or any(v < 0 for v in values):
            raise ValueError(f"r must be >= 0 tokens merged per block (one count, or one per block), got {self.r}")
        if not -1 <= self.inflect <= 1:
            raise ValueError(f"inflect must be in [-1, 1] (-1: merge most in the first blocks), got {self.inflect}")
        if self.inflect and isinstance(self.r, tuple):
            raise ValueError(f"inflect spreads one r over the depth; with a per-block r={self.r} leave inflect at 0")

    def per_block(self, depth: int) -> list[int]:
        """Tokens merged in each of `depth` blocks (the official `parse_r`)."""
        if isinstance(self.r, tuple):
            if len(self.r) > depth:
                raise TechniqueError(f"{format_technique(self)} lists {len(self.r)} blocks but the model has "
                                     f"{depth}; give at most {depth} counts")
            return [*self.r, *[0] * (depth - len(self.r))]
        low = int(self.r * (1.0 - self.inflect))
        step = (2 * self.r - 2 * low) / max(1, depth - 1)
        return [int(low + step * i) for i in range(depth)]


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


@register_technique("ats", Kind.TOKENS)
@dataclass(frozen=True)
class ATS:
    """Adaptive Token Sampling (Fayyaz et al., ECCV 2022): per image, keep the tokens that inverse-transform sampling
    of (class attention x value norm) hits; every block from `start` (a fraction of depth) on samples.

    `keep_rate` sets the number of samples K = ceil(keep_rate x current tokens); duplicates collapse, so each image
    keeps <= K (the paper's default K is every token: keep_rate=1.0, blocks 3..11 of 12). Counts differ per image:
    the batch is padded to its largest count (padding is masked in attention and executed; see vitlab.tokens.ats).
    ATS has no strength that keeps every token; `start=1.0` (no ATS block) is its no-op setting.
    """

    keep_rate: float = 1.0
    start: float = 0.25          # first ATS block, as a fraction of depth (block 3 of 12)
    trace_source: bool = False

    def __post_init__(self):
        if not 0 < self.keep_rate <= 1:
            raise ValueError(f"keep_rate must be in (0, 1] (samples per current token), got {self.keep_rate}")
        if not 0 <= self.start <= 1:
            raise ValueError(f"start is a fraction of the depth in [0, 1] (1 = no ATS block), got {self.start}")


@register_technique("mctf", Kind.TOKENS)
@dataclass(frozen=True)
class MCTF:
    """Multi-Criteria Token Fusion (Lee et al., CVPR 2024): fuse `r` tokens before attention in every block but the
    first, by similarity x informativeness x size, bidirectionally, with one-step-ahead attention (the official
    evaluation setting `--mctf_type [16,0,0,1,1,1,20,40,1,1,0]`). Needs the full attention map in those blocks."""

    r: int = 16
    tau_sim: float = 1.0
    tau_info: float = 20.0
    tau_size: float = 40.0
    bidirection: bool = True
    prop_attn: bool = True
    start: float = 1 / 12        # first active block, as a fraction of depth (block 1 of 12); at least block 1
    trace_source: bool = False

    def __post_init__(self):
        if self.r < 0:
            raise ValueError(f"r must be >= 0 (tokens fused per block), got {self.r}")
        if not 0 <= self.start <= 1:
            raise ValueError(f"start is a fraction of the depth in [0, 1], got {self.start}")


@register_technique("slim", Kind.TOKENS)
@dataclass(frozen=True)
class Slim:
    """Self-slimmed ViT (Zong et al., ECCV 2022): learned Token Slimming Modules softly aggregate the patch tokens
    into int(N0 * keep_rate ** s) tokens at stage boundary s (the class token kept); train with `--recipe frd`.
    `locations` are fractions of the reducible blocks (default: SiT-S's stages [9, 3, 2, 2] of 16 blocks); see
    vitlab.tokens.slim. keep_rate=1 inserts nothing."""

    keep_rate: float = 0.5
    locations: tuple[float, ...] = (9 / 16, 12 / 16, 14 / 16)
    hidden_ratio: float = 0.5    # TSM MLP width / embedding width (official 0.5)
    trace_source: bool = False
    adds_parameters: ClassVar[bool] = True   # its modules are in the checkpoint: applied before weights load

    def __post_init__(self):
        if not 0 < self.keep_rate <= 1:
            raise ValueError(f"keep_rate must be in (0, 1], got {self.keep_rate}")
        if not self.locations or any(not 0 <= f < 1 for f in self.locations):
            raise ValueError(f"locations are fractions of the depth in [0, 1), got {self.locations}")
        if self.hidden_ratio <= 0:
            raise ValueError(f"hidden_ratio must be > 0, got {self.hidden_ratio}")


@register_technique("iared", Kind.TOKENS)
@dataclass(frozen=True)
class IARED:
    """IA-RED² (Pan et al., NeurIPS 2021): a multi-head interpreter before each group of blocks drops the patch tokens
    it scores below `threshold` (hierarchically); train it with `--recipe iared` (REINFORCE), see it with
    `vitlab explain --method iared`. `locations`: group starts as fractions of the reducible blocks (default: DeiT's
    12 blocks in 4 groups of 3); see vitlab.tokens.iared."""

    locations: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75)
    threshold: float = 0.5
    head_dim: int = 0            # interpreter width per head; 0: the attention's
    trace_source: bool = False
    adds_parameters: ClassVar[bool] = True   # its modules are in the checkpoint: applied before weights load

    def __post_init__(self):
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold is a keep probability in (0, 1), got {self.threshold}")
        if not self.locations or any(not 0 <= f < 1 for f in self.locations):
            raise ValueError(f"locations are fractions of the depth in [0, 1), got {self.locations}")
        if self.head_dim < 0:
            raise ValueError(f"head_dim must be >= 0 (0: the attention's), got {self.head_dim}")


@register_technique("sparsifiner", Kind.TOKENS)
@dataclass(frozen=True)
class Sparsifiner:
    """Sparsifiner (Wei et al., CVPR 2023): a low-rank connectivity predictor per attention keeps each query's top
    ceil(keep_rate x N) keys (instance-dependent sparse attention, class-token row dense), in every token-reducible
    block; train its predictor with `--recipe sparsifiner`. Defaults: the official default config (25 % of the
    connections, REDUCE_N_FACTOR 6, REDUCE_C_FACTOR 2). keep_rate=1 is dense attention. See
    vitlab.tokens.sparsifiner."""

    keep_rate: float = 0.25
    reduce_n: int = 6            # the predictor compresses the N keys to N // reduce_n basis tokens
    reduce_c: int = 2            # ... and the head width to head_dim // reduce_c
    adds_parameters: ClassVar[bool] = True   # its predictors are in the checkpoint: applied before weights load

    def __post_init__(self):
        if not 0 < self.keep_rate <= 1:
            raise ValueError(f"keep_rate must be in (0, 1] (kept connections per query / tokens), got {self.keep_rate}")
        if self.reduce_n < 1 or self.reduce_c < 1:
            raise ValueError(f"reduce_n and reduce_c must be >= 1, got {self.reduce_n} and {self.reduce_c}")


@register_technique("lookupvit", Kind.TOKENS)
@dataclass(frozen=True)
class LookupViT:
    """LookupViT (Koner et al., ECCV 2024) on a trained ViT: `tokens` compressed tokens (the patch grid average-pooled
    to h x w) get each block's full MHSA + MLP; the full-resolution tokens get bidirectional cross-attention and an MLP
    `lookup_mlp_ratio` as wide as the block's. New modules start from the block's weights; see
    vitlab.tokens.lookupvit."""

    tokens: int = 49
    lookup_mlp_ratio: float = 0.25
    adds_parameters: ClassVar[bool] = True   # its cross-attentions and MLPs are in the checkpoint

    def __post_init__(self):
        if self.tokens < 1:
            raise ValueError(f"tokens must be >= 1 compressed tokens, got {self.tokens}")
        if not 0 < self.lookup_mlp_ratio <= 1:
            raise ValueError(f"lookup_mlp_ratio must be in (0, 1] (of the block MLP's width), "
                             f"got {self.lookup_mlp_ratio}")
