"""Contract adapters for timm's seed families and vitlab's zoo.

Two tables do most of the work: `MIXERS` maps a mixer class to its kind (and whether it attends globally over the
block's sequence), `BLOCKS` maps a block class to its mixers, MLPs, layout and grid needs. A family adapter only
says where its stages and blocks are (`_spec`). `tests/contract/test_contract.py` checks each claim against the model.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch.nn as nn
from timm.layers import Attention as TimmAttention
from timm.models import (convit, convnext, crossvit, efficientformer, efficientvit_msra, metaformer, nextvit, pvt_v2,
                         swin_transformer, swin_transformer_v2, tiny_vit, tnt, vision_transformer, volo)

from ..models import crossformer, cvt, dinat, hornet, pvt, rmt, sret, spectformer, t2t_vit, uniformer
from ..models._glpe import GLPEAttention
from .registry import register_adapter
from .spec import BlockSpec, Mixer, ModelSpec, StageSpec

_QKV_FORMS = (("qkv",), ("q", "kv"), ("q", "k", "v"), ("qk", "v"), ("kv", "q"), ("proj_q", "proj_k", "proj_v"),
              ("wq", "wk", "wv"), ("qkvs",))

# mixer class -> (kind, global_tokens: bool or fn(module) -> bool)
MIXERS: dict[type, tuple[str, bool | Callable[[nn.Module], bool]]] = {
    TimmAttention: ("attention", True),
    swin_transformer.WindowAttention: ("window_attention", False),
    swin_transformer_v2.WindowAttention: ("window_attention", False),
    pvt_v2.Attention: ("sra_attention", lambda m: m.sr is None and not getattr(m, "linear", False)),
    tiny_vit.Attention: ("window_attention", False),
    efficientformer.Attention: ("positional_attention", False),   # learned bias per (query, key) position pair
    efficientformer.Pooling: ("pool", False),
    metaformer.Pooling: ("pool", False),
    metaformer.Attention: ("attention", False),        # runs on the NCHW map (flattened inside)
    metaformer.SepConv: ("conv", False),
    nextvit.EfficientAttention: ("sra_attention", lambda m: m.sr is None),
    nextvit.ConvAttention: ("conv", False),
    convit.GPSA: ("positional_attention", False),
    convit.MHSA: ("attention", True),
    tnt.Attention: ("attention", True),
    volo.OutlookAttention: ("outlook_attention", False),
    volo.Attention: ("attention", True),   # vitlab.tokens (VOLO): over the whole flattened (B, H, W, C) map
    volo.ClassAttention: ("class_attention", False),
    efficientvit_msra.LocalWindowAttention: ("window_attention", False),
    nn.Conv2d: ("conv", False),
    tiny_vit.ConvNorm: ("conv", False),
    cvt.ConvAttention: ("conv_attention", False),
    pvt.SpatialReductionAttention: ("sra_attention", lambda m: m.sr_ratio == 1),
    dinat.NeighborhoodAttention2d: ("neighborhood_attention", False),
    hornet.GnConv: ("gnconv", False),
    crossformer.GroupAttention: ("group_attention", False),
    rmt.ManhattanSelfAttention: ("retention", False),
    spectformer.SpectralGatingNetwork: ("spectral", False),
}


class BlockRule:
    """What a block class holds: mixer attribute names, MLP attribute names, input layout, grid needs."""

    def __init__(self, mixers: Iterable[str], mlps: Iterable[str], layout: str, needs_grid: bool | Callable = False,
                 residual: bool = True):
        self.mixers, self.mlps, self.layout = tuple(mixers), tuple(mlps), layout
        self.needs_grid, self.residual = needs_grid, residual


BLOCKS: dict[type, BlockRule] = {
    vision_transformer.Block: BlockRule(["attn"], ["mlp"], "sequence",
                                        lambda b: isinstance(b.attn, GLPEAttention)),  # conv of the value map
    swin_transformer.SwinTransformerBlock: BlockRule(["attn"], ["mlp"], "nhwc", True),
    swin_transformer_v2.SwinTransformerV2Block: BlockRule(["attn"], ["mlp"], "nhwc", True),
    pvt_v2.Block: BlockRule(["attn"], ["mlp"], "sequence", True),             # depthwise conv in the MLP
    tiny_vit.MBConv: BlockRule(["conv2"], [], "nchw", True),
    tiny_vit.TinyVitBlock: BlockRule(["attn"], ["mlp"], "nhwc", True),
    efficientformer.MetaBlock2d: BlockRule(["token_mixer"], ["mlp"], "nchw", True),
    efficientformer.MetaBlock1d: BlockRule(["token_mixer"], ["mlp"], "sequence", True),
    metaformer.MetaFormerBlock: BlockRule(["token_mixer"], ["mlp"], "nchw", True),
    nextvit.NextConvBlock: BlockRule(["mhca"], ["mlp"], "nchw", True),
    nextvit.NextTransformerBlock: BlockRule(["e_mhsa", "mhca"], ["mlp"], "nchw", True),
    convit.Block: BlockRule(["attn"], ["mlp"], "sequence", lambda b: isinstance(b.attn, convit.GPSA)),
    tnt.Block: BlockRule(["attn_in", "attn_out"], ["mlp_in", "mlp"], "sequence", True),  # inner pixels follow patches
    volo.Outlooker: BlockRule(["attn"], ["mlp"], "nhwc", True),
    volo.Transformer: BlockRule(["attn"], ["mlp"], "nhwc"),   # vitlab.tokens (VOLO): no grid use (global attn, MLP)
    volo.ClassBlock: BlockRule(["attn"], ["mlp"], "sequence"),
    efficientvit_msra.EfficientVitBlock: BlockRule(["mixer.m"], ["ffn0.m", "ffn1.m"], "nchw", True),
    convnext.ConvNeXtBlock: BlockRule(["conv_dw"], ["mlp"], "nchw", True),
    cvt.Block: BlockRule(["attn"], ["mlp"], "sequence", True),
    pvt.Block: BlockRule(["attn"], ["mlp"], "sequence", lambda b: b.attn.sr_ratio > 1),
    dinat.NATBlock: BlockRule(["attn"], ["mlp"], "nhwc", True),
    hornet.HorBlock: BlockRule(["gnconv"], ["mlp"], "nhwc", True),
    crossformer.CrossFormerBlock: BlockRule(["attn"], ["mlp"], "nhwc", True),
    rmt.RetBlock: BlockRule(["attn"], ["mlp"], "nhwc", True),
    sret.RecursiveBlock: BlockRule(["attn"], ["mlp"], "sequence", True),      # sliced groups; the stage ends on a grid
    spectformer.SpectralBlock: BlockRule(["filter"], ["mlp"], "sequence", True),
    uniformer.CBlock: BlockRule(["attn"], ["mlp"], "nchw", True),
    uniformer.SABlock: BlockRule(["attn"], ["mlp"], "nchw", True),
}


def _get(module: nn.Module, path: str) -> nn.Module:
    return module.get_submodule(path) if path else module


def mixer_of(module: nn.Module, name: str) -> Mixer:
    """A Mixer for `module` (found by class in MIXERS, most specific first); KeyError if unknown."""
    for cls in type(module).__mro__:
        if cls in MIXERS:
            kind, glob = MIXERS[cls]
            break
    else:
        raise KeyError(f"no mixer kind for {type(module).__name__}")
    inner = module.attn if isinstance(module, efficientvit_msra.LocalWindowAttention) else module
    heads = getattr(inner, "num_heads", None) or getattr(inner, "heads", None)
    head_dim = getattr(inner, "head_dim", None) or getattr(inner, "key_dim", None)
    children = dict(inner.named_children())
    qkv = next((form for form in _QKV_FORMS if all(n in children for n in form)), ())
    if inner is not module:
        qkv = tuple(f"attn.{n}" for n in qkv)
    proj = ("attn.proj" if inner is not module else "proj") if "proj" in children else None
    return Mixer(kind, name, module, num_heads=heads, head_dim=head_dim, qkv=qkv, proj=proj,
                 global_tokens=glob(module) if callable(glob) else glob)


def _rule(module: nn.Module) -> BlockRule | None:
    """The rule of the block's class or of the class it was swapped from (techniques subclass blocks in place)."""
    return next((BLOCKS[cls] for cls in type(module).__mro__ if cls in BLOCKS), None)


