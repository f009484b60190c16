"""Timing for the benchmarks: the median wall time of a call that waits for its own result."""

import statistics
import time
from typing import Callable


def median_seconds(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median wall time of `fn()` over `repeats` calls after `warmup` untimed calls (compilation, allocator, thread
    pools). `fn` must wait for its result (`jax.block_until_ready`), or the time is that of queueing it."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
