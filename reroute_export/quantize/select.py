"""What to quantize: weight-bearing MatMul/Gemm nodes, minus those a recipe keeps float
(attention and routing-score MatMuls, the LM head, projections feeding the routing scores,
`exclude_nodes` patterns), each exclusion with its reason; and what a quantized graph holds.

Per graph of the segmented decoder (rewrite/segments.py): the LM head is the MatMul that
makes `logits`, in the last segment only; the projections feeding the routing scores are
head.j's q_proj and k_proj (route.j scores the last row's query against every key). The
route.j graphs themselves never reach this module: they are copied float (recipes.FLOAT_KINDS)."""

from __future__ import annotations

import json
import re

import onnx

from .. import contract as C
from ..export import onnx_ops
from .recipes import Recipe


def _constants(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in graph.initializer}
    names |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return names


def _weight_input(node: onnx.NodeProto, constants: set[str]) -> bool:
    return len(node.input) > 1 and node.input[1] in constants


def name_nodes(model: onnx.ModelProto) -> None:
    """Node names are how quantizers are told what to touch: make them present and unique."""
    seen: set[str] = set()
    for i, n in enumerate(model.graph.node):
        if not n.name or n.name in seen:
            n.name = f"{n.op_type.lower()}_{i}"
        seen.add(n.name)


def _upstream_quantizable(graph: onnx.GraphProto, starts: list[str], ops: set[str], constants: set[str]) -> set[str]:
    """Weight-bearing MatMul/Gemm nodes nearest upstream of `starts` (first on each path)."""
    producer = {o: n for n in graph.node for o in n.output}
    found: set[str] = set()
    seen: set[str] = set()
    stack = list(starts)
    while stack:
        name = stack.pop()
        if name in seen or name not in producer:
            continue
        seen.add(name)
        node = producer[name]
        if node.op_type in ops and _weight_input(node, constants):
            found.add(node.name)
            continue
        stack.extend(node.input)
    return found


def module_path(node: onnx.NodeProto) -> str:
    """The torch module a node was exported from (e.g. decoder.layers.3.self_attn.q_proj), or ""."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = [s for s in json.loads(p.value.replace("'", '"')) if s]
            except ValueError:
                return ""
            return scopes[-2] if len(scopes) > 1 else ""
    return ""


def select_nodes(model: onnx.ModelProto, role: str, recipe: Recipe) -> tuple[list[str], list[dict[str, str]]]:
    """(names of the nodes to quantize, [{node, op_type, reason}] of the candidates left float)."""
    g = model.graph
    ops = set(recipe.q("op_types"))
    constants = _constants(g)
    patterns = [re.compile(p) for p in recipe.q("exclude_nodes")]
    outputs = {o.name for o in g.output}
    lm_head: set[str] = set()
    if C.LOGITS in outputs and recipe.q("exclude_lm_head"):  # the last segment
        lm_head = _upstream_quantizable(g, [C.LOGITS], {"MatMul", "Gemm"}, constants)
    routing: set[str] = set()
    if recipe.q("routing_projections") == "float":
        # head.j's query and key are what route.j scores (a graph routing inside itself: SelectVisual's input)
        scores = [n.input[0] for n in g.node if n.domain == onnx_ops.DOMAIN and n.op_type == "SelectVisual"]
        if role.split(".")[0] == "head":
            scores += [C.QUERY, C.KEY]
        routing = _upstream_quantizable(g, scores, {"MatMul", "Gemm"}, constants)
    chosen, excluded = [], []
    for n in g.node:
        if n.op_type not in ops or n.domain not in ("", "ai.onnx"):
            continue
        reason = None
        if n.op_type in ("MatMul", "Gemm") and not _weight_input(n, constants):
            if not recipe.q("activation_matmuls"):
                reason = "activation x activation (attention or routing scores)"
        elif n.name in lm_head:
            reason = "LM head (logits)"
        elif n.name in routing:
            reason = "projection feeding the routing scores"
        module = module_path(n)
        if reason is None and any(p.search(n.name) or (module and p.search(module)) for p in patterns):
            reason = "recipe exclude_nodes"
        if reason is None:
            chosen.append(n.name)
        else:
            excluded.append({"node": n.name, "module": module, "op_type": n.op_type, "reason": reason})
    return chosen, excluded


def quantized_nodes(model: onnx.ModelProto, op_types: set[str]) -> set[str]:
    """Names of the nodes of `op_types` that read a DequantizeLinear output (in the written graph)."""
    dq = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return {n.name for n in model.graph.node if n.op_type in op_types and dq & set(n.input)}


def kept_float(model: onnx.ModelProto) -> list[str]:
    """The routing nodes of the graph (never quantized): `reroute` ops and any bare TopK."""
    return [f"{n.name} ({n.op_type})" for n in model.graph.node
            if n.domain == onnx_ops.DOMAIN or n.op_type == "TopK"]
