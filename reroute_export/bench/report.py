"""What a benchmark's records add up to: the tracked ratios with their targets, how far each
backend agrees with the eager reference, and the lines and Markdown that say so."""

from __future__ import annotations

from typing import Any

from ..check.loop import Observed, judge
from .traffic import traffic_line

TARGETS = {"fraction_of_theoretical": 0.9, "reroute_over_pdrop": 1.10, "onnxruntime_over_torch": 1.5}


def find(records: list[dict[str, Any]], method: str, backend: str, precision: str | None = None
         ) -> dict[str, Any] | None:
    """The measured record of (method, backend) at `precision`; None: at the backend's own
    (the torch dtype, fp32 artifacts), the one every tracked ratio is about."""
    for r in records:
        if r["method"] == method and r["backend"] == backend and r.get("status") == "ok":
            if (r.get("precision") == precision) if precision else r.get("baseline_precision", True):
                return r
    return None


def add_measured_speedup(records: list[dict[str, Any]]) -> None:
    """measured_speedup: none's prefill p50 over this record's, same backend and precision, same run."""
    for r in records:
        none = find(records, "none", r["backend"], r.get("precision"))
        if r.get("status") == "ok" and none is not None:
            r["measured_speedup"] = none["prefill_ms_p50"] / r["prefill_ms_p50"]


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The three tracked ratios, per backend where they are per backend, each with its target."""
    out: dict[str, Any] = {"targets": dict(TARGETS), "per_backend": {}}
    for backend in dict.fromkeys(r["backend"] for r in records):
        rr, none, pdrop = (find(records, m, backend) for m in ("reroute", "none", "pdrop"))
        if rr is None:
            continue
        entry: dict[str, Any] = {}
        if none is not None:
            speed = none["prefill_ms_p50"] / rr["prefill_ms_p50"]
            frac = speed / rr["theoretical_speedup"]
            entry.update(reroute_speedup_vs_none=speed, theoretical_speedup=rr["theoretical_speedup"],
                         fraction_of_theoretical=frac,
                         fraction_of_theoretical_met=frac >= TARGETS["fraction_of_theoretical"])
        if pdrop is not None:
            ratio = rr["prefill_ms_p50"] / pdrop["prefill_ms_p50"]
            entry.update(reroute_over_pdrop=ratio, reroute_over_pdrop_met=ratio <= TARGETS["reroute_over_pdrop"])
        out["per_backend"][backend] = entry
    out["greedy_tokens_agree"] = _tokens_agree(records)
    out["per_precision"] = per_precision(records)
    out["floors"] = next((r["floors"] for r in records if r.get("floors")), None)
    out["kv_traffic_per_decode_step"] = kv_traffic_by_method(records)
    t, st = find(records, "reroute", "torch"), find(records, "reroute", "torch-static")
    if t is not None and st is not None:
        out["static_over_eager"] = t["prefill_ms_p50"] / st["prefill_ms_p50"]
        out["static_over_eager_decode"] = t["decode_ms_per_token"] / st["decode_ms_per_token"]
    o = find(records, "reroute", "onnxruntime")
    if t is not None and o is not None:
        ratio = t["prefill_ms_p50"] / o["prefill_ms_p50"]
        out["onnxruntime_over_torch"] = ratio
        out["onnxruntime_over_torch_met"] = ratio >= TARGETS["onnxruntime_over_torch"]
    return out


def per_precision(records: list[dict[str, Any]], backend: str = "onnxruntime") -> dict[str, dict[str, Any]]:
    """Per method, each precision of `backend` beside its fp32 record: weight bytes (and their
    ratio to fp16's, where an fp16 record ran), decode and prefill against fp32's and against
    the machine's floors (bench/floors.py), and agreement with fp32 (routing overlap per stage,
    greedy tokens)."""
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        if r["backend"] != backend or r.get("status") != "ok" or "weight_bytes" not in r:
            continue
        fp32, fp16 = (find(records, r["method"], backend, p) for p in ("fp32", "fp16"))
        e: dict[str, Any] = {k: r.get(k) for k in ("weight_bytes", "decoder_weight_bytes", "decode_ms_per_token",
                                                   "decode_floor_ms", "decode_over_floor", "prefill_ms_p50",
                                                   "prefill_floor_ms", "prefill_over_floor")}
        if fp16 is not None:
            e["weight_bytes_over_fp16"] = r["weight_bytes"] / fp16["weight_bytes"]
            e["decoder_weight_bytes_over_fp16"] = r["decoder_weight_bytes"] / fp16["decoder_weight_bytes"]
        if fp32 is not None and fp32 is not r:
            e["weight_bytes_over_fp32"] = r["weight_bytes"] / fp32["weight_bytes"]
            e["decode_speedup_vs_fp32"] = fp32["decode_ms_per_token"] / r["decode_ms_per_token"]
            e["prefill_speedup_vs_fp32"] = fp32["prefill_ms_p50"] / r["prefill_ms_p50"]
        a = r.get("agreement") or {}
        if a.get("reference") == f"{backend} fp32":
            e["vs_fp32"] = {k: v for k, v in a.items() if k != "reference"}
        out.setdefault(r["method"], {})[r["precision"]] = e
    return out


def precision_lines(per: dict[str, dict[str, Any]], backend: str = "onnxruntime") -> list[str]:
    """One line per (method, precision) when more than one precision ran."""
    lines = []
    for m, by in per.items():
        if len(by) < 2:
            continue
        for p, e in by.items():
            text = (f"{backend} {p} ({m}): weights {e['weight_bytes'] / 2**20:.1f} MiB (decoder "
                    f"{e['decoder_weight_bytes'] / 2**20:.1f})")
            if "weight_bytes_over_fp16" in e:
                text += f" = {e['weight_bytes_over_fp16']:.2f}x fp16's ({e['decoder_weight_bytes_over_fp16']:.2f}x decoder)"
            text += f"; decode {e['decode_ms_per_token']:.2f} ms/token"
            if "decode_speedup_vs_fp32" in e:
                text += f" ({speed_text(e['decode_speedup_vs_fp32'])} than fp32)"
            if e.get("decode_floor_ms"):
                text += f", {e['decode_over_floor']:.1f}x its bandwidth floor {e['decode_floor_ms']:.2f} ms"
            text += f"; prefill {e['prefill_ms_p50']:.1f} ms"
            if e.get("prefill_floor_ms"):
                text += f", {e['prefill_over_floor']:.1f}x its GEMM floor {e['prefill_floor_ms']:.1f} ms"
            if "vs_fp32" in e:
                v = e["vs_fp32"]
                overlap = "/".join(f"{x:.2f}" for x in v.get("stage_overlap", [])) or "-"
                text += (f"; vs fp32: routing overlap per stage {overlap}, greedy tokens equal for "
                         f"{v['tokens_equal_fraction']:.2f} of the steps")
            lines.append(text)
    return lines


def floors_line(f: dict[str, Any]) -> str:
    return (f"floors measured in this run: copy {f['copy_gb_per_s']:.1f} GB/s ({f['copy_device']}, read + write), "
            f"GEMM {f['gemm_gflop_per_s']:.0f} GFLOP/s ({'x'.join(map(str, f['shape']))}, {f['runtime']})")


# whose record speaks for a method's KV traffic: a backend that runs the artifact's fixed buffers first
_TRAFFIC_FROM = ("onnxruntime", "tensorrt", "torch-static", "torch")


def kv_traffic_by_method(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method, the KV-cache bytes one decode step moves (bench/traffic.py), from the
    record of the first backend in _TRAFFIC_FROM that ran (its buffers and KV dtype)."""
    out: dict[str, dict[str, Any]] = {}
    rank = {b: i for i, b in enumerate(_TRAFFIC_FROM)}
    for r in sorted(records, key=lambda r: (r.get("status") != "ok", rank.get(r["backend"], len(rank)))):
        if "kv_traffic_per_decode_step" in r and r["method"] not in out:
            out[r["method"]] = {"backend": r["backend"], **r["kv_traffic_per_decode_step"]}
    return out


