"""The TensorRT target.

On CPU (here and in CI: no TensorRT, no GPU): `--target trt` writes the ONNX artifact, the
build plan and an executable build_trt.sh, and exits with EXIT_NOT_BUILT. One engine per
graph role of the manifest (segments, decision heads, routing graphs, vision); segment and
head engines carry two optimization profiles (0 decode: one row against the stage's full KV
buffer; 1 prefill: the prompt's rows against a one-row buffer). The script's trtexec
commands are parsed and checked flag by flag against the per-version tables (TensorRT 10.3
for JetPack 6.x, TensorRT 11) and against NVIDIA's documented removals, and each profile's
shapes against the ONNX graphs' own inputs and the manifest's buffer lengths. The memory
estimate holds each weight once: proved on a tiny artifact by matching every engine's
weights to the model's parameters, and sized for llava-1.5-7b from its architecture on the
meta device (no 14 GB export). The runner's plumbing, profile selection included, is
checked with an ONNX Runtime stand-in for the TensorRT module (clearly not an engine).

Where TensorRT and a CUDA GPU are present, real engines are built for tiny-llava and
`TrtArtifact.trace` is compared with `OrtArtifact.trace`; elsewhere those tests skip
with the reason.
"""

from __future__ import annotations

import ctypes
import hashlib
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
from reroute_export.plan import RoutingPlan

# Facts from NVIDIA's migration guides, kept independent of data/trt_devices.json:
# https://docs.nvidia.com/deeplearning/tensorrt/11.0.0/api/migration/tensorrt-8x-to-10x-trtexec.html
REMOVED_IN_10 = {"--workspace", "--minTiming", "--batch", "--maxBatch", "--deploy", "--model", "--output", "--uff",
                 "--uffInput", "--uffNHWC"}
# https://docs.nvidia.com/deeplearning/tensorrt/11.0.0/api/migration/tensorrt-10x-to-11x-trtexec.html
REMOVED_IN_11 = {"--fp16", "--bf16", "--int8", "--fp8", "--int4", "--best", "--calib"}
PRECISION_FLAGS = REMOVED_IN_11 | {"--stronglyTyped", "--noTF32"}
SHAPE_FLAGS = ("--minShapes", "--optShapes", "--maxShapes")
LLAVA_7B_PARAMETERS = 7_063_427_072  # `reroute-export models --json -`: the published config on the meta device


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def cli_trt(tmp_path_factory) -> tuple[int, Path]:
    """One real `--target trt --device jetson-orin` export of tiny-llava, shared by this module:
    streamed (--random-weights), so every graph's weights are ranges of one weights.data."""
    out = tmp_path_factory.mktemp("trt") / "out"
    code = main(["--model", "tiny-llava", "--random-weights", "--budget", "32", "--target", "trt",
                 "--device", "jetson-orin", "--output", str(out), "--quiet"])
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


def parse_trtexec(argv: list[str]) -> tuple[dict[str, str | None], list[list[dict[str, tuple[int, ...]]]]]:
    """(flags, profiles) as trtexec reads them: each `--profile=i` takes the three shape flags
    right behind it (sampleOptions.cpp getAndDelOptionBehind); indices contiguous from 0; shape
    flags without --profile are the one profile; every other flag at most once."""
    flags: dict[str, str | None] = {}
    profiles: list[list[dict[str, tuple[int, ...]]]] = []
    args = argv[1:]
    i = 0
    while i < len(args):
        name, eq, value = args[i].partition("=")
        assert args[i].startswith("--"), args[i]
        if name == "--profile":
            assert int(value) == len(profiles), f"profile indices not contiguous: {args[i]}"
            group = [a.partition("=") for a in args[i + 1:i + 4]]
            assert [g[0] for g in group] == list(SHAPE_FLAGS), f"--profile={value} not followed by its shapes"
            profiles.append([parse_shapes(g[2]) for g in group])
            i += 4
            continue
        if name in SHAPE_FLAGS:
            assert not profiles, "plain shape flags after --profile groups"
            group = [a.partition("=") for a in args[i:i + 3]]
            assert [g[0] for g in group] == list(SHAPE_FLAGS), args[i:i + 3]
            profiles.append([parse_shapes(g[2]) for g in group])
            assert "--profile" not in [a.partition("=")[0] for a in args[i + 3:]], "mixed plain and --profile shapes"
            i += 3
            continue
        assert name not in flags, f"{name} given twice"
        flags[name] = value if eq else None
        i += 1
    return flags, profiles


