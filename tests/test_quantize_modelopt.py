"""`quantize --method modelopt-awq`: NVIDIA ModelOpt's INT4 awq_lite on the tiny LLaVA artifact.

ModelOpt installs beside the package through the `modelopt` extra (the test extra pulls it in,
so CI runs these); where it is absent they skip with the install line. What is checked: the
prefix cut that makes ModelOpt's feeds one length is exact (a causal prefill's prefix gives the
full prefill's first rows), ModelOpt quantizes exactly the planned Linears (head.j's q/k at our
INT8, the LM head float), the artifact passes the checker and TensorRT 11 lint, runs in ONNX
Runtime with routing near fp32, and the wrong flags are one line with exit 2."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from conftest import tiny_artifact
from reroute_export import contract as C
from reroute_export.check.lint import lint
from reroute_export.cli import main
from reroute_export.quantize import awq, modelopt_int4
from reroute_export.quantize.select import name_nodes
from reroute_export.quantize.weights import _plans, _quantize, _record
from reroute_export.runtime import OrtArtifact

BLOCK = 32
needs_modelopt = pytest.mark.skipif(modelopt_int4.modelopt_version() is None,
                                    reason=f"NVIDIA ModelOpt is not installed ({modelopt_int4.INSTALL})")


@pytest.fixture(scope="module")
def fp32() -> Path:
    return tiny_artifact("llava")


@functools.lru_cache(maxsize=None)
def _modelopt(src: Path) -> Path:
    out = src.parent / f"{src.name}-int4-modelopt-awq"
    _quantize(src, out, "int4", "modelopt-awq", BLOCK, None, False, True, None)
    return out


def _feeds(fp32: Path, role: str, tmp: Path) -> list[dict[str, np.ndarray]]:
    plans = _plans(fp32, OrtArtifact.load(fp32, verify=False).manifest["graphs"], "int8")
    _, store = _record(fp32, {role: plans[role]}, awq.load_awq_recipe(), None, tmp)
    return list(store.feeds(role))


def test_a_prefill_cut_to_its_prefix_gives_the_prefills_first_rows(fp32, tmp_path) -> None:
    """ModelOpt needs feeds of one length; the cut (equal_length_feeds) must be real rows."""
    name = "segment_2.onnx"
    model = onnx.load(fp32 / name)
    feeds = _feeds(fp32, "segment.2", tmp_path)
    cut, used = modelopt_int4.equal_length_feeds(model, iter(feeds))
    prefill = [f for f in feeds if f[C.HIDDEN].shape[1] > 1]
    assert used["prefill_feeds"] == len(prefill) == len(cut) >= 2
    assert used["decode_feeds_left_out"] == len(feeds) - len(prefill) > 0
    t = used["tokens_per_feed"]
    assert t == min(f[C.HIDDEN].shape[1] for f in prefill) and len({f[C.HIDDEN].shape[1] for f in prefill}) > 1
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    for full, short in zip(prefill, cut):
        assert all(v.shape[1] == t for k, v in short.items() if k in (C.HIDDEN, "position_ids"))
        want = dict(zip(outputs, session.run(None, full)))
        got = dict(zip(outputs, session.run(None, short)))
        np.testing.assert_allclose(got[C.HIDDEN_OUT], want[C.HIDDEN_OUT][:, :t], rtol=1e-4, atol=1e-5)
        for name_ in outputs:
            if name_.startswith("new."):  # this step's K/V rows: (1, heads, T, head_dim)
                np.testing.assert_allclose(got[name_], want[name_][:, :, :t], rtol=1e-4, atol=1e-5)


def _dq_bits(model: onnx.ModelProto) -> dict[str, int]:
    """MatMul node -> bits of the DequantizeLinear feeding its weight."""
    inits = {t.name: t for t in model.graph.initializer}
    dq = {n.output[0]: inits[n.input[0]].data_type for n in model.graph.node if n.op_type == "DequantizeLinear"}
    bits = {TensorProto.INT4: 4, TensorProto.INT8: 8}
    return {n.name: bits[dq[n.input[1]]] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in dq}


@needs_modelopt
def test_modelopt_quantizes_exactly_the_planned_linears(fp32) -> None:
    out = _modelopt(fp32)
    manifest = OrtArtifact.load(out, verify=True).manifest
    q = manifest["quantization"]
    assert (q["method"], q["encoding"], q["library"]["name"]) == ("modelopt-awq", "qdq", "nvidia-modelopt")
    assert manifest["opset"] == 21 and manifest["versions"]["nvidia-modelopt"] == modelopt_int4.modelopt_version()
    for role, g in q["graphs"].items():
        if "modelopt" not in g:
            continue
        model = onnx.load(out / manifest["graphs"][role], load_external_data=False)
        onnx.checker.check_model(str(out / manifest["graphs"][role]))
        name_nodes(model)
        want = {n["node"]: n.get("bits", 4) for n in g["nodes"]}
        assert _dq_bits(model) == want, role
        assert not g["modelopt"]["left_float"]
        assert g["modelopt"]["pre_quant_scale_muls"] >= 1  # AWQ's 1/s on the activations
        assert g["modelopt"]["calibration"]["rows"] > 0
        if role.startswith("head."):  # routing q/k: our INT8, v_proj ModelOpt's INT4
            assert sorted(want.values()) == [4, 8, 8]
    last = q["graphs"][f"segment.{len(manifest['plan']['stages'])}"]
    assert any("LM head" in k["reason"] for k in last["kept_float"])
    muls = sum(g["modelopt"]["pre_quant_scale_muls"] for g in q["graphs"].values() if "modelopt" in g)
    assert q["awq"]["groups"] == muls > 0 and q["awq"]["by"] == "nvidia-modelopt"
    assert not any(f["severity"] == "error" for f in lint(out, "11")["findings"])


@needs_modelopt
def test_modelopt_artifact_runs_with_routing_near_fp32(fp32) -> None:
    from reroute_export.preprocess import load_image, samples

    out = _modelopt(fp32)
    p = OrtArtifact.load(out, verify=False).manifest["calibration_parity"]
    assert p["measured"] and p["logits_cosine_mean"] > 0.85
    path, prompt = samples()[0]
    ref = OrtArtifact.load(fp32, ["CPUExecutionProvider"])
    x = ref.prepare(load_image(path), prompt)
    want = ref.trace(x, max_new_tokens=2)
    got = OrtArtifact.load(out, ["CPUExecutionProvider"]).trace(x, max_new_tokens=2)
    for layer, sel in want.decisions.items():
        assert len(set(sel) & set(got.decisions[layer])) / len(sel) >= 0.5, layer


def test_modelopt_flags_are_checked_before_any_work(fp32, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    for args in (["--weights", "int8"], ["--weights", "int4", "--encoding", "matmulnbits"]):
        assert main(["quantize", "--artifact", str(fp32), *args, "--method", "modelopt-awq", "--output", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [e for e in err if e.startswith("reroute-export: error: --method modelopt-awq is --weights int4")]
        assert not out.exists()


@needs_modelopt
def test_calibrate_int8_with_modelopt_runs_on_cpu(fp32, tmp_path) -> None:
    """`calibrate --library modelopt`: ModelOpt's INT8 PTQ on the same feeds and exclusions."""
    from reroute_export.quantize.run import calibrate

    m = calibrate(fp32, tmp_path / "int8", precision="int8", library="modelopt", quiet=True)
    assert m["quantization"]["library"] == "modelopt"
    p = m["calibration_parity"]
    assert p["measured"] and p["logits_cosine_min"] > 0.98
    seg = onnx.load(tmp_path / "int8" / "segment_1.onnx", load_external_data=False)
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in seg.graph.node}
