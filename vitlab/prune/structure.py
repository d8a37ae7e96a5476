"""Pruning units of a timm ViT, their costs, and the surgery that removes them (pure functions + one model rebuild).

A *unit* is what one importance score ranks: one attention head of block i (its q, k, v rows of `attn.qkv` and its
columns of `attn.proj`), one group of `mlp_group` hidden channels of block i's MLP (rows of `mlp.fc1`, columns of
`mlp.fc2`), or (when asked) a whole block, one GroupNorm group of a conv stem layer (`vl_vit_fmnist`'s ConvStem:
the group's output channels of conv l and its GroupNorm, the matching input channels of conv l+1 or of the patch
projection), or a group of embedding (residual) channels (every consumer of the residual width: cls/pos embeddings,
the patch projection's outputs, every LayerNorm, qkv/fc1 inputs, proj/fc2 outputs, the head's inputs).

Stem units are whole GroupNorm groups, so the kept groups normalise exactly the channels they did before: removing
a stem unit equals zeroing its GroupNorm weight and bias (GELU(0) = 0), checked in tests/prune/test_prune.py. Embedding
channels have no such identity (every LayerNorm's mean and variance change), which is one reason the speed table
(benchmarks/prune_speed.py) ranks them last.

Costs are analytic MACs per image and parameter counts (`variable_macs`, `variable_params`), checked against
`vitlab.profiling.count_flops` and `sum(p.numel())` in tests/prune/test_prune.py.
"""
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..record import record, update_record
from ..models.pruned_vit import block_widths, vl_pruned_vit
from ..checkpoint import model_spec
from ..models.vit_fmnist import ConvStem

__all__ = ["Unit", "Widths", "model_widths", "block_macs", "block_params", "units", "keep_indices", "keep_channels",
           "remove_unit", "stem_macs", "variable_macs", "variable_params", "stem_layers", "prune_model_"]


@dataclass(frozen=True)
class Unit:
    """One prunable unit: kind "head" | "mlp" | "block" | "stem" | "embed", its block (stem: its conv layer), the
    head / group number and the channels it owns (MLP hidden, stem or embedding channels)."""
    kind: str
    block: int
    index: int = 0            # head number, or group number
    channels: tuple = ()      # MLP hidden / stem / embedding channels of this group


@dataclass(frozen=True)
class Widths:
    """Per-block widths of a ViT plus what the formulas need: tokens, embedding width, stem and head shapes.

    A removed block has 0 heads and 0 MLP channels. `stem` / `stem_groups` / `stem_pixels` / `stem_kernel`: output
    channels, GroupNorm groups, output pixels and kernel area of each conv-stem layer (empty without a ConvStem).
    """
    num_heads: tuple
    head_dim: tuple
    mlp_hidden: tuple
    tokens: int
    dim: int
    stem: tuple = ()
    stem_groups: tuple = ()
    stem_pixels: tuple = ()
    stem_kernel: tuple = ()
    in_chans: int = 1
    patches: int = 0          # tokens from the patch projection
    proj_kernel: int = 1      # the patch projection's kernel area
    proj_bias: bool = True
    classes: int = 0          # head outputs (0: no Linear head)
    dim_params: int = 0       # parameters outside blocks/stem/projection/head per embedding channel (pos, cls, norm)
    qkv_bias: bool = True

    def macs(self, i: int, heads: int | None = None, hidden: int | None = None) -> int:
        return block_macs(self.tokens, self.dim, self.num_heads[i] if heads is None else heads, self.head_dim[i],
                          self.mlp_hidden[i] if hidden is None else hidden)


def stem_layers(model: nn.Module) -> list[tuple[nn.Conv2d, nn.GroupNorm]]:
    """(conv, norm) pairs of a vitlab ConvStem feeding the patch projection; [] for any other patch embedding."""
    backbone = getattr(model.patch_embed, "backbone", None)
    if not isinstance(backbone, ConvStem):
        return []
    mods = list(backbone)
    return [(m, mods[k + 1]) for k, m in enumerate(mods) if isinstance(m, nn.Conv2d)]


