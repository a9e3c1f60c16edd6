"""parity --layers: the first decoder layer where an artifact drifts, per input.

An unperturbed artifact matches the eager reference at every layer (cosine ~1, relative
error ~1e-6); one with one layer's MLP down_proj scaled in its segment's external weights
(manifest checksum updated, so it verifies) is named at exactly that layer, exit 1. The
tiny artifacts are the session's shared exports (conftest.tiny_artifact)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_artifact
from reroute_export.check.layers import layer_outputs, node_layer, run_layer_parity, tap_segment
from reroute_export.plan import RoutingPlan

ROOT = Path(__file__).resolve().parent.parent
PERTURBED_LAYER = 3  # the first of segment 2's two layers: its output is inside the graph, not hidden_out


@pytest.fixture(scope="module")
def one_input(tmp_path_factory) -> Path:
    """A one-input set (the default set has three photos: three times the work)."""
    path = tmp_path_factory.mktemp("inputs") / "inputs.json"
    image = ROOT / "reroute_export" / "data" / "samples" / "astronaut.jpg"
    path.write_text(json.dumps([{"name": "astronaut", "image": str(image), "prompt": "Describe the image."}]))
    return path


def perturb(folder: Path, layer: int, scale: float) -> str:
    """Scale layer `layer`'s MLP down_proj weight in its segment's external data, in place,
    and record the file's new sha256 in the manifest; returns the weight's initializer name."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo

    from reroute_export.export.artifact import sha256_file

    manifest = json.loads((folder / "manifest.json").read_text())
    s = next(s for s, span in enumerate(RoutingPlan.from_dict(manifest["plan"]).segments) if layer in span)
    model = onnx.load(str(folder / manifest["graphs"][f"segment.{s}"]), load_external_data=False)
    weights = {t.name: t for t in model.graph.initializer}
    matmul = next(n for n in model.graph.node if n.op_type == "MatMul" and (node_layer(n) or (None,))[0] == layer
                  and any(f"layers.{layer}.mlp.down_proj" in p.value for p in n.metadata_props))
    weight = weights[next(name for name in matmul.input if name in weights)]
    info = ExternalDataInfo(weight)
    data = folder / info.location
    dtype = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16}[weight.data_type]
    raw = bytearray(data.read_bytes())
    w = np.frombuffer(bytes(raw[info.offset:info.offset + info.length]), dtype=dtype)
    raw[info.offset:info.offset + info.length] = (w * scale).astype(dtype).tobytes()
    data.write_bytes(bytes(raw))
    manifest["files"][data.relative_to(folder).as_posix()]["sha256"] = sha256_file(data)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return weight.name


