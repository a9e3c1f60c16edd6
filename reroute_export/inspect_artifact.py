"""`reroute-export inspect DIR`: what an artifact folder holds, and whether it is intact.

Reads `manifest.json` (refusing other formats, like the loader), re-hashes every listed
file unless `--no-verify`, and summarises: model and family, the routing plan (stages,
average visual tokens per layer), precision, opset / IR, shapes, each graph's inputs and
outputs, the files with their sizes, the post-export check (passed / failed, with the
metrics), and the TensorRT build and quantization records when present.

Exit codes: 0 intact; 2 not an artifact, or a file missing / changed (one line on stderr).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from .errors import UserError
from . import contract as C
from .export.artifact import read_manifest, sha256_file
from .files import write_json

# Graph headers are read with onnx (weights stay on disk); past this size we skip them
# rather than parse gigabytes of inline initializers just for the I/O signature.
MAX_GRAPH_BYTES_FOR_IO = 512 << 20


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


def _graph_io(path: Path) -> dict[str, Any]:
    """Inputs / outputs with element types and shapes (symbolic dims by name), opset, IR."""
    if not path.is_file():
        return {"file": path.name, "error": "missing"}
    if path.stat().st_size > MAX_GRAPH_BYTES_FOR_IO:
        return {"file": path.name, "skipped": f"over {MAX_GRAPH_BYTES_FOR_IO >> 20} MiB with inline weights"}
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # a truncated or foreign file: report, do not crash the summary
        return {"file": path.name, "error": f"unreadable ({type(e).__name__})"}

    def value(v: Any) -> dict[str, Any]:
        t = v.type.tensor_type
        dims = [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in t.shape.dim]
        dtype = onnx.TensorProto.DataType.Name(t.elem_type).lower() if t.elem_type else "?"
        return {"name": v.name, "dtype": dtype, "shape": dims}

    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    return {"file": path.name, "ir_version": model.ir_version, "opset": opsets.get("ai.onnx"),
            "opsets": opsets, "functions": len(model.functions),
            "inputs": [value(v) for v in model.graph.input], "outputs": [value(v) for v in model.graph.output]}


def _plan_summary(raw: dict[str, Any]) -> dict[str, Any]:
    from .plan import RoutingPlan

    plan = RoutingPlan.from_dict(raw)
    stages = [{"layer": s.layer, "layers": [plan.stage_layers(i).start, plan.stage_layers(i).stop - 1],
               "keep": s.keep, "ratio": s.ratio} for i, s in enumerate(plan.stages)]
    return {"method": plan.method, "num_layers": plan.num_layers, "visual_tokens": plan.visual_tokens,
            "decision_layers": list(plan.decision_layers), "stages": stages,
            "avg_visual_tokens": plan.avg_visual_tokens}


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
    graphs = {role: _graph_io(folder / name) for role, name in
              {"vision": C.VISION, "prefill": C.PREFILL, "decode": C.DECODE, **manifest.get("graphs", {})}.items()}
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
        "graphs": graphs,
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
    out.append("graphs:")
    for role, g in r["graphs"].items():
        if "inputs" not in g:
            out.append(f"  {role} ({g['file']}): {g.get('error') or g.get('skipped')}")
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
