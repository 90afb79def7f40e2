"""Process-wide allocator setting for CPU training."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["keep_freed_memory"]

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

_MIB = 1024 * 1024


def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse freed memory instead of handing it back to the kernel.

    By default glibc serves large allocations with fresh pages and returns them on free; a
    training step frees and reallocates the same activation buffers every time, so a step can
    pay hundreds of page faults (up to a fifth of a digits CNN step; see
    benchmarks/bench_fake_quant.py). Keeping up to 256 MiB of freed memory makes the faults
    disappear. Call it only in a process that trains (it changes the whole process); returns
    False where the C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    settings = (
        (_M_MMAP_THRESHOLD, 32 * _MIB),  # glibc's maximum on 64-bit systems
        (_M_TRIM_THRESHOLD, 256 * _MIB),
        (_M_TOP_PAD, 64 * _MIB),
    )
    return all(mallopt(option, value) == 1 for option, value in settings)
