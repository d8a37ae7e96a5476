"""The registry of the toy-scale seed systems behind `vitlab toy NAME`.

Each toy runs one seed system's core mechanism, as its paper specifies it, on a small real task that trains in minutes
on a CPU, beside the baseline the paper compares against, and returns the numbers its claim is about. A toy is a
function registered with `@register_toy`:

    @register_toy("alphavit", "AlphaZero with a ViT over board cells (Connect-4, tic-tac-toe)", requires=("pyspiel",))
    def run(out: Path, seed: int, quick: bool) -> dict[str, float | str]:
        ...

`out` is a folder the toy may write artefacts into (plots, weights); `quick` shrinks the run to a smoke test of a few
seconds (used by the tests and `vitlab toy NAME --quick`). `run_toy` checks the optional packages a toy needs, seeds
everything, runs it and writes `out/metrics.json` (atomically) with the metrics, seed, wall time and CPU.
"""
from __future__ import annotations

import importlib
import os
import platform
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import UserError
from ..utils.io import atomic_write_json
from ..utils.lock import check_writable

__all__ = ["Toy", "ToyError", "register_toy", "toy_names", "get_toy", "missing_packages", "run_toy"]

# Modules that register the built-in toys (imported on first use, so `import vitlab` stays light).
_BUILTIN_MODULES: list[str] = [".alphavit", ".calvin", ".seer", ".quarvla", ".adapt", ".cogact", ".git", ".epalm",
                               ".unit", ".adi"]

_TOYS: dict[str, "Toy"] = {}


class ToyError(UserError):
    """An unknown toy, or one whose optional packages are not installed."""


@dataclass(frozen=True)
class Toy:
    name: str
    summary: str
    run: Callable[..., dict]
    requires: tuple[str, ...] = ()     # importable module names (the `agents` extra installs them)


def register_toy(name: str, summary: str, requires: tuple[str, ...] = ()):
    """Register `run(out: Path, seed: int, quick: bool) -> dict` as `vitlab toy NAME`."""
    def decorator(fn: Callable[..., dict]) -> Callable[..., dict]:
        if name in _TOYS and _TOYS[name].run is not fn:
            raise ValueError(f"toy {name!r} is already registered")
        _TOYS[name] = Toy(name, summary, fn, tuple(requires))
        return fn
    return decorator


def _load_builtin() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module, __package__)


def toy_names() -> list[str]:
    _load_builtin()
    return sorted(_TOYS)


def get_toy(name: str) -> Toy:
    _load_builtin()
    if name not in _TOYS:
        raise ToyError(f"unknown toy {name!r}; choose one of {', '.join(sorted(_TOYS)) or '(none)'} "
                       "(list them with `vitlab toy`)")
    return _TOYS[name]


def missing_packages(toy: Toy) -> list[str]:
    """The modules of `toy.requires` that do not import here."""
    missing = []
    for module in toy.requires:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    return missing


def run_toy(name: str, out: str | os.PathLike, seed: int = 0, quick: bool = False) -> dict:
    """Run toy `name` with `seed`, write `out/metrics.json` and return what it wrote."""
    toy = get_toy(name)
    missing = missing_packages(toy)
    if missing:
        raise ToyError(f"toy {name!r} needs {', '.join(missing)}, which is not installed; install the extra with "
                       "`pip install -e '.[agents]'`")
    out = check_writable(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    start = time.perf_counter()
    metrics = toy.run(out=out, seed=seed, quick=quick)
    result = {"toy": name, "seed": seed, "quick": quick, "metrics": metrics,
              "wall_s": round(time.perf_counter() - start, 2), "threads": torch.get_num_threads(),
              "cpu": platform.processor() or platform.machine()}
    atomic_write_json(out / "metrics.json", result)
    return result
