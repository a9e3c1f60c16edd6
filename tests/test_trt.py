"""The TensorRT target.

On CPU (here and in CI: no TensorRT, no GPU): `--target trt` writes the ONNX artifact, the
build plan and an executable build_trt.sh, and exits with EXIT_NOT_BUILT. The script's
trtexec commands are parsed and checked flag by flag against the per-version tables
(TensorRT 10.3 for JetPack 6.x, TensorRT 11) and against NVIDIA's documented removals,
and their shapes against the ONNX graphs' own inputs. The runner's plumbing is checked
with an ONNX Runtime stand-in for the TensorRT module (clearly not an engine).

Where TensorRT and a CUDA GPU are present, real engines are built for tiny-llava and
`TrtArtifact.trace` is compared with `OrtArtifact.trace`; elsewhere those tests skip
with the reason.
"""

from __future__ import annotations

import ctypes
import json
import os
import shlex
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import sample_inputs, tiny_artifact
from reroute_export.build import trt as B
from reroute_export.check.lint import lint
from reroute_export.cli import main
from reroute_export.errors import UserError
from reroute_export import contract as C
from reroute_export.export.artifact import read_manifest, sha256_file

# Facts from NVIDIA's migration guides, kept independent of data/trt_devices.json:
# https://docs.nvidia.com/deeplearning/tensorrt/11.0.0/api/migration/tensorrt-8x-to-10x-trtexec.html
REMOVED_IN_10 = {"--workspace", "--minTiming", "--batch", "--maxBatch", "--deploy", "--model", "--output", "--uff",
                 "--uffInput", "--uffNHWC"}
# https://docs.nvidia.com/deeplearning/tensorrt/11.0.0/api/migration/tensorrt-10x-to-11x-trtexec.html
REMOVED_IN_11 = {"--fp16", "--bf16", "--int8", "--fp8", "--int4", "--best", "--calib"}
PRECISION_FLAGS = REMOVED_IN_11 | {"--stronglyTyped", "--noTF32"}
SHAPE_FLAGS = ("--minShapes", "--optShapes", "--maxShapes")


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def cli_trt(tmp_path_factory) -> tuple[int, Path]:
    """One real `--target trt --device jetson-orin` export of tiny-llava, shared by this module."""
    out = tmp_path_factory.mktemp("trt") / "out"
    code = main(["--model", "tiny-llava", "--budget", "32", "--target", "trt", "--device", "jetson-orin",
                 "--output", str(out), "--quiet"])
    return code, out


