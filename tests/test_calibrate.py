"""`calibrate`: the shipped calibration set, recipes, and INT8 QDQ artifacts of both tiny
families (real exported fp32 artifacts, calibrated with routing active, run by ONNX Runtime)."""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import tiny_artifact
from reroute_export.quantize import calibration_set, fp8, recipes, run as quantize_run
from reroute_export.quantize import cli as quantize_cli
from reroute_export.errors import UserError
from reroute_export import contract as C
from reroute_export.export.artifact import read_manifest
from reroute_export.preprocess import load_image, samples
from reroute_export.runtime import OrtArtifact

ROOT = Path(__file__).resolve().parent.parent
CALIBRATION = ROOT / "calibration"
LICENCES = {"public-domain", "CC0-1.0", "no-known-copyright-restrictions"}


# ---------------------------------------------------------------- the shipped set and recipes


def test_calibration_manifest_files_hashes_and_licences() -> None:
    raw = json.loads((CALIBRATION / "manifest.json").read_text(encoding="utf-8"))
    entries = raw["samples"]
    assert 6 <= len(entries) <= 8
    shipped = {p.name for p in (ROOT / "reroute_export/data/samples").glob("*.jpg")}
    total = 0
    for e in entries:
        path = CALIBRATION / e["file"]
        assert path.is_file(), e["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == e["sha256"], e["file"]
        assert e["licence"] in LICENCES and e["licence_note"].strip(), e["file"]
        assert e["source"].startswith("scikit-image") and e["prompt"].strip()
        assert path.name not in shipped  # no duplicate of the parity samples
        assert load_image(path).mode == "RGB"
        total += path.stat().st_size
    assert total < 1.5 * 2**20
    # every image in the folder is listed (nothing unlicensed ships)
    assert {p.name for p in (CALIBRATION / "images").iterdir()} == {Path(e["file"]).name for e in entries}
    assert [s.image.name for s in calibration_set.load_calibration_set()] == [Path(e["file"]).name for e in entries]


def test_calibration_set_checksum_mismatch_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "set"
    shutil.copytree(CALIBRATION, bad)
    first = json.loads((bad / "manifest.json").read_text())["samples"][0]["file"]
    (bad / first).write_bytes((bad / first).read_bytes() + b"\0")
    with pytest.raises(UserError, match="checksum mismatch"):
        calibration_set.load_calibration_set(bad)


@pytest.mark.parametrize("precision", recipes.PRECISIONS)
def test_default_recipes_load(precision: str) -> None:
    r = recipes.load_recipe(None, precision)
    assert r.name == f"{precision}-default" and r.precision == precision
    assert r.samples <= len(calibration_set.load_calibration_set()) and r.decode_steps >= 1
    assert set(r.graphs) == set(recipes.ROLES) and r.q("op_types") == ["MatMul", "Gemm"]


def test_recipe_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        recipes.load_recipe("no-such-recipe", "int8")
    with pytest.raises(UserError, match="is for fp8"):
        recipes.load_recipe("fp8-default", "int8")
    bad = tmp_path / "r.json"
    bad.write_text(json.dumps({"precision": "int8", "quantizer": {"calibration_method": "entropy"}}))
    with pytest.raises(UserError, match="calibration_method"):
        recipes.load_recipe(str(bad), "int8")
    bad.write_text(json.dumps({"precision": "int8", "quantizer": {"bogus": 1}}))
    with pytest.raises(UserError, match="unknown quantizer"):
        recipes.load_recipe(str(bad), "int8")


# ---------------------------------------------------------------- int8 on both tiny families


@functools.lru_cache(maxsize=None)
def _calibrated(family: str, root: str) -> Path:
    out = Path(root) / f"{family}-int8"
    quantize_run.calibrate(tiny_artifact(family), out, "int8", quiet=True)
    return out


@pytest.fixture(scope="module")
def qroot(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("calibrated"))


def test_int8_qdq_artifact(family: str, qroot: str) -> None:
    src = tiny_artifact(family)
    before = read_manifest(src)  # the fp32 artifact is read-only: unchanged afterwards
    out = _calibrated(family, qroot)
    m = read_manifest(out)  # every file hashed and present
    assert m["precision"] == "int8" and m["family"] == family and m["plan"] == before["plan"]
    for name in (C.VISION, C.PREFILL, C.DECODE):
        model = onnx.load(out / name)
        onnx.checker.check_model(model, full_check=True)
        ops = {n.op_type for n in model.graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops, name
        assert model.ir_version == C.IR_VERSION
        # only MatMul/Gemm inputs are quantized: every DQ output feeds one of them
        dq_out = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
        users = {n.op_type for n in model.graph.node if dq_out & set(n.input)}
        assert users <= {"MatMul", "Gemm"}, (name, users)
    prefill = onnx.load(out / C.PREFILL)
    # routing stays float and intact: the reroute ops and their local functions are there
    routing = [n for n in prefill.graph.node if n.domain == "reroute"]
    assert {n.op_type for n in routing} == {"SelectVisual", "RouteGather", "RouteScatter"}
    assert {f.name for f in prefill.functions} == {"SelectVisual", "RouteGather", "RouteScatter"}
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for f in prefill.functions for n in f.node)
    # non-graph files are the fp32 artifact's
    assert (out / C.EMBEDDINGS).read_bytes() == (src / C.EMBEDDINGS).read_bytes()
    assert (out / C.PREPROCESSOR).is_dir()
    assert read_manifest(src) == before


def test_int8_manifest_records_quantization_and_parity(family: str, qroot: str) -> None:
    m = read_manifest(_calibrated(family, qroot))
    q = m["quantization"]
    assert q["library"] == "onnxruntime" and q["version"] and q["format"] == "QDQ"
    assert q["recipe"]["name"] == "int8-default"
    assert len(q["calibration"]["samples"]) == q["recipe"]["samples"]
    assert all(s["licence"] in LICENCES for s in q["calibration"]["samples"])
    assert q["calibration"]["routing_active"] is True
    feeds = q["calibration"]["feeds"]
    assert feeds["prefill"] == q["recipe"]["samples"] and feeds["decode"] > feeds["prefill"]
    pre = q["graphs"]["prefill"]
    assert pre["quantized_nodes"] > 0 and pre["QuantizeLinear"] > 0
    reasons = {e["reason"] for e in pre["excluded_nodes"]}
    assert "activation x activation (attention or routing scores)" in reasons and "LM head (logits)" in reasons
    assert any("lm_head" == e["module"] for e in pre["excluded_nodes"])
    assert any("SelectVisual" in r for r in pre["kept_float_routing"])

    p = m["calibration_parity"]
    assert p["measured"] is True and p["providers"] == ["CPUExecutionProvider"]
    plan = m["plan"]["stages"]
    assert [s["layer"] for s in p["stages"]] == [s["layer"] for s in plan]
    for s in p["stages"]:
        assert 0.0 <= s["overlap_min"] <= s["overlap_mean"] <= 1.0 and 0.0 <= s["exact"] <= 1.0
    assert len(p["inputs"]) == len(samples())
    # int8 of a tiny random model: close, not exact (near-tied routing scores can swap)
    assert p["logits_cosine_min"] > 0.95 and p["vision_cosine_min"] > 0.99
    assert np.mean([s["overlap_mean"] for s in p["stages"]]) > 0.75
    assert 0.0 <= p["token_agreement_mean"] <= 1.0 and isinstance(p["passed"], bool)


def test_int8_artifact_runs_in_onnxruntime(family: str, qroot: str) -> None:
    out = _calibrated(family, qroot)
    art = OrtArtifact.load(out, ["CPUExecutionProvider"])
    path, prompt = samples()[0]
    got = art.trace(art.prepare(load_image(path), prompt), 4)
    assert len(got.generated_ids) == 4 and np.isfinite(got.last_logits).all()
    for stage in art.plan.stages:
        kept = got.decisions[str(stage.layer)]
        assert len(kept) == stage.keep and kept == sorted(kept)


# ---------------------------------------------------------------- refusals and the CLI


def test_calibrate_refusals(tmp_path: Path) -> None:
    src = tiny_artifact("llava")
    with pytest.raises(UserError, match="artifact folder not found"):
        quantize_run.calibrate(tmp_path / "missing", tmp_path / "out", "int8", quiet=True)
    with pytest.raises(UserError, match="outside the fp32 artifact"):
        quantize_run.calibrate(src, src / "q", "int8", quiet=True)
    with pytest.raises(UserError, match="unknown precision"):
        quantize_run.calibrate(src, tmp_path / "out", "int4", quiet=True)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep")
    with pytest.raises(UserError, match="exists"):
        quantize_run.calibrate(src, tmp_path / "taken", "int8", quiet=True)
    assert (tmp_path / "taken" / "x").read_text() == "keep"


def test_cli_registration_and_json(tmp_path: Path, capsys) -> None:
    parser = argparse.ArgumentParser(prog="reroute-export")
    quantize_cli.register_cli(parser.add_subparsers(dest="command"))
    recipe = tmp_path / "quick.json"
    base = json.loads((CALIBRATION / "recipes/int8-default.json").read_text())
    recipe.write_text(json.dumps({**base, "name": "quick", "samples": 2, "decode_steps": 1, "parity": {"tokens": 2}}))
    out = tmp_path / "q"
    args = parser.parse_args(["calibrate", "--artifact", str(tiny_artifact("qwen2.5-vl")), "--precision", "int8",
                              "--output", str(out), "--recipe", str(recipe), "--json", "-"])
    assert args.func is quantize_cli.cmd_calibrate
    code = args.func(args)
    printed = json.loads(capsys.readouterr().out)
    assert printed["quantization"]["recipe"]["name"] == "quick"
    assert code == (0 if printed["calibration_parity"]["passed"] else 1)
    assert read_manifest(out)["quantization"]["calibration"]["feeds"]["prefill"] == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["calibrate", "--artifact", "a", "--precision", "int4", "--output", "b"])


