"""The XLA:CPU runtime settings every lm program starts with (`lm.cli.run` calls `keep_step_memory()`).

XLA:CPU allocates each execution's temporary buffer, one block as large as the step's activations (390 MB for the
CPU benchmark's model), with `malloc` and frees it when the step ends. glibc serves a block that large with `mmap`
and returns it with `munmap`, so every step page-faults its whole working memory in again: 100k page faults and
20% of a training step on the benchmark's 2-core machine. `keep_step_memory` makes glibc keep it instead:

- XLA:CPU executes on the thread that calls it (`jax_cpu_enable_async_dispatch=False`) rather than on its own
  dispatch thread. That thread, Python's main thread, allocates from glibc's main heap; the dispatch thread has an
  arena of its own, which cannot grow past 64 MB and so maps every large block whatever the settings.
- The main heap never maps (`M_MMAP_MAX=0`; glibc still maps if the heap cannot grow) and never trims
  (`M_TRIM_THRESHOLD`): a freed step buffer stays in the heap and the next step reuses its pages.

Synchronous dispatch costs the CPU backend little: its compute already uses every core, so there is nothing for the
Python thread to overlap with. Accelerator backends are untouched (the setting is the CPU client's, and their
device memory has its own allocator). The only cost is that the process keeps its peak host memory until it exits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import jax

# glibc's mallopt(3) parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_step_memory() -> bool:
    """Applies the settings above before the CPU backend starts; returns whether glibc took them (False on other
    C libraries and operating systems, where nothing is changed)."""
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries without mallopt.
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # -1 is SIZE_MAX to glibc (the parameter is a size_t): never trim.
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))
