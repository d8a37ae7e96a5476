"""Structured pruning of any contract-described model, with torch-pruning's `DependencyGraph` for coupled channels.

    model = vitlab.create_model("swin_tiny_patch4_window7_224")
    vitlab.prune_(model, Prune(target_flops=0.5, importance="taylor"), calib=batches)   # plain ViTs: NViT path

`vitlab.contract.describe(model)` says where the blocks, their token mixers (q/k/v, heads, output projection) and
their MLPs are; torch-pruning's DependencyGraph (Fang et al., CVPR 2023) says which channels of which layers go
together. Units, ranked in one global list by importance per MAC saved (NViT's ranking, Yang et al., CVPR 2023):

* `head`: one attention head of a mixer: its channels of the output projection's input and every q/k/v channel
  the graph couples to them (the head's rows of a fused qkv, of q and kv, ...), plus per-head tensors the graph
  cannot see (Swin's relative-position bias table). A mixer keeps at least one head.
* `channels`: `mlp_group` channels of a channel group that lives inside one block and outside its attention
  (MLP hidden channels, the expanded channels of an MBConv, a conv MLP with its norm and depthwise conv). A group
  keeps at least one unit. Where a grouped (not depthwise) conv is in the group (Next-ViT's 3x3 group convs), a unit
  is the same positions of every group, so that each group keeps the same width.
* `block`: a whole block where the contract says `residual` (`blocks=true`), replaced by `DroppedBlock`.

Nothing that touches the stem or the head is a unit, nor are the residual widths (those span whole stages).
A head whose graph group is not exactly "its q, k and v channels and its projection inputs" (interleaved per-head
layouts that reshape with the head count, such as TinyViT's and EfficientFormer's attention; ConViT's gated
positional attention) is not a unit: those mixers keep their heads. After pruning, the result is checked against
the unpruned model with the removed units masked (projection inputs zeroed, blocks skipped), which must give the
same logits: a forward that reshapes with a width the graph cannot see fails that check and the model is refused.

Heads of `EXPLICIT_HEAD_KINDS` mixers (RMT's retention) are cut from the contract's layout (fused qkv rows, proj
columns, depthwise LePE channels) instead of a graph group, which torch-pruning cannot compute through RMT's rotary +
decay-masked attention in reasonable time; the masked check below still applies. Mixers in `_opaque_mixers`
(EfficientViT-M's cascaded group attention) are traced as one 1x1 conv: their internals keep every channel.

The pruned model rebuilds from config.json alone: `resized_description` records the tensors whose shape differs
from the base model (`model.name` + `model.kwargs`), the changed integer attributes (`num_heads`, `attn_dim`,
`in_features`, ...) and the dropped blocks; `resize_` re-shapes a freshly built base model before its weights load
(vitlab.checkpoint calls it for `config.json`'s `"model": {"resized": ...}`).
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import efficientvit_msra

from ..checkpoint import CheckpointError, create_model, model_spec
from ..contract import describe
from ..models import rmt
from ..profiling.flops import per_module_macs
from ..record import record, update_record
from ..runner import example_shape
from ..techniques import TechniqueNotApplicable
from .importance import calib_pairs
from .plan import model_macs

__all__ = ["GraphUnit", "graph_prune_", "graph_plan", "resized_description", "resize_", "DroppedBlock",
           "GRAPH_CRITERIA"]

GRAPH_CRITERIA = ("l1", "l2", "taylor", "hessian")
SUPPORTS = ("models that vitlab.contract.describe(model) describes (heads of attention mixers whose q/k/v the "
            "dependency graph couples to the output projection, MLP and conv channels inside a block, residual "
            "blocks) and that rebuild from their name and kwargs (vitlab.create_model / timm.create_model)")
# Tensors indexed by head that torch-pruning cannot follow (indexed by a position table): name -> the head dim.
HEAD_TENSORS = {"relative_position_bias_table": -1}
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)   # normalise across channels: a unit would change the kept ones
_CONV_OK = ("conv", "pool")                       # mixers whose inner channels may be pruned like an MLP's
# Attention kinds whose heads are graph units. Left out: graphs torch-pruning cannot follow in reasonable time (DiNAT's
# gathered neighbourhoods; RMT's retention: get_pruning_group runs for minutes, see EXPLICIT_HEAD_KINDS) and per-head
# position terms it cannot see (positional / outlook attention).
HEAD_KINDS = ("attention", "window_attention", "sra_attention", "conv_attention", "group_attention",
              "class_attention")
# Attention kinds whose heads are cut from the contract's layout instead of the graph (get_pruning_group from the
# projection runs for minutes through RMT's rotary + decay-masked SDPA): one fused `qkv` Linear with rows
# (3, heads, head_dim), a `proj` Linear with columns (heads, head_dim), and depthwise convs of the attention width
# (RMT's LePE on v); the mixer's `head_index` (which of its stage's per-head decay rates it keeps) follows the heads.
# The masked-model check after pruning still has the last word.
EXPLICIT_HEAD_KINDS = ("retention",)


# Families whose traced graph torch-pruning 1.6 cannot group in reasonable time: refused up front rather than left
# to hang (none at present; EfficientViT-M's cascaded attention is an opaque mixer below).
SLOW_GRAPH_FAMILIES: dict[str, str] = {}


def _opaque_mixers() -> dict[type, object]:
    """Mixer classes the graph sees as one 1x1 conv (`in` channels to `out`) instead of tracing through them:
    class -> fn(module) -> (in, out). EfficientViT-M's cascaded group attention chunks its input per head and feeds
    each head's output into the next head's input; torch-pruning follows that chain of chunk / add / cat index maps
    for ~45 s per residual-width group on a tiny instance (minutes at full size). Its heads are not units either way
    (the input is chunked by the head count and every head feeds the next, so no head can go exactly): as a 1x1 conv on
    the residual stream it couples nothing, and its block's FFNs prune as usual."""
    return {efficientvit_msra.CascadedGroupAttention:
            lambda m: (m.qkvs[0].conv.in_channels * len(m.qkvs), m.proj[-1].conv.out_channels)}


