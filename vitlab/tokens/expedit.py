"""Expedit (Liang et al., NeurIPS 2022): hourglass token clustering and reconstruction, applied without fine-tuning.

Before block `alpha` a token clustering layer replaces the tokens of each window by an h x w grid of cluster
centres: soft k-means whose centres start as the window's adaptive average pool; each token may join only the
clusters within `neighborhood // 2` cells of its initial one; `iters` rounds of centres = the softmax(-temperature x
squared distance) weighted mean of the tokens. The next blocks run on the small grid. Before block `beta` a token
reconstruction layer maps it back: each original token becomes the L2-normalised exp(-recon_temperature x squared
distance) mix of its `k` nearest centres (distances between the tokens and centres saved at clustering time, the
mix applied to the centres' new values). The math is `token_clustering` / `token_reconstruction` (checked against
the official layers within 1e-5, tests/fixtures/expedit/); the rest fits it into models.

    model = timm.create_model("swin_tiny_patch4_window7_224")
    vitlab.apply_(model, Expedit(alpha=4, size=(4,)))   # or: --apply expedit:alpha=4,size=4

Where it sits, with the official Swin code (Expedit-Mask2Former `hourglass_swin.py`) as guide:

- Swin / Swin V2 (timm): `alpha` counts blocks over the whole network, as the official `clustering_location`; the
  stage holding it clusters within each attention window (the grid zero-padded to whole windows, as there): a
  ws x ws window becomes an h x w cluster grid, the stage grid (ceil(H/ws)·h, ceil(W/ws)·w), and the clustered
  blocks get an h x w window (shift h//2 where they shifted), their attention mask recomputed for the new grid.
  Swin's relative-position bias table keeps its trained shape (state dicts are unchanged) and is resized bilinearly
  to the new window at run time, as the official `resize_rpb_table`; Swin V2's continuous position bias is evaluated
  on the new window. Reconstruction comes at the end of that stage (the official place), before patch merging, so
  later stages see their full grid. One deliberate difference: the official clustered blocks compute the shifted-
  window mask with the old shift (ws//2) while rolling by h//2; here the mask follows the roll.
- Every other described family clusters the whole stage grid, as the official ViT code clusters the whole image;
  class tokens stay aside, unclustered. The blocks learn the smaller grid from their input (NHWC / NCHW maps:
  ConvNeXt, MetaFormer, TinyViT, EfficientFormer's 4-D blocks, Next-ViT, EfficientViT-M, VOLO, DiNAT, HorNet,
  CrossFormer, UniFormer, RMT), as an argument (CvT, PVT v2) or, in a plain ViT, from its fixed patch grid. RMT's
  stage-level decay masks and rotary angles are recomputed for the clustered grid. Sequence blocks that are not told
  their grid (T2T, TNT, SReT, ConViT, ...) and spectral blocks whose learned filters are sized to the stage grid
  (SpectFormer, SVT's scattering stage) refuse by name. Blocks whose windows are fixed in size
  (TinyViT, EfficientViT-M) pad the smaller grid to their window, as they do for any small input.
- `beta` may end the clustered run earlier than its stage's end, never later (downsampling needs the full grid);
  the run also ends where the blocks change layout (EfficientFormer's last stage flattens its map to a sequence).
- Clustering costs MACs (iters x tokens x clusters x channels): in narrow, shallow runs it can cost more than the
  blocks it spares; it pays on real widths and runs of several blocks.

Stages, blocks, their layouts and prefix tokens come from the model contract (`vitlab.contract.describe`); the
blocks of the clustered run get their class swapped for a subclass (`ExpeditBlockMixin`) that clusters / rebuilds
around the model's own forward, so weights and state-dict keys stay as they are.

No-op settings (equal to the untouched model): a cluster grid equal to the window (`ratio=1`), or `alpha` past the
last block. Clustering and reconstruction run in float32, as the official code does under autocast.
"""
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import to_2tuple
from timm.models import pvt_v2
from timm.models.swin_transformer import WindowAttention, get_relative_position_index, window_partition, \
    window_reverse

from ..contract import NoAdapter, describe
from ..models import cvt, favit, soft, svt
from ..techniques import Kind, TechniqueError, TechniqueNotApplicable, format_technique, register_handler, \
    register_technique

