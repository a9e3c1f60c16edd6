"""The vision graph: pixel values -> projected visual tokens (N, D), static shapes.

The family picks the module (`Family.vision_module`: LLaVA's CLIP tower + projector, or
Qwen2.5-VL's vision transformer at one fixed grid; rewrite/vision.py); this writes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .. import contract as C
from .decoder import _export, save
from .stream import StreamedGraph, WeightStream

if TYPE_CHECKING:
    from ..families.base import Family


def export_vision(model: nn.Module, family: type[Family], path: Path, *, example_pixel_values: torch.Tensor,
                  image_grid_thw: tuple[int, int, int] | None = None, dtype: torch.dtype = torch.float32,
                  stream: "WeightStream | None" = None) -> None:
    """Write `vision.onnx`: one static input `pixel_values`, one output `image_features`."""
    module = family.vision_module(model, image_grid_thw).eval()
    with torch.no_grad():
        proto = _export(module, (example_pixel_values.to(dtype),), None, [C.PIXEL_VALUES], [C.IMAGE_FEATURES],
                        stream)
    if not isinstance(proto, StreamedGraph):  # a streamed graph is finished as it is written
        proto.ir_version = C.IR_VERSION
    save(proto, Path(path))
