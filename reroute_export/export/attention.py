"""Attention forms, chosen per target from a list, and the ONNX rewrite that lowers each.

    form        KV write       graph opset   runs on                        default for
    portable    host           18            ONNX Runtime, TensorRT >= 10.3  --target onnx; --target trt, TensorRT 10.x
    ort-gqa     in-graph       18 + msft     ONNX Runtime (CPU, CUDA)        (asked for: --attention ort-gqa)
    kv-scatter  in-graph       24            ONNX Runtime; TensorRT 11       --target trt, TensorRT 11

`portable` is rewrite/segments.py's split softmax over the fixed buffer: plain opset-18 ops
that every TensorRT version parses; the segment returns each layer's new rows and the host
writes them. The two fused forms start from the same traced node, `reroute::CachedAttention`
(rewrite/attention.py), which `lower()` replaces after export:

  ort-gqa      q, k, v, past_k, past_v, seqlens_k = past_length + T - 1, total = past_length + T
                 --GroupQueryAttention(num_heads, kv_num_heads, scale)--> out, present_k, present_v
               With past and present bound to one buffer ONNX Runtime writes the T rows in place
               and attends only to the valid rows (the portable form reads all M_s rows, masked).
               The segments trace reroute::CachedAttentionRope for this form (pre-rope q/k and
               each row's cos/sin): GroupQueryAttention applies the rotary itself (do_rotary,
               those rows as its cos/sin cache, position_ids 0..T-1), so routing's positions
               stay exact and rotate_half's Split/Neg/Concat/Mul/Add leave every layer.

  kv-scatter   k --Reshape/Transpose--> (1, nkv, T, hd) --TensorScatter(past_k, ., past_length)--> present_k
               mask (T, M) = col <= past_length + row
               q (1, nh, T, hd), present_k, present_v, mask --Attention(q/kv heads, scale)--> out
               TensorScatter-24 models an in-place cache update (TensorRT: IKVCacheUpdateLayer,
               whose output must alias the cache) and Attention-24 without past inputs is what
               TensorRT's importer maps to IAttention (onnx-tensorrt builtin_op_importers.cpp:
               "Setting past_key ... is not supported", so the buffer is passed as K/V).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import TensorProto, helper

from .. import contract as C
from .onnx_ops import raise_opset

MSFT = "com.microsoft"


@dataclass(frozen=True)
class Form:
    name: str
    in_graph_kv: bool
    opset: int
    ir_version: int
    domains: tuple[tuple[str, int], ...]
    summary: str
    valid_rows_only: bool = False  # attention reads past_length + T rows, not the whole buffer


FORMS = {
    f.name: f for f in (
        Form(C.PORTABLE, False, C.OPSET, C.IR_VERSION, (),
             "split softmax over the fixed buffer, host writes the new rows (opset 18: TensorRT 10.3+)"),
        Form("ort-gqa", True, C.OPSET, C.IR_VERSION, ((MSFT, 1),),
             "ONNX Runtime GroupQueryAttention writing the shared past/present buffer in place", True),
        Form("kv-scatter", True, 24, 10, (),
             "TensorScatter-24 + Attention-24 (opset 24: TensorRT 11's KV-update and attention layers)"),
    )
}


def default_form(target: str, trt_version: str | None) -> str:
    """The form `--attention auto` picks: the portable form for an ONNX artifact (one file that
    ONNX Runtime and TensorRT 10.3 both take; ort-gqa is opt-in until its CPU speed-up holds on
    the bench models, BENCHMARKS.md); for TensorRT the portable form below 11 (JetPack 6.x
    ships 10.3), the opset-24 ops from 11."""
    if target == "onnx":
        return C.PORTABLE
    major = int(str(trt_version or "10").split(".")[0])
    return "kv-scatter" if major >= 11 else C.PORTABLE


# ---------------------------------------------------------------- the rewrite


def _const(name: str, values: list[int]) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=name, value=helper.make_tensor(name, TensorProto.INT64,
                                                                              [len(values)], values))


class _Emitter:
    """Nodes replacing one CachedAttention node, named after it (deterministic, readable)."""

    def __init__(self, node: onnx.NodeProto) -> None:
        self.prefix = (node.name or node.output[0]) + "/"
        self.nodes: list[onnx.NodeProto] = []

    def __call__(self, op: str, inputs: list[str], n_out: int = 1, domain: str = "", outputs=None, **attrs):
        outs = outputs or [f"{self.prefix}{op}_{len(self.nodes)}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=f"{self.prefix}{op}_{len(self.nodes)}",
                                           domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, values: list[int]) -> str:
        name = f"{self.prefix}c{len(self.nodes)}"
        self.nodes.append(_const(name, values))
        return name


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _gqa(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    a, e = _attrs(node), _Emitter(node)
    q, k, v, pk, pv, pl = node.input[:6]
    t = e("Shape", [q], start=1, end=2)  # (1,) rows
    total = e("Add", [pl, t])  # (1,) int64
    seqlens = e("Cast", [e("Sub", [total, e.const([1])])], to=TensorProto.INT32)  # (1,)
    total32 = e("Cast", [e("Squeeze", [total, e.const([0])])], to=TensorProto.INT32)  # scalar
    rotary, extra = ({}, []) if len(node.input) == 6 else ({"do_rotary": 1, "rotary_interleaved": 0},
                                                          _rotary_cache(e, node.input[6], node.input[7], pl, t))
    e("GroupQueryAttention", [q, k, v, pk, pv, seqlens, total32, *extra], domain=MSFT, outputs=list(node.output),
      num_heads=a["num_heads"], kv_num_heads=a["kv_heads"], scale=a["scale"], **rotary)
    return e.nodes


def _rotary_cache(e: _Emitter, cos: str, sin: str, past_length: str, t: str) -> list[str]:
    """GroupQueryAttention's rotary inputs from each row's own cos/sin (1, T, hd), halves duplicated:
    the caches are those T rows' first halves (T, hd/2), zero rows appended up to past_length + T
    (it checks that a cache covers total_sequence_length), read at position_ids = 0..T-1. Row i
    thus rotates by the routed position it was given, not by its place in the buffer."""
    zero = e.const([0])
    half = e("Div", [e("Shape", [cos], start=2, end=3), e.const([2])])  # (1,)
    shape = e("Concat", [e.const([-1]), half], axis=0)
    pads = e("Concat", [zero, zero, past_length, zero], axis=0)  # rows: 0 before, past_length after

    def cache(x: str) -> str:
        return e("Pad", [e("Reshape", [e("Slice", [x, zero, half, e.const([2])]), shape]), pads])

    rows = e("Unsqueeze", [e("Range", [e("Squeeze", [zero, zero]), e("Squeeze", [t, zero]),
                                       e("Squeeze", [e.const([1]), zero])]), zero])  # (1, T)
    return [cache(cos), cache(sin), rows]


def _kv_scatter(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    a, e = _attrs(node), _Emitter(node)
    q, k, v, pk, pv, pl = node.input
    out, present_k, present_v = node.output
    nh, nkv = a["num_heads"], a["kv_heads"]
    hd = e("Shape", [pk], start=3, end=4)  # (1,)

    def heads(x: str, n: int) -> str:  # (1, T, n*hd) -> (1, n, T, hd)
        shape = e("Concat", [e.const([1, -1, n]), hd], axis=0)
        return e("Transpose", [e("Reshape", [x, shape])], perm=[0, 2, 1, 3])

    e("TensorScatter", [pk, heads(k, nkv), pl], outputs=[present_k], mode="linear")
    e("TensorScatter", [pv, heads(v, nkv), pl], outputs=[present_v], mode="linear")
    zero, one = e.const([0]), e.const([1])
    m = e("Squeeze", [e("Shape", [pk], start=2, end=3), zero])
    t = e("Squeeze", [e("Shape", [q], start=1, end=2), zero])
    cols = e("Unsqueeze", [e("Range", [e("Squeeze", [zero, zero]), m, e("Squeeze", [one, zero])]), zero])  # (1, M)
    rows = e("Unsqueeze", [e("Add", [e("Range", [e("Squeeze", [zero, zero]), t, e("Squeeze", [one, zero])]), pl]), one])
    mask = e("LessOrEqual", [cols, rows])  # (T, M): causal over absolute positions
    y = e("Attention", [heads(q, nh), present_k, present_v, mask], q_num_heads=nh, kv_num_heads=nkv,
          scale=a["scale"])  # (1, nh, T, hd)
    flat = e("Concat", [e.const([1, -1]), e("Mul", [hd, e.const([nh])])], axis=0)
    e("Reshape", [e("Transpose", [y], perm=[0, 2, 1, 3]), flat], outputs=[out])
    return e.nodes


_LOWER = {"ort-gqa": _gqa, "kv-scatter": _kv_scatter}
_FUSED = ("CachedAttention", "CachedAttentionRope")  # the second only under ort-gqa (rewrite/segments.py)


def lower(model: onnx.ModelProto, form: str) -> onnx.ModelProto:
    """Replace every reroute CachedAttention node with `form`'s ops; set the form's opset."""
    if form == C.PORTABLE:
        return model
    spec = FORMS[form]
    nodes = []
    for n in model.graph.node:
        nodes += _LOWER[form](n) if n.op_type in _FUSED and n.domain == "reroute" else [n]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    raise_opset(model, spec.opset)  # the routing graphs' local functions too
    have = {o.domain for o in model.opset_import}
    model.opset_import.extend(helper.make_opsetid(d, v) for d, v in spec.domains if d not in have)
    model.ir_version = max(model.ir_version, spec.ir_version)
    return model
