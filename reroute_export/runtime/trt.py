"""Run an artifact's TensorRT engines: the OrtArtifact contract with engines instead of sessions.

`TrtArtifact` subclasses `OrtArtifact` and replaces only the graph runners, so the host side
(input checks, embedding lookup, image-slot writes, position ids, runtime/segmented's prefill
and decode flow over the segment, head and routing graphs, the greedy loop, `trace`) is the
very code the ONNX Runtime path runs: a parity difference between the two can only come
from the engines.

One engine per graph role of manifest["graphs"] (build/trt.py), each a `TrtGraph` with
`ort.Graph`'s duck type (`dtype(name)`, `input_types`, `__call__(feeds) -> outputs`), called
through the same `call(role, feeds)` that runtime/segmented.Decoder drives. Per call it picks
the engine's optimization profile the input shapes fit (segment and head engines: 0 decode,
one row against the stage's full KV buffer; 1 prefill, the prompt's rows against a one-row
dummy buffer), switching the execution context with `set_optimization_profile_async` only
when the profile changes (prefill runs every graph in profile 1, decode in profile 0), sets
every input's shape (`set_input_shape`), asks TensorRT for the output shapes
(`get_tensor_shape`), allocates them as torch CUDA tensors, binds addresses
(`set_tensor_address`) and runs `execute_async_v3` on its own torch CUDA stream.

By default outputs come back as numpy (the OrtArtifact contract) and the fixed KV buffers
live on the host, uploaded per call; `device_kv=True` allocates the buffers on the GPU once
(torch CUDA tensors in the `Cache`) and keeps each segment's new rows there, so a decode step
moves one token's worth of data: what a benchmark wants.

Engines are found in manifest["trt"]["engines"] (built by `--target trt` on a GPU machine)
or, for engines built later on the device by build_trt.sh, in build_plan.json. `tensorrt`
and CUDA are needed only here, imported lazily; without them `load` fails with one line.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from .. import contract as C
from ..export.artifact import read_manifest
from .ort import MANIFEST_KEYS, OrtArtifact
from .processor import ArtifactProcessor
from .segmented import Arrays, Decoder

KV_PREFIX = C.new(0, "key").removesuffix("0.key")  # "new.": segment outputs kept on the GPU with device_kv
PRESENT_PREFIX = C.present(0, "key").removesuffix("0.key")  # "present.": in-graph KV writes (kv-scatter form)
_TORCH_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
                 "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}


def _import_tensorrt() -> tuple[Any, Any]:
    from ..build.trt import tensorrt_status

    ok, why = tensorrt_status()
    if not ok:
        raise UserError(f"cannot run TensorRT engines here: {why}")
    import tensorrt
    import torch

    return tensorrt, torch


def engine_files(folder: Path, manifest: dict[str, Any]) -> dict[str, str]:
    """Engine file per graph role: from the manifest when the exporter built them, else from the
    build plan (engines built on the device by build_trt.sh), else the names the plan gives."""
    from ..build.trt import engine_file

    rec = manifest.get("trt") or {}
    if rec.get("built") and isinstance(rec.get("engines"), dict):
        return {g: e["engine"] for g, e in rec["engines"].items()}
    plan_path = folder / rec.get("build_plan", "build_plan.json")
    if plan_path.is_file():
        plan = json.loads(plan_path.read_text())
        return {g: e["engine"] for g, e in plan.get("engines", {}).items()}
    return {role: engine_file(role) for role in manifest.get("graphs", {})}


class DeviceArrays(Arrays):
    """runtime/segmented's allocations with the KV buffers as torch tensors on `device` (allocated
    once per run, written in place with the engines' device outputs); positions, indices and the
    write-back buffer stay host numpy, as the other graphs' feeds and outputs do."""

    def __init__(self, torch: Any, device: Any) -> None:
        self.torch, self.device = torch, device

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> Any:
        """`dtype`: the numpy type the segment declares for the buffer (float32 for a bf16 one,
        which the engine then casts per call)."""
        return self.torch.zeros(shape, dtype=getattr(self.torch, np.dtype(dtype).name), device=self.device)


