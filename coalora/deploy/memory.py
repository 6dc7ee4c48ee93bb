"""Keep freed weight buffers in the process, so a configuration switch does not page-fault.

A cold switch writes every target's dequantized weight into fresh buffers (MiniLM: 42 MB). glibc hands
buffers of this size out with ``mmap`` and gives them back to the kernel with ``munmap`` when they are
freed, so every switch faults its pages in again: on this project's 2-core EPYC a MiniLM cold switch
at 2 threads took 30.3 ms with 3,718 minor faults, against 16.6 ms with 2 faults with freed buffers
kept (``python benchmarks/switch_costs.py``, ``docs/bench/switch_costs.json``). Raising glibc's mmap
and trim thresholds keeps freed buffers in the
heap for the next switch to reuse: what tcmalloc or jemalloc would do, without preloading another
allocator. It is process-wide, so only the in-process switcher (:class:`~coalora.deploy.adaptive.
AdaptiveModel`) asks for it, never ``coalora.load``; ``COALORA_KEEP_FREED_MEMORY=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

#: glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: the largest mmap threshold glibc accepts on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): larger buffers
#: (a 7B model's fp32 matrices) are still mapped and unmapped one by one
MMAP_THRESHOLD = 32 * 2**20
#: free memory at the heap's top kept rather than returned: about one MiniLM configuration's dense
#: weights several times over, a bound on what the process holds beyond its live tensors
TRIM_THRESHOLD = 256 * 2**20

_kept: bool | None = None


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed buffers up to :data:`MMAP_THRESHOLD` each in the process (once per
    process); True where it took effect (Linux with glibc, not turned off), False elsewhere."""
    global _kept
    if _kept is None:
        _kept = _set_thresholds()
    return _kept


def _set_thresholds() -> bool:
    if os.environ.get("COALORA_KEEP_FREED_MEMORY", "1") == "0":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
