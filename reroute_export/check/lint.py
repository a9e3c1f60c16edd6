"""`lint`: check ONNX graphs against what TensorRT's ONNX parser accepts.

The support table is data (reroute_export/data/trt_support.json, with its source). A
finding is an error (the parser or builder would reject the graph, or it would have a
data-dependent shape) or a warning (legal but worth a look). Nodes inside local
functions are checked too, since the parser inlines them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import onnx

from ..errors import UserError

TABLE = Path(__file__).resolve().parent.parent / "data" / "trt_support.json"
DTYPES = {1: "FP32", 2: "UINT8", 3: "INT8", 6: "INT32", 7: "INT64", 9: "BOOL", 10: "FP16", 11: "DOUBLE", 16: "BF16",
          17: "FP8", 21: "UINT4", 22: "INT4"}


@dataclass
class Finding:
    severity: str  # "error" | "warning"
    graph: str
    node: str  # node name (or "-" for graph-level findings)
    op: str
    message: str


@lru_cache(maxsize=None)
def support_table() -> dict[str, Any]:
    return json.loads(TABLE.read_text())


def _version(trt_version: str) -> dict[str, Any]:
    versions = support_table()["versions"]
    if trt_version not in versions:
        raise UserError(f"unknown TensorRT version {trt_version}; known: {', '.join(versions)}")
    return versions[trt_version]


# ---------------------------------------------------------------- graph walking


def _nodes(model: onnx.ModelProto) -> Iterator[tuple[onnx.NodeProto, str]]:
    """Every node with where it lives: the main graph or a local function."""
    for node in model.graph.node:
        yield node, "graph"
    for fn in model.functions:
        for node in fn.node:
            yield node, f"function {fn.domain}.{fn.name}"


def _constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto | None]:
    out = {t.name: t for t in model.graph.initializer}
    for node, _ in _nodes(model):
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for a in node.attribute:
                if a.name == "value":
                    out[node.output[0]] = a.t
                elif a.ref_attr_name:
                    out[node.output[0]] = None  # bound to the caller's attribute: constant once inlined
                elif a.name in ("value_ints", "value_int"):
                    out[node.output[0]] = onnx.helper.make_tensor("k", 7, [len(a.ints)] if a.ints else [],
                                                                  list(a.ints) or [a.i])
    return out


def _types(model: onnx.ModelProto) -> dict[str, str]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001  (inference is best effort for linting)
        inferred = model
    infos = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    out = {v.name: DTYPES.get(v.type.tensor_type.elem_type, "?") for v in infos}
    out.update({t.name: DTYPES.get(t.data_type, "?") for t in model.graph.initializer})
    return out


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a) if not a.ref_attr_name else f"<{a.ref_attr_name}>"
    return default


# ---------------------------------------------------------------- checks


def _check_model_header(model: onnx.ModelProto, graph: str, v: dict[str, Any], trt: str) -> list[Finding]:
    out = []
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset > v["max_opset"]:
        out.append(Finding("error", graph, "-", "-", f"opset {opset} > {v['max_opset']} (TensorRT {trt} target)"))
    if model.ir_version > v["max_ir_version"]:
        out.append(Finding("error", graph, "-", "-",
                           f"IR version {model.ir_version} > {v['max_ir_version']} that TensorRT {trt} reads"))
    return out + _function_opsets(model, graph)


def _since(op: str, version: int, domain: str) -> int | None:
    try:
        return onnx.defs.get_schema(op, version, domain).since_version
    except onnx.defs.SchemaError:
        return None


def _function_opsets(model: onnx.ModelProto, graph: str) -> list[Finding]:
    """A local function importing another version of a domain than its model: onnx.checker
    refuses the graph where one of the function's ops means another version under the two
    (opset 18 vs 24: Constant, Cast, Shape, ...), and so does everything that checks first."""
    domain = lambda d: "" if d == "ai.onnx" else d  # noqa: E731
    model_opsets = {domain(o.domain): o.version for o in model.opset_import}
    out = []
    for f in model.functions:
        for o in f.opset_import:
            d, theirs = domain(o.domain), model_opsets.get(domain(o.domain))
            if theirs is None or theirs == o.version:
                continue
            differ = sorted({n.op_type for n in f.node if domain(n.domain) == d
                             and _since(n.op_type, o.version, d) != _since(n.op_type, theirs, d)})
            if differ:
                out.append(Finding("error", graph, "-", f"{f.domain}.{f.name}",
                                   f"local function imports {d or 'ai.onnx'} opset {o.version}, the model {theirs}, "
                                   f"and {', '.join(differ)} differ between them: onnx.checker refuses the graph "
                                   "(re-export it)"))
    return out


def _check_node(node: onnx.NodeProto, where: str, graph: str, v: dict[str, Any], consts: dict, types: dict,
                functions: set[tuple[str, str]], opset: int = 0) -> list[Finding]:
    name, op = node.name or "(unnamed)", node.op_type
    found = lambda sev, msg: Finding(sev, graph, name, op if not node.domain else f"{node.domain}.{op}", msg)  # noqa: E731
    if node.domain not in ("", "ai.onnx"):
        if (node.domain, op) in functions or _attr(node, "plugin_namespace") is not None:
            return []
        refused = support_table().get("weight_only", {}).get("refused_ops", {}).get(f"{node.domain}.{op}")
        if refused:  # e.g. an ORT-only weight-quantized artifact: name the encoding TensorRT takes
            return [found("error", f"{refused} ({where})")]
        if node.domain == "com.microsoft" and op == "GroupQueryAttention":
            return [found("error", f"ONNX Runtime's fused attention (an --attention ort-gqa artifact), which TensorRT "
                                   f"cannot parse: re-export with --attention portable, or kv-scatter for TensorRT 11 "
                                   f"({where})")]
        return [found("error", f"custom-domain node without a local function or plugin_namespace ({where})")]
    if op in support_table()["data_dependent"]:
        return [found("error", f"{op} has a data-dependent output shape ({where})")]
    if op not in v["ops"]:
        return [found("error", f"{op} is not supported by the TensorRT ONNX parser ({where})")]
    out = []
    if op in support_table().get("unverified", {}):
        out.append(found("warning", support_table()["unverified"][op]))
    if op == "Attention" and (len(node.output) > 1 or any(node.input[4:6])):
        out.append(found("error", "Attention with past_key/past_value or more than one output: TensorRT's importer "
                                  "takes neither (pass the whole buffer as K/V)"))
    if op == "TopK":
        out += _check_topk(node, v, consts, found)
    if op == "DequantizeLinear":
        out += _check_dequantize(node, v, consts, types, opset, found)
    if op in ("ScatterND", "ScatterElements") and _attr(node, "reduction", b"none") not in (b"none", "none"):
        out.append(found("error", f"{op} reduction={_attr(node, 'reduction')!r}: TensorRT needs reduction=none"))
    if op == "CumSum" and types.get(node.input[0]) not in (None, "?", "FP32", "FP16", "BF16"):
        out.append(found("error", f"CumSum on {types[node.input[0]]}: TensorRT supports float CumSum only"))
    for t in node.input[:1]:  # the data input; axes/shape/index inputs are INT64 by the ONNX spec
        dt = types.get(t)
        if dt in (None, "?") or not t:
            continue
        if dt == "DOUBLE":
            out.append(found("error", f"input {t} is DOUBLE; TensorRT has no float64 tensors"))
        elif dt in ("BOOL", "INT64") and dt not in v["ops"][op] and op not in ("Cast", "Shape", "Constant"):
            out.append(found("warning", f"input {t} is {dt}, which TensorRT's {op} does not list"))
    return out


def _check_dequantize(node: onnx.NodeProto, v: dict[str, Any], consts: dict, types: dict, opset: int,
                      found) -> list[Finding]:
    """Weight DequantizeLinear: TensorRT takes zero points that are zero only; blocked ones
    (block_size, INT4/INT8 weights from `quantize --encoding qdq`) are opset 21."""
    out = []
    dt = types.get(node.input[0])
    if dt not in (None, "?") and dt not in v["ops"]["DequantizeLinear"]:
        out.append(found("error", f"DequantizeLinear of {dt}: this TensorRT target lists "
                                  f"{', '.join(v['ops']['DequantizeLinear'])}"))
    zero = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if zero is not None and zero.data_location != onnx.TensorProto.EXTERNAL and onnx.numpy_helper.to_array(zero).any():
        out.append(found("error", "DequantizeLinear with a nonzero x_zero_point: TensorRT needs symmetric (zero) points"))
    if (_attr(node, "block_size", 0) or 0) > 0:
        blocked = v.get("blocked_dequantize", {"supported": False, "min_opset": 21, "reason": "blocked DequantizeLinear"})
        if not blocked["supported"]:
            out.append(found("error", blocked["reason"]))
        elif opset < blocked["min_opset"]:
            out.append(found("error", f"blocked DequantizeLinear needs opset {blocked['min_opset']}, the graph is {opset}"))
    return out


def _check_topk(node: onnx.NodeProto, v: dict[str, Any], consts: dict, found) -> list[Finding]:
    out = []
    if _attr(node, "sorted", 1) != 1:
        out.append(found("error", "TopK with sorted=0: TensorRT needs sorted=1"))
    if len(node.input) < 2 or node.input[1] not in consts:
        out.append(found("error", "TopK's K is not a constant; TensorRT needs K as weights"))
        return out
    k = consts[node.input[1]]
    if k is None:  # a function's attribute: checked at each call site (_check_reroute_k)
        return out
    value = int(onnx.numpy_helper.to_array(k).reshape(-1)[0])
    if value > v["topk_max_k"]:
        out.append(found("error", f"TopK K={value} > {v['topk_max_k']} (TensorRT's limit)"))
    return out


def _check_reroute_k(model: onnx.ModelProto, graph: str, v: dict[str, Any]) -> list[Finding]:
    """K of a `reroute` SelectVisual node becomes its function's TopK K."""
    out = []
    for node in model.graph.node:
        if node.domain == "reroute" and node.op_type == "SelectVisual":
            k = _attr(node, "k")
            k = k[0] if isinstance(k, list) else k
            if isinstance(k, int) and k > v["topk_max_k"]:
                out.append(Finding("error", graph, node.name, "reroute.SelectVisual",
                                   f"K={k} > {v['topk_max_k']}: its TopK would exceed TensorRT's limit"))
    return out


