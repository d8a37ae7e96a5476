"""Techniques on dense models: the model-contract adapter of `DenseModel` and int8 engines for dict outputs.

Contract (`vitlab.contract.describe`): a `DenseModel` is described by its backbone's own adapter, every qualified
name prefixed with `backbone.model.` (the wrapped timm / vitlab model, `vitlab.dense.backbone.Backbone.model`).
The stem is the backbone's stem. The head is the backbone's own classifier (unused by the dense forward pass):
`spec.head` names the layers techniques leave alone (quantization keeps them float, pruning never cuts them), and
naming the whole dense head there would keep quantization off a third or more of the MACs (an FPN's convolutions,
a DETR decoder); the dense head's layers are quantized like the backbone's, and pruning only cuts what the
dependency graph couples inside the backbone blocks (the stage widths the head reads stay).
ViT-CoMer builds a `DenseModel` (its backbone wraps the ViT as `.model`) and is described the same way. ViDT and
ECO-M2F build other classes with no adapter: the techniques that read the contract (prune, expedit, token
reduction) refuse them by name; quantization falls back to their pretrained_cfg (not checked here).

Pruning (`prune`): the backbone model alone is pruned (`vitlab.prune`: a plain ViT's own path, else the dependency
graph), to `target_flops` of the backbone's MACs; heads, MLP channels and blocks are cut inside the blocks, so
every stage map keeps its width and the dense head is unchanged. Only weight-magnitude importances (l1, l2) are
taken: taylor / hessian score units with the classifier's loss, a layer a dense model does not use.

Engines (`w8a8`, `w8`, `bf16`): ONNX and OpenVINO graphs have tensor outputs, so the model is exported through
`FlatOutputs` (the head's inference outputs flattened per image and concatenated into one [B, D] tensor, in a fixed
key order; the training-only `aux` list is left out) and the engine's [B, D] output is split back into the dict by
`DenseEngineRunner`. The engines' checks against the calibrated twin then compare every output value.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch
import torch.nn as nn

from ..record import record, update_record
from ..contract import ModelSpec, StageSpec, describe, register_adapter
from ..prune.apply import register_dense_prune
from ..quant.handlers import register_dense_deploy
from ..techniques import TechniqueNotApplicable, format_technique
from .heads import DenseModel

__all__ = ["prefixed_spec", "FlatOutputs", "DenseEngineRunner", "deploy_dense", "prune_dense_"]

_TRAINING_ONLY = frozenset({"aux"})   # intermediate predictions for auxiliary losses; inference reads the last


def prefixed_spec(spec: ModelSpec, prefix: str, model: nn.Module) -> ModelSpec:
    """`spec` (of a submodule) as a spec of `model`: stage, block, downsample, stem and head names get `prefix`
    (mixer, q/k/v and MLP names are relative to their block and stay)."""
    def q(name: str | None) -> str | None:
        return None if name is None else f"{prefix}{name}"

    stages = [StageSpec(q(s.name), [dataclasses.replace(b, name=q(b.name)) for b in s.blocks], q(s.downsample))
              for s in spec.stages]
    return ModelSpec(spec.family, model, stages, tuple(map(q, spec.stem)), tuple(map(q, spec.head)),
                     spec.num_prefix_tokens, spec.notes)


@register_adapter(DenseModel)
def _dense_spec(model: DenseModel) -> ModelSpec:
    """The backbone model's spec under `backbone.model.` (family kept: token techniques key their rules on it);
    the stem is the backbone's, the head its unused classifier (see the module docstring)."""
    return prefixed_spec(describe(model.backbone.model), "backbone.model.", model)


