"""`calibrate`: an fp32 artifact -> a quantized (QDQ) ONNX artifact, calibrated with routing active.

    reroute-export calibrate --artifact DIR --precision int8|fp8 --output DIR [--recipe NAME|FILE]

What is calibrated, and on what
    The calibration set ships in `calibration/` (photographs whose licence allows shipping,
    one prompt each, sources and licences in `calibration/manifest.json`); a recipe
    (`calibration/recipes/*.json`) says how many samples, the seed that picks and orders
    them, how many decode steps per sample, and the quantizer settings. Every graph is
    calibrated on the feeds the ONNX Runtime runtime itself builds for it
    (`OrtArtifact.prefill` / `decode_step`): the vision graph on the processed photos, the
    prefill graph on the host embedding of (prompt, fp32 image features) with the
    unpruned model's positions, and the decode graph on real greedy decode steps whose
    `past.*` are the fp32 prefill's per-layer caches. The routing runs inside the prefill
    graph while it is observed, so the ranges are those of the routed model: after a
    decision only the kept visual tokens reach a layer, and that is what the layer's
    MatMuls see.

What is quantized
    Weight-bearing MatMul/Gemm only (weights per output channel, their input activations
    per tensor, symmetric: TensorRT's explicit-quantization pattern). Left in floating
    point: attention and routing-score MatMuls (activation x activation), the LM head
    (by default), every `reroute` op (SelectVisual's TopK, RouteGather/RouteScatter's
    index tensors) and everything else. The manifest lists each excluded MatMul/Gemm and
    why. The `reroute` local functions are kept as they are (ONNX Runtime's quantizer
    leaves nodes it does not quantize untouched), so the TensorRT plugin route still works.

Library: onnxruntime.quantization (`quantize_static`, QuantFormat.QDQ, MinMax calibration)
    It is already a dependency, runs on CPU, handles graphs with local functions and a
    dynamic text axis, and writes standard QuantizeLinear/DequantizeLinear pairs that
    TensorRT consumes as explicit quantization. NVIDIA ModelOpt's ONNX PTQ
    (`nvidia-modelopt[onnx]` 0.47) is the library TensorRT recommends, but here it
    cannot be installed next to this project: it pins onnx~=1.21 and, on x86-64 Linux,
    onnxruntime-gpu~=1.24 and cupy-cuda12x (this project runs onnx 1.23 and CPU
    onnxruntime 1.32), and it sends any graph with custom-domain ops to TensorRT's
    execution provider for calibration. Where ModelOpt is installed (a GPU host with
    TensorRT), recipe `"library": "modelopt"` or `--library modelopt` uses it instead, on
    the same calibration feeds and exclusions, after inlining the `reroute` functions.

FP8
    ONNX Runtime's own FP8 path needs its "Distribution" (histogram) calibrator, which
    cannot merge activations of different text lengths, and sets scales from the
    standard deviation rather than the maximum. So fp8 is calibrated like int8 (max,
    symmetric) and the Q/DQ pairs are then rewritten to FLOAT8E4M3FN with TensorRT's and
    ModelOpt's convention, scale = amax / 448 (weights re-quantized from the fp32 values
    per channel). FP8 QuantizeLinear needs opset 19 and IR 9, so an fp8 artifact
    declares those (TensorRT >= 10 parses them; Jetson Orin has no FP8 at all). ONNX
    Runtime's CPU provider runs FP8 Q/DQ by emulation (QuantizeLinear-19 /
    DequantizeLinear-19 kernels, fp32 math in between), so the parity numbers are
    those of FP8 rounding, not of FP8 tensor-core arithmetic. Where this onnxruntime
    build cannot run them, the artifact is still written (it passes onnx.checker), the
    manifest says parity was not measured and why, and the command exits 1.

Output: a complete artifact folder (written atomically through ArtifactWriter) with the
quantized graphs, the fp32 artifact's embed_tokens.npy and preprocessor/, and a manifest
recording the precision, the quantization (library, version, recipe, calibration
samples, excluded nodes) and `calibration_parity`: quantized vs fp32 artifact, both run
by ONNX Runtime on CPU on the shipped sample photos (routing agreement per stage, last
logits cosine, greedy token agreement, vision features cosine), judged with the
precision's tolerances from check/tolerances.py.

Exit codes (the CLI's): 0 written and parity within tolerances; 1 written but parity
failed or could not be measured; 2 could not run (bad input, one line).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import onnx

from .errors import UserError
from .export import contract as C
from .export import onnx_ops
from .export.artifact import ArtifactWriter, read_manifest, sha256_file
from .paths import shipped_dir, shown_dir
from .progress import Steps

PRECISIONS = ("int8", "fp8")
LIBRARIES = ("onnxruntime", "modelopt")
CALIBRATION_ENV = "REROUTE_EXPORT_CALIBRATION"  # a calibration set folder other than the shipped one
ROLES = ("vision", "prefill", "decode")
FP8_MAX = 448.0  # largest finite FLOAT8E4M3FN
INT8_MAX = 127.0  # symmetric int8: [-127, 127]
FP8_OPSET, FP8_IR = 19, 9  # FLOAT8 Q/DQ exist from opset 19; FLOAT8 tensors need IR 9
METHODS = ("minmax",)  # see the module docstring: histogram calibrators cannot mix text lengths
_CALIBRATION_MANIFEST = "manifest.json"


# ---------------------------------------------------------------- the calibration set


def calibration_dir() -> Path:
    """The calibration set: $REROUTE_EXPORT_CALIBRATION, else the shipped `calibration/`
    (the checkout's, or the wheel's copy inside the package: paths.shipped_dir)."""
    env = os.environ.get(CALIBRATION_ENV)
    return Path(env) if env else shipped_dir("calibration")


@dataclass(frozen=True)
class CalibrationSample:
    image: Path
    prompt: str
    entry: dict[str, Any]


def load_calibration_set(folder: Path | None = None, verify: bool = True) -> list[CalibrationSample]:
    """Every sample of the set's manifest, each image checked against its recorded sha256."""
    folder = Path(folder) if folder is not None else calibration_dir()
    path = folder / _CALIBRATION_MANIFEST
    if not path.is_file():
        raise UserError(f"calibration set not found: {path} is missing (set {CALIBRATION_ENV} to a calibration folder)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"calibration set {path} is not valid JSON ({e})") from None
    entries = raw.get("samples") if isinstance(raw, dict) else None
    if not isinstance(entries, list) or not entries:
        raise UserError(f"calibration set {path} lists no samples")
    out = []
    for e in entries:
        if not isinstance(e, dict) or not {"file", "prompt", "licence", "sha256"} <= set(e):
            raise UserError(f"calibration set {path}: every sample needs file, prompt, licence and sha256")
        image = folder / e["file"]
        if not image.is_file():
            raise UserError(f"calibration set {path}: {e['file']} is missing")
        if verify and sha256_file(image) != e["sha256"]:
            raise UserError(f"calibration set {path}: {e['file']} checksum mismatch")
        out.append(CalibrationSample(image, str(e["prompt"]), e))
    return out


# ---------------------------------------------------------------- recipes


@dataclass
class Recipe:
    name: str
    precision: str
    library: str = "onnxruntime"
    samples: int = 7
    seed: int = 0
    decode_steps: int = 4
    graphs: list[str] = field(default_factory=lambda: list(ROLES))
    quantizer: dict[str, Any] = field(default_factory=dict)
    parity_tokens: int = 16
    source: str = ""

    def q(self, key: str) -> Any:
        return self.quantizer.get(key, QUANTIZER_DEFAULTS[key])

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "precision": self.precision, "library": self.library,
                "samples": self.samples, "seed": self.seed, "decode_steps": self.decode_steps, "graphs": self.graphs,
                "quantizer": {k: self.q(k) for k in QUANTIZER_DEFAULTS}, "parity": {"tokens": self.parity_tokens}}


