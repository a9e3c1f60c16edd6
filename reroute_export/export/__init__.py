"""Exporting: ONNX graphs, the `reroute` functions, vision graphs, streamed weights, the
atomic artifact folder (the conductor is reroute_export/pipeline.py).

Calling the package, `reroute_export.export(...)`, is the public API's export (api.py).
"""

from __future__ import annotations

from .._callable import make_callable

make_callable(__name__)  # the package attribute `export` is this package: it must be the function too
