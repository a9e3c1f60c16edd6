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


# parity --layers (check/layers.py): per decoder layer, in prefill and each decode step, the
# artifact's output hidden state and roped K/V rows against the reference's. Cosine over
# the compared rows; `rel_err` = ||got - ref|| / ||ref||. fp32 also bounds the relative error:
# a cosine of 0.99 allows ~14% error, far looser than parity's logits bound, and a layer
# check that passes where parity fails would localise nothing.
LAYER_DEFAULTS: dict[str, dict[str, float]] = {
    "fp32": {"hidden_cosine_min": 0.9999, "key_cosine_min": 0.9999, "value_cosine_min": 0.9999,
             "hidden_rel_err_max": 1e-3, "key_rel_err_max": 1e-3, "value_rel_err_max": 1e-3},
    "fp16": {"hidden_cosine_min": 0.99, "key_cosine_min": 0.99, "value_cosine_min": 0.99},
}
LAYER_KINDS = ("hidden", "key", "value")
LAYER_METRICS = {f"{kind}_{m}" for kind in LAYER_KINDS for m in ("cosine_min", "rel_err_max", "max_abs_max")}


def _layered(defaults: dict[str, dict[str, float]], family: str, precision: str,
             overrides: dict[str, float] | None) -> dict[str, float]:
    """The precision's defaults, then the family's overrides, then the user's."""
    tol = dict(defaults.get(precision, defaults["fp16"]))
    tol.update(get_family(family).tolerance_overrides.get(precision, {}))
    tol.update(overrides or {})
    return tol


def tolerances(family: str, precision: str, overrides: dict[str, float] | None = None) -> dict[str, float]:
    """parity's bounds (a --layers bound given with --tol is not one of them)."""
    return {k: v for k, v in _layered(DEFAULTS, family, precision, overrides).items() if k not in LAYER_METRICS}


def layer_tolerances(family: str, precision: str, overrides: dict[str, float] | None = None) -> dict[str, float]:
    """parity --layers' bounds, layered the same way (int8/fp8 take fp16's until measured)."""
    return {k: v for k, v in _layered(LAYER_DEFAULTS, family, precision, overrides).items() if k in LAYER_METRICS}
