"""PyTorch's CPU threads. On Linux its operators run on GNU OpenMP (libgomp), where each thread that runs a parallel
operator keeps a pool of worker threads for as long as it lives. Once the pools hold more threads than there are
CPUs, libgomp's idle workers stop spinning almost at once (its "throttled" spin count) and each operator waits for
them to wake: after a model loaded on one thread, another thread's decode ran at ~0.6x (a 1536x576 GEMV 63 us on
the loading thread, 120-160 us on another). `release_threads` hands the calling thread's pool back (OpenMP 5's
omp_pause_resource_all, which libgomp implements for the calling thread alone), so that after a load or an answer no
idle pool is left for the next thread to compete with."""
from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from pathlib import Path

OMP_PAUSE_SOFT = 1


@functools.cache
def _pauses() -> tuple[Callable[[int], int], ...]:
    """omp_pause_resource_all of each libgomp this process has loaded (PyTorch's own; packages such as sentencepiece
    bring copies of their own)."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return ()
    paths = sorted({line.split(maxsplit=5)[5] for line in maps if len(line.split(maxsplit=5)) == 6})
    pauses = []
    for path in paths:
        if Path(path).name.startswith("libgomp"):
            try:
                pauses.append(ctypes.CDLL(path).omp_pause_resource_all)
            except (OSError, AttributeError):
                pass  # a libgomp before OpenMP 5 (GCC 9) keeps its pools
    return tuple(pauses)


def release_threads() -> None:
    """Let the calling thread's OpenMP workers go (the next parallel operator starts new ones)."""
    for pause in _pauses():
        pause(OMP_PAUSE_SOFT)
