"""Measurement primitives: FLOPs with attention counted, wall-clock timing, peak memory in a fresh process.

Low in the package on purpose (pruning and benchmarking build on it): torch, timm and the standard library only.
"""
from .allocator import allocator_state, tune_allocator
from .cpu import cpu_flags, cpu_flags_text, cpu_name, has_amx, has_bf16, has_vnni
from .flops import FlopCount, count_flops, fft_macs, sdpa_math_backend
from .memory import peak_memory_mb
from .timing import Timing, environment, num_threads, time_callable

__all__ = [
    "allocator_state", "tune_allocator",
    "cpu_name", "cpu_flags", "cpu_flags_text", "has_vnni", "has_bf16", "has_amx",
    "FlopCount", "count_flops", "fft_macs", "sdpa_math_backend",
    "peak_memory_mb",
    "Timing", "environment", "num_threads", "time_callable",
]