def onnx_inputs(path: Path) -> dict[str, list[int | str]]:
    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    return {i.name: [d.dim_param if not d.HasField("dim_value") else d.dim_value
                     for d in i.type.tensor_type.shape.dim]
            for i in model.graph.input if i.name not in inits}


def check_profile_shapes(inputs: dict[str, list[int | str]], profile: list[dict[str, tuple[int, ...]]], what: str) -> \
        dict[str, tuple[int, int, int]]:
    """One profile covers exactly the graph's dynamic inputs, right rank, static axes kept, each
    axis symbol one value across inputs; returns each symbol's (min, opt, max)."""
    dynamic = {k for k, dims in inputs.items() if any(isinstance(d, str) for d in dims)}
    symbols: list[dict[str, int]] = []
    for shapes in profile:
        assert set(shapes) == dynamic, (what, set(shapes) ^ dynamic)
        values: dict[str, int] = {}
        for name, shape in shapes.items():
            dims = inputs[name]
            assert len(shape) == len(dims), (what, name, shape, dims)
            for got, want in zip(shape, dims):
                if isinstance(want, str):
                    assert values.setdefault(want, got) == got, f"{what}: {want} differs across inputs"
                else:
                    assert got == want, (what, name, shape, dims)
        symbols.append(values)
    lo, opt, hi = symbols
    assert all(lo[s] <= opt[s] <= hi[s] for s in lo), (what, symbols)
    return {s: (lo[s], opt[s], hi[s]) for s in lo}


def check_build_files(folder: Path, version: str) -> dict:
    """Everything build_trt.sh asks trtexec for is valid for `version` and fits the graphs: one
    engine per manifest role, the decode/prefill profiles of segments and heads, the scored-row
    profile of routing graphs, a static vision graph or (image-size buckets) one exact-shape
    profile per bucket."""
    manifest = json.loads((folder / C.MANIFEST).read_text())
    plan = json.loads((folder / B.PLAN_FILE).read_text())
    script_path = folder / B.SCRIPT_FILE
    assert os.access(script_path, os.X_OK)
    script = script_path.read_text()
    assert script.startswith("#!/usr/bin/env bash\n") and "\nset -euo pipefail\n" in script
    assert plan["trt_version"] == version
    table = B.trtexec_table(version)
    commands = trtexec_commands(script)
    assert len(commands) == len(manifest["graphs"])
    sh = manifest["shapes"]
    n, hi_prompt = sh["visual_tokens"], sh["max_prompt_tokens"]
    routing = RoutingPlan.from_dict(manifest["plan"])
    cache = manifest["decoder"]["cache_tokens"]
    assert cache == sh["cache_tokens"]
    seen = set()
    for argv in commands:
        flags, profiles = parse_trtexec(argv)
        for name in flags:
            assert name in table["flags"], f"{name} is not a TensorRT {version} trtexec flag"
            assert name not in table["removed"] and name not in REMOVED_IN_10
            if version == "11":
                assert name not in REMOVED_IN_11, f"{name} was removed in TensorRT 11"
        onnx_file, engine = flags["--onnx"], flags["--saveEngine"]
        role = next(r for r, f in manifest["graphs"].items() if f == onnx_file)
        assert role not in seen and engine == B.engine_file(role) == plan["engines"][role]["engine"]
        seen.add(role)
        assert (folder / onnx_file).is_file()
        assert plan["engines"][role]["trtexec"] == argv  # the script runs exactly the plan
        assert [p["name"] for p in plan["engines"][role]["profiles"]] == \
            {"segment": [B.DECODE, B.PREFILL], "head": [B.DECODE, B.PREFILL], "route": ["scored"],
             "vision": plan["profiles"]["vision"]}[B.role_kind(role)]
        pool, _, mib = flags["--memPoolSize"].partition(":")
        assert pool == "workspace" and int(mib) == plan["workspace_mib"] > 0
        assert flags["--timingCacheFile"] == B.TIMING_CACHE and "--skipInference" in flags
        assert plan["recipe"] == B.build_precision(manifest)
        assert {f for f in flags if f in PRECISION_FLAGS} == set(table["precision_flags"][plan["recipe"]])
        inputs = onnx_inputs(folder / onnx_file)
        kind = B.role_kind(role)
        if kind == "vision":
            dynamic = any(isinstance(d, str) for dims in inputs.values() for d in dims)
            assert len(profiles) == (len(manifest["buckets"]) if dynamic else 0)
            for i, p in enumerate(profiles):  # each bucket's exact shapes
                exact = check_profile_shapes(inputs, p, f"{role} profile {i}")
                assert all(lo == opt == hi for lo, opt, hi in exact.values())
                assert p[0] == {k: tuple(v) for k, v in manifest["buckets"][i]["vision_inputs"].items()}
            continue
        ranges = [check_profile_shapes(inputs, p, f"{role} profile {i}") for i, p in enumerate(profiles)]
        t = inputs[C.HIDDEN][1]
        if kind == "segment":
            s = B.role_index(role)
            p = inputs[C.past(routing.segments[s].start, "key")][2]
            decode, prefill = ranges
            assert decode == {t: (1, 1, 1), p: (cache[s],) * 3}, (role, decode)  # T = 1, P = M_s: one shape
            assert prefill[p] == (1, 1, 1) and prefill[t][0] == 1 and prefill[t][2] == hi_prompt, (role, prefill)
        elif kind == "head":
            decode, prefill = ranges
            assert decode == {t: (1, 1, 1)} and prefill[t][0] == 1 and prefill[t][2] == hi_prompt, (role, ranges)
        else:  # route: L - N + m scored rows for L in N + 2 .. max_prompt_tokens, of the role's bucket
            j, k = B.role_index(role), B.role_bucket(role) or 0
            buckets = manifest.get("buckets") or []
            own = RoutingPlan.from_dict(buckets[k]["plan"]) if buckets else routing
            n_k, hi_k = own.visual_tokens, buckets[k]["max_prompt_tokens"] if buckets else hi_prompt
            m = n_k if own.recoverable or j == 0 else own.stages[j - 1].keep
            (scored,) = ranges
            assert scored[t][0] == m + 2 and scored[t][2] == hi_k - n_k + m, (role, scored)
            assert "--profile" not in flags
    assert seen == set(manifest["graphs"])
    return plan


