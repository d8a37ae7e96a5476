"""`engine=auto`: the int8 (or bf16) engine chosen by measurement on the machine it runs on.

Which engine runs a quantized ViT fastest depends on the CPU: on an AVX2-only CPU ONNX Runtime's int8 matmuls beat
OpenVINO's, on an AVX-512 VNNI CPU OpenVINO's won (BENCHMARKS.md, "Quantization"). So `auto` does not guess: it
builds every installed engine from the same calibrated twin, times each on the model at the user's batch and thread
count (a short trial, round-robin, median), keeps the fastest and closes the rest. The choice and its timings are
cached per (CPU model, ISA flags, model signature, batch, threads, engine versions) under the user's cache folder
(`$VITLAB_CACHE`, else `$XDG_CACHE_HOME/vitlab`, else `~/.cache/vitlab`), so a second run builds only the winner.

`--engine-trial off` (or `engine_trial(enabled=False)`, or `VITLAB_ENGINE_TRIAL=off`) skips the trial and applies
the ISA rule instead: OpenVINO where the CPU has VNNI or AMX int8, ONNX Runtime elsewhere (`isa_rule`).

Every runner built through here carries `engine_choice` (a dict: engine, how = trial | cached | rule | only,
timings in ms per batch, batch, threads, cpu, cpu_flags), which `vitlab bench` / `measure` rows record.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import importlib.util
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..profiling.cpu import cpu_flags_text, cpu_name, has_amx, has_vnni
from ..utils.io import atomic_write_json

__all__ = ["EngineChoice", "EngineFailure", "engine_trial", "trial_settings", "choose_engine", "isa_rule", "installed_engines",
           "model_signature", "cache_path"]


class EngineFailure(RuntimeError):
    """An engine could not convert or run the model (raised by the deploy builders, with the engine's reason);
    `auto` leaves that engine out of its trial, a named engine turns it into TechniqueNotApplicable."""


@dataclass(frozen=True)
class _TrialSettings:
    batch: int | None = None       # the batch the trial times (None: the calibration batch, else 32)
    enabled: bool | None = None    # None: on, unless VITLAB_ENGINE_TRIAL=off
    rounds: int = 3


_SETTINGS: contextvars.ContextVar[_TrialSettings] = contextvars.ContextVar("vitlab_engine_trial",
                                                                          default=_TrialSettings())


@contextlib.contextmanager
def engine_trial(batch: int | None = None, enabled: bool | None = None, rounds: int = 3) -> Iterator[None]:
    """Within the block, `engine=auto` times its trial at `batch` (the batch the caller will run), or skips the
    trial and uses the ISA rule (`enabled=False`). The CLI wraps every verb in this with its --batch and
    --engine-trial."""
    if batch is not None and batch < 1:
        raise ValueError(f"engine trial batch={batch} must be >= 1")
    if rounds < 1:
        raise ValueError(f"engine trial rounds={rounds} must be >= 1")
    token = _SETTINGS.set(_TrialSettings(batch, enabled, rounds))
    try:
        yield
    finally:
        _SETTINGS.reset(token)


def trial_settings() -> _TrialSettings:
    s = _SETTINGS.get()
    if s.enabled is None:
        env = os.environ.get("VITLAB_ENGINE_TRIAL", "on").strip().lower()
        if env not in ("on", "off", "1", "0", "true", "false", ""):
            raise ValueError(f"VITLAB_ENGINE_TRIAL={env!r}: use on or off")
        s = _TrialSettings(s.batch, env not in ("off", "0", "false"), s.rounds)
    return s


@dataclass
class EngineChoice:
    """How `auto` picked `engine`: `how` is "trial" (timed here now), "cached" (an earlier trial on this CPU, model
    signature, batch and threads), "rule" (trial off: the ISA rule) or "only" (one engine installed)."""

    engine: str
    how: str
    batch: int
    threads: int
    timings_ms: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)   # engines that could not run the model, and why
    cpu: str = field(default_factory=cpu_name)
    cpu_flags: str = field(default_factory=cpu_flags_text)
    key: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        times = ", ".join([f"{e} {t:.1f} ms" for e, t in sorted(self.timings_ms.items(), key=lambda kv: kv[1])]
                          + [f"{e} failed" for e in self.failed])
        return f"engine=auto chose {self.engine} ({self.how}{': ' + times if times else ''}; batch {self.batch}, " \
               f"{self.threads} threads, {self.cpu_flags or 'no AVX2'})"


_VERSIONS = {"onnxruntime": "onnxruntime", "openvino": "openvino", "torch": "torch"}


def installed_engines(candidates: tuple[str, ...]) -> list[str]:
    """The engines of `candidates` whose Python package imports here."""
    return [e for e in candidates if importlib.util.find_spec(_VERSIONS[e]) is not None]


def isa_rule(candidates: list[str], kind: str = "int8") -> str:
    """The engine without a trial. int8: OpenVINO where the CPU has VNNI or AMX (its u8 x s8 kernels use them;
    3.02x torch float vs ONNX Runtime's 2.23x on deit_small, AVX-512 VNNI, BENCHMARKS.md), ONNX Runtime on AVX2-only
    CPUs (2.04x vs OpenVINO's 1.23x there). bf16: OpenVINO (its bf16 kernels cover the whole graph)."""
    if kind == "bf16":
        order = ["openvino", "torch"]
    else:
        order = ["openvino", "onnxruntime"] if (has_vnni() or has_amx()) else ["onnxruntime", "openvino"]
    return next((e for e in order if e in candidates), candidates[0])


def model_signature(model: torch.nn.Module, input_shape: tuple, extra: str = "") -> str:
    """What decides an engine's speed, not its numbers: the class, every parameter/buffer name, shape and dtype, the
    input shape and `extra` (the technique stack). Weight values and calibration scales are left out."""
    h = hashlib.sha256()
    h.update(type(model).__qualname__.encode())
    for name, t in list(model.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    h.update(f"{tuple(input_shape)}|{extra}".encode())
    return h.hexdigest()[:16]


def cache_path() -> Path:
    root = os.environ.get("VITLAB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vitlab")
    return Path(root) / "engine-choice.json"


def _versions(engines: list[str]) -> str:
    out = []
    for e in engines:
        try:
            out.append(f"{e}={version(_VERSIONS[e])}")
        except PackageNotFoundError:
            out.append(f"{e}=?")
    return ",".join(out)


def _key(signature: str, batch: int, threads: int, engines: list[str], kind: str) -> str:
    text = json.dumps([kind, cpu_name(), cpu_flags_text(), signature, batch, threads, _versions(engines)])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _read_cache() -> dict:
    try:
        data = json.loads(cache_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, entry: dict) -> None:
    cache = _read_cache()
    cache[key] = entry
    try:
        cache_path().parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cache_path(), cache)
    except OSError:  # a read-only home only costs the cache
        pass


def _time(runners: dict[str, Callable], images: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median ms per call of each runner on `images`: one untimed call each, then `rounds` round-robin rounds (each
    engine runs for >= 0.2 s per round, so a fast model is timed over many calls)."""
    for run in runners.values():
        run(images)
    samples: dict[str, list[float]] = {e: [] for e in runners}
    for _ in range(rounds):
        for engine, run in runners.items():
            calls, start = 0, time.perf_counter()
            while True:
                run(images)
                calls += 1
                elapsed = time.perf_counter() - start
                if elapsed >= 0.2 or calls >= 50:
                    break
            samples[engine].append(1000 * elapsed / calls)
    return {e: statistics.median(s) for e, s in samples.items()}


def choose_engine(builders: dict[str, Callable[[], object]], model: torch.nn.Module, input_shape: tuple, *,
                  threads: int, default_batch: int, kind: str = "int8", extra: str = "") -> tuple[object, EngineChoice]:
    """Build the fastest runner among `builders` ({engine: () -> runner}, only installed engines) for `model`
    (input `input_shape` without the batch dimension); returns (runner, choice). The losers are closed."""
    if not builders:
        raise ValueError("engine=auto: no engine is installed (pip install onnxruntime or openvino)")
    settings = trial_settings()
    batch = settings.batch or default_batch
    engines = sorted(builders)
    key = _key(model_signature(model, input_shape, extra), batch, threads, engines, kind)
    if len(engines) == 1:
        return builders[engines[0]](), EngineChoice(engines[0], "only", batch, threads, key=key)
    cached = _read_cache().get(key)
    if settings.enabled and isinstance(cached, dict) and cached.get("engine") in builders:
        choice = EngineChoice(cached["engine"], "cached", batch, threads, dict(cached.get("timings_ms", {})), key=key)
        try:
            return builders[choice.engine](), choice
        except EngineFailure:
            pass   # the cached engine cannot run it now: time what can
    if not settings.enabled:
        failed = {}
        for engine in [isa_rule(engines, kind)] + [e for e in engines if e != isa_rule(engines, kind)]:
            try:
                return builders[engine](), EngineChoice(engine, "rule", batch, threads, key=key, failed=failed)
            except EngineFailure as err:
                failed[engine] = str(err)
        raise EngineFailure("no engine could run it: " + "; ".join(f"{e}: {m}" for e, m in failed.items()))
    runners, failed = {}, {}
    for e in engines:
        try:
            runners[e] = builders[e]()
        except EngineFailure as err:
            failed[e] = str(err)
    if not runners:
        raise EngineFailure("no engine could run it: " + "; ".join(f"{e}: {m}" for e, m in failed.items()))
    images = torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(0))
    timings = _time(runners, images, settings.rounds)
    engine = min(timings, key=timings.get)
    for e, r in runners.items():
        if e != engine and hasattr(r, "close"):
            r.close()
    choice = EngineChoice(engine, "trial", batch, threads, timings, key=key, failed=failed)
    _write_cache(key, {"engine": engine, "timings_ms": timings, "batch": batch, "threads": threads,
                       "cpu": choice.cpu, "cpu_flags": choice.cpu_flags, "when": time.strftime("%Y-%m-%d %H:%M:%S")})
    return runners[engine], choice
