"""ECO-M2F (Yao et al., 2024, "Efficient Transformer Encoders for Mask2Former-style models"): a Mask2Former whose
pixel-decoder encoder exits early, after as many deformable layers as a per-image gate asks for.

Built on HF transformers' `Mask2FormerForUniversalSegmentation` (its modules and weights, unchanged): the six
`Mask2FormerPixelDecoderEncoderLayer`s of `model.pixel_level_module.decoder.encoder` are what exits early. The
paper's three steps:

1. Early-exit training: the decoder (one, shared by every exit) runs on the output of encoder layer k for every
   k = 1..K and the mask losses of all exits are summed. `EcoMask2Former.forward` in training mode returns exit K
   (with its decoder aux outputs) as the output and every earlier exit's final decoder output in `"aux"`, so the
   shared `MaskCriterion` sums the losses over k (deep supervision of the decoder layers on exit K only, to keep
   a CPU step at 9 matched losses instead of K x decoder layers). The paper weighs exit k by an alpha_k that grows
   with k ("weighted stochastic depth"); `exit_loss_weights` gives such weights for a caller that scales each
   exit's loss itself (the engine sums them evenly).
2. The derived dataset: per training image, the PQ q_k of each exit; its ideal depth is argmax_k u(k) with the
   paper's utility u(k) = q_k - beta * k (`ideal_depths`).
3. The gate (`ExitGate`, official `mask2former/modeling/pixel_decoder/gating.py` at GYeow/ECO-M2F@291f1e1): the
   mean over the coarsest level's encoder-input tokens (the projected backbone map, before any encoder layer), one
   linear layer to K logits, trained with cross-entropy on the ideal depths (`fit_gate`). At inference each image
   runs argmax + 1 encoder layers: layer i runs on the sub-batch of images whose depth exceeds i.

Deviation: the official gate chooses among the last 5 of 6 depths (exits 2..6, `NUM_GATES: 4`); ours among all K.
At full depth the output is bit-identical to the unmodified HF model's; at depth k it equals an HF model whose
encoder has the same first k layers (tests/dense/test_dense_eco_m2f.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .heads import HeadError, register_model_head

__all__ = ["scene_config", "EarlyExitEncoder", "ExitGate", "EcoMask2Former", "build_eco_m2f", "ideal_depths",
           "fit_gate", "exit_loss_weights", "SCENE_SWIN_HF"]

# HF Swin sized for 64 x 64 one-channel scenes: patch 4 -> stage strides 4/8/16/32 (Mask2Former's), window 4,
# widths 24/48/96/192; the encoder sees the stride 8/16/32 maps (8x8 + 4x4 + 2x2 = 84 tokens).
SCENE_SWIN_HF = dict(image_size=64, patch_size=4, num_channels=1, embed_dim=24, depths=[1, 1, 2, 1],
                     num_heads=[1, 2, 4, 8], window_size=4, mlp_ratio=2.0,
                     out_features=["stage1", "stage2", "stage3", "stage4"])


def scene_config(backbone_name: str = "hf-swin", num_classes: int = 11, encoder_layers: int = 6, dim: int = 32,
                 decoder_layers: int = 4, num_queries: int = 16, heads: int = 4, in_chans: int = 1):
    """A tiny `Mask2FormerConfig` for 64 px scenes: HF's Swin (`SCENE_SWIN_HF`) or a timm / vitlab model with a
    feature pyramid through HF's `TimmBackboneConfig`; `num_classes` K (things + background, no "no object")."""
    from transformers import Mask2FormerConfig, SwinConfig, TimmBackboneConfig

    if backbone_name in ("hf-swin", "swin"):
        backbone, strides = SwinConfig(**{**SCENE_SWIN_HF, "num_channels": in_chans}), [4, 8, 16, 32]
    else:
        backbone, strides = TimmBackboneConfig(backbone=backbone_name, num_channels=in_chans,
                                               out_indices=[0, 1, 2, 3]), _timm_strides(backbone_name, in_chans)
    if dim % 32:
        raise HeadError(f"eco-m2f: dim={dim} must be a multiple of 32 (HF's pixel decoder uses GroupNorm(32, dim))")
    return Mask2FormerConfig(
        backbone_config=backbone, feature_size=dim, mask_feature_size=dim, hidden_dim=dim,
        encoder_feedforward_dim=2 * dim, dim_feedforward=4 * dim, encoder_layers=encoder_layers,
        decoder_layers=decoder_layers, num_attention_heads=heads, num_queries=num_queries,
        num_labels=num_classes, feature_strides=strides, common_stride=strides[0])


