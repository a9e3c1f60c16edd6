"""Export the static-shape prefill and decode graphs (torch.onnx dynamo exporter).

Text length is one symbolic axis of the prefill graph (bounded by max_prompt_tokens);
each stage's cache length is one symbolic axis of the decode graph, shared by that
stage's layers. N and every K_s are constants of the graph.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import onnx
import torch
from torch.export import Dim

from ..families.base import Family
from ..plan import RoutingPlan
from ..rewrite.decoder import eager_attention, static_decode, static_prefill
from ..rewrite.precision import layer_dtypes
from .. import contract as C
from .onnx_ops import TRANSLATIONS, attach_functions, inline_functions
from .stream import StreamedGraph, WeightStream

TWO_GB = 2**31


@dataclass(frozen=True)
class DecoderExample:
    """Example prefill inputs (batch 1) used to trace; shapes only, values irrelevant."""

    inputs_embeds: torch.Tensor  # (1, L, D)
    position_ids: torch.Tensor  # (1, L) or (3, 1, L)
    visual_start: torch.Tensor  # (1,)


def kv_names(num_layers: int, prefix: str) -> list[str]:
    make = C.present if prefix == "present" else C.past
    return [make(i, kind) for i in range(num_layers) for kind in ("key", "value")]


def stage_of_layers(plan: RoutingPlan) -> list[int]:
    """Stage index per layer (0 = before the first decision)."""
    out, stage = [], 0
    starts = set(plan.decision_layers)
    for i in range(plan.num_layers):
        stage += i in starts
        out.append(stage)
    return out


def finish(model: "onnx.ModelProto | StreamedGraph", inline: bool) -> "onnx.ModelProto | StreamedGraph":
    """Attach `reroute` functions, pin IR version and opset (DESIGN.md 2). A streamed graph
    gets them when it is written (its proto exists only then)."""
    if isinstance(model, StreamedGraph):
        model.inline = inline
        return model
    model = attach_functions(model)
    if inline:
        model = inline_functions(model)
    model.ir_version = C.IR_VERSION
    return model


def save(model: "onnx.ModelProto | StreamedGraph", path: Path) -> None:
    """One file, or weights as external data when they pass protobuf's 2 GB limit; a
    streamed graph always writes its weights as external data, one tensor at a time."""
    if isinstance(model, StreamedGraph):
        model.write(Path(path), finish)
        return
    large = model.ByteSize() > TWO_GB - (64 << 20) if _can_size(model) else True
    if large:
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, path)


def _can_size(model: onnx.ModelProto) -> bool:
    try:
        model.ByteSize()
        return True
    except Exception:  # noqa: BLE001  (protobuf refuses to size > 2 GB messages)
        return False


def _export(module: torch.nn.Module, args: tuple, dynamic_shapes, input_names, output_names,
            stream: WeightStream | None = None) -> "onnx.ModelProto | StreamedGraph":
    """torch.onnx (dynamo) export, optimised; with `stream` the module's parameters are data-free
    stand-ins while tracing and the graph keeps lazy weights until it is saved."""
    # the exporter logs a warning per torchvision op it cannot register; we use none of them
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), (stream.stand_ins() if stream else nullcontext()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, args, dynamo=True, opset_version=C.OPSET, dynamic_shapes=dynamic_shapes,
            input_names=input_names, output_names=output_names, custom_translation_table=TRANSLATIONS,
            optimize=stream is None, verbose=False,
        )
        if stream is not None:
            return stream.bind(program.model, module)  # stand-ins still in place: their ids name them
    return program.model_proto


def export_prefill(
    model: torch.nn.Module, family: type[Family], plan: RoutingPlan, example: DecoderExample,
    max_prompt_tokens: int, *, inline: bool = False, stream: WeightStream | None = None,
) -> "onnx.ModelProto | StreamedGraph":
    n = plan.visual_tokens
    length = Dim("prompt_tokens", min=n + 2, max=max_prompt_tokens)
    pos_axis = example.position_ids.dim() - 1
    shapes = {"inputs_embeds": {1: length}, "position_ids": {pos_axis: length}, "visual_start": None}
    outputs = [C.LOGITS, *kv_names(plan.num_layers, "present"), *[C.selected(s) for s in range(len(plan.stages))]]
    with eager_attention(model), torch.no_grad():
        proto = _export(static_prefill(model, family, plan),
                        (example.inputs_embeds, example.position_ids, example.visual_start),
                        shapes, [C.INPUTS_EMBEDS, C.POSITION_IDS, C.VISUAL_START], outputs, stream)
    return finish(proto, inline)


def decode_example(plan: RoutingPlan, example: DecoderExample, num_kv_heads: int, head_dim: int,
                   dtypes: Sequence[torch.dtype] | None = None) -> tuple:
    """(inputs_embeds (1,1,D), position_ids, past k/v...) with each layer's true cache length
    (L - N + K_l) and dtype (`dtypes`, default the example's): zeros suffice, the exporter
    only needs shapes."""
    length, dtype = example.inputs_embeds.shape[1], example.inputs_embeds.dtype
    dtypes = dtypes or [dtype] * plan.num_layers
    past = []
    for keep, layer_dtype in zip(plan.keep_per_layer(), dtypes):
        kv = torch.zeros(1, num_kv_heads, length - plan.visual_tokens + keep, head_dim, dtype=layer_dtype)
        past += [kv, kv.clone()]
    pos = example.position_ids[..., -1:] + 1  # (1, 1) or (3, 1, 1)
    return (example.inputs_embeds[:, -1:], pos, *past)


def export_decode(
    model: torch.nn.Module, family: type[Family], plan: RoutingPlan, example: DecoderExample,
    max_total_tokens: int, *, inline: bool = False, stream: WeightStream | None = None,
) -> "onnx.ModelProto | StreamedGraph":
    attn = family.decoder(model).layers[0].self_attn
    args = decode_example(plan, example, attn.config.num_key_value_heads, attn.head_dim,
                          layer_dtypes(model, family))
    stages = stage_of_layers(plan)
    dims = [Dim(f"past_tokens_{s}", min=1, max=max_total_tokens) for s in range(len(plan.stages) + 1)]
    past_shapes: Sequence = tuple({2: dims[stages[i // 2]]} for i in range(2 * plan.num_layers))
    shapes = {"inputs_embeds": None, "position_ids": None, "past": past_shapes}
    with eager_attention(model), torch.no_grad():
        proto = _export(static_decode(model, family, plan), args, shapes,
                        [C.INPUTS_EMBEDS, C.POSITION_IDS, *kv_names(plan.num_layers, "past")],
                        [C.LOGITS, *kv_names(plan.num_layers, "present")], stream)
    return finish(proto, inline)