# ---------------------------------------------------------------- CPU: the command and its files


def test_cli_target_trt_writes_artifact_plan_and_script(cli_trt) -> None:
    code, out = cli_trt
    if B.tensorrt_status()[0]:
        pytest.skip("TensorRT and a GPU are present, but a Jetson target is never built here either")
    assert code == B.EXIT_NOT_BUILT == 3
    manifest = read_manifest(out, verify=True)  # re-hashes every listed file
    assert not (out / "prefill.onnx").exists() and not (out / "decode.onnx").exists()
    for name in (*manifest["graphs"].values(), C.EMBEDDINGS, B.PLAN_FILE, B.SCRIPT_FILE):
        assert (out / name).is_file()
    for name in (B.PLAN_FILE, B.SCRIPT_FILE):
        assert manifest["files"][name]["sha256"] == sha256_file(out / name)
    rec = manifest["trt"]
    assert rec["built"] is False and "jetson-orin" in rec["reason"]
    assert rec["trt_version"] == "10.3" and rec["build_plan"] == B.PLAN_FILE and rec["build_script"] == B.SCRIPT_FILE
    assert rec["memory"]["run_gib"] > rec["memory"]["engines_gib"] > 0
    assert set(rec["memory"]["engine_gib"]) == set(manifest["graphs"])
    assert not list(out.glob("*.engine")), "an engine file where no engine could be built"
    for version in ("10.3", "11"):  # the new graphs (segments, heads, routing) parse under both tables
        report = lint(out, version)
        assert report["passed"], (version, report["findings"])


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
    assert plan["memory"]["kv_cache_gib"] * B.GIB == B.kv_cache_bytes(manifest, 2)  # fp16 buffers
    assert plan["workspace_mib"] == 1024 and plan["memory"]["device_memory_gib"] == 8
    for lint_version in ("10.3", "11"):
        assert lint(folder, lint_version)["passed"]
    B.write_build_files(folder, B.build_plan(folder, manifest, "gpu-trt11"))
    plan = check_build_files(folder, "11")
    assert plan["strongly_typed"] and plan["builder_flags"] == []
    assert all(not set(e["trtexec"]) & PRECISION_FLAGS for e in plan["engines"].values())