def agreement(ref: Observed, got: Observed) -> dict[str, Any]:
    """`got`'s memory pass against the reference's (check.loop.judge): the fraction of greedy
    tokens equal up to the first difference, the reference's top-2 logit margin there (a
    near tie, not a routing error, when tiny), whether the routing decisions are identical."""
    metrics, _ = judge(ref, got, {})
    entry: dict[str, Any] = {"tokens_equal_fraction": metrics["token_agreement"]}
    first, margins = metrics["first_divergent_step"], ref.margins or []
    if first is not None and first < len(margins):
        entry["first_difference"] = first
        entry["reference_top2_margin_there"] = margins[first]
    entry["decisions_equal"] = metrics["decision_exact"] == 1.0
    entry["stage_overlap"] = [float(s["overlap"]) for s in metrics.get("stages", [])]
    return entry


def _tokens_agree(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method, each backend's `agreement` with the reference backend (run.py: the eager
    torch one when it ran, else the first), keyed "BACKEND_vs_REFERENCE"."""
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        a = r.get("agreement")
        if r.get("status") == "ok" and a and r.get("baseline_precision", True):
            entry = {k: v for k, v in a.items() if k != "reference"}
            out.setdefault(r["method"], {})[f"{r['backend']}_vs_{a['reference']}"] = entry
    return out


COLUMNS = ["method", "backend", "precision", "vision_ms", "prefill_ms_p50", "prefill_ms_p90", "decode_ms_per_token",
           "peak_mem_mb", "peak_rss_mb", "measured_speedup", "theoretical_speedup", "prefill_tflops", "kv_cache_mib",
           "weights_mib", "decode_over_floor"]


def rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        row = {**r, "kv_cache_mib": r["kv_cache_bytes_fp16"] / 2**20}
        if "weight_bytes" in r:
            row["weights_mib"] = r["weight_bytes"] / 2**20
        if r.get("status") != "ok":
            row = {c: row.get(c, "") for c in ("method", "backend", "precision", "theoretical_speedup",
                                               "prefill_tflops", "kv_cache_mib")}
            row["vision_ms"] = r["status"]
        rows.append(row)
    return rows


def summary_lines(summary: dict[str, Any]) -> list[str]:
    t = summary["targets"]
    lines = []
    for backend, e in summary["per_backend"].items():
        if "reroute_speedup_vs_none" in e:
            lines.append(f"{backend}: reroute prefill {speed_text(e['reroute_speedup_vs_none'])} than none; "
                         f"theoretical {e['theoretical_speedup']:.2f}x -> {e['fraction_of_theoretical']:.2f} of it "
                         f"(target >= {t['fraction_of_theoretical']}: {_met(e['fraction_of_theoretical_met'])})")
        if "reroute_over_pdrop" in e:
            lines.append(f"{backend}: reroute prefill / pdrop prefill = {e['reroute_over_pdrop']:.3f} "
                         f"(target <= {t['reroute_over_pdrop']}: {_met(e['reroute_over_pdrop_met'])})")
    for m, agree in summary.get("greedy_tokens_agree", {}).items():
        lines.append(f"{m}: " + "; ".join(_agree_text(k, v) for k, v in agree.items()))
    for m, traffic in summary.get("kv_traffic_per_decode_step", {}).items():
        lines.append(traffic_line(m, traffic) + f" [{traffic['backend']}]")
    if "static_over_eager" in summary:
        lines.append(f"reroute, torch eager / torch-static: prefill {summary['static_over_eager']:.2f}x, "
                     f"decode {summary['static_over_eager_decode']:.2f}x")
    lines.extend(precision_lines(summary.get("per_precision", {})))
    if summary.get("floors"):
        lines.append(floors_line(summary["floors"]))
    if "onnxruntime_over_torch" in summary:
        lines.append(f"reroute prefill, torch eager / onnxruntime = {summary['onnxruntime_over_torch']:.2f}x "
                     f"(target >= {t['onnxruntime_over_torch']}: {_met(summary['onnxruntime_over_torch_met'])})")
    return lines


def speed_text(speedup: float) -> str:
    """none's time over ours as words that are true either way: 1.82x faster, or 1.82x slower
    (a 0.55x "speedup" is a slowdown, and "0.55x faster" says the opposite)."""
    if speedup >= 1:
        return f"{speedup:.2f}x faster"
    return f"{1 / speedup:.2f}x slower"  # both times are measured, so speedup > 0


def _agree_text(pair: str, e: dict[str, Any]) -> str:
    text = f"{pair}: greedy tokens equal for {e['tokens_equal_fraction']:.2f} of the steps"
    if "first_difference" in e:
        text += (f" (first difference at step {e['first_difference']}, where the reference's top-2 logit "
                 f"margin is {e['reference_top2_margin_there']:.3g})")
    if "decisions_equal" in e:
        text += f", routing decisions {'identical' if e['decisions_equal'] else 'DIFFERENT'}"
    return text


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def markdown(payload: dict[str, Any]) -> str:
    b, m = payload["bench"], payload["machine"]
    head = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    body = ["| " + " | ".join(_cell(row.get(c, "")) for c in COLUMNS) + " |" for row in rows(payload["records"])]
    return "\n".join([
        f"## {b['model']}, budget {b['budget']:g}",
        "",
        f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, {m['memory_gib']} GiB, GPU: {m['gpu'] or 'none'}; "
        f"torch {m['torch']}, onnxruntime {m['onnxruntime']}. Torch backends on {b.get('device', 'cpu')} in "
        f"{b.get('dtype', 'fp32')}{' (random weights)' if b.get('random_weights') else ''}. "
        f"Threads {b['threads']}, warm-up {b['warmup']}, "
        f"repeats {b['repeats']}, {b['decode_tokens']} decode tokens per pass. Load average (1, 5, 15 min) "
        f"before {m.get('load_average_before')}, after {m.get('load_average_after')}.",
        "",
        *head, *body, "",
        *[f"- {line}" for line in summary_lines(payload["summary"])], "",
    ])


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)
