"""Metrics between a reference trace and an artifact's trace on the same input."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..results import TraceResult


class PerInputReport:
    """A report whose `inputs` are dicts, each naming its "input" and its "failures": it
    passed when no input failed."""

    inputs: list[dict[str, Any]]

    @property
    def failures(self) -> list[str]:
        return [f"{r['input']}: {msg}" for r in self.inputs for msg in r["failures"]]

    @property
    def passed(self) -> bool:
        return not self.failures


def stage_agreement(ref: dict[str, list[int]], got: dict[str, list[int]]) -> list[dict[str, Any]]:
    rows = []
    for layer, kept in ref.items():
        other = got.get(layer, [])
        overlap = len(set(kept) & set(other)) / max(1, len(kept))
        rows.append({"layer": int(layer), "exact": kept == other, "overlap": overlap})
    return rows


def logit_metrics(ref: list[float], got: list[float]) -> dict[str, Any]:
    a, b = np.asarray(ref, dtype=np.float64), np.asarray(got, dtype=np.float64)
    diff = np.abs(a - b)
    cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
    top5 = len(set(np.argsort(-a)[:5]) & set(np.argsort(-b)[:5])) / 5
    return {
        "logits_max_abs": float(diff.max()), "logits_mean_abs": float(diff.mean()),
        "logits_argmax_at": int(diff.argmax()), "logits_cosine": cos,
        "top1_agree": bool(a.argmax() == b.argmax()), "top5_overlap": top5,
        "finite": bool(np.isfinite(b).all()),
    }


def vision_metrics(ref: np.ndarray, got: np.ndarray) -> dict[str, Any]:
    """The candidate's image features (N, D) against the reference's."""
    a, b = ref.astype(np.float64).reshape(-1), got.astype(np.float64).reshape(-1)
    d = np.abs(a - b)
    return {"vision_max_abs": float(d.max()), "vision_mean_abs": float(d.mean()),
            "vision_cosine": float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)),
            "vision_finite": bool(np.isfinite(b).all())}


def token_metrics(ref: list[int], got: list[int]) -> dict[str, Any]:
    n = max(len(ref), len(got))
    first = next((i for i in range(n) if i >= len(ref) or i >= len(got) or ref[i] != got[i]), None)
    agree = (first if first is not None else n) / max(1, n)
    return {"token_agreement": agree, "first_divergent_step": first, "tokens": n}


def compare(ref: TraceResult, got: TraceResult) -> dict[str, Any]:
    stages = stage_agreement(ref.decisions, got.decisions)
    out = {"stages": stages, **logit_metrics(ref.last_logits, got.last_logits),
           **token_metrics(ref.generated_ids, got.generated_ids)}
    out["decision_exact"] = sum(s["exact"] for s in stages) / len(stages) if stages else 1.0
    out["decision_overlap"] = min((s["overlap"] for s in stages), default=1.0)
    out["first_differing_stage"] = next((s["layer"] for s in stages if not s["exact"]), None)
    return out


def failures(metrics: dict[str, Any], tol: dict[str, float]) -> list[str]:
    """One message per failed check: the metric, its value, and the bound it missed."""
    bad = []
    if not metrics.get("finite", True):
        bad.append("non-finite values in the artifact's logits")
    for name, bound in tol.items():
        key, kind = name.rsplit("_", 1)
        value = metrics.get(key)
        if value is None:
            continue
        if kind == "max" and value > bound:
            bad.append(f"{key} = {value:.3g} > {bound:g} (a tolerance of {value * 1.01:.3g} would pass)")
        if kind == "min" and value < bound:
            where = f" (first differing stage: layer {metrics['first_differing_stage']})" \
                if key.startswith("decision") and metrics.get("first_differing_stage") is not None else ""
            bad.append(f"{key} = {value:.3g} < {bound:g}{where}")
    return bad