class TrtGraph:
    """One deserialized engine and its execution context, fed by name like `ort.Graph`."""

    def __init__(self, path: Path, runtime: Any, trt: Any, torch: Any, stream: Any,
                 device_outputs: tuple[str, ...] = (), device: Any = None) -> None:
        self.name = path.name
        self._trt, self._torch, self.stream = trt, torch, stream
        self.device = device if device is not None else torch.device("cuda", torch.cuda.current_device())
        self.device_outputs = device_outputs  # output name prefixes returned as torch device tensors
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise UserError(f"TensorRT {trt.__version__} cannot load {path}: engines only load with the TensorRT "
                            "version and GPU they were built for (rebuild with build_trt.sh)")
        self.engine = engine
        self.context = engine.create_execution_context()
        if self.context is None:
            raise RuntimeError(f"TensorRT could not create an execution context for {path}")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.inputs]
        self._types = {n: engine.get_tensor_dtype(n) for n in names}
        self._shape_inputs = {n for n in self.inputs if engine.is_shape_inference_io(n)}
        self.profiles = self._profile_ranges()
        self.profile = 0  # a new context starts in profile 0

    def _profile_ranges(self) -> list[dict[str, tuple[tuple[int, ...], tuple[int, ...]]]]:
        """Per optimization profile, each shape input's (min, max) (static inputs are absent)."""
        count = int(getattr(self.engine, "num_optimization_profiles", 1) or 1)
        if count == 1:
            return [{}]  # nothing to choose: set_input_shape checks the one profile
        out = []
        for i in range(count):
            ranges = {}
            for name in self.inputs:
                if name in self._shape_inputs:
                    continue
                lo, _, hi = self.engine.get_tensor_profile_shape(name, i)
                ranges[name] = (tuple(int(d) for d in lo), tuple(int(d) for d in hi))
            out.append(ranges)
        return out

    def select_profile(self, shapes: dict[str, tuple[int, ...]]) -> int:
        """The first profile (in index order: decode before prefill) all input shapes fit."""
        for i, ranges in enumerate(self.profiles):
            if all(len(shapes[n]) == len(lo) and all(a <= d <= b for d, a, b in zip(shapes[n], lo, hi))
                   for n, (lo, hi) in ranges.items()):
                return i
        wanted = {n: list(s) for n, s in shapes.items() if any(n in r for r in self.profiles)}
        raise RuntimeError(f"{self.name}: input shapes {wanted} fit none of the engine's {len(self.profiles)} "
                           "optimization profiles (decode: one row, the full KV buffer; prefill: the prompt's "
                           "rows, a one-row buffer)")

    def _use_profile(self, index: int) -> None:
        if index == self.profile:
            return
        if not self.context.set_optimization_profile_async(index, self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT could not switch {self.name} to optimization profile {index}")
        self.profile = index

    def _np_dtype(self, name: str) -> np.dtype:
        t = self._types[name]
        if t.name == "BF16":
            return np.dtype(np.float32)  # numpy has no bfloat16: feed float32, cast on the GPU
        return np.dtype(self._trt.nptype(t))

    def _torch_dtype(self, name: str) -> Any:
        key = self._types[name].name
        if key not in _TORCH_DTYPES:
            raise RuntimeError(f"{self.name}: tensor {name} has TensorRT type {key}, which this runner cannot hold")
        return getattr(self._torch, _TORCH_DTYPES[key])

    def dtype(self, name: str) -> np.dtype:
        return self._np_dtype(name)

    @property
    def input_types(self) -> dict[str, np.dtype]:
        return {n: self._np_dtype(n) for n in self.inputs}

    def __call__(self, feeds: dict[str, Any]) -> dict[str, Any]:
        """Feeds the engine does not declare are dropped, as `ort.Graph` does; one it declares
        but is not given is a contract break."""
        torch, ctx = self._torch, self.context
        missing = sorted(set(self.inputs) - set(feeds))
        if missing:
            raise RuntimeError(f"{self.name} wants inputs {missing} that the runtime does not provide")
        keep: list[Any] = []  # every buffer bound below stays alive until the stream is synchronized
        bound: dict[str, Any] = {}  # input name -> the device tensor bound to it
        with torch.cuda.stream(self.stream) if self.device.type == "cuda" else contextlib.nullcontext():
            if len(self.profiles) > 1:  # before any shape is set: a switch drops the context's shapes
                self._use_profile(self.select_profile({n: tuple(feeds[n].shape) for n in self.inputs}))
            for name in self.inputs:
                x = feeds[name]
                if name in self._shape_inputs:  # shape tensors are read from host memory
                    host = np.ascontiguousarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x,
                                                dtype=self._np_dtype(name))
                    keep.append(host)
                    ctx.set_input_shape(name, host.shape)
                    ctx.set_tensor_address(name, host.ctypes.data)
                    continue
                if isinstance(x, torch.Tensor):  # a KV buffer on the device: bound as it is, no copy
                    t = x.to(device=self.device, dtype=self._torch_dtype(name)).contiguous()
                else:
                    arr = np.array(x, dtype=self._np_dtype(name), order="C")  # writable copy: feeds may be mmap views
                    t = torch.from_numpy(arr).to(self.device).to(self._torch_dtype(name))
                keep.append(t)
                bound[name] = t
                if not ctx.set_input_shape(name, tuple(t.shape)):
                    raise RuntimeError(f"{self.name}: input {name} of shape {tuple(t.shape)} is outside the "
                                       f"engine's optimization profile {self.profile}")
                ctx.set_tensor_address(name, t.data_ptr())
            outputs = {}
            for name in self.output_names:
                shape = tuple(ctx.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise RuntimeError(f"{self.name}: output {name} has an unresolved shape {shape}")
                past = C.PAST_PREFIX + name.removeprefix(PRESENT_PREFIX) if name.startswith(PRESENT_PREFIX) else None
                # IKVCacheUpdateLayer writes the cache in place: its output must alias the cache input
                t = bound[past] if past in bound else torch.empty(shape, dtype=self._torch_dtype(name), device=self.device)
                outputs[name] = t
                ctx.set_tensor_address(name, t.data_ptr())
            if not ctx.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError(f"TensorRT failed to run {self.name} (see its log above)")
        self.stream.synchronize()
        del keep
        return {name: t if self.device_outputs and name.startswith(self.device_outputs) else self._host(t)
                for name, t in outputs.items()}

    def _host(self, t: Any) -> np.ndarray:
        if t.dtype == self._torch.bfloat16:
            t = t.float()
        return t.cpu().numpy()


class TrtArtifact(OrtArtifact):
    """An artifact folder with TensorRT engines: same interface as OrtArtifact
    (load, prepare, prefill, decode_step, generate, trace; bind for runtime.base.Runtime)."""

    backend = "tensorrt"
    sized_buffers = False  # each segment engine's decode profile takes exactly P = M_s (build/trt.py)
    keepalive: tuple[Any, ...] = ()  # TensorRT's runtime and logger: engines must not outlive them

    def __init__(self, folder: Path, manifest: dict[str, Any], graphs: dict[str, Any], embed_tokens: np.ndarray,
                 preprocessor: ArtifactProcessor, kv_arrays: Arrays | None = None) -> None:
        super().__init__(folder, manifest, graphs, embed_tokens, preprocessor)
        if kv_arrays is not None:  # device_kv: the fixed KV buffers on the GPU, for every image-size bucket
            self.decoders = [Decoder(d.layout, self._call, kv_arrays, route_role=d.route_role) for d in self.decoders]
            self.decoder = self.decoders[0]

    @property
    def providers(self) -> list[str]:
        return ["TensorRT"]

    @classmethod
    def load(cls, folder: Path, providers: list[str] | None = None, *, verify: bool = True,
             device_kv: bool = False, plugin_lib: str | None = None) -> "TrtArtifact":
        """`providers` is accepted for OrtArtifact.load compatibility and ignored."""
        trt, torch = _import_tensorrt()
        folder = Path(folder)
        manifest = read_manifest(folder, verify=verify)
        lacking = [k for k in MANIFEST_KEYS if k not in manifest]
        if lacking:
            raise UserError(f"artifact {folder}: manifest lacks {', '.join(lacking)}; re-export it")
        roles = list(manifest.get("graphs", {}))
        if "decoder" not in manifest or C.segment(0) not in roles:
            raise UserError(f"artifact {folder} has no segment graphs (an earlier layout); re-export it")
        files = engine_files(folder, manifest)
        absent = [files.get(r, r) for r in roles if r not in files or not (folder / files[r]).is_file()]
        if absent:
            raise UserError(f"artifact {folder} has no TensorRT engines ({', '.join(absent[:4])}"
                            f"{' ...' if len(absent) > 4 else ''} missing of {len(roles)}): build them with its "
                            "build_trt.sh on the target device, or export with --target trt where TensorRT and a "
                            "GPU are present")
        plan_lib = _plan_plugin_lib(folder, manifest)
        for lib in {plugin_lib, plan_lib} - {None}:
            from ..build.trt import load_plugin_library

            load_plugin_library(lib)  # engines built with plugins need their creators registered
        built_with = (manifest.get("trt") or {}).get("tensorrt_version")
        if built_with and built_with != trt.__version__:
            raise UserError(f"the engines in {folder} were built with TensorRT {built_with}; this is TensorRT "
                            f"{trt.__version__}: rebuild them here (build_trt.sh)")
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        stream = torch.cuda.Stream()
        kv = (KV_PREFIX, PRESENT_PREFIX) if device_kv else ()

        def graph(role: str) -> TrtGraph:
            return TrtGraph(folder / files[role], runtime, trt, torch, stream, kv if role.startswith("segment") else ())

        graphs = {r: graph(r) for r in roles}
        embed = np.load(folder / C.EMBEDDINGS, mmap_mode="r")
        pre = ArtifactProcessor.load(folder / C.PREPROCESSOR, manifest["family"])
        arrays = DeviceArrays(torch, graphs[C.segment(0)].device) if device_kv else None
        art = cls(folder, manifest, graphs, embed, pre, arrays)
        art.keepalive = (runtime, logger)
        return art


def _plan_plugin_lib(folder: Path, manifest: dict[str, Any]) -> str | None:
    plan_path = folder / (manifest.get("trt") or {}).get("build_plan", "build_plan.json")
    if plan_path.is_file():
        return json.loads(plan_path.read_text()).get("plugin_lib")
    return None
