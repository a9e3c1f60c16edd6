"""Routing plans: schedules, the budget solver, and the static accounting.

A plan fixes, once, everything that later stages treat as static: the method, the
decision layers and every keep count K_s (DESIGN.md section 1). Keep counts follow the
paper: K_s = max(1, floor(N * r_s)), ratios of the ORIGINAL visual token count N.

Budget convention: a budget B is the average number of visual tokens per decoder
layer, avg_T = (1/n_layers) * sum_l K_l, with K_l = N before the first decision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from ._callable import make_callable
from .errors import UserError
from .spec import GraphSpec, Schedule, Shape

METHODS = ("none", "fastv", "pdrop", "reroute")
DELETE_METHODS = ("fastv", "pdrop")


@dataclass(frozen=True)
class Stage:
    layer: int  # first layer that runs on the routed sequence (scored on its own input)
    keep: int  # K_s visual tokens active in this stage
    ratio: float  # the ratio K_s came from (K_s = max(1, floor(N * ratio)))


@dataclass(frozen=True)
class RoutingPlan:
    method: str
    num_layers: int
    visual_tokens: int
    stages: tuple[Stage, ...] = ()

    @property
    def recoverable(self) -> bool:
        """Reroute re-scores all N visual tokens at each decision; delete methods cannot."""
        return self.method == "reroute"

    @property
    def decision_layers(self) -> tuple[int, ...]:
        return tuple(s.layer for s in self.stages)

    def keep_per_layer(self) -> list[int]:
        """Visual tokens processed by each decoder layer."""
        out, keep = [], self.visual_tokens
        by_layer = {s.layer: s.keep for s in self.stages}
        for layer in range(self.num_layers):
            keep = by_layer.get(layer, keep)
            out.append(keep)
        return out

    @property
    def avg_visual_tokens(self) -> float:
        return sum(self.keep_per_layer()) / self.num_layers

    def stage_layers(self, index: int) -> range:
        """Layer indices run by stage `index` (-1: the layers before the first decision)."""
        starts = [0, *self.decision_layers, self.num_layers]
        return range(starts[index + 1], starts[index + 2])

    @property
    def segments(self) -> list[range]:
        """Layers of each deployable segment s = 0..S (stage s: before decision s, after s - 1)."""
        return [self.stage_layers(s - 1) for s in range(len(self.stages) + 1)]

    def cache_tokens(self, max_prompt_tokens: int, max_new_tokens: int) -> list[int]:
        """Each segment's KV buffer length: its most prefill rows (L, then L - N + K_j) plus
        every new token."""
        rows = [max_prompt_tokens] + [max_prompt_tokens - self.visual_tokens + s.keep for s in self.stages]
        return [r + max_new_tokens for r in rows]

    def for_visual_tokens(self, n: int) -> "RoutingPlan":
        """The same schedule (method, decision layers, keep ratios) for an image of n visual
        tokens: K_j = keep_count(n, ratio_j), as `--keep-ratios` gives at that size (a
        Qwen2.5-VL visual-token bucket)."""
        stages = tuple(Stage(s.layer, keep_count(n, s.ratio), s.ratio) for s in self.stages)
        return RoutingPlan(self.method, self.num_layers, n, stages)

    def describe(self) -> str:
        if not self.stages:
            return f"{self.method} (all {self.visual_tokens} visual tokens)"
        keeps = ",".join(str(s.keep) for s in self.stages)
        layers = ",".join(str(s.layer) for s in self.stages)
        return f"{self.method} keeping {keeps} of {self.visual_tokens} at layers {layers}"

    def same_routing(self, other: "RoutingPlan") -> bool:
        """Same method, N and (layer, K) per stage: the ratios that produced K may differ."""
        key = lambda p: (p.method, p.num_layers, p.visual_tokens, [(s.layer, s.keep) for s in p.stages])  # noqa: E731
        return key(self) == key(other)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "num_layers": self.num_layers,
            "visual_tokens": self.visual_tokens,
            "stages": [{"layer": s.layer, "keep": s.keep, "ratio": s.ratio} for s in self.stages],
        }

    @classmethod
    def from_dict(cls, raw: dict) -> "RoutingPlan":
        stages = tuple(Stage(int(s["layer"]), int(s["keep"]), float(s["ratio"])) for s in raw["stages"])
        return cls(raw["method"], int(raw["num_layers"]), int(raw["visual_tokens"]), stages)


def keep_count(n: int, ratio: float) -> int:
    """K = max(1, floor(N * r)); the tiny epsilon stops 576 * (81/576) landing on 80.999."""
    return max(1, math.floor(n * ratio + 1e-9))


# ---------------------------------------------------------------- validation


def _check_layers(layers: Sequence[int], num_layers: int) -> tuple[int, ...]:
    layers = tuple(int(x) for x in layers)
    if not layers:
        raise UserError("a routing method needs at least one decision layer")
    bad = [d for d in layers if not 0 <= d < num_layers]
    if bad:
        raise UserError(f"decision layers {bad} out of range: valid layers are 0..{num_layers - 1}")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise UserError(f"decision layers must be strictly increasing without duplicates, got {list(layers)}")
    return layers


def _check_ratios(ratios: Sequence[float], count: int) -> tuple[float, ...]:
    if len(ratios) != count:
        raise UserError(f"got {len(ratios)} keep ratios for {count} decision layers; give one per layer")
    bad = [r for r in ratios if not 0 < r <= 1]
    if bad:
        raise UserError(f"keep ratios must be in (0, 1], got {bad}")
    return tuple(float(r) for r in ratios)


def _check_keeps(keeps: Sequence[int], count: int, n: int) -> tuple[int, ...]:
    if len(keeps) != count:
        raise UserError(f"got {len(keeps)} keep counts for {count} decision layers; give one per layer")
    bad = [k for k in keeps if not 1 <= k <= n]
    if bad:
        raise UserError(f"keep counts must be in 1..{n} (the visual token count), got {bad}")
    return tuple(int(k) for k in keeps)


def _check_monotonic(method: str, stages: Sequence[Stage]) -> None:
    """Physical delete cannot bring tokens back, so its stages can only shrink."""
    if method == "fastv" and len(stages) != 1:
        raise UserError(f"fastv makes exactly one decision, got {len(stages)} decision layers")
    if method in DELETE_METHODS:
        keeps = [s.keep for s in stages]
        if any(b > a for a, b in zip(keeps, keeps[1:])):
            raise UserError(f"{method} deletes tokens for good: keep counts must not increase, got {keeps}")


# ---------------------------------------------------------------- budget solver


def _ratios(shape: Shape, count: int, a: float) -> list[float]:
    if shape == "geometric":
        return [a ** (s + 1) for s in range(count)]
    if shape == "single":
        return [a] * count
    weights = list(shape) if len(shape) == count else [1.0] * count
    return [min(1.0, a * w) for w in weights]


def _breakpoints(shape: Shape, count: int, n: int) -> list[float]:
    """Every value of the shape parameter `a` at which some K_s changes."""
    points = set()
    for k in range(1, n + 1):
        x = k / n
        if shape == "geometric":
            points.update(x ** (1 / (s + 1)) for s in range(count))
        elif shape == "single":
            points.add(x)
        else:
            weights = list(shape) if len(shape) == count else [1.0] * count
            points.update(x / w for w in weights if w > 0)
    return sorted(p for p in points if 0 < p <= 1)


def solve_budget(
    budget: float, layers: Sequence[int], shape: Shape, num_layers: int, n: int, method: str
) -> RoutingPlan:
    """Keep counts for this schedule shape whose avg visual tokens per layer is nearest `budget`.

    The step function avg_T(a) is evaluated at every breakpoint of the shape parameter,
    so the answer is exact, not a bisection's approximation.
    """
    if not 0 < budget < n:
        raise UserError(f"budget {budget:g} out of range: valid budgets are 1..{n - 1} (visual tokens per layer)")
    best: RoutingPlan | None = None
    for a in _breakpoints(shape, len(layers), n):
        ratios = _ratios(shape, len(layers), a * (1 + 1e-12))
        stages = tuple(Stage(d, keep_count(n, r), r) for d, r in zip(layers, ratios))
        plan = RoutingPlan(method, num_layers, n, stages)
        if best is None or abs(plan.avg_visual_tokens - budget) < abs(best.avg_visual_tokens - budget):
            best = plan
    assert best is not None
    if abs(best.avg_visual_tokens - budget) > 1:
        lo = RoutingPlan(method, num_layers, n, tuple(Stage(d, 1, 1 / n) for d in layers)).avg_visual_tokens
        raise UserError(
            f"budget {budget:g} cannot be met with decision layers {list(layers)}: "
            f"this schedule reaches {best.avg_visual_tokens:.2f} at best (minimum {lo:.2f}); "
            "move the first decision layer earlier or raise the budget"
        )
    return best


# ---------------------------------------------------------------- the one entry point


def make_plan(
    spec: GraphSpec,
    method: str,
    *,
    budget: float | None = None,
    schedule: str | None = None,
    drop_layers: Sequence[int] | None = None,
    keep_ratios: Sequence[float] | None = None,
    keep: Sequence[int] | None = None,
) -> RoutingPlan:
    """The plan for `method` on `spec`: from a budget, explicit ratios, or explicit counts."""
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    n, num_layers = spec.vision.visual_tokens, spec.text.num_layers
    if method == "none":
        return RoutingPlan("none", num_layers, n)
    if keep_ratios is not None and keep is not None:
        raise UserError("give --keep-ratios or --keep, not both")
    sched: Schedule = spec.schedule(schedule or method)
    if sched.method != method:
        raise UserError(f"schedule {schedule!r} is for {sched.method}, not {method}")
    layers = _check_layers(drop_layers if drop_layers is not None else sched.layers, num_layers)
    if keep is not None:
        keeps = _check_keeps(keep, len(layers), n)
        stages = tuple(Stage(d, k, k / n) for d, k in zip(layers, keeps))
    elif keep_ratios is not None:
        ratios = _check_ratios(keep_ratios, len(layers))
        stages = tuple(Stage(d, keep_count(n, r), r) for d, r in zip(layers, ratios))
    elif budget is not None:
        stages = solve_budget(budget, layers, sched.shape, num_layers, n, method).stages
    else:
        raise UserError(f"method {method} needs --budget, --keep-ratios or --keep")
    _check_monotonic(method, stages)
    return RoutingPlan(method, num_layers, n, stages)


# ---------------------------------------------------------------- accounting


def layer_tokens(plan: RoutingPlan, text_tokens: int) -> list[int]:
    """Sequence length each layer processes in prefill: (L - N) text + K_l visual."""
    return [text_tokens + k for k in plan.keep_per_layer()]


def prefill_flops(spec: GraphSpec, tokens: Sequence[int]) -> float:
    """Decoder prefill FLOPs (multiply-add = 2): projections, MLP, QK^T and AV (full square)."""
    t = spec.text
    q, kv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    params = t.hidden_size * (2 * q + 2 * kv) + 3 * t.hidden_size * t.intermediate_size
    return sum(2.0 * n * params + 4.0 * n * n * q for n in tokens)


def vision_flops(spec: GraphSpec) -> float:
    """Vision tower FLOPs (ViT blocks only; patch embed and projector are small)."""
    v = spec.vision
    patches = (v.image_size // v.patch_size) ** 2
    params = 4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size
    return v.num_layers * (2.0 * patches * params + 4.0 * patches * patches * v.hidden_size)


def plan_report(spec: GraphSpec, plan: RoutingPlan, text_tokens: int | None = None) -> dict:
    """Per-stage table and totals, as printed by `plan` and written by `plan --json`."""
    text = spec.text_tokens if text_tokens is None else text_tokens
    full = RoutingPlan("none", plan.num_layers, plan.visual_tokens)
    routed, dense = layer_tokens(plan, text), layer_tokens(full, text)
    kv_bytes_per_entry = 2 * spec.text.num_kv_heads * spec.text.head_dim * 2  # K and V, fp16
    stages = [{"layer": -1, "layers": [0, plan.stage_layers(-1).stop - 1], "keep": plan.visual_tokens}]
    for i, s in enumerate(plan.stages):
        r = plan.stage_layers(i)
        stages.append({"layer": s.layer, "layers": [r.start, r.stop - 1], "keep": s.keep, "ratio": s.ratio})
    if plan.stages and plan.stages[0].layer == 0:
        stages = stages[1:]
    dense_flops, routed_flops = prefill_flops(spec, dense), prefill_flops(spec, routed)
    return {
        "model": spec.name,
        "method": plan.method,
        "num_layers": plan.num_layers,
        "visual_tokens": plan.visual_tokens,
        "text_tokens": text,
        "prompt_tokens": text + plan.visual_tokens,
        "stages": [s for s in stages if s["layer"] >= 0],
        "layer_groups": stages,
        "avg_visual_tokens": plan.avg_visual_tokens,
        "theoretical_speedup": sum(dense) / sum(routed),
        "token_layers": sum(routed),
        "kv_cache_entries": sum(routed),
        "kv_cache_bytes_fp16": sum(routed) * kv_bytes_per_entry,
        "kv_cache_bytes_fp16_none": sum(dense) * kv_bytes_per_entry,
        "prefill_tflops": routed_flops / 1e12,
        "prefill_tflops_none": dense_flops / 1e12,
        "vision_tflops": vision_flops(spec) / 1e12,
    }


make_callable(__name__)  # `reroute_export.plan` is this module; calling it is the public API's plan (api.py)
