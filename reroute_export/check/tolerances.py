"""Tolerances are data: per precision (and family, where one needs looser bounds: the
family's own `Family.tolerance_overrides`, families/<family>.py).

A metric named `*_min` must be >= the bound, `*_max` must be <= it. fp32 artifacts must
reproduce the reference (routing identical, logits within 1e-4, every greedy token);
fp16 ones are judged by agreement, since fp16 rounding can legitimately flip a near-tie
in the routing scores.
"""

from __future__ import annotations

from ..families import get_family

DEFAULTS: dict[str, dict[str, float]] = {
    "fp32": {
        "logits_max_abs_max": 1e-4,
        "vision_max_abs_max": 1e-4,
        "decision_exact_min": 1.0,  # fraction of stages whose selected set is identical
        "token_agreement_min": 1.0,
    },
    "fp16": {
        "decision_overlap_min": 0.9,  # |ref ∩ got| / K, worst stage
        "logits_cosine_min": 0.99,
        "vision_cosine_min": 0.99,
    },
    "int8": {"decision_overlap_min": 0.7, "logits_cosine_min": 0.9},
    "fp8": {"decision_overlap_min": 0.7, "logits_cosine_min": 0.9},
}

# Every metric a tolerance may bound (parity's --tol NAME=VALUE), beyond those set above.
METRICS = {
    "logits_max_abs_max", "logits_mean_abs_max", "logits_cosine_min", "top5_overlap_min",
    "decision_exact_min", "decision_overlap_min", "token_agreement_min",
    "vision_max_abs_max", "vision_mean_abs_max", "vision_cosine_min",
}


def tolerances(family: str, precision: str, overrides: dict[str, float] | None = None) -> dict[str, float]:
    tol = dict(DEFAULTS.get(precision, DEFAULTS["fp16"]))
    tol.update(get_family(family).tolerance_overrides.get(precision, {}))
    tol.update(overrides or {})
    return tol
