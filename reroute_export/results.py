"""The `trace` contract (decisions, last logits, greedy ids, text, plan), torch-free.

Both the eager reference (trace.run_trace) and the artifact runtimes (runtime/ort.py) return
a `TraceResult`; the artifact runtime must import nothing that imports torch, so the
contract lives here rather than beside the eager code (`trace` re-exports it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .plan import RoutingPlan


@dataclass
class TraceResult:
    decisions: dict[str, list[int]]  # decision layer -> ascending visual indices active after it
    last_logits: list[float]
    generated_ids: list[int]
    text: str
    plan: RoutingPlan

    def to_json(self) -> dict[str, Any]:
        return {
            "decisions": self.decisions,
            "last_logits": self.last_logits,
            "generated_ids": self.generated_ids,
            "text": self.text,
            "plan": self.plan.to_dict(),
        }


def stage_table(result: TraceResult) -> list[dict[str, Any]]:
    """Per decision: tokens kept, deferred (or deleted) and re-entered after a deferral."""
    rows, seen_deferred, n = [], set(), result.plan.visual_tokens
    for s, (layer, kept) in zip(result.plan.stages, result.decisions.items()):
        kept_set = set(kept)
        back = kept_set & seen_deferred
        seen_deferred |= set(range(n)) - kept_set
        rows.append({"layer": int(layer), "kept": len(kept), "deferred": n - len(kept), "re-entered": len(back)})
    return rows