def _timm_strides(name: str, in_chans: int) -> list[int]:
    """The four stage strides of timm model `name` (features_only), refusing one without a pyramid."""
    from ..checkpoint import create_model

    try:
        info = create_model(name, features_only=True, in_chans=in_chans, out_indices=(0, 1, 2, 3)).feature_info
    except Exception as e:  # noqa: BLE001 - timm raises several types for models without features_only
        raise HeadError(f"eco-m2f supports backbones with four pyramid stages (hf-swin: HF's Swin sized for 64 px "
                        f"scenes; timm convnext_*), got {name!r} ({e}): use --model hf-swin") from None
    strides = info.reduction()
    if len(strides) != 4 or any(b != 2 * a for a, b in zip(strides, strides[1:])):
        raise HeadError(f"eco-m2f supports backbones with four stages of strides rising x2 (hf-swin, timm "
                        f"convnext_*); {name!r} has strides {strides}: use --model hf-swin")
    return strides


def exit_loss_weights(num_exits: int) -> Tensor:
    """alpha_k proportional to k, summing to 1: the paper's loss weights growing with the exit's depth."""
    k = torch.arange(1, num_exits + 1, dtype=torch.float32)
    return k / k.sum()


@dataclass
class ExitState:
    """Per-forward state of the encoder: the depth to run (None: all layers; an int; or (B,) per image) in, the
    hidden state after every layer out."""

    depths: int | Tensor | None = None
    hidden_states: list[Tensor] = field(default_factory=list)


class EarlyExitEncoder(nn.Module):
    """HF's `Mask2FormerPixelDecoderEncoderOnly` that stops after `state.depths` layers (per image if a tensor).

    It holds the HF encoder's own layers (same state-dict keys) and calls each `Mask2FormerPixelDecoderEncoderLayer`
    as HF's encoder loop does; an image whose depth is <= i skips layer i (the layer runs on the others only).
    """

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.layers = encoder.layers
        self.get_reference_points = encoder.get_reference_points
        self.state = ExitState()

    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor, position_embeddings: Tensor,
                spatial_shapes_list: list[tuple[int, int]], level_start_index: Tensor, valid_ratios: Tensor,
                **unused):
        from transformers.modeling_outputs import BaseModelOutput

        reference = self.get_reference_points(spatial_shapes_list, valid_ratios, device=inputs_embeds.device)
        depths = self.state.depths
        run = len(self.layers) if depths is None else depths if isinstance(depths, int) else int(depths.max())
        hidden, states = inputs_embeds, []   # (B, L, C), L tokens over the 3 levels
        for i, layer in enumerate(self.layers[:run]):
            if isinstance(depths, Tensor) and not bool((depths > i).all()):
                idx = (depths > i).nonzero().flatten()   # the images still running
                sub = layer(hidden[idx], attention_mask[idx], position_embeddings=position_embeddings[idx],
                            reference_points=reference[idx], spatial_shapes_list=spatial_shapes_list,
                            level_start_index=level_start_index)[0]
                hidden = hidden.index_copy(0, idx, sub)
            else:
                hidden = layer(hidden, attention_mask, position_embeddings=position_embeddings,
                               reference_points=reference, spatial_shapes_list=spatial_shapes_list,
                               level_start_index=level_start_index)[0]
            states.append(hidden)
        self.state.hidden_states = states
        return BaseModelOutput(last_hidden_state=hidden)


class ExitGate(nn.Module):
    """ECO-M2F's gating network: mean of the coarsest level's projected backbone tokens -> Linear -> K logits
    (logit j: run j + 1 encoder layers). Zero bias as in the official `GatingFunction`."""

    def __init__(self, dim: int, num_exits: int):
        super().__init__()
        self.head = nn.Linear(dim, num_exits)
        nn.init.zeros_(self.head.bias)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.head(pooled)   # (B, K)


