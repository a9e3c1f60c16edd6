"""`reroute-export inspect DIR`: what an artifact folder holds, and whether it is intact.

Reads `manifest.json` (refusing other formats, like the loader), re-hashes every listed
file unless `--no-verify`, and summarises: model and family, the routing plan (stages,
average visual tokens per layer), precision, opset / IR, shapes, the graphs by role
(vision, segment.s with its layers, head.j, route.j; Qwen buckets as *.bK) with their
weight bytes, the weights in total (each stored byte once: regions of a shared
weights.data that two graphs point at are counted once and reported as shared), the
fixed KV buffers (M_s rows per segment, bytes at the graphs' KV dtype), each graph's
inputs and outputs, the files with their sizes, the post-export check (passed / failed,
with the metrics), and the TensorRT build and quantization records when present.

Graphs are read without their weights (the protobuf is walked and each initializer's
header parsed, its bytes skipped), so a multi-GB graph costs what its nodes cost.

Exit codes: 0 intact; 2 not an artifact, or a file missing / changed (one line on stderr).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

from .errors import UserError
from . import contract as C
from .export.artifact import read_manifest, sha256_file
from .files import write_json
from .plan import RoutingPlan

# Bytes per element of each ONNX tensor type (sub-byte types packed).
_ELEMENT_BYTES = {"FLOAT": 4, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "INT32": 4, "INT64": 8, "BOOL": 1,
                  "FLOAT16": 2, "DOUBLE": 8, "UINT32": 4, "UINT64": 8, "COMPLEX64": 8, "COMPLEX128": 16,
                  "BFLOAT16": 2, "FLOAT8E4M3FN": 1, "FLOAT8E4M3FNUZ": 1, "FLOAT8E5M2": 1, "FLOAT8E5M2FNUZ": 1,
                  "FLOAT8E8M0": 1, "UINT4": 0.5, "INT4": 0.5, "FLOAT4E2M1": 0.5, "UINT2": 0.25, "INT2": 0.25,
                  "FLOAT6E2M3": 0.75, "FLOAT6E3M2": 0.75}
_NUMPY_NAMES = {"float": "float32", "double": "float64"}  # ONNX type names -> the usual ones
_KINDS = ("vision", "segment", "head", "route")  # role prefixes (contract.py); "route.0.b1": a bucket's

# protobuf field numbers (onnx.proto3)
_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_PAYLOAD = {4, 5, 6, 7, 9, 10, 11}  # float/int32/string/int64/raw/double/uint64 data: skipped


# ---------------------------------------------------------------- collecting


def _verify(folder: Path, files: dict[str, Any]) -> dict[str, Any]:
    """Every listed file present, of the listed size and sha256; every problem, not just the first."""
    problems = []
    for rel, entry in sorted(files.items()):
        path = folder / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            problems.append(f"manifest lists a path outside the folder: {rel}")
        elif not path.is_file():
            problems.append(f"{rel} is missing")
        elif path.stat().st_size != entry.get("bytes") or sha256_file(path) != entry.get("sha256"):
            problems.append(f"{rel} checksum mismatch")
    return {"checked": True, "ok": not problems, "problems": problems, "files": len(files)}


def _unlisted(folder: Path, files: dict[str, Any]) -> list[str]:
    """Files in the folder that the manifest does not list (not covered by the checksums)."""
    here = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and not p.is_symlink()}
    return sorted(here - set(files) - {C.MANIFEST})


def _varint(buf: Any, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint")


def _fields(buf: Any, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """A protobuf message's fields: (number, start of the key, start of the value, end)."""
    pos = start
    while pos < end:
        key_at = pos
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, stop = _varint(buf, pos)
        elif wire == 1:
            stop = pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            stop = pos + n
        elif wire == 5:
            stop = pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if stop > end:
            raise ValueError("truncated message")
        yield number, key_at, pos, stop
        pos = stop


def _key(number: int, length: int) -> bytes:
    """The key and length prefix of a length-delimited field."""
    out, value = bytearray(), (number << 3) | 2
    for v in (value, length):
        while v >= 0x80:
            out.append((v & 0x7F) | 0x80)
            v >>= 7
        out.append(v)
    return bytes(out)


