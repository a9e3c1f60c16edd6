"""RMSNorm written so that runtimes fuse it: `x * Reciprocal(Sqrt(v))` becomes `x / Sqrt(v)`.

torch.onnx lowers `torch.rsqrt` (every RMSNorm of Llama/Qwen2: x * rsqrt(mean(x^2) + eps))
to Sqrt -> Reciprocal -> Mul. ONNX Runtime's SimplifiedLayerNormalization fusion matches
Pow -> ReduceMean -> Add -> Sqrt -> Div (-> Mul by the weight), not the Reciprocal form, so
without this each norm runs as five small kernels per layer and per decode step. The
rewrite is one Div per Reciprocal whose readers are all Mul: plain opset-1 ops, the same
function up to one rounding (x / s against x * (1 / s)), and the pattern TensorRT's own
normalization fusion and every HF-exported Llama graph use. Measured on bench-llava
(BENCHMARKS.md): the segments' norms become one SimplifiedLayerNormalization kernel each.
"""

from __future__ import annotations

import onnx


def rsqrt_as_div(model: onnx.ModelProto) -> int:
    """Rewrite every Sqrt -> Reciprocal -> Mul(s) of the main graph as Div(s) in place; how many."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    dropped: set[int] = set()
    for n in g.node:
        if n.op_type != "Reciprocal" or n.domain not in ("", "ai.onnx") or n.output[0] in outputs:
            continue
        sqrt = producer.get(n.input[0])
        users = readers.get(n.output[0], [])
        if sqrt is None or sqrt.op_type != "Sqrt" or not users:
            continue
        if any(u.op_type != "Mul" or list(u.input).count(n.output[0]) != 1 for u in users):
            continue
        for u in users:
            other = u.input[1] if u.input[0] == n.output[0] else u.input[0]
            u.op_type = "Div"
            del u.input[:]
            u.input.extend([other, sqrt.output[0]])
        dropped.add(id(n))
    if dropped:
        kept = [n for n in g.node if id(n) not in dropped]
        del g.node[:]
        g.node.extend(kept)
    return len(dropped)