class EcoMask2Former(nn.Module):
    """HF Mask2Former with an early-exit encoder and a per-image gate: `image -> {"pred_logits", "pred_masks",
    "aux", "depths"}` (mask classification, K + 1 logits, masks at the finest pixel-decoder stride).

    `depth` chooses how many encoder layers run: None gives the gate's choice per image in eval mode (all exits in
    training mode), an int a fixed depth for every image.
    """

    # read by vitlab.quant: one static graph is what calibration observes and int8 engines trace; this has many
    dynamic_graph = ("its encoder runs a per-image number of layers (the gate), so calibration does not observe "
                     "every layer and an int8 engine traces one depth")

    def __init__(self, config, depth: int | None = None):
        from transformers import Mask2FormerForUniversalSegmentation

        super().__init__()
        self.m2f = Mask2FormerForUniversalSegmentation(config)
        decoder = self.m2f.model.pixel_level_module.decoder
        self.encoder = EarlyExitEncoder(decoder.encoder)
        decoder.encoder = self.encoder
        self.num_exits = config.encoder_layers
        self.gate = ExitGate(config.feature_size, self.num_exits)
        self.depth = depth

    def backbone_maps(self, image: Tensor) -> list[Tensor]:
        """The backbone's stage maps (NCHW, finest first), as HF's pixel-level module reads them."""
        return list(self.m2f.model.pixel_level_module.encoder(image).feature_maps)

    def gate_input(self, features: list[Tensor]) -> Tensor:
        """(B, C): the coarsest map after the pixel decoder's input projection (the encoder's first-level tokens),
        averaged over its pixels: what the official gate reads."""
        return self.m2f.model.pixel_level_module.decoder.input_projections[0](features[-1]).mean((2, 3))

    def decode(self, features: list[Tensor], hidden: Tensor | None = None) -> dict:
        """HF's pixel decoder (from the encoder, or from given encoder tokens `hidden`) and transformer decoder +
        class head, as `Mask2FormerModel.forward` / `Mask2FormerForUniversalSegmentation.forward` compose them."""
        from transformers.modeling_outputs import BaseModelOutput

        model = self.m2f.model
        encoded = None if hidden is None else BaseModelOutput(last_hidden_state=hidden)
        pixels = model.pixel_level_module.decoder(features, encoder_outputs=encoded)
        out = model.transformer_module(multi_scale_features=pixels.multi_scale_features,
                                       mask_features=pixels.mask_features, output_hidden_states=True)
        logits = [self.m2f.class_predictor(h.transpose(0, 1)) for h in out.intermediate_hidden_states]  # (B, Q, K+1)
        masks = out.masks_queries_logits                                                               # (B, Q, h, w)
        return {"pred_logits": logits[-1], "pred_masks": masks[-1],
                "aux": [{"pred_logits": c, "pred_masks": m} for c, m in zip(logits[:-1], masks[:-1])]}

    def exits(self, image: Tensor) -> list[dict]:
        """The outputs of every exit k = 1..K (the encoder runs once; the decoder once per exit)."""
        features = self.backbone_maps(image)
        self.encoder.state = ExitState(depths=None)
        last = self.decode(features)
        hidden = self.encoder.state.hidden_states
        return [self.decode(features, h) for h in hidden[:-1]] + [last]

    def forward(self, image: Tensor) -> dict:
        if self.training and self.depth is None:
            outs = self.exits(image)
            early = [{k: out[k] for k in ("pred_logits", "pred_masks")} for out in outs[:-1]]
            return {**outs[-1], "aux": early + outs[-1]["aux"]}
        features = self.backbone_maps(image)
        if self.depth is None:
            depths = self.gate(self.gate_input(features)).argmax(-1) + 1   # (B,) layers to run
        else:
            depths = torch.full((image.shape[0],), self.depth, dtype=torch.long, device=image.device)
        self.encoder.state = ExitState(depths=depths if self.depth is None else self.depth)
        return {**self.decode(features), "depths": depths}


def ideal_depths(quality: Tensor, beta: float) -> Tensor:
    """The derived dataset's labels: per image argmax_k (q_k - beta * k), k = 1..K, as depths 1..K.

    Args:
        quality: (N, K) per-image PQ of exit k (0-1).
    """
    k = torch.arange(1, quality.shape[1] + 1, dtype=quality.dtype)
    return (quality - beta * k).argmax(1) + 1


def fit_gate(gate: ExitGate, pooled: Tensor, depths: Tensor, steps: int = 300, lr: float = 1e-2,
             weight_decay: float = 1e-4) -> ExitGate:
    """Train `gate` on (pooled gate inputs (N, C), ideal depths (N,) in 1..K) with cross-entropy, full batch AdamW;
    the inputs are standardised into the linear layer's weights so their scale does not matter."""
    mean, std = pooled.mean(0), pooled.std(0).clamp_min(1e-6)
    head = nn.Linear(pooled.shape[1], gate.head.out_features)
    nn.init.zeros_(head.weight), nn.init.zeros_(head.bias)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    x = (pooled - mean) / std
    for _ in range(steps):
        loss = F.cross_entropy(head(x), depths - 1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():   # head((p - mean) / std) == (W / std) p + (b - W mean / std)
        gate.head.weight.copy_(head.weight / std)
        gate.head.bias.copy_(head.bias - (head.weight / std) @ mean)
    return gate


def build_eco_m2f(backbone_name: str, num_classes: int, encoder_layers: int = 6, dim: int = 32,
                  decoder_layers: int = 4, num_queries: int = 16, heads: int = 4,
                  depth: int = 0) -> EcoMask2Former:
    """ECO-M2F for 64 px one-channel scenes on HF's Mask2Former (`backbone_name`: hf-swin, or a timm / vitlab model
    with four pyramid stages); `depth` > 0 fixes the encoder depth, 0 lets the gate choose per image."""
    if not 1 <= encoder_layers or not 0 <= depth <= encoder_layers:
        raise HeadError(f"eco-m2f: depth={depth} must be in 0..encoder_layers={encoder_layers} (0: the gate chooses)")
    config = scene_config(backbone_name, num_classes, encoder_layers, dim, decoder_layers, num_queries, heads)
    return EcoMask2Former(config, depth=depth or None)


register_model_head("eco-m2f", tasks=("panoptic",), build=build_eco_m2f)
