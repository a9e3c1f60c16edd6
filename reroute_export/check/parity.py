"""`parity`: the eager fp32 reference and an exported artifact on the same inputs, judged.

Per input it reports routing agreement per stage (exact match, overlap of the selected
sets, the first stage that differs), last-logit max/mean |diff|, cosine and top-1/top-5
agreement, greedy token agreement with the first divergent step, the vision graph's
image features against the eager vision tower, and non-finite values with the first
decoder layer whose KV cache holds them. Tolerances come from `tolerances.py` (per family
and precision) and can be overridden per metric; a failure names the metric, its value,
the bound, and a bound that would have passed.

Exit codes (the CLI's): 0 all checks passed, 1 a check failed, 2 could not run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import GraphRunError, UserError
from ..files import read_json
from ..progress import Steps
from .compare import PerInputReport
from .loop import Judged, compare_runtimes
from .tolerances import DEFAULTS, tolerances


@dataclass
class ParityInput:
    name: str
    image: Path
    prompt: str


@dataclass
class ParityReport(PerInputReport):
    artifact: str
    model: str
    precision: str
    tolerances: dict[str, float]
    tokens: int
    inputs: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"artifact": self.artifact, "model": self.model, "precision": self.precision,
                "tolerances": self.tolerances, "tokens": self.tokens, "passed": self.passed,
                "failures": self.failures, "inputs": self.inputs}


# ---------------------------------------------------------------- input sets


def input_set(spec: str | None) -> list[ParityInput]:
    """The shipped sample photos and prompts, or the user's set: a JSON file (or a folder
    holding `inputs.json`) listing {"image": path relative to it, "prompt": text}."""
    if spec is None:
        from ..preprocess import samples

        return [ParityInput(Path(p).stem, Path(p), prompt) for p, prompt in samples()]
    path = Path(spec)
    if path.is_dir():
        path = path / "inputs.json"
    if not path.is_file():
        raise UserError(f"input set {spec} not found (a JSON file, or a folder with inputs.json)")
    raw = read_json(path, "input set")
    if not isinstance(raw, list) or not raw or not all(isinstance(r, dict) and {"image", "prompt"} <= set(r)
                                                      for r in raw):
        raise UserError(f"input set {path} must be a non-empty list of {{\"image\": ..., \"prompt\": ...}}")
    out = []
    for i, r in enumerate(raw):
        image = (path.parent / r["image"]).resolve()
        if not image.is_file():
            raise UserError(f"input set {path}: image {r['image']} not found")
        out.append(ParityInput(r.get("name") or f"{i}:{image.stem}", image, str(r["prompt"])))
    return out


# ---------------------------------------------------------------- the run


def _record(item: ParityInput, judged: Judged) -> dict[str, Any]:
    record = {"input": item.name, "image": str(item.image), "prompt": item.prompt, "metrics": judged.metrics}
    if judged.error is not None:  # the artifact itself is broken: a failed check, not a crash
        return {**record, "failures": [f"the artifact did not run: {judged.error}"]}
    ref, got = judged.reference.trace, judged.candidate.trace
    return {**record, "failures": judged.failures,
            "reference": {"decisions": ref.decisions, "generated_ids": ref.generated_ids},
            "artifact": {"decisions": got.decisions, "generated_ids": got.generated_ids}}


def run_parity(artifact: Path, model: str | None = None, inputs: str | None = None, tokens: int = 16,
               overrides: dict[str, float] | None = None, quiet: bool = False,
               on_result: Callable[[ParityInput, Any, Any, Any, Any], None] | None = None,
               runner: Any = None) -> ParityReport:
    """Run the reference and the artifact on every input of the set; never raises for a
    failed check (see `ParityReport.failures`), only for inputs it cannot run. `on_result(item,
    reference trace, artifact trace, artifact, inputs)` is called for each input that ran."""
    from ..preprocess import load_image
    from ..runtime import OrtArtifact
    from ..runtime.eager import ArtifactReference

    items = input_set(inputs)
    art = (runner or OrtArtifact).load(Path(artifact))
    m = art.manifest
    loaded, source = reference_model(art, model)
    tol = tolerances(m["family"], m["precision"], overrides)
    report = ParityReport(str(artifact), source, m["precision"], tol, tokens)
    # the artifact's own preprocessing, for both sides
    cases = ((i.name, art.prepare(load_image(i.image), i.prompt).to_torch()) for i in items)
    steps = Steps(len(items), quiet=quiet, title="parity")
    try:
        verdicts = compare_runtimes(ArtifactReference(loaded, art), art, cases, tokens, tol, errors=(GraphRunError,),
                                    step=lambda name: steps.step(f"{name}: reference vs artifact"))
        for item, judged in zip(items, verdicts):
            report.inputs.append(_record(item, judged))
            if on_result is not None and judged.error is None:
                on_result(item, judged.reference.trace, judged.candidate.trace, art, judged.inputs)
    finally:
        steps.close()
    return report


def reference_model(art: Any, model: str | None = None) -> tuple[Any, str]:
    """The eager reference for an artifact (`registry.Loaded`, fp32 on the CPU) and its source:
    `model`, or the one the artifact was exported from."""
    from ..registry import load
    from ..trace import spec_for_inputs

    m = art.manifest
    source = model or m.get("model_source") or m["model"]
    # a --random-weights artifact: the same seeded weights, drawn again on the CPU in fp32
    loaded = load(source, random_weights=bool(m.get("random_weights")) and model is None)
    if loaded.family.name != m["family"]:
        raise UserError(f"--model {source} is a {loaded.family.name} model; the artifact is {m['family']}")
    return spec_for_inputs(loaded, art.plan.visual_tokens), source


def parse_overrides(items: list[str] | None) -> dict[str, float]:
    """--tol NAME=VALUE (e.g. logits_max_abs_max=1e-3) -> {NAME: VALUE}, names checked."""
    from .tolerances import LAYER_METRICS, METRICS

    known = METRICS | LAYER_METRICS | {k for table in DEFAULTS.values() for k in table}
    out = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--tol takes NAME=VALUE, got {item!r}")
        if name not in known:
            raise UserError(f"unknown tolerance {name!r}; known: {', '.join(sorted(known))}")
        try:
            out[name] = float(value)
        except ValueError:
            raise UserError(f"--tol {name}: {value!r} is not a number") from None
    return out


# ---------------------------------------------------------------- reports


def summary_rows(report: ParityReport) -> list[dict[str, Any]]:
    """One row per input; every number beside the bound it was judged by, or "not checked"
    (an int8 row at 0.00 token agreement passes because no bound applies, and says so)."""
    rows = []
    for r in report.inputs:
        m = r["metrics"]
        if m is None:
            rows.append({"input": r["input"], "routing": "did not run", "result": "FAIL"})
            continue
        rows.append({"input": r["input"], "routing": _routing_cell(m, report.tolerances),
                     **{col: _cell(m, report.tolerances, parts) for col, parts in CELLS.items()},
                     "top1/top5": f"{'yes' if m['top1_agree'] else 'no'}/"
                                  + _value(m, report.tolerances, "top5_overlap", "", ".1f"),
                     "tokens": _value(m, report.tolerances, "token_agreement", "", ".2f")
                               + ("" if m["first_divergent_step"] is None else f", first differs at step "
                                                                               f"{m['first_divergent_step']}"),
                     "result": "pass" if not r["failures"] else "FAIL"})
    return rows


# column -> (metric, label, format): the first always shown, the others only where a tolerance bounds them
CELLS: dict[str, list[tuple[str, str, str]]] = {
    "logits max diff": [("logits_max_abs", "", ".2e"), ("logits_mean_abs", "mean ", ".2e")],
    "cosine": [("logits_cosine", "", ".5f")],
    "vision": [("vision_max_abs", "max diff ", ".2e"), ("vision_mean_abs", "mean ", ".2e"),
               ("vision_cosine", "cosine ", ".5f")],
}


def _bound(tol: dict[str, float], key: str) -> str | None:
    """The bound a metric is judged by, as text ("≥ 0.9", "≤ 0.0001"), or None when unbounded."""
    if f"{key}_min" in tol:
        return f"≥ {tol[f'{key}_min']:g}"
    return f"≤ {tol[f'{key}_max']:g}" if f"{key}_max" in tol else None


def _value(m: dict[str, Any], tol: dict[str, float], key: str, label: str, fmt: str) -> str:
    return f"{label}{m[key]:{fmt}} ({_bound(tol, key) or 'not checked'})"


def _cell(m: dict[str, Any], tol: dict[str, float], parts: list[tuple[str, str, str]]) -> str:
    shown = [p for i, p in enumerate(parts) if i == 0 or _bound(tol, p[0]) is not None]
    return ", ".join(_value(m, tol, *p) for p in shown)


def _routing_cell(m: dict[str, Any], tol: dict[str, float]) -> str:
    """exact, or the worst stage's overlap and the first differing layer; then the routing bounds."""
    text = "exact" if m["decision_exact"] == 1 else (f"overlap {m['decision_overlap']:.2f}, exact stages "
                                                     f"{m['decision_exact']:.2f}, first differs: layer "
                                                     f"{m['first_differing_stage']}")
    bounds = [f"{name} {b}" for key, name in (("decision_exact", "exact stages"), ("decision_overlap", "overlap"))
              if (b := _bound(tol, key)) is not None]
    return f"{text} ({'; '.join(bounds) or 'not checked'})"