class FlatOutputs(nn.Module):
    """`model` with its output dict as one tensor [B, D]: the tensors of `keys` flattened per image, concatenated
    (what an ONNX / OpenVINO export can carry). `shapes[k]` is each output's shape without the batch dimension."""

    def __init__(self, model: nn.Module, example: torch.Tensor):
        super().__init__()
        self.model = model
        with torch.no_grad():
            out = model.eval()(example)
        self.keys = [k for k, v in out.items() if torch.is_tensor(v) and k not in _TRAINING_ONLY]
        self.shapes = {k: tuple(out[k].shape[1:]) for k in self.keys}
        # what the quantization machinery reads off the model it is given (input size, techniques so far)
        self.pretrained_cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        update_record(self, techniques=tuple(record(model).techniques))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(images)
        return torch.cat([out[k].flatten(1) for k in self.keys], dim=1)   # [B, sum of prod(shapes[k])]

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """The output dict back from [B, D]: consecutive slices reshaped to [B, *shapes[k]]."""
        sizes = [math.prod(self.shapes[k]) for k in self.keys]
        parts = flat.split(sizes, dim=1)
        return {k: p.reshape(len(flat), *self.shapes[k]) for k, p in zip(self.keys, parts)}


@register_adapter(FlatOutputs)
def _flat_spec(model: FlatOutputs) -> ModelSpec:
    """The wrapped model's spec under `model.` (quantization of the wrapper keeps the same layers float)."""
    return prefixed_spec(describe(model.model), "model.", model)


class DenseEngineRunner:
    """An engine runner (OpenVINO / ONNX Runtime) of a `FlatOutputs` export, as a dense runner: images -> the
    output dict. `module` is the float dense model (FLOP counts, `vitlab.dense` for the task metric)."""

    def __init__(self, inner: Any, flat: FlatOutputs, float_module: nn.Module):
        self.inner, self.flat, self.float_module = inner, flat, float_module
        self.input_size = inner.input_size
        self.num_classes = 0            # a dense model has no classifier output
        self.techniques = inner.techniques
        self.engine = inner.engine
        self.engine_choice = getattr(inner, "engine_choice", None)

    @property
    def module(self) -> nn.Module:
        return self.float_module

    @property
    def quant_mac_fraction(self) -> float | None:
        return getattr(self.inner, "quant_mac_fraction", None)

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.flat.unflatten(self.inner(images))

    def save(self, directory, name: str = "model"):
        """The engine's graph (ONNX / OpenVINO IR) of the flat export."""
        return self.inner.save(directory, name)

    def close(self) -> None:
        if hasattr(self.inner, "close"):
            self.inner.close()


def deploy_dense(model: nn.Module, deploy: Callable[[nn.Module], Any], example: torch.Tensor) -> DenseEngineRunner:
    """Deploy dense `model` with `deploy` (the engine handler, e.g. `deploy_w8a8(m, cfg, calib)`) through
    `FlatOutputs`, and wrap the engine's runner so it returns the output dict. The float dense model the runner
    reports is the one inside the engine runner's own float copy (taken before quantization)."""
    flat = FlatOutputs(model, example[:1])
    inner = deploy(flat)
    float_flat = getattr(inner, "float_module", None) or inner.module   # engine runners / a TorchRunner (bf16)
    return DenseEngineRunner(inner, flat, float_flat.model)


def prune_dense_(model: nn.Module, cfg: Any, prune: Callable[[nn.Module], Any]) -> nn.Module:
    """The `prune` handler on a dense model: `prune(backbone_model)` (the registered handler on the wrapped timm /
    vitlab model) under the rules of the module docstring; refuses what would change a stage width or score units
    with the unused classifier. Returns `model` with `vitlab.prune` (the backbone's summary)."""
    name = format_technique(cfg)
    if not isinstance(model, DenseModel):
        raise TechniqueNotApplicable(name, model, "its head builds the whole model (backbone included); on dense "
                                     "models prune supports backbone + head models (DenseModel: semantic-fpn, "
                                     "detr-lite, kmax, ...)")
    if cfg.importance not in ("l1", "l2"):
        raise TechniqueNotApplicable(name, model, f"importance={cfg.importance} scores units with the classifier's "
                                     "loss, which a dense model does not use; on dense models prune supports "
                                     "importance=l1 or l2 (weight magnitude)")
    if cfg.embed:
        raise TechniqueNotApplicable(name, model, "embed=true changes the width of the features the dense head "
                                     "reads; on dense models prune supports heads, mlp, blocks and stem")
    backbone = model.backbone.model
    prune(backbone)
    update_record(model, prune={**(record(backbone).prune or {}), "scope": "backbone.model"})
    return model


register_dense_deploy(deploy_dense)
register_dense_prune(prune_dense_)