def _tensor(buf: Any, start: int, end: int) -> dict[str, Any]:
    """One initializer's header (its data skipped): name, bytes, and where an external one lives."""
    import onnx

    kept = b"".join(bytes(buf[k:stop]) for number, k, _, stop in _fields(buf, start, end)
                    if number not in _TENSOR_PAYLOAD)
    t = onnx.TensorProto.FromString(kept)
    dtype = onnx.TensorProto.DataType.Name(t.data_type)
    count = 1
    for d in t.dims:
        count *= d
    nbytes = int(count * _ELEMENT_BYTES.get(dtype, 0) + 0.99)
    entry: dict[str, Any] = {"name": t.name, "bytes": nbytes}
    if t.data_location == onnx.TensorProto.EXTERNAL:
        ext = {e.key: e.value for e in t.external_data}
        entry.update(location=ext.get("location", ""), offset=int(ext.get("offset", 0)),
                     bytes=int(ext.get("length", nbytes)))
    return entry


def _read_graph(path: Path) -> tuple[Any, list[dict[str, Any]]]:
    """(the ModelProto without initializers, each initializer's header), weights left on disk."""
    import mmap

    import onnx

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        rest, tensors = [], []
        for number, k, v, stop in _fields(buf, 0, len(buf)):
            if number != _MODEL_GRAPH:
                rest.append(bytes(buf[k:stop]))
                continue
            graph = []
            for g_number, gk, gv, g_stop in _fields(buf, v, stop):
                if g_number == _GRAPH_INITIALIZER:
                    tensors.append(_tensor(buf, gv, g_stop))
                else:
                    graph.append(bytes(buf[gk:g_stop]))
            body = b"".join(graph)
            rest.append(_key(_MODEL_GRAPH, len(body)) + body)
    return onnx.ModelProto.FromString(b"".join(rest)), tensors


def _weights(tensors: list[dict[str, Any]]) -> dict[str, Any]:
    external: dict[str, int] = {}
    for t in tensors:
        if "location" in t:
            external[t["location"]] = external.get(t["location"], 0) + t["bytes"]
    return {"tensors": len(tensors), "bytes": sum(t["bytes"] for t in tensors),
            "inline_bytes": sum(t["bytes"] for t in tensors if "location" not in t), "external": external}


