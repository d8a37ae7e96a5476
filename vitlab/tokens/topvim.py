"""ToP-ViM: token pruning for vision state space models (Zhan, Kong et al., "Exploring Token Pruning in Vision State
Space Models", NeurIPS 2024, arXiv:2409.18962), on vitlab's plain Vision Mamba (`vitlab.models.vim`).

    vitlab.apply_(model, TopViM(keep_rate=0.8))      # or: --apply topvim:keep_rate=0.8,locations=0.25/0.5

After the blocks at `locations` (fractions of the depth), the patch tokens are ranked by the SSM's own output and
only the top ceil(keep_rate x patches) go on (the class token always does), in their original order:

* token importance (the paper's "clipped channel aggregation"): s_t = (1/E) sum_d max(0, y_{t,d}), where y is the
  pruning block's backward-direction SSM output after the SiLU(z) gate, (B, E, L) (the official code's
  `layer.mixer.xai_b`, the `out_b` of `mamba_inner_fn_no_out_proj`); clipping at 0 keeps large negative channels
  from cancelling the positive evidence.
* pruning-aware hidden state alignment: a pruned token leaves the residual stream (no norm, projections or conv are
  computed for it), but later blocks still see it as a position of the scan. Inside each mixer the pruned positions
  are zero inputs: the causal conv reads 0 there, and the selective scan (h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t)
  steps over them with u = 0, so x_proj gives dt = softplus(dt_bias), B = C = 0 and the state only decays,
  h_t = exp(softplus(dt_bias) A) h_{t-1}. Between two kept tokens g positions apart the state thus decays by
  exp(g softplus(dt_bias) A), which the scan over the kept tokens folds into the next kept token's decay
  (`aligned_selective_scan`; the paper's kernel reads the same gaps from a "position map"). The kept tokens keep
  their original neighbourhood and distances in both scan directions, instead of the shifted neighbourhood that
  plain removal gives (the paper's Fig. 1). `alignment=False` is that plain removal: the official released code
  (github.com/ZLKong/ToP-ViM, commit 6fd6282038d22e0960a47517f6bbe198ef62fb38, `vim/models_mamba.py`, token pruning
  after layers 5/10/15 of Vim-S with keep ratio 0.8) gathers the kept tokens and runs the next blocks on them, and
  does not release the alignment kernel; the alignment here follows the paper's description, read as above.

Defaults: the official Vim-S setting (keep 0.8 after blocks 5, 10, 15 of 24). The official code makes the kept count
odd so the class token sits exactly in the middle; here the class token keeps its original place among the kept
tokens. `keep_rate=1` prunes nothing and is the unpruned model exactly. Only `VisionMamba` (vl_vim_*) is supported:
MSVMamba's multi-scale 2-D scan runs on a grid (depthwise 3x3 / 7x7 stride-2 convs, column-major routes, bilinear
upsampling, a ConvFFN conv), where a dropped token leaves a hole that none of them define; other models are refused.
"""
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from ..models.msvmamba import SelectiveSSM
from ..models.vim import BiMambaMixer, VisionMamba
from ..techniques import (Kind, TechniqueError, TechniqueNotApplicable, applied_techniques, format_technique,
                          register_handler, register_technique, technique_kind)

__all__ = ["TopViM", "TopViMState", "TopViMVisionMamba", "token_importance", "aligned_selective_scan",
           "aligned_mixer", "prune_blocks", "apply_topvim"]

SUPPORTS = ("it supports vitlab's plain Vision Mamba models (VisionMamba: vl_vim_tiny, vl_vim_small, vl_test_vim), "
            "whose blocks scan one token sequence; MSVMamba's 2-D multi-scale scan over a grid has no place for a "
            "dropped token")


@register_technique("topvim", Kind.TOKENS)
@dataclass(frozen=True)
class TopViM:
    """ToP-ViM (Zhan et al., NeurIPS 2024): after the blocks at `locations` (fractions of the depth) keep the top
    ceil(keep_rate x patches) tokens by clipped SSM output, with pruning-aware hidden state alignment (the scan still
    steps over the pruned positions); `alignment=False` is plain removal. See vitlab.tokens.topvim."""

    keep_rate: float = 0.8
    locations: tuple[float, ...] = (5 / 24, 10 / 24, 15 / 24)   # after blocks 5, 10, 15 of 24 (official Vim-S)
    alignment: bool = True

    def __post_init__(self):
        if not 0 < self.keep_rate <= 1:
            raise ValueError(f"keep_rate must be in (0, 1] (kept patch tokens per pruning), got {self.keep_rate}")
        if not self.locations or any(not 0 < f <= 1 for f in self.locations):
            raise ValueError(f"locations are fractions of the depth in (0, 1] (prune after the first "
                             f"round(f x depth) blocks), got {self.locations}")