def test_qwen_mrope_positions_profiles(tmp_path) -> None:
    folder = copy_artifact(tiny_artifact("qwen2.5-vl"), tmp_path / "q")
    manifest = json.loads((folder / C.MANIFEST).read_text())
    B.write_build_files(folder, B.build_plan(folder, manifest, "jetson-orin"))
    plan = check_build_files(folder, "10.3")
    decode, prefill = (p["shapes"][C.POSITION_IDS] for p in plan["engines"][C.segment(0)]["profiles"])
    assert decode["min"] == decode["max"] == [3, 1, 1]
    assert prefill["min"] == [3, 1, 1] and prefill["max"] == [3, 1, manifest["shapes"]["max_prompt_tokens"]]
    assert plan["engines"]["vision"]["profiles"] == []  # the image grid is fixed at export
    assert lint(folder, "10.3")["passed"] and lint(folder, "11")["passed"]


def test_image_buckets_plan_their_own_routing_engines(tmp_path) -> None:
    """Qwen2.5-VL with visual-token buckets: routing engines per bucket (its N, K_j and longest
    prompt), the vision, segment and head engines shared (the vision engine with a profile per
    image size); the KV buffers the largest bucket's; the vision weights counted once."""
    from test_buckets import bucketed

    folder = copy_artifact(bucketed(), tmp_path / "b")
    manifest = json.loads((folder / C.MANIFEST).read_text())
    B.write_build_files(folder, B.build_plan(folder, manifest, "jetson-orin"))
    plan = check_build_files(folder, "10.3")
    assert {C.route(0, 1), C.route(3, 2)} <= set(plan["engines"])
    assert [r for r in plan["engines"] if r.startswith("vision")] == ["vision"]
    assert plan["profiles"]["vision"] == ["image 224x224", "image 112x168", "image 168x112"]
    engine_gib = plan["memory"]["engine_gib"]
    assert [r for r in engine_gib if r.startswith("vision")] == ["vision"]
    assert engine_gib["vision"] * B.GIB == B.weight_bytes(folder, C.VISION) > 0
    assert plan["memory"]["kv_cache_gib"] * B.GIB == B.kv_cache_bytes(manifest, 4)
    assert lint(folder, "10.3")["passed"] and lint(folder, "11")["passed"]


def test_delete_method_routes_score_the_survivors(tmp_path) -> None:
    """pdrop: after the first decision the routing graph takes the survivors (candidates input),
    so its scored rows are L - N + K_{j-1}."""
    folder = copy_artifact(tiny_artifact("llava", method="pdrop"), tmp_path / "p")
    manifest = json.loads((folder / C.MANIFEST).read_text())
    B.write_build_files(folder, B.build_plan(folder, manifest, "gpu-trt11"))
    plan = check_build_files(folder, "11")
    assert C.CANDIDATES in plan["engines"][C.route(1)]["inputs"]
    assert lint(folder, "10.3")["passed"] and lint(folder, "11")["passed"]


def test_plans_refuse_graphs_that_disagree_with_the_manifest(cli_trt) -> None:
    """A manifest that contradicts its graphs, or an artifact of the earlier layout, is refused
    in one line rather than planned."""
    out = cli_trt[1]
    manifest = json.loads((out / C.MANIFEST).read_text())

    def refused(m: dict, match: str) -> None:
        with pytest.raises(UserError, match=match) as err:
            B.build_plan(out, m, "jetson-orin")
        assert "\n" not in str(err.value)

    bad = json.loads(json.dumps(manifest))
    bad["decoder"]["segments"][1], bad["decoder"]["segments"][2] = [1, 2], [2, 5]  # layers moved between stages
    refused(bad, "inputs do not match the manifest's stage 1")
    old = {**manifest, "graphs": {"vision": C.VISION, "prefill": "prefill.onnx", "decode": "decode.onnx"}}
    old.pop("decoder")
    refused(old, "earlier layout")
    refused({**manifest, "graphs": {**manifest["graphs"], "prefill": "prefill.onnx"}}, "no known kind")
    lacking = {**manifest, "graphs": {r: f for r, f in manifest["graphs"].items() if r != C.head(1)}}
    refused(lacking, "lists no head.1 graph")
    swapped = {**manifest, "graphs": {**manifest["graphs"], C.segment(1): manifest["graphs"][C.head(1)]}}
    refused(swapped, "segment_1|head_1")


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
        assert "--profile" in t["flags"] and any("--profile" in src for src in t["sources"])  # two-profile engines
    assert not set(table["trtexec"]["11"]["flags"]) & REMOVED_IN_11
    with pytest.raises(UserError, match="unknown device"):
        B.device("jetson-xavier")