def _conv_out(size: tuple[int, int], conv: nn.Conv2d) -> tuple[int, int]:
    return tuple((s + 2 * p - d * (k - 1) - 1) // st + 1
                 for s, p, d, k, st in zip(size, conv.padding, conv.dilation, conv.kernel_size, conv.stride))


def model_widths(model: nn.Module) -> Widths:
    w = block_widths(model)
    pe = model.patch_embed
    tokens = int(pe.num_patches) + int(getattr(model, "num_prefix_tokens", 1))
    dim = int(model.embed_dim)
    stem, groups, pixels, kernel = [], [], [], []
    size = tuple(pe.img_size)
    for conv, norm in stem_layers(model):
        size = _conv_out(size, conv)
        stem.append(conv.out_channels)
        groups.append(norm.num_groups)
        pixels.append(size[0] * size[1])
        kernel.append(conv.kernel_size[0] * conv.kernel_size[1])
    proj = pe.proj
    head = getattr(model, "head", None)
    dim_params = sum(p.numel() for name, p in model.named_parameters()
                     if name.split(".")[0] in ("pos_embed", "cls_token", "reg_token", "norm", "fc_norm")) // dim
    return Widths(tuple(w["num_heads"]), tuple(w["head_dim"]), tuple(w["mlp_hidden"]), tokens, dim,
                  tuple(stem), tuple(groups), tuple(pixels), tuple(kernel), int(getattr(pe, "in_chans", 1)),
                  int(pe.num_patches), int(proj.kernel_size[0] * proj.kernel_size[1]), proj.bias is not None,
                  int(head.out_features) if isinstance(head, nn.Linear) else 0, int(dim_params),
                  model.blocks[0].attn.qkv.bias is not None if len(model.blocks) else True)


def block_macs(tokens: int, dim: int, heads: int, head_dim: int, hidden: int) -> int:
    """MACs per image of one pre-norm ViT block (matmuls; norms, softmax, GELU and adds are not MACs):

    qkv N*dim*3hd + attention 2*N*N*hd (q@k^T and attn@v) + proj N*hd*dim + MLP 2*N*dim*hidden, hd = heads*head_dim.
    """
    hd = heads * head_dim
    return tokens * dim * 3 * hd + 2 * tokens * tokens * hd + tokens * hd * dim + 2 * tokens * dim * hidden


def block_params(dim: int, heads: int, head_dim: int, hidden: int, qkv_bias: bool = True) -> int:
    """Parameters of one timm Block with LayerNorms and proj/fc biases (qkv bias when `qkv_bias`)."""
    hd = heads * head_dim
    return (4 * dim                                          # norm1, norm2 weight + bias
            + dim * 3 * hd + (3 * hd if qkv_bias else 0)     # qkv
            + hd * dim + dim                                 # proj
            + dim * hidden + hidden + hidden * dim + dim)    # fc1, fc2


def _proj_in(w: Widths) -> int:
    return w.stem[-1] if w.stem else w.in_chans


def stem_macs(w: Widths) -> list[int]:
    """MACs per image of each conv-stem layer: pixels_l * k_l * C_l * C_(l-1)."""
    out, prev = [], w.in_chans
    for c, px, k in zip(w.stem, w.stem_pixels, w.stem_kernel):
        out.append(px * k * c * prev)
        prev = c
    return out


def variable_macs(w: Widths) -> int:
    """MACs per image of everything pruning can change: blocks, conv stem, patch projection, head.

    Stem conv l: pixels_l * k_l * C_l * C_(l-1); projection: patches * k * dim * C_in; head: dim * classes
    (it reads one token). The rest (norms, GELU, softmax, adds) are not MACs.
    """
    blocks = sum(w.macs(i) for i in range(len(w.num_heads)) if w.num_heads[i])
    return blocks + sum(stem_macs(w)) + w.patches * w.proj_kernel * w.dim * _proj_in(w) + w.dim * w.classes


