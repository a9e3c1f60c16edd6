"""Per-model static facts (graphs/*.json), normalised once.

A graph spec is what `plan` needs without weights: layer count, widths, visual token
count, image size and the default routing schedules. Rewrites and the planner read
`spec.text.num_kv_heads`, never raw HF config fields (STYLE.md principle 3).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Union

from .errors import UserError
from .paths import shipped_dir


Shape = Union[str, tuple[float, ...]]  # "single" | "geometric" | relative weights per stage


@dataclass(frozen=True)
class TextSpec:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int


@dataclass(frozen=True)
class VisionSpec:
    image_size: int
    patch_size: int
    num_layers: int
    hidden_size: int
    intermediate_size: int
    visual_tokens: int


@dataclass(frozen=True)
class Schedule:
    """A schedule shape: which layers decide, and how keep ratios relate across stages.

    shape "single": one decision (FastV). "geometric": r_s = a**(s+1) (PyramidDrop's
    pyramid). A tuple of weights: r_s = a * w_s. The planner solves `a` for a budget.
    """

    method: str
    layers: tuple[int, ...]
    shape: Shape


@dataclass(frozen=True)
class GraphSpec:
    name: str
    family: str
    checkpoint: str | None
    text: TextSpec
    vision: VisionSpec
    text_tokens: int
    schedules: dict[str, Schedule] = field(default_factory=dict)
    note: str = ""

    def schedule(self, name: str) -> Schedule:
        if name not in self.schedules:
            raise UserError(f"no schedule {name!r} for {self.name}; known: {', '.join(self.schedules)}")
        return self.schedules[name]

    def with_layers(self, num_layers: int) -> "GraphSpec":
        """The same family defaults on a model with another depth (decision layers scaled)."""
        ref = self.text.num_layers
        scaled = {}
        for key, sch in self.schedules.items():
            layers = sorted({min(num_layers - 1, round(d * num_layers / ref)) for d in sch.layers})
            shape = sch.shape if isinstance(sch.shape, str) else sch.shape[: len(layers)]
            scaled[key] = replace(sch, layers=tuple(layers), shape=shape)
        return replace(self, text=replace(self.text, num_layers=num_layers), schedules=scaled)


def _schedule(raw: dict[str, Any]) -> Schedule:
    shape = raw["shape"]
    return Schedule(
        method=raw["method"],
        layers=tuple(int(x) for x in raw["layers"]),
        shape=shape if isinstance(shape, str) else tuple(float(x) for x in shape),
    )


def spec_to_dict(spec: GraphSpec) -> dict[str, Any]:
    """JSON-ready fields that `spec_from_dict` reads back (an artifact records the spec it was
    planned on, so its plan flags can be checked where its model is not registered)."""
    return asdict(spec)


def spec_from_dict(raw: dict[str, Any]) -> GraphSpec:
    return GraphSpec(
        name=raw["name"],
        family=raw["family"],
        checkpoint=raw.get("checkpoint"),
        text=TextSpec(**raw["text"]),
        vision=VisionSpec(**raw["vision"]),
        text_tokens=int(raw.get("text_tokens", 40)),
        schedules={k: _schedule(v) for k, v in raw.get("schedules", {}).items()},
        note=raw.get("note", ""),
    )


def graphs_dir() -> Path:
    """graphs/ of the checkout, or the wheel's copy inside the package (one resolver: paths.py)."""
    return shipped_dir("graphs")


def known_specs() -> dict[str, GraphSpec]:
    """Every spec in graphs/, by name."""
    out = {}
    for path in sorted(graphs_dir().glob("*.json")):
        spec = spec_from_dict(json.loads(path.read_text()))
        out[spec.name] = spec
    return out


def load_spec(name: str) -> GraphSpec:
    specs = known_specs()
    if name not in specs:
        raise UserError(f"unknown model {name!r}; known: {', '.join(specs)} (or a local checkpoint folder)")
    return specs[name]
