"""`calibrate`: the fp32 artifact in, the quantized artifact out (written atomically), with
its manifest recording the quantization and the calibration parity."""

from __future__ import annotations

import copy
import datetime as dt
import shutil
import tempfile
from pathlib import Path
from typing import Any

import onnx

from ..errors import UserError
from .. import contract as C
from ..export.artifact import ArtifactWriter, read_manifest, sha256_file
from ..progress import Steps
from .calibration_set import CalibrationSample, calibration_dir, load_calibration_set, pick
from .feeds import FeedReader, FeedStore, record_feeds
from .fp8 import FP8_IR, int8_qdq_to_fp8
from .quantizers import external_files, is_large, quantize_modelopt, quantize_onnxruntime, restore_float_consumers
from .recipes import FLOAT_KINDS, KINDS, LIBRARIES, Recipe, kind, load_recipe
from .report import parity_report
from .select import kept_float, module_path, name_nodes, quantized_nodes, select_nodes


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


def _graph_roles(manifest: dict[str, Any], rec: Recipe, src: Path) -> tuple[dict[str, str], list[str]]:
    """(every role -> file of the artifact, the roles this recipe quantizes), or a one-line refusal."""
    graphs = dict(manifest.get("graphs") or {})
    for g in rec.graphs:
        if g not in KINDS and g not in graphs:
            raise UserError(f"recipe {rec.name} names graph {g}, which {src} does not have "
                            f"(its graphs: {', '.join(graphs) or 'none'})")
    return graphs, [role for role in graphs if rec.selects(role)]


def calibrate(artifact_dir: str | Path, output_dir: str | Path, precision: str = "int8",
              recipe: str | None = None, force: bool = False, quiet: bool = False,
              library: str | None = None, calibration_set: str | Path | None = None) -> dict[str, Any]:
    """Quantize the fp32 artifact at `artifact_dir` into `output_dir`; returns its manifest.

    Every graph role of manifest["graphs"] is written under its own file name: the vision,
    segment and head graphs the recipe names quantized (each calibrated on what it receives
    in prefill and in decode, routing active), the routing graphs and the rest copied float.
    Never raises for a parity failure (see manifest["calibration_parity"]["passed"] and
    ["measured"]); raises UserError for inputs it cannot use.
    """
    from ..runtime import OrtArtifact

    src, out = Path(artifact_dir), Path(output_dir)
    rec = load_recipe(recipe, precision)
    if library is not None:
        if library not in LIBRARIES:
            raise UserError(f"unknown library {library!r}; use one of {', '.join(LIBRARIES)}")
        rec.library = library
    _check_paths(src, out, force)
    graphs, quantized = _graph_roles(read_manifest(src, verify=False), rec, src)
    steps = Steps(4 + len(quantized), quiet=quiet, title="calibrate")
    try:
        with steps.step("load the fp32 artifact and the calibration set"):
            manifest = read_manifest(src)  # every file re-hashed
            if manifest.get("precision") != "fp32":
                raise UserError(f"calibrate takes an fp32 artifact; {src} is {manifest.get('precision')}")
            art = OrtArtifact.load(src, ["CPUExecutionProvider"], verify=False)
            set_dir = Path(calibration_set) if calibration_set is not None else calibration_dir()
            chosen = pick(load_calibration_set(set_dir), rec)
            inputs = _calibration_inputs(art, chosen)
        with ArtifactWriter(out, force=force) as w, tempfile.TemporaryDirectory(prefix="reroute-calib-") as tmp:
            with steps.step(f"record calibration feeds of {len(quantized)} graphs "
                            f"({len(chosen)} samples, routing active)"):
                store = FeedStore(Path(tmp) / "feeds")
                runs = record_feeds(art, inputs, quantized, rec.decode_steps, store)
            quant = _quantize_graphs(src, w.path, graphs, quantized, store, rec, steps, Path(tmp))
            with steps.step("embeddings, preprocessor, manifest"):
                shutil.copy2(src / C.EMBEDDINGS, w.path / C.EMBEDDINGS)
                shutil.copytree(src / C.PREPROCESSOR, w.path / C.PREPROCESSOR)
                new = _manifest(manifest, src, rec, chosen, quant, runs, set_dir)
                w.write_manifest(new)  # the runtime reads it during the parity run
            with steps.step("parity: quantized vs fp32 (ONNX Runtime, CPU)"):
                new["calibration_parity"] = parity_report(src, w.path, precision, rec.parity_tokens)
            w.write_manifest(new)
    finally:
        steps.close()
    return new


