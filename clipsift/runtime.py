"""Process-wide settings that make CPU training fast; applied once by the CLI and the benchmarks.

glibc's malloc serves big blocks (over 32 MiB at most, adaptively less) with fresh mmap pages and
returns freed heap memory to the OS. A training step frees and re-allocates the same tensor sizes
every step — the 19 MB token-embedding table of a tiny CLIP three or four times — so each step
page-faults its buffers in again: measured here, a fresh 19 MB copy + zero-fill took 16 ms, a
reused one 1.6 ms, and a FLYT step spent a third of its time there. Keeping freed memory in the
heap is what tcmalloc and jemalloc (PyTorch's CPU performance advice) do; the process's memory
then stays at its high-water mark instead of shrinking between steps.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to reuse freed blocks up to 1 GiB instead of unmapping them. Returns
    whether it is in effect (False on other C libraries, or with CLIPSIFT_KEEP_FREED_MEMORY=0)."""
    global _applied
    if _applied is None:
        _applied = False
        if os.environ.get("CLIPSIFT_KEEP_FREED_MEMORY", "1") != "0":
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                mallopt = libc.mallopt
            except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
                return False
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _applied = bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30) and mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))
    return _applied
