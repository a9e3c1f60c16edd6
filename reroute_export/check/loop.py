"""One comparison loop: a reference runtime and a candidate on the same inputs, judged.

    for each input:   observe(reference), observe(candidate)   (runtime.base.Runtime)
                      judge: check/compare.py metrics, tolerances -> failures

Its users: the post-export check (eager vs ONNX Runtime on the export's sample), `parity`
(eager vs an artifact on an input set), `calibrate` (fp32 vs quantized artifact on the
shipped samples) and `bench`, which judges each backend's memory pass against the eager
one's with the same `judge`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .. import contract as C
from ..results import TraceResult
from ..runtime.base import Runtime, first_nonfinite_layer, host
from .compare import compare, failures, vision_metrics


@dataclass
class Observed:
    """What one runtime did with one input: the `trace` contract, and what else was asked."""

    trace: TraceResult
    features: np.ndarray | None = None  # (N, D) image features, when vision was observed
    kv_checked: bool = False
    nonfinite_layer: int | None = None  # first decoder layer whose prefill KV holds NaN/Inf
    margins: list[float] | None = None  # per greedy token: top-1 minus top-2 logit


def observe(runtime: Runtime, inputs: Any, tokens: int, *, vision: bool = False, kv: bool = False) -> Observed:
    """`runtime.trace`, then (if asked) one bound run for the image features and the prefill KV."""
    seen = Observed(runtime.trace(inputs, tokens))
    if not (vision or kv):
        return seen
    run = runtime.bind(inputs)
    try:
        if vision:
            seen.features = host(run.vision())
        if kv:
            seen.kv_checked, seen.nonfinite_layer = True, first_nonfinite_layer(run.prefill().kv)
    finally:
        run.close()
    return seen


def nonfinite_message(layer: int) -> str:
    start = max(0, layer - 1)
    return (f"non-finite values first appear in the prefill KV cache of decoder layer {layer} (from layer "
            f"{start}'s output or layer {layer}'s projections): an fp16 overflow; keep that part in fp32 "
            f"(--fp32-layers {start}-{layer}) or export in fp32 (--precision fp32)")


def judge(ref: Observed, got: Observed, tol: dict[str, float]) -> tuple[dict[str, Any], list[str]]:
    """The candidate against the reference: metrics, and one message per failed check."""
    metrics = compare(ref.trace, got.trace)
    if ref.features is not None and got.features is not None:
        metrics.update(vision_metrics(ref.features, got.features))
    if got.kv_checked:
        metrics["nonfinite_layer"] = got.nonfinite_layer
    bad = failures(metrics, tol)
    if not metrics.get("vision_finite", True):
        bad.insert(0, f"non-finite values in the vision graph's output ({C.IMAGE_FEATURES})")
    if got.nonfinite_layer is not None:
        bad.insert(0, nonfinite_message(got.nonfinite_layer))
    return metrics, bad


@dataclass
class Judged:
    """One input's verdict; `error` when the candidate could not run it (metrics then None)."""

    name: str
    inputs: Any
    metrics: dict[str, Any] | None
    failures: list[str]
    reference: Observed | None = None
    candidate: Observed | None = None
    error: BaseException | None = None


def _no_step(name: str) -> AbstractContextManager[Any]:
    return nullcontext()


def compare_runtimes(reference: Runtime, candidate: Runtime, cases: Iterable[tuple[str, Any]], tokens: int,
                     tol: dict[str, float], *, vision: bool = True, kv: bool = True,
                     errors: tuple[type[BaseException], ...] = (),
                     step: Callable[[str], AbstractContextManager[Any]] = _no_step) -> Iterator[Judged]:
    """Per (name, inputs): both runtimes on the same inputs, `tokens` greedy tokens, judged with
    `tol`. `vision` compares the image features, `kv` names the candidate's first non-finite
    prefill KV layer; a candidate raising one of `errors` gives a verdict with `error` set.
    `step(name)` wraps each input's work (progress)."""
    for name, inputs in cases:
        with step(name):
            ref = observe(reference, inputs, tokens, vision=vision)
            try:
                got = observe(candidate, inputs, tokens, vision=vision, kv=kv)
            except errors as e:
                judged = Judged(name, inputs, None, [], ref, error=e)
            else:
                judged = Judged(name, inputs, *judge(ref, got, tol), ref, got)
        yield judged