class DroppedBlock(nn.Module):
    """A removed residual block: returns its input (extra arguments such as the grid size are ignored)."""

    def forward(self, x, *args, **kwargs):
        return x


class _StandIn(nn.Conv2d):
    """What the dependency graph traces in place of an opaque mixer (never part of a pruned model)."""


def _opaque_swap(model: nn.Module, back: list | None = None) -> list:
    """Swap opaque mixers for stand-in 1x1 convs (returns what to swap back), or swap `back` in again."""
    if back is not None:
        for name, module in back:
            _replace(model, name, module)
        return []
    kinds = tuple(_opaque_mixers().items())
    swapped = []
    for name, module in list(model.named_modules()):
        fn = next((f for cls, f in kinds if isinstance(module, cls)), None)
        if fn is not None and name:
            inner, outer = fn(module)
            swapped.append((name, module))
            p = next(module.parameters(), None)
            stand_in = _StandIn(inner, outer, 1, bias=False, device=p.device if p is not None else None,
                                dtype=p.dtype if p is not None else None)
            for key, value in vars(module).items():   # what callers read off it (the window `resolution`)
                if not key.startswith("_") and _plain(value) and not hasattr(stand_in, key):
                    setattr(stand_in, key, value)
            _replace(model, name, stand_in)
    return swapped


@dataclass
class GraphUnit:
    """One prunable unit: kind "head" | "channels" | "block"; `root` / `out` / `idxs` are the module, side and
    channel indices a DependencyGraph group is built from; `cost` is the MACs per image removing it saves."""
    kind: str
    block: str
    root: str = ""
    out: bool = True
    idxs: tuple = ()
    mixer: str = ""
    cost: float = 0.0
    slices: list = field(default_factory=list, repr=False)   # (parameter, dim, indices) that make up the unit
    explicit: bool = False   # a head cut from the contract's layout (EXPLICIT_HEAD_KINDS), not through the graph


# ------------------------------------------------------------------------------------------------ the graph

def _example(model: nn.Module) -> torch.Tensor:
    return torch.randn(2, *example_shape(model), generator=torch.Generator().manual_seed(0))


def _graph(model: nn.Module, x: torch.Tensor):
    import torch_pruning as tp

    swapped = _opaque_swap(model)
    try:
        with warnings.catch_warnings(), _plain_formulas():
            warnings.simplefilter("ignore")   # "unwrapped parameters detected": pos embeddings etc., never pruned
            return tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
    finally:
        _opaque_swap(model, swapped)


def _plain_formulas():
    """Fast paths that hide a layer from a trace run their plain formulas while the graph and the per-module MACs are
    taken: RMT folds its residual depthwise convs into F.conv2d on a computed kernel (the module is never called)."""
    return rmt.plain_formulas()


