"""One interface for every backend: the eager reference, torch-static, ONNX Runtime, TensorRT.

A `Runtime` is one backend running one routing plan (a loaded model, or an artifact).
`bind(inputs)` does the host side of a run once (input checks, embedding lookup with the
image features written in, position ids) and returns a `Run`, whose `vision()`,
`prefill()` and `decode(state, step)` then run the graphs (or modules) alone: what a
benchmark times, and what a comparison observes. `trace(inputs, max_new_tokens)` is the
`trace` contract (results.TraceResult) every backend answers the same way.

    runtime.bind(inputs) -> run
    run.vision()                -> image features (N, D)
    run.prefill()               -> State(logits, kv, decisions, next_position)
    run.decode(state, step)     -> State, one greedy token later

Nothing here imports torch: states hold the backend's own arrays (numpy or torch tensors),
read on the host through `host()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ..plan import RoutingPlan
from ..results import TraceResult


@dataclass
class State:
    """What a prefill or decode step leaves, in the backend's own arrays."""

    logits: Any  # (V,) or (1, V): the last position's logits
    kv: Any  # the caches the next decode step takes (per layer (key, value), or the engine's RoutedKVCache)
    decisions: list[Any]  # per stage: (K_s,) or (1, K_s) ascending original visual indices
    next_position: Any  # position id of the first generated token (int, or a (1,) tensor)


class Run(Protocol):
    """One input bound to a runtime: the host side done, the graphs (modules) left to run."""

    cuda: bool  # torch on a GPU: synchronise before reading a clock; memory from torch.cuda
    details: dict[str, Any]  # how this run was set up, for a benchmark record (e.g. CUDA graphs captured)

    def sync(self) -> None: ...

    def vision(self) -> Any: ...

    def prefill(self) -> State: ...

    def decode(self, state: State, step: int) -> State: ...

    def close(self) -> None: ...


class Runtime(Protocol):
    """One backend running one routing plan."""

    backend: str  # one of runtime.BACKENDS
    plan: RoutingPlan

    def prepare(self, image: Any, prompt: str) -> Any: ...

    def bind(self, inputs: Any) -> Run: ...

    def trace(self, inputs: Any, max_new_tokens: int = 16) -> TraceResult: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------- reading states on the host


def host(x: Any) -> np.ndarray:
    """A torch tensor (any device, any float dtype) or an array -> a numpy array (float32 for floats)."""
    if hasattr(x, "detach"):
        x = x.detach()
        return (x.float() if x.is_floating_point() else x).cpu().numpy()
    return np.asarray(x)


def greedy_token(state: State) -> int:
    """The greedy token a state holds (the first maximum on ties, as torch.argmax)."""
    return int(np.argmax(host(state.logits).reshape(-1)))


def top2_margin(state: State) -> float:
    """Top-1 minus top-2 logit: a divergence between backends where this is tiny is a near
    tie, not a routing error."""
    top = np.sort(host(state.logits).reshape(-1))[-2:]
    return float(top[1] - top[0])


def decision_lists(state: State) -> list[list[int]]:
    """Per stage, the kept visual indices of a prefill state."""
    return [host(d).reshape(-1).tolist() for d in state.decisions]


def kv_pairs(kv: Any) -> list[tuple[Any, Any]]:
    """Per layer (key, value) of a state's caches: a list of pairs, an artifact's fixed buffers
    (runtime/segmented.Cache: the valid rows) or the engine's RoutedKVCache."""
    if isinstance(kv, (list, tuple)):
        return list(kv)
    if hasattr(kv, "pairs"):
        return kv.pairs()
    return list(zip(kv.keys, kv.values))


def first_nonfinite_layer(kv: Any) -> int | None:
    """The first decoder layer whose prefill K or V holds a NaN/Inf (fp16 overflow shows here)."""
    return next((i for i, (k, v) in enumerate(kv_pairs(kv))
                 if not (np.isfinite(host(k)).all() and np.isfinite(host(v)).all())), None)


# ---------------------------------------------------------------- greedy decoding over a Run


@dataclass
class Greedy:
    """A greedy run: the prefill's logits and decisions, the tokens and each token's top-2
    logit margin (no caches kept: a benchmark's memory pass must not hold them)."""

    last_logits: list[float]  # the prefill state's logits, read before any decode step
    decisions: list[list[int]]
    tokens: list[int] = field(default_factory=list)
    margins: list[float] = field(default_factory=list)


def greedy(run: Run, max_new_tokens: int, eos_token_id: int | None = None) -> Greedy:
    """Greedy decoding over `run`, as `routing.generate`: the EOS token is kept and ends it
    (None: exactly `max_new_tokens` tokens). States are read as they come: a CUDA-graph run
    reuses its output buffers."""
    state = run.prefill()
    out = Greedy(host(state.logits).reshape(-1).tolist(), decision_lists(state))
    for step in range(max_new_tokens):
        token = greedy_token(state)
        out.tokens.append(token)
        out.margins.append(top2_margin(state))
        if token == eos_token_id or step + 1 == max_new_tokens:
            break
        state = run.decode(state, step)
    return out


def trace_of(plan: RoutingPlan, g: Greedy, text: str = "") -> TraceResult:
    """A greedy run in the `trace` contract."""
    decisions = {str(s.layer): d for s, d in zip(plan.stages, g.decisions)}
    return TraceResult(decisions, g.last_logits, list(g.tokens), text, plan)

