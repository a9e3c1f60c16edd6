"""Submodules that share their name with a top-level API function.

`reroute_export.plan` and `reroute_export.export` are modules (plan.py, export/) and also
the public functions `rx.plan(...)` and `rx.export(...)` (api.py). A package attribute can
hold only one of them, and importing a submodule sets it to the module, so the module
itself is made callable: calling it calls the API function of the same name. Every
`import reroute_export.plan`/`from reroute_export.export.artifact import ...` keeps working.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class CallsApi(types.ModuleType):
    """A module whose call is `reroute_export.api.<its name>(...)`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from . import api

        return getattr(api, self.__name__.rpartition(".")[2])(*args, **kwargs)


def make_callable(module_name: str) -> None:
    """Give the loaded module `module_name` CallsApi's `__call__` (the documented way to
    customise a module: assigning its `__class__`, Python data model 3.3.2.1)."""
    sys.modules[module_name].__class__ = CallsApi
