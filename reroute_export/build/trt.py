"""TensorRT engines from an ONNX artifact: the build plan, the trtexec script, the real build.

Everything TensorRT-specific on the build side lives here. `tensorrt` is imported only
inside `build_engines` (and the runner, runtime/trt.py), so the package and its CPU path
work without it.

    build_plan(folder, manifest, device)   profiles, precision, workspace, memory estimate
    write_build_files(folder, plan)        build_plan.json + executable build_trt.sh (trtexec)
    tensorrt_status()                      can engines be built here (TensorRT + a CUDA GPU)?
    build_engines(folder, plan)            the real build with TensorRT's Python API
    spec_memory(model, plan, ...)          the same memory estimate from a model's architecture
                                           alone (meta-device parameter counts, no export)

Where TensorRT or a GPU is missing (CI, or a host that builds for a Jetson) the artifact
still gets `build_plan.json` and an executable `build_trt.sh` with the exact trtexec
commands, and the CLI says plainly that no engine was built (exit code 3). No engine is
ever faked.

One engine per ONNX graph role of manifest["graphs"] (rewrite/segments.py), named after
the role (segment.1 -> segment_1.engine); roles are read by their kind, the part before
the first dot, so bucketed roles (route.0.b1) plan like their kind:

    vision     static shapes, no profile; Qwen2.5-VL with image-size buckets: one graph, the
               patch axis free, a profile per bucket at its exact shapes (manifest buckets)
    segment.s  two optimization profiles: 0 "decode" (T = 1 row, P = M_s: the stage's
               fixed KV buffer, min = opt = max) and 1 "prefill" (T = 1 .. max_prompt_tokens
               rows, P = 1: the one-row dummy buffer with past_length 0)
    head.j     the same two profiles on T (it has no KV input)
    route.j    one profile over the scored rows: m + 2 .. max_prompt_tokens - N + m, where
               m is the routed visual block (N, or the survivors of the previous decision);
               route.j.bk: N, K_j and the longest prompt of bucket k (manifest["buckets"])

Each decoder weight lives in exactly one segment or head graph, so the engines hold the
LLM once: the memory estimate sums every engine's weight bytes, and the KV cache is the
fixed per-layer buffers (sum over layers of 2 x nkv x M_s x hd x element size), written in
place by the runtime (runtime/segmented.py), not a past and a present copy.

Precision and the trtexec flags valid for each TensorRT version are data
(data/trt_devices.json, with their sources): TensorRT 10.x takes builder flags
(--fp16 for fp16 graphs), TensorRT 11 builds strongly typed networks only, so the
precision is the graph's own and no precision flag exists. Several profiles are given to
trtexec as `--profile=i` each directly followed by its --minShapes/--optShapes/--maxShapes
(sampleOptions.cpp reads the three shape flags right behind each --profile).
"""

from __future__ import annotations

import ctypes
import json
import shlex
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import onnx

from ..errors import UserError
from ..files import write_json
from ..plan import RoutingPlan
from .. import contract as C

if TYPE_CHECKING:
    from torch import nn

DEVICES = Path(__file__).resolve().parent.parent / "data" / "trt_devices.json"
EXIT_NOT_BUILT = 3  # documented: ONNX artifact and build plan written, no engine built here
PLAN_FILE = "build_plan.json"
SCRIPT_FILE = "build_trt.sh"
TIMING_CACHE = "timing.cache"
KINDS = ("vision", "segment", "head", "route")  # graph roles by kind (the part before the first dot)
DECODE, PREFILL = "decode", "prefill"  # profile names of segment and head engines, in index order
OPT_TEXT_TOKENS = 40  # optimization-profile "opt" text length (prompt words around the image)
BUILD_WEIGHT_COPIES = 3  # parser copy + builder copy + serialized engine (DESIGN.md 3: 3-4x model size)
GIB = 1 << 30
# Hidden-wide rows per token alive inside one decoder layer while it runs: residual and norm
# (2), q/k/v and the attention output (4), the MLP's gate, up and product at ~3.5 x hidden (10).
ACTIVATION_WIDTHS = 16
# ONNX TensorProto element type -> bytes
ELEM_BYTES = {1: 4, 2: 1, 3: 1, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 16: 2, 17: 1, 18: 1, 19: 1, 20: 1}


# ---------------------------------------------------------------- data tables


@lru_cache(maxsize=None)
def device_table() -> dict[str, Any]:
    return json.loads(DEVICES.read_text())


def device(name: str) -> dict[str, Any]:
    devices = device_table()["devices"]
    if name not in devices:
        raise UserError(f"unknown device {name!r}; known: {', '.join(devices)}")
    return {"name": name, **devices[name]}


def trtexec_table(trt_version: str) -> dict[str, Any]:
    """The trtexec flags (and precision flags) valid for one TensorRT version."""
    table = device_table()["trtexec"]
    if trt_version not in table:
        raise UserError(f"no trtexec table for TensorRT {trt_version}; known: {', '.join(table)}")
    return table[trt_version]


def python_table(trt_version: str) -> dict[str, Any]:
    return device_table()["python"][trt_version]


def major(version: str) -> int:
    return int(str(version).split(".")[0])


# ---------------------------------------------------------------- roles


def role_kind(role: str) -> str:
    """vision, segment, head or route: what a manifest role is, whatever its index or bucket."""
    kind = role.split(".")[0]
    if kind not in KINDS:
        raise UserError(f"the manifest lists a graph role {role!r} of no known kind ({', '.join(KINDS)}); "
                        "re-export the artifact with this version")
    return kind


def role_index(role: str) -> int:
    """segment.2 -> 2, route.0.b1 -> 0."""
    try:
        return int(role.split(".")[1])
    except (IndexError, ValueError):
        raise UserError(f"graph role {role!r} has no stage index") from None


def role_bucket(role: str) -> int | None:
    """route.0.b1 -> 1, route.0 / segment.0 -> None (Qwen's visual-token buckets)."""
    last = role.split(".")[-1]
    return int(last[1:]) if len(role.split(".")) > 1 and last[:1] == "b" and last[1:].isdigit() else None


def engine_file(role: str) -> str:
    """segment.0 -> segment_0.engine (the ONNX file's name with .engine)."""
    return C.file_of(role).removesuffix(".onnx") + ".engine"


# ---------------------------------------------------------------- the graphs' inputs


