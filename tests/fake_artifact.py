"""A small but real artifact: ONNX graphs built with onnx.helper, run by real ONNX Runtime.

The graphs follow the artifact contract (contract.py) exactly: vision, then the deployable
decoder's segment.s / head.j / route.j graphs with contract.segment_io / HEAD_IO / route_io
names and shapes (fixed past buffers read below `past_length`, only the T new rows
returned, the routing graph's selected/kept outputs), but compute simple closed-form
functions so that a numpy simulation (`Simulation`) predicts every output:

    vision     image_features = mean(pixel_values) * A + B                           (N, D)
    head.j     query = tanh(x) * (j + 1);  key = sin(2x + j);  value = x / 2 + (j + 1) / 10
    route.j    scores = <key[v], query[-1]> over the m candidate visual rows v in
               [visual_start, visual_start + m); local = the K_j best, ascending;
               selected.j = local (or candidates[local] for a chained delete route);
               kept = the rows before the block, visual_start + local, the rows after;
               kept.* = those rows of hidden, query, key, value, position_ids
    segment.s  per layer i (the first layer of s >= 1 takes q/k/v from the inputs, the
               others use the running h for all three):
                 p         = sin(pos_0 + pos_1 / 2 + pos_2 / 4)   per row (mRoPE: three rows)
                 new.i.key   = heads(k) + p;   new.i.value = heads(v) + (i + 1) / 10
                 past      = weighted mean over buffer rows r < past_length, weight r + 1,
                             of past.i.value + past.i.key / 2  (0 with nothing valid)
                 causal    = running mean over the new rows of new.i.value
                 h         = tanh(h + tanh(q) / 2 + past / 2 + causal / 2 + 0.3 p)
               hidden_out = h; the last segment gives logits = h[-1] @ W instead

So a wrong valid length, a new row written at the wrong place, a position off by one, a
swapped q/k/v, a routing graph fed the wrong rows or a write-back that misses change the
numbers; the host-side runtime (embedding lookup, image-slot writes, positions, routing
flow, the KV loop over fixed buffers) is tested for real without the decoder exporter.
Lives in tests/, not in the package.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from reroute_export import contract as C
from reroute_export.export.artifact import ArtifactWriter
from reroute_export.families.qwen2_5_vl import Qwen25VL
from reroute_export.plan import RoutingPlan, Stage
from reroute_export.preprocess import Preprocessor

NKV, HD = 2, 4
D = NKV * HD  # as many query heads as KV heads: query, key and value rows are all (D,)
LAYERS = 4  # segments [0, 1), [1, 3), [3, 4): one segment of two layers, the first headed
ELEM = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16}
NP = {"fp32": np.float32, "fp16": np.float16}
QWEN2_5_VL = Qwen25VL.name
POS_WEIGHTS = np.array([1.0, 0.5, 0.25], dtype=np.float32)


def fake_plan(n: int, method: str = "reroute") -> RoutingPlan:
    return RoutingPlan(method, LAYERS, n, (Stage(1, n // 4, 0.25), Stage(3, n // 8, 0.125)))


class Weights:
    def __init__(self, vocab: int, n: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.table = rng.standard_normal((vocab, D)).astype(np.float32)  # (V, D)
        self.A = rng.standard_normal((n, D)).astype(np.float32)  # (N, D)
        self.B = rng.standard_normal((n, D)).astype(np.float32)
        self.W = (2 * rng.standard_normal((D, vocab))).astype(np.float32)  # (D, V)


def candidates(plan: RoutingPlan, j: int) -> int:
    """m: the visual rows route.j scores (reroute: all N; delete: the previous survivors)."""
    return plan.visual_tokens if plan.recoverable or j == 0 else plan.stages[j - 1].keep


def chained(plan: RoutingPlan, j: int) -> bool:
    return not plan.recoverable and j > 0


# ---------------------------------------------------------------- graph building


class _G:
    """Tiny node-list builder with unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def const(self, value) -> str:
        name = f"c{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def f(self, value: float) -> str:
        return self.const(np.float32(value))

    def op(self, op_type: str, *inputs: str, out: str | None = None, n_out: int = 1, **attrs):
        self.count += 1
        outs = [out] if out else [f"t{self.count}_{k}" for k in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=f"n{self.count}", **attrs))
        return outs[0] if n_out == 1 else outs

    def model(self, inputs, outputs) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "fake", inputs, outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", C.OPSET)])
        model.ir_version = C.IR_VERSION
        onnx.checker.check_model(model, full_check=True)
        return model