@pytest.fixture(scope="module")
def perturbed(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("perturbed") / "artifact"
    shutil.copytree(tiny_artifact("llava"), folder)
    perturb(folder, PERTURBED_LAYER, 1.5)
    return folder


def test_equal_models_agree_at_every_layer(one_input) -> None:
    report = run_layer_parity(tiny_artifact("llava"), inputs=str(one_input), steps=2, quiet=True)
    assert report.passed, report.failures
    rows = report.inputs[0]["layers"]
    assert [r["layer"] for r in rows] == list(range(8)) and not report.notes
    for r in rows:
        assert r["rows"] == r["rows_reference"] == r["rows_artifact"]  # the same routing
        for phase in ("prefill", "decode.0", "decode.1"):
            for kind in ("hidden", "key", "value"):
                m = r["phases"][phase][kind]
                assert m["cosine"] > 1 - 1e-9 and m["rel_err"] < 1e-4, (r["layer"], phase, kind, m)


def test_cli_names_the_perturbed_layer(perturbed, one_input, tmp_path, capsys) -> None:
    from reroute_export.cli import main

    out_json, out_md = tmp_path / "layers.json", tmp_path / "layers.md"
    rc = main(["parity", "--artifact", str(perturbed), "--layers", "--layer-steps", "1", "--inputs", str(one_input),
               "--json", str(out_json), "--markdown", str(out_md)])
    printed = capsys.readouterr().out
    assert rc == 1, printed
    assert f"astronaut: first drift at decoder layer {PERTURBED_LAYER} (prefill hidden cosine" in printed
    report = json.loads(out_json.read_text())
    record = report["inputs"][0]
    assert record["first_drift"] == PERTURBED_LAYER and not report["passed"]
    rows = record["layers"]
    assert len(rows) == 8
    assert all(not r["failures"] for r in rows[:PERTURBED_LAYER])  # nothing earlier
    # the scaled down_proj changes layer k's output, not the K/V it computed from its input
    assert rows[PERTURBED_LAYER]["phases"]["prefill"]["key"]["cosine"] > 1 - 1e-9
    assert rows[PERTURBED_LAYER]["phases"]["prefill"]["hidden"]["rel_err"] > 1e-2
    md = out_md.read_text()
    assert md.count("\n| ") == 9 and "FIRST DRIFT" in md  # header + one row per layer


def test_unperturbed_artifact_exits_0(one_input, capsys) -> None:
    from reroute_export.cli import main

    rc = main(["parity", "--artifact", str(tiny_artifact("llava")), "--layers", "2", "--layer-steps", "1",
               "--inputs", str(one_input)])
    assert rc == 0 and "no drift over 2 layers" in capsys.readouterr().out


def test_two_layer_gate_is_fast_and_stops_before_the_drift(perturbed, one_input) -> None:
    start = time.perf_counter()
    report = run_layer_parity(perturbed, inputs=str(one_input), layers=2, steps=1, quiet=True)
    elapsed = time.perf_counter() - start
    print(f"parity --layers 2 (one input, model load and sessions included): {elapsed:.1f} s")
    assert report.passed and [r["layer"] for r in report.inputs[0]["layers"]] == [0, 1]
    assert elapsed < 30


def test_dump_writes_every_layer_of_both_sides(perturbed, one_input, tmp_path) -> None:
    from safetensors.numpy import load_file

    dump = tmp_path / "dump"
    report = run_layer_parity(perturbed, inputs=str(one_input), layers=PERTURBED_LAYER + 1, steps=1, dump=dump,
                              quiet=True)
    assert report.failures == [f"astronaut: {report.inputs[0]['failures'][0]}"]
    index = json.loads((dump / "index.json").read_text())
    assert sorted(p.name for p in dump.iterdir()) == ["astronaut.artifact.safetensors",
                                                    "astronaut.reference.safetensors", "index.json"]
    entry = index["inputs"][0]
    ref, got = (load_file(dump / entry[side]["file"]) for side in ("reference", "artifact"))
    rows = {r["layer"]: r for r in report.inputs[0]["layers"]}
    for i in range(PERTURBED_LAYER + 1):
        t = rows[i]["rows_reference"]
        for side in (ref, got):
            assert side[f"prefill.layers.{i}.hidden"].shape == (t, 64)  # (T, D)
            assert side[f"prefill.layers.{i}.key"].shape == side[f"prefill.layers.{i}.value"].shape == (2, t, 16)
            assert side[f"decode.0.layers.{i}.hidden"].shape == (1, 64)
            assert side[f"decode.0.layers.{i}.key"].shape == (2, 1, 16)  # (nkv, 1, hd)
            assert side[f"prefill.layers.{i}.positions"].shape == (t,)
        assert list(entry["artifact"]["tensors"][f"prefill.layers.{i}.hidden"]["shape"]) == [t, 64]
    k = PERTURBED_LAYER
    np.testing.assert_allclose(got[f"prefill.layers.{k - 1}.hidden"], ref[f"prefill.layers.{k - 1}.hidden"], atol=1e-4)
    assert not np.allclose(got[f"prefill.layers.{k}.hidden"], ref[f"prefill.layers.{k}.hidden"], atol=1e-2)
    run_layer_parity(perturbed, inputs=str(one_input), layers=1, steps=0, dump=dump, quiet=True)  # replaces it
    assert "prefill.layers.1.hidden" not in load_file(dump / "astronaut.artifact.safetensors")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dump")]  # no temporaries left


@pytest.mark.parametrize("family, precision", [("llava", "fp32"), ("qwen2.5-vl", "fp32"), ("llava", "fp16")])
def test_every_layer_output_is_located(family, precision) -> None:
    """Every segment's every layer has a located output, and a non-last segment's last layer
    is its hidden_out (tap_segment checks that itself and says why when it cannot)."""
    import onnx

    folder = tiny_artifact(family, precision=precision)
    manifest = json.loads((folder / "manifest.json").read_text())
    segments = RoutingPlan.from_dict(manifest["plan"]).segments
    for s, layers in enumerate(segments):
        path = folder / manifest["graphs"][f"segment.{s}"]
        found = layer_outputs(onnx.load(str(path), load_external_data=False).graph, layers)
        assert sorted(found) == list(layers) and len(set(found.values())) == len(layers)
        _, names, note = tap_segment(path, layers, s == len(segments) - 1)
        assert note is None and names == found


def test_qwen_agrees_at_every_layer(one_input) -> None:
    report = run_layer_parity(tiny_artifact("qwen2.5-vl"), inputs=str(one_input), steps=1, quiet=True)
    assert report.passed and len(report.inputs[0]["layers"]) == 8, report.failures


def test_without_metadata_hidden_states_fall_back_to_segment_ends(one_input, tmp_path) -> None:
    """A segment whose nodes lost their metadata (a graph rewritten by another tool): its
    inner layers' hidden states cannot be located, so only its hidden_out is compared (and
    the report says why); every layer's K/V still is."""
    import onnx

    from reroute_export.export.artifact import sha256_file

    folder = tmp_path / "artifact"
    shutil.copytree(tiny_artifact("llava"), folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    name = manifest["graphs"]["segment.2"]  # layers 3, 4
    model = onnx.load(str(folder / name), load_external_data=False)
    for node in model.graph.node:
        del node.metadata_props[:]
    onnx.save(model, str(folder / name))
    manifest["files"][name] = {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    report = run_layer_parity(folder, inputs=str(one_input), layers=5, steps=1, quiet=True)
    assert report.passed, report.failures
    assert len(report.notes) == 1 and "segment's end only" in report.notes[0] and name in report.notes[0]
    rows = {r["layer"]: r for r in report.inputs[0]["layers"]}
    assert "hidden" not in rows[3]["phases"]["prefill"] and "key" in rows[3]["phases"]["prefill"]
    assert rows[4]["phases"]["prefill"]["hidden"]["cosine"] > 1 - 1e-9


def test_could_not_run_exits_2(one_input, capsys) -> None:
    from reroute_export.cli import main

    art = str(tiny_artifact("llava"))
    assert main(["parity", "--artifact", art, "--layers", "99", "--inputs", str(one_input)]) == 2
    assert main(["parity", "--artifact", art, "--layers", "--tol", "hidden_cosine=1"]) == 2
    assert "--layers takes 1..8" in capsys.readouterr().err