def lint_model(model: onnx.ModelProto, graph: str, trt_version: str = "10.3") -> list[Finding]:
    v = _version(trt_version)
    consts, types = _constants(model), _types(model)
    functions = {(f.domain, f.name) for f in model.functions}
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    out = _check_model_header(model, graph, v, trt_version) + _check_reroute_k(model, graph, v)
    for node, where in _nodes(model):
        out += _check_node(node, where, graph, v, consts, types, functions, opset)
    return out


def onnx_files(target: Path) -> list[Path]:
    """The graphs to lint: a bare .onnx file as it is; an artifact folder's graphs only once
    its manifest and checksums verify, as every other command demands (a changed byte must
    not lint as "passed")."""
    if target.is_dir():
        from .. import contract as C
        from ..export.artifact import read_manifest

        if not (target / C.MANIFEST).is_file():
            raise UserError(f"{target} is not a reroute-export artifact: {C.MANIFEST} is missing "
                            f"(to lint graphs of your own, give each .onnx file)")
        files = sorted(target / rel for rel in read_manifest(target)["files"] if rel.endswith(".onnx"))
        if not files:
            raise UserError(f"{target} holds no .onnx files")
        return files
    if not target.is_file():
        raise UserError(f"{target} does not exist")
    if target.suffix != ".onnx":
        raise UserError(f"{target} is not an .onnx file or an artifact folder")
    return [target]


