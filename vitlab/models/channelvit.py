"""ChannelViT: Channel Vision Transformers (Bao, Sivanandan & Karaletsos, "Channel Vision Transformers: An Image Is
Worth 1 x 16 x 16 Words", ICLR 2024, arXiv:2309.16108).

A plain ViT whose tokens are (channel, patch) pairs: every input channel is patchified on its own by one projection
shared across channels (a 1-channel p x p conv), a learned embedding per channel is added (like a position
embedding, but indexed by channel), and the position embedding of each patch is shared by all channels. An image
with C channels is C * HW / p^2 tokens plus the class token, so attention reasons across positions and channels.
The blocks are ViT blocks (timm `Block`); the head reads the class token. A model built for `in_chans` channels
can be given any subset of them: `model(x, channels=[0, 2, 4])` with x holding those three channels, in that order
(the official forward's `extra_tokens["channels"]`; a (B, C') tensor gives each image its own indices).
Hierarchical Channel Sampling (HCS, `hcs=True`) regularises training: in train mode each batch keeps a random
subset of its channels, k ~ U{1..C} first, then k channels uniformly (`sample_channel_subset`), as the official
`hcs_channel_vit.py` samples; eval mode uses every channel it is given.

Official code: github.com/insitro/ChannelViT, `channelvit/backbone/channel_vit.py` (ChannelViT) and
`channelvit/backbone/hcs_channel_vit.py` (the same network with HCS; the channel embedding is an nn.Embedding
there), configs `channelvit/config/backbone/{hcs_,}channelvit_{small,base}.yaml`, commit
1077a103e30cf20b6223b64935666962d0e2e836. The repo releases ChannelViT-S/16 (ImageNet, 3 channels) and ChannelViT-S/8
(JUMP-CP 5 or 8 channels, So2Sat 18, Camelyon 3) weights through `hubconf.py`.

| variant | params (1000 classes, 3 channels) | MACs at 224 (3 channels) | top-1 (IN-1k) |
|---|---|---|---|
| ChannelViT-T/16 (`vl_channelvit_tiny_patch16`) | 5,619,688 | 4.75G | not published |
| ChannelViT-S/16 (`vl_channelvit_small_patch16`) | 21,855,208 | 15.76G | paper Table 1 (not checked here) |
| ChannelViT-S/8 (`vl_channelvit_small_patch8`) | 22,007,272 | 101.05G | not published |
| ChannelViT-B/16 (`vl_channelvit_base_patch16`) | 86,176,744 | 56.54G | not published |

Parameter counts equal the official constructors' (`channelvit_tiny/small/base(patch_size=..., num_classes=1000)`);
they grow by embed_dim per extra input channel. MACs are `vitlab.profiling.count_flops` (attention counted): with C
channels a ChannelViT runs a ViT on C times the tokens, so 3-channel ChannelViT-S/16 costs about 3x ViT-S/16 in the
linear layers and 9x in attention.

Differences from the official file, none of which changes the function:
  * the shared projection is `nn.Conv2d(1, D, p, stride=p)` over the (B * C) single-channel images (official:
    `nn.Conv3d(1, D, (1, p, p))`, the same weights with one more unit axis; `checkpoint_filter_fn` squeezes it), so
    vitlab's quantizers and the contract see an ordinary first conv;
  * the channel embedding is a (in_chans, D) parameter `patch_embed.channel_embed` (official: (1, D, C, 1, 1) in
    `channel_vit.py`, `channel_embed.weight` of an nn.Embedding in `hcs_channel_vit.py`; the filter takes both);
  * HCS draws from torch's generator (official: Python's `random`), so `torch.manual_seed` fixes it, and keeps the
    sampled channels in their input order (official: random order; the network is invariant to the order of the
    channel tokens, as each carries its own channel and position embeddings);
  * the official `drop_rate` (dropout after the position embedding and in every MLP / projection) is timm's
    `pos_drop_rate` + `proj_drop_rate` here; timm's `drop_rate` is head dropout, which the official backbone lacks;
    `drop_path_rate` defaults to 0 (official configs: 0.1 for training).

Position embedding, kept exactly as the official code computes it: the table is resampled in every forward with
DINO's `interpolate_pos_encoding` (bicubic, `scale_factor = (grid + 0.1) / grid_0`). That resampling is not the
identity even at the training resolution (PyTorch maps coordinates by the given scale, not the output size, so
the table is shifted and smoothed by up to ~0.1 of a patch), and the official code skips it only when the sequence
length equals the table's, i.e. for a single channel at the native grid. The released weights were trained through
this path, so `channel_pos_embed` reproduces it (with one exception: the official length test also passes, wrongly,
when C * h * w happens to equal the native h0 * w0 for C > 1, which would add a table of the wrong grid; here only
C == 1 at the native grid skips the resampling). Any input size divisible by the patch size is accepted.

Other input channels: the projection sees one channel at a time, so `in_chans` only sizes the channel embedding.
`checkpoint_filter_fn` adapts a checkpoint for C channels to `in_chans`: one channel gets the mean of the C
embeddings (its tokens are then the mean of the C tokens an image with C equal channels would give), more or
fewer channels take the source embeddings cyclically.

Features: `forward_intermediates` / `features_only` give each block's tokens as NLC, or as an NCHW map whose
C * D channels stack the D features of each input channel's token at that position (nothing is pooled away).

Checked against (tests/models/test_zoo_channelvit.py): the official `channel_vit.py` and `hcs_channel_vit.py` run locally
on a tiny 5-channel configuration, committed as a fixture in the official key layout and loaded through
`checkpoint_filter_fn`: logits within 1e-4 on all five channels, on a 3-of-5 and a 1-of-5 channel subset, at a
non-square input size, with per-image channel indices, and on a train-mode batch whose channels the official HCS
drew; exact parameter counts of the official constructors (tiny / small / base at patch 16 and 8, the 5-channel
JUMP-CP backbone); MACs of ChannelViT-T/16 (the same counter gives the same on the official model); HCS's token
counts in train mode and its distribution (uniform over the number of channels).

    >>> import timm, torch, vitlab.models
    >>> model = timm.create_model("vl_test_channelvit", num_classes=10).eval()   # 5 input channels
    >>> model(torch.randn(1, 5, 32, 32)).shape
    torch.Size([1, 10])
    >>> model(torch.randn(1, 3, 32, 32), channels=[0, 2, 4]).shape
    torch.Size([1, 10])
"""
import re
from functools import partial
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import VisionTransformer

