"""What the C library's allocator does between steps, measured and (on request) steadied.

PyTorch's CPU tensors come from ``posix_memalign``, i.e. glibc's malloc. glibc gives freed memory
back to the OS whenever the free space at the top of its heap passes a threshold (at most 64 MiB,
adjusted at run time), and serves blocks over 32 MiB with their own ``mmap``. A training step frees
and re-allocates hundreds of MiB (``zero_grad(set_to_none=True)`` alone frees every weight
gradient), so a step can start by returning memory that the same step then takes back, page by page:
measured on the 2-core VM, ResNet-50 batch 8 training steps took 0 to 100,000 minor page faults each
(about 3 us apiece, so up to ~0.3 s of a ~1.4 s step), depending on where the long-lived blocks
happened to land, and differently for each model in an interleaved benchmark.

* :func:`minor_faults` — the process's minor page faults so far (the benchmarks report faults per
  call beside each time).
* :func:`retain_freed_memory` — keep freed memory in the process, with glibc's ``mallopt``: no
  trimming of the heap top, no per-block ``mmap``. The process keeps its peak heap and steady-state
  steps take no page faults. (PyTorch's CPU launcher, ``python -m torch.backends.xeon.run_cpu``,
  goes further and swaps glibc's malloc for tcmalloc or jemalloc, allocators that cache freed memory,
  by default; this is the same idea without a preloaded library.) Process-wide and one-way, so it
  is never applied implicitly: the benchmarks take it with ``--malloc retain`` and record it.
"""
from __future__ import annotations

import ctypes
import ctypes.util

try:
    import resource
except ImportError:  # not a Unix: no fault counts
    resource = None
from typing import Optional

__all__ = ["minor_faults", "retain_freed_memory", "malloc_policy"]

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1

_policy = "default"


def minor_faults() -> int:
    """Minor page faults of this process so far (``getrusage``; 0 where there is none), for
    differences around a call."""
    if resource is None:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _glibc() -> Optional[ctypes.CDLL]:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return None  # musl, macOS, ...: no glibc heap to configure
    return libc


def retain_freed_memory() -> None:
    """Keep freed memory in the process (glibc only): ``mallopt(M_TRIM_THRESHOLD, INT_MAX)`` and
    ``mallopt(M_MMAP_MAX, 0)``. Raises RuntimeError, naming the cause, where this is not glibc or
    glibc refuses a setting; affects every allocation of the process from now on."""
    global _policy
    libc = _glibc()
    if libc is None:
        raise RuntimeError("retain_freed_memory: the C library is not glibc, whose mallopt this "
                           "uses (with another allocator, configure it instead, e.g. jemalloc's "
                           "dirty_decay_ms/muzzy_decay_ms)")
    for param, value, what in ((_M_TRIM_THRESHOLD, _INT_MAX, "M_TRIM_THRESHOLD"), (_M_MMAP_MAX, 0, "M_MMAP_MAX")):
        if libc.mallopt(param, value) != 1:
            raise RuntimeError(f"retain_freed_memory: glibc refused mallopt({what}, {value})")
    _policy = "retain"


def malloc_policy() -> str:
    """``"retain"`` after :func:`retain_freed_memory`, else ``"default"`` (for benchmark records)."""
    return _policy
