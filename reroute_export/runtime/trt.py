"""Run an artifact's TensorRT engines: the OrtArtifact contract with engines instead of sessions.

`TrtArtifact` subclasses `OrtArtifact` and replaces only the three graph runners, so the
host side (input checks, embedding lookup, image-slot writes, position ids, the greedy
decode loop, `trace`) is the very code the ONNX Runtime path runs: a parity difference
between the two can only come from the engines.

Each `TrtGraph` has `OrtArtifact.Graph`'s duck type (`dtype(name)`, `__call__(feeds) ->
outputs`): per call it sets every input's shape on the execution context
(`set_input_shape`), asks TensorRT for the output shapes (`get_tensor_shape`), allocates
them as torch CUDA tensors, binds addresses (`set_tensor_address`) and runs
`execute_async_v3` on its own torch CUDA stream. By default outputs come back as numpy
(the OrtArtifact contract, KV caches included); `device_kv=True` keeps the per-layer
caches on the GPU between decode steps (torch CUDA tensors in `prefill()["kv"]`), which
is what a benchmark wants.

Engines are found in manifest["trt"]["engines"] (built by `--target trt` on a GPU
machine) or, for engines built later on the device by build_trt.sh, in build_plan.json.
`tensorrt` and CUDA are needed only here, imported lazily; without them `load` fails with
one line.
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

GRAPHS = ("vision", "prefill", "decode")
KV_PREFIX = C.present(0, "key").removesuffix("0.key")  # "present.": outputs kept on the GPU with device_kv
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
    """Engine file per graph: from the manifest when the exporter built them, else from the
    build plan (engines built on the device by build_trt.sh)."""
    rec = manifest.get("trt") or {}
    if rec.get("built") and isinstance(rec.get("engines"), dict):
        return {g: e["engine"] for g, e in rec["engines"].items()}
    plan_path = folder / rec.get("build_plan", "build_plan.json")
    if plan_path.is_file():
        plan = json.loads(plan_path.read_text())
        return {g: e["engine"] for g, e in plan.get("engines", {}).items()}
    return {g: f"{g}.engine" for g in GRAPHS}


class TrtGraph:
    """One deserialized engine and its execution context, fed by name like `ort.Graph`."""

    def __init__(self, path: Path, runtime: Any, trt: Any, torch: Any, stream: Any,
                 device_outputs: tuple[str, ...] = (), device: Any = None) -> None:
        self.name = path.name
        self._trt, self._torch, self.stream = trt, torch, stream
        self.device = device if device is not None else torch.device("cuda", torch.cuda.current_device())
        self.device_outputs = device_outputs  # output name prefixes returned as torch CUDA tensors
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

    def __call__(self, feeds: dict[str, Any]) -> dict[str, Any]:
        """Feeds the engine does not declare are dropped, as `ort.Graph` does; one it declares
        but is not given is a contract break."""
        torch, ctx = self._torch, self.context
        missing = sorted(set(self.inputs) - set(feeds))
        if missing:
            raise RuntimeError(f"{self.name} wants inputs {missing} that the runtime does not provide")
        keep: list[Any] = []  # every buffer bound below stays alive until the stream is synchronized
        with torch.cuda.stream(self.stream) if self.device.type == "cuda" else contextlib.nullcontext():
            for name in self.inputs:
                x = feeds[name]
                if name in self._shape_inputs:  # shape tensors are read from host memory
                    host = np.ascontiguousarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x,
                                                dtype=self._np_dtype(name))
                    keep.append(host)
                    ctx.set_input_shape(name, host.shape)
                    ctx.set_tensor_address(name, host.ctypes.data)
                    continue
                if isinstance(x, torch.Tensor):
                    t = x.to(device=self.device, dtype=self._torch_dtype(name)).contiguous()
                else:
                    arr = np.array(x, dtype=self._np_dtype(name), order="C")  # writable copy: feeds may be mmap views
                    t = torch.from_numpy(arr).to(self.device).to(self._torch_dtype(name))
                keep.append(t)
                if not ctx.set_input_shape(name, tuple(t.shape)):
                    raise RuntimeError(f"{self.name}: input {name} of shape {tuple(t.shape)} is outside the "
                                       "engine's optimization profile")
                ctx.set_tensor_address(name, t.data_ptr())
            outputs = {}
            for name in self.output_names:
                shape = tuple(ctx.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise RuntimeError(f"{self.name}: output {name} has an unresolved shape {shape}")
                t = torch.empty(shape, dtype=self._torch_dtype(name), device=self.device)
                outputs[name] = t
                ctx.set_tensor_address(name, t.data_ptr())
            if not ctx.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError(f"TensorRT failed to run {self.name} (see its log above)")
        self.stream.synchronize()
        del keep
        return {name: t if name.startswith(self.device_outputs) else self._host(t) for name, t in outputs.items()}

    def _host(self, t: Any) -> np.ndarray:
        if t.dtype == self._torch.bfloat16:
            t = t.float()
        return t.cpu().numpy()


class TrtArtifact(OrtArtifact):
    """An artifact folder with TensorRT engines: same interface as OrtArtifact
    (load, prepare, prefill, decode_step, generate, trace; bind for runtime.base.Runtime)."""

    backend = "tensorrt"
    keepalive: tuple[Any, ...] = ()  # TensorRT's runtime and logger: engines must not outlive them

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
        files = engine_files(folder, manifest)
        absent = [f for g, f in files.items() if g in GRAPHS and not (folder / f).is_file()]
        if absent or not set(GRAPHS) <= set(files):
            raise UserError(f"artifact {folder} has no TensorRT engines ({', '.join(absent) or 'none listed'} "
                            "missing): build them with its build_trt.sh on the target device, or export with "
                            "--target trt where TensorRT and a GPU are present")
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
        kv = (KV_PREFIX,) if device_kv else ()
        graphs = {g: TrtGraph(folder / files[g], runtime, trt, torch, stream, kv) for g in GRAPHS}
        embed = np.load(folder / C.EMBEDDINGS, mmap_mode="r")
        pre = ArtifactProcessor.load(folder / C.PREPROCESSOR, manifest["family"])
        art = cls(folder, manifest, graphs, embed, pre)
        art.keepalive = (runtime, logger)
        return art


def _plan_plugin_lib(folder: Path, manifest: dict[str, Any]) -> str | None:
    plan_path = folder / (manifest.get("trt") or {}).get("build_plan", "build_plan.json")
    if plan_path.is_file():
        return json.loads(plan_path.read_text()).get("plugin_lib")
    return None
