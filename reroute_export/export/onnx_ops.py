"""The ONNX side of the `reroute` custom ops: schemas, function bodies, translations.

Each torch op in rewrite/ops.py exports as ONE node in the `reroute` domain (so a
TensorRT plugin can claim it by op_type), and the model carries a local function with
the same (domain, name) made of opset-18 standard ops, so plain ONNX Runtime and
TensorRT's ONNX parser run it without any plugin. Op names never shadow built-ins.

Registering an OpSchema per op lets the exporter know the outputs and lets
`onnx.checker` run full shape inference over the custom nodes.
"""

from __future__ import annotations

import onnx
import onnxscript
from onnx.defs import OpSchema
from onnxscript import opset18 as op

DOMAIN = "reroute"
VERSION = 1
rr = onnxscript.values.Opset(DOMAIN, VERSION)

_FLOAT = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
_I64 = "tensor(int64)"


def _schema(name: str, inputs, outputs, attrs, doc: str) -> OpSchema:
    P = OpSchema.FormalParameter
    return OpSchema(
        name, DOMAIN, VERSION, doc,
        inputs=[P(n, t) for n, t in inputs], outputs=[P(n, t) for n, t in outputs],
        type_constraints=[("T", _FLOAT, "float types")],
        attributes=[OpSchema.Attribute(a, OpSchema.AttrType.INTS if a == "k" else OpSchema.AttrType.INT, a)
                    for a in attrs],
    )


SCHEMAS = [
    _schema("SelectVisual", [("scores", "T"), ("visual_start", _I64)], [("selected", _I64)], ["m", "k"],
            "Ascending indices of the k best scores in the block [visual_start, visual_start + m)."),
    _schema("RouteGather", [("x", "T"), ("selected", _I64), ("visual_start", _I64)],
            [("rows", "T"), ("index", _I64)], ["m"],
            "Kept rows of x: text rows and the selected rows of the visual block, in order."),
]


def _cached_attention_schema(name: str = "CachedAttention", rope: bool = False) -> OpSchema:
    """rewrite/attention.py's ops: attention with the KV write in-graph (and the rotary, for
    CachedAttentionRope). No function body: they never reach a file; export/attention.py lowers
    them to the target's form right after export."""
    P, A = OpSchema.FormalParameter, OpSchema.Attribute
    return OpSchema(
        name, DOMAIN, VERSION, "Attention of T rows over a fixed KV buffer written at past_length.",
        inputs=[P("q", "T"), P("k", "T"), P("v", "T"), P("past_k", "T"), P("past_v", "T"), P("past_length", _I64),
                *([P("cos", "T"), P("sin", "T")] if rope else [])],
        outputs=[P("out", "T"), P("present_k", "T"), P("present_v", "T")],
        type_constraints=[("T", _FLOAT, "float types")],
        attributes=[A("num_heads", OpSchema.AttrType.INT, "query heads"),
                    A("kv_heads", OpSchema.AttrType.INT, "key/value heads"),
                    A("scale", OpSchema.AttrType.FLOAT, "score scale")],
    )


SCHEMAS += [_cached_attention_schema(), _cached_attention_schema("CachedAttentionRope", rope=True)]


def register_schemas() -> None:
    for s in SCHEMAS:
        if not onnx.defs.has(s.name, s.domain):
            onnx.defs.register_schema(s)


register_schemas()


# ---------------------------------------------------------------- function bodies


@onnxscript.script(rr, default_opset=op)
def SelectVisual(scores, visual_start, m: int, k: list[int]):
    #   scores (B, T) --GatherElements(vs + arange(m))--> block (B, m)
    #   block --TopK(k, largest)--> best (B, k) --TopK(k, smallest) on indices--> ascending
    zero = op.Constant(value_int=0)
    one = op.Constant(value_int=1)
    span = op.Range(zero, op.Constant(value_int=m), one)  # (m,)
    pos = op.Add(op.Unsqueeze(visual_start, one), span)  # (B, m)
    block = op.GatherElements(scores, pos, axis=1)
    kk = op.Constant(value_ints=k)  # (1,) a constant: TensorRT wants TopK's K as weights
    _, best = op.TopK(block, kk, axis=1, largest=1, sorted=1)  # ties: lower index first
    _, order = op.TopK(op.Cast(best, to=1), kk, axis=1, largest=0, sorted=1)
    return op.GatherElements(best, order, axis=1)


