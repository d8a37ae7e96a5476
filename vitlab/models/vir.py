"""ViR: Vision Retention Networks (Hatamizadeh, Ranzinger, Lan, Alvarez, Fidler, Kautz; NVIDIA; arXiv:2310.19731,
v2 "ViR: Towards Efficient Vision Retention Backbones").

An isotropic ViT whose attention is replaced by multi-head retention (RetNet's retention, Sun et al. 2023), without
RetNet's gate or group norm. Per head h, with q = x W_q / sqrt(d), k = x W_k, v = x W_v:

    parallel:   O = (q k^T * D) v,   D[n, m] = gamma_h^(n - m) for n >= m, else 0   (causal, decaying)
    recurrent:  S_n = gamma_h S_(n-1) + k_n^T v_n,   o_n = q_n S_n                    (a d x d state per head)
    chunkwise:  parallel inside each chunk of `chunk_size` tokens, the recurrent state carried between chunks

The three forms give the same outputs (float rounding aside); `mode=` picks one for the whole model (or
`set_mode`). The decay rates are gamma_h = 1 - 2^-e_h, e_h evenly spaced from 5 to 9 over the heads (1 - 1/32 ... 1 -
1/512). Because retention is causal, the class token goes at the END of the sequence, after the position embedding
has been added to the patch tokens (it gets none): it is the one token whose output has seen every patch, and the
head reads it (the reviewer code's `global_pool='token_last'`, `no_embed_class=True`; the HuggingFace community
course and B. Pulfer's re-implementation read the paper the same way). Blocks are timm's pre-norm ViT blocks with
LayerScale (init 1e-5), the retention in the `attn` slot; the decay is recomputed from the head count, not stored.

Paper: arXiv:2310.19731 (v1 Oct 2023 "ViR: Vision Retention Networks", v2 with more authors). The official repo
github.com/NVlabs/ViR holds only a README ("code will be released soon", commit 55d10ba). The authors' code for
reviewers is public as github.com/anom63931/ViR, `models/vir.py`, commit d91fd8beb942b95332d7506fae3df03cf18471db
("Code by authors of ViR"): this file follows its architecture, parameters and decay schedule, and is checked
against it.

| variant | params (1000 classes) = reviewer-code constructor | MACs at 224 (counted here) |
|---|---|---|
| ViR-S/16 (`vl_vir_small`, `vir_small_patch16_224`) | 22,059,496 | 4.599G |
| ViR-B/16 (`vl_vir_base`, `vir_base_patch16_224`) | 86,585,320 | 17.564G |
| ViR-L/16 (`vl_vir_large`, `vir_large_patch16_224`) | 304,374,760 | 61.555G |
| ViR-L/14 (`vl_vir_large_patch14`, `vir_large_patch14_224`) | 304,251,880 | 81.013G |

The parameter counts are ViT's at the same widths, less the class token's position embedding, plus LayerScale; the
MACs (parallel form) equal timm's ViT at the same widths and token count, the retention matmuls costing 2 N^2 C per
block like attention's. The paper's own parameter / FLOPs / top-1 table is not quoted here: it could not be read
from this workplace (only the paper's first page is stored), and no trained weights are public.

Differences from the reviewer code, and why:

* Its parallel path applies a softmax after multiplying q k^T by the decay mask (an unused `act='softmax'`
  argument): that is neither causal (the masked-out future gets weight exp(0)) nor equal to its own recurrent and
  chunkwise paths, against the paper's stated equivalence. Here all three forms are plain retention; its recurrent
  and chunkwise paths are what the fixture test matches.
* Its recurrent and chunkwise paths run token by token / chunk by chunk through all blocks at once; here each block
  runs the chosen form over the whole sequence in turn. The blocks are causal and per-token otherwise, so the
  outputs are the same.
* Module names are timm's (`attn.qkv`, `attn.proj`; official `retention.qkv`, `retention.out_proj`); the
  `bidirectional` encode mode, the 2D decay mask and the hybrid (conv-stage) variants of the v2 paper are not
  implemented; `global_pool="avg"` averages the patch tokens after the final norm (no separate `fc_norm`); any input
  size works (the position embedding is resampled to the patch grid, bicubic).

Checked (tests/models/test_zoo_vir.py): the reviewer code run locally on a tiny config (recurrent and chunkwise paths),
committed as a fixture in its key layout, logits within 1e-4 in all three modes; parallel == recurrent ==
chunkwise (atol 1e-5) for the layer and the model, chunk sizes that do and do not divide the sequence; the decay
mask against gamma^(n - m) computed directly; the retention core against torchscale 0.3.0's MultiScaleRetention
(microsoft/torchscale, the RetNet reference) on copied weights, from a committed fixture; exact parameter counts
of the four reviewer-code constructors; causality (a patch changes no earlier token's output).
"""
import math
from functools import partial
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.layers import PatchEmbed, resample_abs_pos_embed, resample_patch_embed, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Block

