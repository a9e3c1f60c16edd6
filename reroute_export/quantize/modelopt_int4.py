"""`quantize --method modelopt-awq`: NVIDIA ModelOpt's INT4 AWQ on each decoder graph, calibrated
with routing active, written as ModelOpt writes it (blocked DequantizeLinear-21 + MatMul).

What ModelOpt does (modelopt.onnx.quantization.int4.quantize, calibration_method "awq_lite")
    For each weight MatMul it runs the graph on the calibration feeds (ONNX Runtime, CPU),
    takes that MatMul's input rows X, and grid-searches alpha in [0, 1] (step 0.1) for the
    per-input-channel scale s = mean|X|^alpha / max|W|^(1-alpha) that minimises the output
    error of the INT4 weights; it writes diag(s) W as INT4 codes in [-8, 7] with one scale
    (amax / 7) per `block` input rows and output column, no zero point, and puts 1/s on the
    activation as a Mul node before the MatMul ("pre-quant scale"). Our own `--method awq`
    (awq.py) is the same search with s = mean|X|^alpha, folded into the RMSNorm weight where
    it can be; ModelOpt is the implementation TensorRT's documentation points to, so a user
    can compare the two on one artifact.

How it is driven here
    - The feeds are the ones `--method awq` records (feeds.py: the fp32 artifact run by the
      runtime's own host code on the shipped calibration set, routing graphs active; recipe
      int4-awq.json gives samples, seed and decode steps).
    - ModelOpt 0.47 concatenates each MatMul's inputs over the feeds along the batch axis
      (`np.concatenate(..., axis=0)`), so every feed must have the same token count. Each
      graph is given its prefill feeds cut to the shortest prefill's token count: a prefix
      of a causal prefill is itself a prefill (rows attend only to earlier rows, and the
      fixed KV buffers' rows above the prefix are never read), so those are real rows of
      the routed model. Decode feeds (one token each) are left out; the manifest records
      the rows used.
    - Exactly the Linears weights.plan_graph picks are handed to ModelOpt (every other
      MatMul/Gemm is in `nodes_to_exclude`, by exact name): the LM head and head.j's q/k stay
      as the recipe says. With `--routing-projections int8` (the default) those q/k are
      written afterwards by our own blocked INT8 DequantizeLinear (weights.rewrite_graph).
    - The graph is raised to opset 21 / IR 10 first (its functions too): fed an opset-18
      graph, ModelOpt 0.47 writes `block_size` DequantizeLinear without raising the opset,
      which onnx.checker and ONNX Runtime both refuse.
    - `awqlite_fuse_nodes=False`: with fusion on, ModelOpt 0.47's numpy path (no cupy, as on
      any CPU host) fails dividing a parent's weight (`ndarray.get()` is a cupy call), so the
      pre-quant scales stay as Mul nodes.

Installing: `pip install 'reroute-export[modelopt]'` installs nvidia-modelopt without its
`[onnx]` extra (which pins onnx~=1.21, onnxruntime-gpu and cupy-cuda12x) plus the packages its
ONNX INT4 path imports. Without it, the method says so in one line.

ONNX Runtime fuses each DequantizeLinear(INT4, blocked, axis 0) + MatMul pair into MatMulNBits
when it loads the graph (CPU provider), so this one encoding serves both runtimes; TensorRT
>= 10 takes it as written (lint checks)."""

from __future__ import annotations

import contextlib
import io
import re
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import onnx

from .. import contract as C
from ..errors import UserError
from .encodings import raise_to_qdq_opset

METHOD = "modelopt-awq"
ALGORITHM = "awq_lite"
PACKAGE = "nvidia-modelopt"
INSTALL = "pip install 'reroute-export[modelopt]'; ModelOpt 0.47 needs torch>=2.8"
_FLOAT_OPS = ("MatMul", "Gemm")


def modelopt_version() -> str | None:
    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        return None


def _int4_quantize() -> Any:
    try:
        from modelopt.onnx.quantization.int4 import quantize
    except ImportError as e:
        raise UserError(f"--method {METHOD} needs NVIDIA ModelOpt, which is not installed here ({INSTALL}); "
                        f"import failed: {e}") from None
    return quantize


def check_installed() -> None:
    """Fail (one line) before any work when ModelOpt's INT4 path cannot be imported."""
    _int4_quantize()


def describe(weights_precision: str | None, block: int) -> dict[str, Any]:
    """The manifest's format/scheme/library fields for a ModelOpt-quantized artifact."""
    return {
        "format": f"DequantizeLinear-21 (blocked, axis 0) + MatMul, written by NVIDIA ModelOpt INT4 {ALGORITHM}; "
                  "pre-quant scales as Mul nodes (ONNX Runtime fuses each pair into MatMulNBits at load)",
        "scheme": f"symmetric, codes in [-8, 7], one {weights_precision} scale (amax / 7) per {block} input rows "
                  "and output column, no zero point",
        "library": {"name": PACKAGE, "version": modelopt_version(), "algorithm": ALGORITHM,
                    "calibration": "prefill feeds recorded with routing active, cut to the shortest prefill "
                                   "(ModelOpt concatenates feeds along the batch axis); decode feeds left out"},
    }


