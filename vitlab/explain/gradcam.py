"""The grad-CAM family through pytorch-grad-cam (`grad-cam` on PyPI): grad-CAM, grad-CAM++, LayerCAM, EigenCAM.

pytorch-grad-cam computes the maps; vitlab only says where to look and how to read what it sees there, both from
the model contract (`vitlab.contract.describe`), with nothing fixed to one family or one grid:

- the target layer is the block's output, or its first norm (`norm1`) in a block with prefix tokens (as
  pytorch-grad-cam's ViT tutorial does: with class-token pooling the last block's patch outputs reach the head only
  through the class token, which they no longer meet; the block's normalized input does) or whose output is not one
  tensor (a tuple with scores). The last block by default; `layer=` picks another (an index into the contract's
  blocks, or a block name);
- the reshape transform follows the block's layout: "sequence" (B, N, C) drops the prefix tokens and folds the
  patches into their (gh, gw) grid, found from the token count and the image's aspect ratio (a PVT stage's grid as
  well as a ViT's); "nhwc" is permuted to NCHW; "nchw" is taken as it is;
- token-reduced models (ToMe, EViT, ...: `vitlab.tokens.patch.TokenReducingModel`) run with source tracing on, and
  the target layer's N' tokens are spread back over the patches they stand for: each patch takes its token's
  activation and gradient, so each patch gets its token's CAM value (grad-CAM's channel weights become means over
  patches, i.e. over tokens weighted by size); patches whose token was dropped (EViT without fusion) get 0.

Pruned models need nothing special (the contract describes the pruned widths); int8-simulated models are explained
through their fake-quant module, whose rounding passes gradients straight through.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from ..contract import BlockSpec, describe
from ..techniques import TechniqueNotApplicable
from .core import ExplainError, register_method

__all__ = ["CAM_METHODS", "cam_target", "cam_saliency"]

# vitlab method name -> pytorch-grad-cam class (the fast ones: one forward and at most one backward per batch)
CAM_METHODS = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "layercam": "LayerCAM", "eigencam": "EigenCAM"}


def cam_target(model: nn.Module, images: torch.Tensor, method: str,
               layer: int | str | None = None) -> tuple[BlockSpec, nn.Module, str]:
    """(block, target module, its qualified name): the block `layer` (index into the contract's blocks in execution
    order, or a block name; default the last) and the module inside it whose output the CAM reads on `images`."""
    try:
        spec = describe(model, technique=f"--method {method}")
    except TechniqueNotApplicable as e:
        raise ExplainError(str(e)) from e   # names the model, the method and how to register an adapter
    blocks = spec.blocks
    if not blocks:
        raise ExplainError(f"--method {method}: the contract of {type(model).__name__} names no blocks to take a CAM "
                           "from")
    if layer is None:
        block = blocks[-1]
    elif isinstance(layer, int):
        if not -len(blocks) <= layer < len(blocks):
            raise ExplainError(f"--method {method}: layer={layer} is out of range for {type(model).__name__}, which "
                               f"has {len(blocks)} blocks (use 0..{len(blocks) - 1} or negative indices)")
        block = blocks[layer]
    else:
        named = [b for b in blocks if b.name == layer]
        if not named:
            raise ExplainError(f"--method {method}: layer={layer!r} is not a block of {type(model).__name__}; its "
                               f"blocks are {', '.join(b.name for b in blocks)}")
        block = named[0]
    norm1 = getattr(block.module, "norm1", None)
    if isinstance(norm1, nn.Module) and (block.num_prefix_tokens > 0 or not _returns_tensor(model, block, images)):
        return block, norm1, f"{block.name}.norm1"
    return block, block.module, block.name


def _returns_tensor(model: nn.Module, block: BlockSpec, images: torch.Tensor) -> bool:
    """Whether the block's output is one tensor (some blocks also return scores or a second stream) on one image."""
    seen = {}
    handle = block.module.register_forward_hook(lambda module, inputs, output: seen.update(output=output))
    try:
        with torch.no_grad():
            model(images[:1])
    finally:
        handle.remove()
    return isinstance(seen.get("output"), torch.Tensor)