def _pos_rows(family: str) -> int:
    return 3 if family == QWEN2_5_VL else 1


def _pos_shape(family: str, length: str | int) -> list:
    return [3, 1, length] if family == QWEN2_5_VL else [1, length]


def _io(name: str, elem: int, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def vision_graph(w: Weights, rank: int, precision: str) -> onnx.ModelProto:
    g, el = _G(), ELEM[precision]
    x = g.op("Cast", C.PIXEL_VALUES, to=TensorProto.FLOAT)
    m = g.op("ReduceMean", x, keepdims=0)  # scalar
    f = g.op("Add", g.op("Mul", m, g.const(w.A)), g.const(w.B))  # (N, D)
    g.op("Cast", f, out=C.IMAGE_FEATURES, to=el)
    inputs = [_io(C.PIXEL_VALUES, el, [f"p{i}" for i in range(rank)])]
    return g.model(inputs, [_io(C.IMAGE_FEATURES, el, list(w.A.shape))])


def _heads(g: _G, x: str) -> str:
    """(1, T, D) -> (1, nkv, T, hd)."""
    return g.op("Transpose", g.op("Reshape", x, g.const(np.array([1, -1, NKV, HD]))), perm=[0, 2, 1, 3])


def _flat(g: _G, x: str) -> str:
    """(1, nkv, T, hd) -> (1, T, D)."""
    return g.op("Reshape", g.op("Transpose", x, perm=[0, 2, 1, 3]), g.const(np.array([1, -1, D])))


def head_graph(j: int, precision: str) -> onnx.ModelProto:
    g, el = _G(), ELEM[precision]
    x = g.op("Cast", C.HIDDEN, to=TensorProto.FLOAT)
    q = g.op("Mul", g.op("Tanh", x), g.f(j + 1))
    k = g.op("Sin", g.op("Add", g.op("Mul", x, g.f(2)), g.f(j)))
    v = g.op("Add", g.op("Mul", x, g.f(0.5)), g.f((j + 1) / 10))
    for name, t in zip(C.HEAD_IO[1], (q, k, v)):
        g.op("Cast", t, out=name, to=el)
    return g.model([_io(C.HIDDEN, el, [1, "T", D])], [_io(n, el, [1, "T", D]) for n in C.HEAD_IO[1]])


def route_graph(j: int, plan: RoutingPlan, family: str, precision: str) -> onnx.ModelProto:
    g, el = _G(), ELEM[precision]
    m, keep, chain = candidates(plan, j), plan.stages[j].keep, chained(plan, j)
    names, outs = C.route_io(j, chain)
    scalar = g.const(np.array([], dtype=np.int64))  # shape [] for Reshape
    vs = g.op("Reshape", C.VISUAL_START, scalar)  # ()
    end = g.op("Add", vs, g.const(np.array(m)))
    key = g.op("Cast", C.KEY, to=TensorProto.FLOAT)
    query = g.op("Cast", C.QUERY, to=TensorProto.FLOAT)
    block = g.op("Slice", key, C.VISUAL_START, g.op("Add", C.VISUAL_START, g.const(np.array([m]))),
                 g.const(np.array([1])))  # (1, m, D)
    last = g.op("Gather", query, g.const(np.array([-1])), axis=1)  # (1, 1, D)
    scores = g.op("ReduceSum", g.op("Mul", block, last), g.const(np.array([2])), keepdims=0)  # (1, m)
    _, best = g.op("TopK", scores, g.const(np.array([keep])), n_out=2, axis=-1, largest=1, sorted=1)
    asc, _ = g.op("TopK", g.op("Cast", best, to=TensorProto.FLOAT), g.const(np.array([keep])), n_out=2,
                  axis=-1, largest=0, sorted=1)
    local = g.op("Cast", asc, to=TensorProto.INT64)  # (1, K) ascending
    if chain:
        g.op("GatherElements", C.CANDIDATES, local, out=C.selected(j), axis=1)
    else:
        g.op("Identity", local, out=C.selected(j))
    t = g.op("Gather", g.op("Shape", C.HIDDEN), g.const(np.array(1)))  # ()
    one = g.const(np.array(1))
    rows = g.op("Concat", g.op("Range", g.const(np.array(0)), vs, one),
                g.op("Add", g.op("Reshape", local, g.const(np.array([-1]))), vs),
                g.op("Range", end, t, one), axis=0)  # (T',)
    g.op("Unsqueeze", rows, g.const(np.array([0])), out=C.KEPT)
    for src in (C.HIDDEN, C.QUERY, C.KEY, C.VALUE):
        g.op("Gather", src, rows, out=C.kept(src), axis=1)
    g.op("Gather", C.POSITION_IDS, rows, out=C.kept(C.POSITION_IDS), axis=-1)
    inputs = [_io(n, el, [1, "T", D]) for n in (C.HIDDEN, C.QUERY, C.KEY, C.VALUE)]
    inputs += [_io(C.POSITION_IDS, TensorProto.INT64, _pos_shape(family, "T")),
               _io(C.VISUAL_START, TensorProto.INT64, [1])]
    if chain:
        inputs.append(_io(C.CANDIDATES, TensorProto.INT64, [1, m]))
    assert [i.name for i in inputs] == names
    outputs = [_io(C.selected(j), TensorProto.INT64, [1, keep]), _io(C.KEPT, TensorProto.INT64, [1, "K"])]
    outputs += [_io(C.kept(n), el, [1, "K", D]) for n in (C.HIDDEN, C.QUERY, C.KEY, C.VALUE)]
    outputs.append(_io(C.kept(C.POSITION_IDS), TensorProto.INT64, _pos_shape(family, "K")))
    assert [o.name for o in outputs] == outs
    return g.model(inputs, outputs)


def _past_mean(g: _G, name: str) -> str:
    """Weighted mean (weight r + 1) of the buffer's rows r < past_length: (1, nkv, hd)."""
    buf = g.op("Cast", name, to=TensorProto.FLOAT)  # (1, nkv, P, hd)
    p = g.op("Gather", g.op("Shape", buf), g.const(np.array(2)))  # ()
    idx = g.op("Range", g.const(np.array(0)), p, g.const(np.array(1)))  # (P,)
    valid = g.op("Cast", g.op("Less", idx, C.PAST_LENGTH), to=TensorProto.FLOAT)
    wts = g.op("Mul", valid, g.op("Add", g.op("Cast", idx, to=TensorProto.FLOAT), g.f(1)))  # (P,)
    total = g.op("ReduceSum", g.op("Mul", buf, g.op("Reshape", wts, g.const(np.array([1, 1, -1, 1])))),
                 g.const(np.array([2])), keepdims=0)  # (1, nkv, hd)
    return g.op("Div", total, g.op("Max", g.op("ReduceSum", wts, keepdims=0), g.f(1)))


def segment_graph(s: int, w: Weights, plan: RoutingPlan, family: str, precision: str) -> onnx.ModelProto:
    g, el = _G(), ELEM[precision]
    layers = plan.segments[s]
    headed, last = s > 0, s == len(plan.segments) - 1
    names, outs = C.segment_io(layers, headed, last)
    rows = _pos_rows(family)
    h = g.op("Cast", C.HIDDEN, to=TensorProto.FLOAT)  # (1, T, D)
    pos = g.op("Cast", g.op("Reshape", C.POSITION_IDS, g.const(np.array([rows, -1]))), to=TensorProto.FLOAT)
    posf = g.op("ReduceSum", g.op("Mul", pos, g.const(POS_WEIGHTS[:rows].reshape(rows, 1))),
                g.const(np.array([0])), keepdims=0)  # (T,)
    sinp = g.op("Sin", posf)
    p_heads = g.op("Reshape", sinp, g.const(np.array([1, 1, -1, 1])))  # (1, 1, T, 1)
    p_rows = g.op("Reshape", sinp, g.const(np.array([1, -1, 1])))  # (1, T, 1)
    t = g.op("Gather", g.op("Shape", h), g.const(np.array(1)))
    counts = g.op("Reshape", g.op("Cast", g.op("Range", g.const(np.array(1)), g.op("Add", t, g.const(np.array(1))),
                                               g.const(np.array(1))), to=TensorProto.FLOAT),
                  g.const(np.array([1, -1, 1])))  # (1, T, 1): 1..T
    for n, i in enumerate(layers):
        if n == 0 and headed:
            q, k, v = (g.op("Cast", x, to=TensorProto.FLOAT) for x in (C.QUERY, C.KEY, C.VALUE))
        else:
            q = k = v = h
        key = g.op("Add", _heads(g, k), p_heads)
        value = g.op("Add", _heads(g, v), g.f((i + 1) / 10))
        g.op("Cast", key, out=C.new(i, "key"), to=el)
        g.op("Cast", value, out=C.new(i, "value"), to=el)
        past = g.op("Add", _past_mean(g, C.past(i, "value")), g.op("Mul", _past_mean(g, C.past(i, "key")), g.f(0.5)))
        past = g.op("Reshape", past, g.const(np.array([1, 1, D])))
        causal = g.op("Div", g.op("CumSum", _flat(g, value), g.const(np.array(1))), counts)
        terms = [g.op("Mul", g.op("Tanh", q), g.f(0.5)), g.op("Mul", past, g.f(0.5)),
                 g.op("Mul", causal, g.f(0.5)), g.op("Mul", p_rows, g.f(0.3))]
        h = g.op("Tanh", g.op("Sum", h, *terms))
    if last:
        g.op("MatMul", g.op("Gather", h, g.const(np.array(-1)), axis=1), g.const(w.W), out=C.LOGITS)  # (1, V)
        outputs = [_io(C.LOGITS, TensorProto.FLOAT, [1, w.W.shape[1]])]
    else:
        g.op("Cast", h, out=C.HIDDEN_OUT, to=el)
        outputs = [_io(C.HIDDEN_OUT, el, [1, "T", D])]
    outputs += [_io(C.new(i, kind), el, [1, NKV, "T", HD]) for i in layers for kind in ("key", "value")]
    inputs = [_io(C.HIDDEN, el, [1, "T", D])]
    if headed:
        inputs += [_io(x, el, [1, "T", D]) for x in (C.QUERY, C.KEY, C.VALUE)]
    inputs += [_io(C.POSITION_IDS, TensorProto.INT64, _pos_shape(family, "T")),
               _io(C.PAST_LENGTH, TensorProto.INT64, [1])]
    inputs += [_io(C.past(i, kind), el, [1, NKV, f"P{s}", HD]) for i in layers for kind in ("key", "value")]
    assert [x.name for x in inputs] == names and [o.name for o in outputs] == outs
    return g.model(inputs, outputs)


def decoder_graphs(w: Weights, plan: RoutingPlan, family: str, precision: str) -> dict[str, onnx.ModelProto]:
    """Role -> graph, in the order prefill runs them."""
    out = {C.segment(0): segment_graph(0, w, plan, family, precision)}
    for j in range(len(plan.stages)):
        out[C.head(j)] = head_graph(j, precision)
        out[C.route(j)] = route_graph(j, plan, family, precision)
        out[C.segment(j + 1)] = segment_graph(j + 1, w, plan, family, precision)
    return out


# ---------------------------------------------------------------- the artifact


def build_fake_artifact(
    folder: Path, pre: Preprocessor, *, precision: str = "fp32", max_prompt_tokens: int = 512,
    max_new_tokens: int = 32, eos_token_id: int | None = None, pixel_rank: int | None = None,
    method: str = "reroute",
) -> tuple[Weights, RoutingPlan]:
    n = pre.visual_tokens
    plan = fake_plan(n, method)
    vocab = len(pre.tokenizer)
    w = Weights(vocab, n)
    family = pre.family.name
    rank = pixel_rank or (2 if family == QWEN2_5_VL else 4)
    grid = [1, *(s // pre.image_processor.patch_size for s in pre.image_size)] if family == QWEN2_5_VL else None
    cache = plan.cache_tokens(max_prompt_tokens, max_new_tokens)
    with ArtifactWriter(folder, force=True) as writer:
        onnx.save(vision_graph(w, rank, precision), writer.path / C.VISION)
        graphs = {"vision": C.VISION}
        for role, model in decoder_graphs(w, plan, family, precision).items():
            graphs[role] = C.file_of(role)
            onnx.save(model, writer.path / graphs[role])
        np.save(writer.path / C.EMBEDDINGS, w.table.astype(NP[precision]))
        pre.save_pretrained(writer.path / C.PREPROCESSOR)
        writer.write_manifest({
            "model": f"fake-{family}", "family": family, "plan": plan.to_dict(), "precision": precision,
            "opset": C.OPSET,
            "shapes": {"max_prompt_tokens": max_prompt_tokens, "max_new_tokens": max_new_tokens,
                       "visual_tokens": n, "hidden_size": D, "num_layers": plan.num_layers,
                       "num_kv_heads": NKV, "head_dim": HD, "vocab_size": vocab, "cache_tokens": cache},
            "graphs": graphs,
            "decoder": {"segments": [[r.start, r.stop] for r in plan.segments], "cache_tokens": cache},
            "image_grid_thw": grid, "spatial_merge_size": 2 if family == QWEN2_5_VL else None,
            "image_token_id": pre.image_token_id, "eos_token_id": eos_token_id,
        })
    return w, plan


# ---------------------------------------------------------------- numpy simulation


def _tanh(x):
    return np.tanh(x).astype(np.float32)


class Simulation:
    """What the fake graphs compute on the host's flow (runtime/segmented.py), given the
    reference (HF) position ids: float32 math, rounded to the artifact's precision wherever
    a graph hands a tensor over (outputs, the embedding table, the KV buffers)."""

    def __init__(self, w: Weights, plan: RoutingPlan, precision: str = "fp32") -> None:
        self.w, self.plan, self.dtype = w, plan, NP[precision]

    def r(self, x: np.ndarray) -> np.ndarray:
        """A tensor as it crosses a graph boundary: stored in the artifact's precision."""
        return np.asarray(x, dtype=np.float32).astype(self.dtype).astype(np.float32)

    # -- the graphs

    def vision(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.r(self.r(pixel_values).mean(dtype=np.float32) * self.w.A + self.w.B)  # (N, D)

    def head(self, j: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (self.r(_tanh(x) * (j + 1)), self.r(np.sin(2 * x + j)),
                self.r(x * np.float32(0.5) + np.float32((j + 1) / 10)))

    def route(self, j: int, x, q, k, pos, vs: int, cand):
        """x, q, k: (T, D); pos: (R, T). -> selected (K,), kept rows (T',)."""
        m, keep = candidates(self.plan, j), self.plan.stages[j].keep
        scores = (k[vs:vs + m] * q[-1]).sum(axis=1)  # (m,)
        local = np.sort(np.argsort(-scores, kind="stable")[:keep])
        selected = cand[local] if chained(self.plan, j) else local
        rows = np.concatenate([np.arange(vs), vs + local, np.arange(vs + m, len(x))])
        return selected, rows

    def segment(self, s: int, x: np.ndarray, qkv, pos: np.ndarray, cache: "SimCache"):
        """x: (T, D), pos: (R, T); appends the new rows to `cache`. -> hidden_out (T, D) or logits (V,)."""
        layers = self.plan.segments[s]
        p = np.sin((pos.astype(np.float32) * POS_WEIGHTS[:len(pos), None]).sum(axis=0)).astype(np.float32)  # (T,)
        h = x
        count = np.arange(1, len(x) + 1, dtype=np.float32)[:, None]
        for n, i in enumerate(layers):
            q, k, v = qkv if n == 0 and qkv is not None else (h, h, h)
            key = k + p[:, None]  # row layout (T, D) = heads flattened
            value = v + np.float32((i + 1) / 10)
            past = cache.mean(i, "value") + 0.5 * cache.mean(i, "key")  # (D,)
            causal = np.cumsum(value, axis=0) / count
            h = _tanh(h + 0.5 * _tanh(q) + 0.5 * past + 0.5 * causal + 0.3 * p[:, None])
            cache.append(i, self.r(key), self.r(value))
        if s == len(self.plan.segments) - 1:
            return (h[-1] @ self.w.W).astype(np.float32)
        return self.r(h)

    # -- the flow

    def embeds(self, ids: np.ndarray, image_token_id: int, pixel_values: np.ndarray) -> tuple[np.ndarray, int]:
        x = self.r(self.w.table[ids])  # (L, D)
        start = int(np.flatnonzero(ids == image_token_id)[0])
        x[start:start + self.plan.visual_tokens] = self.vision(pixel_values)
        return x, start

    def prefill(self, x: np.ndarray, pos: np.ndarray, start: int, cache: "SimCache"):
        """-> (logits (V,), decisions per stage)."""
        plan = self.plan
        h = self.segment(0, x, None, pos, cache)
        full, idx, h_pos, decisions, cand = x.copy(), np.arange(len(x)), pos, [], None
        for j in range(len(plan.stages)):
            if plan.recoverable:
                full[idx] = h  # write-back: deferred rows keep their state
                xs, xs_pos, xs_idx = full, pos, np.arange(len(x))
            else:
                xs, xs_pos, xs_idx = h, h_pos, idx
            q, k, v = self.head(j, xs)
            selected, rows = self.route(j, xs, q, k, xs_pos, start, cand)
            cand = selected
            decisions.append(selected)
            idx, h_pos = xs_idx[rows], xs_pos[:, rows]
            h = self.segment(j + 1, xs[rows], (q[rows], k[rows], v[rows]), h_pos, cache)
        return h, decisions

    def decode(self, token: int, position: int, cache: "SimCache") -> np.ndarray:
        x = self.r(self.w.table[token])[None]  # (1, D)
        pos = np.full((3 if self._mrope else 1, 1), position)
        h = self.segment(0, x, None, pos, cache)
        for j in range(len(self.plan.stages)):
            h = self.segment(j + 1, h, self.head(j, h), pos, cache)
        return h

    def run(self, ids: np.ndarray, image_token_id: int, pixel_values: np.ndarray, positions: np.ndarray,
            steps: int) -> dict:
        """Prefill then greedy decoding, as OrtArtifact.generate: logits, decisions, per-layer KV
        after prefill, every step's logits, the tokens."""
        pos = positions.reshape(-1, len(ids))  # (R, L)
        self._mrope = len(pos) == 3
        x, start = self.embeds(ids, image_token_id, pixel_values)
        cache = SimCache(self.plan.num_layers)
        logits, decisions = self.prefill(x, pos, start, cache)
        out = {"logits": logits, "decisions": decisions, "kv": cache.pairs(), "ids": [], "step_logits": [],
               "start": start, "next_position": int(positions.max()) + 1}
        nxt = out["next_position"]
        for step in range(steps):
            token = int(np.argmax(logits))
            out["ids"].append(token)
            if step + 1 == steps:
                break
            logits = self.decode(token, nxt + step, cache)
            out["step_logits"].append(logits)
        out["kv_final"] = cache.pairs()
        return out


class SimCache:
    """Per layer, the valid KV rows (n, D) in row layout."""

    def __init__(self, layers: int) -> None:
        self.rows = {i: {"key": np.zeros((0, D), np.float32), "value": np.zeros((0, D), np.float32)}
                     for i in range(layers)}

    def append(self, i: int, key: np.ndarray, value: np.ndarray) -> None:
        self.rows[i]["key"] = np.concatenate([self.rows[i]["key"], key])
        self.rows[i]["value"] = np.concatenate([self.rows[i]["value"], value])

    def mean(self, i: int, kind: str) -> np.ndarray:
        x = self.rows[i][kind]
        wts = np.arange(1, len(x) + 1, dtype=np.float32)
        return (x * wts[:, None]).sum(axis=0) / max(wts.sum(), 1)

    def pairs(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per layer (key, value) (1, nkv, n, hd), as runtime/segmented.Cache.pairs gives them."""
        def heads(x):
            return x.reshape(1, -1, NKV, HD).transpose(0, 2, 1, 3).copy()
        return [(heads(r["key"]), heads(r["value"])) for _, r in sorted(self.rows.items())]