def block_of(module: nn.Module, name: str, num_prefix_tokens: int = 0) -> BlockSpec:
    rule = _rule(module)
    needs_grid = rule.needs_grid(module) if callable(rule.needs_grid) else rule.needs_grid
    mixers = tuple(mixer_of(_get(module, m), m) for m in rule.mixers)
    return BlockSpec(name, module, mixers, rule.mlps, rule.layout, needs_grid, num_prefix_tokens, rule.residual)


def _blocks(container: nn.Module, prefix: str, num_prefix_tokens: int = 0) -> list[BlockSpec]:
    """Blocks among `container`'s children (non-block children such as EfficientFormer's Flat are skipped)."""
    return [block_of(m, f"{prefix}.{n}", num_prefix_tokens) for n, m in container.named_children()
            if _rule(m) is not None]


def _pcfg(model: nn.Module, key: str) -> tuple[str, ...]:
    value = (getattr(model, "pretrained_cfg", None) or {}).get(key)
    return () if value is None else ((value,) if isinstance(value, str) else tuple(value))


def _first_layer(model: nn.Module) -> tuple[str, ...]:
    return next(((n,) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))), ())


def _classifier(model: nn.Module) -> tuple[str, ...]:
    heads = [model.get_classifier()] if hasattr(model, "get_classifier") else []
    heads = [h for hs in heads for h in (hs if isinstance(hs, tuple) else (hs,))]
    return tuple(n for n, m in model.named_modules() if any(m is h for h in heads))