def _token_axes(model: onnx.ModelProto) -> dict[str, int]:
    """input name -> its token axis (the axis named like `hidden`'s second one)."""
    dims = {i.name: [d.dim_param for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    hidden = dims.get(C.HIDDEN) or []
    if len(hidden) < 2 or not hidden[1]:
        raise UserError(f"graph has no `{C.HIDDEN}` input with a named token axis; ModelOpt cannot be fed")
    return {name: d.index(hidden[1]) for name, d in dims.items() if hidden[1] in d}


def equal_length_feeds(model: onnx.ModelProto, feeds: Iterator[dict[str, np.ndarray]]
                       ) -> tuple[list[dict[str, np.ndarray]], dict[str, int]]:
    """The prefill feeds (more than one token), each cut to the shortest one's token count
    (module docstring: a causal prefill's prefix); (feeds, what was used)."""
    axes = _token_axes(model)
    prefill, decode = [], 0
    for feed in feeds:
        if feed[C.HIDDEN].shape[1] > 1:
            prefill.append(feed)
        else:
            decode += 1
    if not prefill:
        raise UserError("no prefill feeds were recorded for ModelOpt (empty calibration set?)")
    t = min(f[C.HIDDEN].shape[1] for f in prefill)
    cut = [{k: (np.take(v, np.arange(t), axis=axes[k]) if k in axes else v) for k, v in f.items()} for f in prefill]
    return cut, {"prefill_feeds": len(cut), "tokens_per_feed": int(t), "rows": int(t) * len(cut),
                 "decode_feeds_left_out": decode}


def _excluded(model: onnx.ModelProto, quantize: set[str]) -> list[str]:
    """Every MatMul/Gemm that is not ours to quantize, as ModelOpt's exact-name patterns."""
    return [f"^{re.escape(n.name)}$" for n in model.graph.node if n.op_type in _FLOAT_OPS and n.name not in quantize]


def _quantized_by_modelopt(model: onnx.ModelProto) -> set[str]:
    """MatMuls whose weight input is a DequantizeLinear's output."""
    dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {n.name for n in model.graph.node if n.op_type in _FLOAT_OPS and len(n.input) > 1 and n.input[1] in dq}


def quantize_graph(src: Path, name: str, linears: list[Any], feeds: Iterator[dict[str, np.ndarray]], block: int,
                   finish: Callable[[Path, list[Any]], dict[str, Any]]) -> dict[str, Any]:
    """Graph `name` of artifact `src` through ModelOpt INT4 awq_lite; `finish(folder, linears)`
    then writes ModelOpt's graph (saved in `folder`) into the artifact with the Linears that
    have their own bits (head.j's routing q/k at int8) quantized, and says what it wrote
    (weights.rewrite_graph). Returns that, plus `modelopt`."""
    from .select import name_nodes

    quantize = _int4_quantize()
    model = onnx.load(src / name)  # with its weights: ModelOpt reads and rewrites them in memory
    name_nodes(model)
    raise_to_qdq_opset(model)
    ours = {lin.node for lin in linears if not lin.bits}
    own_bits = [lin for lin in linears if lin.bits]
    cut, used = equal_length_feeds(model, feeds)
    from .feeds import ListReader

    log = io.StringIO()
    try:
        with contextlib.redirect_stderr(log), contextlib.redirect_stdout(log):
            out = quantize(model, calibration_method=ALGORITHM, calibration_data_reader=ListReader(iter(cut)),
                           calibration_eps=["cpu"], use_zero_point=False, block_size=block,
                           nodes_to_exclude=_excluded(model, ours), log_level="ERROR", awqlite_fuse_nodes=False)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001  (a library failure on this graph: one line, nothing written)
        raise UserError(f"ModelOpt INT4 {ALGORITHM} failed on {name}: {type(e).__name__}: {e}".splitlines()[0]) from None
    done = _quantized_by_modelopt(out)
    pre_quant = sum(1 for n in out.graph.node if n.op_type == "Mul" and n.name.endswith("_PQS"))
    with tempfile.TemporaryDirectory(prefix="reroute-modelopt-") as tmp:
        onnx.save_model(out, Path(tmp) / name, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{name}.data", size_threshold=1024)
        del out, model
        wrote = finish(Path(tmp), own_bits)
    wrote["modelopt"] = {"algorithm": ALGORITHM, "quantized": sorted(done & ours), "left_float": sorted(ours - done),
                         "pre_quant_scale_muls": pre_quant, "calibration": used}
    return wrote