def _module_macs(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """MACs per image of every module (a parent's count includes its children's), attention and SDPA counted."""
    with _plain_formulas():
        return per_module_macs(model, x[:1])[1]


def _side(dg, dep) -> bool:
    return dg.is_out_channel_pruning_fn(dep.handler)


def _channels(module: nn.Module, out: bool) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features if out else module.in_features
    if isinstance(module, nn.Conv2d):
        return module.out_channels if out else module.in_channels
    return 0


def _dep_slices(module, out: bool, idxs: list[int]) -> list[tuple]:
    """(parameter, dim, indices) of `module` that pruning `idxs` on its outputs (`out`) or inputs removes."""
    if isinstance(module, nn.Parameter):
        return []
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        if out or _depthwise(module):
            return [(p, 0, idxs) for p in (module.weight, module.bias) if p is not None]
        if _grouped(module):   # the same positions of every group go (units span the groups): those columns
            per_group = module.in_channels // module.groups
            return [(module.weight, 1, sorted({i % per_group for i in idxs}))]
        return [(module.weight, 1, idxs)]
    return [(p, 0, idxs) for p in module.parameters(recurse=False) if p.ndim >= 1]


def _depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and 1 < module.groups == module.in_channels == module.out_channels


def _grouped(module: nn.Module) -> bool:
    """A grouped conv that is not depthwise (Next-ViT's 3x3 group convs): its channels prune in whole positions
    (position k of every group at once), so that every group keeps the same width."""
    return isinstance(module, nn.Conv2d) and module.groups > 1 and not _depthwise(module)


def _atoms(named: list, dg, total: int) -> list[list[int]] | None:
    """Root channels that must go together: one each, or where the group holds grouped convs, position k of every
    group of each (the same root channels for all of them, else None: no exact unit)."""
    atoms = None
    for _, dep, idxs, roots in named:
        module = dep.target.module
        if not _grouped(module):
            continue
        width = module.out_channels if _side(dg, dep) else module.in_channels
        per_group = width // module.groups
        by_pos: dict[int, list[int]] = {}
        for i, r in zip(idxs, roots):
            by_pos.setdefault(int(i) % per_group, []).append(int(r))
        mine = sorted(sorted(v) for v in by_pos.values())
        if len(set(map(len, mine))) != 1 or sum(map(len, mine)) != total or (atoms is not None and atoms != mine):
            return None
        atoms = mine
    return atoms if atoms is not None else [[r] for r in range(total)]


def _cost(module: nn.Module, name: str, macs: dict, out: bool, count: int) -> float:
    total = _channels(module, out)
    return macs.get(name, 0) * count / total if total else 0.0


class _Model:
    """The model, its contract, its graph, and per-module MACs."""

    def __init__(self, model: nn.Module, technique: str, macs: bool = True):
        self.model, self.technique = model, technique
        self.spec = describe(model, technique)
        self.x = _example(model)
        self.names = {m: n for n, m in model.named_modules()}
        try:
            self.macs = _module_macs(model, self.x) if macs else {}
        except (AssertionError, RuntimeError) as e:   # torch's module tracker on timm's attention pool ("map")
            _refuse(model, technique, f"counting its MACs per module fails ({type(e).__name__}: {e})")
        self.dg = _graph(model, self.x)

    def group(self, name: str, out: bool, idxs: list[int]):
        import torch_pruning as tp

        module = self.model.get_submodule(name)
        fn = (tp.prune_linear_out_channels if out else tp.prune_linear_in_channels) if isinstance(module, nn.Linear) \
            else (tp.prune_conv_out_channels if out else tp.prune_conv_in_channels)
        return self.dg.get_pruning_group(module, fn, list(idxs))


# ------------------------------------------------------------------------------------------------ units

def _single_layer(module: nn.Module) -> tuple[str, nn.Module] | None:
    """`module` itself if a Linear/1x1 Conv, else its only Linear/Conv child (a Sequential(act, Linear) proj)."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return "", module
    layers = [(n, m) for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return layers[0] if len(layers) == 1 else None


def _head_units(g: _Model, block, mixer) -> list[GraphUnit]:
    """One unit per head of `mixer`, or [] when its graph group is not exactly q/k/v + projection inputs."""
    h = mixer.num_heads or 0
    if mixer.kind not in HEAD_KINDS or h < 2 or not mixer.proj or not mixer.qkv:
        return []
    base = g.spec.qualified(block, mixer.name)
    found = _single_layer(mixer.module.get_submodule(mixer.proj))
    if found is None or any(_single_layer(mixer.module.get_submodule(n)) is None for n in mixer.qkv):
        return []   # heads are rows of single q/k/v layers (not EfficientViT's per-head cascade of convs)
    proj_name = f"{base}.{mixer.proj}" + (f".{found[0]}" if found[0] else "")
    width = _channels(found[1], False)
    if width % h:
        return []
    qkv = {f"{base}.{n}" for n in mixer.qkv}
    qkv_total = sum(_channels(mixer.module.get_submodule(n), True) for n in mixer.qkv)
    dv = width // h
    try:
        group = g.group(proj_name, False, range(width))
    except Exception:  # noqa: BLE001 - a graph torch-pruning cannot follow: this mixer keeps its heads
        return []
    extra = [(p, dim) for n, p in mixer.module.named_parameters() for key, dim in HEAD_TENSORS.items()
             if n == key and p.shape[dim] == h]
    per_head = [[] for _ in range(h)]   # (module name, out, idxs) per head
    for item in group:
        dep, idxs = item
        if isinstance(dep.target.module, nn.Parameter):
            if any(dep.target.module is p for p, _ in extra):
                continue   # sliced by head below (the graph maps it by channel, which is wrong for it)
            return []
        name = g.names.get(dep.target.module)
        if name is None:
            continue   # a tensor op of the traced graph
        out = _side(g.dg, dep)
        if name in qkv and out or name == proj_name and not out:
            for idx, root in zip(idxs, item.root_idxs):
                per_head[int(root) // dv].append((name, out, int(idx)))
        elif not (isinstance(dep.target.module, _NORMS) and _channels_of_norm(dep.target.module) == len(set(idxs))
                  and name.startswith(base + ".")):
            return []   # a layer outside q/k/v and the projection follows the heads' channels: not a plain head
    if any(sum(1 for n, o, _ in head if n in qkv) != qkv_total // h for head in per_head):
        return []       # the graph does not see every q/k/v channel of a head (a per-head interleaved layout)
    units = []
    for j, head in enumerate(per_head):
        slices = []
        for name, out, idx in head:
            slices += _dep_slices(g.model.get_submodule(name), out, [idx])
        slices += [(p, dim, [j]) for p, dim in extra]
        cost = sum(_cost(g.model.get_submodule(n), n, g.macs, o, 1) for n, o, _ in head)
        inner = g.macs.get(base, 0) - sum(v for n, v in g.macs.items() if n.startswith(base + ".")
                                         and isinstance(g.model.get_submodule(n), (nn.Linear, nn.Conv2d)))
        units.append(GraphUnit("head", block.name, proj_name, False, tuple(range(j * dv, (j + 1) * dv)), base,
                               cost + max(inner, 0) / h, slices))
    return units


def _explicit_layers(mixer: nn.Module, h: int):
    """(qkv, proj, [depthwise convs of the attention width]) of a mixer laid out as EXPLICIT_HEAD_KINDS says, else
    None (any other weight layer in it, or widths that do not split into `h` heads)."""
    qkv, proj = getattr(mixer, "qkv", None), getattr(mixer, "proj", None)
    if not isinstance(qkv, nn.Linear) or not isinstance(proj, nn.Linear) or not isinstance(
            getattr(mixer, "head_index", None), tuple) or len(mixer.head_index) != h:
        return None
    width = proj.in_features
    if width % h or qkv.out_features != 3 * width:
        return None
    convs = [m for m in mixer.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and m is not qkv and m is not proj]
    if any(not (_depthwise(m) and m.out_channels == width) for m in convs):
        return None
    return qkv, proj, convs


def _explicit_cols(h: int, d: int, heads: list[int]) -> tuple[list[int], list[int]]:
    """qkv rows and attention-width channels of `heads` (rows laid out (3, h, d), channels (h, d))."""
    chans = [j * d + i for j in heads for i in range(d)]
    return [s * h * d + c for s in range(3) for c in chans], chans


def _explicit_head_units(g: "_Model", block, mixer) -> list[GraphUnit]:
    h = mixer.num_heads or 0
    if mixer.kind not in EXPLICIT_HEAD_KINDS or h < 2 or mixer.qkv != ("qkv",) or mixer.proj != "proj":
        return []
    layers = _explicit_layers(mixer.module, h)
    if layers is None:
        return []
    qkv, proj, convs = layers
    base = g.spec.qualified(block, mixer.name)
    d = proj.in_features // h
    named = {m: n for n, m in mixer.module.named_modules()}
    inner = g.macs.get(base, 0) - sum(g.macs.get(f"{base}.{named[m]}", 0) for m in (qkv, proj, *convs))
    units = []
    for j in range(h):
        rows, chans = _explicit_cols(h, d, [j])
        slices = _dep_slices(qkv, True, rows) + _dep_slices(proj, False, chans)
        cost = _cost(qkv, f"{base}.qkv", g.macs, True, len(rows)) + _cost(proj, f"{base}.proj", g.macs, False, d)
        for conv in convs:
            slices += _dep_slices(conv, True, chans)
            cost += _cost(conv, f"{base}.{named[conv]}", g.macs, True, d)
        units.append(GraphUnit("head", block.name, f"{base}.proj", False, tuple(chans), base,
                               cost + max(inner, 0) / h, slices, explicit=True))
    return units


def _cut_explicit_heads(mixer: nn.Module, gone: set[int]) -> None:
    """Remove heads `gone` from a mixer laid out as EXPLICIT_HEAD_KINDS says (weights, widths, head_index)."""
    h = len(mixer.head_index)
    qkv, proj, convs = _explicit_layers(mixer, h)
    kept = [j for j in range(h) if j not in gone]
    rows, chans = _explicit_cols(h, proj.in_features // h, kept)

    def keep(p: nn.Parameter, dim: int, idxs: list[int]) -> nn.Parameter:
        return nn.Parameter(p.detach().index_select(dim, torch.as_tensor(idxs)).contiguous(),
                            requires_grad=p.requires_grad)

    qkv.weight = keep(qkv.weight, 0, rows)
    if qkv.bias is not None:
        qkv.bias = keep(qkv.bias, 0, rows)
    qkv.out_features = len(rows)
    proj.weight = keep(proj.weight, 1, chans)
    proj.in_features = len(chans)
    for conv in convs:
        conv.weight = keep(conv.weight, 0, chans)
        if conv.bias is not None:
            conv.bias = keep(conv.bias, 0, chans)
        conv.in_channels = conv.out_channels = conv.groups = len(chans)
    mixer.head_index = tuple(mixer.head_index[j] for j in kept)


def _channels_of_norm(norm: nn.Module) -> int:
    """Channels of a q/k norm over head_dim (shared by every head: never pruned with a head)."""
    shape = getattr(norm, "normalized_shape", None)
    return int(shape[-1]) if shape else int(getattr(norm, "num_channels", 0))


def _inside(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _channel_units(g: _Model, group_size: int) -> list[GraphUnit]:
    """Units of `group_size` channels for every graph group that lives inside one block, outside its attention."""
    blocks = [(b.name, b) for b in g.spec.blocks]
    closed = {b.name: [g.spec.qualified(b, m.name) for m in b.mixers if m.kind not in _CONV_OK] for b in g.spec.blocks}
    units, visited = [], set()
    for start_name, module in g.model.named_modules():
        owner = next((bn for bn, _ in blocks if _inside(start_name, [bn])), None)
        if not isinstance(module, (nn.Conv2d, nn.Linear)) or module in visited or owner is None \
                or module not in g.dg.module2node \
                or _inside(start_name, closed[owner]):
            continue   # roots inside blocks, outside attention (whose internals the graph may not follow quickly)
        group = g.group(start_name, True, range(_channels(module, True)))
        visited.update(item.dep.target.module for item in group if _side(g.dg, item.dep))
        named = [(g.names.get(item.dep.target.module), item.dep, item.idxs, item.root_idxs) for item in group
                 if g.names.get(item.dep.target.module) is not None]
        if not named or any(isinstance(d.target.module, _NORMS) for _, d, _, _ in named):
            continue
        owner = next((bn for bn, _ in blocks if all(_inside(n, [bn]) for n, *_ in named)), None)
        if owner is None or any(_inside(n, closed[owner]) for n, *_ in named):
            continue
        root = named[0][0]
        total = _channels(g.model.get_submodule(root), True)
        if total < 2:
            continue
        atoms = _atoms(named, g.dg, total)
        if atoms is None or len(atoms) < 2:
            continue
        step = max(1, group_size // len(atoms[0]))
        for start in range(0, len(atoms), step):
            chosen = {r for atom in atoms[start:start + step] for r in atom}
            slices, cost, seen = [], 0.0, {}
            for name, dep, idxs, roots in named:
                mine = [int(i) for i, r in zip(idxs, roots) if int(r) in chosen]
                module = dep.target.module
                out = _side(g.dg, dep)
                slices += _dep_slices(module, out, mine)
                if isinstance(module, (nn.Linear, nn.Conv2d)):
                    share = _cost(module, name, g.macs, out, len(mine))
                    seen[name] = max(seen.get(name, 0.0), share) if _depthwise(module) else \
                        seen.get(name, 0.0) + share
            cost = sum(seen.values())
            units.append(GraphUnit("channels", owner, root, True, tuple(sorted(chosen)), "", cost, slices))
    return units


def _block_units(g: _Model) -> list[GraphUnit]:
    return [GraphUnit("block", b.name, cost=float(g.macs.get(b.name, 0)),
                      slices=[(p, 0, list(range(p.shape[0]))) for p in b.module.parameters() if p.ndim >= 1])
            for b in g.spec.blocks if b.residual]


# ------------------------------------------------------------------------------------------------ importance

def _unit_dot(units: list[GraphUnit], fn, grads: dict | None = None) -> torch.Tensor:
    out = []
    for u in units:
        total = torch.zeros((), dtype=torch.float64)
        for p, dim, idxs in u.slices:
            index = torch.as_tensor(idxs, dtype=torch.long)
            w = p.detach().index_select(dim, index).double()
            gr = None if grads is None else grads[id(p)].index_select(dim, index).double()
            total = total + fn(w, gr).sum()
        out.append(total)
    return torch.stack(out) if out else torch.zeros(0, dtype=torch.float64)


def scores(model: nn.Module, units: list[GraphUnit], criterion: str, calib=None) -> torch.Tensor:
    """One importance per unit, as vitlab.prune.importance defines the criteria (l1, l2, taylor, hessian)."""
    if criterion == "l1":
        return _unit_dot(units, lambda w, _: w.abs())
    if criterion == "l2":
        return _unit_dot(units, lambda w, _: w.square()).sqrt()
    if calib is None:
        raise ValueError(f"importance {criterion!r} needs calibration images: pass calib= (CLI: --data SPEC "
                         "--split train), or use importance l1 / l2")
    pairs = calib_pairs(model, calib)
    n = sum(len(y) for _, y in pairs)
    first = torch.zeros(len(units), dtype=torch.float64)
    second = torch.zeros(len(units), dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        for x, y in pairs:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            grads = {id(p): (p.grad if p.grad is not None else torch.zeros_like(p)).detach()
                     for p in model.parameters()}
            gw = _unit_dot(units, lambda w, g: w * g, grads)
            first += gw * len(y) / n
            second += gw.square() / len(pairs)
        model.zero_grad(set_to_none=True)
    finally:
        model.train(was_training)
    return first.abs() if criterion == "taylor" else 0.5 * second


# ------------------------------------------------------------------------------------------------ plan + surgery

def graph_plan(g: _Model, units: list[GraphUnit], ranking: torch.Tensor, target: float, total: float):
    """Greedy over `units` in `ranking` order (least important per MAC first) until the estimated MACs reach
    `target`; every head mixer keeps one head, every channel group one unit; a block is removed only if that does not
    overshoot the target by more than 2 % of the total (finer units come later)."""
    left: dict[tuple, int] = {}
    for u in units:
        if u.kind != "block":
            key = (u.kind, u.root)
            left[key] = left.get(key, 0) + 1
    dropped, removed, current = set(), [], total
    for k in ranking.tolist():
        if current <= target:
            break
        u = units[k]
        if u.block in dropped:
            continue
        if u.kind == "block":
            saved = u.cost - sum(r.cost for r in removed if r.block == u.block)
            if current - saved < target - 0.02 * total:
                continue
            removed = [r for r in removed if r.block != u.block]
            dropped.add(u.block)
            current -= saved
            removed.append(u)
            continue
        key = (u.kind, u.root)
        if left[key] <= 1:
            continue
        left[key] -= 1
        removed.append(u)
        current -= u.cost
    return removed, current


def _slice_head_tensors(mixer: nn.Module, heads_kept: list[int], old: int) -> None:
    for name, p in list(mixer.named_parameters()):
        dim = HEAD_TENSORS.get(name)
        if dim is not None and p.shape[dim] == old:
            kept = p.detach().index_select(dim, torch.as_tensor(heads_kept))
            setattr(mixer, name, nn.Parameter(kept.contiguous(), requires_grad=p.requires_grad))


def _set_head_attrs(mixer: nn.Module, old_heads: int, new_heads: int, old_width: int, new_width: int) -> None:
    """Re-derive what attention modules cache: the head count and the attention width (`attn_dim`, ...)."""
    for key, value in list(vars(mixer).items()):
        if type(value) is int and not key.startswith("_"):
            if value == old_heads and "head" in key and "dim" not in key:
                setattr(mixer, key, new_heads)
            elif value == old_width and key != "dim" and ("attn" in key or "inner" in key or "all_head" in key):
                setattr(mixer, key, new_width)


def _prune_root(g: _Model, name: str, out: bool, idxs: list[int], keep_norms_of: str | None = None) -> None:
    from torch_pruning.dependency.group import Group

    group = g.group(name, out, sorted(idxs))
    if keep_norms_of:   # q/k norms over head_dim are shared by every head: they keep their width; per-head
        # tensors (HEAD_TENSORS) are sliced by head, not by the graph
        kept = Group()
        kept._DG = group._DG
        kept._group = [item for item in group._group if not isinstance(item.dep.target.module, nn.Parameter)
                       and not (isinstance(item.dep.target.module, _NORMS)
                                and g.names.get(item.dep.target.module, "").startswith(keep_norms_of + "."))]
        group = kept
    group.prune()


def _apply(g: _Model, removed: list[GraphUnit]) -> None:
    model = g.model
    by_root: dict[tuple, list[GraphUnit]] = {}
    for u in removed:
        if u.kind != "block":
            by_root.setdefault((u.kind, u.root, u.out, u.mixer), []).append(u)
    for (kind, root, out, mixer_name), us in by_root.items():
        idxs = sorted({i for u in us for i in u.idxs})
        if kind == "head":
            mixer = model.get_submodule(mixer_name)
            old_width = _channels(model.get_submodule(root), False)
            dv = len(us[0].idxs)
            old_heads = old_width // dv
            gone = {i // dv for i in idxs}
            if us[0].explicit:
                _cut_explicit_heads(mixer, gone)
            else:
                _prune_root(g, root, out, idxs, keep_norms_of=mixer_name)
            _slice_head_tensors(mixer, [j for j in range(old_heads) if j not in gone], old_heads)
            _set_head_attrs(mixer, old_heads, old_heads - len(gone), old_width, old_width - len(idxs))
        else:
            _prune_root(g, root, out, idxs)
    for u in removed:
        if u.kind == "block":
            _replace(model, u.block, DroppedBlock())


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _masked(model: nn.Module, g: _Model, removed: list[GraphUnit]) -> nn.Module:
    """A copy of the unpruned `model` with the removed units switched off: the removed channels' columns of the
    layers that consume them zeroed, removed blocks skipped. Pruning must not change its logits."""
    masked = _copy(model)
    for u in removed:
        if u.kind == "block":
            _replace(masked, u.block, DroppedBlock())
            continue
        if u.kind == "head":
            masked.get_submodule(u.root).weight.data[:, list(u.idxs)] = 0
            continue
        group = g.group(u.root, u.out, list(u.idxs))
        for dep, idxs in group:
            name = g.names.get(dep.target.module)
            module = dep.target.module
            if name is not None and not _side(g.dg, dep) and isinstance(module, (nn.Linear, nn.Conv2d)) \
                    and not _depthwise(module):
                for p, dim, cols in _dep_slices(module, False, [int(i) for i in idxs]):
                    masked.get_submodule(name).weight.data[:, cols] = 0
    return masked


def _copy(model: nn.Module) -> nn.Module:
    """A deep copy; train mode first empties caches of traced tensors (timm's cached attention biases)."""
    was_training = model.training
    model.train()
    twin = copy.deepcopy(model)
    model.train(was_training)
    return twin.train(was_training)


def _refuse(g_or_model, technique: str, why: str):
    model = getattr(g_or_model, "model", g_or_model)
    raise TechniqueNotApplicable(technique, model, f"{why}; it supports {SUPPORTS}")


def check_graph_prunable(model: nn.Module, technique: str) -> dict:
    """The model's {"name", "kwargs"} if the graph path can prune it and rebuild the result; else refuse."""
    family = describe(model, technique).family   # NoAdapter: a TechniqueNotApplicable naming what it supports
    if family in SLOW_GRAPH_FAMILIES:
        _refuse(model, technique, SLOW_GRAPH_FAMILIES[family])
    try:
        spec = model_spec(model)
    except CheckpointError as e:
        _refuse(model, technique, f"it cannot be rebuilt after pruning ({e})")
    try:
        with torch.device("meta"):
            base = create_model(spec["name"], **spec["kwargs"])
        if record(model).resized:
            resize_(base, record(model).resized)
    except Exception as e:  # noqa: BLE001 - any failure to rebuild means the same refusal
        _refuse(model, technique, f"it cannot be rebuilt from {spec['name']} with {spec['kwargs']} "
                f"({type(e).__name__}: {e})")
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in base.state_dict().items()}
    if want != got:
        diff = sorted(set(want) ^ set(got)) or [k for k in want if want[k] != got.get(k)]
        _refuse(model, technique, f"{spec['name']} rebuilt with {spec['kwargs']} is another architecture "
                f"({', '.join(diff[:3])} differ): create the model with vitlab.create_model(name, **kwargs)")
    return spec


def graph_prune_(model: nn.Module, cfg, technique: str, calib=None) -> nn.Module:
    """Prune `model` in place to `cfg.target_flops` of its MACs through the dependency graph; return it."""
    if cfg.stem or cfg.embed or cfg.target_params is not None or cfg.importance not in GRAPH_CRITERIA:
        _refuse(model, technique, "stem=, embed=, target_params= and importance=ablation are for plain ViTs "
                "(timm VisionTransformer); on other families prune supports heads, mlp and blocks to target_flops "
                f"with importance {'/'.join(GRAPH_CRITERIA)}")
    spec = check_graph_prunable(model, technique)
    try:
        total = model_macs(model)
    except (AssertionError, RuntimeError) as e:   # torch's module tracker on timm's attention pool ("map")
        _refuse(model, technique, f"counting its MACs fails ({type(e).__name__}: {e})")
    summary = {"importance": cfg.importance, "target": "macs", "before": total, "path": "dependency_graph"}
    if cfg.target_flops >= 1.0:
        update_record(model, prune={**summary, "after": total, "removed": 0})
        return model
    was_training = model.training
    model.eval()
    g = _Model(model, technique)
    units = []
    if cfg.heads:
        heads = [u for b in g.spec.blocks for m in b.mixers
                 for u in _head_units(g, b, m) + _explicit_head_units(g, b, m)]
        safe = _safe_head_classes(g, heads)
        units += [u for u in heads if type(model.get_submodule(u.mixer)) in safe]
        summary["heads_kept_by"] = sorted({type(model.get_submodule(u.mixer)).__name__ for u in heads} -
                                          {c.__name__ for c in safe})
    if cfg.mlp:
        units += _channel_units(g, cfg.mlp_group)
    if cfg.blocks:
        units += _block_units(g)
    if not units:
        _refuse(model, technique, "the dependency graph offers no prunable heads, channels or blocks in it")
    importance = scores(model, units, cfg.importance, calib)
    costs = torch.tensor([u.cost for u in units], dtype=torch.float64)
    ranking = (importance / costs.clamp_min(1)).argsort()
    target = cfg.target_flops * total
    removed, estimate = graph_plan(g, units, ranking, target, total)
    if estimate > target * 1.0001:
        outside = 1 - sum(g.macs.get(b.name, 0) for b in g.spec.blocks) / total
        _refuse(model, technique, f"its prunable units reach only {estimate / total:.3f} of the MACs, not "
                f"target_flops={cfg.target_flops} (every mixer keeps one head, every channel group one unit; "
                f"blocks={cfg.blocks}; {outside:.0%} of the MACs are outside its blocks, in the stem / patch "
                "embedding, downsampling and head, which are never cut): raise the target or allow blocks=true")
    masked = _masked(model, g, removed)
    _apply(g, removed)
    _check_same(model, masked, g.x, technique)
    update_record(model, resized=resized_description(model, spec))
    after = model_macs(model)
    model.train(was_training)
    update_record(model, prune={**summary, "after": after, "removed": len(removed),
                                "units": {k: sum(1 for u in removed if u.kind == k) for k in ("head", "channels", "block")}})
    return model


def _difference(model: nn.Module, masked: nn.Module, x: torch.Tensor) -> str | None:
    """Why the pruned `model` and the `masked` unpruned one disagree on `x`, or None when they agree."""
    try:
        with torch.no_grad():
            got, want = model(x), masked(x)
    except RuntimeError as e:
        return f"its forward fails after pruning ({str(e).splitlines()[0][:160]})"
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-3, atol=1e-4 * (1 + want.abs().max())):
        return f"its pruned logits differ from the masked model's by up to {(got - want).abs().max().item():.3g}"
    return None


