"""export/exporter.py: torch.onnx's torchlib registry, built once per process."""

from __future__ import annotations

import warnings

import torch

from reroute_export import contract as C
from reroute_export.export import exporter
from reroute_export.export.onnx_ops import translations
from reroute_export.rewrite import ops


class _Select(torch.nn.Module):
    def forward(self, scores, visual_start):
        return ops.select_visual(torch.nn.functional.silu(scores), visual_start, 6, 2)


def _export() -> bytes:
    args = (torch.randn(1, 9), torch.tensor([1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(_Select().eval(), args, dynamo=True, opset_version=C.OPSET,
                                    custom_translation_table=translations(), verbose=False)
    return program.model_proto.graph.SerializeToString(deterministic=True)


def test_the_registry_is_built_once_and_exports_the_same(monkeypatch) -> None:
    from torch.onnx._internal.exporter import _registration

    cls = _registration.ONNXRegistry
    original = cls.__dict__["from_torchlib"]
    builds = []

    def counting(klass, *args, **kwargs):
        builds.append(args or kwargs)
        return original.__func__(klass, *args, **kwargs)

    monkeypatch.setattr(cls, "from_torchlib", classmethod(counting))
    monkeypatch.setattr(exporter, "_BUILT", {})
    plain = _export()
    assert len(builds) == 1
    with exporter.torchlib_registry_once():
        first, second = _export(), _export()
    assert len(builds) == 2  # one build served both exports
    assert cls.__dict__["from_torchlib"].__func__ is counting  # put back after the block
    assert first == second == plain  # node for node, the same graph
    (built,) = exporter._BUILT.values()
    custom = {op.name() for op in translations()}
    assert not custom & set(built.functions)  # each export's own translations went on its copy