@dataclass(frozen=True)
class GraphInput:
    """One graph input as the ONNX file declares it: each axis an int or a symbol name."""

    name: str
    elem_type: int
    dims: tuple[int | str, ...]

    @property
    def dynamic(self) -> list[int]:
        return [i for i, d in enumerate(self.dims) if isinstance(d, str)]


def _dims(value_info: onnx.ValueInfoProto) -> tuple[int | str, ...]:
    out: list[int | str] = []
    for i, d in enumerate(value_info.type.tensor_type.shape.dim):
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        else:
            out.append(d.dim_param or f"{value_info.name}:{i}")  # unnamed dynamic axis
    return tuple(out)


def _load_header(path: Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001  (protobuf/IO errors)
        raise UserError(f"cannot read {path}: {e}") from None


def graph_inputs(model: onnx.ModelProto) -> list[GraphInput]:
    inits = {t.name for t in model.graph.initializer}
    return [GraphInput(i.name, i.type.tensor_type.elem_type, _dims(i))
            for i in model.graph.input if i.name not in inits]


def graph_outputs(model: onnx.ModelProto) -> list[GraphInput]:
    return [GraphInput(o.name, o.type.tensor_type.elem_type, _dims(o)) for o in model.graph.output]


# ---------------------------------------------------------------- weights


def _tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """What an engine keeps as weights: the initializers and the main graph's Constant tensors."""
    out = list(model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            out += [a.t for a in node.attribute if a.name == "value" and a.HasField("t")]
    return out


def tensor_bytes(t: onnx.TensorProto) -> int:
    """Bytes of one tensor from its header (dims x element size; an external one's `length`)."""
    if t.data_location == onnx.TensorProto.EXTERNAL:
        entries = {e.key: e.value for e in t.external_data}
        if "length" in entries:
            return int(entries["length"])
    n = 1
    for d in t.dims:
        n *= int(d)
    return n * ELEM_BYTES.get(t.data_type, 4)


def graph_weights(model: onnx.ModelProto) -> tuple[int, dict[tuple[str, str], int]]:
    """(the graph's weight bytes, its external ranges {(file, offset): bytes}). Read from the
    headers alone (no external data loaded): 14 GB of weights are never read to be counted.
    The ranges let build_plan see bytes that several graphs point at (weights.data stores a
    tensor once however many graphs use it; each engine would still hold its own copy)."""
    total, ranges = 0, {}
    for t in _tensors(model):
        n = tensor_bytes(t)
        total += n
        if t.data_location == onnx.TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in t.external_data}
            ranges[(entries.get("location", ""), entries.get("offset", t.name))] = n
    return total, ranges


def weight_bytes(folder: Path, onnx_file: str, model: onnx.ModelProto | None = None) -> int:
    """The weight bytes of one graph of `folder` (what its engine holds as weights)."""
    return graph_weights(model or _load_header(Path(folder) / onnx_file))[0]


def shared_weight_bytes(ranges: dict[str, dict[tuple[str, str], int]]) -> int:
    """Bytes of external ranges that more than one graph points at, counted once."""
    seen: dict[tuple[str, str], int] = {}
    shared: dict[tuple[str, str], int] = {}
    for per_graph in ranges.values():
        for key, n in per_graph.items():
            if key in seen:
                shared[key] = n
            seen[key] = n
    return sum(shared.values())


# ---------------------------------------------------------------- optimization profiles


Shape = tuple[int, ...]
Range = tuple[int, int, int]


@dataclass(frozen=True)
class Profile:
    """One optimization profile: min/opt/max shape per dynamic input, and each axis symbol's range."""

    name: str
    shapes: dict[str, tuple[Shape, Shape, Shape]]
    axes: dict[str, Range]

    def to_dict(self) -> dict[str, Any]:
        shapes = {k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])} for k, v in self.shapes.items()}
        return {"name": self.name, "shapes": shapes,
                "axes": {k: {"min": v[0], "opt": v[1], "max": v[2]} for k, v in self.axes.items()}}


def _resolve(inp: GraphInput, ranges: dict[str, Range]) -> tuple[Shape, Shape, Shape]:
    """The input's (min, opt, max) shapes: each symbolic axis replaced by its range."""
    lo, opt, hi = (tuple(ranges[d][k] if isinstance(d, str) else d for d in inp.dims) for k in range(3))
    return lo, opt, hi


def _profile(name: str, inputs: list[GraphInput], ranges: dict[str, Range]) -> Profile:
    return Profile(name, {i.name: _resolve(i, ranges) for i in inputs if i.dynamic}, ranges)


def _clamp(lo: int, opt: int, hi: int) -> Range:
    return lo, min(hi, max(lo, opt)), hi


def _plan(manifest: dict[str, Any]) -> RoutingPlan:
    return RoutingPlan.from_dict(manifest["plan"])


def _segments(manifest: dict[str, Any]) -> list[range]:
    dec = manifest.get("decoder") or {}
    if "segments" not in dec:
        raise UserError("the manifest has no decoder segments (an artifact of the earlier prefill/decode "
                        "layout); re-export it")
    return [range(int(a), int(b)) for a, b in dec["segments"]]


def _cache_tokens(manifest: dict[str, Any]) -> list[int]:
    dec = manifest.get("decoder") or {}
    return [int(m) for m in dec.get("cache_tokens") or manifest["shapes"]["cache_tokens"]]


def _opt_prompt(manifest: dict[str, Any], n: int | None = None, hi: int | None = None) -> int:
    """The prompt length the prefill profiles are tuned for: the image block plus OPT_TEXT_TOKENS
    (n visual tokens, prompts up to hi: the manifest's, or a bucket's)."""
    sh = manifest["shapes"]
    n = int(sh["visual_tokens"]) if n is None else n
    hi = int(sh["max_prompt_tokens"]) if hi is None else hi
    if hi < n + 2:
        raise UserError(f"max_prompt_tokens {hi} is below the shortest prompt the graphs take ({n + 2})")
    return min(hi, n + OPT_TEXT_TOKENS)


