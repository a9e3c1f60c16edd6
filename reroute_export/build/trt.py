"""TensorRT engines from an ONNX artifact: the build plan, the trtexec script, the real build.

Everything TensorRT-specific lives here. `tensorrt` is imported only inside
`build_engines` (and the runner), so the package and its CPU path work without it.

Where TensorRT or a GPU is missing (CI, or a host that builds for a Jetson) the artifact
still gets `build_plan.json` and an executable `build_trt.sh` with the exact trtexec
commands, and the CLI says plainly that no engine was built (exit code 3).
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..export import contract as C

DEVICES = Path(__file__).resolve().parent.parent / "data" / "trt_devices.json"
EXIT_NOT_BUILT = 3  # documented: ONNX artifact and build plan written, no engine built here
WORKSPACE_MIB = 4096
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "fp8": 1}


@lru_cache(maxsize=None)
def device_table() -> dict[str, Any]:
    return json.loads(DEVICES.read_text())


def device(name: str) -> dict[str, Any]:
    devices = device_table()["devices"]
    if name not in devices:
        raise UserError(f"unknown device {name!r}; known: {', '.join(devices)}")
    return {"name": name, **devices[name]}


# ---------------------------------------------------------------- shapes


@dataclass(frozen=True)
class Profile:
    """min/opt/max shape per dynamic input of one graph."""

    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


def _pos_shape(manifest: dict[str, Any], length: int) -> tuple[int, ...]:
    return (3, 1, length) if manifest["family"] == "qwen2.5-vl" else (1, length)


def prefill_profile(manifest: dict[str, Any], opt_text: int = 40) -> Profile:
    sh = manifest["shapes"]
    n, d, hi = sh["visual_tokens"], sh["hidden_size"], sh["max_prompt_tokens"]
    lo, opt = n + 2, min(hi, n + opt_text)
    return Profile({
        C.INPUTS_EMBEDS: ((1, lo, d), (1, opt, d), (1, hi, d)),
        C.POSITION_IDS: (_pos_shape(manifest, lo), _pos_shape(manifest, opt), _pos_shape(manifest, hi)),
    })


def decode_profile(manifest: dict[str, Any], opt_text: int = 40) -> Profile:
    """Cache lengths per layer: (L - N + K_l) + generated tokens, L up to max_prompt_tokens."""
    sh = manifest["shapes"]
    n, hi = sh["visual_tokens"], sh["max_prompt_tokens"]
    shapes = {}
    for i, base in enumerate(sh["kv_cache_lengths"]):  # K_l - N for each layer
        lo, opt, top = n + 2 + base, min(hi, n + opt_text) + base, hi + base + sh["max_new_tokens"] - 1
        dims = lambda t: (1, sh["num_kv_heads"], t, sh["head_dim"])  # noqa: E731
        for kind in ("key", "value"):
            shapes[C.past(i, kind)] = (dims(lo), dims(opt), dims(top))
    return Profile(shapes)


def profiles(manifest: dict[str, Any]) -> dict[str, Profile | None]:
    return {"vision": None, "prefill": prefill_profile(manifest), "decode": decode_profile(manifest)}


# ---------------------------------------------------------------- memory


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.onnx*"))


def kv_cache_bytes(manifest: dict[str, Any]) -> int:
    """KV cache at the declared maxima: sum over layers of (L_max - N + K_l + new_max) entries."""
    sh = manifest["shapes"]
    entries = sum(sh["max_prompt_tokens"] + base + sh["max_new_tokens"] for base in sh["kv_cache_lengths"])
    return entries * 2 * sh["num_kv_heads"] * sh["head_dim"] * BYTES.get(manifest["precision"], 2)


def memory_estimate(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Build: parser copy + builder copy of the weights + workspace. Run: engines + KV + workspace."""
    w, kv, ws = weight_bytes(folder), kv_cache_bytes(manifest), WORKSPACE_MIB << 20
    gib = 1 << 30
    return {"weights_gib": w / gib, "build_peak_gib": (2 * w + ws) / gib, "run_gib": (w + kv + ws) / gib,
            "kv_cache_gib": kv / gib, "workspace_gib": ws / gib}


# ---------------------------------------------------------------- plan and script


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(str(x) for x in shape)


