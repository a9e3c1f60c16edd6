"""Prefill and decode over the deployable decoder's graphs, for any backend (DESIGN.md 1).

The graphs (rewrite/segments.py) are called by role through `call(role, feeds) -> outputs`,
so one flow serves ONNX Runtime sessions (numpy), the torch modules (torch-static) and
TensorRT engines. The host keeps, per layer, one fixed KV buffer of its stage's maximum
length, allocated once per run (`Cache`), and writes each segment's new rows at the
stage's current length: a copy of the new rows only, never of the cache.

    prefill:  segment.0(embeds) -> for each decision j:
                  reroute: H[idx] = h (write-back), x = H        delete: x = h
                  head.j(x) -> route.j(x, q, k, v, ...) -> kept rows -> segment.j+1
    decode:   segment.0(token) -> head.j -> segment.j+1 -> ... -> logits   (T = 1, P = M_s)

Nothing here imports torch: `Arrays` says how to allocate (numpy here, torch in
runtime/torch_static.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .. import contract as C
from ..plan import RoutingPlan

Call = Callable[[str, dict[str, Any]], dict[str, Any]]


class Arrays:
    """Allocation and index arrays in numpy (the torch-static runtime substitutes torch's)."""

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> Any:
        return np.zeros(shape, dtype=dtype)

    def index(self, values: Any) -> Any:
        return np.asarray(values, dtype=np.int64)

    def copy(self, x: Any) -> Any:
        return np.array(x, copy=True)

    def to_index(self, x: Any) -> Any:
        return np.asarray(x).reshape(-1).astype(np.int64)


@dataclass
class Layout:
    """What the host needs to drive the graphs: shapes of the buffers and positions."""

    plan: RoutingPlan
    cache_tokens: list[int]  # M_s per stage
    num_kv_heads: int
    head_dim: int
    kv_dtypes: list[Any]  # per layer: the dtype its buffers hold (what the segment declares)
    position_dims: int  # 1, or 3 for mRoPE
    attention: str = C.PORTABLE  # the segments' attention form (export/attention.py)

    @property
    def in_graph_kv(self) -> bool:
        """The segments write their rows into the buffers themselves (fused forms): prefill
        gets the real buffers too, and the host only takes the present buffers back."""
        return C.kv_in_graph(self.attention)

    @property
    def bounds(self) -> list[range]:
        return self.plan.segments

    def rows_for(self, prompt_tokens: int, new_tokens: int) -> list[int]:
        """Per stage, the buffer rows a run of this prompt length and `new_tokens` generated
        tokens can use (its prefill rows plus one per token), at most the artifact's M_s."""
        need = self.plan.cache_tokens(prompt_tokens, new_tokens)
        return [min(n, m) for n, m in zip(need, self.cache_tokens)]


class Cache:
    """Fixed per-layer KV buffers (1, nkv, M_s, hd) and each stage's valid length. `rows`:
    a run's own buffer lengths, where the backend takes any past length (default M_s)."""

    def __init__(self, layout: Layout, xp: Arrays, rows: list[int] | None = None) -> None:
        self.layout = layout
        self.rows = list(layout.cache_tokens if rows is None else rows)
        self.keys, self.values = [], []
        for s, layers in enumerate(layout.bounds):
            for i in layers:
                shape = (1, layout.num_kv_heads, self.rows[s], layout.head_dim)
                self.keys.append(xp.zeros(shape, layout.kv_dtypes[i]))
                self.values.append(xp.zeros(shape, layout.kv_dtypes[i]))
        self.lengths = [0] * len(layout.bounds)

    def room(self, s: int, t: int) -> None:
        """Refuse t more rows than stage s's buffers hold (before a graph would write them)."""
        if self.lengths[s] + t > self.rows[s]:
            raise RuntimeError(f"stage {s}'s KV buffer holds {self.rows[s]} rows; "
                               f"{self.lengths[s] + t} asked (the run's prompt + new tokens)")

    def write(self, s: int, out: dict[str, Any], t: int) -> None:
        """Stage s's segment returned t new rows per layer: put them at its current length.
        In-graph forms wrote them already: keep the present buffers (the same memory when the
        runtime bound them in place; otherwise the runtime's updated copy replaces ours)."""
        p = self.lengths[s]
        for i in self.layout.bounds[s]:
            if self.layout.in_graph_kv:
                self.keys[i], self.values[i] = out[C.present(i, "key")], out[C.present(i, "value")]
            else:
                self.keys[i][:, :, p:p + t] = out[C.new(i, "key")]
                self.values[i][:, :, p:p + t] = out[C.new(i, "value")]
        self.lengths[s] = p + t

    def pairs(self) -> list[tuple[Any, Any]]:
        """Per layer (key, value): views of the valid rows (what the eager cache holds)."""
        out = []
        for s, layers in enumerate(self.layout.bounds):
            n = self.lengths[s]
            out += [(self.keys[i][:, :, :n], self.values[i][:, :, :n]) for i in layers]
        return out


class Decoder:
    """The flow over a backend's graphs; `call(role, feeds)` runs one graph by role."""

    def __init__(self, layout: Layout, call: Call, xp: Arrays | None = None,
                 route_role: Callable[[int], str] = C.route) -> None:
        self.layout, self.call, self.xp = layout, call, xp or Arrays()
        self.plan = layout.plan
        self.route_role = route_role  # decision j -> the routing graph for this input's bucket
        self._dummy: dict[int, tuple[Any, Any]] = {}

    def new_cache(self, rows: list[int] | None = None) -> Cache:
        return Cache(self.layout, self.xp, rows)

    def _past(self, s: int, cache: Cache | None) -> dict[str, Any]:
        """Stage s's buffers (decode), or a one-row dummy with past_length 0 (prefill)."""
        feeds = {C.PAST_LENGTH: self.xp.index([0 if cache is None else cache.lengths[s]])}
        for i in self.layout.bounds[s]:
            if cache is None:
                if i not in self._dummy:
                    shape = (1, self.layout.num_kv_heads, 1, self.layout.head_dim)
                    self._dummy[i] = (self.xp.zeros(shape, self.layout.kv_dtypes[i]),
                                      self.xp.zeros(shape, self.layout.kv_dtypes[i]))
                k, v = self._dummy[i]
            else:
                k, v = cache.keys[i], cache.values[i]
            feeds[C.past(i, "key")], feeds[C.past(i, "value")] = k, v
        return feeds

    def _segment(self, s: int, feeds: dict[str, Any], cache: Cache, prefill: bool) -> dict[str, Any]:
        t = int(feeds[C.HIDDEN].shape[1])
        cache.room(s, t)
        dummy = prefill and not self.layout.in_graph_kv  # portable prefill: nothing to read yet
        out = self.call(C.segment(s), {**feeds, **self._past(s, None if dummy else cache)})
        cache.write(s, out, t)
        return out

    def prefill(self, embeds: Any, positions: Any, visual_start: int,
                rows: list[int] | None = None) -> tuple[Any, Cache, list[Any]]:
        """Routed prefill: (last logits (1, V), the filled cache, decisions per stage (1, K_j)).
        `rows`: the cache's buffer lengths (Layout.rows_for), else the artifact's M_s."""
        plan, xp = self.plan, self.xp
        cache = self.new_cache(rows)
        vs = xp.index([visual_start])
        out = self._segment(0, {C.HIDDEN: embeds, C.POSITION_IDS: positions}, cache, True)
        full = xp.copy(embeds) if plan.recoverable else None  # H: the write-back buffer
        idx = xp.index(np.arange(embeds.shape[1]))  # original positions of the compact rows
        h, pos, decisions, cand = out.get(C.HIDDEN_OUT), positions, [], None
        for j in range(len(plan.stages)):
            if plan.recoverable:
                full[:, idx] = h  # deferred rows keep their state
                x, x_pos, x_idx = full, positions, xp.index(np.arange(embeds.shape[1]))
            else:
                x, x_pos, x_idx = h, pos, idx
            q = self.call(C.head(j), {C.HIDDEN: x})
            feeds = {C.HIDDEN: x, C.QUERY: q[C.QUERY], C.KEY: q[C.KEY], C.VALUE: q[C.VALUE],
                     C.POSITION_IDS: x_pos, C.VISUAL_START: vs}
            if cand is not None and not plan.recoverable:
                feeds[C.CANDIDATES] = cand
            r = self.call(self.route_role(j), feeds)
            cand = r[C.selected(j)]
            decisions.append(cand)
            idx = x_idx[xp.to_index(r[C.KEPT])]
            pos = r[C.kept(C.POSITION_IDS)]
            out = self._segment(j + 1, {C.HIDDEN: r[C.kept(C.HIDDEN)], C.QUERY: r[C.kept(C.QUERY)],
                                        C.KEY: r[C.kept(C.KEY)], C.VALUE: r[C.kept(C.VALUE)],
                                        C.POSITION_IDS: pos}, cache, True)
            h = out.get(C.HIDDEN_OUT)
        return out[C.LOGITS], cache, decisions

    def decode(self, embed: Any, position: int, cache: Cache) -> Any:
        """One token (1, 1, D) at `position` through every segment: logits (1, V)."""
        dims = (1, 1) if self.layout.position_dims == 1 else (self.layout.position_dims, 1, 1)
        pos = self.xp.index(np.full(dims, position))
        out = self._segment(0, {C.HIDDEN: embed, C.POSITION_IDS: pos}, cache, False)
        for j in range(len(self.plan.stages)):
            h = out[C.HIDDEN_OUT]
            q = self.call(C.head(j), {C.HIDDEN: h})
            out = self._segment(j + 1, {C.HIDDEN: h, **q, C.POSITION_IDS: pos}, cache, False)
        return out[C.LOGITS]