def _bucket(manifest: dict[str, Any], role: str) -> tuple[RoutingPlan, int]:
    """(plan, longest prompt) of the image-size bucket a role serves: manifest["buckets"][k]
    when the artifact has buckets (Qwen2.5-VL), else the manifest's plan and max_prompt_tokens."""
    buckets, k = manifest.get("buckets") or [], role_bucket(role) or 0
    if not buckets:
        if k:
            raise UserError(f"the manifest lists {role} but no visual-token buckets: re-export the artifact")
        return _plan(manifest), int(manifest["shapes"]["max_prompt_tokens"])
    if k >= len(buckets):
        raise UserError(f"the manifest lists {role} but only {len(buckets)} visual-token buckets: re-export it")
    return RoutingPlan.from_dict(buckets[k]["plan"]), int(buckets[k]["max_prompt_tokens"])


def prefill_rows(manifest: dict[str, Any], stage: int, prompt: int) -> int:
    """Rows stage s's segment takes in prefill for a `prompt`-token prompt: L, then L - N + K_{s-1}."""
    plan = _plan(manifest)
    return prompt if stage == 0 else prompt - plan.visual_tokens + plan.stages[stage - 1].keep


def _expect_inputs(onnx_file: str, inputs: list[GraphInput], want: Sequence[str], what: str) -> None:
    have = [i.name for i in inputs]
    if set(have) != set(want):
        extra, lacking = sorted(set(have) - set(want)), sorted(set(want) - set(have))
        detail = "; ".join(x for x in (f"unexpected {extra[:4]}" if extra else "",
                                       f"missing {lacking[:4]}" if lacking else "") if x)
        raise UserError(f"{onnx_file} inputs do not match the manifest's {what} ({detail}): re-export it")


def _symbol(onnx_file: str, by: dict[str, GraphInput], axes: Sequence[tuple[str, int]], what: str) -> str:
    """The one axis symbol `axes` (input name, axis) share: `what` (a row count, a length)."""
    symbols = set()
    for name, axis in axes:
        d = by[name].dims[axis] if -len(by[name].dims) <= axis < len(by[name].dims) else None
        if not isinstance(d, str):
            raise UserError(f"{onnx_file}: axis {axis} of {name} ({what}) is {d!r}, not a free axis: re-export it")
        symbols.add(d)
    if len(symbols) != 1:
        raise UserError(f"{onnx_file}: {what} is several axes {sorted(symbols)} across {[n for n, _ in axes][:4]}; "
                        "the exporter shares one: re-export it")
    return symbols.pop()


def _only(onnx_file: str, inputs: list[GraphInput], allowed: set[str]) -> None:
    """Every dynamic axis of `inputs` is one of the `allowed` symbols."""
    for inp in inputs:
        bad = [inp.dims[i] for i in inp.dynamic if inp.dims[i] not in allowed]
        if bad:
            raise UserError(f"{onnx_file} input {inp.name} has dynamic axes {bad} the exporter does not make free "
                            f"(only {sorted(allowed)}): re-export it")


def _two_profiles(inputs: list[GraphInput], t: str, prefill: Range, p: str | None = None,
                  past: int | None = None, prefill_past: int = 1) -> list[Profile]:
    """decode (T = 1, P = M_s) and prefill (T over `prefill`, P = 1: a one-row dummy buffer; M_s
    when the segment writes its KV in-graph), in that index order."""
    decode = {t: (1, 1, 1)}
    fill = {t: prefill}
    if p is not None:
        decode[p], fill[p] = (past, past, past), (prefill_past,) * 3
    return [_profile(DECODE, inputs, decode), _profile(PREFILL, inputs, fill)]


def segment_profiles(role: str, manifest: dict[str, Any], inputs: list[GraphInput], onnx_file: str) -> list[Profile]:
    s, segments = role_index(role), _segments(manifest)
    if s >= len(segments):
        raise UserError(f"{onnx_file} is stage {s}'s segment; the manifest has {len(segments)} stages: re-export it")
    layers = segments[s]
    want, _ = C.segment_io(layers, s > 0, s == len(segments) - 1)
    _expect_inputs(onnx_file, inputs, want, f"stage {s} (layers {layers.start}..{layers.stop - 1})")
    by = {i.name: i for i in inputs}
    rows = [(C.HIDDEN, 1), *[(n, 1) for n in (C.QUERY, C.KEY, C.VALUE) if s > 0], (C.POSITION_IDS, -1)]
    t = _symbol(onnx_file, by, rows, "the row count T")
    p = _symbol(onnx_file, by, [(C.past(i, k), 2) for i in layers for k in ("key", "value")], "the past length P")
    if t == p:
        raise UserError(f"{onnx_file}: the row count and the past length are one axis {t!r}: re-export it")
    _only(onnx_file, inputs, {t, p})
    hi = int(manifest["shapes"]["max_prompt_tokens"])
    prefill = _clamp(1, prefill_rows(manifest, s, _opt_prompt(manifest)), hi)
    m = _cache_tokens(manifest)[s]
    in_graph = C.kv_in_graph((manifest.get("decoder") or {}).get("attention", C.PORTABLE))
    return _two_profiles(inputs, t, prefill, p, m, m if in_graph else 1)


def head_profiles(role: str, manifest: dict[str, Any], inputs: list[GraphInput], onnx_file: str) -> list[Profile]:
    j, plan = role_index(role), _plan(manifest)
    if j >= len(plan.stages):
        raise UserError(f"{onnx_file} is decision {j}'s head; the plan has {len(plan.stages)} decisions: re-export it")
    _expect_inputs(onnx_file, inputs, C.HEAD_IO[0], f"decision head {j}")
    t = _symbol(onnx_file, {i.name: i for i in inputs}, [(C.HIDDEN, 1)], "the row count T")
    _only(onnx_file, inputs, {t})
    opt = _opt_prompt(manifest)
    rows = opt if plan.recoverable else prefill_rows(manifest, j, opt)  # reroute scores the full buffer
    return _two_profiles(inputs, t, _clamp(1, rows, int(manifest["shapes"]["max_prompt_tokens"])))


def _select_visual_m(model: onnx.ModelProto | None) -> int | None:
    """The visual block a route graph scores, from its reroute.SelectVisual node (None: inlined)."""
    for node in model.graph.node if model is not None else ():
        if node.domain == "reroute" and node.op_type == "SelectVisual":
            for a in node.attribute:
                if a.name == "m":
                    return int(a.i)
    return None