QUANTIZER_DEFAULTS: dict[str, Any] = {
    "op_types": ["MatMul", "Gemm"],
    "activation_matmuls": False,  # attention / routing-score MatMuls stay float
    "exclude_lm_head": True,
    "routing_projections": "quantize",  # or "float": keep the projections feeding routing scores float
    "exclude_nodes": [],  # regular expressions over node names and torch module paths
    "per_channel": True,
    "symmetric_activations": True,
    "symmetric_weights": True,
    "calibration_method": "minmax",
    "quantize_bias": False,
}


def recipes_dir() -> Path:
    return calibration_dir() / "recipes"


def load_recipe(spec: str | None, precision: str) -> Recipe:
    """A recipe by name (calibration/recipes/NAME.json) or file; default PRECISION-default."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    spec = spec or f"{precision}-default"
    path = Path(spec)
    if not (path.suffix == ".json" or os.sep in spec or "/" in spec):
        path = recipes_dir() / f"{spec}.json"
    if not path.is_file():
        known = sorted(p.stem for p in recipes_dir().glob("*.json")) if recipes_dir().is_dir() else []
        raise UserError(f"recipe {spec} not found (known: {', '.join(known) or 'none'}; or give a .json file)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"recipe {path} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"recipe {path} is not a JSON object")
    want = raw.get("precision", precision)
    if want != precision:
        raise UserError(f"recipe {path.stem} is for {want}; this run asks for --precision {precision}")
    quant = raw.get("quantizer", {})
    if not isinstance(quant, dict) or set(quant) - set(QUANTIZER_DEFAULTS):
        unknown = sorted(set(quant) - set(QUANTIZER_DEFAULTS)) if isinstance(quant, dict) else quant
        raise UserError(f"recipe {path}: unknown quantizer settings {unknown}")
    recipe = Recipe(
        name=str(raw.get("name", path.stem)), precision=precision, library=str(raw.get("library", "onnxruntime")),
        samples=raw.get("samples", 7), seed=raw.get("seed", 0), decode_steps=raw.get("decode_steps", 4),
        graphs=list(raw.get("graphs", ROLES)), quantizer=dict(quant),
        parity_tokens=(raw.get("parity") or {}).get("tokens", 16), source=str(path))
    _check_recipe(recipe, path)
    return recipe


def _check_recipe(r: Recipe, path: Path) -> None:
    def bad(msg: str) -> UserError:
        return UserError(f"recipe {path}: {msg}")

    for name in ("samples", "seed", "decode_steps", "parity_tokens"):
        value = getattr(r, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name == "samples" else 0):
            raise bad(f"{name} must be an integer >= {1 if name == 'samples' else 0}, got {value!r}")
    if r.library not in LIBRARIES:
        raise bad(f"library must be one of {', '.join(LIBRARIES)}, got {r.library!r}")
    if not r.graphs or set(r.graphs) - set(ROLES):
        raise bad(f"graphs must be a non-empty subset of {list(ROLES)}, got {r.graphs}")
    if r.q("calibration_method") not in METHODS:
        raise bad(f"calibration_method must be one of {', '.join(METHODS)} (histogram calibrators cannot "
                  f"mix prompts of different lengths), got {r.q('calibration_method')!r}")
    if r.q("routing_projections") not in ("quantize", "float"):
        raise bad(f"routing_projections must be 'quantize' or 'float', got {r.q('routing_projections')!r}")
    if not set(r.q("op_types")) <= {"MatMul", "Gemm", "Conv"}:
        raise bad(f"op_types must be among MatMul, Gemm, Conv, got {r.q('op_types')}")
    for pattern in r.q("exclude_nodes"):
        try:
            re.compile(pattern)
        except re.error as e:
            raise bad(f"exclude_nodes: {pattern!r} is not a regular expression ({e})") from None


# ---------------------------------------------------------------- calibration feeds (routing active)


class _Recorder:
    """Stands in for one of OrtArtifact's graph sessions: runs it and keeps each feed dict
    exactly as the graph receives it (names, element types)."""

    def __init__(self, graph: Any, sink: list[dict[str, np.ndarray]]) -> None:
        self.graph, self.sink = graph, sink

    def __getattr__(self, name: str) -> Any:
        return getattr(self.graph, name)

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.sink.append({n: np.ascontiguousarray(feeds[n], dtype=t) for n, t in self.graph.input_types.items()})
        return self.graph(feeds)


_GRAPH_ATTRS = {"vision": "_vision", "prefill": "_prefill", "decode": "_decode"}


@contextlib.contextmanager
def _recording(art: Any, role: str) -> Iterator[list[dict[str, np.ndarray]]]:
    attr = _GRAPH_ATTRS[role]
    original = getattr(art, attr)
    sink: list[dict[str, np.ndarray]] = []
    setattr(art, attr, _Recorder(original, sink))
    try:
        yield sink
    finally:
        setattr(art, attr, original)


def calibration_feeds(art: Any, inputs: list[Any], role: str, decode_steps: int) -> Iterator[dict[str, np.ndarray]]:
    """Feeds for one graph, produced one at a time by running the fp32 artifact with the
    runtime's own host code (so a 7B decode step's caches are held once, not per sample)."""
    limit = int(art.shapes.get("max_new_tokens", decode_steps + 1))
    steps = min(decode_steps, max(0, limit - 1))
    eos = art.manifest.get("eos_token_id")
    for x in inputs:
        with _recording(art, role) as sink:
            pre = art.prefill(x)  # vision graph + host embedding + routed prefill
        yield from sink
        if role != "decode":
            continue
        logits, kv = pre["logits"], pre["kv"]
        for step in range(steps):
            token = int(np.argmax(logits))
            if token == eos and step:  # as generate() stops; the first step always runs, so
                break                  # the decode graph sees every sample
            with _recording(art, "decode") as sink:
                logits, kv = art.decode_step(token, pre["next_position"] + step, kv)
            yield from sink


# ---------------------------------------------------------------- what to quantize


def _constants(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in graph.initializer}
    names |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return names


def _weight_input(node: onnx.NodeProto, constants: set[str]) -> bool:
    return len(node.input) > 1 and node.input[1] in constants


def _name_nodes(model: onnx.ModelProto) -> None:
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
    lm_head: set[str] = set()
    if role in ("prefill", "decode") and recipe.q("exclude_lm_head"):
        lm_head = _upstream_quantizable(g, [C.LOGITS], {"MatMul", "Gemm"}, constants)
    routing: set[str] = set()
    if recipe.q("routing_projections") == "float":
        scores = [n.input[0] for n in g.node if n.domain == onnx_ops.DOMAIN and n.op_type == "SelectVisual"]
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


# ---------------------------------------------------------------- quantizers


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over a feed iterator (imported lazily)."""

    def __init__(self, feeds: Iterator[dict[str, np.ndarray]]) -> None:
        self.feeds, self.count = feeds, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        item = next(self.feeds, None)
        self.count += item is not None
        return item

    def __iter__(self) -> "_Reader":  # the rest of the CalibrationDataReader protocol
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


