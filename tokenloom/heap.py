"""Handing freed memory back to the OS.

glibc keeps freed heap pages in the process: the float32 weights a load expanded, a prefill's
temporaries, and at batch 32 some 40 MB of per-step temporaries (peak RSS, measured with
benchmarks/bench_speed.py). `malloc_trim` returns them, but costs up to ~2 ms a call, so a hot
path passes `min_growth`: the heap is trimmed only once the resident size has grown that much
since the last trim. Elsewhere than glibc on Linux this does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import os

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_last = [0]  # resident bytes right after the last trim


def resident_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


def trim_heap(min_growth: int = 0) -> None:
    """Return free heap memory to the OS (when the process grew `min_growth` bytes since last time)."""
    trim = _malloc_trim()
    if trim is None:
        return
    if min_growth and resident_bytes() - _last[0] < min_growth:
        return
    trim(0)
    _last[0] = resident_bytes()


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