def test_fp8_int8_to_float8_rewrite() -> None:
    """The fp8 rewrite on a one-MatMul graph: FLOAT8 weights at amax/448 per channel, opset 19."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 4)).astype(np.float32)
    src = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(w, "w")]), opset_imports=[helper.make_opsetid("", 18)])
    s_x = np.float32(3.0 / 127)
    w_scale = np.abs(w).max(axis=0) / 127
    q = helper.make_model(helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero_point"], ["xq"]),
         helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero_point"], ["xd"]),
         helper.make_node("DequantizeLinear", ["w_quantized", "w_scale", "w_zero_point"], ["wd"], axis=1),
         helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(np.array(s_x), "x_scale"),
         numpy_helper.from_array(np.array(0, np.int8), "x_zero_point"),
         numpy_helper.from_array(np.round(w / w_scale).astype(np.int8), "w_quantized"),
         numpy_helper.from_array(w_scale.astype(np.float32), "w_scale"),
         numpy_helper.from_array(np.zeros(4, np.int8), "w_zero_point")]), opset_imports=[helper.make_opsetid("", 18)])
    out = fp8.int8_qdq_to_fp8(q, src)
    onnx.checker.check_model(out, full_check=True)
    assert out.opset_import[0].version == fp8.FP8_OPSET and out.ir_version == fp8.FP8_IR
    inits = {t.name: t for t in out.graph.initializer}
    assert inits["w_quantized"].data_type == TensorProto.FLOAT8E4M3FN
    assert inits["x_zero_point"].data_type == TensorProto.FLOAT8E4M3FN
    np.testing.assert_allclose(numpy_helper.to_array(inits["x_scale"]), 3.0 / 448, rtol=1e-6)
    np.testing.assert_allclose(numpy_helper.to_array(inits["w_scale"]), np.abs(w).max(axis=0) / 448, rtol=1e-6)
    import onnxruntime as ort

    x = rng.normal(size=(2, 8)).astype(np.float32)
    try:
        sess = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"this onnxruntime build cannot run FP8 Q/DQ on CPU: {e}")
    y = sess.run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ w, rtol=0.1, atol=0.1)  # FP8 has 3 mantissa bits