__all__ = ["Expedit", "token_clustering", "token_reconstruction", "cluster_windows", "reconstruct_windows"]

_SUPPORTS = ("it supports models the contract describes whose blocks work on an H x W map (NHWC or NCHW: Swin, "
             "Swin V2, ConvNeXt, MetaFormer, TinyViT, Next-ViT, VOLO, DiNAT, HorNet, RMT, ...), token sequences "
             "told their grid (CvT, PVT v2) and plain ViTs with a fixed patch grid")


@register_technique("expedit", Kind.TOKENS)
@dataclass(frozen=True)
class Expedit:
    """Expedit (Liang et al., NeurIPS 2022): cluster each window's tokens to an h x w grid before block `alpha`,
    reconstruct the full grid before block `beta` (default: the end of alpha's stage).

    `alpha` and `beta` are block indices over the whole network (>= 1) or fractions of its depth (< 1). The grid is
    `size` ((s,) or (h, w); at most the window) or, when `size` is empty, `ratio` x the window side, rounded.
    Defaults: the official Swin-L COCO panoptic config (alpha = block 10 of 24, 12x12 windows to 8x8, 5 iterations,
    temperature 0.05, 7x7 neighbourhood, k = 10 with temperature 0.05).
    """

    alpha: float = 10 / 24
    beta: Optional[float] = None
    size: tuple[int, ...] = ()
    ratio: float = 2 / 3
    iters: int = 5
    temperature: float = 0.05
    neighborhood: int = 7
    k: int = 10
    recon_temperature: float = 0.05

    def __post_init__(self):
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if value is not None and (value < 0 or (value >= 1 and value != int(value))):
                raise ValueError(f"{name} is a block index (a whole number >= 1) or a fraction of the depth in "
                                 f"[0, 1), got {value}")
        if len(self.size) > 2 or any(s < 1 for s in self.size):
            raise ValueError(f"size is the cluster grid per window, (s,) or (h, w) of positive ints, got {self.size}")
        if not 0 < self.ratio <= 1:
            raise ValueError(f"ratio (cluster grid side / window side) must be in (0, 1], got {self.ratio}")
        if self.iters < 0 or self.k < 1:
            raise ValueError(f"iters must be >= 0 and k >= 1, got iters={self.iters}, k={self.k}")
        if self.temperature <= 0 or self.recon_temperature <= 0:
            raise ValueError(f"temperatures must be > 0, got {self.temperature} and {self.recon_temperature}")
        if self.neighborhood < 1 or self.neighborhood % 2 == 0:
            raise ValueError(f"neighborhood must be odd (cells of the cluster grid), got {self.neighborhood}")

    def grid(self, window: tuple[int, int]) -> tuple[int, int]:
        """The (h, w) cluster grid for a (wh, ww) window."""
        h, w = (self.size * 2)[:2] if self.size else (max(1, round(self.ratio * s)) for s in window)
        return min(h, window[0]), min(w, window[1])


# ------------------------------------------------------------------------------------------------------ the math

