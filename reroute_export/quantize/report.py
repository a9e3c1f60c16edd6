"""Calibration parity: the quantized artifact against the fp32 one, both run by ONNX Runtime on
CPU on the shipped sample photos (check.loop.compare_runtimes), judged with the precision's
tolerances; and the summary `calibrate` prints."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import UserError
from ..paths import shown_dir

if TYPE_CHECKING:
    from ..check.loop import Judged

CPU = ["CPUExecutionProvider"]


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _row(path: Path | str, prompt: str, judged: Judged) -> dict[str, Any]:
    return {"input": Path(path).name, "prompt": prompt, "metrics": judged.metrics, "failures": judged.failures,
            "fp32_ids": judged.reference.trace.generated_ids, "quantized_ids": judged.candidate.trace.generated_ids}


def parity_report(fp32: Path, quantized: Path, precision: str, tokens: int,
                  pairs: list[tuple[Path, str]] | None = None, judged_as: str | None = None) -> dict[str, Any]:
    """Quantized vs fp32 artifact, both through ONNX Runtime on CPU, on the shipped samples,
    judged with the tolerances of `judged_as` (default: `precision`'s own)."""
    from ..check.loop import compare_runtimes
    from ..check.tolerances import tolerances
    from ..preprocess import load_image, samples
    from ..runtime import OrtArtifact

    ref_art = OrtArtifact.load(fp32, CPU, verify=False)
    try:
        q_art = OrtArtifact.load(quantized, CPU, verify=False)
    except UserError as e:
        return {"measured": False, "reason": f"ONNX Runtime (CPU) cannot load the {precision} graphs: {e}"}
    tol = tolerances(ref_art.family, judged_as or precision)
    pairs = list(pairs or samples())
    cases = ((Path(path).name, ref_art.prepare(load_image(path), prompt)) for path, prompt in pairs)
    rows = []
    # ORT raises its own exception zoo at run time: any of it means "cannot run", not a crash
    for (path, prompt), judged in zip(pairs, compare_runtimes(ref_art, q_art, cases, tokens, tol, kv=False,
                                                              errors=(Exception,))):
        if judged.error is not None:
            return {"measured": False,
                    "reason": f"ONNX Runtime (CPU) cannot run the {precision} graphs: {_first_line(judged.error)}"}
        rows.append(_row(path, prompt, judged))
    return {"measured": True, "runtime": "onnxruntime", "providers": CPU, "reference": "fp32 artifact (ONNX Runtime)",
            "tokens": tokens, "tolerances": tol, "judged_as": judged_as or precision, **_summary(rows, ref_art.plan),
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


def print_summary(manifest: dict[str, Any], output: str | Path) -> None:
    q = manifest["quantization"]
    n = sum(g.get("quantized_nodes", 0) for g in q["graphs"].values())
    print(f"wrote {shown_dir(output)} ({manifest['model']}, {manifest['precision']} QDQ via {q['library']} "
          f"{q['version']}, {n} MatMul/Gemm quantized, {len(q['calibration']['samples'])} calibration samples, routing active)")
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