def _spec(model, family, stages, *, prefix: int = 0, notes: str = "") -> ModelSpec:
    """Stem and head from timm's pretrained_cfg (`first_conv`, `classifier`), else the first weight layer and
    `get_classifier()` (a model built by its class, without a registry entry)."""
    names = dict(model.named_modules())
    stem = tuple(n for n in _pcfg(model, "first_conv") if n in names) or _first_layer(model)  # cfgs may list more
    head = tuple(n for n in _pcfg(model, "classifier") if n in names) or _classifier(model)
    return ModelSpec(family, model, stages, stem, head, prefix, notes)


def staged_spec(model, family, stages_attr="stages", blocks_attr="blocks", prefix=lambda i, s: 0, **kw) -> ModelSpec:
    out = []
    for i, stage in enumerate(getattr(model, stages_attr)):
        name = f"{stages_attr}.{i}"
        container = getattr(stage, blocks_attr) if blocks_attr else stage
        down = "downsample" if isinstance(getattr(stage, "downsample", None), nn.Module) else None
        down = down if down and not isinstance(stage.downsample, nn.Identity) else None
        out.append(StageSpec(name, _blocks(container, f"{name}.{blocks_attr}" if blocks_attr else name,
                                           prefix(i, stage)), down and f"{name}.{down}"))
    return _spec(model, family, out, **kw)


@register_adapter(vision_transformer.VisionTransformer)
def _vit(model) -> ModelSpec:
    p = model.num_prefix_tokens
    family = "t2t_vit" if isinstance(model, t2t_vit.T2TViT) else "vit"
    return _spec(model, family, [StageSpec("blocks", _blocks(model.blocks, "blocks", p))], prefix=p)


@register_adapter(swin_transformer.SwinTransformer, swin_transformer_v2.SwinTransformerV2)
def _swin(model) -> ModelSpec:
    family = "swinv2" if isinstance(model, swin_transformer_v2.SwinTransformerV2) else "swin"
    return staged_spec(model, family, stages_attr="layers")


@register_adapter(pvt_v2.PyramidVisionTransformerV2)
def _pvt_v2(model) -> ModelSpec:
    return staged_spec(model, "pvt_v2")


@register_adapter(tiny_vit.TinyVit)
def _tiny_vit(model) -> ModelSpec:
    return staged_spec(model, "tiny_vit")


@register_adapter(efficientformer.EfficientFormer)
def _efficientformer(model) -> ModelSpec:
    return staged_spec(model, "efficientformer")


@register_adapter(metaformer.MetaFormer)
def _metaformer(model) -> ModelSpec:
    return staged_spec(model, "metaformer")


@register_adapter(nextvit.NextViT)
def _nextvit(model) -> ModelSpec:
    return staged_spec(model, "nextvit")


@register_adapter(convnext.ConvNeXt)
def _convnext(model) -> ModelSpec:
    return staged_spec(model, "convnext")


@register_adapter(efficientvit_msra.EfficientVitMsra)
def _efficientvit(model) -> ModelSpec:
    return staged_spec(model, "efficientvit_msra")


@register_adapter(convit.ConVit)
def _convit(model) -> ModelSpec:
    # the class token joins the sequence at block `local_up_to_layer` (the first MHSA block)
    blocks = [block_of(b, f"blocks.{i}", int(i >= model.local_up_to_layer)) for i, b in enumerate(model.blocks)]
    return _spec(model, "convit", [StageSpec("blocks", blocks)], prefix=1)


@register_adapter(crossvit.CrossVit)
def _crossvit(model) -> ModelSpec:
    stages = []
    for i, msb in enumerate(model.blocks):   # each multi-scale block: one branch of plain ViT blocks per scale
        for b, branch in enumerate(msb.blocks):
            stages.append(StageSpec(f"blocks.{i}.blocks.{b}", _blocks(branch, f"blocks.{i}.blocks.{b}", 1)))
    return _spec(model, "crossvit", stages, prefix=1, notes="cross-attention fusion between branches reads only the "
                 "class tokens; it is not a block")


@register_adapter(tnt.TNT)
def _tnt(model) -> ModelSpec:
    return _spec(model, "tnt", [StageSpec("blocks", _blocks(model.blocks, "blocks", 1))], prefix=1)


@register_adapter(volo.VOLO)
def _volo(model) -> ModelSpec:
    stages = [StageSpec(f"network.{i}", _blocks(s, f"network.{i}")) for i, s in enumerate(model.network)
              if isinstance(s, nn.Sequential)]
    if model.post_network is not None:
        stages.append(StageSpec("post_network", _blocks(model.post_network, "post_network", 1)))
    return _spec(model, "volo", stages, prefix=1)