def variable_params(w: Widths) -> int:
    """Parameters of everything pruning can change (stem convs have no bias; GroupNorm has 2 per channel)."""
    blocks = sum(block_params(w.dim, h, d, m, w.qkv_bias)
                 for h, d, m in zip(w.num_heads, w.head_dim, w.mlp_hidden) if h)
    prev, stem = w.in_chans, 0
    for c, k in zip(w.stem, w.stem_kernel):
        stem += k * c * prev + 2 * c
        prev = c
    proj = w.proj_kernel * w.dim * _proj_in(w) + (w.dim if w.proj_bias else 0)
    head = w.dim * w.classes + w.classes if w.classes else 0
    return blocks + stem + proj + head + w.dim_params * w.dim


def remove_unit(w: Widths, u: Unit) -> Widths:
    """The widths after removing `u` (a removed block keeps 0 heads and 0 MLP channels)."""
    def put(values, i, v):
        return tuple(v if j == i else x for j, x in enumerate(values))

    if u.kind == "head":
        return dataclasses.replace(w, num_heads=put(w.num_heads, u.block, w.num_heads[u.block] - 1))
    if u.kind == "mlp":
        return dataclasses.replace(w, mlp_hidden=put(w.mlp_hidden, u.block, w.mlp_hidden[u.block] - len(u.channels)))
    if u.kind == "block":
        return dataclasses.replace(w, num_heads=put(w.num_heads, u.block, 0), mlp_hidden=put(w.mlp_hidden, u.block, 0))
    if u.kind == "stem":
        return dataclasses.replace(w, stem=put(w.stem, u.block, w.stem[u.block] - len(u.channels)),
                                   stem_groups=put(w.stem_groups, u.block, w.stem_groups[u.block] - 1))
    if u.kind == "embed":
        return dataclasses.replace(w, dim=w.dim - len(u.channels))
    raise ValueError(f"unknown unit kind {u.kind!r}")


def units(widths: Widths, mlp_group: int = 8, blocks: bool = False, stem: bool = False,
          embed_group: int | None = None) -> list[Unit]:
    """Every prunable unit: heads, MLP channel groups of `mlp_group` (the last may be smaller), blocks if asked,
    the stem's GroupNorm groups if `stem`, and groups of `embed_group` embedding channels if given."""
    out = []
    for i, (h, m) in enumerate(zip(widths.num_heads, widths.mlp_hidden)):
        out += [Unit("head", i, j) for j in range(h)]
        out += [Unit("mlp", i, g, tuple(range(s, min(s + mlp_group, m)))) for g, s in enumerate(range(0, m, mlp_group))]
        if blocks:
            out.append(Unit("block", i))
    if stem:
        for layer, (c, g) in enumerate(zip(widths.stem, widths.stem_groups)):
            per = c // g
            out += [Unit("stem", layer, j, tuple(range(j * per, (j + 1) * per))) for j in range(g)]
    if embed_group:
        out += [Unit("embed", 0, g, tuple(range(s, min(s + embed_group, widths.dim))))
                for g, s in enumerate(range(0, widths.dim, embed_group))]
    return out


def keep_indices(widths: Widths, removed: list[Unit]) -> tuple[list[int], dict[int, list[int]], dict[int, list[int]]]:
    """(kept blocks, kept heads per block, kept MLP channels per block) after removing `removed`."""
    gone_blocks = {u.block for u in removed if u.kind == "block"}
    gone_heads = {(u.block, u.index) for u in removed if u.kind == "head"}
    gone_ch = {(u.block, c) for u in removed if u.kind == "mlp" for c in u.channels}
    keep_blocks = [i for i in range(len(widths.num_heads)) if i not in gone_blocks]
    heads = {i: [j for j in range(widths.num_heads[i]) if (i, j) not in gone_heads] for i in keep_blocks}
    hidden = {i: [c for c in range(widths.mlp_hidden[i]) if (i, c) not in gone_ch] for i in keep_blocks}
    for i in keep_blocks:
        if not heads[i] or not hidden[i]:
            raise ValueError(f"block {i} would keep {len(heads[i])} heads and {len(hidden[i])} MLP channels: a kept "
                             "block needs at least one of each (remove the whole block instead)")
    return keep_blocks, heads, hidden


