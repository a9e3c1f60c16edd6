"""The deployable decoder: every decoder weight in exactly one graph, shared by prefill and decode.

A routing plan with S decisions at layers d_0 < ... < d_{S-1} cuts the decoder into S + 1
*segments* (stage s = layers [b_s, b_{s+1}), b_0 = 0, b_{s+1} = d_s) and, per decision j,
two small graphs:

    head.j     layer d_j's input_layernorm + q/k/v projections on any number of rows
               (the decision layer's weights that scoring needs; pre-rope)
    route.j    no weights: score the last row against every row (fp32, head-averaged),
               select K_j visual tokens (SelectVisual), gather the kept rows of the
               hidden states, q, k, v and position ids (RouteGather)
    segment.s  layers [b_s, b_{s+1}) on T rows (T free: the compact prompt in prefill,
               one token in decode); segment s >= 1 starts from head.(s-1)'s q/k/v for its
               first layer; the last segment ends in the final norm + LM head

Prefill runs  segment.0 -> [head.j -> route.j -> segment.j+1] per decision; decode runs the
same segments and heads on one row (no routing). So the ONNX Runtime sessions and the
TensorRT engines hold each weight once; routing stays the eager engine's algorithm
(tests/test_segments.py runs these modules against routing.RoutedModel).

KV cache: each layer owns a fixed buffer (1, nkv, M_s, hd) of its stage's maximum length,
allocated once per run by the runtime (ONNX Runtime: of the run's own length where the run
says how many tokens it makes; the past axis P is free in the graph). A segment takes its
layers' buffers plus `past_length` (how many rows are valid, the same for every layer of a
stage) and returns only the T new rows (roped K, V); the runtime writes them at
`past_length`. Attention reads the buffer in place:

    scores = [q K_buf^T (masked beyond past_length) | q k_new^T (causal)] -> softmax
    out    = p_past V_buf + p_new v_new

so no step concatenates or copies the cache, and decode has one shape (T = 1, P = M_s) for
every step of a run: one CUDA graph, one TensorRT profile. Prefill passes a one-row dummy buffer
with past_length 0 (its past part is masked out exactly: exp(min - max) = 0).

GQA without copies: q is viewed as (1, nkv, g, T, hd) against the buffer's (1, nkv, 1, P, hd),
a broadcasting MatMul, never `repeat_kv` of the cache.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import contract as C
from ..families.base import Family
from ..plan import RoutingPlan
from ..routing.scoring import apply_rope, scores_from_qk
from ..routing.select import gather_rows
from . import ops
from .attention import cached_attention, cached_attention_rope
from .precision import _cast


# ---------------------------------------------------------------- one layer, in pieces


def _geometry(layer: nn.Module) -> tuple[int, int, int]:
    cfg = layer.self_attn.config
    return cfg.num_attention_heads, cfg.num_key_value_heads, layer.self_attn.head_dim


def _dtype(layer: nn.Module) -> torch.dtype:
    return next(layer.parameters()).dtype


def project(layer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_layernorm + q/k/v projections (pre-rope), in the layer's own dtype."""
    x = layer.input_layernorm(_cast(hidden, _dtype(layer)))
    attn = layer.self_attn
    return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)


def attend(layer: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, past_length: torch.Tensor):
    """Attention of T new rows over the layer's fixed buffer (first past_length rows valid)
    and themselves (causal). Returns (attention output before o_proj (1, T, nh*hd),
    the new rows' roped K and V (1, nkv, T, hd))."""
    nh, nkv, hd = _geometry(layer)
    b, t, _ = q.shape
    g = nh // nkv
    q = apply_rope(q.view(b, t, nh, hd).transpose(1, 2), cos, sin)  # (1, nh, T, hd)
    k = apply_rope(k.view(b, t, nkv, hd).transpose(1, 2), cos, sin)  # (1, nkv, T, hd)
    v = v.view(b, t, nkv, hd).transpose(1, 2)
    qg = q.reshape(b, nkv, g, t, hd)  # heads grouped by the KV head they read
    scale = layer.self_attn.scaling
    s_past = (qg @ past_k.unsqueeze(2).transpose(-1, -2)) * scale  # (1, nkv, g, T, P)
    s_new = (qg @ k.unsqueeze(2).transpose(-1, -2)) * scale  # (1, nkv, g, T, T)
    low = torch.finfo(q.dtype).min
    p_idx = torch.arange(past_k.shape[2], device=q.device)
    past_mask = torch.zeros(p_idx.shape, dtype=q.dtype).masked_fill(p_idx >= past_length.view(()), low)
    i = torch.arange(t, device=q.device)
    new_mask = torch.zeros((t, t), dtype=q.dtype).masked_fill(i.view(1, -1) > i.view(-1, 1), low)
    scores = torch.cat([s_past + past_mask, s_new + new_mask], dim=-1)
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)  # as HF eager attention
    p_past, p_new = probs[..., :past_k.shape[2]], probs[..., past_k.shape[2]:]
    out = p_past @ past_v.unsqueeze(2) + p_new @ v.unsqueeze(2)  # (1, nkv, g, T, hd)
    out = out.reshape(b, nh, t, hd).transpose(1, 2).reshape(b, t, nh * hd)
    return out, k, v


