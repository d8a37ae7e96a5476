"""The model contract: how techniques see a model, whatever its family.

    spec = vitlab.contract.describe(model)
    spec.stages[i].blocks[j].mixers[0].kind   # "attention", "window_attention", "conv", "pool", "spectral", ...
    spec.blocks                               # every block in execution order

A `ModelSpec` names, by qualified module name, a model's stem (the layers that see pixels), its head (the
classifier), its stages and their blocks; each block its token mixers (attention with q/k/v and heads, windowed,
neighborhood, spatial-reduction, conv or pooling mixers, spectral filters, ...), its MLPs, the layout of the
tensor it takes ("sequence" (B, N, C) with prefix tokens first; "nhwc"; "nchw") and whether it needs the H x W
grid (a depthwise conv in its MLP, a conv position embedding, spatial reduction): token reduction needs a sequence
block with global attention that does not. Techniques read the spec instead of testing class names; a new family
gets them by registering one adapter (`register_adapter`). Adapters for timm's families and vitlab's zoo live in
`vitlab.contract.families`; `tests/contract/test_contract.py` checks every adapter's claims (module names exist, layouts
match what a forward pass feeds each block, heads and dims match the weights).

The records live in `vitlab.contract.spec`, the adapter registry and `describe` in `vitlab.contract.registry`.
"""
from .registry import NoAdapter, adapter_families, describe, has_adapter, register_adapter
from .spec import ATTENTION_KINDS, LAYOUTS, MIXER_KINDS, BlockSpec, Mixer, ModelSpec, StageSpec

__all__ = ["Mixer", "BlockSpec", "StageSpec", "ModelSpec", "NoAdapter", "describe", "register_adapter",
           "has_adapter", "adapter_families", "MIXER_KINDS", "LAYOUTS", "ATTENTION_KINDS"]
