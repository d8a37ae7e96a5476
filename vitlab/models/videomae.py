"""VideoMAE (Tong et al., "VideoMAE: Masked Autoencoders are Data-Efficient Learners for Self-Supervised Video
Pre-Training", NeurIPS 2022) on clips (B, C, T, H, W).

The encoder is a plain ViT over tubelet tokens (a Conv3d whose kernel equals its stride, as ViViT's tubelet
embedding) with a fixed sinusoidal position table, no class token, and a head on the mean of the final tokens after
`fc_norm` (official `modeling_finetune.VisionTransformer` with `use_mean_pooling`; github.com/MCG-NJU/VideoMAE). Its
q and v projections have biases and k has none; a bias on k adds q.b_k to every logit of a query's row, which
softmax removes, so timm's fused `qkv` with a bias computes the same attention (the converter zeroes its k part).

Pre-training (`VideoMAEPretrainer`) masks tubes: one random set of `mask_ratio` of the H'W' positions, the same in
every tubelet-frame (official `masking_generator.TubeMaskingGenerator`, ratio 0.9); the encoder sees only the
visible tokens, its output LayerNorm'd (official `PretrainVisionTransformerEncoder.norm`, pre-training only: the
fine-tuning model with mean pooling has no final norm, and transformers' `VideoMAEForPreTraining` with
`use_mean_pooling=True` none at all: `encoder_norm=False`, as its converter builds it); a narrower decoder
(`encoder_to_decoder` without bias, a learned mask token, its own sinusoidal table) reconstructs the masked
tubelets' pixels, each normalised by its own mean and (unbiased) std per channel (`norm_pix_loss`), with an MSE loss
over the masked tubelets only (official `engine_for_pretraining.py`). Without the encoder norm the pre-trained
features carry a large component common to all clips and fine-tuning barely moves from chance
(benchmarks/video_videomae_gain.py).

VideoMAE V2's dual masking (Wang et al., "VideoMAE V2: Scaling Video Masked Autoencoders with Dual Masking",
CVPR 2023; github.com/OpenGVLab/VideoMAEv2 at 29eab1e8a588d1b3ec0cdec7b03a86cca491b74b) also masks the decoder:
`decoder_mask_ratio` > 0 draws a running-cell mask (`running_cell_mask`, official
`masking_generator.RunningCellMaskingGenerator`) and the decoder takes the visible tokens plus mask tokens only at
the positions that mask keeps, predicting those; the loss averages over the kept positions that the encoder masked
(official `engine_for_pretraining.py`: `cal_loss_mask = bool_masked_pos[~decode_masked_pos]`).

`tests/models/test_videomae.py` copies the weights of transformers' `VideoMAEForVideoClassification` and
`VideoMAEForPreTraining` into these modules and compares logits and the pre-training loss.

Published sizes (paper Table 6 / the model zoo): ViT-S/16 with 16 frames, tubelet 2: 22 M parameters, 57 GFLOPs;
ViT-B/16: 87 M, 180 GFLOPs (per view).
"""
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import get_act_layer, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import Block

from ..checkpoint import create_model
from ._builder import build_vitlab_model
from ._convert import register_hf_converter
from .vivit import TubeletEmbed

__all__ = ["VideoMAE", "VideoMAEPretrainer", "sinusoid_table", "tube_mask", "running_cell_mask", "patchify",
           "normalized_patches"]