def copy_artifact(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def trtexec_commands(script: str) -> list[list[str]]:
    """The trtexec invocations of a bash script, as argv lists (continuation lines joined)."""
    commands = []
    for line in script.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        if argv and argv[0] == "trtexec":
            commands.append(argv)
    return commands


def parse_shapes(value: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for item in value.split(","):
        name, _, dims = item.rpartition(":")
        assert name and dims, f"malformed shape entry {item!r}"
        shape = tuple(int(d) for d in dims.split("x"))
        assert all(d >= 1 for d in shape), item
        assert name not in out, f"{name} given twice"
        out[name] = shape
    return out


def onnx_inputs(path: Path) -> dict[str, list[int | str]]:
    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    return {i.name: [d.dim_param if not d.HasField("dim_value") else d.dim_value
                     for d in i.type.tensor_type.shape.dim]
            for i in model.graph.input if i.name not in inits}


def check_build_files(folder: Path, version: str) -> dict:
    """Everything build_trt.sh asks trtexec for is valid for `version` and fits the graphs."""
    manifest = json.loads((folder / C.MANIFEST).read_text())
    plan = json.loads((folder / B.PLAN_FILE).read_text())
    script_path = folder / B.SCRIPT_FILE
    assert os.access(script_path, os.X_OK)
    script = script_path.read_text()
    assert script.startswith("#!/usr/bin/env bash\n") and "\nset -euo pipefail\n" in script
    assert plan["trt_version"] == version
    table = B.trtexec_table(version)
    commands = trtexec_commands(script)
    assert len(commands) == 3
    sh = manifest["shapes"]
    n, bases = sh["visual_tokens"], sh["kv_cache_lengths"]
    seen_graphs = set()
    for argv in commands:
        flags = {}
        for arg in argv[1:]:
            assert arg.startswith("--"), arg
            name, eq, value = arg.partition("=")
            assert name in table["flags"], f"{name} is not a TensorRT {version} trtexec flag"
            assert name not in table["removed"] and name not in REMOVED_IN_10
            if version == "11":
                assert name not in REMOVED_IN_11, f"{name} was removed in TensorRT 11"
            assert name not in flags, f"{name} given twice"
            flags[name] = value if eq else None
        onnx_file, engine = flags["--onnx"], flags["--saveEngine"]
        graph = engine.removesuffix(".engine")
        seen_graphs.add(graph)
        assert (folder / onnx_file).is_file() and onnx_file == manifest["graphs"][graph]
        assert plan["engines"][graph]["trtexec"] == argv  # the script runs exactly the plan
        pool, _, mib = flags["--memPoolSize"].partition(":")
        assert pool == "workspace" and int(mib) == plan["workspace_mib"] > 0
        assert flags["--timingCacheFile"] == B.TIMING_CACHE and "--skipInference" in flags
        assert plan["recipe"] == B.build_precision(manifest)
        assert {f for f in flags if f in PRECISION_FLAGS} == set(table["precision_flags"][plan["recipe"]])
        # shapes: exactly the graph's dynamic inputs, right rank, static axes kept, shared symbols equal
        inputs = onnx_inputs(folder / onnx_file)
        dynamic = {k for k, dims in inputs.items() if any(isinstance(d, str) for d in dims)}
        if not dynamic:
            assert not any(f in flags for f in SHAPE_FLAGS)
            continue
        profiles = [parse_shapes(flags[f]) for f in SHAPE_FLAGS]
        for prof in profiles:
            assert set(prof) == dynamic, (graph, set(prof) ^ dynamic)
            symbol_values: dict[str, int] = {}
            for name, shape in prof.items():
                dims = inputs[name]
                assert len(shape) == len(dims), (name, shape, dims)
                for got, want in zip(shape, dims):
                    if isinstance(want, str):
                        assert symbol_values.setdefault(want, got) == got, f"{want} differs across inputs"
                    else:
                        assert got == want, (name, shape, dims)
        lo, opt, hi = profiles
        for name in dynamic:
            assert all(a <= b <= c for a, b, c in zip(lo[name], opt[name], hi[name])), name
        if graph == "prefill":
            assert lo[C.INPUTS_EMBEDS][1] == n + 2 and hi[C.INPUTS_EMBEDS][1] == sh["max_prompt_tokens"]
            rank = 3 if manifest["family"] == "qwen2.5-vl" else 2
            assert len(hi[C.POSITION_IDS]) == rank and hi[C.POSITION_IDS][-1] == sh["max_prompt_tokens"]
        if graph == "decode":
            for i, base in enumerate(bases):  # cache of layer i: L - N + K_i (+ generated tokens)
                k_i = n + base
                assert lo[C.past(i, "key")][2] == 2 + k_i
                assert hi[C.past(i, "value")][2] == sh["max_prompt_tokens"] - n + k_i + sh["max_new_tokens"] - 1
    assert seen_graphs == {"vision", "prefill", "decode"}
    return plan


# ---------------------------------------------------------------- CPU: the command and its files


def test_cli_target_trt_writes_artifact_plan_and_script(cli_trt) -> None:
    code, out = cli_trt
    if B.tensorrt_status()[0]:
        pytest.skip("TensorRT and a GPU are present, but a Jetson target is never built here either")
    assert code == B.EXIT_NOT_BUILT == 3
    manifest = read_manifest(out, verify=True)  # re-hashes every listed file
    for name in (C.VISION, C.PREFILL, C.DECODE, C.EMBEDDINGS, B.PLAN_FILE, B.SCRIPT_FILE):
        assert (out / name).is_file()
    for name in (B.PLAN_FILE, B.SCRIPT_FILE):
        assert manifest["files"][name]["sha256"] == sha256_file(out / name)
    rec = manifest["trt"]
    assert rec["built"] is False and "jetson-orin" in rec["reason"]
    assert rec["trt_version"] == "10.3" and rec["build_plan"] == B.PLAN_FILE and rec["build_script"] == B.SCRIPT_FILE
    assert rec["memory"]["run_gib"] > rec["memory"]["engines_gib"] > 0
    assert not list(out.glob("*.engine")), "an engine file where no engine could be built"
    report = lint(out, "10.3")
    assert report["passed"], report["findings"]


def test_jetson_script_is_valid_for_tensorrt_10_3(cli_trt) -> None:
    _, out = cli_trt
    plan = check_build_files(out, "10.3")
    assert plan["device"]["name"] == "jetson-orin" and plan["device"]["jetpack"] == "6.x"
    assert plan["builder_flags"] == [] and plan["clear_flags"] == ["TF32"] and not plan["strongly_typed"]
    assert all("--noTF32" in e["trtexec"] for e in plan["engines"].values())  # fp32 stays fp32 on Orin (SM 8.7)


def test_tensorrt_11_script_has_no_precision_flags(cli_trt, tmp_path) -> None:
    folder = copy_artifact(cli_trt[1], tmp_path / "a")
    manifest = json.loads((folder / C.MANIFEST).read_text())
    B.write_build_files(folder, B.build_plan(folder, manifest, "gpu-trt11"))
    plan = check_build_files(folder, "11")
    assert plan["strongly_typed"] and plan["builder_flags"] == []
    for e in plan["engines"].values():
        assert not set(a.split("=")[0] for a in e["trtexec"]) & PRECISION_FLAGS


def test_fp16_artifact_flags_per_version(tmp_path) -> None:
    folder = copy_artifact(tiny_artifact("llava", precision="fp16"), tmp_path / "a")
    manifest = json.loads((folder / C.MANIFEST).read_text())
    B.write_build_files(folder, B.build_plan(folder, manifest, "jetson-orin-nano"))
    plan = check_build_files(folder, "10.3")
    assert plan["builder_flags"] == ["FP16"] and not plan["strongly_typed"]
    assert all("--fp16" in e["trtexec"] and "--noTF32" not in e["trtexec"] for e in plan["engines"].values())
    assert plan["memory"]["kv_cache_gib"] * B.GIB == B.kv_cache_bytes(manifest, 2)  # fp16 caches
    assert plan["workspace_mib"] == 1024 and plan["memory"]["device_memory_gib"] == 8
    B.write_build_files(folder, B.build_plan(folder, manifest, "gpu-trt11"))
    plan = check_build_files(folder, "11")
    assert plan["strongly_typed"] and plan["builder_flags"] == []
    assert all(not set(e["trtexec"]) & PRECISION_FLAGS for e in plan["engines"].values())


def test_qwen_mrope_positions_profile(tmp_path) -> None:
    folder = copy_artifact(tiny_artifact("qwen2.5-vl"), tmp_path / "q")
    manifest = json.loads((folder / C.MANIFEST).read_text())
    B.write_build_files(folder, B.build_plan(folder, manifest, "jetson-orin"))
    plan = check_build_files(folder, "10.3")
    shapes = plan["engines"]["prefill"]["profile"]["shapes"][C.POSITION_IDS]
    assert shapes["min"] == [3, 1, manifest["shapes"]["visual_tokens"] + 2]
    assert plan["engines"]["vision"]["profile"] is None  # the image grid is fixed at export


def test_decode_profile_follows_the_graphs_axis_names(cli_trt) -> None:
    """Layers that share a cache-length symbol in decode.onnx must get one range; a manifest
    that contradicts the graph is refused rather than planned."""
    out = cli_trt[1]
    manifest = json.loads((out / C.MANIFEST).read_text())
    inputs = B.graph_inputs(onnx.load(str(out / C.DECODE), load_external_data=False))
    symbols = {i.name: i.dims[2] for i in inputs if i.dynamic}
    prof = B.decode_profile(manifest, inputs)
    assert set(prof.axes) == set(symbols.values())
    layer = {name: int(name.split(".")[1]) for name in symbols}
    shared = [(a, b) for a in symbols for b in symbols if layer[a] < layer[b] and symbols[a] == symbols[b]]
    assert shared, "the exporter shares one cache axis per stage"
    a, b = shared[0]
    bad = json.loads(json.dumps(manifest))
    bad["shapes"]["kv_cache_lengths"][layer[b]] -= 1
    with pytest.raises(UserError, match="share cache axis"):
        B.decode_profile(bad, inputs)


def test_device_table_is_complete() -> None:
    table = B.device_table()
    for name, dev in table["devices"].items():
        assert dev["trt_version"] in table["trtexec"] and dev["trt_version"] in table["python"], name
        if name.startswith("jetson"):
            assert dev["trt_version"] == "10.3" and dev["memory_gib"] and dev["jetpack"] == "6.x"
    for version, t in table["trtexec"].items():
        assert t["sources"] and set(t["precision_flags"]) >= {"fp32", "fp16"}
        assert t["plugin_flag"] in t["flags"] and not set(t["flags"]) & set(t["removed"])
        assert all(f in t["flags"] for flags in t["precision_flags"].values() for f in flags)
    assert not set(table["trtexec"]["11"]["flags"]) & REMOVED_IN_11
    with pytest.raises(UserError, match="unknown device"):
        B.device("jetson-xavier")


def test_plugin_library_flag(cli_trt) -> None:
    out = cli_trt[1]
    manifest = json.loads((out / C.MANIFEST).read_text())
    for dev, version in (("jetson-orin", "10.3"), ("gpu-trt11", "11")):
        plan = B.build_plan(out, manifest, dev, plugin_lib="/opt/reroute/libreroute_plugins.so")
        flag = B.trtexec_table(version)["plugin_flag"]
        assert all(f"{flag}=/opt/reroute/libreroute_plugins.so" in e["trtexec"] for e in plan["engines"].values())
        assert plan["plugin_lib"] == "/opt/reroute/libreroute_plugins.so"


def test_quantized_graphs_are_strongly_typed(cli_trt) -> None:
    """Q/DQ artifacts (calibrate's int8/fp8) carry their precision in the graph; FP8 on an Orin
    (SM 8.7) is flagged before anyone copies the artifact there."""
    out = cli_trt[1]
    manifest = json.loads((out / C.MANIFEST).read_text())
    for precision in ("int8", "fp8"):
        m = {**manifest, "precision": precision}
        p10, p11 = B.build_plan(out, m, "jetson-orin"), B.build_plan(out, m, "gpu-trt11")
        assert p10["strongly_typed"] and p11["strongly_typed"] and p10["builder_flags"] == []
        for e10, e11 in zip(p10["engines"].values(), p11["engines"].values()):
            assert {a for a in e10["trtexec"] if a in PRECISION_FLAGS} == {"--stronglyTyped"}
            assert not {a for a in e11["trtexec"] if a in PRECISION_FLAGS}
        assert bool(p10["warnings"]) == (precision == "fp8") and not p11["warnings"]
    # an fp16 export with decoder layers kept in fp32: weak typing could run those layers in fp16
    mixed = B.build_plan(out, {**manifest, "precision": "fp16", "fp32_layers": [3]}, "jetson-orin")
    assert mixed["recipe"] == "mixed" and mixed["strongly_typed"] and mixed["builder_flags"] == []
    assert all({a for a in e["trtexec"] if a in PRECISION_FLAGS} == {"--stronglyTyped"}
               for e in mixed["engines"].values())
    with pytest.raises(UserError, match="no TensorRT 10.3 build recipe"):
        B.build_plan(out, {**manifest, "precision": "int4"}, "jetson-orin")


def test_build_script_runs_the_planned_commands(cli_trt, tmp_path) -> None:
    """bash runs build_trt.sh from another directory and hands trtexec exactly the planned argv
    (a recording stand-in for trtexec on PATH: it builds nothing)."""
    import subprocess

    folder = copy_artifact(cli_trt[1], tmp_path / "a")
    bin_dir, log = tmp_path / "bin", tmp_path / "argv.jsonl"
    bin_dir.mkdir()
    fake = bin_dir / "trtexec"
    fake.write_text("#!/usr/bin/env python3\nimport json, os, sys\n"
                    f"open({str(log)!r}, 'a').write(json.dumps([os.getcwd()] + sys.argv[1:]) + '\\n')\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    res = subprocess.run(["bash", str(folder / B.SCRIPT_FILE)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    plan = json.loads((folder / B.PLAN_FILE).read_text())
    assert [c[1:] for c in calls] == [e["trtexec"][1:] for e in plan["engines"].values()]
    assert {Path(c[0]).resolve() for c in calls} == {folder.resolve()}


def test_runner_without_tensorrt_says_so(cli_trt) -> None:
    if B.tensorrt_status()[0]:
        pytest.skip("TensorRT and a GPU are present")
    from reroute_export.runtime.trt import TrtArtifact

    with pytest.raises(UserError, match="TensorRT"):
        TrtArtifact.load(cli_trt[1])


# ---------------------------------------------------------------- CPU: the runner's plumbing


class _DataType:
    def __init__(self, name: str, np_type: type) -> None:
        self.name, self.np = name, np_type


_ORT_TYPES = {"tensor(float)": _DataType("FLOAT", np.float32), "tensor(float16)": _DataType("HALF", np.float16),
              "tensor(int64)": _DataType("INT64", np.int64), "tensor(int32)": _DataType("INT32", np.int32),
              "tensor(bool)": _DataType("BOOL", np.bool_)}


class OrtBackedTensorRT:
    """A stand-in for the `tensorrt` module whose "engines" are ONNX Runtime sessions on the
    artifact's own graphs, driven through the same name/shape/address calls TrtGraph makes
    (host memory: CPU torch tensors). It tests the runner's plumbing, never TensorRT."""

    __version__ = "ort-stand-in"

    class TensorIOMode:
        INPUT, OUTPUT = "input", "output"

    @staticmethod
    def nptype(dtype: _DataType) -> type:
        return dtype.np

    class Runtime:
        def __init__(self, folder: Path) -> None:
            self.folder = folder

        def deserialize_cuda_engine(self, data: bytes) -> "OrtBackedTensorRT.Engine":
            return OrtBackedTensorRT.Engine(self.folder / data.decode())

    class Engine:
        def __init__(self, path: Path) -> None:
            import onnxruntime as ort

            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            self.io = {i.name: ("input", _ORT_TYPES[i.type]) for i in self.session.get_inputs()}
            self.io |= {o.name: ("output", _ORT_TYPES[o.type]) for o in self.session.get_outputs()}
            self.names = list(self.io)
            self.num_io_tensors = len(self.names)

        def get_tensor_name(self, i: int) -> str:
            return self.names[i]

        def get_tensor_mode(self, name: str) -> str:
            return self.io[name][0]

        def get_tensor_dtype(self, name: str) -> _DataType:
            return self.io[name][1]

        def is_shape_inference_io(self, name: str) -> bool:
            return False

        def create_execution_context(self) -> "OrtBackedTensorRT.Context":
            return OrtBackedTensorRT.Context(self)

    class Context:
        def __init__(self, engine: "OrtBackedTensorRT.Engine") -> None:
            self.engine, self.shapes, self.addresses, self.results = engine, {}, {}, None

        def set_input_shape(self, name: str, shape: tuple) -> bool:
            self.shapes[name], self.results = tuple(shape), None
            return True

        def set_tensor_address(self, name: str, address: int) -> bool:
            self.addresses[name] = address
            return True

        def _read(self, name: str) -> np.ndarray:
            dtype, shape = np.dtype(self.engine.io[name][1].np), self.shapes[name]
            nbytes = int(np.prod(shape)) * dtype.itemsize
            raw = (ctypes.c_char * nbytes).from_address(self.addresses[name])
            return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()

        def get_tensor_shape(self, name: str) -> tuple:
            if self.results is None:
                feeds = {n: self._read(n) for n, (mode, _) in self.engine.io.items() if mode == "input"}
                outs = self.engine.session.run(None, feeds)
                self.results = dict(zip([o.name for o in self.engine.session.get_outputs()], outs))
            return self.results[name].shape

        def execute_async_v3(self, stream_handle: int) -> bool:
            for name, value in self.results.items():
                value = np.ascontiguousarray(value)
                ctypes.memmove(self.addresses[name], value.ctypes.data, value.nbytes)
            self.results = None
            return True


class _HostStream:
    cuda_stream = 0

    def synchronize(self) -> None:
        pass


@pytest.mark.parametrize("device_kv", [False, True])
def test_trt_runner_plumbing_matches_ort(cli_trt, tmp_path, device_kv) -> None:
    import torch

    from reroute_export.families import get_family
    from reroute_export.preprocess import Preprocessor
    from reroute_export.runtime import OrtArtifact
    from reroute_export.runtime.trt import KV_PREFIX, TrtArtifact, TrtGraph

    folder = cli_trt[1]
    manifest = read_manifest(folder)
    fake = OrtBackedTensorRT
    runtime = fake.Runtime(folder)
    graphs = {}
    for graph in ("vision", "prefill", "decode"):
        engine = tmp_path / f"{graph}.engine"  # an "engine" naming the graph the stand-in runs
        engine.write_text(manifest["graphs"][graph])
        graphs[graph] = TrtGraph(engine, runtime, fake, torch, _HostStream(), (KV_PREFIX,) if device_kv else (),
                                 device=torch.device("cpu"))
    art = TrtArtifact(folder, manifest, graphs, np.load(folder / C.EMBEDDINGS, mmap_mode="r"),
                      Preprocessor.from_pretrained(folder / C.PREPROCESSOR, get_family(manifest["family"])))
    inputs = sample_inputs("llava")
    got = art.trace(inputs, 6)
    ref = OrtArtifact.load(folder, verify=False).trace(inputs, 6)
    assert got.decisions == ref.decisions and got.generated_ids == ref.generated_ids
    np.testing.assert_array_equal(np.asarray(got.last_logits), np.asarray(ref.last_logits))
    kv = art.prefill(inputs)["kv"][0][0]
    assert isinstance(kv, torch.Tensor) if device_kv else isinstance(kv, np.ndarray)


# ---------------------------------------------------------------- with TensorRT and a GPU


def _need_tensorrt():
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (it has no wheel for these machines)")
    ok, why = B.tensorrt_status()
    if not ok:
        pytest.skip(f"TensorRT engines cannot be built here: {why}")
    return trt


def test_engines_build_and_trace_like_onnx_runtime(tmp_path) -> None:
    trt = _need_tensorrt()
    from reroute_export.runtime import OrtArtifact
    from reroute_export.runtime.trt import TrtArtifact

    folder = copy_artifact(tiny_artifact("llava"), tmp_path / "a")
    manifest = json.loads((folder / C.MANIFEST).read_text())
    plan = B.build_plan(folder, manifest, f"gpu-trt{B.major(trt.__version__)}")
    B.write_build_files(folder, plan)
    res = B.build_engines(folder, plan)
    assert res["built"], res.get("reason")
    assert res["tensorrt_version"] == trt.__version__ and res["gpu"] and res["compute_capability"]
    for e in res["engines"].values():
        assert (folder / e["engine"]).stat().st_size == e["bytes"] > 0 and e["build_s"] >= 0
    inputs = sample_inputs("llava")
    got = TrtArtifact.load(folder, verify=False).trace(inputs, 8)  # engines found through build_plan.json
    ref = OrtArtifact.load(folder, verify=False).trace(inputs, 8)
    assert got.decisions == ref.decisions
    assert got.generated_ids == ref.generated_ids
    assert np.abs(np.asarray(got.last_logits) - np.asarray(ref.last_logits)).max() < 1e-3  # fp32, TF32 off


def test_cli_target_trt_builds_engines_where_it_can(tmp_path) -> None:
    trt = _need_tensorrt()
    from reroute_export.runtime.trt import TrtArtifact

    out = tmp_path / "out"
    code = main(["--model", "tiny-llava", "--budget", "32", "--target", "trt", "--device",
                 f"gpu-trt{B.major(trt.__version__)}", "--output", str(out), "--quiet"])
    assert code == 0
    manifest = read_manifest(out)
    rec = manifest["trt"]
    assert rec["built"] and set(rec["engines"]) == {"vision", "prefill", "decode"}
    for e in rec["engines"].values():
        assert manifest["files"][e["engine"]]["sha256"] == sha256_file(out / e["engine"])
    result = TrtArtifact.load(out).trace(sample_inputs("llava"), 4)
    assert len(result.generated_ids) == 4
