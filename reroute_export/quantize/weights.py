"""`quantize`: weight-only INT4/INT8 of an fp32 (or fp16) artifact; activations stay float.

    reroute-export quantize --artifact A --weights int4|int8 [--method rtn|awq|modelopt-awq] [--block 32|64|128]
        [--encoding matmulnbits|qdq] --output B [--force] [--json OUT] [--quiet] [--calibration-set DIR]

What is quantized
    Every decoder Linear: a MatMul of a segment.s or head.j graph whose weight (K, N) is an
    initializer, block-wise along K with symmetric codes and one scale per (block, column)
    (encodings.py says why symmetric). `--method awq` first scales each group of Linears'
    input channels by activation statistics recorded with routing active (awq.py).
    `--method modelopt-awq` hands the same Linears and the same recorded feeds to NVIDIA
    ModelOpt's INT4 awq_lite instead (modelopt_int4.py; the `modelopt` extra), written as
    ModelOpt writes them: blocked DequantizeLinear-21 + MatMul (`--encoding qdq`), which ONNX
    Runtime fuses into MatMulNBits at load. Unlike RTN/AWQ it loads each graph's weights
    whole (ModelOpt rewrites them in memory). bench-llava, fp32 ort-gqa -> int4 block 128
    qdq, 3 sample photos, vs fp32 (routing overlap per stage; last-logits cosine; quantize
    wall time and peak RSS; decode ms/token p50 at 2 threads, round-robin in one run with
    fp32 at 50.4 and the MatMulNBits RTN artifact at 15.4):
        rtn           0.57/0.45/0.23/0.15  0.588  16.5 s  1.30 GB  16.3 ms
        awq           0.59/0.49/0.30/0.15  0.630  34.9 s  1.88 GB  17.4 ms
        modelopt-awq  0.61/0.49/0.25/0.13  0.628  65.5 s  1.98 GB  16.4 ms

What stays float, and why (each op's reason is in the manifest)
    - The LM head (the last segment's MatMul/Gemm making `logits`): the greedy token is its
      argmax, so it is where rounding shows first, and it is one matrix (V x D, 2-4% of a 7B).
    - route.j graphs: weight-free (scoring, TopK, gathers), copied byte for byte.
    - head.j's q_proj and k_proj feed route.j's scores, q.k over every visual token, whose
      TopK picks the kept set. By default (`routing_projections="int8"`) they are quantized
      at 8 bits whatever `--weights` says: their rounding error is 1/18 of int4's (codes in
      [-127, 127] against [-7, 7], same blocks), so the decision barely depends on rounded
      weights of its own layer, while decode, which also reads them (layer d_j's attention),
      no longer reads them float. "float" keeps them float, "quantize" gives them the recipe's
      bits. Measured on bench-llava (fp32 -> int4 RTN, block 128, MatMulNBits, ort-gqa,
      3 sample photos, routing overlap per stage vs fp32; weights of all graphs; decode
      ms/token at 2 threads, the four artifacts round-robin in one run, fp32 41.0):
        float     0.57/0.45/0.25/0.17   89.9 MiB   15.95 ms
        int8      0.57/0.45/0.23/0.15   66.2 MiB   14.56 ms
        quantize  0.56/0.44/0.23/0.09   62.2 MiB   13.87 ms
      (random weights: overlap is low at every setting; the last, smallest stage is where
      int4 projections show.) Earlier, on tiny-llava (int4, block 32, RTN): float
      0.91/0.85/0.68/0.44, quantize 0.89/0.85/0.67/0.33. On the 8-layer bench model 4 of 8
      layers decide, so their float q/k were 40% of the int4 decoder's bytes (at 7B, 4 of
      32 layers). v_proj is quantized like any other Linear. `ROUTING_PROJECTIONS` holds the
      default.
    - The vision graph: it runs once per image (prefill only), where weight-only
      quantization saves no time (compute-bound, not the decode's weight reads), holds ~4%
      of a 7B's weights, and its features are what every routing score of the image is
      computed from. Copied byte for byte (re-written only when it points into a shared
      weights.data of a streamed export, so that only its own tensors are copied).
    - Norm weights, biases, rotary tables and the token embeddings (embed_tokens.npy, a
      host-side gather, no MatMul), attention's activation x activation MatMuls.

Streaming
    No graph is loaded with its weights: each initializer is read from external data
    through a numpy memmap (location, offset and length from its external_data), quantized a
    few MiB at a time along its encoding's leading axis (encodings.Spec.chunks) and appended
    to the output graph's `<graph>.onnx.data`; float tensors are copied in 16 MiB pieces.

Output: a complete artifact (ArtifactWriter) whose manifest records `precision`
(int4-weight / int8-weight), the opset and IR the encoding needs (qdq: opset 21, IR 10;
matmulnbits: opset 18 + com.microsoft), `quantization` (recipe, per-graph quantized and
kept-float ops with reasons, weight bytes before and after) and `calibration_parity`
(report.py: quantized vs source artifact, ONNX Runtime on CPU, judged with the int8 bounds).
Exit codes as `calibrate`: 0 passed, 1 written but parity failed or unmeasured, 2 bad input.
"""