def route_profiles(role: str, manifest: dict[str, Any], inputs: list[GraphInput], onnx_file: str,
                   model: onnx.ModelProto | None = None) -> list[Profile]:
    """One profile over the scored rows: a prompt of L tokens scores L - N + m rows (m: the block
    routed, N for reroute and a first delete decision, K_{j-1} after it; N, K and the longest
    prompt those of the role's bucket)."""
    j = role_index(role)
    plan, max_prompt = _bucket(manifest, role)
    if j >= len(plan.stages):
        raise UserError(f"{onnx_file} is decision {j}'s routing graph; the plan has {len(plan.stages)} decisions: "
                        "re-export it")
    chained = not plan.recoverable and j > 0
    _expect_inputs(onnx_file, inputs, C.route_io(j, chained)[0], f"routing graph {j} ({plan.method})")
    by = {i.name: i for i in inputs}
    rows = [(n, 1) for n in (C.HIDDEN, C.QUERY, C.KEY, C.VALUE)] + [(C.POSITION_IDS, -1)]
    t = _symbol(onnx_file, by, rows, "the scored row count")
    _only(onnx_file, inputs, {t})
    n = plan.visual_tokens
    m = plan.stages[j - 1].keep if chained else n
    in_graph = _select_visual_m(model)
    if in_graph is not None and in_graph != m:
        raise UserError(f"{onnx_file} routes a block of {in_graph} visual tokens; the manifest's plan says {m}: "
                        "re-export it")
    lo, hi = m + 2, max_prompt - n + m
    if hi < lo:
        raise UserError(f"{onnx_file}: max_prompt_tokens leaves no room for text around {n} visual tokens")
    return [_profile("scored", inputs, {t: _clamp(lo, _opt_prompt(manifest, n, max_prompt) - n + m, hi)})]


def graph_profiles(role: str, manifest: dict[str, Any], inputs: list[GraphInput], onnx_file: str,
                   model: onnx.ModelProto | None = None) -> list[Profile]:
    """The optimization profiles of one role's engine, in index order ([] for static graphs)."""
    kind = role_kind(role)
    if kind == "segment":
        return segment_profiles(role, manifest, inputs, onnx_file)
    if kind == "head":
        return head_profiles(role, manifest, inputs, onnx_file)
    if kind == "route":
        return route_profiles(role, manifest, inputs, onnx_file, model)
    if kind == "vision":
        return vision_profiles(manifest, inputs, onnx_file)
    raise UserError(f"{onnx_file}: unknown graph role {role!r}")


def vision_profiles(manifest: dict[str, Any], inputs: list[GraphInput], onnx_file: str) -> list[Profile]:
    """[] for a static vision graph (LLaVA, or one image size); Qwen2.5-VL with image-size
    buckets: the patch axis is free, and each bucket gets a profile at its exact shapes
    (min = opt = max: manifest buckets[k].vision_inputs), so TensorRT tunes every size."""
    dynamic = [i for i in inputs if i.dynamic]
    if not dynamic:
        return []
    buckets = manifest.get("buckets") or []
    if not buckets or any("vision_inputs" not in b for b in buckets):
        raise UserError(f"{onnx_file} has dynamic inputs {[i.name for i in dynamic]} but the manifest gives no "
                        "image-size buckets' shapes: re-export it")
    out = []
    for k, bucket in enumerate(buckets):
        axes: dict[str, Range] = {}
        for inp in dynamic:
            shape = bucket["vision_inputs"].get(inp.name)
            if shape is None or len(shape) != len(inp.dims) or any(
                    not isinstance(d, str) and d != v for d, v in zip(inp.dims, shape)):
                raise UserError(f"{onnx_file}: input {inp.name} {list(inp.dims)} does not fit bucket {k}'s shape "
                                f"{shape}: re-export it")
            axes.update({d: (int(v),) * 3 for d, v in zip(inp.dims, shape) if isinstance(d, str)})
        out.append(_profile(f"image {'x'.join(str(x) for x in bucket['image_size'])}", inputs, axes))
    return out


# ---------------------------------------------------------------- memory


def _layer_elems(manifest: dict[str, Any], elem_bytes: int | Sequence[int]) -> list[int]:
    n = sum(len(r) for r in _segments(manifest))
    return [int(elem_bytes)] * n if isinstance(elem_bytes, int) else [int(e) for e in elem_bytes]


def kv_cache_bytes(manifest: dict[str, Any], elem_bytes: int | Sequence[int]) -> int:
    """The fixed KV buffers the runtime allocates once: per layer i of stage s, key and value
    (1, nkv, M_s, hd), M_s the stage's most prefill rows plus max_new_tokens. `elem_bytes`:
    one element size, or one per layer (an fp16 export keeping some layers in fp32)."""
    sh = manifest["shapes"]
    elems, cache = _layer_elems(manifest, elem_bytes), _cache_tokens(manifest)
    row = 2 * int(sh["num_kv_heads"]) * int(sh["head_dim"])
    return sum(row * cache[s] * elems[i] for s, layers in enumerate(_segments(manifest)) for i in layers)


def new_rows_bytes(manifest: dict[str, Any], elem_bytes: int | Sequence[int]) -> int:
    """The largest set of new K/V rows one segment returns (prefill of the longest prompt), alive
    until the runtime writes them into the buffers: part of the activations."""
    sh = manifest["shapes"]
    elems, hi = _layer_elems(manifest, elem_bytes), int(sh["max_prompt_tokens"])
    row = 2 * int(sh["num_kv_heads"]) * int(sh["head_dim"])
    return max((row * prefill_rows(manifest, s, hi) * sum(elems[i] for i in layers)
                for s, layers in enumerate(_segments(manifest))), default=0)