@register_adapter(cvt.ConvVisionTransformer)
def _cvt(model) -> ModelSpec:
    return staged_spec(model, "vl_cvt", prefix=lambda i, s: int(s.cls_token is not None))


@register_adapter(pvt.PyramidVisionTransformer)
def _pvt(model) -> ModelSpec:
    return staged_spec(model, "vl_pvt", prefix=lambda i, s: int(s.cls_token is not None))


@register_adapter(dinat.DiNAT)
def _dinat(model) -> ModelSpec:
    return staged_spec(model, "vl_dinat")


@register_adapter(hornet.HorNet)
def _hornet(model) -> ModelSpec:
    return staged_spec(model, "vl_hornet")


@register_adapter(crossformer.CrossFormer)
def _crossformer(model) -> ModelSpec:
    return staged_spec(model, "vl_crossformer")


@register_adapter(rmt.RMT)
def _rmt(model) -> ModelSpec:
    return staged_spec(model, "vl_rmt")


@register_adapter(sret.SReT)
def _sret(model) -> ModelSpec:
    return staged_spec(model, "vl_sret", prefix=lambda i, s: 0)


@register_adapter(uniformer.UniFormer)
def _uniformer(model) -> ModelSpec:
    return staged_spec(model, "vl_uniformer")


@register_adapter(spectformer.SpectFormer)
def _spectformer(model) -> ModelSpec:
    return _spec(model, "vl_spectformer", [StageSpec("blocks", _blocks(model.blocks, "blocks"))])


# --- gmm_vit (zoo wave 2) ---
from ..models import gmm_vit as _gmm_vit  # noqa: E402

# GMMViT is a timm VisionTransformer of timm Blocks: the ViT adapter describes it. Its attention multiplies the
# logits by a mask over (query, key) grid positions, so dropping or merging tokens is not defined for it.
MIXERS[_gmm_vit.GaussianMixtureAttention] = ("positional_attention", False)
# --- end gmm_vit ---

# --- fcaformer (zoo wave 2) ---
from ..models import fcaformer as _fcaformer  # noqa: E402

# Fca attention adds a learned bias per head and (|dy|, |dx|) offset, and one per cross token: positions matter.
MIXERS[_fcaformer.FcaAttention] = ("positional_attention", False)
# Its local and token-merge convs work on the grid, and the stage threads cross tokens from block to block (the
# local conv is not residual either): a block is not an x + f(x) that can be dropped. ConvNeXt stages use timm's
# ConvNeXtBlock, already described.
BLOCKS[_fcaformer.FcaBlock] = BlockRule(["attn"], ["mlp"], "sequence", True, residual=False)


@register_adapter(_fcaformer.FcaFormer)
def _fcaformer_spec(model) -> ModelSpec:
    return staged_spec(model, "vl_fcaformer")
# --- end fcaformer ---

# --- favit (zoo wave 2) ---
from ..models import favit as _favit  # noqa: E402

# FaSA: each query attends to a spatially reduced grid (one head) and to K x K keys pooled over dilated windows of the
# map (per dilation group, like CrossFormer's long-distance groups); no q/k/v trio a head pruner could cut.
MIXERS[_favit.FactorizationAttention] = ("group_attention", False)
# grid use: the attention's convs and windows, the depthwise conv in the MLP
BLOCKS[_favit.FaViTBlock] = BlockRule(["attn"], ["mlp"], "sequence", True)


@register_adapter(_favit.FaViT)
def _favit_spec(model) -> ModelSpec:
    return staged_spec(model, "vl_favit")
# --- end favit ---

# --- vir (zoo wave 2) ---
from ..models import vir as _vir  # noqa: E402

# Retention is causal with a decay by token distance: merging or dropping tokens changes what every later token
# sees, so it is not global attention. Its blocks are timm's vision_transformer.Block (attn_layer=Retention),
# already described.
MIXERS[_vir.Retention] = ("retention", False)


@register_adapter(_vir.VisionRetention)
def _vir_spec(model) -> ModelSpec:
    return _spec(model, "vl_vir", [StageSpec("blocks", _blocks(model.blocks, "blocks"))],
                 notes="the class token is the LAST token of the sequence (retention is causal), not a prefix")
# --- end vir ---

# --- soft (zoo wave 2) ---
from ..models import soft as _soft  # noqa: E402

# Gaussian-kernel attention of every query to landmarks pooled from the query grid by a strided conv (Nystrom, no
# softmax): the closest kind is spatial-reduction attention. It needs the grid (the landmark conv, a depthwise conv of
# V); its q and v layers (keys are the queries) are no q/k/v form a head pruner could cut.
MIXERS[_soft.SoftmaxFreeAttention] = ("sra_attention", False)
# post-norm: the block returns LN(x + f(x)), so dropping it is not the identity
BLOCKS[_soft.SoftBlock] = BlockRule(["attn"], ["mlp"], "sequence", True, residual=False)


