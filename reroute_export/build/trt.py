"""TensorRT engines from an ONNX artifact: the build plan, the trtexec script, the real build.

Everything TensorRT-specific on the build side lives here. `tensorrt` is imported only
inside `build_engines` (and the runner, runtime/trt.py), so the package and its CPU path
work without it.

    build_plan(folder, manifest, device)   profiles, precision, workspace, memory estimate
    write_build_files(folder, plan)        build_plan.json + executable build_trt.sh (trtexec)
    tensorrt_status()                      can engines be built here (TensorRT + a CUDA GPU)?
    build_engines(folder, plan)            the real build with TensorRT's Python API

Where TensorRT or a GPU is missing (CI, or a host that builds for a Jetson) the artifact
still gets `build_plan.json` and an executable `build_trt.sh` with the exact trtexec
commands, and the CLI says plainly that no engine was built (exit code 3). No engine is
ever faked.

Shapes come from the ONNX graphs themselves: every input axis the exporter left symbolic
gets a min/opt/max range. Prefill: the text length L (N + 2 .. max_prompt_tokens).
Decode: one range per cache-length symbol (the exporter names one per routing stage,
shared by that stage's layers), L - N + K_l (+ generated tokens) for those layers.

Precision and the trtexec flags valid for each TensorRT version are data
(data/trt_devices.json, with their sources): TensorRT 10.x takes builder flags
(--fp16 for fp16 graphs), TensorRT 11 builds strongly typed networks only, so the
precision is the graph's own and no precision flag exists.
"""

from __future__ import annotations

import ctypes
import json
import shlex
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import onnx

from ..errors import UserError
from ..files import write_json
from .. import contract as C

DEVICES = Path(__file__).resolve().parent.parent / "data" / "trt_devices.json"
EXIT_NOT_BUILT = 3  # documented: ONNX artifact and build plan written, no engine built here
PLAN_FILE = "build_plan.json"
SCRIPT_FILE = "build_trt.sh"
TIMING_CACHE = "timing.cache"
GRAPHS = ("vision", "prefill", "decode")
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


def weight_bytes(folder: Path, onnx_file: str, model: onnx.ModelProto | None = None) -> int:
    """The .onnx file plus the external bytes its initializers point to (their `length`s, so a
    weights file shared by several graphs counts once per graph for what that graph uses)."""
    model = model or _load_header(folder / onnx_file)
    total = (folder / onnx_file).stat().st_size if (folder / onnx_file).is_file() else 0
    whole: set[str] = set()
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in t.external_data}
            if "length" in entries:
                total += int(entries["length"])
            else:  # no length: the tensor runs to the end of its file; count the file once
                whole.add(entries["location"])
    return total + sum((folder / f).stat().st_size for f in whole if (folder / f).is_file())


# ---------------------------------------------------------------- optimization profiles


Shape = tuple[int, ...]


@dataclass(frozen=True)
class Profile:
    """min/opt/max shape per dynamic input of one graph, and the range of each axis symbol."""

    shapes: dict[str, tuple[Shape, Shape, Shape]]
    axes: dict[str, tuple[int, int, int]]

    def to_dict(self) -> dict[str, Any]:
        shapes = {k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])} for k, v in self.shapes.items()}
        return {"shapes": shapes, "axes": {k: {"min": v[0], "opt": v[1], "max": v[2]} for k, v in self.axes.items()}}


def _resolve(inp: GraphInput, ranges: dict[str, tuple[int, int, int]]) -> tuple[Shape, Shape, Shape]:
    """The input's (min, opt, max) shapes: each symbolic axis replaced by its range."""
    lo, opt, hi = (tuple(ranges[d][k] if isinstance(d, str) else d for d in inp.dims) for k in range(3))
    return lo, opt, hi


def _text_range(manifest: dict[str, Any], opt_text: int) -> tuple[int, int, int]:
    sh = manifest["shapes"]
    n, hi = int(sh["visual_tokens"]), int(sh["max_prompt_tokens"])
    lo = n + 2  # the exporter's minimum: the image block plus two text tokens
    if hi < lo:
        raise UserError(f"max_prompt_tokens {hi} is below the shortest prompt the graphs take ({lo})")
    return lo, min(hi, max(lo, n + opt_text)), hi