def keep_channels(widths: Widths, removed: list[Unit]) -> tuple[list[list[int]] | None, list[int] | None]:
    """(kept channels per stem layer, kept embedding channels); None where no unit of that kind is removed."""
    stem = embed = None
    if any(u.kind == "stem" for u in removed):
        gone = {(u.block, c) for u in removed if u.kind == "stem" for c in u.channels}
        stem = [[c for c in range(n) if (layer, c) not in gone] for layer, n in enumerate(widths.stem)]
        if any(not kept for kept in stem):
            raise ValueError(f"stem widths would be {[len(k) for k in stem]}: every stem layer keeps at least one group")
    if any(u.kind == "embed" for u in removed):
        gone = {c for u in removed if u.kind == "embed" for c in u.channels}
        embed = [c for c in range(widths.dim) if c not in gone]
        if not embed:
            raise ValueError("every embedding channel would be removed: keep at least one group")
    return stem, embed


def _head_rows(heads: list[int], num_heads: int, head_dim: int) -> torch.Tensor:
    """Rows of qkv.weight for `heads`: qkv's output is laid out (3, num_heads, head_dim)."""
    rows = [t * num_heads * head_dim + h * head_dim + d for t in range(3) for h in heads for d in range(head_dim)]
    return torch.tensor(rows, dtype=torch.long)


def _head_cols(heads: list[int], head_dim: int) -> torch.Tensor:
    return torch.tensor([h * head_dim + d for h in heads for d in range(head_dim)], dtype=torch.long)


# Parameters of a timm Block indexed by the residual (embedding) width: name -> the dimension that is the width.
_BLOCK_EMBED_DIM = {"norm1.weight": 0, "norm1.bias": 0, "norm2.weight": 0, "norm2.bias": 0,
                    "attn.qkv.weight": 1, "attn.proj.weight": 0, "attn.proj.bias": 0,
                    "mlp.fc1.weight": 1, "mlp.fc2.weight": 0, "mlp.fc2.bias": 0, "ls1.gamma": 0, "ls2.gamma": 0}
_BLOCK_OTHER = ("attn.qkv.bias", "mlp.fc1.bias", "attn.norm.weight", "attn.norm.bias", "mlp.norm.weight",
                "mlp.norm.bias", "attn.q_norm.weight", "attn.q_norm.bias", "attn.k_norm.weight", "attn.k_norm.bias")
# Outside the blocks: name -> the dimension that is the embedding width.
_OUTER_EMBED_DIM = {"cls_token": 2, "reg_token": 2, "pos_embed": 2, "patch_embed.proj.weight": 0,
                    "patch_embed.proj.bias": 0, "norm.weight": 0, "norm.bias": 0, "fc_norm.weight": 0,
                    "fc_norm.bias": 0, "head.weight": 1}


def _select(value: torch.Tensor, dim: int, index) -> torch.Tensor:
    return value.index_select(dim, torch.as_tensor(index, dtype=torch.long, device=value.device))


def _sliced_state(model: nn.Module, old: Widths, keep_blocks, heads, hidden, stem, embed) -> dict:
    stem_names = {}
    if stem is not None:
        names = {id(m): n for n, m in model.named_modules()}
        layers = stem_layers(model)
        for layer, (conv, norm) in enumerate(layers):
            stem_names[f"{names[id(conv)]}.weight"] = [(0, stem[layer])] + ([(1, stem[layer - 1])] if layer else [])
            stem_names[f"{names[id(norm)]}.weight"] = [(0, stem[layer])]
            stem_names[f"{names[id(norm)]}.bias"] = [(0, stem[layer])]
        stem_names["patch_embed.proj.weight"] = [(1, stem[-1])]
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("blocks."):
            i = int(key.split(".")[1])
            if i not in keep_blocks:
                continue
            rest = key[len(f"blocks.{i}."):]
            nh, hd = old.num_heads[i], old.head_dim[i]
            if rest in ("attn.qkv.weight", "attn.qkv.bias"):
                value = value[_head_rows(heads[i], nh, hd)]
            elif rest == "attn.proj.weight":
                value = value[:, _head_cols(heads[i], hd)]
            elif rest in ("attn.norm.weight", "attn.norm.bias"):
                value = value[_head_cols(heads[i], hd)]
            elif rest in ("mlp.fc1.weight", "mlp.fc1.bias", "mlp.norm.weight", "mlp.norm.bias"):
                value = value[torch.tensor(hidden[i], dtype=torch.long)]
            elif rest == "mlp.fc2.weight":
                value = value[:, torch.tensor(hidden[i], dtype=torch.long)]
            if embed is not None:
                if rest in _BLOCK_EMBED_DIM:
                    value = _select(value, _BLOCK_EMBED_DIM[rest], embed)
                elif rest not in _BLOCK_OTHER:
                    raise ValueError(f"embedding pruning does not know how to slice blocks.{i}.{rest}; prune with "
                                     "embed=false for this model")
            key = f"blocks.{keep_blocks.index(i)}.{rest}"
        else:
            for d, index in stem_names.get(key, ()):
                value = _select(value, d, index)
            if embed is not None and key in _OUTER_EMBED_DIM:
                value = _select(value, _OUTER_EMBED_DIM[key], embed)
        state[key] = value.clone()
    return state


