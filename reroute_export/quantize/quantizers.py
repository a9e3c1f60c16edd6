"""The quantizers: ONNX Runtime's quantize_static (QDQ, MinMax ranges merged one feed at a
time) and, where it is installed, NVIDIA ModelOpt's ONNX PTQ on the same feeds and exclusions;
then every node that is not a quantized MatMul/Gemm gets its float input back."""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path
from typing import Any, Iterator

import onnx

from ..errors import UserError
from .feeds import FeedReader, ListReader
from .recipes import Recipe


@contextlib.contextmanager
def quiet_root_logger() -> Iterator[None]:
    """onnxruntime.quantization warns through the root logger (and would install a stderr
    handler doing so); keep it to errors without leaving a handler behind."""
    root = logging.getLogger()
    level, null = root.level, logging.NullHandler()
    root.addHandler(null)
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
        root.removeHandler(null)


def is_large(model: onnx.ModelProto) -> bool:
    try:
        return model.ByteSize() > (2 << 30) - (64 << 20)
    except Exception:  # noqa: BLE001  (protobuf cannot size > 2 GB)
        return True


def minmax_ranges(model_path: Path, reader: FeedReader, op_types: list[str], tmp: Path, large: bool) -> Any:
    """Activation ranges (ONNX Runtime's MinMax calibrator), merged one feed at a time so
    that memory holds one step's activations, not every sample's (its own
    CalibMaxIntermediateOutputs option drops data instead of merging it in 1.32)."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    calibrator = create_calibrator(model_path, op_types, augmented_model_path=str(tmp / "augmented.onnx"),
                                   calibrate_method=CalibrationMethod.MinMax, use_external_data_format=large,
                                   providers=["CPUExecutionProvider"])
    for feed in reader:
        calibrator.collect_data(FeedReader(iter([feed])))  # collects, then merges into the running range
    if reader.count == 0:
        raise UserError("no calibration feeds were produced (empty calibration set?)")
    return calibrator.compute_data()


def external_files(model_path: Path) -> list[str]:
    """The external-data files (relative names) a graph's initializers point to."""
    import onnx

    proto = onnx.load(model_path, load_external_data=False)
    return sorted({e.value for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                   for e in t.external_data if e.key == "location"})


def quantize_onnxruntime(model_path: Path, reader: FeedReader, nodes: list[str], recipe: Recipe, out: Path,
                         tmp: Path) -> None:
    """Int8 QDQ with onnxruntime.quantization (also the first half of fp8)."""
    import inspect

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    large = bool(external_files(model_path))
    opts = {
        "ActivationSymmetric": bool(recipe.q("symmetric_activations")) or recipe.precision == "fp8",
        "WeightSymmetric": bool(recipe.q("symmetric_weights")) or recipe.precision == "fp8",
        "QuantizeBias": bool(recipe.q("quantize_bias")),
        "OpTypesToExcludeOutputQuantization": list(recipe.q("op_types")),  # Q/DQ on inputs only (TensorRT)
    }
    kwargs: dict[str, Any] = {}
    with quiet_root_logger():
        if "calibration_cache_path" in inspect.signature(quantize_static).parameters:
            from onnxruntime.quantization.calibrate import save_tensors_data

            cache = tmp / f"{model_path.stem}.ranges.json"
            save_tensors_data(minmax_ranges(model_path, reader, list(recipe.q("op_types")), tmp, large), cache)
            kwargs = {"calibration_data_reader": None, "calibration_cache_path": str(cache)}
        else:  # older onnxruntime: its calibrator keeps every feed's activations until the end
            kwargs = {"calibration_data_reader": reader}
        quantize_static(
            str(model_path), str(out), quant_format=QuantFormat.QDQ, op_types_to_quantize=list(recipe.q("op_types")),
            nodes_to_quantize=nodes, per_channel=bool(recipe.q("per_channel")),
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax, use_external_data_format=large, extra_options=opts, **kwargs,
        )


def quantize_modelopt(model: onnx.ModelProto, reader: FeedReader, excluded: list[str], recipe: Recipe,
                      out: Path, tmp: Path) -> None:
    """NVIDIA ModelOpt's ONNX PTQ on the same feeds and exclusions (where it is installed)."""
    try:
        from modelopt.onnx.quantization import quantize as mo_quantize
    except ImportError:
        raise UserError("recipe asks for library modelopt, which is not installed here "
                        "(pip install 'reroute-export[modelopt]')") from None
    from ..export import onnx_ops  # here, not at import: it loads torch (the CLI registers this module)

    inlined = onnx_ops.inline_functions(model)  # ModelOpt sends custom-domain ops to TensorRT's EP
    src = tmp / "modelopt-input.onnx"
    onnx.save_model(inlined, src, save_as_external_data=is_large(inlined))
    mo_quantize(
        onnx_path=str(src), quantize_mode=recipe.precision, calibration_data_reader=ListReader(reader),
        calibration_method="max", calibration_eps=["cpu"], op_types_to_quantize=list(recipe.q("op_types")),
        nodes_to_exclude=[f"^{re.escape(n)}$" for n in excluded], output_path=str(out),
        high_precision_dtype="fp32", disable_mha_qdq=not recipe.q("activation_matmuls"),
        use_external_data_format=is_large(inlined), log_level="ERROR",
    )


def restore_float_consumers(qmodel: onnx.ModelProto, quantized: list[str]) -> int:
    """Give every node that is not a quantized MatMul/Gemm its float input back.

    ONNX Runtime's quantizer routes *all* consumers of a quantized activation through the
    new DequantizeLinear, so a residual Add or the Slice that feeds a routing score would
    see int8-rounded values although it is not quantized (TensorRT would then also run it
    on the rounded tensor). Only the quantized nodes should read the Q/DQ output.
    Returns how many inputs were rewired.
    """
    g = qmodel.graph
    constants = {t.name for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    original: dict[str, str] = {}
    for n in g.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in producer:
            q = producer[n.input[0]]
            if q.op_type == "QuantizeLinear" and q.input[0] not in constants:
                original[n.output[0]] = q.input[0]
    keep = set(quantized)
    graph_outputs = {o.name for o in g.output}
    changed = 0
    for n in g.node:
        if n.name in keep or n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, name in enumerate(n.input):
            if name in original and original[name] not in graph_outputs:
                n.input[i] = original[name]
                changed += 1
    return changed
