"""Imports flow one way: a contract test over vitlab's own import statements.

Every `vitlab/**/*.py` is parsed with `ast`; each `import` / `from ... import` naming a vitlab module — at module
level, inside functions, relative or absolute — becomes an edge between two *units*: the top-level modules and
packages of vitlab (`vitlab.quant.sim` belongs to unit `quant`, `vitlab/__init__.py` to the root unit `vitlab`).
`from vitlab import quant` is an edge to `quant`, `from vitlab import create_model` one to the root.

`LAYERS` lists the units low to high; a unit may import its own modules and units in lower layers only (units that
share a layer may not import each other). Why this order:

- errors, _version, utils: leaf helpers with no vitlab imports of their own (utils only raises vitlab's errors).
- record: the typed `model.vitlab` record of what vitlab knows about a model (spec, techniques, checkpoint, ...),
  which every unit above reads and writes.
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
- pareto: sweeps and reports over the benchmarks; api: the Python verbs; entrypoints: timm entrypoints of models
  that higher units build (vl_dense), importing their unit when called; cli: the command line; __main__ runs it;
  the root package re-exports the public names and is imported by nobody inside vitlab.

Since every allowed edge goes down the layer order, no cycle can form from them; `test_no_unit_cycles` checks that
independently on the whole graph, so a wrong `LAYERS` cannot hide one.
"""
from __future__ import annotations

import ast
import re
import tomllib
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "vitlab"

LAYERS: list[tuple[str, ...]] = [
    ("errors",), ("_version",), ("utils",), ("record",), ("profiling",), ("techniques",), ("recipes",), ("runner",),
    ("checkpoint",), ("data",), ("models",), ("contract",), ("attention",), ("loader",),
    ("tokens", "quant", "prune"), ("explain",), ("engine",), ("dense",), ("bench", "predict", "search", "agents"),
    ("pareto",), ("api", "entrypoints"), ("cli",), ("__main__",), ("vitlab",),
]

# (importing unit, imported unit) -> why the upward import is still there. Checked exactly: a new violation fails,
# and so does a listed one that has gone (delete its line: the list only shrinks).
KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {}


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


# ---------------------------------------------------------------------------------------- imports at the top
# An import runs at the top of its file (HOUSE_STYLE: a reader sees a module's dependencies in one place, and a
# broken import fails at load, not in the middle of a run). A function may import lazily only:
# - an optional package (pyproject's extras) or a required one that is slow to import (HEAVY_PACKAGES), so that
#   `import vitlab` and `vitlab --help` do not pay for it;
# - a vitlab module, where the function is listed in LAZY_IMPORTS with the reason: importing it at the top would
#   load a technique or application unit (quant, dense, tokens, bench, search, agents) at `import vitlab` or
#   `vitlab --help`, or would form a load-time cycle. The list only shrinks (like KNOWN_VIOLATIONS).

# import name -> distribution in pyproject.toml's optional-dependencies (None: not a declared dependency at all)
OPTIONAL_PACKAGES: dict[str, str | None] = {
    "transformers": "transformers", "openvino": "openvino", "onnx": "onnx", "onnxruntime": "onnxruntime",
    "nncf": "nncf", "torchao": "torchao", "torch_pruning": "torch-pruning", "skimage": "scikit-image",
    "pycocotools": "pycocotools", "torchmetrics": "torchmetrics", "optuna": "optuna", "pyspiel": "open-spiel",
    "diffusers": "diffusers", "open_clip": "open-clip-torch", "av": "av", "numba": "numba",
    "natten": None, "mamba_ssm": None,   # CUDA kernels used when installed (models/dinat.py, models/msvmamba.py)
}
# Required packages slow enough to import that only the functions using them load them (import times measured
# after `import vitlab` on the 2-core Xeon, 1 thread).
HEAVY_PACKAGES: dict[str, str] = {
    "matplotlib": "0.4 s, pyplot 2.5 s; and matplotlib.use('Agg') has to run before pyplot is imported",
    "scipy": "scipy.optimize / scipy.stats 2 s",
    "pytorch_grad_cam": "8 s (it loads OpenCV and its CAM zoo)",
    "rich": "rich.progress 0.14 s, only where a progress bar or a table is drawn",
}