def sinusoid_table(n_position: int, dim: int) -> torch.Tensor:
    """(n_position, dim) fixed position table of "Attention is all you need": sin on even dims, cos on odd, both at
    angle pos / 10000^(2 (j // 2) / dim) (official `get_sinusoid_encoding_table`, in float64 then float32)."""
    pos = np.arange(n_position, dtype=np.float64)[:, None]
    angle = pos / np.power(10000, 2 * (np.arange(dim) // 2) / dim)[None, :]
    table = np.empty_like(angle)
    table[:, 0::2], table[:, 1::2] = np.sin(angle[:, 0::2]), np.cos(angle[:, 1::2])
    return torch.from_numpy(table).float()


def tube_mask(batch: int, grid: tuple[int, int, int], ratio: float, generator: torch.Generator | None = None
              ) -> torch.Tensor:
    """(B, T'H'W') bool, True = masked: per clip, int(ratio * H'W') positions of the H'W' grid, the same positions in
    every one of the T' tubelet-frames (tokens ordered t-major, as the tubelet embedding flattens them)."""
    t, h, w = grid
    per_frame = h * w
    masked = int(ratio * per_frame)
    if not 0 < masked < per_frame:
        raise ValueError(f"mask ratio {ratio} masks {masked} of {per_frame} positions per frame: it must leave at "
                         "least one position visible and mask at least one")
    ranks = torch.rand(batch, per_frame, generator=generator).argsort(dim=1).argsort(dim=1)
    return (ranks < masked).repeat(1, t)  # (B, T' * H'W')


def running_cell_mask(batch: int, grid: tuple[int, int, int], ratio: float = 0.5,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, T'H'W') bool, True = dropped from the decoder: VideoMAE V2's running-cell decoder mask. A 2x2 cell holds
    the queue [1] * m + [0] * (4 - m) (m = int(4 * ratio) dropped) read cyclically from a pointer; the cell, tiled
    over the H'W' grid, drops the positions reading 1; the pointer starts at a random offset per clip and advances
    one step per tubelet-frame, so the kept positions run through the cell over time (official `Cell`,
    `RunningCellMaskingGenerator`)."""
    t, h, w = grid
    dropped = int(4 * ratio)
    if not 0 < dropped < 4:
        raise ValueError(f"decoder mask ratio {ratio} drops {dropped} of a 2x2 cell's 4 positions: use 0.25, 0.5 "
                         "or 0.75")
    if h % 2 or w % 2:
        raise ValueError(f"running-cell masking tiles 2x2 cells over the token grid; {h}x{w} is not even: choose "
                         "an image size that gives an even number of patches per side")
    queue = torch.arange(4) < dropped                                        # [1] * m + [0] * (4 - m)
    start = torch.randint(4, (batch,), generator=generator)
    ptr = start[:, None] + torch.arange(1, t + 1)                            # (B, T'): run_cell before each frame
    cells = queue[(torch.arange(4) + ptr[..., None]) % 4].reshape(batch, t, 2, 2)
    return cells.repeat(1, 1, h // 2, w // 2).reshape(batch, t * h * w)     # (B, T' * H' * W'), tiled cells


def patchify(clips: torch.Tensor, tubelet: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, T'H'W', kt * kh * kw, C): each tubelet's pixels, tokens in the embedding's order."""
    B, C, T, H, W = clips.shape
    kt, kh, kw = tubelet
    x = clips.reshape(B, C, T // kt, kt, H // kh, kh, W // kw, kw)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # (B, T', H', W', kt, kh, kw, C)
    return x.reshape(B, (T // kt) * (H // kh) * (W // kw), kt * kh * kw, C)


def normalized_patches(clips: torch.Tensor, tubelet: tuple[int, int, int], eps: float = 1e-6) -> torch.Tensor:
    """The reconstruction target of `norm_pix_loss`: each tubelet's pixels minus their mean over the tubelet,
    divided by their unbiased std + eps, per channel; flattened to (B, N, kt * kh * kw * C)."""
    x = patchify(clips, tubelet)
    x = (x - x.mean(dim=-2, keepdim=True)) / (x.var(dim=-2, unbiased=True, keepdim=True).sqrt() + eps)
    return x.flatten(2)


def _blocks(dim: int, depth: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, norm_layer, act_layer,
            drop: float = 0.0, dpr: list[float] | None = None) -> nn.Sequential:
    dpr = dpr or [0.0] * depth
    return nn.Sequential(*[Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=drop,
                                 drop_path=dpr[i], norm_layer=norm_layer, act_layer=act_layer) for i in range(depth)])


class VideoMAE(nn.Module):
    """VideoMAE's ViT encoder with a mean-pooling head (see the module docstring)."""

    def __init__(
            self,
            img_size: int | tuple[int, int] = 224,
            num_frames: int = 16,
            tubelet_size: tuple[int, int, int] = (2, 16, 16),
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            embed_dim: int = 768,
            depth: int = 12,
            num_heads: int = 12,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            act_layer: str = "gelu",
            norm_eps: float = 1e-6,
            head_norm_eps: float = 1e-6,
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if global_pool != "avg":
            raise ValueError(f"global_pool={global_pool!r}: VideoMAE has no class token; it pools with 'avg'")
        self.num_classes, self.global_pool, self.in_chans = num_classes, global_pool, in_chans
        self.num_frames, self.num_prefix_tokens = num_frames, 0
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.patch_embed = TubeletEmbed(img_size, num_frames, tubelet_size, in_chans, embed_dim)
        self.register_buffer("pos_embed", sinusoid_table(self.patch_embed.num_patches, embed_dim)[None],
                             persistent=False)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = _blocks(embed_dim, depth, num_heads, mlp_ratio, qkv_bias, partial(nn.LayerNorm, eps=norm_eps),
                              get_act_layer(act_layer), drop_rate, dpr)
        self.norm = nn.Identity()   # use_mean_pooling: the final norm is fc_norm, after the mean
        self.fc_norm = nn.LayerNorm(embed_dim, eps=head_norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "avg"):
            raise ValueError(f"global_pool={global_pool!r}: VideoMAE pools with 'avg'")
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Clip (B, C, T, H, W) -> tokens (B, N, D); with `mask` (B, N) bool (True = masked, the same count per clip)
        only the visible tokens, in order."""
        x = self.patch_embed(x).flatten(1, 2) + self.pos_embed  # (B, T'H'W', D)
        if mask is not None:
            x = x[~mask].reshape(x.shape[0], -1, x.shape[-1])
        return self.norm(self.blocks(self.pos_drop(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.fc_norm(x.mean(dim=1)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class VideoMAEPretrainer(nn.Module):
    """VideoMAE pre-training around an encoder: tube masking, decoder, normalised-pixel MSE on masked tubelets."""

    def __init__(self, encoder: VideoMAE, decoder_dim: int = 384, decoder_depth: int = 4, decoder_heads: int = 6,
                 decoder_mlp_ratio: float = 4.0, mask_ratio: float = 0.9, norm_eps: float = 1e-6,
                 decoder_norm_eps: float = 1e-6, decoder_mask_ratio: float = 0.0, encoder_norm: bool = True):
        super().__init__()
        if not isinstance(encoder, VideoMAE):
            raise TypeError(f"VideoMAE pre-training needs a VideoMAE encoder (vl_videomae_*), got "
                            f"{type(encoder).__name__}")
        self.encoder, self.mask_ratio, self.decoder_mask_ratio = encoder, mask_ratio, decoder_mask_ratio
        embed = encoder.patch_embed
        kt, kh, kw = embed.tubelet_size
        self.encoder_norm = nn.LayerNorm(encoder.embed_dim, eps=norm_eps) if encoder_norm else nn.Identity()
        self.encoder_to_decoder = nn.Linear(encoder.embed_dim, decoder_dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("decoder_pos_embed", sinusoid_table(embed.num_patches, decoder_dim)[None],
                             persistent=False)
        act = encoder.blocks[0].mlp.act.__class__ if len(encoder.blocks) else nn.GELU
        self.decoder_blocks = _blocks(decoder_dim, decoder_depth, decoder_heads, decoder_mlp_ratio, True,
                                      partial(nn.LayerNorm, eps=norm_eps), act)
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=decoder_norm_eps)
        self.decoder_head = nn.Linear(decoder_dim, kt * kh * kw * encoder.in_chans)
        trunc_normal_(self.mask_token, std=0.02)
        for m in (self.encoder_to_decoder, self.decoder_head, *self.decoder_blocks.modules()):
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    def forward(self, clips: torch.Tensor, mask: torch.Tensor, decode_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Predicted normalised pixels, (B, M, kt * kh * kw * C) in token order: of the masked tubelets, or with
        `decode_mask` (B, N) bool (True = dropped from the decoder) of the tubelets it keeps."""
        decoded = mask if decode_mask is None else ~decode_mask
        x = self.encoder_to_decoder(self.encoder_norm(self.encoder.forward_features(clips, mask)))  # (B, N_vis, Dd)
        B, _, D = x.shape
        pos = self.decoder_pos_embed.expand(B, -1, -1)
        visible = x + pos[~mask].reshape(B, -1, D)
        masked = self.mask_token + pos[decoded].reshape(B, -1, D)
        x = self.decoder_blocks(torch.cat([visible, masked], dim=1))
        return self.decoder_head(self.decoder_norm(x[:, -masked.shape[1]:]))

    def loss(self, clips: torch.Tensor, mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
             decode_mask: torch.Tensor | None = None) -> torch.Tensor:
        """MSE between the predictions and the normalised pixels of the masked tubelets (`mask` drawn with
        `tube_mask` at `mask_ratio` when not given). With dual masking (`decode_mask` given, or drawn with
        `running_cell_mask` when `decoder_mask_ratio` > 0) the decoder predicts the tubelets `decode_mask` keeps and
        the MSE averages over those the encoder did not see."""
        grid = self.encoder.patch_embed.grid_size
        if mask is None:
            mask = tube_mask(clips.shape[0], grid, self.mask_ratio, generator)
        if decode_mask is None and self.decoder_mask_ratio > 0:
            decode_mask = running_cell_mask(clips.shape[0], grid, self.decoder_mask_ratio, generator)
        pred = self(clips, mask, decode_mask)
        decoded = mask if decode_mask is None else ~decode_mask
        with torch.no_grad():
            target = normalized_patches(clips, self.encoder.patch_embed.tubelet_size)
            target = target[decoded].reshape(clips.shape[0], -1, target.shape[-1])
        if decode_mask is None:
            return F.mse_loss(pred, target)
        weight = mask[decoded].reshape(clips.shape[0], -1).to(pred.dtype)     # masked for the encoder, decoded
        return ((pred - target).pow(2).mean(dim=-1) * weight).sum() / weight.sum().clamp(min=1)


def _cfg(input_size: tuple[int, int, int], **kwargs) -> dict:
    return {"num_classes": 1000, "input_size": input_size, "pool_size": None, "crop_pct": 1.0,
            "interpolation": "bilinear", "mean": (0.5,) * input_size[0], "std": (0.5,) * input_size[0],
            "classifier": "head", "first_conv": "patch_embed.proj", **kwargs}


default_cfgs = generate_default_cfgs({
    "vl_videomae_s.untrained": _cfg((3, 224, 224), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                                    num_classes=400),
    "vl_videomae_b.untrained": _cfg((3, 224, 224), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                                    num_classes=400),
    "vl_videomae_mfmnist.untrained": _cfg((1, 32, 32), num_classes=6),
    "vl_test_videomae.untrained": _cfg((1, 32, 32), num_classes=6),
})


def _create(variant: str, pretrained: bool = False, **kwargs) -> VideoMAE:
    return build_vitlab_model(VideoMAE, variant, pretrained, **kwargs)


@register_model
def vl_videomae_s(pretrained: bool = False, **kwargs) -> VideoMAE:
    """VideoMAE ViT-S/16, 16 frames, tubelet 2 (Kinetics-400 fine-tuning head)."""
    arch = dict(num_frames=16, tubelet_size=(2, 16, 16), embed_dim=384, depth=12, num_heads=6, num_classes=400)
    return _create("vl_videomae_s", pretrained, **dict(arch, **kwargs))


@register_model
def vl_videomae_b(pretrained: bool = False, **kwargs) -> VideoMAE:
    """VideoMAE ViT-B/16, 16 frames, tubelet 2 (Kinetics-400 fine-tuning head)."""
    arch = dict(num_frames=16, tubelet_size=(2, 16, 16), embed_dim=768, depth=12, num_heads=12, num_classes=400)
    return _create("vl_videomae_b", pretrained, **dict(arch, **kwargs))


@register_model
def vl_videomae_mfmnist(pretrained: bool = False, **kwargs) -> VideoMAE:
    """A small VideoMAE for moving-fashion-mnist clips (1, 10, 32, 32): width 96, 4 layers, tubelet 2x8x8."""
    arch = dict(img_size=32, num_frames=10, in_chans=1, tubelet_size=(2, 8, 8), embed_dim=96, depth=4,
                num_heads=3, num_classes=6)
    return _create("vl_videomae_mfmnist", pretrained, **dict(arch, **kwargs))


@register_model
def vl_test_videomae(pretrained: bool = False, **kwargs) -> VideoMAE:
    """Tiny VideoMAE for tests: clips (1, 10, 32, 32), 2 layers of width 32."""
    arch = dict(img_size=32, num_frames=10, in_chans=1, tubelet_size=(2, 8, 8), embed_dim=32, depth=2,
                num_heads=2, num_classes=6)
    return _create("vl_test_videomae", pretrained, **dict(arch, **kwargs))


_HF_ACT = {"gelu": "gelu", "gelu_fast": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


def _hf_blocks(hf: dict, prefix: str, depth: int, ours: str) -> dict:
    """transformers VideoMAELayer weights -> timm Block weights (q, k, v fused; k's missing bias is zero)."""
    state = {}
    for i in range(depth):
        p, q = f"{prefix}{i}.", f"{ours}{i}."
        weight = torch.cat([hf.pop(f"{p}attention.attention.{n}.weight") for n in ("query", "key", "value")])
        state[f"{q}attn.qkv.weight"] = weight
        q_bias = hf.pop(f"{p}attention.attention.query.bias", None)
        v_bias = hf.pop(f"{p}attention.attention.value.bias", None)
        if q_bias is not None:
            state[f"{q}attn.qkv.bias"] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
        for old, new in (("attention.output.dense", "attn.proj"), ("layernorm_before", "norm1"),
                         ("layernorm_after", "norm2"), ("intermediate.dense", "mlp.fc1"), ("output.dense", "mlp.fc2")):
            for part in ("weight", "bias"):
                state[f"{q}{new}.{part}"] = hf.pop(f"{p}{old}.{part}")
    return state


@register_hf_converter("videomae")
def _videomae_from_hf(hf_model) -> nn.Module:
    """vitlab VideoMAE with the weights of a transformers `VideoMAEForVideoClassification` (or `VideoMAEModel`:
    no head), or a `VideoMAEPretrainer` from `VideoMAEForPreTraining`. transformers takes (B, T, C, H, W), vitlab
    (B, C, T, H, W); its `fc_norm` and decoder norm use LayerNorm's default eps 1e-5, kept here."""
    config = hf_model.config
    if config.hidden_act not in _HF_ACT:
        raise ValueError(f"hidden_act={config.hidden_act!r} does not convert: use one of {', '.join(_HF_ACT)}")
    if not config.use_mean_pooling:
        raise ValueError("a transformers VideoMAE with use_mean_pooling=False reads token 0 of a model without a "
                         "class token; vitlab's VideoMAE pools with the mean: convert one with use_mean_pooling=True")
    pretraining = hasattr(hf_model, "decoder")
    has_head = hasattr(hf_model, "classifier")
    tubelet = (config.tubelet_size, config.patch_size, config.patch_size)
    arch = dict(img_size=config.image_size, num_frames=config.num_frames, tubelet_size=tubelet,
                in_chans=config.num_channels, num_classes=config.num_labels if has_head else 0,
                embed_dim=config.hidden_size, depth=config.num_hidden_layers, num_heads=config.num_attention_heads,
                mlp_ratio=config.intermediate_size / config.hidden_size, qkv_bias=config.qv_bias,
                act_layer=_HF_ACT[config.hidden_act], norm_eps=config.layer_norm_eps, head_norm_eps=1e-5)
    model = create_model("vl_videomae_b", **arch)
    hf = {k.removeprefix("videomae."): v for k, v in hf_model.state_dict().items()}
    state = {"patch_embed.proj.weight": hf.pop("embeddings.patch_embeddings.projection.weight"),
             "patch_embed.proj.bias": hf.pop("embeddings.patch_embeddings.projection.bias")}
    state.update(_hf_blocks(hf, "encoder.layer.", config.num_hidden_layers, "blocks."))
    if has_head:
        state.update({"fc_norm.weight": hf.pop("fc_norm.weight"), "fc_norm.bias": hf.pop("fc_norm.bias"),
                      "head.weight": hf.pop("classifier.weight"), "head.bias": hf.pop("classifier.bias")})
    else:   # no fine-tuning head: fc_norm stays at its identity init
        state.update({k: v for k, v in model.state_dict().items() if k.startswith("fc_norm.")})
    model.load_state_dict(state, strict=True)
    if not pretraining:
        _no_leftovers(hf, "embeddings.position_embeddings")
        return model
    trainer = VideoMAEPretrainer(model, decoder_dim=config.decoder_hidden_size,
                                 decoder_depth=config.decoder_num_hidden_layers,
                                 decoder_heads=config.decoder_num_attention_heads,
                                 decoder_mlp_ratio=config.decoder_intermediate_size / config.decoder_hidden_size,
                                 norm_eps=config.layer_norm_eps, decoder_norm_eps=1e-5, encoder_norm=False)
    dec = {"encoder_to_decoder.weight": hf.pop("encoder_to_decoder.weight"), "mask_token": hf.pop("mask_token"),
           "decoder_norm.weight": hf.pop("decoder.norm.weight"), "decoder_norm.bias": hf.pop("decoder.norm.bias"),
           "decoder_head.weight": hf.pop("decoder.head.weight"), "decoder_head.bias": hf.pop("decoder.head.bias")}
    dec.update(_hf_blocks(hf, "decoder.decoder_layers.", config.decoder_num_hidden_layers, "decoder_blocks."))
    missing, unexpected = trainer.load_state_dict(dec, strict=False)
    if unexpected or any(not k.startswith("encoder.") for k in missing):
        raise ValueError(f"transformers VideoMAE decoder weights do not fit: missing {missing}, extra {unexpected}")
    _no_leftovers(hf, "embeddings.position_embeddings", "position_embeddings")
    return trainer


def _no_leftovers(hf: dict, *fixed: str) -> None:
    leftover = sorted(k for k in hf if k not in fixed)
    if leftover:
        raise ValueError(f"transformers VideoMAE weights {leftover[:4]} have no place in vitlab's VideoMAE")