class _ListReader(_Reader):
    """A rewindable reader over materialized feeds (ModelOpt reads the data more than once)."""

    def __init__(self, feeds: Iterator[dict[str, np.ndarray]]) -> None:
        self.items = list(feeds)
        super().__init__(iter(self.items))
        self.count = len(self.items)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)

    def get_first(self) -> dict[str, np.ndarray]:
        return self.items[0]

    def rewind(self) -> None:
        self.feeds = iter(self.items)


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
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


def _large(model: onnx.ModelProto) -> bool:
    try:
        return model.ByteSize() > (2 << 30) - (64 << 20)
    except Exception:  # noqa: BLE001  (protobuf cannot size > 2 GB)
        return True


def minmax_ranges(model_path: Path, reader: _Reader, op_types: list[str], tmp: Path, large: bool) -> Any:
    """Activation ranges (ONNX Runtime's MinMax calibrator), merged one feed at a time so
    that memory holds one step's activations, not every sample's (its own
    CalibMaxIntermediateOutputs option drops data instead of merging it in 1.32)."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    calibrator = create_calibrator(model_path, op_types, augmented_model_path=str(tmp / "augmented.onnx"),
                                   calibrate_method=CalibrationMethod.MinMax, use_external_data_format=large,
                                   providers=["CPUExecutionProvider"])
    for feed in reader:
        calibrator.collect_data(_Reader(iter([feed])))  # collects, then merges into the running range
    if reader.count == 0:
        raise UserError("no calibration feeds were produced (empty calibration set?)")
    return calibrator.compute_data()


def external_files(model_path: Path) -> list[str]:
    """The external-data files (relative names) a graph's initializers point to."""
    import onnx

    proto = onnx.load(model_path, load_external_data=False)
    return sorted({e.value for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                   for e in t.external_data if e.key == "location"})


