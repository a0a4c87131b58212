"""Keep large CPU tensors off ``mmap``: glibc serves allocations above 128 KiB (adaptive up to 32 MiB)
with fresh ``mmap`` pages and returns them on free, so every decode step page-faults its
activations and gathered KV in again. On the 2-core reference machine this doubled a batch-16
decode step (395 ms -> 219 ms once off). PyTorch's CPU docs recommend jemalloc/tcmalloc for the same
reason; this is the no-install equivalent: raise glibc's mmap and trim thresholds with ``mallopt``.

Process-wide, so only the CLI (a process kvshrink owns) calls it; library users may call it
themselves. A no-op where glibc is absent. ``KVSHRINK_NO_MALLOC_TUNING=1`` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def tune_cpu_allocator(threshold: int = 1 << 30) -> bool:
    """Serve allocations up to ``threshold`` bytes from the heap and keep freed memory for reuse.
    Returns whether the setting took effect."""
    name = ctypes.util.find_library("c")
    if os.environ.get("KVSHRINK_NO_MALLOC_TUNING") or not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    # glibc caps the mmap threshold at HEAP_MAX (32 MiB on 64-bit) for mallopt; larger values fail
    ok = True
    for opt, val in ((_M_MMAP_THRESHOLD, min(threshold, 32 << 20)), (_M_TRIM_THRESHOLD, threshold),
                     (_M_TOP_PAD, 64 << 20)):
        ok = bool(mallopt(ctypes.c_int(opt), ctypes.c_int(val))) and ok
    return ok