def activation_bytes(manifest: dict[str, Any], elem_bytes: int) -> int:
    """The largest engine's activations, a prefill segment at the maximum prompt length
    (decode holds one row, the vision tower one image): ACTIVATION_WIDTHS hidden-wide rows per
    token live inside one layer (TensorRT reuses activation memory across layers), plus one
    layer's attention scores, heads x L x L, plus (when the manifest describes the decoder)
    the new K/V rows that segment returns (`new_rows_bytes`)."""
    sh = manifest["shapes"]
    length, hidden = int(sh["max_prompt_tokens"]), int(sh["hidden_size"])
    heads = max(1, hidden // int(sh["head_dim"]))
    inside = (length * hidden * ACTIVATION_WIDTHS + heads * length * length) * elem_bytes
    described = "plan" in manifest and "num_kv_heads" in sh and (manifest.get("decoder") or {}).get("segments")
    return inside + (new_rows_bytes(manifest, elem_bytes) if described else 0)


def memory_estimate(weights: dict[str, int], kv_bytes: int, workspace_mib: int,
                    device_memory_gib: float | None, act_bytes: int = 0, shared_bytes: int = 0) -> dict[str, Any]:
    """Estimates, not measurements.

    engine   ~ the graph's weight bytes (same precision); every decoder weight is in one
             segment or head graph, so the engines' sum holds the model once
    build    graphs are built one at a time: BUILD_WEIGHT_COPIES x the largest graph's
             weights (host) + the workspace limit (GPU); on a Jetson both share one memory
    run      every engine's weights + the fixed KV buffers (written in place: one copy)
             + the activations (`activation_bytes`). The workspace limit is not added: it
             caps TensorRT's tactic scratch space, it is not a need (a 4.6 MiB model does
             not run in 4 GiB).
    `shared_bytes`: external weight bytes more than one graph points at (each engine holds
    its own copy, so they are in `weights` once per graph; reported, not subtracted).
    """
    ws = workspace_mib << 20
    engines = sum(weights.values())
    build = BUILD_WEIGHT_COPIES * max(weights.values(), default=0) + ws
    run = engines + kv_bytes + act_bytes
    out: dict[str, Any] = {
        "weights_gib": engines / GIB, "engines_gib": engines / GIB,
        "engine_gib": {g: b / GIB for g, b in weights.items()},
        "largest_engine": max(weights, key=weights.__getitem__) if weights else None,
        "shared_weights_gib": shared_bytes / GIB,
        "kv_cache_gib": kv_bytes / GIB, "kv_io_peak_gib": kv_bytes / GIB, "activations_gib": act_bytes / GIB,
        "workspace_gib": ws / GIB, "build_peak_gib": build / GIB, "run_gib": run / GIB,
        "device_memory_gib": device_memory_gib,
        "method": "engine ~ ONNX weight bytes, each decoder weight in one graph; build = 3 x largest graph + "
                  "workspace limit; run = engines + the fixed KV buffers at max lengths (written in place) + "
                  "prefill activations (workspace limit not added)",
    }
    if device_memory_gib:
        out["fits_device"] = run / GIB <= device_memory_gib and build / GIB <= device_memory_gib
    return out


def size_text(gib: float) -> str:
    """A size at a readable scale: 4.6 MiB, not 0.00 GiB."""
    if gib >= 1:
        return f"{gib:.2f} GiB"
    return f"{gib * 1024:.1f} MiB" if gib * 1024 >= 1 else f"{gib * 2**20:.1f} KiB"


def memory_text(mem: dict[str, Any]) -> str:
    """The estimate as one sentence, each part separate: what running needs, what building needs,
    and the workspace limit, which is neither (one wording for the CLI, the script and warnings)."""
    return (f"running {size_text(mem['run_gib'])} (weights {size_text(mem['weights_gib'])} + KV cache "
            f"{size_text(mem['kv_io_peak_gib'])}, fixed buffers at maximum lengths written in place + activations "
            f"{size_text(mem.get('activations_gib', 0.0))}); building up to {size_text(mem['build_peak_gib'])} "
            f"({BUILD_WEIGHT_COPIES} copies of the largest graph + the workspace limit); "
            f"TensorRT workspace limit {size_text(mem['workspace_gib'])} (a cap on tactic scratch space, not a need)")


def plan_memory(manifest: dict[str, Any], weights: dict[str, int], kv_elems: int | Sequence[int], act_elem: int,
                workspace_mib: int, device_memory_gib: float | None, shared_bytes: int = 0) -> dict[str, Any]:
    """The estimate from per-graph weight bytes and the manifest's shapes: what build_plan
    measures from the ONNX headers and `spec_memory` counts from the architecture."""
    return memory_estimate(weights, kv_cache_bytes(manifest, kv_elems), workspace_mib, device_memory_gib,
                           activation_bytes(manifest, act_elem), shared_bytes)


# ---------------------------------------------------------------- the estimate without an export


def _head_modules(layer: "nn.Module") -> list["nn.Module"]:
    """What head.j holds of decision layer d_j: rewrite.segments.project's modules."""
    attn = layer.self_attn
    return [layer.input_layernorm, attn.q_proj, attn.k_proj, attn.v_proj]


def role_parameters(model: "nn.Module", family: Any, plan: RoutingPlan) -> dict[str, int]:
    """Parameters each graph role holds, counted on the model (a meta-device one will do):

    segment.s  its layers (for s >= 1 without the first layer's norm + q/k/v, which head.(s-1)
               holds); the last segment adds the final norm and the LM head
    head.j     decision layer d_j's input_layernorm + q/k/v projections
    route.j    none
    vision     every other parameter but the token embeddings (they ship as embed_tokens.npy):
               the vision tower and projector. An upper bound: a graph drops what its output
               never reads (LLaVA's CLIP layers past vision_feature_layer, its post-layernorm).
    Tied parameters count once (a tied LM head in the last segment, whose graph holds it)."""
    decoder, lm_head = family.decoder(model), family.lm_head(model)
    seen: set[int] = set()

    def count(modules: Sequence["nn.Module"], minus: Sequence["nn.Module"] = ()) -> int:
        skip = {id(p) for m in minus for p in m.parameters()}
        total = 0
        for m in modules:
            for p in m.parameters():
                if id(p) not in seen and id(p) not in skip:
                    seen.add(id(p))
                    total += p.numel()
        return total

    out: dict[str, int] = {}
    heads = {j + 1: _head_modules(decoder.layers[st.layer]) for j, st in enumerate(plan.stages)}
    for j, st in enumerate(plan.stages):
        out[C.head(j)] = count(heads[j + 1])
        out[C.route(j)] = 0
    last = len(plan.segments) - 1
    for s, layers in enumerate(plan.segments):
        mods = [decoder.layers[i] for i in layers] + ([decoder.norm, lm_head] if s == last else [])
        out[C.segment(s)] = count(mods, heads.get(s, ()))
    out["vision"] = count([model], [decoder.embed_tokens])  # what is left: vision tower, projector
    return {role: out[role] for role in ["vision", *_role_order(plan)]}


def _role_order(plan: RoutingPlan) -> list[str]:
    out = [C.segment(0)]
    for j in range(len(plan.stages)):
        out += [C.head(j), C.route(j), C.segment(j + 1)]
    return out


def spec_manifest(spec: Any, plan: RoutingPlan, max_prompt_tokens: int | None = None,
                  max_new_tokens: int = 256, precision: str = "fp16") -> dict[str, Any]:
    """The manifest fields the plan and its estimate read, for a model that was never exported
    (the pipeline's defaults: max_prompt_tokens = N + 512)."""
    t = spec.text
    max_prompt = max_prompt_tokens or plan.visual_tokens + 512
    cache = plan.cache_tokens(max_prompt, max_new_tokens)
    return {
        "model": spec.name, "family": spec.family, "plan": plan.to_dict(), "precision": precision, "fp32_layers": [],
        "shapes": {"max_prompt_tokens": max_prompt, "max_new_tokens": max_new_tokens,
                   "visual_tokens": plan.visual_tokens, "hidden_size": t.hidden_size, "num_layers": t.num_layers,
                   "num_kv_heads": t.num_kv_heads, "head_dim": t.head_dim, "vocab_size": t.vocab_size,
                   "cache_tokens": cache},
        "decoder": {"segments": [[r.start, r.stop] for r in plan.segments], "cache_tokens": cache},
    }


def spec_memory(model_name: str, plan: RoutingPlan, device_name: str = "gpu-trt10", precision: str = "fp16",
                max_prompt_tokens: int | None = None, max_new_tokens: int = 256) -> dict[str, Any]:
    """build_plan's memory estimate for a registered model without exporting it: per-role weight
    bytes from its architecture built on the meta device (no memory, seconds), shapes as the
    export would write them. Returns {"manifest", "weights" (role -> bytes), "memory"}."""
    import torch

    from ..families import get_family
    from ..registry import build_random, resolve_spec

    dtypes = {"fp32": torch.float32, "fp16": torch.float16}
    if precision not in dtypes:
        raise UserError(f"the estimate without an export covers {', '.join(dtypes)} graphs, not {precision}")
    spec = resolve_spec(model_name)
    model, _ = build_random(spec, dtypes[precision], "meta")
    elem = torch.tensor([], dtype=dtypes[precision]).element_size()
    weights = {role: n * elem for role, n in role_parameters(model, get_family(spec.family), plan).items()}
    manifest = spec_manifest(spec, plan, max_prompt_tokens, max_new_tokens, precision)
    dev = device(device_name)
    memory = plan_memory(manifest, weights, elem, elem, int(dev.get("workspace_mib") or 4096), dev.get("memory_gib"))
    return {"manifest": manifest, "weights": weights, "memory": memory}


# ---------------------------------------------------------------- plan and script


def _shape_str(shape: Shape) -> str:
    return "x".join(str(x) for x in shape)


def _shape_flags(profile: Profile) -> list[str]:
    return [f"{flag}=" + ",".join(f"{name}:{_shape_str(s[k])}" for name, s in profile.shapes.items())
            for flag, k in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2))]