@dataclass
class TopViMState:
    """Per-forward state (reset each forward): tokens after each block, and the kept tokens' original positions."""

    counts: list[int] = field(default_factory=list)
    positions: Optional[torch.Tensor] = None     # (B, L) original sequence index of each current token
    cls_index: Optional[torch.Tensor] = None     # (B,) where the class token is in each row's current sequence

    def reset(self) -> None:
        self.counts, self.positions, self.cls_index = [], None, None


# --- the math: pure tensor functions ----------------------------------------------------------------------

def token_importance(y: torch.Tensor) -> torch.Tensor:
    """The paper's token importance: SSM output (B, E, L) -> (B, L), mean over channels of max(0, y)."""
    return y.clamp(min=0).mean(dim=1)


def aligned_selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                           D: torch.Tensor, delta_bias: torch.Tensor, gaps: torch.Tensor) -> torch.Tensor:
    """Mamba's selective scan over the kept tokens, stepping over `gaps` pruned positions before each one.

    u, delta: (Bt, E, L) (delta without its bias); A: (E, N); B, C: (Bt, N, L); D, delta_bias: (E,); gaps: (Bt, L)
    pruned positions between each kept token and the one before it in scan order. A pruned position has u = 0, so
    dt = softplus(delta_bias) and B = 0 there: h_t = exp((dt_t + g_t softplus(delta_bias)) A) h_{t-1} + dt_t B_t u_t,
    y_t = C_t h_t + D u_t. With all gaps 0 this is `msvmamba.selective_scan_parallel`. Returns (Bt, E, L), float32
    inside (a Hillis-Steele prefix scan, as msvmamba's).
    """
    dt = F.softplus(delta.float() + delta_bias.float()[:, None])  # (Bt, E, L)
    skipped = gaps.float()[:, None, :] * F.softplus(delta_bias.float())[None, :, None]  # (Bt, E, L)
    a = torch.exp((dt + skipped)[:, :, None, :] * A.float()[None, :, :, None])  # (Bt, E, N, L)
    h = (dt * u.float())[:, :, None, :] * B.float()[:, None]  # (Bt, E, N, L)
    step = 1
    while step < u.shape[-1]:
        h = h + a * F.pad(h[..., :-step], (step, 0))  # fold in the pair ending `step` positions earlier
        a = a * F.pad(a[..., :-step], (step, 0), value=1.0)
        step *= 2
    y = (h * C.float()[:, None]).sum(2) + D.float()[:, None] * u.float()  # (Bt, E, L)
    return y.to(u.dtype)


def _ssm(ssm: SelectiveSSM, u: torch.Tensor, gaps: torch.Tensor) -> torch.Tensor:
    """One direction's selective SSM (the module's own projections) over kept tokens u (B, E, L) with `gaps`."""
    R, N = ssm.dt_rank, ssm.d_state
    dt_low, B, C = ssm.x_proj(u.transpose(1, 2)).split([R, N, N], dim=-1)  # (B, L, R), (B, L, N), (B, L, N)
    delta = F.linear(dt_low, ssm.dt_proj.weight).transpose(1, 2)  # (B, E, L), bias added in the scan
    return aligned_selective_scan(u, delta, -torch.exp(ssm.A_log.float()), B.transpose(1, 2), C.transpose(1, 2),
                                  ssm.D, ssm.dt_proj.bias, gaps)


def _gaps(positions: torch.Tensor) -> torch.Tensor:
    """Pruned positions before each kept token (B, L) in the order of `positions` (increasing)."""
    previous = F.pad(positions[:, :-1], (1, 0), value=-1)
    return positions - previous - 1