COLUMNS = ["input", "routing", "logits max diff", "cosine", "top1/top5", "tokens", "vision", "result"]


def markdown(report: ParityReport, maps: dict[str, str] | None = None) -> str:
    lines = [f"## reroute-export parity: {'passed' if report.passed else 'FAILED'}", "",
             f"Artifact `{report.artifact}` ({report.precision}) against the eager fp32 reference `{report.model}`, "
             f"{report.tokens} greedy tokens per input.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in summary_rows(report):
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in COLUMNS) + " |")
    if report.failures:
        lines += ["", "### Failures", ""] + [f"- {f}" for f in report.failures]
    for r in report.inputs:
        stages = (r["metrics"] or {}).get("stages")
        if stages:
            lines += ["", f"<details><summary>{r['input']}: routing per stage</summary>", "",
                      "| layer | exact | overlap |", "|---|---|---|"]
            lines += [f"| {s['layer']} | {'yes' if s['exact'] else 'no'} | {s['overlap']:.3f} |" for s in stages]
            lines += ["", "</details>"]
        if maps and r["input"] in maps:
            lines += ["", f"Routing maps, reference (top) vs artifact (bottom), {r['input']}:", "",
                      f"![routing maps {r['input']}]({maps[r['input']]})"]
    lines += ["", "Tolerances: " + ", ".join(f"`{k}`={v:g}" for k, v in report.tolerances.items())]
    return "\n".join(lines) + "\n"
