"""Pruning units of a timm ViT, their costs, and the surgery that removes them (pure functions + one in-place edit).

A *unit* is what one importance score ranks: one attention head of block i (its q, k, v rows of `attn.qkv` and its
columns of `attn.proj`), one group of `mlp_group` hidden channels of block i's MLP (rows of `mlp.fc1`, columns of
`mlp.fc2`), or (when asked) a whole block. Costs are analytic MACs per image and parameter counts, the formulas
checked against `vitlab.profiling.count_flops` and `sum(p.numel())` in tests/test_prune.py.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..models.pruned_vit import block_widths, set_block_widths

__all__ = ["Unit", "Widths", "model_widths", "block_macs", "block_params", "units", "keep_indices", "prune_model_"]


@dataclass(frozen=True)
class Unit:
    """One prunable unit: kind "head" | "mlp" | "block", its block, and the channels it owns (head / MLP index)."""
    kind: str
    block: int
    index: int = 0            # head number, or MLP group number
    channels: tuple = ()      # MLP hidden channels of this group


@dataclass(frozen=True)
class Widths:
    """Per-block widths of a ViT plus what the formulas need: tokens, embedding width, qkv/proj bias."""
    num_heads: tuple
    head_dim: tuple
    mlp_hidden: tuple
    tokens: int
    dim: int

    def macs(self, i: int, heads: int | None = None, hidden: int | None = None) -> int:
        return block_macs(self.tokens, self.dim, self.num_heads[i] if heads is None else heads, self.head_dim[i],
                          self.mlp_hidden[i] if hidden is None else hidden)


def model_widths(model: nn.Module) -> Widths:
    w = block_widths(model)
    tokens = int(model.patch_embed.num_patches) + int(getattr(model, "num_prefix_tokens", 1))
    return Widths(tuple(w["num_heads"]), tuple(w["head_dim"]), tuple(w["mlp_hidden"]), tokens, int(model.embed_dim))


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


def units(widths: Widths, mlp_group: int = 8, blocks: bool = False) -> list[Unit]:
    """Every prunable unit: heads, MLP channel groups of `mlp_group` (the last may be smaller), and blocks if asked."""
    out = []
    for i, (h, m) in enumerate(zip(widths.num_heads, widths.mlp_hidden)):
        out += [Unit("head", i, j) for j in range(h)]
        out += [Unit("mlp", i, g, tuple(range(s, min(s + mlp_group, m)))) for g, s in enumerate(range(0, m, mlp_group))]
        if blocks:
            out.append(Unit("block", i))
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


def _head_rows(heads: list[int], num_heads: int, head_dim: int) -> torch.Tensor:
    """Rows of qkv.weight for `heads`: qkv's output is laid out (3, num_heads, head_dim)."""
    rows = [t * num_heads * head_dim + h * head_dim + d for t in range(3) for h in heads for d in range(head_dim)]
    return torch.tensor(rows, dtype=torch.long)


def _head_cols(heads: list[int], head_dim: int) -> torch.Tensor:
    return torch.tensor([h * head_dim + d for h in heads for d in range(head_dim)], dtype=torch.long)


@torch.no_grad()
def prune_model_(model: nn.Module, keep_blocks: list[int], heads: dict[int, list[int]],
                 hidden: dict[int, list[int]]) -> nn.Module:
    """Remove blocks, heads and MLP channels of a timm VisionTransformer in place (weights sliced, geometry re-derived).

    Afterwards `model.vitlab_arch` describes a `vl_pruned_vit`, so `save_checkpoint` / `create_model(DIR)` rebuild it.
    """
    from ..checkpoint import SPEC_ATTR, model_spec

    spec = model_spec(model)
    if spec["name"] == "vl_pruned_vit":
        base, base_kwargs = spec["kwargs"]["base"], dict(spec["kwargs"]["base_kwargs"])
    else:
        base, base_kwargs = spec["name"], dict(spec["kwargs"])
    old = model_widths(model)
    state = {}
    prefix_map = {}
    for new_i, i in enumerate(keep_blocks):
        prefix_map[f"blocks.{i}."] = f"blocks.{new_i}."
    for key, value in model.state_dict().items():
        if not key.startswith("blocks."):
            state[key] = value.clone()
            continue
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
        state[f"blocks.{keep_blocks.index(i)}.{rest}"] = value.clone()
    model.blocks = nn.Sequential(*[model.blocks[i] for i in keep_blocks])
    if hasattr(model, "feature_info"):
        model.feature_info = [dict(f, module=f"blocks.{j}") for j, f in enumerate(model.feature_info[:len(keep_blocks)])]
    set_block_widths(model, [len(heads[i]) for i in keep_blocks], [old.head_dim[i] for i in keep_blocks],
                     [len(hidden[i]) for i in keep_blocks])
    model.load_state_dict(state, strict=True)
    base_kwargs["depth"] = len(keep_blocks)
    model.vitlab_arch = {"base": base, "base_kwargs": base_kwargs,
                         **{k: list(v) for k, v in block_widths(model).items()}}
    setattr(model, SPEC_ATTR, {"name": "vl_pruned_vit", "kwargs": {}})
    return model