def _check_same(model: nn.Module, masked: nn.Module, x: torch.Tensor, technique: str) -> None:
    why = _difference(model, masked, x)
    if why:
        _refuse(model, technique, f"{why}: its forward uses a width the dependency graph cannot see")


def _safe_head_classes(g: _Model, heads: list[GraphUnit]) -> set[type]:
    """Mixer classes whose heads prune cleanly: one head of the first mixer of each class is removed from a copy,
    which must match the masked model (PVT v2's attention reshapes to its input width, so it keeps its heads)."""
    safe = set()
    for unit in {type(g.model.get_submodule(u.mixer)): u for u in reversed(heads)}.values():
        trial = _copy(g.model)
        masked = _masked(g.model, g, [unit])
        _apply(_Model(trial, g.technique, macs=False), [unit])
        if _difference(trial, masked, g.x) is None:
            safe.add(type(g.model.get_submodule(unit.mixer)))
    return safe


# ------------------------------------------------------------------------------------------------ rebuild

def resized_description(model: nn.Module, spec: dict) -> dict:
    """What differs from the base model `spec` builds: {"tensors": {name: shape}, "attrs": {module: {attr: value}},
    "dropped": [block names]}: enough to re-shape a freshly built base before its weights load."""
    with torch.device("meta"):
        base = create_model(spec["name"], **spec["kwargs"])
    base_mods = dict(base.named_modules())
    dropped = [n for n, m in model.named_modules() if isinstance(m, DroppedBlock) and n in base_mods
               and not isinstance(base_mods[n], DroppedBlock)]
    skip = tuple(n + "." for n in dropped)
    base_tensors = base.state_dict()   # persistent tensors only: the weights file fills each one
    tensors = {n: list(t.shape) for n, t in model.state_dict().items()
               if not n.startswith(skip) and n in base_tensors and tuple(t.shape) != tuple(base_tensors[n].shape)}
    attrs = {}
    for name, module in model.named_modules():
        other = base_mods.get(name)
        if other is None or name.startswith(skip) or name in dropped:
            continue
        changed = {k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training" and _plain(v)
                   and k in vars(other) and type(vars(other)[k]) is type(v) and vars(other)[k] != v}
        if changed:
            attrs[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in changed.items()}
    return {"tensors": tensors, "attrs": attrs, "dropped": dropped}