from ._builder import build_vitlab_model, imagenet_cfg

__all__ = ["ChannelViT", "ChannelPatchEmbed", "sample_channel_subset", "channel_pos_embed", "checkpoint_filter_fn",
           "vl_channelvit_tiny_patch16", "vl_channelvit_small_patch16", "vl_channelvit_small_patch8",
           "vl_channelvit_base_patch16", "vl_test_channelvit"]

Channels = Optional[Union[Sequence[int], torch.Tensor]]


# --- the math: pure tensor functions ----------------------------------------------------------------------

def sample_channel_subset(num_channels: int, generator: Optional[torch.Generator] = None,
                          device: Optional[torch.device] = None) -> torch.Tensor:
    """Hierarchical Channel Sampling: k ~ U{1..C}, then k of the C channels uniformly; sorted indices, shape (k,)."""
    k = int(torch.randint(1, num_channels + 1, (1,), generator=generator))
    return torch.randperm(num_channels, generator=generator)[:k].sort().values.to(device)


def channel_pos_embed(table: torch.Tensor, native_grid: Tuple[int, int], grid: Tuple[int, int],
                      num_channels: int) -> torch.Tensor:
    """The patch position embedding (1, h0*w0, D) for a (h, w) grid of `num_channels` channels: (1, h*w, D).

    As the official (DINO) `interpolate_pos_encoding`: bicubic with scale factor (grid + 0.1) / native grid, which
    resamples even at the native grid, skipped only for one channel at the native grid.
    """
    grid = (int(grid[0]), int(grid[1]))  # Python numbers: under tracing (export) the table is fixed per input size
    if num_channels == 1 and grid == tuple(native_grid):
        return table
    D = table.shape[-1]
    image = table.reshape(1, native_grid[0], native_grid[1], D).permute(0, 3, 1, 2)  # (1, D, h0, w0)
    scale = ((grid[0] + 0.1) / native_grid[0], (grid[1] + 0.1) / native_grid[1])
    image = F.interpolate(image, scale_factor=scale, mode="bicubic")  # (1, D, h, w)
    return image.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], D)


# --- modules ----------------------------------------------------------------------------------------------