_ROOT = "keeps `import vitlab` light (the root package loads this module): importing"
_HELP = "keeps `vitlab --help` light (the CLI loads this module at start-up): importing"
_DENSE = "vitlab.dense takes 1.3 s (it loads quant and prune to register its handlers into them)"
_QUANT = "vitlab.quant takes 0.2 s"
_TOKENS = "vitlab.tokens takes 0.1 s"
_BENCH = "vitlab.bench loads dense and quant"
# "vitlab/x.py:function" -> why that function imports a vitlab module inside its body
LAZY_IMPORTS: dict[str, str] = {
    "vitlab/api.py:measure": f"{_ROOT} {_BENCH}",
    "vitlab/api.py:quantize_": f"{_ROOT} {_QUANT}",
    "vitlab/api.py:calibrate": f"{_ROOT} {_QUANT}",
    "vitlab/api.py:prune_": f"{_ROOT} vitlab.prune (tests/test_checkpoint_formats.py)",
    "vitlab/entrypoints.py:vl_dense": f"{_ROOT} {_DENSE}",
    "vitlab/explain/tokens.py:token_source_map": f"{_ROOT} {_TOKENS}",
    "vitlab/cli.py:_engine_trial": f"{_HELP} {_QUANT}",
    "vitlab/cli.py:_train_dense": f"{_HELP} {_DENSE}",
    "vitlab/cli.py:_is_dense": f"{_HELP} {_DENSE}",
    "vitlab/cli.py:_eval_dense": f"{_HELP} {_DENSE}",
    "vitlab/cli.py:cmd_predict": f"{_HELP} {_DENSE}",
    "vitlab/cli.py:cmd_bench": f"{_HELP} {_BENCH}",
    "vitlab/cli.py:cmd_measure": f"{_HELP} {_BENCH}",
    "vitlab/cli.py:cmd_quantize": f"{_HELP} {_QUANT}",
    "vitlab/cli.py:cmd_export": f"{_HELP} {_QUANT}",
    "vitlab/cli.py:cmd_train_tame": f"{_HELP} vitlab.explain.tame loads vitlab.tokens",
    "vitlab/cli.py:cmd_toy": f"{_HELP} vitlab.agents (the toy agents' registry)",
    "vitlab/cli.py:cmd_search": f"{_HELP} vitlab.search (the NAS supernet and its search)",
    "vitlab/engine/train.py:_fit": f"{_HELP} {_TOKENS} (token-consistency training only)",
    "vitlab/pareto/plan.py:_token_stacks": f"{_HELP} {_TOKENS}",
    "vitlab/pareto/sweep.py:_measure_point": f"{_HELP} {_BENCH}",
    "vitlab/pareto/sweep.py:_test_accuracy": f"{_HELP} {_BENCH}",
    "vitlab/pareto/sweep.py:_robustness": f"{_HELP} {_BENCH}",
    "vitlab/pareto/sweep.py:_retime": f"{_HELP} {_BENCH}",
    "vitlab/pareto/sweep.py:_confirm_speed": f"{_HELP} {_BENCH}",
    "vitlab/pareto/sweep.py:_check_task_data": f"{_HELP} {_DENSE}",
    "vitlab/pareto/sweep.py:_run_sweep": f"{_HELP} vitlab.pareto.export loads quant; and pareto.report imports sweep "
                                         "at load time (a cycle)",
    "vitlab/contract/registry.py:_adapter": "a load-time cycle: contract.families registers its adapters through "
                                            "registry.register_adapter, so the registry loads them on first lookup",
    "vitlab/contract/registry.py:adapter_families": "the same cycle as registry._adapter",
    "vitlab/data/transforms.py:check_source_classes": "a load-time cycle: data.build imports transforms",
    "vitlab/data/transforms.py:dataset_for_model": "a load-time cycle: data.build imports transforms",
}


