"""What every torch.onnx (dynamo) export here shares: the torchlib registry, built once,
and graphs without the exporting machine's stack traces.

torch.onnx.export builds its ONNX registry from torchlib on every call (about 1 s on these
CPUs: each torchlib function's signature is parsed again); an artifact is 13 or more
exports. `torchlib_registry_once()` serves a copy of the first registry built for an
opset to every later call in the process; the copy is a new dict of new lists, so the
custom translations each export registers on it do not accumulate. The registry is
torch's own (private) class: where it is not the shape this expects, the exporter runs
untouched.

torch.onnx records on every node the Python stack that made it
(`pkg.torch.onnx.stack_trace`): absolute paths of the exporting checkout, so the same
export from two folders gave graphs that differ byte for byte, and a quarter of a graph
file's bytes. `drop_stack_traces` removes them; the module path of every node
(`namespace`, `pkg.torch.onnx.name_scopes`), which `check/layers.py` and
`quantize/select.py` read, stays.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

_BUILT: dict[Any, Any] = {}


def _registry_class() -> Any:
    try:
        from torch.onnx._internal.exporter import _registration
    except ImportError:
        return None
    cls = getattr(_registration, "ONNXRegistry", None)
    if cls is None or not isinstance(cls.__dict__.get("from_torchlib"), classmethod):
        return None
    return cls


def _copy(registry: Any) -> Any:
    out = type(registry)()
    out.__dict__.update(registry.__dict__)
    out.functions = {k: list(v) for k, v in registry.functions.items()}
    return out


@contextmanager
def torchlib_registry_once() -> Iterator[None]:
    """Within the block, ONNXRegistry.from_torchlib(opset) builds once per opset and process."""
    cls = _registry_class()
    if cls is None:
        yield
        return
    build = cls.__dict__["from_torchlib"]

    def from_torchlib(klass, *args, **kwargs):
        key = (klass, args, tuple(sorted(kwargs.items())))
        if key not in _BUILT:
            _BUILT[key] = build.__func__(klass, *args, **kwargs)
        return _copy(_BUILT[key])

    cls.from_torchlib = classmethod(from_torchlib)
    try:
        yield
    finally:
        cls.from_torchlib = build


STACK_TRACE = "pkg.torch.onnx.stack_trace"


def drop_stack_traces(model: Any) -> Any:
    """`model` (an onnx_ir Model) with no node's stack trace, in place, in every graph and function."""
    import onnx_ir as ir

    for graph in (model.graph, *model.functions.values()):
        for node in ir.traversal.RecursiveGraphIterator(graph):
            node.metadata_props.pop(STACK_TRACE, None)
    return model
