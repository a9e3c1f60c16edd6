"""Recipes: how many calibration samples, the seed that picks and orders them, decode steps
per sample, which graphs, and the quantizer settings (calibration/recipes/*.json)."""

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
ROLES = ("vision", "prefill", "decode")
CALIBRATION_METHODS = ("minmax",)  # see the package docstring: histogram calibrators cannot mix text lengths


@dataclass
class Recipe:
    name: str
    precision: str
    library: str = "onnxruntime"
    samples: int = 7
    seed: int = 0
    decode_steps: int = 4
    graphs: list[str] = field(default_factory=lambda: list(ROLES))
    quantizer: dict[str, Any] = field(default_factory=dict)
    parity_tokens: int = 16
    source: str = ""

    def q(self, key: str) -> Any:
        return self.quantizer.get(key, QUANTIZER_DEFAULTS[key])

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "precision": self.precision, "library": self.library,
                "samples": self.samples, "seed": self.seed, "decode_steps": self.decode_steps, "graphs": self.graphs,
                "quantizer": {k: self.q(k) for k in QUANTIZER_DEFAULTS}, "parity": {"tokens": self.parity_tokens}}


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
        graphs=list(raw.get("graphs", ROLES)), quantizer=dict(quant),
        parity_tokens=(raw.get("parity") or {}).get("tokens", 16), source=str(path))
    _check_recipe(recipe, path)
    return recipe


def _check_recipe(r: Recipe, path: Path) -> None:
    def bad(msg: str) -> UserError:
        return UserError(f"recipe {path}: {msg}")

    for name in ("samples", "seed", "decode_steps", "parity_tokens"):
        value = getattr(r, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name == "samples" else 0):
            raise bad(f"{name} must be an integer >= {1 if name == 'samples' else 0}, got {value!r}")
    if r.library not in LIBRARIES:
        raise bad(f"library must be one of {', '.join(LIBRARIES)}, got {r.library!r}")
    if not r.graphs or set(r.graphs) - set(ROLES):
        raise bad(f"graphs must be a non-empty subset of {list(ROLES)}, got {r.graphs}")
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