class ChannelPatchEmbed(nn.Module):
    """Per-channel patch embedding: (B, C', H, W) -> (B, C', H/p, W/p, D), one shared 1-channel projection plus a
    learned embedding per channel. `channels` names which of the `in_chans` channels x holds (default: all, in
    order); with `hcs`, train mode keeps a random subset of them (`sample_channel_subset`). Takes the place of timm's
    PatchEmbed (same constructor arguments); `num_patches` counts the tokens of all `in_chans` channels."""

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: Union[int, Tuple[int, int]] = 16,
            in_chans: int = 3,
            embed_dim: int = 768,
            bias: bool = True,
            dynamic_img_pad: bool = False,
            hcs: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if dynamic_img_pad or not bias:
            raise ValueError("ChannelPatchEmbed supports neither dynamic_img_pad nor a bias-free projection")
        self.patch_size = to_2tuple(patch_size)
        self.num_channels = in_chans  # rows of the channel embedding; the projection itself takes one channel
        self.hcs = hcs
        self.proj = nn.Conv2d(1, embed_dim, self.patch_size, stride=self.patch_size, device=device, dtype=dtype)
        self.channel_embed = nn.Parameter(torch.empty(in_chans, embed_dim, device=device, dtype=dtype))
        trunc_normal_(self.channel_embed, std=0.02)
        self.set_input_size(img_size)

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        if patch_size is not None and to_2tuple(patch_size) != self.patch_size:
            raise ValueError(f"ChannelPatchEmbed cannot change its patch size {self.patch_size} to {patch_size}")
        if img_size is not None:
            self.img_size = to_2tuple(img_size)
            self.grid_size = self.dynamic_feat_size(self.img_size)
            self.num_patches = self.num_channels * self.grid_size[0] * self.grid_size[1]

    def feat_ratio(self, as_scalar: bool = True):
        return self.patch_size[0] if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size: Tuple[int, int]) -> Tuple[int, int]:
        return img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1]

    def _channel_index(self, num_channels: int, channels: Channels, device: torch.device) -> torch.Tensor:
        """Channel indices (C',) or (B, C') for an input holding `num_channels` channels."""
        if channels is None:
            if num_channels != self.num_channels:
                raise ValueError(f"the input has {num_channels} channels and the model in_chans={self.num_channels}; "
                                 "pass channels=[...] naming which of the model's channels the input holds")
            return torch.arange(num_channels, device=device)
        index = torch.as_tensor(channels, dtype=torch.long, device=device)
        if index.shape[-1] != num_channels or index.ndim not in (1, 2):
            raise ValueError(f"channels {tuple(index.shape)} must list one index per input channel ({num_channels}), "
                             "as (C,) or (B, C)")
        return index

    def forward(self, x: torch.Tensor, channels: Channels = None) -> torch.Tensor:
        B, C, H, W = x.shape
        ph, pw = self.patch_size
        if H % ph or W % pw:
            raise ValueError(f"input size {(H, W)} is not divisible by the patch size {self.patch_size}")
        index = self._channel_index(C, channels, x.device)
        if self.training and self.hcs:
            keep = sample_channel_subset(C, device=x.device)  # (k,)
            x, index, C = x.index_select(1, keep), index.index_select(-1, keep), keep.numel()
        tokens = self.proj(x.reshape(B * C, 1, H, W))  # (B*C, D, h, w)
        tokens = tokens.unflatten(0, (B, C)).permute(0, 1, 3, 4, 2)  # (B, C, h, w, D)
        embed = self.channel_embed[index]  # (C, D) or (B, C, D)
        embed = embed.expand(B, -1, -1) if embed.ndim == 2 else embed
        return tokens + embed[:, :, None, None, :]