def quantize_onnxruntime(model_path: Path, reader: _Reader, nodes: list[str], recipe: Recipe, out: Path,
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
    with _quiet_root_logger():
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


def quantize_modelopt(model: onnx.ModelProto, reader: _Reader, excluded: list[str], recipe: Recipe,
                      out: Path, tmp: Path) -> None:
    """NVIDIA ModelOpt's ONNX PTQ on the same feeds and exclusions (where it is installed)."""
    try:
        from modelopt.onnx.quantization import quantize as mo_quantize
    except ImportError:
        raise UserError("recipe asks for library modelopt, which is not installed here "
                        "(pip install 'nvidia-modelopt[onnx]' on a GPU host; it pins its own onnx/onnxruntime)"
                        ) from None
    inlined = onnx_ops.inline_functions(model)  # ModelOpt sends custom-domain ops to TensorRT's EP
    src = tmp / "modelopt-input.onnx"
    onnx.save_model(inlined, src, save_as_external_data=_large(inlined))
    mo_quantize(
        onnx_path=str(src), quantize_mode=recipe.precision, calibration_data_reader=_ListReader(reader),
        calibration_method="max", calibration_eps=["cpu"], op_types_to_quantize=list(recipe.q("op_types")),
        nodes_to_exclude=[f"^{re.escape(n)}$" for n in excluded], output_path=str(out),
        high_precision_dtype="fp32", disable_mha_qdq=not recipe.q("activation_matmuls"),
        use_external_data_format=_large(inlined),
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


# ---------------------------------------------------------------- int8 QDQ -> fp8 QDQ


def _fp8_tensor(name: str, values: np.ndarray) -> onnx.TensorProto:
    import ml_dtypes

    q = np.asarray(values, dtype=np.float32).astype(ml_dtypes.float8_e4m3fn)  # round to nearest even, saturating
    return onnx.helper.make_tensor(name, onnx.TensorProto.FLOAT8E4M3FN, list(q.shape), q.view(np.uint8).tobytes(),
                                   raw=True)


def _set_opset(model: onnx.ModelProto, version: int) -> None:
    """Opset 18 -> 19 changes nothing the exported graphs rely on (19 adds types and
    attributes with defaults); local function bodies declare the same version."""
    for imports in [model.opset_import, *(f.opset_import for f in model.functions)]:
        for o in imports:
            if o.domain in ("", "ai.onnx"):
                o.version = max(o.version, version)


def int8_qdq_to_fp8(qmodel: onnx.ModelProto, source: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite symmetric int8 Q/DQ into FLOAT8E4M3FN Q/DQ with scale = amax / 448.

    Activations: amax = int8 scale * 127 (the calibrated max). Weights: re-quantized from
    the fp32 initializer of `source`, amax per channel along the DequantizeLinear axis.
    """
    from onnx import numpy_helper

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
    _set_opset(qmodel, FP8_OPSET)
    qmodel.ir_version = FP8_IR
    return qmodel


# ---------------------------------------------------------------- parity (ONNX Runtime, CPU)


def _vision_capture(art: Any, sink: list[np.ndarray]) -> Callable[[], None]:
    original = art._vision

    class _Capture:
        def __getattr__(self, name: str) -> Any:
            return getattr(original, name)

        def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            out = original(feeds)
            sink.append(np.asarray(out[C.IMAGE_FEATURES], dtype=np.float32))
            return out

    art._vision = _Capture()

    def restore() -> None:
        art._vision = original

    return restore


def _traced(art: Any, inputs: Any, tokens: int) -> tuple[Any, np.ndarray]:
    feats: list[np.ndarray] = []
    restore = _vision_capture(art, feats)
    try:
        result = art.trace(inputs, tokens)
    finally:
        restore()
    return result, feats[0]


def parity_report(fp32: Path, quantized: Path, precision: str, tokens: int,
                  pairs: list[tuple[Path, str]] | None = None) -> dict[str, Any]:
    """Quantized vs fp32 artifact, both through ONNX Runtime on CPU, on the shipped samples."""
    from .check.compare import compare, failures
    from .check.tolerances import tolerances
    from .preprocess import load_image, samples
    from .runtime import OrtArtifact

    cpu = ["CPUExecutionProvider"]
    ref_art = OrtArtifact.load(fp32, cpu, verify=False)
    try:
        q_art = OrtArtifact.load(quantized, cpu, verify=False)
    except UserError as e:
        return {"measured": False, "reason": f"ONNX Runtime (CPU) cannot load the {precision} graphs: {e}"}
    tol = tolerances(ref_art.family, precision)
    rows = []
    for path, prompt in pairs or samples():
        inputs = ref_art.prepare(load_image(path), prompt)
        ref, ref_feats = _traced(ref_art, inputs, tokens)
        try:
            got, got_feats = _traced(q_art, inputs, tokens)
        except Exception as e:  # noqa: BLE001  (ORT raises its own exception zoo at run time)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            return {"measured": False, "reason": f"ONNX Runtime (CPU) cannot run the {precision} graphs: {first}"}
        m = compare(ref, got)
        a, b = ref_feats.astype(np.float64).ravel(), got_feats.astype(np.float64).ravel()
        m["vision_cosine"] = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
        m["vision_max_abs"] = float(np.abs(a - b).max())
        rows.append({"input": Path(path).name, "prompt": prompt, "metrics": m, "failures": failures(m, tol),
                     "fp32_ids": ref.generated_ids, "quantized_ids": got.generated_ids})
    return {"measured": True, "runtime": "onnxruntime", "providers": cpu, "reference": "fp32 artifact (ONNX Runtime)",
            "tokens": tokens, "tolerances": tol, **_summary(rows, ref_art.plan),
            "passed": not any(r["failures"] for r in rows),
            "failures": [f"{r['input']}: {f}" for r in rows for f in r["failures"]], "inputs": rows}


def _summary(rows: list[dict[str, Any]], plan: Any) -> dict[str, Any]:
    ms = [r["metrics"] for r in rows]
    stages = []
    for i, stage in enumerate(plan.stages):
        per = [m["stages"][i] for m in ms]
        stages.append({"layer": stage.layer, "keep": stage.keep,
                       "overlap_mean": float(np.mean([s["overlap"] for s in per])),
                       "overlap_min": float(np.min([s["overlap"] for s in per])),
                       "exact": float(np.mean([s["exact"] for s in per]))})
    return {
        "stages": stages,
        "decision_overlap_min": min((s["overlap_min"] for s in stages), default=1.0),
        "decision_exact": float(np.mean([m["decision_exact"] for m in ms])),
        "logits_cosine_mean": float(np.mean([m["logits_cosine"] for m in ms])),
        "logits_cosine_min": float(np.min([m["logits_cosine"] for m in ms])),
        "top1_agree": float(np.mean([m["top1_agree"] for m in ms])),
        "token_agreement_mean": float(np.mean([m["token_agreement"] for m in ms])),
        "token_agreement_min": float(np.min([m["token_agreement"] for m in ms])),
        "vision_cosine_min": float(np.min([m["vision_cosine"] for m in ms])),
    }


# ---------------------------------------------------------------- the command


def _library_version(library: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    name = {"onnxruntime": "onnxruntime", "modelopt": "nvidia-modelopt"}[library]
    try:
        return version(name)
    except PackageNotFoundError:
        import onnxruntime

        return onnxruntime.__version__ if library == "onnxruntime" else "unknown"


def _check_paths(src: Path, out: Path, force: bool) -> None:
    """Fail before any work; ArtifactWriter checks the output again (and what --force may replace)."""
    if not src.is_dir():
        raise UserError(f"artifact folder not found: {src}")
    s, o = src.resolve(), out.resolve()
    if s == o or s in o.parents or o in s.parents:
        raise UserError(f"--output {out} must be outside the fp32 artifact {src} (and not contain it)")
    if (out.exists() or out.is_symlink()) and not force:
        raise UserError(f"output folder {out} exists; pass --force to replace it")


def _pick(samples: list[CalibrationSample], recipe: Recipe) -> list[CalibrationSample]:
    if recipe.samples > len(samples):
        raise UserError(f"recipe {recipe.name} asks for {recipe.samples} samples; "
                        f"the calibration set has {len(samples)}")
    order = np.random.default_rng(recipe.seed).permutation(len(samples))[: recipe.samples]
    return [samples[int(i)] for i in order]


def calibrate(artifact_dir: str | Path, output_dir: str | Path, precision: str = "int8",
              recipe: str | None = None, force: bool = False, quiet: bool = False,
              library: str | None = None, calibration_set: str | Path | None = None) -> dict[str, Any]:
    """Quantize the fp32 artifact at `artifact_dir` into `output_dir`; returns its manifest.

    Never raises for a parity failure (see manifest["calibration_parity"]["passed"] and
    ["measured"]); raises UserError for inputs it cannot use.
    """
    from .preprocess import load_image
    from .runtime import OrtArtifact

    src, out = Path(artifact_dir), Path(output_dir)
    rec = load_recipe(recipe, precision)
    if library is not None:
        if library not in LIBRARIES:
            raise UserError(f"unknown library {library!r}; use one of {', '.join(LIBRARIES)}")
        rec.library = library
    _check_paths(src, out, force)
    steps = Steps(3 + len(rec.graphs), quiet=quiet, title="calibrate")
    try:
        with steps.step("load the fp32 artifact and the calibration set"):
            manifest = read_manifest(src)  # every file re-hashed
            if manifest.get("precision") != "fp32":
                raise UserError(f"calibrate takes an fp32 artifact; {src} is {manifest.get('precision')}")
            art = OrtArtifact.load(src, ["CPUExecutionProvider"], verify=False)
            set_dir = Path(calibration_set) if calibration_set is not None else calibration_dir()
            chosen = _pick(load_calibration_set(set_dir), rec)
            inputs = [art.prepare(load_image(s.image), s.prompt) for s in chosen]
        graphs = {**{r: n for r, n in zip(ROLES, (C.VISION, C.PREFILL, C.DECODE))}, **manifest.get("graphs", {})}
        with ArtifactWriter(out, force=force) as w, tempfile.TemporaryDirectory(prefix="reroute-calib-") as tmp:
            quant: dict[str, Any] = {}
            for role in ROLES:
                if role not in rec.graphs:  # kept fp32, external weights too
                    for name in (graphs[role], *external_files(src / graphs[role])):
                        if (src / name).is_file() and not (w.path / name).exists():
                            shutil.copy2(src / name, w.path / name)
                    quant[role] = {"quantized": False}
                    continue
                with steps.step(f"{role} graph: calibrate (routing active) and quantize ({rec.library}, {precision})"):
                    quant[role] = _quantize_graph(src / graphs[role], w.path / graphs[role], role, art, inputs, rec,
                                                  Path(tmp))
            with steps.step("embeddings, preprocessor, manifest"):
                shutil.copy2(src / C.EMBEDDINGS, w.path / C.EMBEDDINGS)
                shutil.copytree(src / C.PREPROCESSOR, w.path / C.PREPROCESSOR)
                new = _manifest(manifest, src, rec, chosen, quant, set_dir)
                w.write_manifest(new)  # the runtime reads it during the parity run
            with steps.step("parity: quantized vs fp32 (ONNX Runtime, CPU)"):
                new["calibration_parity"] = parity_report(src, w.path, precision, rec.parity_tokens)
            w.write_manifest(new)
    finally:
        steps.close()
    return new


def _quantize_graph(src: Path, dst: Path, role: str, art: Any, inputs: list[Any], rec: Recipe,
                    tmp: Path) -> dict[str, Any]:
    from .export.decoder import save

    model = onnx.load(src)
    _name_nodes(model)
    nodes, excluded = select_nodes(model, role, rec)
    reader = _Reader(calibration_feeds(art, inputs, role, rec.decode_steps))
    staged = tmp / f"{role}.quant.onnx"
    if rec.library == "modelopt":
        quantize_modelopt(model, reader, [e["node"] for e in excluded], rec, staged, tmp)
    else:
        named = tmp / f"{role}.fp32.onnx"  # node names made unique: how the quantizer is told what to touch
        save(model, named)
        quantize_onnxruntime(named, reader, nodes, rec, staged, tmp)
    q = onnx.load(staged)
    rewired = restore_float_consumers(q, nodes) if rec.library == "onnxruntime" else 0
    if rec.precision == "fp8" and rec.library == "onnxruntime":
        q = int8_qdq_to_fp8(q, model)
    else:  # the lowest IR that carries the graph's opset (ModelOpt writes IR 10)
        opset = next(o.version for o in q.opset_import if o.domain in ("", "ai.onnx"))
        q.ir_version = min(q.ir_version, C.IR_VERSION if opset <= C.OPSET else FP8_IR)
    done = quantized_nodes(q, set(rec.q("op_types")))
    if rec.library == "modelopt":  # it may leave more float than asked: report what it did
        ours = {e["node"] for e in excluded}
        excluded += [{"node": node.name, "module": module_path(node), "op_type": node.op_type,
                      "reason": "left float by modelopt"}
                     for node in model.graph.node
                     if node.name in set(nodes) and node.name not in done and node.name not in ours]
    try:
        onnx.checker.check_model(q, full_check=not _large(q))
    except Exception as e:  # noqa: BLE001  (checker and shape-inference errors)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"the quantized {role} graph fails onnx.checker ({first}); nothing was written") from None
    save(q, dst)
    counts = {op: sum(n.op_type == op for n in q.graph.node) for op in ("QuantizeLinear", "DequantizeLinear")}
    return {"quantized": True, "feeds": reader.count, "quantized_nodes": len(done), "nodes": sorted(done),
            "excluded_nodes": excluded, "kept_float_routing": kept_float(q), "float_inputs_restored": rewired, **counts,
            "opset": next(o.version for o in q.opset_import if o.domain in ("", "ai.onnx")),
            "ir_version": q.ir_version}


def _manifest(src_manifest: dict[str, Any], src: Path, rec: Recipe, chosen: list[CalibrationSample],
              quant: dict[str, Any], set_dir: Path) -> dict[str, Any]:
    from .export.pipeline import versions

    new = copy.deepcopy(src_manifest)
    for key in ("files", "check", "trt", "format"):
        new.pop(key, None)  # the fp32 check and TensorRT plan describe the fp32 graphs
    opsets = {v["opset"] for v in quant.values() if v.get("quantized")}
    new.update({
        "precision": rec.precision,
        "opset": max(opsets | {int(src_manifest.get("opset", C.OPSET))}),
        "ir_version": max([v["ir_version"] for v in quant.values() if v.get("quantized")]
                          + [int(src_manifest.get("ir_version", C.IR_VERSION))]),
        "quantization": {
            "library": rec.library, "version": _library_version(rec.library),
            "format": "QDQ", "precision": rec.precision,
            "scheme": ("int8 symmetric, per-channel weights, per-tensor activations" if rec.precision == "int8" else
                       "FLOAT8E4M3FN, scale = amax / 448, per-channel weights, per-tensor activations"),
            "recipe": rec.to_dict(),
            "calibration": {
                "set": str(set_dir),
                "samples": [{"file": s.entry["file"], "prompt": s.prompt, "licence": s.entry["licence"],
                             "sha256": s.entry["sha256"]} for s in chosen],
                "routing_active": True,
                "feeds": {role: v.get("feeds", 0) for role, v in quant.items()},
            },
            "graphs": {role: {k: v for k, v in q.items() if k != "nodes"} for role, q in quant.items()},
            "source_artifact": {"path": str(src), "model": src_manifest.get("model"),
                                "precision": src_manifest.get("precision"),
                                "manifest_sha256": sha256_file(src / C.MANIFEST)},
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        },
        "versions": {**src_manifest.get("versions", {}), **versions()},
    })
    if rec.library == "modelopt":
        new["inline_functions"] = True  # ModelOpt quantizes the inlined graphs
    return new


# ---------------------------------------------------------------- CLI


def register_cli(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("calibrate", help="quantize an fp32 artifact to an INT8/FP8 QDQ artifact (routing active "
                                         "while calibrating) with a parity report against fp32")
    p.add_argument("--artifact", required=True, help="fp32 artifact folder (from `export`)")
    p.add_argument("--precision", required=True, choices=list(PRECISIONS))
    p.add_argument("--output", required=True, help="artifact folder to write (refused if it exists, unless --force)")
    p.add_argument("--recipe", help="recipe name in calibration/recipes (default: PRECISION-default) or a .json file")
    p.add_argument("--library", choices=list(LIBRARIES), help="override the recipe's quantization library")
    p.add_argument("--calibration-set", help=f"calibration set folder (default: ${CALIBRATION_ENV} or calibration/)")
    p.add_argument("--force", action="store_true", help="replace an existing artifact folder")
    p.add_argument("--json", metavar="OUT", help="write the new manifest as JSON to OUT ('-' for stdout)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(func=cmd_calibrate)
    return p


def cmd_calibrate(args: argparse.Namespace) -> int:
    quiet = args.quiet or args.json == "-"
    manifest = calibrate(args.artifact, args.output, args.precision, recipe=args.recipe, force=args.force,
                         quiet=quiet, library=getattr(args, "library", None),
                         calibration_set=getattr(args, "calibration_set", None))
    if args.json:
        from .cli import emit_json

        emit_json(args.json, manifest)
    parity = manifest["calibration_parity"]
    if not quiet:
        print_summary(manifest, args.output)
    if not parity.get("measured"):
        import sys

        print(f"reroute-export: calibrate: wrote {shown_dir(args.output)} but could not measure its parity: {parity['reason']}",
              file=sys.stderr)
        return 1
    return 0 if parity["passed"] else 1


def print_summary(manifest: dict[str, Any], output: str | Path) -> None:
    q = manifest["quantization"]
    n = sum(g.get("quantized_nodes", 0) for g in q["graphs"].values())
    print(f"wrote {shown_dir(output)} ({manifest['model']}, {manifest['precision']} QDQ via {q['library']} {q['version']}, "
          f"{n} MatMul/Gemm quantized, {len(q['calibration']['samples'])} calibration samples, routing active)")
    p = manifest["calibration_parity"]
    if not p.get("measured"):
        print(f"parity vs fp32: not measured ({p['reason']})")
        return
    stages = " ".join(f"{s['layer']}:{s['overlap_mean']:.2f}" for s in p["stages"]) or "-"
    print(f"parity vs fp32 (ONNX Runtime, CPU, {len(p['inputs'])} samples, {p['tokens']} tokens): "
          f"routing overlap per stage {stages}; logits cosine {p['logits_cosine_mean']:.4f} "
          f"(min {p['logits_cosine_min']:.4f}); token agreement {p['token_agreement_mean']:.2f}; "
          f"vision cosine {p['vision_cosine_min']:.4f}")
    print("calibration parity: " + ("passed" if p["passed"] else "FAILED: " + "; ".join(p["failures"])))
