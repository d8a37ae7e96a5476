"""Keep freed CPU memory inside the process, so that a forward pass does not page-fault its activations in again.

glibc's malloc, which PyTorch's CPU allocator calls, serves every allocation above its mmap threshold (128 KiB at
start, raised dynamically up to 32 MiB) with fresh pages from `mmap` and hands them back with `munmap` when they
are freed; it also trims the top of its heap whenever more than the trim threshold is free. Inference allocates and
frees the same large activations on every call, so every call page-faults them in again. Under a virtual machine a
page fault is expensive, and which of glibc's modes a process lands in depends on its allocation history, so the same
operator runs at very different speeds in different processes. Measured on the 2-core CI VM (torch 2.14.1, 2 threads,
`python -c` per case, three processes each): a 3x3 convolution of (32, 1, 56, 56) -> 24 channels took 10.5-12.6 ms
in three of three processes with the default allocator and 1.1-1.4 ms tuned; (32, 3, 224, 224) -> 64 channels took
470-534 ms and 74-82 ms.

`tune_allocator()` turns `mmap` off for the heap (M_MMAP_MAX = 0) and raises the trim threshold to 1 GiB, so freed
blocks are reused instead of returned to the kernel. The cost: memory the process freed stays in its resident set
(up to the peak it reached; peak RSS itself does not change). The vitlab CLI calls it at start-up and the
benchmark scripts do too; `VITLAB_ALLOCATOR=default` in the environment leaves glibc's defaults. The Python API
never changes the allocator unless you call this. With jemalloc or tcmalloc preloaded (`LD_PRELOAD`), or on
another C library, it does nothing and says so.
"""
import ctypes
import ctypes.util
import os
import platform

__all__ = ["tune_allocator", "allocator_state"]

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4     # glibc <malloc.h>
TRIM_THRESHOLD = 1 << 30
_state = "glibc default"


def _libc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def tune_allocator() -> str:
    """Set glibc's malloc to keep freed memory (see the module docstring); returns `allocator_state()`.

    Idempotent; `VITLAB_ALLOCATOR=default` in the environment makes it a no-op.
    """
    global _state
    if os.environ.get("VITLAB_ALLOCATOR", "").lower() == "default":
        _state = "glibc default (VITLAB_ALLOCATOR=default)"
        return _state
    preload = os.environ.get("LD_PRELOAD", "")
    if "jemalloc" in preload or "tcmalloc" in preload:
        _state = f"preloaded ({preload})"
        return _state
    libc = _libc()
    if libc is None:
        _state = f"not tuned ({platform.system()} {platform.libc_ver()[0] or 'non-glibc'} C library)"
        return _state
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    _state = "glibc tuned (no mmap, trim threshold 1 GiB)" if ok else "glibc default (mallopt refused)"
    return _state


def allocator_state() -> str:
    """What `tune_allocator` did in this process: "glibc tuned (...)", "glibc default", ..."""
    return _state