def function_imports(tree: ast.Module) -> list[tuple[str, int, ast.Import | ast.ImportFrom]]:
    """(qualified name of the enclosing function, line, statement) for each import inside a function body."""
    found: list[tuple[str, int, ast.Import | ast.ImportFrom]] = []

    def visit(node: ast.AST, scope: list[str], in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)) and in_function:
                found.append((".".join(scope), child.lineno, child))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, scope + [child.name], in_function or not isinstance(child, ast.ClassDef))
            else:
                visit(child, scope, in_function)

    visit(tree, [], False)
    return found


def _third_party(node: ast.Import | ast.ImportFrom) -> list[str]:
    """The top-level packages an absolute, non-vitlab import names."""
    if isinstance(node, ast.ImportFrom):
        return [] if node.level or (node.module or "").split(".")[0] == "vitlab" else [node.module.split(".")[0]]
    return [a.name.split(".")[0] for a in node.names if a.name.split(".")[0] != "vitlab"]


def test_imports_at_top() -> None:
    misplaced, listed = [], set()
    for path in sorted(ROOT.rglob("*.py")):
        rel, module = path.relative_to(ROOT.parent).as_posix(), _module_name(path)
        for function, line, node in function_imports(ast.parse(path.read_text(), filename=str(path))):
            key = f"{rel}:{function}"
            if _imported_modules(node, module, path.name == "__init__.py"):
                if key in LAZY_IMPORTS:
                    listed.add(key)
                else:
                    misplaced.append(f"{rel}:{line} ({function}): {ast.unparse(node)}  [key {key!r}]")
            for package in _third_party(node):
                if package not in OPTIONAL_PACKAGES and package not in HEAVY_PACKAGES:
                    misplaced.append(f"{rel}:{line} ({function}): {ast.unparse(node)}  [{package} is required]")
    stale = sorted(set(LAZY_IMPORTS) - listed)
    assert not misplaced, (
        "imports inside functions; move each to the top of its file (merged into the imports there). Only an optional "
        "package (OPTIONAL_PACKAGES) or a slow one (HEAVY_PACKAGES) may stay; so may a vitlab import whose key is in "
        "LAZY_IMPORTS with why (a top-level import would load a heavy unit at `import vitlab` / `vitlab --help`, or "
        "form a load-time cycle):\n" + "\n".join(misplaced))
    assert not stale, f"these functions no longer import vitlab lazily, so delete them from LAZY_IMPORTS: {stale}"


def _distribution(requirement: str) -> str:
    """"torch-pruning==1.6.1" -> "torch-pruning"."""
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower()


def test_optional_packages_are_extras() -> None:
    """OPTIONAL_PACKAGES names distributions pyproject.toml really lists as optional (none of the required ones)."""
    project = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["project"]
    extras = {_distribution(spec) for specs in project["optional-dependencies"].values() for spec in specs}
    required = {_distribution(spec) for spec in project["dependencies"]}
    declared = {dist for dist in OPTIONAL_PACKAGES.values() if dist is not None}
    assert declared - extras == set(), "not an optional dependency in pyproject.toml"
    assert declared & required == set(), "a required dependency is not optional: import it at the top"


def test_function_imports_on_a_tiny_case() -> None:
    """Module-level and class-level imports are at the top; imports in functions and methods are found by name."""
    tree = ast.parse("import os\nclass A:\n    import re\n    def f(self):\n        from . import x\n"
                     "        def g():\n            import matplotlib\n\ndef h():\n    if True:\n        import timm\n")
    found = [(function, line, ast.unparse(node)) for function, line, node in function_imports(tree)]
    assert found == [("A.f", 5, "from . import x"), ("A.f.g", 7, "import matplotlib"), ("h", 11, "import timm")]
    assert [_third_party(node) for _, _, node in function_imports(tree)] == [[], ["matplotlib"], ["timm"]]