def aligned_mixer(mixer: BiMambaMixer, x: torch.Tensor, positions: torch.Tensor,
                  length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Vim's bidirectional mixer on the kept tokens x (B, L, C) at original `positions` (B, L) of a `length`-long
    sequence whose other positions are zero inputs; returns (output (B, L, C), token importance (B, L)).

    The causal convs run on the full-length sequence (the kept tokens scattered in, zeros elsewhere: a kept token's
    window is its original neighbourhood); the scans run on the kept tokens only, the gaps folded into the decay.
    """
    Bsz, L, _ = x.shape
    xs, z = mixer.in_proj(x).transpose(1, 2).chunk(2, dim=1)  # (B, E, L) each
    index = positions[:, None, :].expand_as(xs)  # (B, E, L)
    full = xs.new_zeros(Bsz, xs.shape[1], length).scatter(2, index, xs)  # (B, E, length)
    u_fwd = mixer.act(mixer.conv_fwd(full)[..., :length].gather(2, index))  # (B, E, L)
    u_bwd = mixer.act(mixer.conv_bwd(full.flip(-1))[..., :length].gather(2, length - 1 - index))  # flipped back
    y_fwd = _ssm(mixer.ssm_fwd, u_fwd, _gaps(positions))
    reversed_positions = (length - 1 - positions).flip(-1)  # increasing in the backward scan's order
    y_bwd = _ssm(mixer.ssm_bwd, u_bwd.flip(-1), _gaps(reversed_positions)).flip(-1)
    gate = mixer.act(z)
    out = mixer.out_proj(((y_fwd + y_bwd) * gate / 2).transpose(1, 2))  # (B, L, C)
    return out, token_importance(y_bwd * gate)


def prune_blocks(cfg: TopViM, depth: int) -> list[int]:
    """0-based indices of the blocks after which `cfg` prunes: the first round(f x depth) blocks, f in locations."""
    return sorted({max(1, round(f * depth)) - 1 for f in cfg.locations})


# --- the model adapter ------------------------------------------------------------------------------------

class TopViMVisionMamba(VisionMamba):
    """A VisionMamba that prunes tokens after `topvim_blocks` (set by `apply_topvim`); the blocks are the model's."""

    topvim: TopViM
    topvim_blocks: tuple[int, ...]
    token_state: TopViMState

    def _keep(self, tokens: int) -> int:
        """Patch tokens kept by a pruning step from a sequence of `tokens` (the class token one of them)."""
        return max(1, math.ceil(self.topvim.keep_rate * (tokens - 1)))

    def _prune(self, x: torch.Tensor, score: torch.Tensor, state: TopViMState) -> torch.Tensor:
        """Keep the class token and the top `_keep` patch tokens by `score` (B, L), in sequence order."""
        keep = self._keep(x.shape[1])
        score = score.detach().scatter(1, state.cls_index[:, None], float("inf"))  # the class token always stays
        kept = score.topk(keep + 1, dim=1).indices.sort(dim=1).values  # (B, keep + 1), sequence order
        state.cls_index = (kept < state.cls_index[:, None]).sum(1)  # its new rank, per row
        state.positions = state.positions.gather(1, kept)
        return x.gather(1, kept[:, :, None].expand(-1, -1, x.shape[-1]))  # (B, keep + 1, C)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        state = self.token_state
        state.reset()
        x = self.embed(x)  # (B, N + 1, C)
        length = x.shape[1]
        state.cls_index = torch.full((x.shape[0],), self.cls_index, device=x.device)
        state.positions = torch.arange(length, device=x.device).expand(x.shape[0], -1)
        pruned = False
        for i, block in enumerate(self.blocks):
            prunes = i in self.topvim_blocks and self._keep(x.shape[1]) < x.shape[1] - 1
            if prunes or (pruned and self.topvim.alignment):
                if pruned and self.topvim.alignment:  # the kept tokens at their places in the full sequence
                    positions, total = state.positions, length
                else:  # the current tokens are the whole sequence (nothing pruned yet, or plain removal)
                    positions, total = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1), x.shape[1]
                out, score = aligned_mixer(block.mixer, block.norm(x), positions, total)
                x = x + block.drop_path(out)
                if prunes:
                    x, pruned = self._prune(x, score, state), True
            else:
                x = block(x)  # the model's own block: nothing pruned yet, or plain removal
            state.counts.append(x.shape[1])
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The model's head on the class token at each row's own index (or the mean of the other kept tokens)."""
        index = self.token_state.cls_index
        cls = x.gather(1, index[:, None, None].expand(-1, 1, x.shape[-1]))[:, 0]  # (B, C)
        x = cls if self.global_pool == "token" else (x.sum(1) - cls) / (x.shape[1] - 1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)


def apply_topvim(model, cfg: TopViM):
    """Swap `model` (a VisionMamba) to `TopViMVisionMamba` in place with `cfg`'s schedule; refuses other models."""
    text = format_technique(cfg)
    if not isinstance(model, VisionMamba):
        raise TechniqueNotApplicable(text, model, SUPPORTS)
    if isinstance(model, TopViMVisionMamba) or any(technique_kind(t) == Kind.TOKENS for t in applied_techniques(model)):
        raise TechniqueError(f"{text}: the model already has a token-reduction technique; apply one per model")
    model.__class__ = TopViMVisionMamba
    model.topvim = cfg
    model.topvim_blocks = tuple(prune_blocks(cfg, len(model.blocks)))
    model.token_state = TopViMState()
    return model


@register_handler(TopViM)
def _apply_topvim(model, cfg: TopViM):
    return apply_topvim(model, cfg)