def _calibration_inputs(art: Any, chosen: list[CalibrationSample]) -> list[Any]:
    """Each sample as the artifact's preprocessor prepares it; with image-size buckets
    (Qwen2.5-VL), each sample once per bucket, resized to the bucket's size first, so that the
    vision graph is calibrated on every photo at every size and the shared segments and heads
    see every bucket's visual-token count."""
    import PIL.Image

    from ..preprocess import load_image

    buckets = tuple(getattr(art.preprocessor.images, "buckets", ()) or ())
    out = []
    for s in chosen:
        image = load_image(s.image)
        if len(buckets) > 1:
            out += [art.prepare(image.resize((w, h), PIL.Image.Resampling.BICUBIC), s.prompt) for h, w in buckets]
        else:
            out.append(art.prepare(image, s.prompt))
    return out


def _copy_float(src: Path, dst: Path, graph: str) -> dict[str, Any]:
    """A graph left in floating point, with its external weights (a shared file is copied
    once): copied byte for byte. Returns what it holds."""
    for name in (graph, *external_files(src / graph)):
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copy2(src / name, dst / name)
    proto = onnx.load(src / graph, load_external_data=False)
    return {"kept_float_routing": kept_float(proto), "ir_version": proto.ir_version,
            "opset": next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))}


def _quantize_graphs(src: Path, dst: Path, graphs: dict[str, str], quantized: list[str], store: FeedStore,
                     rec: Recipe, steps: Steps, tmp: Path) -> dict[str, Any]:
    """Every role's graph quantized, or copied float: routing graphs always (recipes.FLOAT_KINDS),
    others where the recipe leaves them out. What each holds, by role."""
    quant: dict[str, Any] = {}
    for role, name in graphs.items():
        if role not in quantized:
            why = FLOAT_KINDS.get(kind(role), "not among the recipe's graphs")
            quant[role] = {"quantized": False, "reason": why, **_copy_float(src, dst, name)}
            continue
        with steps.step(f"{role} graph: calibrate (routing active) and quantize ({rec.library}, {rec.precision})"):
            if store.count(role) == 0:  # never ran on the calibration inputs: no range to quantize with
                quant[role] = {"quantized": False, "reason": "no calibration feed reached it", "feeds": 0,
                               **_copy_float(src, dst, name)}
                continue
            quant[role] = _quantize_graph(src / name, dst / name, role, store, rec, tmp)
    return quant


def _quantize_graph(src: Path, dst: Path, role: str, store: FeedStore, rec: Recipe, tmp: Path) -> dict[str, Any]:
    from ..export.decoder import save

    model = onnx.load(src)
    name_nodes(model)
    nodes, excluded = select_nodes(model, role, rec)
    reader = FeedReader(store.feeds(role))
    staged = tmp / f"{role}.quant.onnx"  # role names carry dots only: safe file names
    if rec.library == "modelopt":
        quantize_modelopt(model, reader, [e["node"] for e in excluded], rec, staged, tmp)
    else:
        named = tmp / f"{role}.fp32.onnx"  # node names made unique: how the quantizer is told what to touch
        save(model, named)
        quantize_onnxruntime(named, reader, nodes, rec, staged, tmp)
    q = onnx.load(staged)
    rewired = restore_float_consumers(q, nodes) if rec.library == "onnxruntime" else 0
    if rec.precision == "fp8" and rec.library == "onnxruntime":
        q = int8_qdq_to_fp8(q, onnx.load(src))  # the fp32 weights: saving `model` above moved its own out
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
        onnx.checker.check_model(q, full_check=not is_large(q))
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
              quant: dict[str, Any], runs: dict[str, int], set_dir: Path) -> dict[str, Any]:
    from ..pipeline import versions

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
                "feeds": {role: v["feeds"] for role, v in quant.items() if "feeds" in v},
                **runs,  # prefill_runs, decode_steps: segments and heads saw both
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