from ._builder import build_vitlab_model, imagenet_cfg
from ._staged import LinearHeadMixin

__all__ = ["VisionRetention", "Retention", "MODES", "decay_rates", "decay_mask", "retention_parallel",
           "retention_recurrent", "retention_chunkwise", "checkpoint_filter_fn", "vl_vir_small", "vl_vir_base",
           "vl_vir_large", "vl_vir_large_patch14", "vl_test_vir"]

MODES = ("parallel", "recurrent", "chunkwise")


# --- the math: pure tensor functions on q, k (B, H, N, d) and v (B, H, N, dv) -----------------------------

def decay_rates(num_heads: int, device=None) -> torch.Tensor:
    """log(gamma_h) with gamma_h = 1 - 2^-e_h, e_h evenly spaced from 5 to 9 over the heads: shape (H,)."""
    exponents = torch.linspace(5.0, 9.0, num_heads, device=device)
    return torch.log(1 - 2.0 ** -exponents)


def decay_mask(length: int, log_gamma: torch.Tensor) -> torch.Tensor:
    """D[h, n, m] = gamma_h^(n - m) for n >= m, 0 for m > n (causal): shape (H, length, length)."""
    index = torch.arange(length, device=log_gamma.device, dtype=log_gamma.dtype)
    distance = index[:, None] - index[None, :]  # (N, N): n - m
    mask = torch.exp(distance.clamp(min=0) * log_gamma[:, None, None])  # (H, N, N)
    return mask.masked_fill(distance < 0, 0.0)


def retention_parallel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor) -> torch.Tensor:
    """(q k^T * D) v, all N outputs at once: O(N^2) time and memory."""
    scores = q @ k.transpose(-2, -1)  # (B, H, N, N)
    return (scores * decay_mask(q.shape[-2], log_gamma).to(scores.dtype)) @ v


def retention_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor) -> torch.Tensor:
    """S_n = gamma S_(n-1) + k_n^T v_n, o_n = q_n S_n, one token at a time: a (d, dv) state per head."""
    B, H, N, d = q.shape
    gamma = log_gamma.exp().to(q.dtype).view(1, H, 1, 1)
    state = q.new_zeros(B, H, d, v.shape[-1])
    outputs = []
    for n in range(N):
        state = gamma * state + k[:, :, n, :, None] * v[:, :, n, None, :]  # (B, H, d, dv)
        outputs.append(q[:, :, n, None, :] @ state)  # (B, H, 1, dv)
    return torch.cat(outputs, dim=2)


def retention_chunkwise(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor,
                        chunk_size: int) -> torch.Tensor:
    """Parallel within chunks of `chunk_size` tokens (the last may be shorter), the state carried across chunks:
    o_j = (inner retention)_j + gamma^(j+1) q_j S_prev;  S = gamma^L S_prev + sum_j gamma^(L-1-j) k_j^T v_j."""
    B, H, N, d = q.shape
    log_gamma = log_gamma.to(q.dtype)
    state = q.new_zeros(B, H, d, v.shape[-1])
    outputs = []
    for start in range(0, N, chunk_size):
        q_c, k_c, v_c = (t[:, :, start:start + chunk_size] for t in (q, k, v))  # (B, H, L, .)
        L = q_c.shape[-2]
        position = torch.arange(L, device=q.device, dtype=q.dtype)
        query_decay = torch.exp(log_gamma[:, None, None] * (position + 1)[:, None])  # (H, L, 1): gamma^(j+1)
        value_decay = torch.exp(log_gamma[:, None, None] * (L - 1 - position)[:, None])  # (H, L, 1)
        outputs.append(retention_parallel(q_c, k_c, v_c, log_gamma) + (q_c @ state) * query_decay)
        state = torch.exp(log_gamma * L).view(1, H, 1, 1) * state + k_c.transpose(-2, -1) @ (v_c * value_decay)
    return torch.cat(outputs, dim=2)


# --- modules ----------------------------------------------------------------------------------------------

