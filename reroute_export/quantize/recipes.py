"""Recipes: how many calibration samples, the seed that picks and orders them, decode steps
per sample, which graphs, and the quantizer settings (calibration/recipes/*.json).

A recipe's `graphs` names graph kinds or single roles of the artifact's manifest["graphs"]:
`vision` (the vision graph, which serves every image size), `segment` (every
segment.s), `head` (every head.j), or one role such as `segment.2` or `head.0`. Routing
graphs (route.j, route.j.bK) are never quantized, so a recipe cannot name them (see
`FLOAT_KINDS`)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..files import read_json
from .calibration_set import calibration_dir

PRECISIONS = ("int8", "fp8")
LIBRARIES = ("onnxruntime", "modelopt")
KINDS = ("vision", "segment", "head")  # the graph kinds a recipe may quantize (its default: all of them)
# Weight-free graphs stay float: route.j scores the rows (fp32 softmax of q.k), picks K_j
# visual tokens with TopK and gathers the kept rows; it has no weight to quantize, and a
# quantized score would let rounding move a token across the TopK boundary. Kept float,
# a routing decision is exactly the fp32 algorithm's on whatever q/k the head gives it.
FLOAT_KINDS = {"route": "weight-free routing graph: scoring and selection stay float so decisions are exact"}
_LEGACY = {"prefill", "decode"}  # roles of the earlier prefill.onnx + decode.onnx layout
CALIBRATION_METHODS = ("minmax",)  # see the package docstring: histogram calibrators cannot mix text lengths


@dataclass
class Recipe:
    name: str
    precision: str
    library: str = "onnxruntime"
    samples: int = 7
    seed: int = 0
    decode_steps: int = 4
    graphs: list[str] = field(default_factory=lambda: list(KINDS))
    quantizer: dict[str, Any] = field(default_factory=dict)
    parity_tokens: int = 16
    source: str = ""

    def selects(self, role: str) -> bool:
        """Whether this recipe quantizes graph `role` (by kind, or by the role itself)."""
        return kind(role) in KINDS and any(role == g or (g in KINDS and kind(role) == g) for g in self.graphs)

    def q(self, key: str) -> Any:
        return self.quantizer.get(key, QUANTIZER_DEFAULTS[key])

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "precision": self.precision, "library": self.library,
                "samples": self.samples, "seed": self.seed, "decode_steps": self.decode_steps, "graphs": self.graphs,
                "quantizer": {k: self.q(k) for k in QUANTIZER_DEFAULTS}, "parity": {"tokens": self.parity_tokens}}


def kind(role: str) -> str:
    """vision -> vision, segment.2 -> segment, route.0.b1 -> route."""
    return role.split(".")[0]


QUANTIZER_DEFAULTS: dict[str, Any] = {
    "op_types": ["MatMul", "Gemm"],
    "activation_matmuls": False,  # attention / routing-score MatMuls stay float
    "exclude_lm_head": True,
    "routing_projections": "quantize",  # or "float": keep the projections feeding routing scores float
    "exclude_nodes": [],  # regular expressions over node names and torch module paths
    "per_channel": True,
    "symmetric_activations": True,
    "symmetric_weights": True,
    "calibration_method": "minmax",
    "quantize_bias": False,
}


def recipes_dir() -> Path:
    return calibration_dir() / "recipes"


def load_recipe(spec: str | None, precision: str) -> Recipe:
    """A recipe by name (calibration/recipes/NAME.json) or file; default PRECISION-default."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    spec = spec or f"{precision}-default"
    path = Path(spec)
    if not (path.suffix == ".json" or os.sep in spec or "/" in spec):
        path = recipes_dir() / f"{spec}.json"
    if not path.is_file():
        known = sorted(p.stem for p in recipes_dir().glob("*.json")) if recipes_dir().is_dir() else []
        raise UserError(f"recipe {spec} not found (known: {', '.join(known) or 'none'}; or give a .json file)")
    raw = read_json(path, "recipe")
    if not isinstance(raw, dict):
        raise UserError(f"recipe {path} is not a JSON object")
    want = raw.get("precision", precision)
    if want != precision:
        raise UserError(f"recipe {path.stem} is for {want}; this run asks for --precision {precision}")
    quant = raw.get("quantizer", {})
    if not isinstance(quant, dict) or set(quant) - set(QUANTIZER_DEFAULTS):
        unknown = sorted(set(quant) - set(QUANTIZER_DEFAULTS)) if isinstance(quant, dict) else quant
        raise UserError(f"recipe {path}: unknown quantizer settings {unknown}")
    recipe = Recipe(
        name=str(raw.get("name", path.stem)), precision=precision, library=str(raw.get("library", "onnxruntime")),
        samples=raw.get("samples", 7), seed=raw.get("seed", 0), decode_steps=raw.get("decode_steps", 4),
        graphs=_listed(raw.get("graphs", KINDS)), quantizer=dict(quant),
        parity_tokens=(raw.get("parity") or {}).get("tokens", 16), source=str(path))
    _check_recipe(recipe, path)
    return recipe


def _listed(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value  # anything else is refused by the check


def _check_recipe(r: Recipe, path: Path) -> None:
    def bad(msg: str) -> UserError:
        return UserError(f"recipe {path}: {msg}")

    for name in ("samples", "seed", "decode_steps", "parity_tokens"):
        value = getattr(r, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name == "samples" else 0):
            raise bad(f"{name} must be an integer >= {1 if name == 'samples' else 0}, got {value!r}")
    if r.library not in LIBRARIES:
        raise bad(f"library must be one of {', '.join(LIBRARIES)}, got {r.library!r}")
    if not isinstance(r.graphs, list) or not r.graphs or not all(isinstance(g, str) for g in r.graphs):
        raise bad(f"graphs must be a non-empty list of {', '.join(KINDS)} or roles such as segment.0, got {r.graphs!r}")
    for g in r.graphs:
        if g in _LEGACY:
            raise bad(f"graphs: {g!r} is not a graph any more (prefill and decode run the same segment.s and "
                      f"head.j graphs); name {', '.join(KINDS)} or one role such as segment.0")
        if kind(g) in FLOAT_KINDS:
            raise bad(f"graphs: {g!r} cannot be quantized ({FLOAT_KINDS[kind(g)]})")
        if not re.fullmatch(r"(segment|head)(\.[0-9]+)?|vision(\.b[0-9]+)?", g):
            raise bad(f"graphs: unknown graph {g!r}; name {', '.join(KINDS)} or one role such as segment.0")
    if r.q("calibration_method") not in CALIBRATION_METHODS:
        raise bad(f"calibration_method must be one of {', '.join(CALIBRATION_METHODS)} (histogram calibrators cannot "
                  f"mix prompts of different lengths), got {r.q('calibration_method')!r}")
    if r.q("routing_projections") not in ("quantize", "float"):
        raise bad(f"routing_projections must be 'quantize' or 'float', got {r.q('routing_projections')!r}")
    if not set(r.q("op_types")) <= {"MatMul", "Gemm", "Conv"}:
        raise bad(f"op_types must be among MatMul, Gemm, Conv, got {r.q('op_types')}")
    for pattern in r.q("exclude_nodes"):
        try:
            re.compile(pattern)
        except re.error as e:
            raise bad(f"exclude_nodes: {pattern!r} is not a regular expression ({e})") from None