@register_adapter(_soft.SoftmaxFreeVisionTransformer)
def _soft_spec(model) -> ModelSpec:
    return staged_spec(model, "vl_soft", prefix=lambda i, s: s.num_prefix_tokens)  # the last stage's timm Blocks
# --- end soft ---

# --- activator (zoo wave 2) ---
from ..models import activator as _activator  # noqa: E402

# A learned, input-independent N x N token projection inside a GLU (no softmax, no heads): the closest kind is a
# fixed global linear filter over token positions, "spectral". It is sized to the token count and position-bound, so
# the block needs its grid; the gated MLP is the block's only sublayer (no separate channel MLP).
MIXERS[_activator.TokenGatedMLP] = ("spectral", False)
BLOCKS[_activator.ActivatorBlock] = BlockRule(["mlp"], [], "sequence", True)


@register_adapter(_activator.Activator)
def _activator_spec(model) -> ModelSpec:
    return _spec(model, "vl_activator", [StageSpec("blocks", _blocks(model.blocks, "blocks"))])
# --- end activator ---

# --- hyena_nd (zoo wave 2) ---
from ..models import hyena_nd as _hyena_nd  # noqa: E402

# A long 2-D convolution done as a product in the Fourier domain, between data-controlled gates: "spectral". Its
# filter spans the token grid, so merging or dropping tokens is not defined for it. The attention blocks after the
# Hyena ones are timm Blocks, already described (token-reducible, like SpectFormer's).
MIXERS[_hyena_nd.HyenaND] = ("spectral", False)
BLOCKS[_hyena_nd.HyenaBlock] = BlockRule(["hyena"], ["mlp"], "sequence", True)


@register_adapter(_hyena_nd.HyenaViT)
def _hyena_nd_spec(model) -> ModelSpec:
    return _spec(model, "vl_hyena_nd", [StageSpec("blocks", _blocks(model.blocks, "blocks"))])
# --- end hyena_nd ---

# --- svt (zoo wave 2) ---
from ..models import svt as _svt  # noqa: E402

# The scattering layer filters the token grid in the wavelet domain (a learned low-pass filter per position and
# channel, complex gating of the high band): "spectral", bound to the grid. The later stages' mixer is timm's
# Attention (global), but every SVT block's PVTv2 FFN has a depthwise conv over the grid: none is token-reducible.
MIXERS[_svt.SpectralScattering] = ("spectral", False)
BLOCKS[_svt.SVTBlock] = BlockRule(["attn"], ["mlp"], "sequence", True)


@register_adapter(_svt.SVT)
def _svt_spec(model) -> ModelSpec:
    spec = staged_spec(model, "vl_svt")
    if len(model.post_network):  # VOLO's class-attention block over [mean of the tokens, tokens]
        spec.stages.append(StageSpec("post_network", _blocks(model.post_network, "post_network", 1)))
        spec.num_prefix_tokens = 1
    return spec
# --- end svt ---

# --- sgformer (zoo wave 2) ---
from ..models import sgformer as _sgformer  # noqa: E402

# Hybrid-scale attention (half the heads on an sr-reduced map, half in 7x7 windows) and significance-guided attention
# (keys merged from significance-sorted token groups whose sizes are fixed per token count) are spatial-reduction
# kinds; stage 4's plain attention adds a LePE conv over the grid. None may drop or merge tokens.
MIXERS[_sgformer.HybridScaleAttention] = ("sra_attention", False)
MIXERS[_sgformer.SignificanceGuidedAttention] = ("sra_attention", False)
MIXERS[_sgformer.GlobalAttention] = ("attention", False)
# (x, (H, W), significance) -> (x, significance): a hybrid block hands its map to the guided block after it, so a
# block is not an x + f(x) that can be dropped
BLOCKS[_sgformer.SGBlock] = BlockRule(["attn"], ["mlp"], "sequence", True, residual=False)


@register_adapter(_sgformer.SGFormer)
def _sgformer_spec(model) -> ModelSpec:
    return staged_spec(model, "vl_sgformer")
# --- end sgformer ---

# --- msvmamba (zoo wave 2) ---
from ..models import msvmamba as _msvmamba  # noqa: E402

# MS2D: selective scans (decayed causal linear recurrences) along raster / column orders of the full and the
# half-resolution grid. MIXER_KINDS has no SSM kind: the closest is "retention", a decayed causal scan. Dropping or
# merging tokens changes every later state, so it is not global attention.
MIXERS[_msvmamba.MultiScaleSS2D] = ("retention", False)
# grid use: the scan routes, the depthwise convs, the bilinear upsampling and the ConvFFN's depthwise conv
BLOCKS[_msvmamba.VSSBlock] = BlockRule(["token_mixer"], ["mlp"], "nhwc", True)