def attend_in_graph(layer: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, past_length: torch.Tensor):
    """The fused forms (rewrite/attention.py): rope here, then one op that writes the T rows into
    the buffer and attends over it. Returns (attention output (1, T, nh*hd), present K, V buffers)."""
    nh, nkv, hd = _geometry(layer)
    b, t, _ = q.shape
    q = apply_rope(q.view(b, t, nh, hd).transpose(1, 2), cos, sin).transpose(1, 2).reshape(b, t, nh * hd)
    k = apply_rope(k.view(b, t, nkv, hd).transpose(1, 2), cos, sin).transpose(1, 2).reshape(b, t, nkv * hd)
    return cached_attention(q, k, v, past_k, past_v, past_length, nh, nkv, float(layer.self_attn.scaling))


def attend_with_rope(layer: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, past_length: torch.Tensor):
    """ort-gqa: as attend_in_graph, with the rotary inside the op (GroupQueryAttention applies it;
    its rotary takes head_dim a multiple of 16, else the rotary stays outside)."""
    nh, nkv, hd = _geometry(layer)
    if hd % 16:
        return attend_in_graph(layer, q, k, v, cos, sin, past_k, past_v, past_length)
    return cached_attention_rope(q, k, v, past_k, past_v, past_length, cos, sin, nh, nkv,
                                 float(layer.self_attn.scaling))


def finish_layer(layer: nn.Module, residual: torch.Tensor, attn_out: torch.Tensor, out_dtype: torch.dtype):
    """o_proj + residual, then the MLP block; the hidden state leaves in `out_dtype`."""
    x = residual + layer.self_attn.o_proj(attn_out)
    x = x + layer.mlp(layer.post_attention_layernorm(x))
    return _cast(x, out_dtype)


# ---------------------------------------------------------------- the three graph kinds


class Head(nn.Module):
    """head.j: hidden (1, T, D) -> query, key, value of decision layer d_j (pre-rope)."""

    def __init__(self, layer: nn.Module, index: int) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({str(index): layer})  # weights named by the model's layer index

    @property
    def layer(self) -> nn.Module:
        return next(iter(self.layers.values()))

    def forward(self, hidden: torch.Tensor):
        return project(self.layer, hidden)


class Route(nn.Module):
    """route.j (weight-free): score, select K_j visual tokens, gather the kept rows.

    Inputs: the rows scored (reroute: the full buffer after write-back, all N visual tokens
    candidates; delete: the survivors, whose visual block is [visual_start, + m)), their
    q/k/v from head.j, position ids, visual_start, and for a delete after the first
    decision the candidates' original visual indices. Outputs: selected.j (1, K) original
    visual indices, kept (1, T') row indices into the scored rows, and those rows' hidden,
    q, k, v and position ids.
    """

    def __init__(self, rotary: nn.Module, layer: nn.Module, m: int, keep: int, chained: bool) -> None:
        super().__init__()
        self.rotary = rotary
        self.nh, self.nkv, self.hd = _geometry(layer)
        self.m, self.keep, self.chained = m, keep, chained

    def forward(self, hidden, query, key, value, position_ids, visual_start):
        return self.route(hidden, query, key, value, position_ids, visual_start, None)

    def route(self, hidden, query, key, value, position_ids, visual_start, candidates):
        b, t, _ = hidden.shape
        cos, sin = self.rotary(hidden, position_ids)  # (1, T, hd)
        ok = torch.ones((b, t), dtype=torch.bool, device=hidden.device)  # batch 1, no padding
        probs = scores_from_qk(query[:, -1:], key, cos, sin, ok, self.nh, self.nkv, self.hd)  # (1, T)
        local = ops.select_visual(probs, visual_start, self.m, self.keep)  # (1, K)
        chosen = local if candidates is None else candidates.gather(1, local)
        rows, kept = ops.route_gather(hidden, local, visual_start, self.m)  # (1, T', D), (1, T')
        pos = position_ids.gather(-1, kept.expand(*position_ids.shape[:-1], -1))
        return chosen, kept, rows, gather_rows(query, kept), gather_rows(key, kept), gather_rows(value, kept), pos


class ChainedRoute(Route):
    """route.j of a delete method after its first decision: the candidates are the survivors."""

    def forward(self, hidden, query, key, value, position_ids, visual_start, candidates):
        return self.route(hidden, query, key, value, position_ids, visual_start, candidates)