def prefill_profile(manifest: dict[str, Any], inputs: list[GraphInput], opt_text: int = OPT_TEXT_TOKENS) -> Profile:
    """Every symbolic axis of the prefill inputs is the prompt length L."""
    symbols = {str(inp.dims[i]) for inp in inputs for i in inp.dynamic}
    if len(symbols) > 1:
        raise UserError(f"{C.PREFILL} has several dynamic axes {sorted(symbols)}; the exporter makes only the "
                        "prompt length dynamic: re-export it")
    ranges = {s: _text_range(manifest, opt_text) for s in symbols}
    return Profile({inp.name: _resolve(inp, ranges) for inp in inputs if inp.dynamic}, ranges)


def decode_profile(manifest: dict[str, Any], inputs: list[GraphInput], opt_text: int = OPT_TEXT_TOKENS) -> Profile:
    """One range per cache-length symbol: layer l's cache holds L - N + K_l prompt entries plus
    the tokens generated so far (at most max_new_tokens - 1 before the last decode step)."""
    sh = manifest["shapes"]
    lo, opt, hi = _text_range(manifest, opt_text)
    new = int(sh["max_new_tokens"])
    bases = [int(b) for b in sh["kv_cache_lengths"]]  # K_l - N per layer
    past = {C.past(i, kind): i for i in range(len(bases)) for kind in ("key", "value")}
    ranges: dict[str, tuple[int, int, int]] = {}
    owner: dict[str, int] = {}
    for inp in inputs:
        if not inp.dynamic:
            continue
        if inp.name not in past or inp.dynamic != [2]:
            raise UserError(f"{C.DECODE} input {inp.name} has dynamic axes {inp.dynamic}; only the cache length "
                            "(axis 2 of past.*) may be dynamic: re-export it")
        layer, symbol = past[inp.name], str(inp.dims[2])
        base = bases[layer]
        r = (max(1, lo + base), opt + base, hi + base + max(new - 1, 0))
        if symbol in ranges and ranges[symbol] != r:
            raise UserError(f"{C.DECODE}: layers {owner[symbol]} and {layer} share cache axis {symbol!r} but "
                            "keep different numbers of visual tokens; the graph and the manifest disagree")
        ranges[symbol], owner[symbol] = r, layer
    missing = sorted(set(past) - {i.name for i in inputs})
    if missing:
        raise UserError(f"{C.DECODE} lacks inputs {missing[:4]}...; it does not match the manifest's "
                        f"{len(bases)} layers")
    return Profile({inp.name: _resolve(inp, ranges) for inp in inputs if inp.dynamic}, ranges)


def graph_profile(graph: str, manifest: dict[str, Any], inputs: list[GraphInput]) -> Profile | None:
    if not any(i.dynamic for i in inputs):
        return None
    if graph == "prefill":
        return prefill_profile(manifest, inputs)
    if graph == "decode":
        return decode_profile(manifest, inputs)
    raise UserError(f"the {graph} graph has dynamic inputs {[i.name for i in inputs if i.dynamic]}; "
                    "the exporter fixes its shapes: re-export it")


# ---------------------------------------------------------------- memory


def kv_cache_bytes(manifest: dict[str, Any], elem_bytes: int) -> int:
    """One copy of every layer's cache at the declared maxima:
    sum over layers of (L_max - N + K_l + max_new_tokens - 1) entries, key and value."""
    sh = manifest["shapes"]
    entries = sum(int(sh["max_prompt_tokens"]) + int(b) + max(int(sh["max_new_tokens"]) - 1, 0)
                  for b in sh["kv_cache_lengths"])
    return entries * 2 * int(sh["num_kv_heads"]) * int(sh["head_dim"]) * elem_bytes