def patch_grid(num_patches: int, height: int, width: int) -> tuple[int, int] | None:
    """The (gh, gw) with gh * gw = num_patches whose aspect ratio is closest to the image's; None if no such
    factorisation comes within a factor 1.5 of it (then the tokens are not one grid over the image)."""
    aspect = width / height
    best = min(((gh, num_patches // gh) for gh in range(1, num_patches + 1) if num_patches % gh == 0),
               key=lambda g: abs(g[1] / g[0] / aspect - 1))
    return best if 1 / 1.5 <= best[1] / best[0] / aspect <= 1.5 else None


def _reshape_transform(model: nn.Module, block: BlockSpec, images: torch.Tensor, method: str,
                       traced: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function that turns the target layer's output (and its gradient) into (B, C, gh, gw) maps over the image;
    `traced["sources"]` maps a token count N' to the token-reduction source (B, N', N0) the target layer saw with that
    many tokens (MCTF calls `norm1` before and after fusing); empty: no reduction before the target layer."""
    H, W = images.shape[-2:]
    name = type(model).__name__

    def to_maps(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise ExplainError(f"--method {method}: {block.name} of {name} returns a {type(t).__name__}, not one "
                               "tensor; pytorch-grad-cam needs a block whose output is a tensor: pick one with "
                               "layer=, or use another --method")
        if t.dim() == 4:
            return t.permute(0, 3, 1, 2) if block.layout == "nhwc" else t   # (B, C, h, w)
        if t.dim() != 3:
            raise ExplainError(f"--method {method}: {block.name} of {name} gives a {t.dim()}-d tensor; CAMs need a "
                               "(B, N, C) sequence or a (B, C, H, W) / (B, H, W, C) map")
        B, N, C = t.shape
        sources = traced["sources"]
        prefix = traced.get("num_prefix", block.num_prefix_tokens)
        if sources:
            if N not in sources:
                raise ExplainError(f"--method {method}: {block.name} of {name} sees {N} tokens but the token "
                                   f"reduction traced {', '.join(map(str, sources))}; pick a block inside the "
                                   "reduced sequence with layer=")
            source = sources[N]
            patches = source[:, :, prefix:]                                  # (B, N, P) token i covers patch p
            token = patches.argmax(1)                                        # (B, P) the token each patch is in
            dropped = patches.sum(1) == 0                                    # (B, P) patch of a dropped token
            t = t.gather(1, token[..., None].expand(-1, -1, C))              # (B, P, C)
            t = t.masked_fill(dropped[..., None], 0)
        else:
            t = t[:, prefix:]                                                # (B, P, C)
        grid = patch_grid(t.shape[1], H, W)
        if grid is None:
            raise ExplainError(f"--method {method}: the {t.shape[1]} tokens after the {prefix} prefix tokens that "
                               f"{block.name} of {name} sees form no grid over a {H}x{W} image (a block that runs on "
                               "a subset of its tokens, or a class token elsewhere than first); pick a block whose "
                               "tokens cover the image with layer= (an index or name in its contract's blocks)")
        return t.transpose(1, 2).reshape(B, C, *grid)                        # (B, C, gh, gw)

    def checked(t: torch.Tensor) -> torch.Tensor:
        maps = to_maps(t)
        if maps.shape[-2:].numel() == 1:
            raise ExplainError(f"--method {method}: {block.name} of {name} sees a 1x1 map at {H}x{W} pixels, which "
                               "locates nothing; pick an earlier block with layer=, or feed larger images")
        return maps

    return checked


def cam_saliency(model: nn.Module, images: torch.Tensor, target: torch.Tensor, method: str = "gradcam",
                 layer: int | str | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """(B, H, W) CAMs of `method` (a key of `CAM_METHODS`) for classes `target` (B,) at the block `layer`, as
    pytorch-grad-cam computes them (ReLU, each map scaled to [0, 1], bilinear to the image), and extras naming the
    target layer. The parameters' .grad are left cleared."""
    try:
        import pytorch_grad_cam
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError as e:
        raise ExplainError(f"--method {method} needs pytorch-grad-cam: pip install grad-cam") from e
    block, target_module, target_name = cam_target(model, images, method, layer)
    # the token sequence the block belongs to, if a token reduction was applied to it
    state = getattr(block.mixer.module, "token_state", None) if block.mixer is not None else None
    traced: dict[str, Any] = {"sources": {}}
    if state is not None:
        traced["num_prefix"] = state.num_prefix

    def record_source(module: nn.Module, inputs: Any, output: Any) -> None:
        if state.source is not None:
            traced["sources"][state.source.shape[1]] = state.source.detach()

    # registered before pytorch-grad-cam's own hooks, so the source is known when its hook reshapes the output
    handle = target_module.register_forward_hook(record_source) if state is not None else None
    previous = state.trace_source if state is not None else False
    cam = getattr(pytorch_grad_cam, CAM_METHODS[method])(
        model, [target_module], reshape_transform=_reshape_transform(model, block, images, method, traced))
    try:
        if state is not None:
            state.trace_source = True
        with torch.enable_grad():
            # an input that requires grad gives the target layer a gradient even where the parameters are frozen
            inputs = images.detach().clone().requires_grad_(cam.uses_gradients)
            maps = cam(inputs, [ClassifierOutputTarget(int(t)) for t in target])   # (B, H, W) numpy
        grads = cam.activations_and_grads.gradients
        if cam.uses_gradients and not any(bool(g.ne(0).any()) for g in grads):
            raise ExplainError(f"--method {method}: the gradient of the target classes at {target_name} of "
                               f"{type(model).__name__} is zero; pick an earlier block with layer=, or use "
                               "--method eigencam, which needs no gradient")
    finally:
        cam.activations_and_grads.release()
        if handle is not None:
            handle.remove()
        if state is not None:
            state.trace_source = previous
        model.zero_grad(set_to_none=True)
    return torch.from_numpy(maps), {"layer": target_name}


def _register(name: str) -> None:
    def method(model: nn.Module, images: torch.Tensor, target: torch.Tensor,
               layer: int | str | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        return cam_saliency(model, images, target, name, layer)

    method.__doc__ = f"{CAM_METHODS[name]} of pytorch-grad-cam at the block `layer` (default the last)."
    register_method(name)(method)


for _name in CAM_METHODS:
    _register(_name)
