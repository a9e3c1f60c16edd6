"""Timed passes over a runtime.base.Run and the statistics of their samples."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..runtime.base import Run


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) without numpy."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class Samples:
    """What one (method, backend) collected: timed rounds, and its memory pass."""

    vision_ms: list[float] = field(default_factory=list)
    prefill_ms: list[float] = field(default_factory=list)
    prefill_cpu_ms: list[float] = field(default_factory=list)  # process CPU time, all threads
    decode_ms: list[float] = field(default_factory=list)  # one entry per generated token
    peak_mb: list[float] = field(default_factory=list)
    peak_rss_mb: list[float] = field(default_factory=list)  # the process's peak RSS in the memory pass

    def figures(self) -> dict[str, float]:
        return {
            "vision_ms": percentile(self.vision_ms, 50),
            "prefill_ms_p50": percentile(self.prefill_ms, 50),
            "prefill_ms_p90": percentile(self.prefill_ms, 90),
            "prefill_ms_min": min(self.prefill_ms),
            "prefill_cpu_ms_p50": percentile(self.prefill_cpu_ms, 50),
            "decode_ms_per_token": percentile(self.decode_ms, 50),
            "peak_mem_mb": max(self.peak_mb),
            "peak_rss_mb": max(self.peak_rss_mb) if self.peak_rss_mb else float("nan"),
        }


def ms(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) * 1e3, out


def ms_cpu(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """Wall and process-CPU milliseconds. With one thread the CPU figure barely moves when
    other processes share the cores; with more it also counts worker threads' spin-waits."""
    c0 = time.process_time()
    wall, out = ms(fn)
    return wall, (time.process_time() - c0) * 1e3, out


def timed_pass(run: Run, samples: Samples, decode_tokens: int, keep: bool = True) -> None:
    """Vision, prefill and `decode_tokens` greedy decode steps, each timed on its own
    (synchronised on a GPU); the times go into `samples` if `keep` (not a warm-up)."""
    run.sync()
    v_ms, _ = ms(lambda: (run.vision(), run.sync()))
    p_ms, p_cpu, (state, _) = ms_cpu(lambda: (run.prefill(), run.sync()))
    d_ms = []
    for step in range(decode_tokens):
        step_ms, (state, _) = ms(lambda: (run.decode(state, step), run.sync()))
        d_ms.append(step_ms)
    if keep:
        samples.vision_ms.append(v_ms)
        samples.prefill_ms.append(p_ms)
        samples.prefill_cpu_ms.append(p_cpu)
        samples.decode_ms.extend(d_ms)
