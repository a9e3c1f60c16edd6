"""reroute-export: export vision-language models with in-decoder Reroute token routing.

    import reroute_export as rx

    a = rx.export("tiny-llava", budget=32, output="out/")
    print(rx.load_artifact("out/").generate("photo.jpg", "Describe the image."))

The public names resolve on first use (PEP 562 `__getattr__`), so `import reroute_export`
stays cheap and imports no torch: the runtime-only install has none. `rx.plan` and
`rx.export` are also the submodules plan.py and export/, made callable (_callable.py).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Artifact", "ExportResult", "PlanReport", "UserError", "export", "load_artifact", "plan"]

if TYPE_CHECKING:
    from .api import Artifact, PlanReport, export, load_artifact, plan
    from .errors import UserError
    from .pipeline import ExportResult

_HOMES = {"Artifact": "api", "PlanReport": "api", "load_artifact": "api", "UserError": "errors",
          "ExportResult": "pipeline"}
_CALLABLE_SUBMODULES = ("plan", "export")  # a module of that name that calls api.<name>


def __getattr__(name: str) -> Any:
    if name in _CALLABLE_SUBMODULES:  # importing it sets the attribute: this runs once at most
        return importlib.import_module(f".{name}", __name__)
    if name in _HOMES:
        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