@torch.no_grad()
def prune_model_(model: nn.Module, keep_blocks: list[int], heads: dict[int, list[int]],
                 hidden: dict[int, list[int]], stem: list[list[int]] | None = None,
                 embed: list[int] | None = None) -> nn.Module:
    """Remove blocks, heads, MLP channels (and stem / embedding channels) of a timm VisionTransformer in place.

    The sliced weights are loaded (strictly) into a `vl_pruned_vit` built from the new config alone, whose modules
    then replace `model`'s: so the pruned model is, by construction, what `create_model(DIR)` rebuilds after
    `save_checkpoint`. `stem`: kept channels per ConvStem layer (whole GroupNorm groups); `embed`: kept embedding
    channels. Afterwards `model.vitlab.arch` describes the `vl_pruned_vit`.
    """
    spec = model_spec(model)
    if spec["name"] == "vl_pruned_vit":
        base, base_kwargs = spec["kwargs"]["base"], dict(spec["kwargs"]["base_kwargs"])
    else:
        base, base_kwargs = spec["name"], dict(spec["kwargs"])
    old = model_widths(model)
    if stem is not None:
        if not old.stem:
            raise ValueError(f"{base} has no conv stem to prune (only vitlab's ConvStem, e.g. vl_vit_fmnist): stem=false")
        if "stem_widths" not in base_kwargs:
            raise ValueError(f"base {base} does not take stem_widths, so a pruned stem cannot be rebuilt: stem=false")
        per = [c // g for c, g in zip(old.stem, old.stem_groups)]
        if any(len(k) % p for k, p in zip(stem, per)):
            raise ValueError(f"stem channels {[len(k) for k in stem]} are not whole GroupNorm groups of {per}")
        base_kwargs["stem_widths"] = [len(k) for k in stem]
        base_kwargs["stem_groups"] = [len(k) // p for k, p in zip(stem, per)]
    if embed is not None:
        base_kwargs["embed_dim"] = len(embed)
        if len(embed) % int(base_kwargs.get("num_heads", 1)):
            base_kwargs["num_heads"] = 1  # the base's own head count must divide its width; blocks get theirs below
    state = _sliced_state(model, old, keep_blocks, heads, hidden, stem, embed)
    base_kwargs["depth"] = len(keep_blocks)
    new = vl_pruned_vit(base=base, base_kwargs=base_kwargs, num_heads=[len(heads[i]) for i in keep_blocks],
                        head_dim=[old.head_dim[i] for i in keep_blocks], mlp_hidden=[len(hidden[i]) for i in keep_blocks])
    new.load_state_dict(state, strict=True)
    ref = next(model.parameters())
    new.to(device=ref.device, dtype=ref.dtype).train(model.training)
    kept = record(model)              # e.g. its checkpoint (the source's preprocessing)
    model.__dict__.clear()
    model.__dict__.update(vars(new))  # same object for callers; its modules are the rebuilt model's
    update_record(model, **{**vars(kept), "arch": record(new).arch, "spec": {"name": "vl_pruned_vit", "kwargs": {}}})
    return model