class Retention(nn.Module):
    """Multi-head retention with a fused qkv and an output projection; `mode` picks the computation form.

    The constructor takes timm `Attention`'s arguments, so timm's `Block(attn_layer=Retention)` builds it. Retention
    weights are not probabilities: attention dropout, q/k norms and attention masks are refused.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, qk_norm: bool = False,
                 scale_norm: bool = False, proj_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 norm_layer: Optional[type[nn.Module]] = None, device=None, dtype=None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        if qk_norm or scale_norm or attn_drop:
            raise ValueError("Retention has no q/k norm, inner norm or attention dropout (qk_norm, scale_norm, "
                             f"attn_drop got {qk_norm}, {scale_norm}, {attn_drop}): leave them at their defaults")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, device=device, dtype=dtype)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, device=device, dtype=dtype)
        self.proj_drop = nn.Dropout(proj_drop)
        self.mode = "parallel"
        self.chunk_size = 64

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
                ) -> torch.Tensor:
        """x (B, N, C); timm's Block passes `attn_mask` / `is_causal`: retention is causal by construction."""
        if attn_mask is not None:
            raise ValueError("Retention takes no attn_mask: its causal decay mask is built in")
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q = q * self.scale  # (B, H, N, d)
        log_gamma = decay_rates(self.num_heads, device=x.device)
        if self.mode == "parallel":
            out = retention_parallel(q, k, v, log_gamma)
        elif self.mode == "recurrent":
            out = retention_recurrent(q, k, v, log_gamma)
        else:
            out = retention_chunkwise(q, k, v, log_gamma, self.chunk_size)
        out = out.transpose(1, 2).reshape(B, N, C)  # (B, N, H * d)
        return self.proj_drop(self.proj(out))