def activation_bytes(manifest: dict[str, Any], elem_bytes: int) -> int:
    """The prefill context's activations at the maximum prompt length, the largest of the three
    (decode holds one token, the vision tower one image): ACTIVATION_WIDTHS hidden-wide rows per
    token live inside one layer (TensorRT reuses activation memory across layers), plus one
    layer's attention scores, heads x L x L."""
    sh = manifest["shapes"]
    length, hidden = int(sh["max_prompt_tokens"]), int(sh["hidden_size"])
    heads = max(1, hidden // int(sh["head_dim"]))
    return (length * hidden * ACTIVATION_WIDTHS + heads * length * length) * elem_bytes


def memory_estimate(weights: dict[str, int], kv_bytes: int, workspace_mib: int,
                    device_memory_gib: float | None, act_bytes: int = 0) -> dict[str, Any]:
    """Estimates, not measurements.

    engine   ~ the graph's weight bytes (same precision; prefill and decode each carry the
               full decoder weights, so the LLM is held twice)
    build    graphs are built one at a time: BUILD_WEIGHT_COPIES x the largest graph's
             weights (host) + the workspace limit (GPU); on a Jetson both share one memory
    run      what the engines need: all three engines' weights + the KV cache twice (a decode
             step reads past.* and writes present.* as separate buffers) at the declared
             maximum lengths + the activations (`activation_bytes`). The workspace limit is
             not added: it caps TensorRT's tactic scratch space, it is not a need (a 4.6 MiB
             model does not run in 4 GiB).
    """
    ws = workspace_mib << 20
    engines = sum(weights.values())
    build = BUILD_WEIGHT_COPIES * max(weights.values(), default=0) + ws
    run = engines + 2 * kv_bytes + act_bytes
    out: dict[str, Any] = {
        "weights_gib": engines / GIB, "engines_gib": engines / GIB,
        "engine_gib": {g: b / GIB for g, b in weights.items()},
        "kv_cache_gib": kv_bytes / GIB, "kv_io_peak_gib": 2 * kv_bytes / GIB, "activations_gib": act_bytes / GIB,
        "workspace_gib": ws / GIB, "build_peak_gib": build / GIB, "run_gib": run / GIB,
        "device_memory_gib": device_memory_gib,
        "method": "engine ~ ONNX weight bytes; build = 3 x largest graph + workspace limit; "
                  "run = engines + 2 x KV cache at max lengths + prefill activations (workspace limit not added)",
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
            f"{size_text(mem['kv_io_peak_gib'])}, past and present at maximum lengths + activations "
            f"{size_text(mem.get('activations_gib', 0.0))}); building up to {size_text(mem['build_peak_gib'])} "
            f"({BUILD_WEIGHT_COPIES} copies of the largest graph + the workspace limit); "
            f"TensorRT workspace limit {size_text(mem['workspace_gib'])} (a cap on tactic scratch space, not a need)")


# ---------------------------------------------------------------- plan and script


def _shape_str(shape: Shape) -> str:
    return "x".join(str(x) for x in shape)


def trtexec_command(onnx_file: str, engine: str, profile: Profile | None, precision: str, trt_version: str,
                    workspace_mib: int, plugin_lib: str | None = None) -> list[str]:
    table = trtexec_table(trt_version)
    if precision not in table["precision_flags"]:
        raise UserError(f"no TensorRT {trt_version} build recipe for {precision} graphs")
    cmd = ["trtexec", f"--onnx={onnx_file}", f"--saveEngine={engine}", f"--memPoolSize=workspace:{workspace_mib}",
           f"--timingCacheFile={TIMING_CACHE}", "--skipInference"]
    if profile is not None:
        for flag, k in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
            cmd.append(f"{flag}=" + ",".join(f"{name}:{_shape_str(s[k])}" for name, s in profile.shapes.items()))
    cmd += table["precision_flags"][precision]
    if plugin_lib:
        cmd.append(f"{table['plugin_flag']}={plugin_lib}")
    bad = [a.split("=")[0] for a in cmd[1:] if a.split("=")[0] not in table["flags"]]
    if bad:  # the table is the contract: never emit a flag it does not list for this version
        raise RuntimeError(f"trtexec flags {bad} are not valid for TensorRT {trt_version}")
    return cmd


def build_precision(manifest: dict[str, Any]) -> str:
    """The build recipe's precision key: the manifest's, or "mixed" for an fp16 export that keeps
    some decoder layers in fp32 (TensorRT must then keep the graph's types: strongly typed)."""
    precision = str(manifest["precision"])
    return "mixed" if precision == "fp16" and manifest.get("fp32_layers") else precision


def build_plan(folder: Path, manifest: dict[str, Any], device_name: str,
               plugin_lib: str | None = None) -> dict[str, Any]:
    """Everything needed to build the engines for `device_name`, from the graphs in `folder`."""
    folder = Path(folder)
    dev = device(device_name)
    version, precision = dev["trt_version"], build_precision(manifest)
    workspace = int(dev.get("workspace_mib") or 4096)
    names = {"vision": C.VISION, "prefill": C.PREFILL, "decode": C.DECODE, **manifest.get("graphs", {})}
    py = python_table(version)
    engines, weights, kv_elem = {}, {}, None
    for graph in GRAPHS:
        onnx_file = names[graph]
        model = _load_header(folder / onnx_file)
        inputs = graph_inputs(model)
        prof = graph_profile(graph, manifest, inputs)
        weights[graph] = weight_bytes(folder, onnx_file, model)
        if graph == "decode":
            kv_elem = next((ELEM_BYTES.get(o.elem_type) for o in graph_outputs(model) if o.name == C.present(0, "key")),
                           None)
        engine = f"{graph}.engine"
        engines[graph] = {
            "onnx": onnx_file, "engine": engine,
            "inputs": {i.name: list(i.dims) for i in inputs},
            "profile": None if prof is None else prof.to_dict(),
            "trtexec": trtexec_command(onnx_file, engine, prof, precision, version, workspace, plugin_lib),
        }
    kv = kv_cache_bytes(manifest, kv_elem or 4)
    memory = memory_estimate(weights, kv, workspace, dev.get("memory_gib"), activation_bytes(manifest, kv_elem or 4))
    return {
        "device": dev, "trt_version": version, "precision": manifest["precision"], "recipe": precision,
        "strongly_typed": precision in py["strongly_typed"],
        "builder_flags": py["builder_flags"].get(precision, []), "clear_flags": py["clear_flags"].get(precision, []),
        "workspace_mib": workspace, "timing_cache": TIMING_CACHE, "plugin_lib": plugin_lib,
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
        out.append(f"estimated memory ({memory_text(memory)}) exceeds {dev['name']}'s {dev['memory_gib']} GiB")
    return out


def build_script(plan: dict[str, Any]) -> str:
    dev, mem = plan["device"], plan["memory"]
    lines = [
        "#!/usr/bin/env bash",
        f"# Build TensorRT {plan['trt_version']} engines for {dev['name']}: {dev['description']}.",
        "# Written by reroute-export with this artifact. Run it on the target device, from anywhere",
        "# (it works inside its own folder); needs trtexec (JetPack: /usr/src/tensorrt/bin/trtexec).",
        "# Engines are not portable across TensorRT versions or GPUs: build them where they will run.",
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
    for graph, e in plan["engines"].items():
        lines.append(f"echo 'building the {graph} engine ({e['engine']})'")
        lines.append(" \\\n    ".join(shlex.quote(a) for a in e["trtexec"]))
    lines.append("echo 'done: " + ", ".join(e["engine"] for e in plan["engines"].values()) + "'")
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


def build_engines(folder: Path, plan: dict[str, Any], progress: Any = None) -> dict[str, Any]:
    """Parse each graph with TensorRT's ONNX parser and build a serialized engine into `folder`.

    Returns the manifest's `trt` fields: {built: True, tensorrt_version, gpu, compute_capability,
    build_seconds, engines: {graph: {engine, bytes, build_s}}}, or {built: False, reason, error}
    when TensorRT rejects a graph or is the wrong major version for the plan (any engine
    already written by this call is removed: the artifact keeps no partial set)."""
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
        for graph, e in plan["engines"].items():
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
            if e["profile"]:
                profile = builder.create_optimization_profile()
                for name, s in e["profile"]["shapes"].items():
                    profile.set_shape(name, tuple(s["min"]), tuple(s["opt"]), tuple(s["max"]))
                config.add_optimization_profile(profile)
            cache = config.create_timing_cache(cache_bytes)
            config.set_timing_cache(cache, False)  # ignore_mismatch=False: a foreign cache is not used
            serialized = builder.build_serialized_network(network, config)
            if serialized is None:
                raise BuildFailed(f"TensorRT could not build the {graph} engine from {e['onnx']} (see its log above)")
            data = bytes(memoryview(serialized))
            path = folder / e["engine"]
            path.write_bytes(data)
            written.append(path)
            cache_bytes = bytes(memoryview(config.get_timing_cache().serialize()))
            engines[graph] = {"engine": e["engine"], "bytes": len(data),
                              "build_s": round(time.perf_counter() - start, 3)}
            if progress is not None:
                progress(graph)
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
