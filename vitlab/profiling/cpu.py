"""What this CPU can do: its name and the instruction-set flags that change which kernels engines run.

Engines (oneDNN inside torch and OpenVINO, MLAS inside ONNX Runtime) pick kernels by ISA: VNNI turns u8 x s8
matmuls into one instruction, AVX512_BF16 / AMX add bf16 (and AMX int8) tile kernels. A timing or a numeric result
is only comparable with the flags beside it, so every measurement row stores `cpu_flags`.

`VITLAB_CPU_FLAGS` (space- or comma-separated) overrides what /proc/cpuinfo says, for tests of the rules that
depend on the ISA (it changes vitlab's decisions, not the kernels the engines run).
"""
from __future__ import annotations

import functools
import os
import platform

__all__ = ["ISA_FLAGS", "cpu_name", "cpu_flags", "cpu_flags_text", "has_vnni", "has_bf16", "has_amx"]

# the flags that change int8 / bf16 kernels, in the order they are printed
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset]:
    name, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not name:
                    name = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = frozenset(value.split())
                if name and flags:
                    break
    except OSError:
        pass
    return name or platform.processor() or platform.machine() or "unknown", flags


def cpu_name() -> str:
    """The CPU's model name ("AMD EPYC", "Intel(R) Xeon(R) ...")."""
    return _cpuinfo()[0]


def cpu_flags() -> frozenset:
    """The ISA flags of `ISA_FLAGS` this CPU has (or `VITLAB_CPU_FLAGS` says it has)."""
    override = os.environ.get("VITLAB_CPU_FLAGS")
    if override is not None:
        have = set(override.replace(",", " ").split())
    else:
        have = _cpuinfo()[1]
    return frozenset(f for f in ISA_FLAGS if f in have)


def cpu_flags_text() -> str:
    """The ISA flags as one string in a fixed order, e.g. "avx2 avx512f avx512_vnni avx512_bf16" ("" if none)."""
    have = cpu_flags()
    return " ".join(f for f in ISA_FLAGS if f in have)


def has_vnni() -> bool:
    """u8 x s8 dot-product instructions (AVX512_VNNI, AVX-VNNI) or AMX int8 tiles."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def has_bf16() -> bool:
    """Native bf16 arithmetic (AVX512_BF16 or AMX bf16 tiles); elsewhere bf16 is emulated and slow."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def has_amx() -> bool:
    return bool(cpu_flags() & {"amx_tile", "amx_int8", "amx_bf16"})
