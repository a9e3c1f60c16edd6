"""Peak memory of one pass: RSS growth on the host, torch's allocator peak on a GPU.

RSS, not tracemalloc: torch and ONNX Runtime allocate outside Python's allocator.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from ..runtime.base import Run

T = TypeVar("T")


def status_kb(key: str) -> int | None:
    """A /proc/self/status field in kB (VmRSS, VmHWM), or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float:
    kb = status_kb("VmRSS")
    if kb is not None:
        return kb / 1024
    import resource  # not Linux: the lifetime peak is the best there is

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def peak_rss() -> Iterator[list[float]]:
    """Yields a list that receives, after the block, the RSS growth peak (MB) of the block
    over its start, then the block's peak RSS itself (MB, the whole process).

    Linux: VmHWM after resetting it through /proc/self/clear_refs ("5"), so the peak
    is this block's own, not the process's lifetime one.
    """
    out: list[float] = []
    try:
        Path("/proc/self/clear_refs").write_text("5")
        resettable = True
    except OSError:
        resettable = False
    start = rss_mb()
    yield out
    hwm = status_kb("VmHWM") if resettable else None
    peak = hwm / 1024 if hwm is not None else rss_mb()
    out += [max(0.0, peak - start), max(peak, start)]


def malloc_trim() -> None:
    """glibc: return free heap pages to the OS (no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _cuda_peak_mb(run: Run, work: Callable[[], T]) -> tuple[float, T]:
    """torch's allocator peak during `work` over what was allocated before it."""
    import torch

    run.sync()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    out = work()
    run.sync()
    return (torch.cuda.max_memory_allocated() - start) / 2**20, out


def working_memory_mb(run: Run, work: Callable[[], T]) -> tuple[float, float, T]:
    """While `work` runs `run`: the peak memory growth (MB; device memory for a CUDA run),
    the process's peak RSS (MB, host), and what `work` returned."""
    gc.collect()
    malloc_trim()  # hand freed heap back, or an earlier pass's pages hide this one's growth
    out: Any
    with peak_rss() as peak:
        if run.cuda:  # device memory
            growth, out = _cuda_peak_mb(run, work)
        else:
            out = work()
    return (growth if run.cuda else peak[0]), peak[1], out