class Segment(nn.Module):
    """segment.s: layers [b_s, b_{s+1}) on T rows against fixed per-layer KV buffers.

    Inputs: hidden (1, T, D), for s >= 1 the first layer's query/key/value from head.(s-1),
    position_ids, past_length (1,), then past.{i}.key/value per layer. Outputs: hidden_out
    (1, T, D) (the last segment: logits (1, V) of the last row instead), then new.{i}.key/value
    (1, nkv, T, hd) per layer, for the runtime to write at past_length; with a fused attention
    form (rewrite/attention.py) present.{i}.key/value instead, the buffers with the rows written.
    """

    def __init__(self, decoder: nn.Module, lm_head: nn.Module | None, layers: range, headed: bool,
                 attention: str = C.PORTABLE) -> None:
        super().__init__()
        self.attend = ({"ort-gqa": attend_with_rope}.get(attention, attend_in_graph) if C.kv_in_graph(attention)
                       else attend)
        self.rotary = decoder.rotary_emb
        # keyed by the model's layer index: graph weights are named layers.{i}.* as in the model
        self.layers = nn.ModuleDict({str(i): decoder.layers[i] for i in layers})
        self.norm = decoder.norm if lm_head is not None else None
        self.lm_head = lm_head
        self.headed = headed

    def forward(self, hidden: torch.Tensor, *args: torch.Tensor):
        qkv, args = (args[:3], args[3:]) if self.headed else (None, args)
        position_ids, past_length, past = args[0], args[1], args[2:]
        cos, sin = self.rotary(hidden, position_ids)
        x, out_dtype, new = hidden, hidden.dtype, []
        for n, layer in enumerate(self.layers.values()):
            dt = _dtype(layer)
            residual = _cast(x, dt)
            q, k, v = [_cast(t, dt) for t in qkv] if n == 0 and qkv is not None else project(layer, x)
            a, k_new, v_new = self.attend(layer, q, k, v, cos.to(dt), sin.to(dt), past[2 * n], past[2 * n + 1], past_length)
            x = finish_layer(layer, residual, a, out_dtype)
            new += [k_new, v_new]
        if self.lm_head is None:
            return (x, *new)
        return (self.lm_head(self.norm(x[:, -1])).float(), *new)


# ---------------------------------------------------------------- the program


class Program:
    """The plan's graphs as torch modules: what export traces, and what torch-static runs."""

    def __init__(self, model: nn.Module, family: type[Family], plan: RoutingPlan, attention: str = C.PORTABLE) -> None:
        decoder, lm_head = family.decoder(model), family.lm_head(model)
        self.plan, self.attention = plan, attention
        last = len(plan.segments) - 1
        self.segments = [Segment(decoder, lm_head if s == last else None, layers, headed=s > 0,
                                 attention=attention).eval()
                         for s, layers in enumerate(plan.segments)]
        self.heads = [Head(decoder.layers[st.layer], st.layer).eval() for st in plan.stages]
        self.routes = []
        for j, st in enumerate(plan.stages):
            chained = not plan.recoverable and j > 0
            m = plan.visual_tokens if plan.recoverable or j == 0 else plan.stages[j - 1].keep
            kind = ChainedRoute if chained else Route
            self.routes.append(kind(decoder.rotary_emb, decoder.layers[st.layer], m, st.keep, chained).eval())

    def graphs(self) -> dict[str, nn.Module]:
        """Role name -> module, in the order prefill runs them."""
        out: dict[str, nn.Module] = {"segment.0": self.segments[0]}
        for j in range(len(self.plan.stages)):
            out[f"head.{j}"] = self.heads[j]
            out[f"route.{j}"] = self.routes[j]
            out[f"segment.{j + 1}"] = self.segments[j + 1]
        return out


    def io(self, role: str) -> tuple[list[str], list[str]]:
        """A role's graph input and output names (contract.py), in forward's argument order."""
        kind, index = role.split(".")[0], int(role.split(".")[1])
        if kind == "segment":
            return C.segment_io(self.plan.segments[index], index > 0, index == len(self.plan.segments) - 1,
                                self.attention)
        if kind == "head":
            return C.HEAD_IO
        return C.route_io(index, self.routes[index].chained)

    def caller(self):
        """`call(role, feeds) -> outputs` over the modules, for runtime/segmented.Decoder."""
        graphs = self.graphs()

        def call(role: str, feeds: dict[str, Any]) -> dict[str, Any]:
            inputs, outputs = self.io(role)
            with torch.no_grad():
                out = graphs[role](*[feeds[n] for n in inputs])
            return dict(zip(outputs, out))

        return call


def kv_dtypes(model: nn.Module, family: type[Family]) -> list[torch.dtype]:
    return [_dtype(layer) for layer in family.decoder(model).layers]
