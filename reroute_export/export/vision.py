"""The vision graph: pixel values -> projected visual tokens (N, D).

The family picks the module (`Family.vision_module`: LLaVA's CLIP tower + projector at its
one image size, static; or Qwen2.5-VL's vision transformer for any grid; rewrite/vision.py);
this writes it. Qwen2.5-VL's graph takes each grid's tables beside the patches
(`Family.vision_tables`), and its patch axis spans the artifact's image-size buckets, so
one graph (one copy of the vision weights) serves every size; the tables of each bucket
are returned for the artifact to ship (contract.VISION_GRIDS).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch import nn
from torch.export import Dim

from .. import contract as C
from .decoder import _by_signature, _export, save
from .stream import StreamedGraph, WeightStream

if TYPE_CHECKING:
    from ..families.base import Family


def export_vision(model: nn.Module, family: type[Family], path: Path, *, example_pixel_values: torch.Tensor,
                  grids: Sequence[tuple[int, int, int] | None] = (None,), dtype: torch.dtype = torch.float32,
                  stream: "WeightStream | None" = None) -> list[dict[str, np.ndarray]]:
    """Write `vision.onnx` (`pixel_values` + the tables -> `image_features`) for the image
    grids of the artifact's buckets (bucket 0: the example's); returns each grid's tables."""
    module = family.vision_module(model).eval()
    tables = [family.vision_tables(model, g) for g in grids]
    args = (example_pixel_values.to(dtype), *tables[0].values())
    names = [C.PIXEL_VALUES, *tables[0]]
    with torch.no_grad():
        proto = _export(module, args, _patch_axis(module, grids, tables), names, [C.IMAGE_FEATURES], stream)
    if not isinstance(proto, StreamedGraph):  # a streamed graph is finished as it is written
        proto.ir_version = C.IR_VERSION
    save(proto, Path(path))
    return [{name: t.numpy() for name, t in tab.items()} for tab in tables]


def _patch_axis(module: nn.Module, grids: Sequence[tuple[int, int, int] | None],
                tables: list[dict[str, torch.Tensor]]) -> dict | None:
    """torch.export dynamic shapes: the patch axis (a multiple of the merge unit) free over
    the buckets' patch counts; static when every bucket has the same count (or no tables)."""
    if not tables[0]:
        return None
    units = [len(t[C.WINDOW_INDEX]) for t in tables]
    if min(units) == max(units):
        return None
    merged = Dim("merged_patches", min=min(units), max=max(units))
    patches = merged * (len(tables[0][C.WINDOW_BLOCKS]) // units[0])
    axis = {C.PIXEL_VALUES: patches, C.WINDOW_INDEX: merged, C.REVERSE_INDEX: merged,
            C.ROTARY_COS: patches, C.ROTARY_SIN: patches, C.WINDOW_BLOCKS: patches}
    return _by_signature(module, [{0: axis[n]} for n in (C.PIXEL_VALUES, *tables[0])])