@register_adapter(_msvmamba.MSVMamba)
def _msvmamba_spec(model) -> ModelSpec:
    return staged_spec(model, "vl_msvmamba")
# --- end msvmamba ---

# --- maformer (zoo wave 2) ---
from ..models import maformer as _maformer  # noqa: E402

# MAF: window attention (local stream) + attention over an r x r down-sampled map (GLD, global stream), fused by
# cross attention from every position to the down-sampled tokens: a spatial-reduction kind bound to the grid.
MIXERS[_maformer.MultiScaleAttentionFusion] = ("sra_attention", False)
BLOCKS[_maformer.MAFBlock] = BlockRule(["attn"], ["mlp"], "nhwc", True)


@register_adapter(_maformer.MAFormer)
def _maformer_spec(model) -> ModelSpec:
    return staged_spec(model, "vl_maformer")
# --- end maformer ---

# --- fmvit (zoo wave 2) ---
from ..models import fmvit as _fmvit  # noqa: E402

# RLMHSA: queries at every position, keys / values from the average-pooled map: spatial-reduction attention, bound to
# the grid (the pooling). The local path (depthwise conv -> BN -> ReLU -> 1x1) is a conv mixer. Both blocks run on
# NCHW maps and are x + f(x) twice (the FMB fuses its two mixers' outputs with a 1x1 conv before the residual add).
MIXERS[_fmvit.LightweightAttention] = ("sra_attention", False)
MIXERS[_fmvit.LocalMixer] = ("conv", False)
BLOCKS[_fmvit.ConvFusionBlock] = BlockRule(["mixer"], ["mlp"], "nchw", True)
BLOCKS[_fmvit.FrequencyMixingBlock] = BlockRule(["attn", "local"], ["mlp"], "nchw", True)


@register_adapter(_fmvit.FMViT)
def _fmvit_spec(model) -> ModelSpec:
    return staged_spec(model, "vl_fmvit")
# --- end fmvit ---

# --- turbovit (zoo wave 2) ---
from timm.models import hiera as _hiera  # noqa: E402
from ..models import turbovit as _turbovit  # noqa: E402

# timm's Hiera MaskUnitAttention: softmax attention within mask units (windows of the stage grid) or, where
# use_mask_unit_attn is off, over the whole map (one unit); Q-pooling max-pools its queries by q_stride. Only the
# global, unpooled form attends over every token of its input with nothing tied to positions or count.
MIXERS[_hiera.MaskUnitAttention] = ("window_attention", lambda m: not m.use_mask_unit_attn and m.q_stride == 1)
# NHWC blocks: mask units and pooling need the grid; a global block only reshapes it. A stage's opening block (it
# widens and pools the map) is the stage's `downsample`, so the stage's blocks keep its grid.
BLOCKS[_turbovit.MaskUnitBlock] = BlockRule(["attn"], ["mlp"], "nhwc",
                                            lambda b: b.attn.use_mask_unit_attn or b.attn.q_stride > 1)


@register_adapter(_turbovit.TurboViT)
def _turbovit_spec(model) -> ModelSpec:
    return staged_spec(model, "vl_turbovit")
# --- end turbovit ---

# --- dualtoken_vit (zoo wave 2) ---
from ..models import dualtoken_vit as _dualtoken_vit  # noqa: E402

# Each block: a conv encoder (depthwise conv + pointwise MLP) for the local tokens; self-attention among the s x s
# position-aware global tokens (timm Attention, but over those tokens, not the block's map); every local token
# attending to the global tokens (keys and values from a step-wise down-sampled grid: the spatial-reduction kind).
# The blocks run on NHWC maps and carry the global tokens in a per-forward `GlobalTokens` (a dropped block leaves
# them as they were): nothing here may drop or merge tokens of the map.
MIXERS[_dualtoken_vit.ConvEncoder] = ("conv", False)
MIXERS[_dualtoken_vit.GlobalTokenAttention] = ("attention", False)
MIXERS[_dualtoken_vit.TokenBroadcastAttention] = ("sra_attention", False)
BLOCKS[_dualtoken_vit.DualTokenBlock] = BlockRule(["local", "token_attn", "attn"], ["mlp"], "nhwc", True)


@register_adapter(_dualtoken_vit.DualTokenViT)
def _dualtoken_vit_spec(model) -> ModelSpec:
    return staged_spec(model, "vl_dualtoken_vit")
# --- end dualtoken_vit ---

# --- tic (zoo wave 2) ---
from ..models import tic as _tic  # noqa: E402