def trtexec_command(onnx_file: str, engine: str, profiles: Sequence[Profile] | Profile | None, precision: str,
                    trt_version: str, workspace_mib: int, plugin_lib: str | None = None) -> list[str]:
    """One trtexec build. One profile: --minShapes/--optShapes/--maxShapes; several: each as
    `--profile=i` directly followed by its three shape flags (trtexec reads them right behind it)."""
    table = trtexec_table(trt_version)
    if precision not in table["precision_flags"]:
        raise UserError(f"no TensorRT {trt_version} build recipe for {precision} graphs")
    profiles = [] if profiles is None else [profiles] if isinstance(profiles, Profile) else list(profiles)
    cmd = ["trtexec", f"--onnx={onnx_file}", f"--saveEngine={engine}", f"--memPoolSize=workspace:{workspace_mib}",
           f"--timingCacheFile={TIMING_CACHE}", "--skipInference"]
    if len(profiles) == 1:
        cmd += _shape_flags(profiles[0])
    for i, profile in enumerate(profiles if len(profiles) > 1 else []):
        cmd += [f"--profile={i}", *_shape_flags(profile)]
    cmd += table["precision_flags"][precision]
    if plugin_lib:
        cmd.append(f"{table['plugin_flag']}={plugin_lib}")
    bad = sorted({a.split("=")[0] for a in cmd[1:] if a.split("=")[0] not in table["flags"]})
    if bad:  # the table is the contract: never emit a flag it does not list for this version
        raise RuntimeError(f"trtexec flags {bad} are not valid for TensorRT {trt_version}")
    return cmd


def build_precision(manifest: dict[str, Any]) -> str:
    """The build recipe's precision key: the manifest's, or "mixed" for an fp16 export that keeps
    some decoder layers in fp32 (TensorRT must then keep the graph's types: strongly typed)."""
    precision = str(manifest["precision"])
    return "mixed" if precision == "fp16" and manifest.get("fp32_layers") else precision


def _check_roles(folder: Path, manifest: dict[str, Any]) -> dict[str, str]:
    """manifest["graphs"], checked to hold every role the plan needs (one line when not)."""
    graphs = dict(manifest.get("graphs") or {})
    if C.segment(0) not in graphs or "decoder" not in manifest:
        raise UserError(f"artifact {folder} has no segment graphs (an earlier layout with prefill.onnx and "
                        "decode.onnx, each holding every decoder weight); re-export it")
    plan, segments = _plan(manifest), _segments(manifest)
    if len(segments) != len(plan.stages) + 1:
        raise UserError(f"the manifest has {len(segments)} decoder segments for {len(plan.stages)} decisions; "
                        "re-export the artifact")
    want = ["vision", *(C.segment(s) for s in range(len(segments))),
            *(f(j) for j in range(len(plan.stages)) for f in (C.head, C.route))]
    for k in range(1, len(manifest.get("buckets") or [])):  # Qwen2.5-VL: each bucket's routing graphs
        want += [C.route(j, k) for j in range(len(plan.stages))]
    lacking = [r for r in want if r not in graphs]
    if lacking:
        raise UserError(f"artifact {folder}: the manifest lists no {', '.join(lacking[:4])} graph; re-export it")
    for role in graphs:
        role_kind(role)
    return graphs


