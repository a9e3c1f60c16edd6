"""Mixed precision for fp16 exports: named decoder layers kept in fp32 (`--fp32-layers`).

fp16 can overflow in a few layers of a model (large MLP activations late in the stack);
the post-export check and `parity` name the first layer whose KV cache holds a non-finite
value. The documented fallback is to keep that layer (and usually the rest of the stack
after it) in fp32: the layer's weights become fp32, its inputs are cast up on the way in
and its hidden-state output cast back to the export dtype on the way out (clamped to the
fp16 range: overflow usually happens inside a layer, in the MLP's intermediate
activations, not in the residual stream between layers). Its KV cache
stays fp32 (the decode graph declares fp32 `past.{i}.*` for it; the runtime casts feeds to
whatever each graph declares). Routing scores are computed in fp32 in every layer anyway.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from ..families.base import Family


def _cast(x: Any, dtype: torch.dtype) -> Any:
    """Floating tensors (nested in tuples/lists) to `dtype`; going down to fp16 they are
    clamped to its finite range first (as T5 does), so a value that only fits fp32
    saturates instead of becoming inf."""
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            return x
        if dtype == torch.float16 and x.dtype == torch.float32:
            big = torch.finfo(torch.float16).max
            x = x.clamp(-big, big)
        return x.to(dtype)
    if isinstance(x, (tuple, list)):
        return type(x)(_cast(v, dtype) for v in x)
    return x


def keep_layers_fp32(model: nn.Module, family: type[Family], layers: Iterable[int]) -> list[int]:
    """Make `layers` of `model`'s decoder run in fp32 inside an otherwise fp16 model (in place)."""
    decoder_layers = family.decoder(model).layers
    low = next(model.parameters()).dtype
    chosen = sorted(set(layers))
    for i in chosen:
        layer = decoder_layers[i].float()
        layer.register_forward_pre_hook(lambda mod, args, kwargs: (_cast(args, torch.float32),
                                                                   _cast(kwargs, torch.float32)), with_kwargs=True)
        layer.register_forward_hook(lambda mod, args, out: _cast(out, low))
    return chosen


def layer_dtypes(model: nn.Module, family: type[Family]) -> list[torch.dtype]:
    """The dtype each decoder layer runs (and caches its K/V) in."""
    return [next(layer.parameters()).dtype for layer in family.decoder(model).layers]


def parse_layers(text: str, num_layers: int) -> list[int]:
    """'20-31' or '3,5,7' or '28-' (to the last layer) -> sorted layer indices, range-checked."""
    out: set[int] = set()
    for part in (p.strip() for p in text.split(",") if p.strip()):
        lo, dash, hi = part.partition("-")
        try:
            a = int(lo)
            b = (int(hi) if hi else num_layers - 1) if dash else a
        except ValueError:
            raise ValueError(f"--fp32-layers: {part!r} is not a layer index or range (e.g. 20-31)") from None
        if not 0 <= a <= b < num_layers:
            raise ValueError(f"--fp32-layers: {part!r} is outside 0..{num_layers - 1}")
        out.update(range(a, b + 1))
    return sorted(out)