def _plain(value) -> bool:
    if isinstance(value, tuple):
        return all(type(v) is int for v in value)
    return type(value) in (int, float, bool)


def resize_(model: nn.Module, description: dict, where: str = "model.resized") -> nn.Module:
    """Re-shape `model` (its base, just built) as `description` says: empty tensors of the saved shapes, the saved
    attributes, dropped blocks. Everything is checked (a config.json is untrusted); the weights are loaded after."""
    def bad(what: str):
        raise CheckpointError(f"{where}: {what}; the checkpoint is damaged or was edited by hand")

    if not isinstance(description, dict) or set(description) - {"tensors", "attrs", "dropped"}:
        bad('must be an object with "tensors", "attrs" and "dropped"')
    modules = dict(model.named_modules())
    for name in description.get("dropped", []):
        if not isinstance(name, str) or name not in modules or not name:
            bad(f"dropped block {name!r} is not a module of {type(model).__name__}")
        _replace(model, name, DroppedBlock())
    modules = dict(model.named_modules())
    for name, shape in (description.get("tensors") or {}).items():
        owner, _, leaf = name.rpartition(".")
        module = modules.get(owner)
        old = None if module is None else (module._parameters.get(leaf) if leaf in module._parameters
                                           else module._buffers.get(leaf))
        if old is None or leaf in module._non_persistent_buffers_set:
            bad(f"tensor {name!r} is not in {type(model).__name__}")
        if not (isinstance(shape, list) and len(shape) == old.ndim and all(type(v) is int and v >= 0 for v in shape)):
            bad(f"tensor {name!r} has shape {shape!r}, not {old.ndim} sizes >= 0")
        new = torch.empty(shape, dtype=old.dtype, device=old.device)
        if leaf in module._parameters:
            module._parameters[leaf] = nn.Parameter(new, requires_grad=old.requires_grad)
        else:
            module._buffers[leaf] = new
    for name, values in (description.get("attrs") or {}).items():
        module = modules.get(name)
        if module is None or not isinstance(values, dict):
            bad(f"attrs of {name!r}: not a module of {type(model).__name__}")
        for key, value in values.items():
            have = vars(module).get(key)
            value = tuple(value) if isinstance(have, tuple) and isinstance(value, list) else value
            if key.startswith("_") or key == "training" or have is None or not _plain(have) \
                    or type(have) is not type(value) or not _plain(value):
                bad(f"attribute {name}.{key}={value!r} cannot be set (it must exist, with the same plain type)")
            setattr(module, key, value)
    update_record(model, resized=description)
    return model