class ChannelViT(VisionTransformer):
    """timm VisionTransformer over (channel, patch) tokens: `ChannelPatchEmbed` as patch embedding and one position
    embedding per patch shared by all channels. `forward(x, channels=None)` takes any subset of `in_chans`."""

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "token",
            embed_dim: int = 768,
            depth: int = 12,
            num_heads: int = 12,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            hcs: bool = False,
            drop_rate: float = 0.0,
            pos_drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            norm_eps: float = 1e-6,
            weight_init: str = "",
            device=None,
            dtype=None,
    ):
        super().__init__(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
            global_pool=global_pool, embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias, class_token=True, pos_embed="learn", drop_rate=drop_rate, pos_drop_rate=pos_drop_rate,
            proj_drop_rate=proj_drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate,
            weight_init=weight_init, embed_layer=partial(ChannelPatchEmbed, hcs=hcs),
            norm_layer=partial(nn.LayerNorm, eps=norm_eps), device=device, dtype=dtype,
        )
        grid = self.patch_embed.grid_size
        # one entry per patch (shared by the channels) plus the class token's
        self.pos_embed = nn.Parameter(torch.empty(1, grid[0] * grid[1] + 1, embed_dim, device=device, dtype=dtype))
        trunc_normal_(self.pos_embed, std=0.02)
        self.dynamic_img_size = True  # any input size divisible by the patch: the table is resampled per forward
        for info in self.feature_info:
            info["num_chs"] = in_chans * embed_dim  # NCHW intermediates stack the channels' tokens

    def init_weights(self, mode: str = "", needs_reset: bool = True) -> None:
        super().init_weights(mode, needs_reset)
        trunc_normal_(self.cls_token, std=0.02)  # official init (timm's ViT default is normal, std 1e-6)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w, D) channel tokens -> (B, 1 + C*h*w, D) with the class token first, position embeddings added."""
        B, C, h, w, D = x.shape
        table = channel_pos_embed(self.pos_embed[:, 1:], self.patch_embed.grid_size, (h, w), C)  # (1, h*w, D)
        x = (x + table.reshape(1, 1, h, w, D)).reshape(B, C * h * w, D)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1)
        return self.pos_drop(torch.cat([cls, x], dim=1))

    def _embed(self, x: torch.Tensor, channels: Channels) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
        """Token sequence (B, 1 + C*h*w, D) and its (C, h, w)."""
        x = self.patch_embed(x, channels)  # (B, C, h, w, D)
        shape = tuple(x.shape[1:4])
        return self.norm_pre(self.patch_drop(self._pos_embed(x))), shape

    def forward_features(self, x: torch.Tensor, channels: Channels = None) -> torch.Tensor:
        x, _ = self._embed(x, channels)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor, channels: Channels = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, channels))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
            channels: Channels = None,
    ):
        """Block outputs: NLC token sequences (class token split off), or NCHW maps (B, C*D, h, w) whose channels
        stack the D features of each input channel's token at that position."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x, (C, h, w) = self._embed(x, channels)
        B = x.shape[0]
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, blk in enumerate(blocks):
            x = blk(x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        prefix = [y[:, :self.num_prefix_tokens] for y in intermediates]
        intermediates = [y[:, self.num_prefix_tokens:] for y in intermediates]
        if output_fmt == "NCHW":
            # (B, C*h*w, D) -> (B, C, h, w, D) -> (B, C, D, h, w) -> (B, C*D, h, w)
            intermediates = [y.reshape(B, C, h, w, -1).permute(0, 1, 4, 2, 3).reshape(B, -1, h, w)
                             for y in intermediates]
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates


# --- official checkpoints -------------------------------------------------------------------------------------

def _unwrap(state_dict: dict) -> dict:
    """The backbone weights of a checkpoint: a bare state dict (hubconf), {'state_dict' | 'model': ...}, the
    supervised Lightning module's 'backbone.' / 'classifier.' (-> 'head.'), DDP's 'module.'."""
    for key in ("state_dict", "model"):
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
            break
    out = {}
    for key, value in state_dict.items():
        key = re.sub(r"^(module\.)?(backbone\.)?", "", key)
        out[re.sub(r"^classifier\.", "head.", key)] = value
    return out


def _adapt_channels(embed: torch.Tensor, in_chans: int) -> torch.Tensor:
    """(C, D) channel embeddings -> (in_chans, D): the mean for one channel, else the C rows cyclically."""
    if embed.shape[0] == in_chans:
        return embed
    if in_chans == 1:
        return embed.mean(0, keepdim=True)
    return embed[torch.arange(in_chans) % embed.shape[0]]


def checkpoint_filter_fn(state_dict: dict, model: ChannelViT) -> dict:
    """Official ChannelViT checkpoint (`channel_vit.py` or `hcs_channel_vit.py` layout, or a vitlab one) -> this
    model's state dict.

    Squeezes the Conv3d projection to a Conv2d, turns the channel embedding ((1, D, C, 1, 1) or an nn.Embedding's
    (C, D) `.weight`) into (C, D), adapts it to `model.in_chans` (`_adapt_channels`) and resamples `pos_embed` to the
    model's grid. The identity on a vitlab state dict for the same configuration.
    """
    out = {}
    for key, value in _unwrap(state_dict).items():
        if key == "patch_embed.channel_embed.weight":  # hcs_channel_vit.py: nn.Embedding
            key = "patch_embed.channel_embed"
        elif key == "patch_embed.channel_embed" and value.ndim == 5:  # channel_vit.py: (1, D, C, 1, 1)
            value = value[0, :, :, 0, 0].t()
        elif key == "patch_embed.proj.weight" and value.ndim == 5:  # Conv3d (D, 1, 1, p, p)
            value = value.squeeze(2)
        out[key] = value
    if "patch_embed.channel_embed" in out:
        out["patch_embed.channel_embed"] = _adapt_channels(out["patch_embed.channel_embed"], model.in_chans)
    pos_embed = out.get("pos_embed")
    if pos_embed is not None and pos_embed.shape != model.pos_embed.shape:
        out["pos_embed"] = resample_abs_pos_embed(pos_embed, new_size=model.patch_embed.grid_size,
                                                  num_prefix_tokens=1, interpolation="bicubic", antialias=False)
    return out


# --- registry -------------------------------------------------------------------------------------------------

def _cfg(**kwargs) -> dict:
    return imagenet_cfg(**{
        "first_conv": "patch_embed.proj", "paper_ids": "arXiv:2309.16108",
        "origin_url": "https://github.com/insitro/ChannelViT", "license": "apache-2.0", **kwargs,
    })


default_cfgs = generate_default_cfgs({
    "vl_channelvit_tiny_patch16": _cfg(),
    "vl_channelvit_small_patch16": _cfg(),
    "vl_channelvit_small_patch8": _cfg(),
    "vl_channelvit_base_patch16": _cfg(),
    "vl_test_channelvit": _cfg(input_size=(5, 32, 32), num_classes=10, mean=(0.5,) * 5, std=(0.5,) * 5),
})


def _create_channelvit(variant: str, pretrained: bool = False, **kwargs) -> ChannelViT:
    out_indices = min(3, kwargs.get("depth", 12))  # features_only: the last three blocks, as timm's ViTs
    return build_vitlab_model(ChannelViT, variant, pretrained, filter_fn=checkpoint_filter_fn,
                              default_out_indices=out_indices, **kwargs)


@register_model
def vl_channelvit_tiny_patch16(pretrained: bool = False, **kwargs) -> ChannelViT:
    """ChannelViT-T/16 (Bao et al., 2024): 5,619,688 params (3 channels), 4.75 GMACs at 224."""
    arch = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_channelvit("vl_channelvit_tiny_patch16", pretrained, **dict(arch, **kwargs))


@register_model
def vl_channelvit_small_patch16(pretrained: bool = False, **kwargs) -> ChannelViT:
    """ChannelViT-S/16 (Bao et al., 2024): 21,855,208 params (3 channels), 15.76 GMACs at 224."""
    arch = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_channelvit("vl_channelvit_small_patch16", pretrained, **dict(arch, **kwargs))


@register_model
def vl_channelvit_small_patch8(pretrained: bool = False, **kwargs) -> ChannelViT:
    """ChannelViT-S/8 (Bao et al., 2024): 22,007,272 params (3 channels), 101.05 GMACs at 224."""
    arch = dict(patch_size=8, embed_dim=384, depth=12, num_heads=6)
    return _create_channelvit("vl_channelvit_small_patch8", pretrained, **dict(arch, **kwargs))


@register_model
def vl_channelvit_base_patch16(pretrained: bool = False, **kwargs) -> ChannelViT:
    """ChannelViT-B/16 (Bao et al., 2024): 86,176,744 params (3 channels), 56.54 GMACs at 224."""
    arch = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_channelvit("vl_channelvit_base_patch16", pretrained, **dict(arch, **kwargs))


@register_model
def vl_test_channelvit(pretrained: bool = False, **kwargs) -> ChannelViT:
    """Tiny ChannelViT for tests: 5 channels, width 48, 2 blocks, patch 16 at 32 px (5 x 2 x 2 tokens + class)."""
    arch = dict(img_size=32, patch_size=16, embed_dim=48, depth=2, num_heads=3)
    return _create_channelvit("vl_test_channelvit", pretrained, **dict(arch, **kwargs))
