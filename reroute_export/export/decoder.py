"""Export the deployable decoder's graphs (rewrite/segments.py) with torch.onnx (dynamo).

One graph per role: segment.s (layers of stage s), head.j (decision j's norm + q/k/v),
route.j (weight-free routing). Every decoder weight lands in exactly one graph. Free axes:
a segment's and a head's row count T (one token in decode, the compact prompt in
prefill, up to max_prompt_tokens), a segment's past-buffer length P (1 in prefill, the
stage's fixed M_s in decode), a routing graph's scored rows (text length varies). N and
every K_j are constants of the routing graphs.
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
from ..rewrite.segments import Program
from .. import contract as C
from .attention import lower
from .exporter import drop_stack_traces, torchlib_registry_once
from .norms import rsqrt_as_div
from .onnx_ops import attach_functions, inline_functions, translations
from .stream import EXTERNAL_ABOVE, StreamedGraph, WeightStream



@dataclass(frozen=True)
class DecoderExample:
    """Example prefill inputs (batch 1) used to trace; shapes only, values irrelevant."""

    inputs_embeds: torch.Tensor  # (1, L, D)
    position_ids: torch.Tensor  # (1, L) or (3, 1, L)
    visual_start: torch.Tensor  # (1,)
    visual_tokens: int  # N of the sample (the graphs of another bucket scale L by their own N)


def finish(model: "onnx.ModelProto | StreamedGraph", inline: bool,
           attention: str = C.PORTABLE) -> "onnx.ModelProto | StreamedGraph":
    """Attach `reroute` functions, pin IR version and opset (DESIGN.md 2), write RMSNorm so ONNX
    Runtime fuses it (export/norms.py), lower the attention op to the target's form
    (export/attention.py). A streamed graph gets them when it is
    written (its proto exists only then)."""
    if isinstance(model, StreamedGraph):
        model.inline, model.attention = inline, attention
        return model
    model = attach_functions(model)
    if inline:
        model = inline_functions(model)
    model.ir_version = C.IR_VERSION
    rsqrt_as_div(model)
    return lower(model, attention)


def save(model: "onnx.ModelProto | StreamedGraph", path: Path) -> None:
    """The graph proto, its weights as external data beside it (`<graph>.onnx.data`); a
    streamed graph writes its weights into the artifact's one weights.data, one tensor at a time.

    External data, not weights inside the proto: ONNX Runtime maps the file and, once a
    MatMul has pre-packed its weight, holds the packed copy alone, where a weight parsed from
    the proto stays in memory beside its packed copy (1.1x instead of 1.8x the weights per
    session, measured in BENCHMARKS.md); it also keeps every graph under protobuf's 2 GB.
    Each written graph passes onnx.checker (by path: external data and 2 GB+ graphs included;
    a streamed graph is checked with its weights read back, export/stream.check_streamed)."""
    if isinstance(model, StreamedGraph):
        model.write(Path(path), finish)
        return
    path = Path(path)
    if any(t.raw_data and len(t.raw_data) > EXTERNAL_ABOVE for t in model.graph.initializer):
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=EXTERNAL_ABOVE)
    else:
        onnx.save_model(model, path)
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:  # an exporter bug, never the user's input
        raise RuntimeError(f"the exported {path.name} fails onnx.checker: {str(e).strip().splitlines()[0]}") from None


def _export(module: torch.nn.Module, args: tuple, dynamic_shapes, input_names, output_names,
            stream: WeightStream | None = None) -> "onnx.ModelProto | StreamedGraph":
    """torch.onnx (dynamo) export, optimised; with `stream` the module's parameters are data-free
    stand-ins while tracing and the graph keeps lazy weights until it is saved."""
    # the exporter logs a warning per torchvision op it cannot register (we use none of them),
    # and torch 2.7/2.8 one per unannotated input of our own translations (inputs, rightly)
    for name in ("_registration", "_schemas"):
        logging.getLogger(f"torch.onnx._internal.exporter.{name}").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torchlib_registry_once(), (stream.stand_ins() if stream else nullcontext()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, args, dynamo=True, opset_version=C.OPSET, dynamic_shapes=dynamic_shapes,
            input_names=input_names, output_names=output_names, custom_translation_table=translations(),
            optimize=stream is None, verbose=False,
        )
        drop_stack_traces(program.model)
        if stream is not None:
            return stream.bind(program.model, module)  # stand-ins still in place: their ids name them
    return program.model_proto


def graph_examples(program: Program, example: DecoderExample, dtypes: Sequence[torch.dtype]) -> dict[str, tuple]:
    """Per role, example inputs with the shapes prefill gives it (zeros: only shapes matter;
    a streamed model has no weights to run). Past buffers are 2 rows: a size-1 example
    would specialise the free axis."""
    plan = program.plan
    ex, d = example, example.inputs_embeds.shape[2]
    dtype = ex.inputs_embeds.dtype
    length = ex.inputs_embeds.shape[1] - ex.visual_tokens + plan.visual_tokens  # this bucket's prompt
    rows = plan.cache_tokens(length, 0)  # prefill rows per stage: L, then L - N + K_j
    lead = ex.position_ids.shape[:-1]  # (1,) or (3, 1)

    def positions(t: int) -> torch.Tensor:  # values are irrelevant, only the layout and length
        return torch.arange(t).expand(*lead, t).contiguous()

    layer0 = next(iter(program.segments[0].layers.values())).self_attn
    nh, nkv, hd = layer0.config.num_attention_heads, layer0.config.num_key_value_heads, layer0.head_dim

    def qkv(t: int, dt: torch.dtype) -> tuple:
        return (torch.zeros(1, t, nh * hd, dtype=dt), torch.zeros(1, t, nkv * hd, dtype=dt),
                torch.zeros(1, t, nkv * hd, dtype=dt))

    out: dict[str, tuple] = {}
    for s, layers in enumerate(plan.segments):
        t = rows[s]
        past = [torch.zeros(1, nkv, 2, hd, dtype=dtypes[i]) for i in layers for _ in (0, 1)]
        head = qkv(t, dtypes[layers.start]) if s > 0 else ()
        out[C.segment(s)] = (torch.zeros(1, t, d, dtype=dtype), *head, positions(t),
                             torch.zeros(1, dtype=torch.long), *past)
    for j, stage in enumerate(plan.stages):
        t = length if plan.recoverable else rows[j]
        dt = dtypes[stage.layer]
        out[C.head(j)] = (torch.zeros(1, t, d, dtype=dtype),)
        cand = (torch.arange(program.routes[j].m).view(1, -1),) if program.routes[j].chained else ()
        out[C.route(j)] = (torch.zeros(1, t, d, dtype=dtype), *qkv(t, dt), positions(t),
                           ex.visual_start, *cand)
    return out


def graph_shapes(program: Program, role: str, args: tuple, max_prompt_tokens: int,
                 cache_tokens: Sequence[int]) -> tuple:
    """torch.export dynamic shapes for one role's example args."""
    plan = program.plan
    kind, index = role.split(".")[0], int(role.split(".")[1])
    if kind == "segment":
        t = Dim("tokens", min=1, max=max_prompt_tokens)
        p = Dim("past_tokens", min=1, max=cache_tokens[index])
        headed = index > 0
        shapes: list = [{1: t}, *([{1: t}] * 3 if headed else [])]
        pos = args[len(shapes)]
        shapes += [{pos.dim() - 1: t}, None]
        shapes += [{2: p}] * (2 * len(plan.segments[index]))
        return tuple(shapes)
    if kind == "head":
        return ({1: Dim("tokens", min=1, max=max_prompt_tokens)},)
    route = program.routes[index]
    t = Dim("scored_tokens", min=route.m + 1, max=max_prompt_tokens - plan.visual_tokens + route.m)
    pos = args[4]
    return ({1: t}, {1: t}, {1: t}, {1: t}, {pos.dim() - 1: t}, None, *([None] if route.chained else []))