def test_roles_name_engines_and_kinds() -> None:
    assert B.engine_file("segment.0") == "segment_0.engine" and B.engine_file("route.1.b2") == "route_1_b2.engine"
    assert B.engine_file("route.0.b1") == "route_0_b1.engine"
    assert [B.role_kind(r) for r in ("vision", "segment.3", "head.0", "route.0.b1")] == \
        ["vision", "segment", "head", "route"]
    assert B.role_bucket("route.0.b1") == 1 and B.role_bucket("segment.2") is None and B.role_bucket("vision") is None
    with pytest.raises(UserError, match="no known kind"):
        B.role_kind("decode")


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


# ---------------------------------------------------------------- CPU: memory, each weight once


def _digest(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a).tobytes() + str(a.dtype).encode()).hexdigest()


def test_each_weight_is_in_one_engine(cli_trt) -> None:
    """Every model parameter the graphs hold is in exactly one graph (matched by content, a
    transposed copy included: initializer names are module-relative, `layer.input_layernorm.weight`
    in every head graph), every decoder parameter but the embedding table is held, and the
    plan's engine weights are those graphs' bytes: their sum is the artifact's weight bytes,
    the streamed weights.data ranges each counted once."""
    import torch
    from onnx import numpy_helper

    from reroute_export.registry import load

    out = cli_trt[1]
    manifest = json.loads((out / C.MANIFEST).read_text())
    plan = json.loads((out / B.PLAN_FILE).read_text())
    model = load("tiny-llava", torch.float32, "cpu", random_weights=True).model  # the streamed weights, whole
    params = {}
    for name, p in model.named_parameters():
        a = p.detach().numpy()
        params[_digest(a)] = name
        if a.ndim == 2:
            params[_digest(a.T)] = name
    holders: dict[str, set[str]] = {}
    per_graph, ranges = {}, {}
    for role, file in manifest["graphs"].items():
        graph = onnx.load(str(out / file))  # weights.data read in: a tiny model
        tensors = [numpy_helper.to_array(t) for t in graph.graph.initializer]
        per_graph[role] = sum(t.nbytes for t in tensors)
        for t in tensors:
            if _digest(t) in params:
                holders.setdefault(params[_digest(t)], set()).add(role)
        header = onnx.load(str(out / file), load_external_data=False)
        ranges[role] = [tuple(e.value for e in t.external_data if e.key in ("location", "offset"))
                        for t in header.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    twice = {n: r for n, r in holders.items() if len(r) > 1}
    assert not twice, f"weights held by several graphs: {twice}"
    decoder = {n for n, _ in model.named_parameters() if ".language_model." in n and "embed_tokens" not in n}
    decoder |= {n for n, _ in model.named_parameters() if n.startswith("lm_head")}
    assert decoder <= set(holders), sorted(decoder - set(holders))[:4]
    kinds = {n: {B.role_kind(r) for r in roles} for n, roles in holders.items()}
    assert all(kinds[n] <= {"segment", "head"} for n in decoder) and not any("route" in k for k in kinds.values())
    mem = plan["memory"]
    engine = {r: round(g * B.GIB) for r, g in mem["engine_gib"].items()}
    assert engine == per_graph  # the headers' counts are the tensors' bytes
    artifact_bytes = sum(per_graph.values())
    assert round(mem["weights_gib"] * B.GIB) == artifact_bytes
    offsets = [o for r in ranges.values() for o in r]
    assert offsets and len(offsets) == len(set(offsets)) and mem["shared_weights_gib"] == 0  # no range in 2 graphs
    assert {loc for loc, _ in offsets} == {"weights.data"}  # the streamed export's one file
    held = sum(p.numel() * 4 for n, p in model.named_parameters() if n in holders)
    assert 0 <= artifact_bytes - held < 4096, (artifact_bytes, held)  # + rotary tables and scalar constants
    everything = sum(p.numel() * 4 for p in model.parameters())
    assert artifact_bytes < everything  # the embedding table ships as embed_tokens.npy, not in an engine


def test_architecture_estimate_matches_the_exported_graphs(cli_trt) -> None:
    """role_parameters (the estimate without an export) against the graphs exported from the same
    tiny model: exact for the decoder up to small constants, an upper bound for the vision graph."""
    import torch

    from reroute_export.families import get_family
    from reroute_export.registry import load

    out = cli_trt[1]
    manifest = json.loads((out / C.MANIFEST).read_text())
    plan = json.loads((out / B.PLAN_FILE).read_text())
    loaded = load("tiny-llava", torch.float32, "meta", random_weights=True)
    counted = B.role_parameters(loaded.model, get_family(manifest["family"]), RoutingPlan.from_dict(manifest["plan"]))
    assert set(counted) == set(manifest["graphs"])
    for role, n in counted.items():
        measured = round(plan["memory"]["engine_gib"][role] * B.GIB)
        if role == "vision":
            assert measured <= 4 * n, (role, measured, 4 * n)
        else:
            assert 0 <= measured - 4 * n < 1024, (role, measured, 4 * n)


def test_llava_7b_fp16_plan_holds_the_weights_once() -> None:
    """The published llava-1.5-7b architecture (meta device: no weights, no 14 GB export), fp16,
    reroute at budget 128: the decoder's weights come out once (~13.2 GB, not ~27 GB for a
    prefill and a decode graph each holding them), the KV cache is the fixed buffers."""
    from reroute_export.plan import make_plan
    from reroute_export.registry import resolve_spec

    spec = resolve_spec("llava-1.5-7b")
    routing = make_plan(spec, "reroute", budget=128)
    est = B.spec_memory("llava-1.5-7b", routing, "jetson-orin", "fp16")
    weights, mem, manifest = est["weights"], est["memory"], est["manifest"]
    t = spec.text
    embed = t.vocab_size * t.hidden_size
    decoder = sum(b for r, b in weights.items() if B.role_kind(r) in ("segment", "head"))
    total = sum(weights.values())
    sh = manifest["shapes"]
    kv = sum(len(layers) * 2 * t.num_kv_heads * t.head_dim * m * 2
             for layers, m in zip(routing.segments, sh["cache_tokens"]))
    figures = (f"llava-1.5-7b fp16 reroute budget 128 on jetson-orin: decoder weights {decoder / 1e9:.2f} GB, "
               f"all engines {mem['weights_gib']:.2f} GiB ({total / 1e9:.2f} GB), KV cache {mem['kv_cache_gib']:.2f} "
               f"GiB (buffers {sh['cache_tokens']}), activations {mem['activations_gib']:.2f} GiB, run "
               f"{mem['run_gib']:.2f} GiB, build peak {mem['build_peak_gib']:.2f} GiB (largest engine "
               f"{mem['largest_engine']}), workspace cap {mem['workspace_gib']:.2f} GiB")
    assert (total // 2) + embed == LLAVA_7B_PARAMETERS, figures  # every parameter in one role, embeddings aside
    assert 13.0e9 < decoder < 13.5e9 and total < 14.0e9, figures  # once: not 2 x 13.2 GB
    assert weights[C.route(0)] == 0 and mem["kv_cache_gib"] * B.GIB == kv, figures
    assert mem["run_gib"] == pytest.approx(mem["weights_gib"] + mem["kv_cache_gib"] + mem["activations_gib"]), figures
    assert mem["largest_engine"].startswith("segment") and mem["build_peak_gib"] < 3 * 13.2e9 / B.GIB, figures
    assert mem["fits_device"] and mem["workspace_gib"] == 4.0, figures  # 64 GiB Orin


def test_a_plan_that_does_not_fit_the_device_says_what_would() -> None:
    """llava-1.5-7b: on a 16 GiB Orin NX fp32 (the export's default) does not fit and the
    warning points at fp16, which fits; on an 8 GiB Orin Nano fp16 does not fit either (no
    hint: its TensorRT 10.3 takes no opset-21 int4 QDQ, see lint)."""
    from reroute_export.plan import make_plan
    from reroute_export.registry import resolve_spec

    routing = make_plan(resolve_spec("llava-1.5-7b"), "reroute", budget=128)

    def warnings(device: str, precision: str) -> list[str]:
        return B.plan_warnings(B.device(device), precision,
                               B.spec_memory("llava-1.5-7b", routing, device, precision)["memory"])

    fp32, nano = warnings("jetson-orin-nx", "fp32"), warnings("jetson-orin-nano", "fp16")
    assert len(fp32) == 1 and "exceeds jetson-orin-nx's 16 GiB; --precision fp16 halves the weights" in fp32[0], fp32
    assert warnings("jetson-orin-nx", "fp16") == []
    assert len(nano) == 1 and nano[0].endswith("exceeds jetson-orin-nano's 8 GiB"), nano


# ---------------------------------------------------------------- CPU: the runner's plumbing


class _DataType:
    def __init__(self, name: str, np_type: type) -> None:
        self.name, self.np = name, np_type


_ORT_TYPES = {"tensor(float)": _DataType("FLOAT", np.float32), "tensor(float16)": _DataType("HALF", np.float16),
              "tensor(int64)": _DataType("INT64", np.int64), "tensor(int32)": _DataType("INT32", np.int32),
              "tensor(bool)": _DataType("BOOL", np.bool_)}


class OrtBackedTensorRT:
    """A stand-in for the `tensorrt` module whose "engines" are ONNX Runtime sessions on the
    artifact's own graphs, with the build plan's optimization profiles, driven through the same
    name/shape/address/profile calls TrtGraph makes (host memory: CPU torch tensors). A shape
    outside the active profile is refused as TensorRT refuses it. It tests the runner's
    plumbing, never TensorRT."""

    __version__ = "ort-stand-in"
    calls: list[tuple[str, int]] = []  # (engine, active profile) per execution

    class TensorIOMode:
        INPUT, OUTPUT = "input", "output"

    @staticmethod
    def nptype(dtype: _DataType) -> type:
        return dtype.np

    class Runtime:
        def __init__(self, folder: Path) -> None:
            self.folder = folder

        def deserialize_cuda_engine(self, data: bytes) -> "OrtBackedTensorRT.Engine":
            spec = json.loads(data.decode())  # {"onnx": file, "profiles": the plan's profiles}
            return OrtBackedTensorRT.Engine(self.folder / spec["onnx"], spec["profiles"], spec["engine"])

    class Engine:
        def __init__(self, path: Path, profiles: list[dict], name: str) -> None:
            import onnxruntime as ort

            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            self.io = {i.name: ("input", _ORT_TYPES[i.type]) for i in self.session.get_inputs()}
            self.io |= {o.name: ("output", _ORT_TYPES[o.type]) for o in self.session.get_outputs()}
            self.names = list(self.io)
            self.num_io_tensors = len(self.names)
            self.profiles, self.name = profiles, name
            self.num_optimization_profiles = max(1, len(profiles))
            self.static = {i.name: tuple(i.shape) for i in self.session.get_inputs()
                           if all(isinstance(d, int) for d in i.shape)}

        def get_tensor_name(self, i: int) -> str:
            return self.names[i]

        def get_tensor_mode(self, name: str) -> str:
            return self.io[name][0]

        def get_tensor_dtype(self, name: str) -> _DataType:
            return self.io[name][1]

        def is_shape_inference_io(self, name: str) -> bool:
            return False

        def get_tensor_profile_shape(self, name: str, index: int) -> list[tuple[int, ...]]:
            s = self.profiles[index]["shapes"].get(name)
            return [self.static[name]] * 3 if s is None else [tuple(s["min"]), tuple(s["opt"]), tuple(s["max"])]

        def create_execution_context(self) -> "OrtBackedTensorRT.Context":
            return OrtBackedTensorRT.Context(self)

    class Context:
        def __init__(self, engine: "OrtBackedTensorRT.Engine") -> None:
            self.engine, self.shapes, self.addresses, self.results = engine, {}, {}, None
            self.profile = 0

        def set_optimization_profile_async(self, index: int, stream_handle: int) -> bool:
            if not 0 <= index < self.engine.num_optimization_profiles:
                return False
            self.profile, self.shapes, self.results = index, {}, None  # a switch drops the shapes set
            return True

        def set_input_shape(self, name: str, shape: tuple) -> bool:
            if self.engine.profiles:
                lo, _, hi = self.engine.get_tensor_profile_shape(name, self.profile)
                if len(shape) != len(lo) or not all(a <= d <= b for d, a, b in zip(shape, lo, hi)):
                    return False
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
            OrtBackedTensorRT.calls.append((self.engine.name, self.profile))
            self.results = None
            return True


class _HostStream:
    cuda_stream = 0

    def synchronize(self) -> None:
        pass


@pytest.mark.parametrize("device_kv", [False, True])
def test_trt_runner_plumbing_matches_ort(cli_trt, tmp_path, device_kv) -> None:
    """One stand-in engine per role through TrtArtifact's graphs: the same trace as ONNX Runtime,
    segments and heads run in their prefill profile during prefill and their decode profile
    (T = 1, P = M_s) in every decode step; with device_kv the fixed KV buffers are torch tensors
    written in place."""
    import torch

    from reroute_export.families import get_family
    from reroute_export.preprocess import Preprocessor
    from reroute_export.runtime import OrtArtifact
    from reroute_export.runtime.trt import KV_PREFIX, DeviceArrays, TrtArtifact, TrtGraph

    folder = cli_trt[1]
    manifest = read_manifest(folder)
    plan = json.loads((folder / B.PLAN_FILE).read_text())
    fake = OrtBackedTensorRT
    runtime = fake.Runtime(folder)
    graphs = {}
    for role, e in plan["engines"].items():
        engine = tmp_path / e["engine"]  # an "engine" naming the graph and profiles the stand-in runs
        engine.write_text(json.dumps({"onnx": e["onnx"], "profiles": e["profiles"], "engine": role}))
        kv = (KV_PREFIX,) if device_kv and role.startswith("segment") else ()
        graphs[role] = TrtGraph(engine, runtime, fake, torch, _HostStream(), kv, device=torch.device("cpu"))
    assert [len(g.profiles) for r, g in graphs.items() if B.role_kind(r) == "segment"] == \
        [2] * len(manifest["decoder"]["segments"])
    arrays = DeviceArrays(torch, torch.device("cpu")) if device_kv else None
    art = TrtArtifact(folder, manifest, graphs, np.load(folder / C.EMBEDDINGS, mmap_mode="r"),
                      Preprocessor.from_pretrained(folder / C.PREPROCESSOR, get_family(manifest["family"])), arrays)
    inputs = sample_inputs("llava")
    fake.calls.clear()
    got = art.trace(inputs, 6)
    ref = OrtArtifact.load(folder, verify=False).trace(inputs, 6)
    assert got.decisions == ref.decisions and got.generated_ids == ref.generated_ids
    np.testing.assert_array_equal(np.asarray(got.last_logits), np.asarray(ref.last_logits))
    stages = len(manifest["decoder"]["segments"])
    calls = [c for c in fake.calls if c[0] != "vision"]
    prefill_calls = 3 * stages - 2  # segment.0, then head, route, segment per decision
    assert [p for r, p in calls[:prefill_calls] if B.role_kind(r) in ("segment", "head")] == [1] * (2 * stages - 1)
    decode = calls[prefill_calls:]
    steps = len(got.generated_ids) - 1  # the last token is not decoded further
    assert steps and {p for _, p in decode} == {0} and len(decode) == steps * (2 * stages - 1)
    cache = art.prefill(inputs)["kv"]
    assert isinstance(cache.keys[0], torch.Tensor) if device_kv else isinstance(cache.keys[0], np.ndarray)
    assert tuple(cache.keys[0].shape)[2] == manifest["decoder"]["cache_tokens"][0]


def test_runner_refuses_shapes_outside_every_profile(cli_trt, tmp_path) -> None:
    import torch

    from reroute_export.runtime.trt import TrtGraph

    folder = cli_trt[1]
    plan = json.loads((folder / B.PLAN_FILE).read_text())
    e = plan["engines"][C.segment(0)]
    engine = tmp_path / e["engine"]
    engine.write_text(json.dumps({"onnx": e["onnx"], "profiles": e["profiles"], "engine": C.segment(0)}))
    graph = TrtGraph(engine, OrtBackedTensorRT.Runtime(folder), OrtBackedTensorRT, torch, _HostStream(),
                     device=torch.device("cpu"))
    decode = {n: tuple(s["min"]) for n, s in e["profiles"][0]["shapes"].items()} | {C.PAST_LENGTH: (1,)}
    prefill = {n: tuple(s["max"]) for n, s in e["profiles"][1]["shapes"].items()} | {C.PAST_LENGTH: (1,)}
    assert graph.select_profile(decode) == 0 and graph.select_profile(prefill) == 1
    two_rows = {**decode, C.HIDDEN: (1, 2, decode[C.HIDDEN][2])}  # two rows against the full buffer: neither
    with pytest.raises(RuntimeError, match="fit none of the engine's 2 optimization profiles"):
        graph.select_profile(two_rows)


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
    assert set(res["engines"]) == set(manifest["graphs"])
    for e in res["engines"].values():
        assert (folder / e["engine"]).stat().st_size == e["bytes"] > 0 and e["build_s"] >= 0
    inputs = sample_inputs("llava")
    for device_kv in (False, True):
        art = TrtArtifact.load(folder, verify=False, device_kv=device_kv)  # engines found through build_plan.json
        assert [g.engine.num_optimization_profiles for r, g in art.graphs.items() if r.startswith("segment")] == \
            [2] * len(manifest["decoder"]["segments"])
        got = art.trace(inputs, 8)
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
    assert rec["built"] and set(rec["engines"]) == set(manifest["graphs"])
    for e in rec["engines"].values():
        assert manifest["files"][e["engine"]]["sha256"] == sha256_file(out / e["engine"])
    result = TrtArtifact.load(out).trace(sample_inputs("llava"), 4)
    assert len(result.generated_ids) == 4