def build_plan(folder: Path, manifest: dict[str, Any], device_name: str,
               plugin_lib: str | None = None) -> dict[str, Any]:
    """Everything needed to build the engines for `device_name`, from the graphs in `folder`."""
    folder = Path(folder)
    dev = device(device_name)
    version, precision = dev["trt_version"], build_precision(manifest)
    workspace = int(dev.get("workspace_mib") or 4096)
    py = python_table(version)
    engines, weights, ranges, kv_elems = {}, {}, {}, {}
    act_elem = 4
    for role, onnx_file in _check_roles(folder, manifest).items():
        model = _load_header(folder / onnx_file)
        inputs = graph_inputs(model)
        profiles = graph_profiles(role, manifest, inputs, onnx_file, model)
        weights[role], ranges[role] = graph_weights(model)
        if role_kind(role) == "segment":
            for inp in inputs:
                if inp.name.startswith(C.past(0, "key").removesuffix("0.key")) and inp.name.endswith(".key"):
                    kv_elems[int(inp.name.split(".")[1])] = ELEM_BYTES.get(inp.elem_type, 4)
            if role == C.segment(0):
                act_elem = next((ELEM_BYTES.get(i.elem_type, 4) for i in inputs if i.name == C.HIDDEN), 4)
        engine = engine_file(role)
        engines[role] = {
            "onnx": onnx_file, "engine": engine, "kind": role_kind(role),
            "inputs": {i.name: list(i.dims) for i in inputs},
            "profiles": [p.to_dict() for p in profiles],
            "trtexec": trtexec_command(onnx_file, engine, profiles, precision, version, workspace, plugin_lib),
        }
    layers = sum(len(r) for r in _segments(manifest))
    if sorted(kv_elems) != list(range(layers)):
        raise UserError(f"the segment graphs hold KV inputs for layers {sorted(kv_elems)[:6]}...; the manifest has "
                        f"{layers} layers: re-export it")
    memory = plan_memory(manifest, weights, [kv_elems[i] for i in range(layers)], act_elem, workspace,
                         dev.get("memory_gib"), shared_weight_bytes(ranges))
    return {
        "device": dev, "trt_version": version, "precision": manifest["precision"], "recipe": precision,
        "strongly_typed": precision in py["strongly_typed"],
        "builder_flags": py["builder_flags"].get(precision, []), "clear_flags": py["clear_flags"].get(precision, []),
        "workspace_mib": workspace, "timing_cache": TIMING_CACHE, "plugin_lib": plugin_lib,
        "profiles": {"segment": [DECODE, PREFILL], "head": [DECODE, PREFILL], "route": ["scored"],
                     "vision": [p["name"] for p in engines[C.vision()]["profiles"]]},
        "engines": engines, "memory": memory, "warnings": plan_warnings(dev, precision, memory),
        "custom_ops": "reroute-domain nodes are parsed through their ONNX local functions"
                      + (f"; plugin library {plugin_lib} is loaded first, so its registered plugins take "
                         "precedence where TensorRT's parser maps a node to one" if plugin_lib else ""),
        "sources": trtexec_table(version)["sources"],
    }


def _cc(value: str | None) -> tuple[int, ...] | None:
    return tuple(int(x) for x in str(value).split(".")) if value else None


def plan_warnings(dev: dict[str, Any], precision: str, memory: dict[str, Any]) -> list[str]:
    """What will not work on the target, said before anyone copies gigabytes to it."""
    out = []
    need = device_table().get("min_compute_capability", {}).get(precision)
    have = _cc(dev.get("compute_capability"))
    if need and have and have < _cc(need):  # type: ignore[operator]
        out.append(f"{precision} needs compute capability >= {need}; {dev['name']} is {dev['compute_capability']}: "
                   "TensorRT will not build these engines there")
    if memory.get("fits_device") is False:
        out.append(f"estimated memory ({memory_text(memory)}) exceeds {dev['name']}'s {dev['memory_gib']} GiB"
                   + ("; --precision fp16 halves the weights" if precision == "fp32" else ""))
    return out


def build_script(plan: dict[str, Any]) -> str:
    dev, mem = plan["device"], plan["memory"]
    lines = [
        "#!/usr/bin/env bash",
        f"# Build TensorRT {plan['trt_version']} engines for {dev['name']}: {dev['description']}.",
        "# Written by reroute-export with this artifact. Run it on the target device, from anywhere",
        "# (it works inside its own folder); needs trtexec (JetPack: /usr/src/tensorrt/bin/trtexec).",
        "# Engines are not portable across TensorRT versions or GPUs: build them where they will run.",
        f"# One engine per graph ({len(plan['engines'])}); each decoder weight is in one of them. Segment and head",
        "# engines carry two optimization profiles: 0 decode (one row against the stage's full KV buffer),",
        "# 1 prefill (the prompt's rows against a one-row dummy buffer).",
        f"# Precision: {plan['precision']} graphs; trtexec precision flags: "
        + (" ".join(trtexec_table(plan["trt_version"])["precision_flags"][plan["recipe"]]) or "none")
        + (" (strongly typed: the graph's types are the engine's)."
           if plan["strongly_typed"] or major(plan["trt_version"]) >= 11 else "."),
        f"# Memory estimate: {memory_text(mem)}.",
        *(f"# WARNING: {w}" for w in plan.get("warnings", [])),
        "# Details: build_plan.json.",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        'command -v trtexec >/dev/null 2>&1 || PATH="$PATH:/usr/src/tensorrt/bin"',
        'command -v trtexec >/dev/null 2>&1 || {',
        '    echo "trtexec not found (JetPack: /usr/src/tensorrt/bin/trtexec)" >&2; exit 127; }',
    ]
    for role, e in plan["engines"].items():
        names = [p["name"] for p in e.get("profiles", [])]
        shown = f", profiles {' + '.join(names)}" if len(names) > 1 else ""
        lines.append(f"echo 'building the {role} engine ({e['engine']}{shown})'")
        lines.append(" \\\n    ".join(shlex.quote(a) for a in e["trtexec"]))
    lines.append(f"echo 'done: {len(plan['engines'])} engines'")
    return "\n".join(lines) + "\n"


def write_build_files(folder: Path, plan: dict[str, Any]) -> None:
    folder = Path(folder)
    write_json(folder / PLAN_FILE, plan)
    script = folder / SCRIPT_FILE
    script.write_text(build_script(plan))
    script.chmod(0o755)


# ---------------------------------------------------------------- the real build