def _by_signature(module: torch.nn.Module, flat: tuple) -> dict:
    """Flat per-argument dynamic shapes -> the dict torch.export wants, keyed by forward's
    parameter names (a *args parameter takes the rest as a tuple)."""
    import inspect

    out, rest = {}, list(flat)
    for name, param in inspect.signature(module.forward).parameters.items():
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            if rest:  # an empty *args has no entry
                out[name] = tuple(rest)
            rest = []
        else:
            out[name] = rest.pop(0)
    return out


def export_decoder(
    model: torch.nn.Module, family: type[Family], plan: RoutingPlan, example: DecoderExample,
    max_prompt_tokens: int, cache_tokens: Sequence[int], folder: Path, *, inline: bool = False,
    stream: WeightStream | None = None, on_graph=None, buckets: Sequence[tuple[int, RoutingPlan]] = (),
    attention: str = C.PORTABLE,
) -> dict[str, str]:
    """Write every decoder graph of `plan` into `folder`, and the routing graphs of each extra
    visual-token bucket k (its own plan: N_k, K_j) as route.j.bk: role -> file name.
    `on_graph(role, i, n)` is called as graph i of n starts.
    `max_prompt_tokens` bounds every row axis (the longest prompt of any bucket);
    `cache_tokens` are the segments' fixed KV buffer lengths; `attention` the form each
    segment's attention takes (export/attention.py)."""
    from ..rewrite.segments import kv_dtypes

    dtypes = kv_dtypes(model, family)
    program = Program(model, family, plan, attention)
    jobs = {role: (program, module, role) for role, module in program.graphs().items()}
    for k, bucket_plan in buckets:
        other = Program(model, family, bucket_plan)
        jobs.update({C.route(j, k): (other, other.routes[j], C.route(j)) for j in range(len(bucket_plan.stages))})
    examples = {id(program): graph_examples(program, example, dtypes)}
    for prog, _, _ in jobs.values():
        examples.setdefault(id(prog), graph_examples(prog, example, dtypes))

    def write(role: str, i: int) -> None:
        if on_graph is not None:
            on_graph(role, i, len(roles))
        prog, module, own = jobs[role]
        args = examples[id(prog)][own]
        inputs, outputs = prog.io(own)
        shapes = _by_signature(module, graph_shapes(prog, own, args, max_prompt_tokens, cache_tokens))
        with torch.no_grad():
            proto = _export(module, args, shapes, inputs, outputs, stream)
        save(finish(proto, inline, attention), folder / C.file_of(role))

    roles = list(jobs)
    for i, role in enumerate(roles, start=1):
        write(role, i)
    return {role: C.file_of(role) for role in roles}