def _sq_dist(a: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """(B, M, C), (B, N, C) -> (B, M, N) squared distances, |a|^2 + |b|^2 - 2 a.b as the official code expands them;
    `b_sq` is |b|^2 as (B, 1, N), or plus a bias, (B, M, N)."""
    return torch.baddbmm((a * a).sum(-1)[:, :, None] + b_sq, a, b.transpose(1, 2), alpha=-2)


def _neighborhood_bias(size: tuple[int, int], grid: tuple[int, int], radius: int, like: torch.Tensor) -> torch.Tensor:
    """(h*w, H*W) additive bias: 0 where a cluster is within `radius` cells of a token's initial cluster, else 1e16."""
    h, w = grid
    labels = torch.arange(h * w, device=like.device, dtype=like.dtype).reshape(1, 1, h, w)
    init = F.interpolate(labels, size=size, mode="nearest").flatten().long()  # initial cluster of each token
    cluster = torch.arange(h * w, device=like.device)[:, None]
    near = ((init % w - cluster % w).abs() <= radius) & ((init // w - cluster // w).abs() <= radius)
    return (~near) * 1e16


def token_clustering(x: torch.Tensor, grid: tuple[int, int], iters: int = 5, temperature: float = 0.05,
                     neighborhood: int = 7) -> torch.Tensor:
    """Soft k-means of each (H, W) token map of x (B, H, W, C) into a (h, w) grid of centres: (B, h, w, C)."""
    B, H, W, C = x.shape
    tokens = x.reshape(B, H * W, C)
    centres = F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2), grid).flatten(2).transpose(1, 2)  # (B, h*w, C)
    # |token|^2 plus the neighbourhood bias, fixed over the iterations: (B, h*w, H*W)
    tokens_sq = (tokens * tokens).sum(-1)[:, None, :] + _neighborhood_bias((H, W), grid, neighborhood // 2, x)
    for _ in range(iters):
        affinity = (-_sq_dist(centres, tokens, tokens_sq) * temperature).softmax(1).detach()  # (B, h*w, H*W)
        centres = affinity @ tokens / affinity.sum(2, keepdim=True).clamp(min=1e-16)
    return centres.reshape(B, *grid, C)


def token_reconstruction(x: torch.Tensor, tokens: torch.Tensor, centres: torch.Tensor, k: int = 10,
                         temperature: float = 0.05) -> torch.Tensor:
    """Tokens (B, N, C) rebuilt from processed clusters x (B, M, C): each token mixes its k nearest `centres`
    (B, M, C; nearest to `tokens`, both as saved at clustering) with L2-normalised exp(-temperature x distance)."""
    dist = _sq_dist(tokens, centres, (centres * centres).sum(-1)[:, None, :]).clamp(min=0)  # (B, N, M)
    # exp(-t (d - min d)): the per-row factor exp(t min d) cancels in the L2 norm and keeps exp from underflowing
    weight = torch.exp(-temperature * (dist - dist.amin(2, keepdim=True)))
    if k < weight.shape[2]:
        kth = weight.topk(k, dim=2).values[..., -1:]
        weight = torch.where(weight >= kth, weight, torch.zeros_like(weight))  # ties with the k-th stay, as there
    return F.normalize(weight, dim=2) @ x


class Clustered(NamedTuple):
    """What reconstruction needs from clustering: the windows' tokens and their centres, and the geometry."""
    tokens: torch.Tensor    # (B * windows, wh * ww, C)
    centres: torch.Tensor   # (B * windows, h * w, C)
    size: tuple[int, int]   # (H, W) before padding
    window: tuple[int, int]
    grid: tuple[int, int]


def cluster_windows(x: torch.Tensor, window: tuple[int, int], grid: tuple[int, int], iters: int = 5,
                    temperature: float = 0.05, neighborhood: int = 7) -> tuple[torch.Tensor, Clustered]:
    """Cluster every window of x (B, H, W, C), zero-padded to whole windows, to a `grid`: (B, H', W', C) with
    H' = ceil(H / wh) * h, and what `reconstruct_windows` needs."""
    B, H, W, C = x.shape
    x = F.pad(x, (0, 0, 0, -W % window[1], 0, -H % window[0]))
    Hp, Wp = x.shape[1:3]
    windows = window_partition(x, window)  # (B * nW, wh, ww, C)
    centres = token_clustering(windows, grid, iters, temperature, neighborhood)  # (B * nW, h, w, C)
    out = window_reverse(centres, grid, Hp // window[0] * grid[0], Wp // window[1] * grid[1])
    saved = Clustered(windows.flatten(1, 2), centres.flatten(1, 2), (H, W), window, grid)
    return out, saved


def reconstruct_windows(y: torch.Tensor, saved: Clustered, k: int = 10, temperature: float = 0.05) -> torch.Tensor:
    """The (B, H, W, C) grid rebuilt from a clustered grid y (B, H', W', C)."""
    C = y.shape[-1]
    (H, W), window = saved.size, saved.window
    clusters = window_partition(y, saved.grid).flatten(1, 2)  # (B * nW, h * w, C)
    tokens = token_reconstruction(clusters, saved.tokens, saved.centres, k, temperature)  # (B * nW, wh * ww, C)
    Hp, Wp = H + -H % window[0], W + -W % window[1]
    return window_reverse(tokens.view(-1, *window, C), window, Hp, Wp)[:, :H, :W]


# ------------------------------------------------------------------------------------------------- the adapter

class _Run:
    """One clustered run of blocks: clusters on the way in, reconstructs on the way out. Between the two it holds
    the saved tokens and the clustered grid (per-forward state, overwritten by every forward).

    `layout` is the contract's: "nhwc" / "nchw" blocks carry the grid in their input's shape; "sequence" blocks take
    (B, prefix + H*W, C) and learn the grid from their first argument after x (`hw_argument`: CvT, PVT v2) or have
    one fixed at build time (`fixed_hw`: a plain ViT's patch grid). `grid_args(hw, x)`, where given, computes the
    rest of the blocks' arguments for a grid (RMT's stage-level decay masks and rotary angles)."""

    def __init__(self, cfg: Expedit, layout: str, num_prefix: int, window: Optional[tuple[int, int]], *,
                 hw_argument: bool = False, fixed_hw: Optional[tuple[int, int]] = None,
                 grid_args: Optional[Callable[[tuple[int, int], torch.Tensor], tuple]] = None):
        self.cfg, self.layout, self.num_prefix, self.window = cfg, layout, num_prefix, window
        self.hw_argument, self.fixed_hw, self.grid_args = hw_argument, fixed_hw, grid_args
        self.saved: Optional[Clustered] = None
        self.hw: Optional[tuple[int, int]] = None
        self.args: Optional[tuple] = None   # grid_args for the clustered grid, computed once per forward

    def input_grid(self, x: torch.Tensor, args: tuple) -> tuple[int, int]:
        """The (H, W) of the tokens a block is given."""
        if self.layout == "nhwc":
            return tuple(x.shape[1:3])
        if self.layout == "nchw":
            return tuple(x.shape[2:4])
        return tuple(args[0]) if self.hw_argument else self.fixed_hw

    def block_args(self, args: tuple) -> tuple:
        """A run block's positional arguments after x, for the grid it works on."""
        if self.hw_argument:
            return (self.hw, *args[1:])
        return args if self.args is None else self.args

    def _split(self, x: torch.Tensor, hw: tuple[int, int]) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """A block's tokens as (prefix tokens or None, the (B, H, W, C) grid)."""
        if self.layout == "nhwc":
            return None, x
        if self.layout == "nchw":
            return None, x.permute(0, 2, 3, 1)
        p = self.num_prefix
        return x[:, :p], x[:, p:].reshape(x.shape[0], *hw, x.shape[-1])

    def _join(self, prefix: Optional[torch.Tensor], grid: torch.Tensor) -> torch.Tensor:
        if self.layout == "nhwc":
            return grid
        if self.layout == "nchw":
            return grid.permute(0, 3, 1, 2)
        return torch.cat([prefix, grid.flatten(1, 2)], dim=1)

    def cluster(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        cfg = self.cfg
        window = self.window or tuple(hw)
        grid = cfg.grid(window)
        self.args = None
        if grid == window:  # nothing to cluster
            self.saved, self.hw = None, tuple(hw)
            return x
        prefix, tokens = self._split(x, hw)
        with torch.autocast(x.device.type, enabled=False):
            y, self.saved = cluster_windows(tokens.float(), window, grid, cfg.iters, cfg.temperature,
                                            cfg.neighborhood)
        self.hw = tuple(y.shape[1:3])
        if self.grid_args is not None:
            self.args = self.grid_args(self.hw, x)
        return self._join(prefix, y.to(x.dtype))

    def reconstruct(self, y: torch.Tensor) -> torch.Tensor:
        saved, self.saved, self.args = self.saved, None, None
        if saved is None:
            return y
        prefix, clusters = self._split(y, self.hw)
        k = min(self.cfg.k, math.prod(saved.grid))
        with torch.autocast(y.device.type, enabled=False):
            x = reconstruct_windows(clusters.float(), saved, k, self.cfg.recon_temperature)
        return self._join(prefix, x.to(y.dtype))


class ExpeditBlockMixin:
    """Mixin for the blocks of a clustered run (the model's own block class follows it in the MRO): the first
    clusters its input, the last reconstructs its output; blocks that are told the grid get the clustered one."""

    expedit_run: _Run
    expedit_first: bool = False
    expedit_last: bool = False

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        run = self.expedit_run
        if self.expedit_first:
            x = run.cluster(x, run.input_grid(x, args))
        x = super().forward(x, *run.block_args(args), **kwargs)
        return run.reconstruct(x) if self.expedit_last else x


@functools.lru_cache(maxsize=None)
def _expedit_class(base: type) -> type:
    return type(f"Expedit{base.__name__}", (ExpeditBlockMixin, base), {})


class ClusteredWindowAttention(WindowAttention):
    """timm Swin WindowAttention on a cluster-grid window. The relative-position bias table keeps its trained shape
    (the state dict is unchanged) and is resized bilinearly to the window at run time (official `resize_rpb_table`)."""

    table_window: tuple[int, int]

    def set_window_size(self, window_size: tuple[int, int]) -> None:
        self.window_size = to_2tuple(window_size)
        self.window_area = self.window_size[0] * self.window_size[1]
        index = get_relative_position_index(*self.window_size, device=self.relative_position_bias_table.device)
        self.register_buffer("relative_position_index", index, persistent=False)

    def _get_rel_pos_bias(self) -> torch.Tensor:
        (th, tw), (wh, ww) = self.table_window, self.window_size
        table = self.relative_position_bias_table.t().reshape(1, -1, 2 * th - 1, 2 * tw - 1)  # (1, nH, 2th-1, 2tw-1)
        table = F.interpolate(table, size=(2 * wh - 1, 2 * ww - 1), mode="bilinear").flatten(2)[0].t()
        bias = table[self.relative_position_index.view(-1)].view(self.window_area, self.window_area, -1)
        return bias.permute(2, 0, 1).unsqueeze(0)  # (1, nH, N, N)


# contract families (vitlab.contract) clustered within each attention window; every other family's run clusters
# the whole stage grid. Sequence blocks must be told the grid (`_takes_hw`: their first argument after x); the
# blocks of `_GRID_ARGS` families take arguments their stage computes for its grid: stage -> fn(hw, x) -> args.
_WINDOWED = frozenset({"swin", "swinv2"})


def _hw_argument_blocks() -> tuple[type, ...]:
    return cvt.Block, pvt_v2.Block, favit.FaViTBlock, soft.SoftBlock, svt.SVTBlock


def _takes_hw(block: nn.Module) -> bool:
    """Whether a sequence block's forward is (x, (H, W), ...)."""
    return isinstance(block, _hw_argument_blocks())


_GRID_ARGS: dict[str, Callable[[nn.Module], Callable[[tuple[int, int], torch.Tensor], tuple]]] = {
    "vl_rmt": lambda stage: lambda hw, x: (stage.rel_pos(*hw, x.device, x.dtype),),
}


def _describe(model: nn.Module):
    """The model's contract spec; TechniqueNotApplicable when no adapter describes it."""
    try:
        return describe(model, "expedit")
    except NoAdapter:
        raise TechniqueNotApplicable("expedit", model, _SUPPORTS) from None


def _fixed_patch_grid(model: nn.Module) -> Optional[tuple[int, int]]:
    """A plain ViT's patch grid when it is fixed at build time (not `dynamic_img_size`), else None."""
    embed = getattr(model, "patch_embed", None)
    grid = getattr(embed, "grid_size", None)
    if grid is None or getattr(model, "dynamic_img_size", False) or embed.num_patches != grid[0] * grid[1]:
        return None   # no grid, one that varies, or tokens that are not one H x W grid (ChannelViT: C grids)
    return tuple(grid)


def _make_run(model: nn.Module, spec, stage: int, blocks: list, cfg: Expedit,
              window: Optional[tuple[int, int]]) -> _Run:
    """The run for `blocks` (BlockSpecs of one stage, one layout), or TechniqueNotApplicable naming the first block
    when blocks of that kind cannot be given a smaller grid."""
    first = blocks[0]
    fixed = next((b for b in blocks if any(m.kind == "spectral" for m in b.mixers)), None)
    if fixed is not None:   # SpectFormer's and SVT's learned frequency filters are sized to the stage grid
        raise TechniqueNotApplicable("expedit", model, f"block {fixed.name} ({type(fixed.module).__name__}) filters "
                                     f"its tokens with a spectral filter sized to the stage grid; {_SUPPORTS}")
    kwargs: dict[str, Any] = {}
    if first.layout == "sequence":
        if _takes_hw(first.module):
            kwargs["hw_argument"] = True
        elif spec.family == "vit" and _fixed_patch_grid(model) and all(b.token_reducible for b in blocks):
            kwargs["fixed_hw"] = _fixed_patch_grid(model)
        else:
            raise TechniqueNotApplicable("expedit", model, f"block {first.name} ({type(first.module).__name__}) takes "
                                         f"a token sequence without its H x W grid; {_SUPPORTS}")
    if spec.family in _GRID_ARGS:
        kwargs["grid_args"] = _GRID_ARGS[spec.family](model.get_submodule(spec.stages[stage].name))
    return _Run(cfg, first.layout, first.num_prefix_tokens, window, **kwargs)


def _block_index(value: float, depth: int) -> int:
    return int(value) if value >= 1 else round(value * depth)


def _run_span(cfg: Expedit, depths: list[int]) -> Optional[tuple[int, int, int]]:
    """(stage, first block, last block + 1) within that stage, or None when alpha is past the last block."""
    depth = sum(depths)
    start = _block_index(cfg.alpha, depth)
    if start >= depth:
        return None
    stage = next(s for s in range(len(depths)) if start < sum(depths[:s + 1]))
    offset, end = sum(depths[:stage]), sum(depths[:stage + 1])
    stop = end if cfg.beta is None else _block_index(cfg.beta, depth)
    if not start < stop <= end:
        raise TechniqueError(f"{format_technique(cfg)}: clustering before block {start} (stage {stage}, blocks "
                             f"{offset}-{end - 1}) needs reconstruction before a block in {start + 1}..{end} "
                             f"(beta; {end} = the stage's end, where patch merging needs the full grid), got {stop}")
    return stage, start - offset, stop - offset


def _shrink_windows(block: nn.Module, family: str, resolution: tuple[int, int], grid: tuple[int, int]) -> None:
    """Give a Swin block the clustered grid's resolution and an h x w window (timm's own `set_input_size`)."""
    if family == "swin":  # keep the bias table's shape; resize it at run time instead
        block.attn.table_window = block.attn.window_size
        block.attn.__class__ = ClusteredWindowAttention
    block.set_input_size(feat_size=resolution, window_size=grid)


@register_handler(Expedit)
def _apply_expedit(model: nn.Module, cfg: Expedit) -> nn.Module:
    if any(isinstance(m, ExpeditBlockMixin) for m in model.modules()):
        raise TechniqueError("the model already has expedit applied; apply it once per model")
    spec = _describe(model)
    span = _run_span(cfg, [len(s.blocks) for s in spec.stages])
    if span is None:
        return model
    stage, first, stop = span
    specs = spec.stages[stage].blocks[first:stop]
    # the run ends where the blocks change layout (EfficientFormer's last stage flattens its map to a sequence)
    # (or the way they learn the grid: SOFT's last stage turns from SoftBlocks told the grid to plain ViT blocks)
    kind = [(b.layout, _takes_hw(b.module)) for b in specs]
    specs = specs[:next((i for i, k in enumerate(kind) if k != kind[0]), len(specs))]
    blocks = [b.module for b in specs]
    window = None
    if spec.family in _WINDOWED:
        window = tuple(blocks[0].window_size)
        grid = cfg.grid(window)
        if grid == window:
            return model
        H, W = blocks[0].input_resolution
        resolution = (math.ceil(H / window[0]) * grid[0], math.ceil(W / window[1]) * grid[1])
        for block in blocks:
            _shrink_windows(block, spec.family, resolution, grid)
    run = _make_run(model, spec, stage, specs, cfg, window)
    for i, block in enumerate(blocks):
        block.__class__ = _expedit_class(type(block))
        block.expedit_run, block.expedit_first, block.expedit_last = run, i == 0, i == len(blocks) - 1
    return model