@onnxscript.script(rr, default_opset=op)
def RouteGather(x, selected, visual_start, m: int):
    #   i = arange(T - m + k);  idx = i < vs ? i : i < vs + k ? vs + selected[i - vs] : i - k + m
    #   rows = GatherElements(x, idx expanded over D)
    one = op.Constant(value_int=1)
    shape = op.Shape(x)  # (B, T, D)
    length = op.Gather(shape, one, axis=0)
    k = op.Gather(op.Shape(selected), one, axis=0)
    mm = op.Constant(value_int=m)
    out_len = op.Add(op.Sub(length, mm), k)
    i = op.Unsqueeze(op.Range(op.Constant(value_int=0), out_len, one), op.Constant(value_ints=[0]))  # (1, T')
    vs = op.Unsqueeze(visual_start, one)  # (B, 1)
    rel = op.Sub(i, vs)
    j = op.Clip(rel, op.Constant(value_int=0), op.Sub(k, one))  # (B, T')
    chosen = op.Add(vs, op.GatherElements(selected, j, axis=1))
    after = op.Add(op.Sub(i, k), mm)
    inner = op.Where(op.Less(i, op.Add(vs, k)), chosen, after)
    index = op.Where(op.Less(i, vs), op.Expand(i, op.Shape(inner)), inner)  # (B, T')
    dims = op.Concat(op.Shape(index), op.Slice(shape, [2], [3]), axis=0)
    rows = op.GatherElements(x, op.Expand(op.Unsqueeze(index, [2]), dims), axis=1)
    return rows, index


FUNCTIONS = [SelectVisual, RouteGather]


# ---------------------------------------------------------------- translations


def _select_visual(scores, visual_start, m: int, k: int):
    return rr.SelectVisual(scores, visual_start, m=m, k=[k])


def _route_gather(x, selected, visual_start, m: int):
    return rr.RouteGather(x, selected, visual_start, m=m)


def _cached_attention(q, k, v, past_k, past_v, past_length, num_heads: int, kv_heads: int, scale: float):
    return rr.CachedAttention(q, k, v, past_k, past_v, past_length, num_heads=num_heads, kv_heads=kv_heads,
                              scale=scale, _num_outputs=3)


def _cached_attention_rope(q, k, v, past_k, past_v, past_length, cos, sin, num_heads: int, kv_heads: int,
                           scale: float):
    return rr.CachedAttentionRope(q, k, v, past_k, past_v, past_length, cos, sin, num_heads=num_heads,
                                  kv_heads=kv_heads, scale=scale, _num_outputs=3)


def translations() -> dict:
    """torch op -> ONNX translation, for torch.onnx's custom_translation_table. Built on call:
    this module's functions and schemas serve torch-free code too (lint, calibrate, inspect)."""
    from ..rewrite import attention, ops as torch_ops

    return {
        torch_ops.select_visual._opoverload: _select_visual,
        torch_ops.route_gather._opoverload: _route_gather,
        attention.cached_attention._opoverload: _cached_attention,
        attention.cached_attention_rope._opoverload: _cached_attention_rope,
    }


def raise_opset(model: onnx.ModelProto, version: int) -> None:
    """Raise the model's default-domain opset to `version`, and its local functions' with it:
    ONNX's checker (and so polygraphy) refuses a function that imports another version of a
    domain than its model does. The functions' standard ops (Gather, TopK, Cast, Shape, ...)
    mean the same from opset 18 to 24: later versions add types and defaulted attributes."""
    for imports in [model.opset_import, *(f.opset_import for f in model.functions)]:
        for o in imports:
            if o.domain in ("", "ai.onnx"):
                o.version = max(o.version, version)


def attach_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Add the local function of every `reroute` op the graph uses (once each)."""
    used = {n.op_type for n in model.graph.node if n.domain == DOMAIN}
    have = {(f.domain, f.name) for f in model.functions}
    for fn in FUNCTIONS:
        proto = fn.to_function_proto()
        if proto.name in used and (DOMAIN, proto.name) not in have:
            model.functions.append(proto)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, VERSION))
    return model


def inline_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph with every local function expanded into standard ops."""
    import onnx.inliner

    out = onnx.inliner.inline_local_functions(model)
    keep = [o for o in out.opset_import if o.domain != DOMAIN]
    del out.opset_import[:]
    out.opset_import.extend(keep)
    return out