# MSA-Conv: softmax attention of each token over the k x k (dilated) conv window around it (keys outside the image
# zero; MDCS rolls some heads' keys around the map), then a k x k conv: neighbourhood attention, bound to the grid.
MIXERS[_tic.MSAConv2d] = ("neighborhood_attention", False)
BLOCKS[_tic.TiCBlock] = BlockRule(["attn"], ["mlp"], "nhwc", True)


@register_adapter(_tic.TiC)
def _tic_spec(model) -> ModelSpec:
    return staged_spec(model, "vl_tic")
# --- end tic ---

# --- uniformer_light (zoo wave 2) ---
from ..models import uniformer_light as _uniformer_light  # noqa: E402

# Stages 1-2 are uniformer.py's CBlocks (described above). Stages 3-4 prune tokens themselves (Evo-ViT): a block takes
# (class token + H*W patch tokens, (H, W), scores), and runs global softmax attention over the class token, the
# best-scoring patch tokens and one representative of the others, picked by running class-attention scores sized to
# the grid and threaded from block to block; a 3x3 depthwise position conv needs the grid. Token techniques must not
# drop, merge or cluster more: not global_tokens, needs the grid, and its blocks must not be told a clustered grid
# (the scores would not follow). A block returns (tokens, scores): it cannot be dropped as x + f(x).
MIXERS[_uniformer_light.ScoringAttention] = ("attention", False)
BLOCKS[_uniformer_light.TokenPruningBlock] = BlockRule(["attn"], ["mlp"], "sequence", True, residual=False)


@register_adapter(_uniformer_light.UniFormerLight)
def _uniformer_light_spec(model) -> ModelSpec:
    return staged_spec(model, "vl_uniformer_light", prefix=lambda i, s: int(i >= 2),
                       notes="stages 3-4 already prune tokens (Evo-ViT scores from a class token made at stage 3)")
# --- end uniformer_light ---

# --- crossformer_pp (zoo wave 2) ---
from ..models import crossformer_pp as _crossformer_pp  # noqa: E402

# CrossFormer++ reuses CrossFormer's blocks and mixer (GroupAttention: "group_attention", bound to the grid). A block
# that ends with an amplitude cooling layer (depthwise conv + LayerNorm whose output replaces the residual stream) is
# not an x + f(x) that can be dropped.
BLOCKS[_crossformer_pp.CooledCrossFormerBlock] = BlockRule(["attn"], ["mlp"], "nhwc", True, residual=False)


@register_adapter(_crossformer_pp.CrossFormerPP)
def _crossformer_pp_spec(model) -> ModelSpec:
    return staged_spec(model, "vl_crossformer_pp")
# --- end crossformer_pp ---

# --- stvit (zoo wave 2) ---
from ..models import stvit as _stvit  # noqa: E402

# Super token attention: softmax MHSA (fused qkv, proj) among super tokens sampled from the grid by a sparse 3 x 3
# association, mapped back through it: attention over a reduced set of tokens, like PVT v2's spatial reduction.
# With 1 x 1 cells (stages 3-4) it is plain global MHSA over the tokens.
MIXERS[_stvit.SuperTokenAttention] = ("sra_attention", lambda m: m.stoken_size == (1, 1))
# grid use: the block's depthwise position conv, the association's cells, the depthwise conv in the MLP
BLOCKS[_stvit.SuperTokenBlock] = BlockRule(["attn"], ["mlp"], "nhwc", True)


@register_adapter(_stvit.STViT)
def _stvit_spec(model) -> ModelSpec:
    return staged_spec(model, "vl_stvit")
# --- end stvit ---

# --- vivit (video) ---
from ..models import vivit as _vivit  # noqa: E402


@register_adapter(_vivit.ViViT)
def _vivit_spec(model) -> ModelSpec:
    """ViViT's blocks are timm `Block`s over (class token + tubelet tokens): model 1 one joint space-time stage;
    model 2 a spatial stage (run on each tubelet-frame's tokens, frames folded into the batch) and a temporal stage
    over the frames' class tokens, each sequence with its own class token first."""
    stages = [StageSpec("blocks", _blocks(model.blocks, "blocks", 1))]
    if model.factorised:
        stages.append(StageSpec("temporal_blocks", _blocks(model.temporal_blocks, "temporal_blocks", 1)))
    return _spec(model, "vivit", stages, prefix=1)


from ..models import videomae as _videomae  # noqa: E402


@register_adapter(_videomae.VideoMAE)
def _videomae_spec(model) -> ModelSpec:
    """VideoMAE: timm `Block`s over the tubelet tokens, no class token (the head averages them)."""
    return _spec(model, "videomae", [StageSpec("blocks", _blocks(model.blocks, "blocks", 0))])
# --- end vivit ---

# --- uniformerv2 (video) ---
from ..models import uniformerv2 as _uniformerv2  # noqa: E402