def polygraphy_lint(path: Path, shapes: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """Polygraphy's own `check lint`, when installed (it needs onnxruntime too): it runs the
    graph in ONNX Runtime on random inputs and reports what fails.

    Asked for (`lint --polygraphy`), not run by default: it starts a process and an ONNX
    Runtime session per graph (a few seconds each). `shapes` gives each dynamic input a real
    shape; without them polygraphy feeds every dynamic axis a length of 1, which no routing
    graph takes (route.j routes N visual tokens among the scored rows: an index out of range)."""
    exe = shutil.which("polygraphy")
    if exe is None:
        return {"ran": False, "reason": "polygraphy is not installed (pip install polygraphy)"}
    cmd = [exe, "check", "lint", str(path)]
    if shapes:
        cmd += ["--input-shapes", *(f"{name}:[{','.join(map(str, dims))}]" for name, dims in shapes.items())]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return {"ran": True, "returncode": res.returncode, "input_shapes": shapes or None,
            "output": (res.stdout + res.stderr)[-4000:]}


def artifact_shapes(target: Path) -> dict[str, dict[str, list[int]]]:
    """Per graph file of an artifact folder: each dynamic input's shape at the opt point of the
    graph's last TensorRT optimization profile (build/trt.py: the prompt's rows for segments and
    heads, the scored rows for routing graphs), so polygraphy runs the shapes the runtime runs;
    {} for a static graph. A file whose shapes are unknown (a bare .onnx file, a graph the
    build plan does not describe) is left out."""
    from ..build.trt import graph_inputs, graph_profiles
    from ..export.artifact import read_manifest

    if not target.is_dir():
        return {}
    manifest = read_manifest(target, verify=False)  # onnx_files verified it
    out = {}
    for role, name in manifest.get("graphs", {}).items():
        model = onnx.load(str(target / name), load_external_data=False)
        try:
            profiles = graph_profiles(role, manifest, graph_inputs(model), name, model)
        except UserError:
            continue
        out[name] = {inp: list(opt) for inp, (_, opt, _) in profiles[-1].shapes.items()} if profiles else {}
    return out


def lint(target: Path, trt_version: str = "10.3", polygraphy: bool = False, quiet: bool = True) -> dict[str, Any]:
    """Every graph of `target` (an artifact folder or one .onnx file) against the support table;
    with `polygraphy`, also polygraphy's `check lint` on each, which fails the lint when it fails
    a graph run at the artifact's own shapes (a bare file's run is reported, not judged)."""
    from ..progress import Steps

    findings, poly = [], {}
    files = onnx_files(target)
    shapes = artifact_shapes(target) if polygraphy else {}
    steps = Steps(len(files), quiet=quiet or not polygraphy, title="lint")
    try:
        for path in files:
            with steps.step(f"{path.name}: {'polygraphy check lint' if polygraphy else 'lint'}"):
                try:
                    model = onnx.load(str(path), load_external_data=False)
                except Exception as e:  # noqa: BLE001
                    raise UserError(f"{path} is not a readable ONNX file: {e}") from None
                findings += lint_model(model, path.name, trt_version)
                if polygraphy:
                    poly[path.name] = {**polygraphy_lint(path, shapes.get(path.name)), "judged": path.name in shapes}
    finally:
        steps.close()
    errors = [f for f in findings if f.severity == "error"]
    poly_failed = sorted(n for n, r in poly.items() if r["judged"] and r["ran"] and r["returncode"] != 0)
    return {"target": str(target), "trt_version": trt_version, "passed": not errors and not poly_failed,
            "errors": len(errors), "warnings": len(findings) - len(errors),
            "findings": [asdict(f) for f in findings], "polygraphy": poly, "polygraphy_failed": poly_failed,
            "table_source": support_table()["source"]}