from __future__ import annotations

import copy
import datetime as dt
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .. import contract as C
from ..errors import UserError
from ..export.artifact import ArtifactWriter, read_manifest, sha256_file
from ..progress import Steps
from . import awq, modelopt_int4
from .encodings import BITS, BLOCKS, ENCODINGS, MS_DOMAIN, QDQ_IR, QDQ_OPSET, Spec, quantized_nodes, raise_to_qdq_opset
from .recipes import FLOAT_KINDS, kind
from .report import parity_report
from .run import _check_paths
from .select import _constants, _upstream_quantizable, module_path, name_nodes

WEIGHTS = tuple(BITS)
METHODS = ("rtn", "awq", "modelopt-awq")
DEFAULT_ENCODING = {"rtn": "matmulnbits", "awq": "matmulnbits", "modelopt-awq": "qdq"}  # ModelOpt writes DQ + MatMul
PRECISION = {w: f"{w}-weight" for w in WEIGHTS}
SOURCE_PRECISIONS = ("fp32", "fp16")
ROUTING_PROJECTIONS = "int8"  # head.j q/k: see the module docstring for the measurement
ROUTING_CHOICES = ("float", "int8", "quantize")
ROUTING_BITS = 8  # routing_projections="int8": head.j's q/k at 8 bits whatever --weights says
JUDGED_AS = "int8"  # parity bounds: routing overlap >= 0.7, logits cosine >= 0.9
PARITY_TOKENS = 16
QUANTIZED_KINDS = ("segment", "head")
FLOAT_GRAPHS = {
    "vision": "vision graph: runs once per image (prefill only, compute-bound), ~4% of a 7B's weights, "
              "and its features are what every routing score is computed from",
    **FLOAT_KINDS,
}
REASONS = {
    "lm_head": "LM head (logits): the greedy token is its argmax; one matrix",
    "routing": "projection feeding the routing scores (route.j's q.k TopK)",
    "attention": "activation x activation (attention): no weight",
    "gemm": "Gemm with a weight: only MatMul weights are rewritten",
    "shared": "its weight is read by other nodes too",
    "shape": "weight is not a 2-D float initializer",
    "modelopt": "left float by ModelOpt (it did not quantize this MatMul)",
}
_COPY = 16 << 20  # bytes per read when copying float tensors


@dataclass(frozen=True)
class Linear:
    """A MatMul to quantize: x (.., K) @ weight (K, N)."""

    node: str
    module: str
    weight: str
    input: str
    k: int
    n: int
    float_type: int
    bits: int = 0  # 0: the recipe's; else this Linear's own (routing projections at "int8")
    reason: str = ""  # why its bits differ from the recipe's


# ---------------------------------------------------------------- what to quantize