def tensorrt_status() -> tuple[bool, str]:
    """(engines can be built and run here, why not): TensorRT importable and a CUDA GPU visible."""
    try:
        import tensorrt  # noqa: F401
    except Exception as e:  # noqa: BLE001  (ImportError, or OSError from a broken libnvinfer)
        detail = "" if isinstance(e, ModuleNotFoundError) else f" ({type(e).__name__}: {e})"
        return False, f"TensorRT is not installed here{detail} (pip install tensorrt on a machine with an NVIDIA GPU)"
    try:
        import torch
    except ImportError:
        return False, "cannot look for a CUDA GPU: torch is not importable"
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return False, "no CUDA GPU is visible to this process"
    return True, ""


def load_plugin_library(path: str) -> None:
    """dlopen a plugin library whose creators register themselves (what trtexec --staticPlugins does)."""
    if not Path(path).is_file():
        raise UserError(f"plugin library {path} not found")
    ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)


class BuildFailed(Exception):
    """TensorRT rejected a graph (parser or builder); the message says where."""


def _parser_errors(parser: Any) -> str:
    out = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        name = err.node_name() if hasattr(err, "node_name") else ""  # node_name: newer parsers only
        where = f" (node {name})" if name else f" (node #{err.node()})" if err.node() >= 0 else ""
        out.append(f"{err.desc()}{where}")
    return "; ".join(out) or "no parser error recorded"


def _network_flags(trt: Any, plan: dict[str, Any], installed_major: int) -> int:
    if installed_major >= 11:
        return 0  # strongly typed is the only mode (the STRONGLY_TYPED flag is deprecated and ignored)
    if plan["strongly_typed"]:
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0


def _add_profiles(trt: Any, builder: Any, config: Any, e: dict[str, Any]) -> None:
    """The plan's profiles, in index order (the runner selects them by index: 0 decode, 1 prefill)."""
    for i, p in enumerate(e.get("profiles", [])):
        profile = builder.create_optimization_profile()
        for name, s in p["shapes"].items():
            profile.set_shape(name, tuple(s["min"]), tuple(s["opt"]), tuple(s["max"]))
        index = config.add_optimization_profile(profile)  # -1 when TensorRT finds the profile invalid
        if index != i:
            raise BuildFailed(f"TensorRT rejected the {p['name']} optimization profile of {e['onnx']} "
                              f"(add_optimization_profile gave {index}, not {i})")


def build_engines(folder: Path, plan: dict[str, Any], progress: Any = None) -> dict[str, Any]:
    """Parse each graph with TensorRT's ONNX parser and build a serialized engine into `folder`.

    Returns the manifest's `trt` fields: {built: True, tensorrt_version, gpu, compute_capability,
    build_seconds, engines: {role: {engine, bytes, build_s, profiles}}}, or {built: False,
    reason, error} when TensorRT rejects a graph or is the wrong major version for the plan
    (any engine already written by this call is removed: the artifact keeps no partial set)."""
    import tensorrt as trt

    folder = Path(folder)
    installed = str(trt.__version__)
    if major(installed) != major(plan["trt_version"]):
        why = (f"the plan targets TensorRT {plan['trt_version']} but TensorRT {installed} is installed here; "
               f"build with build_trt.sh where TensorRT {plan['trt_version']} is installed, or choose a "
               f"gpu-trt{major(installed)} device")
        return {"built": False, "reason": why, "tensorrt_version": installed}
    if plan.get("plugin_lib"):
        load_plugin_library(plan["plugin_lib"])
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache_path = folder / plan.get("timing_cache", TIMING_CACHE)
    cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""
    engines: dict[str, Any] = {}
    written: list[Path] = []
    start_all = time.perf_counter()
    try:
        for role, e in plan["engines"].items():
            start = time.perf_counter()
            network = builder.create_network(_network_flags(trt, plan, major(installed)))
            parser = trt.OnnxParser(network, logger)
            if not parser.parse_from_file(str(folder / e["onnx"])):  # resolves external data next to the file
                raise BuildFailed(f"TensorRT's ONNX parser rejected {e['onnx']}: {_parser_errors(parser)}")
            config = builder.create_builder_config()
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(plan["workspace_mib"]) << 20)
            if major(installed) < 11:
                for flag in plan.get("builder_flags", []):
                    config.set_flag(getattr(trt.BuilderFlag, flag))
                for flag in plan.get("clear_flags", []):
                    if hasattr(trt.BuilderFlag, flag):
                        config.clear_flag(getattr(trt.BuilderFlag, flag))
            _add_profiles(trt, builder, config, e)
            cache = config.create_timing_cache(cache_bytes)
            config.set_timing_cache(cache, False)  # ignore_mismatch=False: a foreign cache is not used
            serialized = builder.build_serialized_network(network, config)
            if serialized is None:
                raise BuildFailed(f"TensorRT could not build the {role} engine from {e['onnx']} (see its log above)")
            data = bytes(memoryview(serialized))
            path = folder / e["engine"]
            path.write_bytes(data)
            written.append(path)
            cache_bytes = bytes(memoryview(config.get_timing_cache().serialize()))
            engines[role] = {"engine": e["engine"], "bytes": len(data),
                             "build_s": round(time.perf_counter() - start, 3),
                             "profiles": [p["name"] for p in e.get("profiles", [])]}
            del serialized, data, network, parser, config  # one graph's builder state at a time
            if progress is not None:
                progress(role)
    except BuildFailed as err:
        for path in written:
            path.unlink(missing_ok=True)
        return {"built": False, "reason": str(err), "error": str(err), "tensorrt_version": installed}
    cache_path.write_bytes(cache_bytes)
    return {"built": True, "tensorrt_version": installed, **gpu_info(),
            "build_seconds": round(time.perf_counter() - start_all, 3), "engines": engines,
            "strongly_typed": major(installed) >= 11 or bool(plan["strongly_typed"]),
            "builder_flags": [] if major(installed) >= 11 else plan.get("builder_flags", []),
            "timing_cache": cache_path.name}


def gpu_info() -> dict[str, Any]:
    """GPU 0's name and compute capability, from torch.cuda (or cuda-python where torch lacks CUDA)."""
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return {"gpu": props.name, "compute_capability": f"{props.major}.{props.minor}"}
    except ImportError:
        pass
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[no-redef]  # older cuda-python
        except ImportError:
            return {"gpu": None, "compute_capability": None}
    err, props = cudart.cudaGetDeviceProperties(0)
    name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
    return {"gpu": name, "compute_capability": f"{props.major}.{props.minor}"}
