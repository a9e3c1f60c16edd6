"""Symmetric int8 Q/DQ -> FLOAT8E4M3FN Q/DQ with TensorRT's and ModelOpt's convention,
scale = amax / 448 (weights re-quantized per channel from the fp32 values). FP8
QuantizeLinear needs opset 19 and IR 9, so an fp8 graph declares those."""

from __future__ import annotations

import numpy as np
import onnx

FP8_MAX = 448.0  # largest finite FLOAT8E4M3FN
INT8_MAX = 127.0  # symmetric int8: [-127, 127]
FP8_OPSET, FP8_IR = 19, 9  # FLOAT8 Q/DQ exist from opset 19; FLOAT8 tensors need IR 9


def _fp8_tensor(name: str, values: np.ndarray) -> onnx.TensorProto:
    import ml_dtypes

    q = np.asarray(values, dtype=np.float32).astype(ml_dtypes.float8_e4m3fn)  # round to nearest even, saturating
    return onnx.helper.make_tensor(name, onnx.TensorProto.FLOAT8E4M3FN, list(q.shape), q.view(np.uint8).tobytes(),
                                   raw=True)


def int8_qdq_to_fp8(qmodel: onnx.ModelProto, source: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite symmetric int8 Q/DQ into FLOAT8E4M3FN Q/DQ with scale = amax / 448.

    Activations: amax = int8 scale * 127 (the calibrated max). Weights: re-quantized from
    the fp32 initializer of `source`, amax per channel along the DequantizeLinear axis.
    """
    from onnx import numpy_helper

    from ..export.onnx_ops import raise_opset  # here: onnxscript loads at import

    g = qmodel.graph
    inits = {t.name: t for t in g.initializer}
    fp32 = {t.name: t for t in source.graph.initializer}
    done: set[str] = set()

    def replace(t: onnx.TensorProto) -> None:
        g.initializer.remove(inits[t.name])
        g.initializer.append(t)
        inits[t.name] = t

    for node in g.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3:
            continue
        x, scale, zp = node.input[:3]
        if scale in done or scale not in inits or zp not in inits:
            continue
        if inits[zp].data_type != onnx.TensorProto.INT8:
            raise ValueError(f"{node.name}: expected int8 Q/DQ to rewrite, found element type {inits[zp].data_type}")
        s = numpy_helper.to_array(inits[scale]).astype(np.float32)
        if x in inits:  # a weight: re-quantize from fp32
            base = x[: -len("_quantized")] if x.endswith("_quantized") else x
            if base not in fp32:
                raise ValueError(f"{node.name}: fp32 weight {base} not found in the source graph")
            w = numpy_helper.to_array(fp32[base]).astype(np.float32)
            if s.ndim == 0 or s.size == 1:
                amax = np.abs(w).max().reshape(s.shape)
                wb = amax
            else:
                axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % w.ndim
                amax = np.abs(w).max(axis=tuple(i for i in range(w.ndim) if i != axis))
                wb = amax.reshape([-1 if i == axis else 1 for i in range(w.ndim)])
            new_scale = np.where(amax > 0, amax / FP8_MAX, 1.0).astype(np.float32)
            wq = w / np.where(wb > 0, wb / FP8_MAX, 1.0)
            replace(_fp8_tensor(x, wq))
        else:  # an activation: the calibrated range carries over
            new_scale = np.maximum(s * (INT8_MAX / FP8_MAX), np.finfo(np.float32).tiny).astype(np.float32)
        replace(numpy_helper.from_array(new_scale.reshape(s.shape), scale))
        replace(_fp8_tensor(zp, np.zeros(numpy_helper.to_array(inits[zp]).shape, np.float32)))
        done.add(scale)
    # the element types of Q outputs / DQ inputs changed: drop stale value_info, re-infer later
    stale = {o for n in g.node if n.op_type == "QuantizeLinear" for o in n.output}
    keep = [v for v in g.value_info if v.name not in stale]
    del g.value_info[:]
    g.value_info.extend(keep)
    raise_opset(qmodel, FP8_OPSET)  # 18 -> 19 adds types and defaulted attributes only
    qmodel.ir_version = FP8_IR
    return qmodel