def plan_graph(model: onnx.ModelProto, role: str, routing_projections: str = ROUTING_PROJECTIONS
               ) -> tuple[list[Linear], list[dict[str, str]]]:
    """(the Linears to quantize, [{node, module, op_type, reason}] of the MatMul/Gemm left float)."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consts = _constants(g)
    float_ops = {"MatMul", "Gemm"}
    lm_head = _upstream_quantizable(g, [C.LOGITS], float_ops, consts) if C.LOGITS in {o.name for o in g.output} else set()
    routing = set()
    if kind(role) == "head" and routing_projections != "quantize":
        routing = _upstream_quantizable(g, [C.QUERY, C.KEY], float_ops, consts)
    own_bits = ROUTING_BITS if routing_projections == "int8" else 0
    readers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    linears, kept = [], []
    for n in g.node:
        if n.op_type not in float_ops or n.domain not in ("", "ai.onnx"):
            continue
        w = inits.get(n.input[1]) if len(n.input) > 1 else None
        reason = _kept_reason(n, w, n.input[1] in consts, lm_head, routing, readers)
        if reason == "routing" and own_bits and _kept_reason(n, w, True, set(), set(), readers) is None:
            linears.append(Linear(n.name, module_path(n), w.name, n.input[0], int(w.dims[0]), int(w.dims[1]),
                                  w.data_type, own_bits, REASONS["routing"]))
        elif reason:
            kept.append({"node": n.name, "module": module_path(n), "op_type": n.op_type, "reason": REASONS[reason]})
        else:
            linears.append(Linear(n.name, module_path(n), w.name, n.input[0], int(w.dims[0]), int(w.dims[1]),
                                  w.data_type))
    return linears, kept


def _kept_reason(n: onnx.NodeProto, w: TensorProto | None, constant: bool, lm_head: set[str], routing: set[str],
                 readers: dict[str, int]) -> str | None:
    if not constant:
        return "attention"
    if n.name in lm_head:
        return "lm_head"
    if n.name in routing:
        return "routing"
    if n.op_type == "Gemm":
        return "gemm"
    if w is None or len(w.dims) != 2 or w.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
        return "shape"
    return "shared" if readers.get(w.name, 0) > 1 else None


# ---------------------------------------------------------------- reading and writing tensors


def _external(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def read_array(folder: Path, t: TensorProto) -> np.ndarray:
    """An initializer's value: a read-only memmap of its external data (nothing loaded), or
    the proto's own bytes."""
    if t.data_location != TensorProto.EXTERNAL:
        return numpy_helper.to_array(t)
    e = _external(t)
    dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
    shape = tuple(int(d) for d in t.dims)
    return np.memmap(folder / e["location"], dtype=dtype, mode="r", offset=int(e.get("offset", 0)), shape=shape)


def _empty(name: str, elem_type: int, dims: list[int]) -> TensorProto:
    t = TensorProto()
    t.name, t.data_type = name, elem_type
    t.dims.extend(dims)
    return t


def _nbytes(t: TensorProto) -> int:
    if t.data_location == TensorProto.EXTERNAL:
        return int(_external(t)["length"])
    return len(t.raw_data) if t.raw_data else numpy_helper.to_array(t).nbytes


class DataFile:
    """`<graph>.onnx.data` being appended to; big tensors start at 64 KiB offsets (as onnx
    aligns them), so that a runtime may map them."""

    def __init__(self, path: Path) -> None:
        self.path, self.f = path, open(path, "wb")

    def begin(self, nbytes: int) -> int:
        align = 65536 if nbytes >= 1 << 20 else 64
        offset = -(-self.f.tell() // align) * align
        self.f.write(b"\0" * (offset - self.f.tell()))
        return offset

    def tensor(self, t: TensorProto, offset: int) -> TensorProto:
        """`t` (no data) pointing at [offset, now) of this file."""
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        del t.external_data[:]
        for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(self.f.tell() - offset))):
            t.external_data.add(key=key, value=value)
        return t

    def copy_from(self, folder: Path, t: TensorProto) -> TensorProto:
        e = _external(t)
        offset = self.begin(int(e["length"]))
        with open(folder / e["location"], "rb") as src:
            src.seek(int(e.get("offset", 0)))
            left = int(e["length"])
            while left:
                chunk = src.read(min(_COPY, left))
                self.f.write(chunk)
                left -= len(chunk)
        out = TensorProto()
        out.CopyFrom(t)
        return self.tensor(out, offset)

    def array(self, name: str, value: np.ndarray) -> TensorProto:
        offset = self.begin(value.nbytes)
        self.f.write(np.ascontiguousarray(value).tobytes())
        return self.tensor(_empty(name, helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape)), offset)

    def close(self) -> None:
        self.f.close()


