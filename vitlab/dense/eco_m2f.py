"""ECO-M2F (Yao et al., 2024, "Efficient Transformer Encoders for Mask2Former-style models"): a Mask2Former whose
pixel-decoder encoder exits early, after as many deformable layers as a per-image gate asks for.

Built on HF transformers' `Mask2FormerForUniversalSegmentation` (its modules and weights, unchanged): the six
`Mask2FormerPixelDecoderEncoderLayer`s of `model.pixel_level_module.decoder.encoder` are what exits early. The
paper's three steps, read against the official code (GYeow/ECO-M2F@291f1e1, file:line below):

1. Early-exit training: the decoder (one, shared by every exit) runs on the output of encoder layer k for every
   k = 1..K. `EcoMask2Former.forward` in training mode returns exit K (with its decoder aux outputs) as the output,
   every earlier exit's final decoder output in `"aux"`, and in `"loss_weights"` each entry's weight:
   `exit_weights="depth"` (default) weighs exit k's losses by k, unnormalised, as the official
   `losses[k] *= weight_dict[k] * i_exit` does (maskformer_model.py:261-266); `ExitWeightedCriterion` applies them.
   The official step runs one exit per iteration (the gate's argmax, msdeformattn.py:173) where we sum all K, so
   ours is K x the official loss's expectation under a uniform exit; its `i_exit` adds 2 to a depth that already
   counts the 2 ungated layers (the comment "exit at layer 2 when i_exit = 0" shows depth was meant).
   `exit_weights="uniform"` is the plain sum over the exits, the comparison the benchmark runs.
2. The derived dataset: per training image, the PQ q_k (0-1) of each exit; utility u_k = q_k - beta * k
   (`gate_utilities`; maskformer_model.py:403 with beta = `GATING.TRAIN_COEFF`), ideal depth argmax_k u_k
   (`ideal_depths`).
3. The gate (`ExitGate`, official `GatingFunction`, pixel_decoder/gating.py): the mean over the coarsest level's
   encoder-input tokens (the projected backbone map, before any encoder layer; msdeformattn.py:171), one linear
   layer to K logits. `fit_gate` trains it on the derived dataset with the official soft targets by default:
   MSE between softmax(logits) and softmax(u) over the exits, temperature 1 (criterion.py:220,
   maskformer_model.py:251); `target="hard"` is cross-entropy on the ideal depths (the one-hot targets of
   maskformer_model_val.py, which the official code calls "previous method in main paper"). The official code
   takes both softmaxes over dim 0 of (B, exits) tensors, i.e. over the images of a batch: a loss blind to
   per-exit offsets (the gate's bias gets no gradient) and zero at one image per GPU, so we take them over the
   exits, which is that code on each image's (exits,) vector (tests/fixtures/eco_m2f/official_gate.json).
   At inference each image runs argmax + 1 encoder layers: layer i runs on the sub-batch whose depth exceeds i.

Deviations: the official gate chooses among the last 5 of 6 depths (exits 2..6, `NUM_GATES: 4`); ours among all K
(its utilities subtract (k - 1) * beta for exit k, ours k * beta: the same argmax and softmax). Early exits get no
per-decoder-layer deep supervision. At full depth the output is bit-identical to the unmodified HF model's; at
depth k it equals an HF model whose encoder has the same first k layers (tests/dense/test_dense_eco_m2f.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..data.scenes import collate_scenes
from .backbone import Backbone, BackboneError
from .heads import HeadError, register_model_head
from .matching import MaskCriterion, panoptic_inference

__all__ = ["scene_config", "StageBackbone", "stage_backbone", "EarlyExitEncoder", "ExitGate", "EcoMask2Former",
           "ExitWeightedCriterion", "build_eco_m2f", "gate_utilities", "ideal_depths", "soft_gate_targets", "gate_loss",
           "fit_gate", "exit_loss_weights", "exit_predictions", "dataset_pq", "per_image_pq", "calibrate_gate",
           "EXIT_WEIGHTS", "GATE_TARGETS", "SCENE_SWIN_HF"]

EXIT_WEIGHTS = ("depth", "uniform")   # exit k's loss x k (official) / the plain sum over exits
GATE_TARGETS = ("soft", "hard")       # MSE to softmax over exits of the utilities (official) / CE on argmax

# HF Swin sized for 64 x 64 one-channel scenes: patch 4 -> stage strides 4/8/16/32 (Mask2Former's), window 4,
# widths 24/48/96/192; the encoder sees the stride 8/16/32 maps (8x8 + 4x4 + 2x2 = 84 tokens).
SCENE_SWIN_HF = dict(image_size=64, patch_size=4, num_channels=1, embed_dim=24, depths=[1, 1, 2, 1],
                     num_heads=[1, 2, 4, 8], window_size=4, mlp_ratio=2.0,
                     out_features=["stage1", "stage2", "stage3", "stage4"])


def scene_config(backbone_name: str = "hf-swin", num_classes: int = 11, encoder_layers: int = 6, dim: int = 32,
                 decoder_layers: int = 4, num_queries: int = 16, heads: int = 4, in_chans: int = 1,
                 strides: Sequence[int] = (4, 8, 16, 32)):
    """A tiny `Mask2FormerConfig` for 64 px scenes; `num_classes` K (things + background, no "no object").

    `backbone_name` "hf-swin" configures HF's Swin (`SCENE_SWIN_HF`, strides 4/8/16/32); any other backbone is a
    `StageBackbone` that `EcoMask2Former(config, backbone=...)` puts in its place, and `strides` are its four
    stage strides (the finest is the mask features' stride)."""
    from transformers import Mask2FormerConfig, SwinConfig

    if backbone_name not in ("hf-swin", "swin"):
        strides = _check_strides(backbone_name, strides)
    else:
        strides = [4, 8, 16, 32]
    if dim % 32:
        raise HeadError(f"eco-m2f: dim={dim} must be a multiple of 32 (HF's pixel decoder uses GroupNorm(32, dim))")
    return Mask2FormerConfig(
        backbone_config=SwinConfig(**{**SCENE_SWIN_HF, "num_channels": in_chans}), feature_size=dim,
        mask_feature_size=dim, hidden_dim=dim, encoder_feedforward_dim=2 * dim, dim_feedforward=4 * dim,
        encoder_layers=encoder_layers, decoder_layers=decoder_layers, num_attention_heads=heads,
        num_queries=num_queries, num_labels=num_classes, feature_strides=list(strides), common_stride=strides[0])


def _check_strides(name: str, strides: Sequence[int]) -> list[int]:
    strides = [int(s) for s in strides]
    if len(strides) != 4 or any(b != 2 * a for a, b in zip(strides, strides[1:])):
        raise HeadError(f"eco-m2f needs four backbone stages whose strides rise x2 (Mask2Former's pixel decoder); "
                        f"{name!r} gives strides {strides}: use hf-swin, a hierarchical timm / vitlab model (Swin, "
                        f"ConvNeXt, PVT v2, vitlab's vl_* families) or a plain ViT (simple feature pyramid)")
    return strides


class StageBackbone(nn.Module):
    """vitlab's `Backbone` (stage maps of any timm / vitlab model or checkpoint, a plain ViT through the simple
    feature pyramid) with the face of an HF backbone: `.channels`, and `forward(pixel_values)` ->
    `BackboneOutput(feature_maps=...)`, the last four maps, finest first (a ResNet's res2-res5, as Mask2Former
    takes them)."""

    def __init__(self, stages: Backbone):
        super().__init__()
        self.stages = stages
        self.channels = list(stages.channels[-4:])
        self.strides = _check_strides(stages.spec["name"], stages.strides[-4:])

    def forward(self, pixel_values: Tensor, **unused):
        from transformers.modeling_outputs import BackboneOutput

        return BackboneOutput(feature_maps=tuple(self.stages(pixel_values)[-4:]))


def stage_backbone(name: str, in_chans: int = 1, img_size: int = 64,
                   model_kwargs: dict[str, Any] | None = None) -> StageBackbone:
    """`StageBackbone` of a timm / vitlab model name or a vitlab checkpoint folder (its classification weights
    kept), refusing with the families that work when the model has no four-stage pyramid."""
    try:
        stages = Backbone(name, in_chans=in_chans, img_size=img_size, model_kwargs=model_kwargs)
    except BackboneError as e:
        raise HeadError(f"eco-m2f: {e}") from None
    return StageBackbone(stages)


def exit_loss_weights(num_exits: int, mode: str = "depth") -> Tensor:
    """(K,) loss weight of exits 1..K: "depth" k, unnormalised (the official `losses[k] *= ... * i_exit`,
    maskformer_model.py:266); "uniform" ones."""
    if mode not in EXIT_WEIGHTS:
        raise HeadError(f"eco-m2f: exit_weights={mode!r} is not one of {', '.join(EXIT_WEIGHTS)}; write "
                        f"exit_weights=depth (exit k's loss x k, the official code's) or exit_weights=uniform")
    k = torch.arange(1, num_exits + 1, dtype=torch.float32)
    return k if mode == "depth" else torch.ones_like(k)


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
    training mode, with `"loss_weights"`: exit K's weight for the output and each of its decoder aux outputs, exit
    k's for early exit k, by `exit_weights`), an int a fixed depth for every image.
    """

    # read by vitlab.quant: one static graph is what calibration observes and int8 engines trace; this has many
    dynamic_graph = ("its encoder runs a per-image number of layers (the gate), so calibration does not observe "
                     "every layer and an int8 engine traces one depth")

    def __init__(self, config, depth: int | None = None, exit_weights: str = "depth",
                 backbone: StageBackbone | None = None, gate_beta: float = 0.0, gate_scenes: int = 128):
        from transformers import Mask2FormerForUniversalSegmentation
        from transformers.models.mask2former.modeling_mask2former import Mask2FormerPixelDecoder

        super().__init__()
        self.exit_weights = exit_loss_weights(config.encoder_layers, exit_weights).tolist()
        self.m2f = Mask2FormerForUniversalSegmentation(config)
        if backbone is not None:   # in place of HF's Swin: vitlab's stage features, weights as given
            if list(config.feature_strides) != backbone.strides:
                raise HeadError(f"eco-m2f: the config's feature_strides {list(config.feature_strides)} differ from "
                                f"the backbone's strides {backbone.strides}: build the config with "
                                f"scene_config(..., strides=backbone.strides)")
            level = self.m2f.model.pixel_level_module
            level.encoder = backbone
            level.decoder = Mask2FormerPixelDecoder(config, feature_channels=backbone.channels)
            level.decoder.apply(self.m2f._init_weights)   # HF's initialisation of the new pixel decoder
        elif list(config.feature_strides) != [4, 8, 16, 32]:
            raise HeadError(f"eco-m2f: a config for strides {list(config.feature_strides)} needs its backbone: pass "
                            f"backbone=stage_backbone(name), or use build_eco_m2f(name, ...)")
        self.backbone_spec = backbone.stages.spec if backbone is not None else None
        decoder = self.m2f.model.pixel_level_module.decoder
        self.encoder = EarlyExitEncoder(decoder.encoder)
        decoder.encoder = self.encoder
        self.num_exits = config.encoder_layers
        self.gate = ExitGate(config.feature_size, self.num_exits)
        self.depth = depth
        self.gate_beta, self.gate_scenes = gate_beta, gate_scenes

    def finish_training(self, train_set) -> dict[str, float] | None:
        """Called by vitlab's dense engine after the last step: ECO-M2F's steps 2-3 (`calibrate_gate` on the first
        `gate_scenes` training scenes with `gate_beta`), so the checkpoint's gate is fitted; nothing when the depth
        is fixed."""
        if self.depth is not None:
            return None
        return calibrate_gate(self, train_set, self.gate_scenes, self.gate_beta)

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
            last = self.exit_weights[-1]
            return {**outs[-1], "aux": early + outs[-1]["aux"],
                    "loss_weights": [last, *self.exit_weights[:-1], *[last] * len(outs[-1]["aux"])]}
        features = self.backbone_maps(image)
        if self.depth is None:
            depths = self.gate(self.gate_input(features)).argmax(-1) + 1   # (B,) layers to run
        else:
            depths = torch.full((image.shape[0],), self.depth, dtype=torch.long, device=image.device)
        self.encoder.state = ExitState(depths=depths if self.depth is None else self.depth)
        return {**self.decode(features), "depths": depths}


class ExitWeightedCriterion(MaskCriterion):
    """`MaskCriterion` whose terms for the output and each aux output are scaled by `outputs["loss_weights"]`
    (ECO-M2F's per-exit weights; all 1 when absent): same keys ("loss_ce", ..., "loss_ce_0", ...), same matching
    and `num_masks` normalisation, so with unit weights it returns exactly what `MaskCriterion` does."""

    def forward(self, outputs: dict, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        segs = self.targets(targets)
        num_masks = max(float(sum(len(labels) for labels, _ in segs)), 1.0)
        entries = [outputs, *(outputs.get("aux") or [])]
        weights = outputs.get("loss_weights") or [1.0] * len(entries)
        losses: dict[str, Tensor] = {}
        for i, (entry, weight) in enumerate(zip(entries, weights, strict=True)):
            suffix = f"_{i - 1}" if i else ""
            losses.update({f"{k}{suffix}": weight * self.weights[k] * v
                           for k, v in self._losses(entry, segs, num_masks).items()})
        return losses


def gate_utilities(quality: Tensor, beta: float) -> Tensor:
    """(N, K) utility u_k = q_k - beta * k of exit k = 1..K (official maskformer_model.py:403).

    Args:
        quality: (N, K) per-image PQ of exit k (0-1, as the official per-image JSON holds it).
    """
    k = torch.arange(1, quality.shape[1] + 1, dtype=quality.dtype)
    return quality - beta * k


def ideal_depths(quality: Tensor, beta: float) -> Tensor:
    """(N,) the derived dataset's hard labels: argmax_k u_k as depths 1..K (ties: the shallowest)."""
    return gate_utilities(quality, beta).argmax(1) + 1


def soft_gate_targets(quality: Tensor, beta: float) -> Tensor:
    """(N, K) the official soft targets: softmax over the exits of u_k, temperature 1 (maskformer_model.py:251,
    over each image's exits; see the module docstring for the official dim 0)."""
    return gate_utilities(quality, beta).softmax(1)


def gate_loss(logits: Tensor, quality: Tensor, beta: float, target: str = "soft") -> Tensor:
    """The gate's loss on (N, K) logits: "soft" mean squared error between softmax(logits) and
    `soft_gate_targets` over the exits (official criterion.py:220); "hard" cross-entropy on `ideal_depths`."""
    if target not in GATE_TARGETS:
        raise HeadError(f"eco-m2f: gate target={target!r} is not one of {', '.join(GATE_TARGETS)}; use soft "
                        f"(the official MSE to softmax utilities) or hard (cross-entropy on the ideal depths)")
    if target == "soft":
        return F.mse_loss(logits.softmax(1), soft_gate_targets(quality, beta).to(logits.dtype))
    return F.cross_entropy(logits, ideal_depths(quality, beta) - 1)


def fit_gate(gate: ExitGate, pooled: Tensor, quality: Tensor, beta: float, target: str = "soft", steps: int = 300,
             lr: float = 1e-2, weight_decay: float = 1e-4) -> ExitGate:
    """Train `gate` on the derived dataset (pooled gate inputs (N, C), per-image exit PQ `quality` (N, K)) with
    `gate_loss`, full batch AdamW; the inputs are standardised into the linear layer's weights so their scale does
    not matter."""
    mean, std = pooled.mean(0), pooled.std(0).clamp_min(1e-6)
    head = nn.Linear(pooled.shape[1], gate.head.out_features)
    nn.init.zeros_(head.weight), nn.init.zeros_(head.bias)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    x = (pooled - mean) / std
    for _ in range(steps):
        loss = gate_loss(head(x), quality, beta, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():   # head((p - mean) / std) == (W / std) p + (b - W mean / std)
        gate.head.weight.copy_(head.weight / std)
        gate.head.bias.copy_(head.bias - (head.weight / std) @ mean)
    return gate


@torch.no_grad()
def exit_predictions(model: "EcoMask2Former", dataset, n: int, score_threshold: float = 0.8, first: int = 0
                     ) -> tuple[Tensor, Tensor, list[dict]]:
    """(panoptic maps (K, n, S, S, 2) of every exit, gate inputs (n, C), targets) on scenes first..first + n - 1
    of a scenes dataset (`vitlab.data.scenes`), in eval mode."""
    model.eval()
    maps, pooled, targets = [], [], []
    for start in range(first, first + n, 32):
        images, batch_targets = collate_scenes([dataset[i] for i in range(start, min(first + n, start + 32))])
        features = model.backbone_maps(images)
        pooled.append(model.gate_input(features))
        maps.append(torch.stack([panoptic_inference(o["pred_logits"], o["pred_masks"], images.shape[-1],
                                                    score_threshold=score_threshold)
                                 for o in model.exits(images)]).to(torch.int32))
        targets += batch_targets
    return torch.cat(maps, 1), torch.cat(pooled), targets


def dataset_pq(maps: Tensor, targets: list[dict], things: int = 10) -> float:
    """Dataset-level PQ (torchmetrics `PanopticQuality`, things 0..things-1, stuff `things`) of maps (n, S, S, 2)."""
    from torchmetrics.detection import PanopticQuality

    metric = PanopticQuality(things=set(range(things)), stuffs={things})
    metric.update(maps.long(), torch.stack([t["panoptic"] for t in targets]))
    return float(metric.compute())


def per_image_pq(maps: Tensor, targets: list[dict], things: int = 10) -> Tensor:
    """(K, n) PQ of each exit on each image alone: the derived dataset's q_k."""
    from torchmetrics.detection import PanopticQuality

    metric = PanopticQuality(things=set(range(things)), stuffs={things})
    out = torch.zeros(maps.shape[:2])
    for k in range(maps.shape[0]):
        for i, target in enumerate(targets):
            metric.update(maps[k, i:i + 1].long(), target["panoptic"][None])
            out[k, i] = float(metric.compute())
            metric.reset()
    return out


def calibrate_gate(model: "EcoMask2Former", dataset, n: int, beta: float = 0.0, target: str = "soft",
                   score_threshold: float = 0.8) -> dict[str, float]:
    """ECO-M2F's steps 2 and 3 after the early-exit training: per-image PQ of every exit on the first `n` scenes of
    `dataset` (training scenes, as the official derived dataset), then `fit_gate` on them; the fitted weights go into
    `model.gate` in place. Returns the derived set's mean ideal depth and the gate's mean depth on those scenes."""
    was_training = model.training
    maps, pooled, targets = exit_predictions(model, dataset, min(n, len(dataset)), score_threshold)
    things = model.m2f.config.num_labels - 1
    quality = per_image_pq(maps, targets, things).T                                            # (n, K)
    fitted = fit_gate(ExitGate(pooled.shape[1], model.num_exits), pooled, quality, beta, target=target)
    model.gate.load_state_dict(fitted.state_dict())
    with torch.no_grad():
        depth = (model.gate(pooled).argmax(1) + 1).float().mean().item()
    model.train(was_training)
    ideal = ideal_depths(quality, beta).float().mean().item()
    return {"gate_scenes": len(targets), "gate_beta": beta, "ideal_depth": ideal, "gate_depth": depth}


def build_eco_m2f(backbone_name: str, num_classes: int, encoder_layers: int = 6, dim: int = 32,
                  decoder_layers: int = 4, num_queries: int = 16, heads: int = 4,
                  depth: int = 0, exit_weights: str = "depth", gate_beta: float = 0.0, gate_scenes: int = 128,
                  in_chans: int = 1, img_size: int = 64,
                  backbone_kwargs: dict[str, Any] | None = None) -> EcoMask2Former:
    """ECO-M2F for `img_size` px scenes on HF's Mask2Former. `backbone_name`: hf-swin (HF's Swin sized for 64 px
    scenes, from scratch), or any timm / vitlab model or vitlab checkpoint folder with stage features
    (`stage_backbone`; a checkpoint's weights are kept: `vitlab train --head eco-m2f --init CKPT`); `depth` > 0
    fixes the encoder depth, 0 lets the gate choose per image; `exit_weights` weighs the exits' training losses
    (depth: exit k's x k, the official; uniform); after training, the gate is fitted on the first `gate_scenes`
    training scenes with utility PQ_k - `gate_beta` k (`EcoMask2Former.finish_training`)."""
    if gate_beta < 0 or gate_scenes < 1:
        raise HeadError(f"eco-m2f: gate_beta={gate_beta} must be >= 0 and gate_scenes={gate_scenes} >= 1 "
                        f"(e.g. gate_beta=0.01,gate_scenes=128)")
    if not 1 <= encoder_layers or not 0 <= depth <= encoder_layers:
        raise HeadError(f"eco-m2f: depth={depth} must be in 0..encoder_layers={encoder_layers} (0: the gate chooses)")
    backbone = None
    if backbone_name in ("hf-swin", "swin"):
        if backbone_kwargs:
            raise HeadError(f"eco-m2f: hf-swin takes no backbone kwargs (got {sorted(backbone_kwargs)}); its "
                            f"size is SCENE_SWIN_HF")
    else:
        backbone = stage_backbone(backbone_name, in_chans, img_size, backbone_kwargs)
    config = scene_config(backbone_name, num_classes, encoder_layers, dim, decoder_layers, num_queries, heads,
                          in_chans, strides=backbone.strides if backbone is not None else (4, 8, 16, 32))
    return EcoMask2Former(config, depth=depth or None, exit_weights=exit_weights, backbone=backbone,
                          gate_beta=gate_beta, gate_scenes=gate_scenes)


register_model_head("eco-m2f", tasks=("panoptic",), build=build_eco_m2f)