# A UniBlock is a timm Block over each frame's (class + patch) tokens; its local MHRA convolves the patch tokens
# over time at each grid position, and the decoder's position conv reads the grid of the blocks' outputs.
BLOCKS[_uniformerv2.UniBlock] = BlockRule(["attn"], ["mlp"], "sequence", True)


@register_adapter(_uniformerv2.UniFormerV2)
def _uniformerv2_spec(model) -> ModelSpec:
    """UniFormerV2: UniBlocks (frames folded into the batch, class token first); the query decoder is head-side."""
    return _spec(model, "uniformerv2", [StageSpec("blocks", _blocks(model.blocks, "blocks", 1))], prefix=1)
# --- end uniformerv2 ---

# --- stprivacy (video) ---
from ..models import stprivacy as _stprivacy  # noqa: E402


@register_adapter(_stprivacy.STPrivacy)
def _stprivacy_spec(model) -> ModelSpec:
    """STPrivacy: tubelet selection runs before any block; `blocks` are timm `Block`s over (class token + kept
    tubelet tokens), so token reduction inside them sees an ordinary ViT sequence."""
    return _spec(model, "stprivacy", [StageSpec("blocks", _blocks(model.blocks, "blocks", 1))], prefix=1)
# --- end stprivacy ---

# --- resnas (architecture search) ---
from ..models import resnas as _resnas  # noqa: E402


@register_adapter(_resnas.ResNAS)
def _resnas_spec(model) -> ModelSpec:
    """ViT-Res: timm `Block`s over (class token + patch tokens) in one `blocks` sequence; a residual spatial reduction
    (a strided conv on the grid) between stages is each later stage's downsample. The blocks do not use the grid."""
    stages, current, down = [], [], None
    for i, layer in enumerate(model.blocks):
        if isinstance(layer, _resnas.ResidualSpatialReduction):
            stages.append(StageSpec("blocks", current, down))
            current, down = [], f"blocks.{i}"
        elif _rule(layer) is not None:
            current.append(block_of(layer, f"blocks.{i}", 1))
    stages.append(StageSpec("blocks", current, down))
    return _spec(model, "vl_resnas", [s for s in stages if s.blocks], prefix=1)
# --- end resnas ---

# --- predformer (video prediction) ---
from ..models import predformer as _predformer  # noqa: E402

# A gated block is a timm Block (SwiGLU MLP) whose unit folds the (T, N) token grid into the batch and back after
# its blocks: merging or dropping tokens would break that reshape, so the blocks need their grid.
BLOCKS[_predformer.GatedBlock] = BlockRule(["attn"], ["mlp"], "sequence", True)


@register_adapter(_predformer.PredFormer)
def _predformer_spec(model) -> ModelSpec:
    """PredFormer: one stage per gated transformer (spatial, temporal or full space-time), no class token."""
    return _spec(model, "vl_predformer", [StageSpec(f"units.{i}", _blocks(u.blocks, f"units.{i}.blocks"))
                                          for i, u in enumerate(model.units)])
# --- end predformer ---

# --- paab (pose-aware video ViT) ---
from ..models import paab as _paab  # noqa: E402

# PAAB: a timm Block run per tubelet-frame (frames folded into the batch) with attention masked to the keypoint
# patches at their grid positions, so it needs every tubelet token in place.
BLOCKS[_paab.PoseAwareBlock] = BlockRule(["attn"], ["mlp"], "sequence", True)


@register_adapter(_paab.PoseAwareViViT)
def _paab_spec(model) -> ModelSpec:
    """ViViT model 1's timm `Block`s over (class token + tubelet tokens), then the PAAB after block `paab_after`."""
    blocks = _blocks(model.blocks, "blocks", 1)
    paab = block_of(model.paab, "paab", 1)
    paab.mixers[0].global_tokens = False       # its attention is masked to the keypoint patches
    return _spec(model, "vl_paab", [StageSpec("blocks", blocks[:model.paab_after] + [paab] +
                                              blocks[model.paab_after:])], prefix=1)
# --- end paab ---

# --- vim (plain Vision Mamba) ---
from ..models import vim as _vim  # noqa: E402

# bidirectional selective scans (decayed causal recurrences, both directions) after a causal conv1d: not global
# attention; dropping a token changes later states (vitlab.tokens.topvim prunes it with hidden-state alignment)
MIXERS[_vim.BiMambaMixer] = ("retention", False)
BLOCKS[_vim.VimBlock] = BlockRule(["mixer"], [], "sequence", False)


@register_adapter(_vim.VisionMamba)
def _vim_spec(model) -> ModelSpec:
    return _spec(model, "vl_vim", [StageSpec("blocks", _blocks(model.blocks, "blocks"))],
                 notes="the class token is in the MIDDLE of the sequence (Vim's middle class token), not a prefix")
# --- end vim ---
