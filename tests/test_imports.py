"""Imports flow one way: a contract test over vitlab's own import statements.

Every `vitlab/**/*.py` is parsed with `ast`; each `import` / `from ... import` naming a vitlab module — at module
level, inside functions, relative or absolute — becomes an edge between two *units*: the top-level modules and
packages of vitlab (`vitlab.quant.sim` belongs to unit `quant`, `vitlab/__init__.py` to the root unit `vitlab`).
`from vitlab import quant` is an edge to `quant`, `from vitlab import create_model` one to the root.

`LAYERS` lists the units low to high; a unit may import its own modules and units in lower layers only (units that
share a layer may not import each other). Why this order:

- errors, _version, utils: leaf helpers with no vitlab imports of their own (utils only raises vitlab's errors).
- profiling: FLOP counting, timing and memory measure any module, and pruning and token reduction use them
  (HOUSE_STYLE: "measurement primitives sit low").
- techniques, recipes: the two registries (`--apply` techniques, `--recipe` training recipes) with their typed
  `key=value` grammar; the units above fill them, the registries know none of them.
- runner: the `Runner` protocol and input geometry (`model_input_size`), which checkpoint and data read.
- checkpoint: the on-disk format and `create_model` (the root imports `models`, so every vl_* name is registered
  before anything can call it); it knows no model family.
- data: datasets, transforms (a checkpoint's preprocessing) and calibration batches; it knows no model.
- models: the timm-registered families (a family may use a data helper, e.g. PAAB's joint-in-patch masks).
- contract, attention: the model contract over the families, and the one attention seam built on it.
- loader: a name or checkpoint folder + a technique stack -> a model or a runner.
- tokens, quant, prune: the technique families, independent of each other.
- explain: explanations that still work on compressed models (it reads token-reduced models' token sources).
- engine: training and evaluation, which may train any compressed model.
- dense: detection / segmentation heads over the backbones, trained with the engine; it registers its own
  handlers into the technique families (quant deploy, prune), so they never import it.
- bench, predict, search, agents: applications over all of the above.
- pareto: sweeps and reports over the benchmarks; api: the Python verbs; cli: the command line; __main__ runs it;
  the root package re-exports the public names and is imported by nobody inside vitlab.

Since every allowed edge goes down the layer order, no cycle can form from them; `test_no_unit_cycles` checks that
independently on the whole graph, so a wrong `LAYERS` cannot hide one.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "vitlab"

LAYERS: list[tuple[str, ...]] = [
    ("errors",), ("_version",), ("utils",), ("profiling",), ("techniques",), ("recipes",), ("runner",),
    ("checkpoint",), ("data",), ("models",), ("contract",), ("attention",), ("loader",),
    ("tokens", "quant", "prune"), ("explain",), ("engine",), ("dense",), ("bench", "predict", "search", "agents"),
    ("pareto",), ("api",), ("cli",), ("__main__",), ("vitlab",),
]

# (importing unit, imported unit) -> why the upward import is still there. Checked exactly: a new violation fails,
# and so does a listed one that has gone (delete its line: the list only shrinks).
KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {
    # vitlab/models/dense.py: the `vl_dense` timm entrypoint imports vitlab.dense.heads when called. It must be in
    # timm's registry after a plain `import vitlab` (dense checkpoints name it), and `import vitlab` must not load
    # vitlab.quant / vitlab.prune (tests/test_checkpoint_formats.py), which vitlab.dense loads to register its
    # deploy / prune handlers into them; moving the entrypoint into vitlab.dense needs those handlers registered
    # below quant and prune first.
    ("models", "dense"): "vl_dense builds its model with vitlab.dense.heads.build_dense_model",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)   # ("vitlab", "quant", "sim")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "vitlab"


def _is_vitlab_module(dotted: str) -> bool:
    rel = Path(*dotted.split(".")[1:])
    return (ROOT / rel).is_dir() or (ROOT / rel).with_suffix(".py").is_file()


def _imported_modules(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The vitlab modules one import statement names (`from vitlab import x` names vitlab.x when x is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "vitlab"]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:                                         # relative: resolve against this module's package
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = package[:len(package) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "vitlab":
        return []
    return [f"{target}.{a.name}" if _is_vitlab_module(f"{target}.{a.name}") else target for a in node.names]


def import_edges() -> dict[tuple[str, str], list[str]]:
    """(unit, imported unit) -> ["vitlab/x.py:LINE", ...] for every import between two different units."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sorted(ROOT.rglob("*.py")):
        module = _module_name(path)
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            src = _unit(module)
            for dst in sorted({_unit(t) for t in _imported_modules(node, module, path.name == "__init__.py")}):
                if src != dst:
                    edges[(src, dst)].append(f"{path.relative_to(ROOT.parent)}:{node.lineno}")
    return edges


def _rank() -> dict[str, int]:
    return {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def test_every_unit_has_a_layer() -> None:
    units = {_unit(_module_name(p)) for p in ROOT.rglob("*.py")}
    rank = _rank()
    assert len(rank) == sum(len(layer) for layer in LAYERS), "a unit is listed twice in LAYERS"
    assert units - set(rank) == set(), "add these units to LAYERS"
    assert set(rank) - units == set(), "these LAYERS entries name no vitlab module"


def test_imports_flow_down() -> None:
    rank = _rank()
    upward = {edge: locs for edge, locs in import_edges().items() if rank[edge[1]] >= rank[edge[0]]}
    new = {f"{a} -> {b}": locs for (a, b), locs in upward.items() if (a, b) not in KNOWN_VIOLATIONS}
    gone = sorted(f"{a} -> {b}" for a, b in KNOWN_VIOLATIONS if (a, b) not in upward)
    assert not new, f"upward imports (a unit may import only its own or lower layers, see LAYERS): {new}"
    assert not gone, f"fixed, so delete from KNOWN_VIOLATIONS: {gone}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one unit (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_unit_cycles() -> None:
    edges = import_edges()
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in edges:
        if (a, b) not in KNOWN_VIOLATIONS:
            graph[a].add(b)
    cycles = _cycles(graph)
    detail = {" <-> ".join(c): {f"{a} -> {b}": locs[:3] for (a, b), locs in edges.items() if a in c and b in c}
              for c in cycles}
    assert not cycles, f"import cycles between vitlab's units: {detail}"


def test_cycle_finder_and_edges_on_a_tiny_case() -> None:
    """The checks themselves: Tarjan finds a 3-cycle and ignores a chain; relative imports resolve to units."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": {"c"}}) == []
    tree = ast.parse("from ..errors import UserError\nfrom . import sim\nfrom vitlab import models\nimport vitlab\n")
    found = [t for node in tree.body for t in _imported_modules(node, "vitlab.quant.base", is_package=False)]
    assert [_unit(t) for t in found] == ["errors", "quant", "models", "vitlab"]
