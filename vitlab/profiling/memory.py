"""Peak CPU memory (RSS) of inference, measured in a fresh Python process per point.

Peak RSS is a per-process high-water mark, so a measurement in the calling process would include whatever that
process did before (other models, data loading). `peak_memory_mb` therefore starts a child interpreter that builds
the model from a "package.module:function" factory, runs two forward passes and reports /proc/self/status numbers.
Linux only (it reads /proc).

Manual use: `echo '{"factory": "vitlab.profiling.memory:_demo_factory", "input_shape": [1, 3, 224, 224]}' |
python -m vitlab.profiling.memory`.
"""
import gc
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import timm
import torch

__all__ = ["peak_memory_mb"]

_DTYPES = ("fp32", "bf16")
_STDERR_TAIL_LINES = 20


def peak_memory_mb(
        factory: str,
        factory_kwargs: dict,
        input_shape: tuple[int, ...],
        *,
        threads: int = 1,
        dtype: str = "fp32",
        channels_last: bool = False,
        timeout_s: float = 600,
) -> dict:
    """Peak RSS (MiB) of building `factory(**factory_kwargs)` and running it twice on `torch.randn(input_shape)`.

    `factory` is "package.module:function", importable in a fresh interpreter started in the current directory;
    it returns the runner: an nn.Module or any callable `images -> logits`. Runs under `torch.inference_mode()`,
    with CPU bf16 autocast if dtype == "bf16", channels-last input (and module) if `channels_last`.

    Returns the child's report: "peak_rss_mb" (VmHWM after the passes), "baseline_rss_mb" (VmRSS after building
    the runner and its input), "peak_delta_mb" (peak - baseline: what inference itself adds), "import_rss_mb"
    (VmRSS before building), "hwm_reset" (whether the high-water mark could be reset before the passes; if not,
    the peak also covers building the runner), and the settings used.
    """
    if not isinstance(factory, str) or factory.count(":") != 1 or not all(factory.split(":")):
        raise ValueError(f"peak_memory_mb: factory={factory!r} must be 'package.module:function', "
                         f"e.g. 'vitlab.profiling.memory:_demo_factory'")
    if dtype not in _DTYPES:
        raise ValueError(f"peak_memory_mb: dtype={dtype!r} is not supported; use one of {_DTYPES}")
    if threads < 1:
        raise ValueError(f"peak_memory_mb: threads={threads} must be >= 1")
    if channels_last and len(input_shape) != 4:
        raise ValueError(f"peak_memory_mb: channels_last needs a 4-D (N, C, H, W) input_shape, "
                         f"got {tuple(input_shape)}")
    spec = {
        "factory": factory,
        "factory_kwargs": dict(factory_kwargs),
        "input_shape": [int(s) for s in input_shape],
        "threads": int(threads),
        "dtype": dtype,
        "channels_last": bool(channels_last),
    }
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    root = str(Path(__file__).resolve().parents[2])  # so the child finds this vitlab even if it is not installed
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    # `-c` rather than `-m vitlab.profiling.memory`: the package __init__ imports this module, and runpy warns then.
    cmd = [sys.executable, "-c", "from vitlab.profiling.memory import _child_main; _child_main()"]
    try:
        proc = subprocess.run(cmd, input=json.dumps(spec), capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"peak_memory_mb: child for factory {factory!r} ran past timeout_s={timeout_s}; "
                           f"raise timeout_s or use a smaller input_shape") from e
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-_STDERR_TAIL_LINES:])
        raise RuntimeError(f"peak_memory_mb: child for factory {factory!r} failed (exit code {proc.returncode}); "
                           f"its stderr ends with:\n{tail}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"peak_memory_mb: child for factory {factory!r} printed no JSON report; "
                           f"stdout ends with: {proc.stdout[-500:]!r}")
    return json.loads(lines[-1])


def _demo_factory(name: str = "deit_tiny_patch16_224", **kwargs):
    """A timm model in eval mode: `timm.create_model(name, **kwargs).eval()` (for tests and examples)."""
    return timm.create_model(name, **kwargs).eval()


# --- child side -----------------------------------------------------------------------------------------------

def _status_mb(field: str) -> float:
    """A /proc/self/status memory field (e.g. VmRSS, VmHWM) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {field} line; peak_memory_mb needs Linux")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, writing 5 to clear_refs); False if not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _load_factory(factory: str):
    module_name, _, func_name = factory.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"factory {factory!r}: cannot import module {module_name!r} ({e})") from e
    try:
        return getattr(module, func_name)
    except AttributeError:
        raise AttributeError(f"factory {factory!r}: module {module_name!r} has no attribute {func_name!r}") from None


def _measure(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    import_mb = _status_mb("VmRSS")
    runner = _load_factory(spec["factory"])(**spec.get("factory_kwargs", {}))
    x = torch.randn(spec["input_shape"])
    if spec.get("channels_last"):
        x = x.contiguous(memory_format=torch.channels_last)
        if isinstance(runner, torch.nn.Module):
            runner = runner.to(memory_format=torch.channels_last)
    bf16 = spec.get("dtype", "fp32") == "bf16"
    gc.collect()
    baseline_mb = _status_mb("VmRSS")
    hwm_reset = _reset_peak()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for _ in range(2):
            runner(x)
    peak_mb = _status_mb("VmHWM")
    return {
        "peak_rss_mb": peak_mb,
        "baseline_rss_mb": baseline_mb,
        "peak_delta_mb": peak_mb - baseline_mb,
        "import_rss_mb": import_mb,
        "hwm_reset": hwm_reset,
        "factory": spec["factory"],
        "input_shape": spec["input_shape"],
        "threads": torch.get_num_threads(),
        "dtype": spec.get("dtype", "fp32"),
        "channels_last": bool(spec.get("channels_last")),
    }


def _child_main(argv: list[str] | None = None) -> None:
    """Read a JSON spec from argv[1] or stdin, measure, print one JSON line."""
    argv = sys.argv if argv is None else argv
    spec = json.loads(argv[1] if len(argv) > 1 else sys.stdin.read())
    print(json.dumps(_measure(spec)), flush=True)


if __name__ == "__main__":
    _child_main()