def _write_quantized(data: DataFile, folder: Path, w: TensorProto, spec: Spec, row_scale: np.ndarray | None
                     ) -> tuple[TensorProto, TensorProto]:
    """The weight as (codes, scales) initializers in `data`, one chunk at a time."""
    src = read_array(folder, w)  # (K, N) memmap
    codes_type, codes_dims = spec.codes_tensor()
    nb = spec.encoding == "matmulnbits"
    offset, scale_parts = data.begin(-(-int(np.prod(codes_dims)) * spec.bits // 8)), []
    for lo, hi in spec.chunks():
        chunk = np.asarray(src[:, lo:hi] if nb else src[lo:hi], np.float32)  # (K, n) | (k, N)
        if row_scale is not None:  # AWQ: diag(s) W
            chunk = chunk * (row_scale[:, None] if nb else row_scale[lo:hi, None])
        codes, scales = spec.encode(chunk)
        data.f.write(codes)
        scale_parts.append(scales)
    del src  # unmap
    codes = data.tensor(_empty(f"{w.name}/codes", codes_type, codes_dims), offset)
    offset = data.begin(sum(map(len, scale_parts)))
    data.f.write(b"".join(scale_parts))
    scales = data.tensor(_empty(f"{w.name}/scales", spec.float_type, spec.scales_dims()), offset)
    return codes, scales


# ---------------------------------------------------------------- one graph


@dataclass(frozen=True)
class Options:
    bits: int
    block: int
    encoding: str


def rewrite_graph(src: Path, dst: Path, name: str, linears: list[Linear], opts: Options,
                  groups: dict[str, awq.Choice] | None = None) -> dict[str, Any]:
    """Graph `name` of artifact `src` written to `dst` with `linears` quantized (AWQ `groups`:
    input tensor -> chosen scaling) and every other initializer copied. What it wrote."""
    model = onnx.load(src / name, load_external_data=False)
    name_nodes(model)
    g = model.graph
    before = sum(_nbytes(t) for t in g.initializer)
    folds, replaced = _fold_groups(src, g, linears, groups or {})
    by_weight = {lin.weight: lin for lin in linears}
    data = DataFile(dst / f"{name}.data")
    try:
        inits, new_nodes = [], {}
        for t in list(g.initializer):
            if t.name in by_weight:
                lin = by_weight[t.name]
                spec = Spec(lin.k, lin.n, lin.bits or opts.bits, opts.block, opts.encoding, lin.float_type)
                scale = groups[lin.input].scales if groups and lin.input in groups else None
                codes, scales = _write_quantized(data, src, t, spec, scale)
                inits += [codes, scales]
                node = next(n for n in g.node if n.name == lin.node)
                new_nodes[lin.node] = quantized_nodes(spec, node, codes.name, scales.name)
            elif t.name in replaced:
                inits.append(data.array(t.name, replaced[t.name]))
            elif t.data_location == TensorProto.EXTERNAL:
                inits.append(data.copy_from(src, t))
            else:
                inits.append(t)
    finally:
        data.close()
    if data.path.stat().st_size == 0:
        data.path.unlink()
    nodes = [m for n in g.node for m in new_nodes.get(n.name, [n])]
    del g.node[:], g.initializer[:]
    g.node.extend(nodes)
    g.initializer.extend(inits)
    _set_opsets(model, opts.encoding if linears else None)
    onnx.save_model(model, dst / name)
    _check(dst / name, name)
    after = sum(_nbytes(t) for t in g.initializer)
    return {"weight_bytes_before": before, "weight_bytes_after": after, "folds": folds,
            "opset": _opset(model), "ir_version": model.ir_version}


def _fold_groups(src: Path, g: onnx.GraphProto, linears: list[Linear], groups: dict[str, awq.Choice]
                 ) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """AWQ: 1/s folded per group input (awq.fold); returns (input -> how, replaced initializers)."""
    folds, replaced = {}, {}
    for x, choice in groups.items():
        readers = [lin.node for lin in linears if lin.input == x]
        if not readers:
            continue
        float_type = next(lin.float_type for lin in linears if lin.input == x)
        how, new = awq.fold(g, x, readers, choice.scales, float_type, lambda t: np.asarray(read_array(src, t)))
        folds[x], replaced = how, {**replaced, **new}
    return folds, replaced


def _set_opsets(model: onnx.ModelProto, encoding: str | None) -> None:
    """qdq: opset 21 and IR 10 (INT4 and block_size), functions too; matmulnbits: + com.microsoft."""
    if encoding == "qdq":
        raise_to_qdq_opset(model)
    elif encoding == "matmulnbits" and MS_DOMAIN not in {o.domain for o in model.opset_import}:
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _check(path: Path, name: str) -> None:
    try:
        onnx.checker.check_model(str(path))
    except Exception as e:  # noqa: BLE001  (checker errors)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"the quantized {name} fails onnx.checker ({first}); nothing was written") from None


def copy_graph(src: Path, dst: Path, name: str) -> dict[str, Any]:
    """A float graph: byte for byte when its weights are its own `<graph>.data` (or inside it),
    else re-written with only its own tensors copied (a streamed export's shared weights.data)."""
    model = onnx.load(src / name, load_external_data=False)
    files = {_external(t)["location"] for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL}
    size = sum(_nbytes(t) for t in model.graph.initializer)
    if files - {f"{name}.data"}:
        out = rewrite_graph(src, dst, name, [], Options(0, 0, ""))
        return {"weight_bytes_before": size, "weight_bytes_after": out["weight_bytes_after"], "copied": "tensors"}
    for f in (name, *files):
        shutil.copy2(src / f, dst / f)
    return {"weight_bytes_before": size, "weight_bytes_after": size, "copied": "byte for byte",
            "opset": _opset(model), "ir_version": model.ir_version}


# ---------------------------------------------------------------- the command


def _check_args(weights: str, method: str, block: int, encoding: str) -> None:
    if weights not in WEIGHTS:
        raise UserError(f"unknown --weights {weights!r}; use one of {', '.join(WEIGHTS)}")
    if method not in METHODS:
        raise UserError(f"unknown --method {method!r}; use one of {', '.join(METHODS)}")
    if method == "modelopt-awq" and (weights != "int4" or encoding != "qdq"):
        raise UserError("--method modelopt-awq is --weights int4 --encoding qdq: ModelOpt's INT4 path writes "
                        "DequantizeLinear-21 + MatMul, which ONNX Runtime fuses into MatMulNBits at load")
    if block not in BLOCKS or isinstance(block, bool):
        raise UserError(f"--block must be one of {', '.join(map(str, BLOCKS))}, got {block!r}")
    if encoding not in ENCODINGS:
        raise UserError(f"unknown --encoding {encoding!r}; use one of {', '.join(ENCODINGS)}")
    if method == "awq" and weights != "int4":
        raise UserError("--method awq is for --weights int4 (int8 round-to-nearest is already within "
                        "1/254 of each block's max); use --method rtn")


def _source_manifest(src: Path) -> dict[str, Any]:
    manifest = read_manifest(src)  # every file re-hashed
    precision = manifest.get("precision")
    if "quantization" in manifest or precision not in SOURCE_PRECISIONS:
        raise UserError(f"quantize takes an fp32 or fp16 artifact; {src} is already quantized ({precision})")
    if C.segment(0) not in manifest.get("graphs", {}):
        raise UserError(f"artifact {src} has no segment graphs (an earlier layout); re-export it")
    return manifest


def quantize_weights(artifact: str | Path, output: str | Path, weights: str = "int4", method: str = "rtn",
                     block: int = 128, encoding: str | None = None, force: bool = False, quiet: bool = False,
                     calibration_set: str | Path | None = None, parity: bool = True,
                     routing_projections: str = ROUTING_PROJECTIONS) -> dict[str, Any]:
    """Weight-only quantize the artifact at `artifact` into `output`; returns the new manifest.

    Never raises for a parity failure (manifest["calibration_parity"]["passed"] / ["measured"]);
    raises UserError (nothing written) for inputs it cannot use. `parity=False` skips the
    parity pass (bench judges its quantized records against the fp32 ones itself).
    `routing_projections="quantize"` also quantizes head.j's q/k (module docstring). `encoding`
    None: the method's (DEFAULT_ENCODING)."""
    return _quantize(Path(artifact), Path(output), weights, method, block, encoding, force, quiet, calibration_set,
                     parity=parity, routing_projections=routing_projections)


def _quantize(src: Path, out: Path, weights: str, method: str, block: int, encoding: str | None, force: bool,
              quiet: bool, calibration_set: str | Path | None, *, parity: bool = True,
              routing_projections: str = ROUTING_PROJECTIONS) -> dict[str, Any]:
    encoding = encoding or DEFAULT_ENCODING.get(method, "matmulnbits")
    _check_args(weights, method, block, encoding)
    if routing_projections not in ROUTING_CHOICES:
        raise UserError(f"unknown routing projections {routing_projections!r}; known: {', '.join(ROUTING_CHOICES)}")
    _check_paths(src, out, force)
    if method == "modelopt-awq":
        modelopt_int4.check_installed()
    recipe = awq.load_awq_recipe() if method != "rtn" else None
    opts = Options(BITS[weights], block, encoding)
    steps = Steps(4 + (method != "rtn"), quiet=quiet, title="quantize")
    try:
        with steps.step("read the source artifact"):
            manifest = _source_manifest(src)
            plans = _plans(src, manifest["graphs"], routing_projections)
        with ArtifactWriter(out, force=force) as w, tempfile.TemporaryDirectory(prefix="reroute-quant-") as tmp:
            groups: dict[str, dict[str, awq.Choice]] = {}
            store = None
            if recipe is not None:
                with steps.step(f"AWQ: record activations with routing active ({recipe.samples} samples)"):
                    art, store = _record(src, plans, recipe, calibration_set, Path(tmp))
                    if method == "awq":
                        groups = _awq_groups(src, art, store, plans, recipe, opts)
            with steps.step(f"quantize weights ({weights}, {method}, block {block}, {encoding})"):
                graphs = _write_graphs(src, w.path, manifest["graphs"], plans, opts, groups,
                                       store if method == "modelopt-awq" else None)
            with steps.step("embeddings, preprocessor, manifest"):
                shutil.copy2(src / C.EMBEDDINGS, w.path / C.EMBEDDINGS)
                shutil.copytree(src / C.PREPROCESSOR, w.path / C.PREPROCESSOR)
                new = _manifest(manifest, src, weights, method, block, encoding, graphs, recipe, groups,
                                routing_projections)
                w.write_manifest(new)
            with steps.step("parity: quantized vs source (ONNX Runtime, CPU)"):
                why = "not asked for (--no-parity, or parity=False)" if not parity else _parity_memory(new)
                new["calibration_parity"] = (parity_report(src, w.path, PRECISION[weights], PARITY_TOKENS,
                                                           judged_as=JUDGED_AS) if why is None else
                                             {"measured": False, "reason": why})
            w.write_manifest(new)
    finally:
        steps.close()
    return new


PARITY_MEMORY = 1.3  # parity's peak RSS / (source + quantized weight bytes): 22.6 GB for a 7B fp16 -> int4


def _parity_memory(manifest: dict[str, Any]) -> str | None:
    """None when both artifacts' ONNX Runtime sessions fit in the available memory, else why not."""
    from ..checkpoint_files import available_bytes

    b = manifest["quantization"]["weight_bytes"]
    need = PARITY_MEMORY * (b["before"] + b["after"])
    avail = available_bytes()
    if avail is None or need <= avail:
        return None
    return (f"skipped: parity needs ~{need / 2**30:.1f} GiB (the source's and the quantized artifact's ONNX "
            f"Runtime sessions side by side), {avail / 2**30:.1f} GiB available; run `reroute-export parity "
            f"--artifact DIR` on a machine with more memory")


def _plans(src: Path, graphs: dict[str, str], routing_projections: str
           ) -> dict[str, tuple[list[Linear], list[dict[str, str]]]]:
    plans = {}
    for role, name in graphs.items():
        if kind(role) in QUANTIZED_KINDS:
            model = onnx.load(src / name, load_external_data=False)
            name_nodes(model)
            plans[role] = plan_graph(model, role, routing_projections)
    return plans


def _write_graphs(src: Path, dst: Path, graphs: dict[str, str], plans: dict[str, Any], opts: Options,
                  groups: dict[str, dict[str, awq.Choice]], modelopt_feeds: Any = None) -> dict[str, Any]:
    """Each graph quantized (by ModelOpt, when `modelopt_feeds` is its FeedStore) or copied."""
    out: dict[str, Any] = {}
    for role, name in graphs.items():
        if role not in plans:
            out[role] = {"quantized": False, "reason": FLOAT_GRAPHS.get(kind(role), "not a decoder graph"),
                         **copy_graph(src, dst, name)}
            continue
        linears, kept = plans[role]
        if modelopt_feeds is not None and linears:
            wrote = modelopt_int4.quantize_graph(
                src, name, linears, modelopt_feeds.feeds(role), opts.block,
                lambda folder, own_bits: {**rewrite_graph(folder, dst, name, own_bits, Options(0, opts.block, "qdq")),
                                          "weight_bytes_before": _graph_bytes(src, name)})
            left = set(wrote["modelopt"]["left_float"])
            kept = kept + [{"node": lin.node, "module": lin.module, "op_type": "MatMul", "reason": REASONS["modelopt"]}
                           for lin in linears if lin.node in left]
            linears = [lin for lin in linears if lin.node not in left]
        else:
            wrote = rewrite_graph(src, dst, name, linears, opts, groups.get(role))
        out[role] = {"quantized": bool(linears), **wrote,
                     "nodes": [{"node": lin.node, "module": lin.module, "K": lin.k, "N": lin.n,
                                **({"bits": lin.bits, "reason": lin.reason} if lin.bits else {}),
                                **({"awq": groups[role][lin.input].record()} if lin.input in groups.get(role, {}) else {})}
                               for lin in linears],
                     "kept_float": kept}
    return out


def _record(src: Path, plans: dict[str, Any], recipe: awq.AwqRecipe, calibration_set: str | Path | None,
            tmp: Path) -> tuple[Any, Any]:
    """(the source artifact, the FeedStore of every graph to quantize), recorded with routing active."""
    from ..runtime import OrtArtifact
    from .calibration_set import calibration_dir, load_calibration_set, pick
    from .feeds import FeedStore, record_feeds
    from .run import _calibration_inputs

    art = OrtArtifact.load(src, ["CPUExecutionProvider"], verify=False)
    chosen = pick(load_calibration_set(Path(calibration_set) if calibration_set else calibration_dir()), recipe)
    roles = [r for r, (linears, _) in plans.items() if linears]
    store = FeedStore(tmp / "feeds")
    record_feeds(art, _calibration_inputs(art, chosen), roles, recipe.decode_steps, store)
    return art, store


def _graph_bytes(folder: Path, name: str) -> int:
    return sum(_nbytes(t) for t in onnx.load(folder / name, load_external_data=False).graph.initializer)


def _awq_groups(src: Path, art: Any, store: Any, plans: dict[str, Any], recipe: awq.AwqRecipe, opts: Options
                ) -> dict[str, dict[str, awq.Choice]]:
    """Per role, per group input: the AWQ scaling chosen on activations recorded with routing active."""
    roles = [r for r, (linears, _) in plans.items() if linears]
    out: dict[str, dict[str, awq.Choice]] = {}
    rng = np.random.default_rng(recipe.seed)
    for role in roles:
        linears = plans[role][0]
        inputs = sorted({lin.input for lin in linears})
        stats = awq.collect(src / art.manifest["graphs"][role], inputs, store.feeds(role), recipe.rows, recipe.seed,
                            lambda t: read_array(src, t))
        out[role] = {}
        for x in inputs:
            ws = [np.asarray(read_array(src, _init(src, art.manifest["graphs"][role], lin.weight)), np.float32)
                  for lin in linears if lin.input == x]
            act = stats[x]
            out[role][x] = awq.search(act.sample(rng, recipe.rows), act.mean_abs(), ws, opts.bits, opts.block,
                                      recipe.alphas())
    return out


def _init(src: Path, name: str, weight: str) -> TensorProto:
    model = onnx.load(src / name, load_external_data=False)
    return next(t for t in model.graph.initializer if t.name == weight)


def _awq_group_count(method: str, groups: dict[str, Any], graphs: dict[str, Any]) -> int:
    """How many activation groups got AWQ scales: ours are `groups`; ModelOpt's are its
    pre-quant-scale Muls (one per scaled input)."""
    if method == "modelopt-awq":
        return sum(int(g.get("modelopt", {}).get("pre_quant_scale_muls", 0)) for g in graphs.values())
    return sum(len(v) for v in groups.values())


def _manifest(src_manifest: dict[str, Any], src: Path, weights: str, method: str, block: int, encoding: str,
              graphs: dict[str, Any], recipe: awq.AwqRecipe | None, groups: dict[str, Any],
              routing_projections: str = ROUTING_PROJECTIONS) -> dict[str, Any]:
    from ..pipeline import versions
    from .encodings import ACCURACY_LEVEL

    new = copy.deepcopy(src_manifest)
    for key in ("files", "check", "trt", "format"):
        new.pop(key, None)  # they describe the source graphs
    before = sum(g["weight_bytes_before"] for g in graphs.values())
    after = sum(g["weight_bytes_after"] for g in graphs.values())
    embed = (src / C.EMBEDDINGS).stat().st_size
    qdq = encoding == "qdq"
    new.update({
        "precision": PRECISION[weights],
        "opset": QDQ_OPSET if qdq else int(src_manifest.get("opset", C.OPSET)),
        "ir_version": QDQ_IR if qdq else int(src_manifest.get("ir_version", C.IR_VERSION)),
        "opset_imports": {"": QDQ_OPSET} if qdq else {"": int(src_manifest.get("opset", C.OPSET)), MS_DOMAIN: 1},
        "quantization": {
            "kind": "weight-only", "weights": weights, "bits": BITS[weights], "method": method, "block": block,
            "encoding": encoding,
            "format": ("DequantizeLinear-21 (blocked, axis 0) + MatMul" if qdq else
                       f"com.microsoft MatMulNBits (accuracy_level {ACCURACY_LEVEL})"),
            "scheme": f"symmetric, codes in [-{2 ** (BITS[weights] - 1) - 1}, {2 ** (BITS[weights] - 1) - 1}], "
                      f"one {src_manifest.get('precision')} scale per {block} input rows and output column, no zero point",
            "activations": src_manifest.get("precision"),
            "routing_projections": routing_projections,
            "routing_projection_bits": {"float": None, "int8": ROUTING_BITS, "quantize": BITS[weights]}[routing_projections],
            "awq": None if recipe is None else {"recipe": recipe.to_dict(), "routing_active": True,
                                                "groups": _awq_group_count(method, groups, graphs),
                                                **({"by": "nvidia-modelopt"} if method == "modelopt-awq" else {})},
            "graphs": graphs,
            "weight_bytes": {"before": before, "after": after, "ratio": after / before if before else 1.0,
                             "embed_tokens": embed, "before_with_embeddings": before + embed,
                             "after_with_embeddings": after + embed,
                             "ratio_with_embeddings": (after + embed) / (before + embed)},
            "source_artifact": {"path": str(src), "model": src_manifest.get("model"),
                                "precision": src_manifest.get("precision"),
                                "manifest_sha256": sha256_file(src / C.MANIFEST)},
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        },
        "versions": {**src_manifest.get("versions", {}), **versions()},
    })
    if method == "modelopt-awq":
        new["quantization"].update(modelopt_int4.describe(src_manifest.get("precision"), block))
        new["versions"][modelopt_int4.PACKAGE] = modelopt_int4.modelopt_version()
    return new


def print_summary(manifest: dict[str, Any], output: str | Path) -> None:
    from ..paths import shown_dir

    q = manifest["quantization"]
    n = sum(len(g.get("nodes", [])) for g in q["graphs"].values())
    kept = sum(len(g.get("kept_float", [])) for g in q["graphs"].values())
    b = q["weight_bytes"]
    print(f"wrote {shown_dir(output)} ({manifest['model']}, {manifest['precision']}, {q['method']}, block {q['block']}, "
          f"{q['encoding']}: {n} MatMul quantized, {kept} MatMul/Gemm kept float; weights "
          f"{b['before'] / 2**20:.1f} -> {b['after'] / 2**20:.1f} MiB ({b['ratio']:.2f}x, "
          f"{b['ratio_with_embeddings']:.2f}x with embed_tokens))")
    p = manifest["calibration_parity"]
    if not p.get("measured"):
        print(f"parity vs source: not measured ({p['reason']})")
        return
    stages = " ".join(f"{s['layer']}:{s['overlap_mean']:.2f}" for s in p["stages"]) or "-"
    print(f"parity vs source (ONNX Runtime, CPU, {len(p['inputs'])} samples, {p['tokens']} tokens): routing overlap "
          f"per stage {stages}; logits cosine {p['logits_cosine_mean']:.4f} (min {p['logits_cosine_min']:.4f}); "
          f"token agreement {p['token_agreement_mean']:.2f}")
    print("parity: " + ("passed" if p["passed"] else "FAILED: " + "; ".join(p["failures"])))