class VisionRetention(LinearHeadMixin, nn.Module):
    """ViR: patch embedding + position embedding, class token appended LAST, retention blocks, norm, head.

    Args:
        global_pool: "token" (the class token, the paper's head), "avg" (mean of the patch tokens) or "".
        init_values: LayerScale init (the reviewer code: 1e-5); None for no LayerScale.
        mode: "parallel", "recurrent" or "chunkwise" for every block (same outputs; see `set_mode`).
        chunk_size: tokens per chunk in "chunkwise" mode.
    """

    pool_types = ("token", "avg", "")

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = "token", embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 init_values: Optional[float] = 1e-5, class_token: bool = True, mode: str = "parallel",
                 chunk_size: int = 64, drop_rate: float = 0.0, pos_drop_rate: float = 0.0,
                 proj_drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 0  # the class token is a suffix: the last token
        self.num_class_tokens = int(class_token)
        self._check_pool(global_pool)
        self.global_pool = global_pool
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, strict_img_size=False)
        self.pos_embed = nn.Parameter(torch.randn(1, self.patch_embed.num_patches, embed_dim) * 0.02)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.pos_drop = nn.Dropout(pos_drop_rate)
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, init_values=init_values,
                  proj_drop=proj_drop_rate, drop_path=dpr[i], norm_layer=norm_layer, attn_layer=Retention)
            for i in range(depth)])
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=patch_size)
                             for i in range(depth)]
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.set_mode(mode, chunk_size)
        self.apply(self._init_weights)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)

    def _check_pool(self, global_pool: str) -> None:
        super()._check_pool(global_pool)
        if global_pool == "token" and not self.num_class_tokens:
            raise ValueError("global_pool='token' needs the class token (class_token=True)")

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def set_mode(self, mode: str, chunk_size: Optional[int] = None) -> "VisionRetention":
        """Switch every block's retention to `mode` ("parallel", "recurrent", "chunkwise"); returns the model."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.mode = mode
        for block in self.blocks:
            block.attn.mode = mode
            block.attn.chunk_size = chunk_size or block.attn.chunk_size
        return self

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^cls_token|pos_embed|patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def _tokens(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        grid = tuple(self.patch_embed.dynamic_feat_size(x.shape[-2:]))
        x = self.patch_embed(x)  # (B, N, C)
        pos_embed = self.pos_embed
        if grid != tuple(self.patch_embed.grid_size):
            pos_embed = resample_abs_pos_embed(pos_embed, grid, self.patch_embed.grid_size, num_prefix_tokens=0)
        x = x + pos_embed
        if self.cls_token is not None:  # last: under the causal decay, the one token that sees every patch
            x = torch.cat([x, self.cls_token.expand(x.shape[0], -1, -1)], dim=1)  # (B, N + 1, C)
        return self.pos_drop(x), grid

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Block outputs at `indices` (last n if int, all if None): (B, C, H, W) maps without the class token, or
        every token (B, N (+1), C) for "NLC"."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x, grid = self._tokens(x)
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, block in enumerate(blocks):
            x = block(x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        if output_fmt == "NCHW":
            num_patches = grid[0] * grid[1]
            intermediates = [y[:, :num_patches].reshape(y.shape[0], *grid, -1).permute(0, 3, 1, 2).contiguous()
                             for y in intermediates]  # (B, C, H, W)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self._tokens(x)
        return self.norm(self.blocks(x))  # (B, N + 1, C), class token last

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "token":
            x = x[:, -1]
        elif self.global_pool == "avg":
            x = x[:, :x.shape[1] - self.num_class_tokens].mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# --- converter --------------------------------------------------------------------------------------------

def checkpoint_filter_fn(state_dict: dict, model: VisionRetention) -> dict:
    """Reviewer-code ViR state dict (`blocks.i.retention.{qkv,out_proj}`, {"model": ...} or {"state_dict": ...}
    wrappers) -> vitlab's; resamples the position embedding and the patch kernel where the model's differ. Identity
    on a state dict already in vitlab's layout at the model's sizes."""
    state_dict = state_dict.get("model", state_dict)
    state_dict = state_dict.get("state_dict", state_dict)
    out = {}
    for key, value in state_dict.items():
        key = key.replace(".retention.out_proj.", ".attn.proj.").replace(".retention.qkv.", ".attn.qkv.")
        if key == "pos_embed" and value.shape != model.pos_embed.shape:
            old = int(math.sqrt(value.shape[1]))  # official checkpoints are square
            value = resample_abs_pos_embed(value, model.patch_embed.grid_size, (old, old), num_prefix_tokens=0)
        elif key == "patch_embed.proj.weight" and value.shape[-2:] != model.patch_embed.proj.weight.shape[-2:]:
            value = resample_patch_embed(value, model.patch_embed.proj.weight.shape[-2:])
        out[key] = value
    return out


# --- registry ---------------------------------------------------------------------------------------------

def _cfg(**kwargs) -> dict:
    return imagenet_cfg(**{"crop_pct": 0.9, "mean": IMAGENET_INCEPTION_MEAN, "std": IMAGENET_INCEPTION_STD,
                           "first_conv": "patch_embed.proj", "license": "unknown", "paper_ids": "arXiv:2310.19731",
                           **kwargs})


default_cfgs = generate_default_cfgs({
    "vl_vir_small": _cfg(),
    "vl_vir_base": _cfg(),
    "vl_vir_large": _cfg(),
    "vl_vir_large_patch14": _cfg(),
    "vl_test_vir": _cfg(input_size=(3, 32, 32)),
})


def _create_vir(variant: str, pretrained: bool = False, **kwargs) -> VisionRetention:
    return build_vitlab_model(VisionRetention, variant, pretrained, filter_fn=checkpoint_filter_fn,
                              default_out_indices=3, **kwargs)


@register_model
def vl_vir_small(pretrained: bool = False, **kwargs) -> VisionRetention:
    """ViR-S/16 (`vir_small_patch16_224`): 22,059,496 params, 4.60 GMACs at 224."""
    arch = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_vir("vl_vir_small", pretrained, **dict(arch, **kwargs))


@register_model
def vl_vir_base(pretrained: bool = False, **kwargs) -> VisionRetention:
    """ViR-B/16 (`vir_base_patch16_224`): 86,585,320 params, 17.56 GMACs at 224."""
    arch = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_vir("vl_vir_base", pretrained, **dict(arch, **kwargs))


@register_model
def vl_vir_large(pretrained: bool = False, **kwargs) -> VisionRetention:
    """ViR-L/16 (`vir_large_patch16_224`): 304,374,760 params, 61.55 GMACs at 224."""
    arch = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16)
    return _create_vir("vl_vir_large", pretrained, **dict(arch, **kwargs))


@register_model
def vl_vir_large_patch14(pretrained: bool = False, **kwargs) -> VisionRetention:
    """ViR-L/14 (`vir_large_patch14_224`): 304,251,880 params, 81.01 GMACs at 224."""
    arch = dict(patch_size=14, embed_dim=1024, depth=24, num_heads=16)
    return _create_vir("vl_vir_large_patch14", pretrained, **dict(arch, **kwargs))


@register_model
def vl_test_vir(pretrained: bool = False, **kwargs) -> VisionRetention:
    """Tiny ViR for tests: 32 px, patch 4 (64 patches + the class token), width 48, 3 blocks, 4 heads."""
    arch = dict(img_size=32, patch_size=4, embed_dim=48, depth=3, num_heads=4, mlp_ratio=2.0, chunk_size=16)
    return _create_vir("vl_test_vir", pretrained, **dict(arch, **kwargs))
