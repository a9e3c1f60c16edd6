"""The planner against the paper's tiers (DESIGN.md 1, budget convention)."""

from __future__ import annotations

import json

import pytest

from reroute_export.errors import UserError
from reroute_export.plan import make_plan, plan_report
from reroute_export.spec import known_specs, load_spec

LLAVA = load_spec("llava-1.5-7b")

# (tier, method, decision layers, keep ratios, expected keeps, expected avg_T)
PAPER = [
    (192, "fastv", [3], [0.2644], [152], 191.75),
    (192, "reroute", [3, 7, 15, 23], [0.2644] * 4, [152] * 4, 191.75),
    (192, "pdrop", [2, 7, 15, 23], [0.5965, 0.3558, 0.2123, 0.1266], [343, 204, 122, 72], 191.34375),
    (192, "reroute", [2, 7, 15, 23], [0.4502, 0.4502, 0.2251, 0.1126], [259, 259, 129, 64], 191.46875),
    (128, "fastv", [3], [0.1418], [81], 127.40625),
    (128, "reroute", [3, 7, 15, 23], [0.1418] * 4, [81] * 4, 127.40625),
    (128, "pdrop", [2, 7, 15, 23], [0.4570, 0.2088, 0.0954, 0.0436], [263, 120, 54, 25], 127.625),
    (128, "reroute", [2, 7, 15, 23], [0.2655, 0.2655, 0.1328, 0.0664], [152, 152, 76, 38], 127.4375),
    (64, "fastv", [3], [0.01916], [11], 63.96875),
    (64, "reroute", [3, 7, 15, 23], [0.01916] * 4, [11] * 4, 63.96875),
    (64, "pdrop", [2, 7, 15, 23], [0.2789, 0.0937, 0.0315, 0.0106], [160, 53, 18, 6], 80.4375),
    (64, "reroute", [2, 7, 15, 23], [0.1392, 0.1392, 0.0696, 0.0348], [80, 80, 40, 20], 84.125),
]


@pytest.mark.parametrize("tier,method,layers,ratios,keeps,avg", PAPER)
def test_paper_configs(tier, method, layers, ratios, keeps, avg) -> None:
    plan = make_plan(LLAVA, method, drop_layers=layers, keep_ratios=ratios)
    assert [s.keep for s in plan.stages] == keeps
    assert plan.avg_visual_tokens == pytest.approx(avg)
    if not (tier == 64 and len(layers) == 4 and layers[0] == 2):
        assert abs(plan.avg_visual_tokens - tier) < 1  # the paper's avg64 pyramids land near 80


@pytest.mark.parametrize("budget", [64, 128, 192])
@pytest.mark.parametrize("schedule", ["fastv", "pdrop", "reroute", "reroute-fastv"])
@pytest.mark.parametrize("model", ["llava-1.5-7b", "llava-1.5-13b", "qwen2.5-vl-7b", "qwen2.5-vl-3b"])
def test_solver_meets_every_budget(model, schedule, budget) -> None:
    spec = load_spec(model)
    method = spec.schedules[schedule].method
    plan = make_plan(spec, method, budget=budget, schedule=schedule)
    assert abs(plan.avg_visual_tokens - budget) <= 1
    assert plan.decision_layers == spec.schedules[schedule].layers


def test_solver_shapes() -> None:
    pd = make_plan(LLAVA, "pdrop", budget=128)
    keeps = [s.keep for s in pd.stages]
    assert keeps == sorted(keeps, reverse=True)
    ratios = [s.ratio for s in pd.stages]
    assert ratios[1] == pytest.approx(ratios[0] ** 2)  # geometric pyramid r_s = a^(s+1)
    rr = make_plan(LLAVA, "reroute", budget=128)
    assert [s.keep for s in rr.stages] == [153, 153, 76, 38]


def test_report_for_the_readme_example() -> None:
    r = plan_report(LLAVA, make_plan(LLAVA, "reroute", budget=128))
    assert {"avg_visual_tokens", "theoretical_speedup", "stages"} <= set(r)
    assert [(s["layer"], s["keep"]) for s in r["stages"]] == [(2, 153), (7, 153), (15, 76), (23, 38)]
    length = 576 + 40
    routed = 2 * length + 5 * (40 + 153) + 8 * (40 + 153) + 8 * (40 + 76) + 9 * (40 + 38)
    assert r["kv_cache_entries"] == routed
    assert r["theoretical_speedup"] == pytest.approx(32 * length / routed)
    assert r["kv_cache_bytes_fp16"] == routed * 2 * 32 * 128 * 2
    json.dumps(r)


def test_none_plan_has_no_stages() -> None:
    plan = make_plan(LLAVA, "none")
    assert plan.stages == () and plan.avg_visual_tokens == 576


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(method="reroute", budget=0), "valid budgets are 1..575"),
        (dict(method="reroute", budget=576), "valid budgets are 1..575"),
        (dict(method="reroute", budget=128, drop_layers=[2, 40]), "valid layers are 0..31"),
        (dict(method="reroute", budget=128, drop_layers=[7, 2]), "strictly increasing"),
        (dict(method="reroute", budget=128, drop_layers=[2, 2]), "strictly increasing"),
        (dict(method="reroute", drop_layers=[2, 7], keep_ratios=[0.5]), "1 keep ratios for 2"),
        (dict(method="reroute", drop_layers=[2], keep_ratios=[1.5]), r"\(0, 1\]"),
        (dict(method="reroute", drop_layers=[2], keep_ratios=[0]), r"\(0, 1\]"),
        (dict(method="pdrop", drop_layers=[2, 7], keep=[10, 20]), "must not increase"),
        (dict(method="fastv", drop_layers=[2, 7], keep=[20, 10]), "exactly one decision"),
        (dict(method="reroute", budget=5, drop_layers=[20]), "cannot be met"),
        (dict(method="magic", budget=5), "unknown method"),
        (dict(method="reroute"), "needs --budget"),
    ],
)
def test_bad_plans_say_why(kwargs, message) -> None:
    with pytest.raises(UserError, match=message):
        make_plan(LLAVA, **kwargs)


def test_every_spec_is_consistent() -> None:
    for spec in known_specs().values():
        for sched in spec.schedules.values():
            assert all(0 <= d < spec.text.num_layers for d in sched.layers), spec.name
        if spec.family == "llava":
            assert (spec.vision.image_size // spec.vision.patch_size) ** 2 == spec.vision.visual_tokens