def _graph_io(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Inputs / outputs with element types and shapes (symbolic dims by name), opset, IR and
    weight bytes; and the initializers' headers (where external ones live)."""
    if not path.is_file():
        return {"file": path.name, "error": "missing"}, []
    import onnx

    try:
        model, tensors = _read_graph(path)
    except Exception as e:  # a truncated or foreign file: report, do not crash the summary
        return {"file": path.name, "error": f"unreadable ({type(e).__name__})"}, []

    def value(v: Any) -> dict[str, Any]:
        t = v.type.tensor_type
        dims = [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in t.shape.dim]
        dtype = onnx.TensorProto.DataType.Name(t.elem_type).lower() if t.elem_type else "?"
        return {"name": v.name, "dtype": dtype, "shape": dims}

    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    return {"file": path.name, "ir_version": model.ir_version, "opset": opsets.get("ai.onnx"),
            "opsets": opsets, "functions": len(model.functions),
            "inputs": [value(v) for v in model.graph.input], "outputs": [value(v) for v in model.graph.output],
            "weights": _weights(tensors)}, tensors


def _role_facts(role: str, plan: Any, segments: list[list[int]]) -> dict[str, Any]:
    """kind, bucket and the decoder layers a role's graph covers ([first, last]; a route: its decision layer)."""
    parts = role.split(".")
    kind = parts[0] if parts[0] in _KINDS else "other"
    bucket = next((int(p[1:]) for p in parts[1:] if p[:1] == "b" and p[1:].isdigit()), 0)
    index = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
    layers = None
    if kind == "segment" and index is not None and index < len(segments):
        layers = [segments[index][0], segments[index][1] - 1]
    elif kind in ("head", "route") and index is not None and index < len(plan.stages):
        layers = [plan.stages[index].layer, plan.stages[index].layer]
    return {"kind": kind, "bucket": bucket, "index": index, "layers": layers}


def _weight_totals(graphs: dict[str, dict[str, Any]], tensors: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Bytes stored for the graphs' weights, each once: inline tensors are their graph's own;
    external regions are merged per file, so bytes two graphs (or two tensors) point at
    count once, and `shared_bytes` says how many were pointed at more than once."""
    regions: dict[str, list[tuple[int, int]]] = {}
    inline = 0
    for ts in tensors.values():
        for t in ts:
            if "location" in t:
                regions.setdefault(t["location"], []).append((t["offset"], t["offset"] + t["bytes"]))
            else:
                inline += t["bytes"]
    external: dict[str, int] = {}
    for loc, spans in regions.items():
        total, reach = 0, -1
        for lo, hi in sorted(spans):
            if hi > reach:
                total += hi - max(lo, reach)
                reach = hi
        external[loc] = total
    referenced = sum(g["weights"]["bytes"] for g in graphs.values() if "weights" in g)
    stored = inline + sum(external.values())
    by_kind: dict[str, int] = {}
    for g in graphs.values():
        if "weights" in g:
            by_kind[g["kind"]] = by_kind.get(g["kind"], 0) + g["weights"]["bytes"]
    return {"bytes": stored, "inline_bytes": inline, "external": external, "referenced_bytes": referenced,
            "shared_bytes": referenced - stored, "by_kind": by_kind}


def _kv_buffers(manifest: dict[str, Any], graphs: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The fixed per-layer KV buffers a run allocates: (1, nkv, M_s, hd) for K and V of each
    layer of segment s, at the dtype the segment graph declares for past.{i}.key."""
    dec, sh = manifest.get("decoder") or {}, manifest.get("shapes") or {}
    segments, cache = dec.get("segments"), dec.get("cache_tokens") or sh.get("cache_tokens")
    nkv, hd = sh.get("num_kv_heads"), sh.get("head_dim")
    if not segments or not cache or not nkv or not hd:
        return None
    default = {"fp16": "float16"}.get(manifest.get("precision", ""), "float")
    rows, total = [], 0
    for s, ((a, b), m) in enumerate(zip(segments, cache)):
        declared = {v["name"]: v["dtype"] for v in graphs.get(C.segment(s), {}).get("inputs", [])}
        dtypes = [declared.get(C.past(i, "key"), default) for i in range(a, b)]
        nbytes = sum(int(2 * nkv * m * hd * _ELEMENT_BYTES.get(d.upper(), 4)) for d in dtypes)
        rows.append({"segment": C.segment(s), "layers": [a, b - 1], "cache_tokens": int(m),
                     "dtypes": sorted({_NUMPY_NAMES.get(d, d) for d in dtypes}), "bytes": nbytes})
        total += nbytes
    return {"num_kv_heads": int(nkv), "head_dim": int(hd), "segments": rows, "bytes": total,
            "dtypes": sorted({d for r in rows for d in r["dtypes"]}),
            "attention": dec.get("attention", C.PORTABLE)}


def _plan_summary(raw: dict[str, Any]) -> dict[str, Any]:
    from .plan import RoutingPlan

    plan = RoutingPlan.from_dict(raw)
    stages = [{"layer": s.layer, "layers": [plan.stage_layers(i).start, plan.stage_layers(i).stop - 1],
               "keep": s.keep, "ratio": s.ratio} for i, s in enumerate(plan.stages)]
    return {"method": plan.method, "num_layers": plan.num_layers, "visual_tokens": plan.visual_tokens,
            "decision_layers": list(plan.decision_layers), "stages": stages,
            "avg_visual_tokens": plan.avg_visual_tokens}


def _image_sizes(manifest: dict[str, Any]) -> list[dict[str, Any]] | None:
    """A Qwen2.5-VL artifact's image-size buckets: per size its pixels, grid and plan (N, K_j).
    None for an artifact of one size (LLaVA's 336 px, or Qwen2.5-VL exported without buckets)."""
    from .plan import RoutingPlan

    buckets = manifest.get("buckets") or []
    if len(buckets) < 2:
        return None
    out = []
    for k, b in enumerate(buckets):
        plan = RoutingPlan.from_dict(b["plan"])
        out.append({"bucket": k, "image_size": b.get("image_size"), "grid": b.get("grid"),
                    "visual_tokens": plan.visual_tokens, "keep": [s.keep for s in plan.stages],
                    "avg_visual_tokens": plan.avg_visual_tokens, "max_prompt_tokens": b.get("max_prompt_tokens")})
    return out


def _check_summary(check: dict[str, Any] | None) -> dict[str, Any] | None:
    if not check:
        return None
    if check.get("skipped"):  # a streamed export too big for its reference to fit in memory
        return {"passed": None, "skipped": check["skipped"], "failures": [], "metrics": {}, "tolerances": {}}
    m = check.get("metrics", {})
    keys = ("decision_exact", "decision_overlap", "first_differing_stage", "logits_max_abs", "logits_cosine",
            "top1_agree", "finite", "token_agreement", "tokens", "first_divergent_step")
    return {"passed": bool(check.get("passed")), "failures": list(check.get("failures", [])),
            "metrics": {k: m[k] for k in keys if k in m}, "tolerances": check.get("tolerances", {})}


def _calibration_summary(parity: dict[str, Any] | None) -> dict[str, Any] | None:
    """A calibrated artifact's parity against its fp32 source, without the per-input rows."""
    if not parity:
        return None
    return {k: v for k, v in parity.items() if k != "inputs"} | {"inputs": len(parity.get("inputs", []))}


def inspect(folder: str | Path, verify: bool = True) -> dict[str, Any]:
    """A summary of the artifact at `folder` (JSON-ready). Raises `UserError` when it is not
    an artifact of this version; a missing or changed file is reported in
    `["verification"]` (ok False), not raised, so the rest of the summary is still there."""
    folder = Path(folder)
    manifest = read_manifest(folder, verify=False)  # format and file list; hashing below
    files = manifest["files"]
    try:
        plan = _plan_summary(manifest["plan"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"artifact {folder}: {C.MANIFEST} has no readable plan ({type(e).__name__}: {e})") from None
    plan_obj = RoutingPlan.from_dict(manifest["plan"])
    segments = (manifest.get("decoder") or {}).get("segments") or [[r.start, r.stop] for r in plan_obj.segments]
    graphs, tensors = {}, {}
    for role, name in (manifest.get("graphs") or {}).items():
        graphs[role], tensors[role] = _graph_io(folder / name)
        graphs[role] = {**_role_facts(role, plan_obj, segments), **graphs[role]}
    embed = folder / C.EMBEDDINGS
    listed = [{"path": rel, "bytes": int(e.get("bytes", 0)), "sha256": e.get("sha256")}
              for rel, e in sorted(files.items())]
    report: dict[str, Any] = {
        "path": str(folder),
        "format": manifest.get("format"),
        "model": manifest.get("model"),
        "family": manifest.get("family"),
        "plan": plan,
        "avg_visual_tokens": plan["avg_visual_tokens"],
        "precision": manifest.get("precision"),
        "opset": manifest.get("opset"),
        "ir_version": manifest.get("ir_version"),
        "inline_functions": manifest.get("inline_functions"),
        "random_weights": bool(manifest.get("random_weights")),
        "weights_written": manifest.get("weights_written", "in memory"),
        "shapes": manifest.get("shapes", {}),
        "image_grid_thw": manifest.get("image_grid_thw"),
        "image_sizes": _image_sizes(manifest),
        "graphs": graphs,
        "weights": {**_weight_totals(graphs, tensors),
                    "embed_tokens_bytes": embed.stat().st_size if embed.is_file() else None},
        "kv_buffers": _kv_buffers(manifest, graphs),
        "files": listed,
        "total_bytes": sum(f["bytes"] for f in listed),
        "unlisted_files": _unlisted(folder, files),
        "verification": _verify(folder, files) if verify else {"checked": False, "ok": None, "problems": []},
        "check": _check_summary(manifest.get("check")),
        "trt": manifest.get("trt"),
        "quantization": manifest.get("quantization"),
        "calibration_parity": _calibration_summary(manifest.get("calibration_parity")),
        "versions": manifest.get("versions", {}),
        "created": manifest.get("created"),
    }
    return report


def verification_error(report: dict[str, Any]) -> str | None:
    """The one line a failed verification prints (same wording as the loader's), else None."""
    v = report["verification"]
    if not v["checked"] or v["ok"]:
        return None
    more = f" (and {len(v['problems']) - 1} more)" if len(v["problems"]) > 1 else ""
    return f"artifact {report['path']}: {v['problems'][0]}{more}"


# ---------------------------------------------------------------- printing


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _span(layers: list[int]) -> str:
    return str(layers[0]) if layers[0] == layers[1] else f"{layers[0]}-{layers[1]}"


def _table(rows: list[list[str]], header: list[str], right: Sequence[int] = ()) -> str:
    cells = [header, *rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: "  ".join(v.rjust(w) if i in right else v.ljust(w)  # noqa: E731
                              for i, (v, w) in enumerate(zip(r, widths))).rstrip()
    return "\n".join(["  " + fmt(header), "  " + "  ".join("-" * w for w in widths),
                      *("  " + fmt(r) for r in rows)])


def _sig(values: list[dict[str, Any]]) -> str:
    """I/O names grouped by their per-layer pattern (present.{i}.key x 32), dims that vary as *."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for v in values:
        groups.setdefault(re.sub(r"\.\d+(?=\.|$)", ".{i}", v["name"]), []).append(v)
    shown = []
    for name, members in groups.items():
        first = members[0]
        dims = [str(d) if all(len(m["shape"]) == len(first["shape"]) and m["shape"][k] == d for m in members)
                else "*" for k, d in enumerate(first["shape"])]
        count = f" x{len(members)}" if len(members) > 1 else ""
        shown.append(f"{name} {first['dtype']}[{','.join(dims)}]{count}")
    return "; ".join(shown)


_KIND_WORDS = {"vision": ("vision", "vision"), "segment": ("segment", "segments"), "head": ("head", "heads"),
               "route": ("routing", "routing"), "other": ("other", "other")}


def _count(kind: str, n: int) -> str:
    one, many = _KIND_WORDS.get(kind, (kind, kind))
    return f"{n} {one if n == 1 else many}"


def _graphs_lines(r: dict[str, Any]) -> list[str]:
    """The graphs by role (layers, weight bytes) and the weights in total, each stored byte once."""
    graphs, w = r["graphs"], r.get("weights") or {}
    kinds: dict[str, int] = {}
    for g in graphs.values():
        kinds[g.get("kind", "other")] = kinds.get(g.get("kind", "other"), 0) + 1
    out = [f"graphs: {len(graphs)} (" + ", ".join(_count(k, n) for k, n in kinds.items()) + ")"]
    rows = []
    for role, g in graphs.items():
        layers = g.get("layers")
        span = "-" if layers is None else (f"at {layers[0]}" if g.get("kind") == "route" else _span(layers))
        if "weights" in g:
            ww = g["weights"]
            rows.append([role, g["file"], span, _size(ww["bytes"]), str(ww["tensors"]),
                         ", ".join(ww["external"]) or "-"])
        else:
            rows.append([role, g["file"], span, g.get("error", "?"), "-", "-"])
    out.append(_table(rows, ["role", "file", "layers", "weights", "tensors", "external data"], right=(3, 4)))
    if w:
        parts = ", ".join(f"{_KIND_WORDS.get(k, (k, k))[1]} {_size(n)}" for k, n in w["by_kind"].items())
        line = f"weights: {_size(w['bytes'])} stored ({parts})"
        if w.get("embed_tokens_bytes") is not None:
            line += f"; {C.EMBEDDINGS} {_size(w['embed_tokens_bytes'])} (host-side lookup)"
        out.append(line)
        out.append(f"  {_size(w['shared_bytes'])} referenced by more than one graph, counted once"
                   if w["shared_bytes"] else "  each weight stored once (no bytes referenced by two graphs)")
    return out


_KV_WRITER = {True: "the graphs write each step into the buffers, in place", False: "the host writes the new rows"}


def _sizes_lines(sizes: list[dict[str, Any]] | None) -> list[str]:
    if not sizes:
        return []
    rows = [[str(b["bucket"]), "x".join(map(str, b["image_size"] or [])) or "?", "x".join(map(str, b["grid"] or [])),
             str(b["visual_tokens"]), "/".join(map(str, b["keep"])), f"{b['avg_visual_tokens']:.2f}",
             str(b["max_prompt_tokens"])] for b in sizes]
    return [f"image sizes: {len(sizes)} (each image is resized to the nearest; routing graphs and vision tables "
            "per size; the vision graph, segments and heads shared)",
            _table(rows, ["bucket", "pixels HxW", "grid", "N", "K per decision", "avg/layer", "prompt <="],
                   right=(0, 3, 5, 6))]


def _kv_lines(kv: dict[str, Any] | None) -> list[str]:
    if not kv:
        return []
    out = [f"KV buffers (fixed, allocated once per run; {'/'.join(kv['dtypes'])}, K and V of "
           f"{kv['num_kv_heads']} KV heads x head dim {kv['head_dim']} per layer): {_size(kv['bytes'])} at M_s rows "
           f"(TensorRT's; an ONNX Runtime run that knows its length takes its prompt + new tokens)",
           f"attention form: {kv['attention']} ({_KV_WRITER[C.kv_in_graph(kv['attention'])]})"]
    rows = [[s["segment"], _span(s["layers"]), str(s["cache_tokens"]), _size(s["bytes"])] for s in kv["segments"]]
    out.append(_table(rows, ["segment", "layers", "M_s rows", "bytes"], right=(2, 3)))
    return out


def format_report(r: dict[str, Any]) -> str:
    p, sh = r["plan"], r["shapes"]
    out = [f"{r['model']} ({r['family']})  artifact {r['path']}  [{r['format']}]"]
    out.append(f"plan: {p['method']}, N={p['visual_tokens']} visual tokens, {p['num_layers']} layers, "
               f"avg visual tokens/layer {p['avg_visual_tokens']:.2f}")
    if p["stages"]:
        out.append(_table([[str(s["layer"]), _span(s["layers"]), str(s["keep"]), f"{s['ratio']:.4f}"]
                           for s in p["stages"]], ["decision", "layers", "K", "ratio"], right=(0, 2, 3)))
    ops = "expanded into standard ops" if r["inline_functions"] else "ONNX local functions"
    out.append(f"precision {r['precision']}  opset {r['opset']}  IR {r['ir_version']}  reroute ops: {ops}")
    if r.get("weights_written") == "streamed":
        out.append("weights: " + ("seeded random (--random-weights), " if r.get("random_weights") else "")
                   + "streamed into one shared weights.data")
    if sh:
        out.append(f"shapes: prompt <= {sh.get('max_prompt_tokens')} tokens, new <= {sh.get('max_new_tokens')}, "
                   f"hidden {sh.get('hidden_size')}, {sh.get('num_layers')} layers x {sh.get('num_kv_heads')} KV heads "
                   f"x head dim {sh.get('head_dim')}, vocab {sh.get('vocab_size')}"
                   + (f", image grid {r['image_grid_thw']}" if r.get("image_grid_thw") else ""))
    out += _sizes_lines(r.get("image_sizes"))
    out += _graphs_lines(r)
    out += _kv_lines(r.get("kv_buffers"))
    out.append("graph I/O:")
    for role, g in r["graphs"].items():
        if "inputs" not in g:
            out.append(f"  {role} ({g['file']}): {g.get('error')}")
            continue
        out.append(f"  {role} ({g['file']}, opset {g['opset']}, IR {g['ir_version']}, {g['functions']} functions)")
        out.append(f"    in:  {_sig(g['inputs'])}")
        out.append(f"    out: {_sig(g['outputs'])}")
    out.append(f"files: {len(r['files'])}, {_size(r['total_bytes'])}")
    out.append(_table([[f["path"], _size(f["bytes"]), (f["sha256"] or "")[:12]] for f in r["files"]],
                      ["file", "size", "sha256"], right=(1,)))
    if r["unlisted_files"]:
        out.append("not in the manifest (unchecked): " + ", ".join(r["unlisted_files"]))
    v = r["verification"]
    out.append("checksums: not verified (--no-verify)" if not v["checked"] else
               f"checksums: {v['files']} files verified" if v["ok"] else
               "checksums: FAILED: " + "; ".join(v["problems"]))
    c = r["check"]
    if c is None and not r.get("calibration_parity"):
        out.append("post-export check: not run (exported with --no-check)")
    elif c is None:
        pass  # a calibrated artifact: its parity against the fp32 source is printed below
    if c is not None and c.get("skipped"):
        out.append(f"post-export check {c['skipped']}")
    elif c is not None:
        m = c["metrics"]
        parts = []
        if "decision_exact" in m:
            parts.append(f"decisions exact {m['decision_exact']:.2f}")
        if "logits_max_abs" in m:
            cosine = m.get("logits_cosine", float("nan"))
            parts.append(f"logits max|diff| {m['logits_max_abs']:.3g}, cosine {cosine:.6f}")
        if "token_agreement" in m:
            parts.append(f"tokens agreeing {m['token_agreement']:.2f} of {m.get('tokens')}")
        verdict = "passed" if c["passed"] else "FAILED: " + "; ".join(c["failures"])
        out.append(f"post-export check: {verdict} ({', '.join(parts)})")
    t = r.get("trt")
    if t:
        if t.get("built"):
            engines = ", ".join(e.get("engine", k) for k, e in t.get("engines", {}).items())
            out.append(f"TensorRT: engines built for {t.get('device')} "
                       f"(TensorRT {t.get('tensorrt_version')}): {engines}")
        else:
            out.append(f"TensorRT: build plan for {t.get('device')} (TensorRT {t.get('trt_version')}), "
                       f"no engine built: {t.get('reason')}")
    q = r.get("quantization")
    if q:
        out.append(f"quantization: {q.get('precision')} {q.get('format')} via {q.get('library')} {q.get('version')}"
                   + (f" ({q['scheme']})" if q.get("scheme") else ""))
    cp = r.get("calibration_parity")
    if cp:
        if not cp.get("measured", True):
            out.append(f"parity vs fp32 source: not measured ({cp.get('reason')})")
        else:
            verdict = "passed" if cp.get("passed") else "FAILED: " + "; ".join(cp.get("failures", []))
            extra = [f"{k.replace('_', ' ')} {cp[k]:.4f}" for k in ("logits_cosine_min", "token_agreement_mean",
                                                                      "vision_cosine_min") if isinstance(cp.get(k), float)]
            out.append(f"parity vs fp32 source ({cp['inputs']} samples): {verdict}"
                       + (f" ({', '.join(extra)})" if extra else ""))
    ver = r["versions"]
    if ver or r["created"]:
        out.append(f"created {r['created']} by reroute-export {ver.get('reroute-export')} "
                   f"(torch {ver.get('torch')}, transformers {ver.get('transformers')}, onnx {ver.get('onnx')})")
    return "\n".join(out)


# ---------------------------------------------------------------- CLI


def cmd_inspect(args: argparse.Namespace) -> int:
    report = inspect(Path(args.folder), verify=not args.no_verify)
    if args.json:
        write_json(args.json, report)
    error = verification_error(report)
    if error:
        raise UserError(error)  # one line on stderr, exit 2 (the JSON above still records it)
    if not args.quiet and args.json != "-":
        print(format_report(report))
    return 0


def register_cli(sub: Any) -> argparse.ArgumentParser:
    """Add `inspect DIR [--json OUT] [--no-verify] [--quiet]` to a subparsers object."""
    p = sub.add_parser("inspect", help="summarise an artifact folder (model, plan, shapes, files, checks) "
                                       "and verify its checksums")
    p.add_argument("folder", metavar="DIR", help="artifact folder")
    p.add_argument("--json", metavar="OUT", help="write the summary as JSON to OUT ('-' for stdout)")
    p.add_argument("--no-verify", action="store_true", help="skip re-hashing the files (fast on big artifacts)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors (the exit code says intact or not)")
    p.set_defaults(func=cmd_inspect)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry (`python -m reroute_export.inspect_artifact DIR`), same errors and
    exit codes as `reroute-export inspect`."""
    parser = argparse.ArgumentParser(prog="reroute-export")
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["inspect", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except UserError as e:
        print(f"reroute-export: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