def trtexec_command(graph: str, onnx_file: str, engine: str, profile: Profile | None, precision: str,
                    trt_version: str, plugin_lib: str | None = None) -> list[str]:
    cmd = ["trtexec", f"--onnx={onnx_file}", f"--saveEngine={engine}", f"--memPoolSize=workspace:{WORKSPACE_MIB}",
           "--timingCacheFile=timing.cache", "--skipInference"]
    if profile is not None:
        for flag, idx in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
            cmd.append(f"{flag}=" + ",".join(f"{name}:{_dims(s[idx])}" for name, s in profile.shapes.items()))
    if trt_version != "11" and precision in ("fp16", "bf16"):
        cmd.append(f"--{precision}")  # TensorRT 10: builder flag; TensorRT 11: precision from the graph
    if trt_version != "11" and precision in ("int8", "fp8"):
        cmd.append("--stronglyTyped")  # Q/DQ graphs carry their precision explicitly
    if plugin_lib:
        cmd.append(f"--dynamicPlugins={plugin_lib}")
    return cmd


def build_plan(folder: Path, manifest: dict[str, Any], device_name: str, plugin_lib: str | None = None) -> dict[str, Any]:
    dev = device(device_name)
    precision = manifest["precision"]
    engines = {}
    for graph, prof in profiles(manifest).items():
        onnx_file = manifest["graphs"][graph]
        engine = f"{graph}.engine"
        engines[graph] = {
            "onnx": onnx_file, "engine": engine,
            "profile": None if prof is None else {k: {"min": v[0], "opt": v[1], "max": v[2]}
                                                  for k, v in prof.shapes.items()},
            "trtexec": trtexec_command(graph, onnx_file, engine, prof, precision, dev["trt_version"], plugin_lib),
        }
    return {"device": dev, "trt_version": dev["trt_version"], "precision": precision,
            "strongly_typed": dev["trt_version"] == "11" or precision in ("int8", "fp8"),
            "workspace_mib": WORKSPACE_MIB, "engines": engines, "memory": memory_estimate(folder, manifest),
            "custom_ops": "reroute-domain nodes are parsed through their ONNX local functions"
                          + (f"; plugins from {plugin_lib}" if plugin_lib else "")}


def build_script(plan: dict[str, Any]) -> str:
    lines = ["#!/usr/bin/env bash",
             f"# Build TensorRT {plan['trt_version']} engines for {plan['device']['description']}.",
             "# Run on the target device, inside this artifact folder (trtexec on PATH:",
             "# /usr/src/tensorrt/bin/trtexec on JetPack).",
             f"# Memory estimate: build peak {plan['memory']['build_peak_gib']:.2f} GiB, "
             f"run {plan['memory']['run_gib']:.2f} GiB.",
             "set -euo pipefail", 'cd "$(dirname "$0")"',
             'command -v trtexec >/dev/null || PATH="$PATH:/usr/src/tensorrt/bin"']
    for graph, e in plan["engines"].items():
        lines.append(f"echo 'building {graph} engine'")
        lines.append(" \\\n    ".join(shlex.quote(a) for a in e["trtexec"]))
    return "\n".join(lines) + "\n"


def write_build_files(folder: Path, plan: dict[str, Any]) -> None:
    (folder / "build_plan.json").write_text(json.dumps(plan, indent=1))
    script = folder / "build_trt.sh"
    script.write_text(build_script(plan))
    script.chmod(0o755)


# ---------------------------------------------------------------- the real build


def tensorrt_status() -> tuple[bool, str]:
    """(can build here, why not)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "TensorRT is not installed here (pip install tensorrt on a machine with an NVIDIA GPU)"
    try:
        import torch

        if not torch.cuda.is_available():
            return False, "no CUDA GPU is visible to this process"
    except ImportError:
        pass
    return True, ""


def build_engines(folder: Path, plan: dict[str, Any], progress=None) -> dict[str, Any]:
    """Parse each graph with TensorRT's ONNX parser and build a serialized engine."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache_path = folder / "timing.cache"
    out = {}
    for graph, e in plan["engines"].items():
        start = time.perf_counter()
        flags = 0
        strongly = plan["strongly_typed"] and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
        if strongly:
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(folder / e["onnx"])):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse {e['onnx']}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan["workspace_mib"] << 20)
        if not strongly and plan["precision"] == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        if e["profile"]:
            profile = builder.create_optimization_profile()
            for name, s in e["profile"].items():
                profile.set_shape(name, s["min"], s["opt"], s["max"])
            config.add_optimization_profile(profile)
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeError(f"TensorRT failed to build the {graph} engine")
        (folder / e["engine"]).write_bytes(bytes(serialized))
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
        out[graph] = {"engine": e["engine"], "build_seconds": time.perf_counter() - start}
    return {"tensorrt_version": trt.__version__, **_gpu(), "engines": out}


def _gpu() -> dict[str, Any]:
    import torch

    props = torch.cuda.get_device_properties(0)
    return {"gpu": props.name, "compute_capability": f"{props.major}.{props.minor}"}
