"""`quantize`: weight-only INT4/INT8 on the tiny LLaVA artifact (seeded random weights).

One fp32 artifact (conftest, shared by the session) and a few quantized ones per module:
the two encodings hold the very same codes and scales, round-to-nearest stays within half
a step per block, the artifacts run in ONNX Runtime with routing close to fp32, lint knows
which TensorRT takes which, AWQ's folding is exact in fp32 and beats RTN on the recorded
activations, and bad inputs are one line with exit 2."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from conftest import tiny_artifact
from reroute_export.check.lint import lint
from reroute_export.cli import main
from reroute_export.errors import UserError
from reroute_export.quantize import awq
from reroute_export.quantize.encodings import (dequantize_blocks, nbits_codes, qdq_codes, qmax, quantize_blocks)
from reroute_export.quantize.select import name_nodes
from reroute_export.quantize.weights import _quantize, plan_graph, quantize_weights, read_array
from reroute_export.runtime import OrtArtifact

BLOCK = 32


@pytest.fixture(scope="module")
def fp32() -> Path:
    return tiny_artifact("llava")


@functools.lru_cache(maxsize=None)
def _quantized(src: Path, encoding: str, weights: str = "int4", method: str = "rtn") -> Path:
    out = src.parent / f"{src.name}-{weights}-{method}-{encoding}"
    _quantize(src, out, weights, method, BLOCK, encoding, False, True, None, parity=False)
    return out


def _weight(folder: Path, graph: str, name: str) -> np.ndarray:
    model = onnx.load(folder / graph, load_external_data=False)
    return np.asarray(read_array(folder, next(t for t in model.graph.initializer if t.name == name)))


def _first_linear(fp32: Path, graph: str = "segment_1.onnx"):
    model = onnx.load(fp32 / graph, load_external_data=False)
    name_nodes(model)
    linears, _ = plan_graph(model, "segment.1")
    return linears[0]


# ---------------------------------------------------------------- the recipe and its two encodings


def test_rtn_error_is_at_most_half_a_step_per_block() -> None:
    w = np.random.default_rng(0).standard_normal((100, 24)).astype(np.float32)  # K not a multiple of the block
    for bits in (4, 8):
        codes, scales = quantize_blocks(w, bits, BLOCK)
        assert scales.shape == (4, 24) and np.abs(codes).max() <= qmax(bits)
        err = np.abs(w - dequantize_blocks(codes, scales, BLOCK))
        step = np.repeat(scales, BLOCK, axis=0)[:100]
        assert (err <= step / 2 + 1e-6).all(), f"max err/step {float((err / step).max()):.3f}"


def test_encodings_hold_the_same_codes_and_scales(fp32) -> None:
    lin = _first_linear(fp32)
    nb, dq = _quantized(fp32, "matmulnbits"), _quantized(fp32, "qdq")
    k, n, kb = lin.k, lin.n, -(-lin.k // BLOCK)
    b = _weight(nb, "segment_1.onnx", f"{lin.weight}/codes")  # (N, kb, B/2)
    s_nb = _weight(nb, "segment_1.onnx", f"{lin.weight}/scales")  # (N, kb)
    raw = (dq / "segment_1.onnx.data").read_bytes()
    model = onnx.load(dq / "segment_1.onnx", load_external_data=False)
    t = next(t for t in model.graph.initializer if t.name == f"{lin.weight}/codes")
    assert t.data_type == TensorProto.INT4 and list(t.dims) == [k, n]
    e = {x.key: int(x.value) for x in t.external_data if x.key != "location"}
    codes_dq = qdq_codes(raw[e["offset"]:e["offset"] + e["length"]], k, n, 4)
    s_dq = _weight(dq, "segment_1.onnx", f"{lin.weight}/scales")  # (kb, N)
    assert s_dq.shape == (kb, n) and np.array_equal(s_nb.T, s_dq)
    codes_nb = nbits_codes(b, k, 4)
    assert np.array_equal(codes_nb, codes_dq)
    np.testing.assert_array_equal(dequantize_blocks(codes_nb, s_nb.T, BLOCK), dequantize_blocks(codes_dq, s_dq, BLOCK))
    w = _weight(fp32, "segment_1.onnx", lin.weight)
    codes, scales = quantize_blocks(w, 4, BLOCK)  # the recipe on the source weight: the same codes
    assert np.array_equal(codes, codes_dq) and np.array_equal(scales, s_dq)


def test_manifest_records_what_stayed_float(fp32) -> None:
    m = OrtArtifact.load(_quantized(fp32, "qdq")).manifest
    q = m["quantization"]
    assert m["precision"] == "int4-weight" and m["opset"] == 21 and m["ir_version"] == 10 and q["encoding"] == "qdq"
    reasons = {k["reason"] for g in q["graphs"].values() for k in g.get("kept_float", [])}
    assert any("LM head" in r for r in reasons) and not any("routing scores" in r for r in reasons)
    assert not q["graphs"]["vision"]["quantized"] and q["graphs"]["route.0"]["copied"] == "byte for byte"
    head = {n["module"]: n.get("bits") for n in q["graphs"]["head.0"]["nodes"]}
    # q/k feed routing: 8 bits by default (routing_projections "int8"), v_proj the recipe's 4
    assert head == {"layers.1.self_attn.q_proj": 8, "layers.1.self_attn.k_proj": 8, "layers.1.self_attn.v_proj": None}
    assert q["routing_projections"] == "int8" and q["routing_projection_bits"] == 8
    assert q["weight_bytes"]["after"] < q["weight_bytes"]["before"]


# ---------------------------------------------------------------- running it


def test_int8_artifact_runs_close_to_fp32(fp32, tmp_path) -> None:
    m = quantize_weights(fp32, tmp_path / "int8", weights="int8", block=BLOCK, quiet=True)
    p = m["calibration_parity"]
    assert p["measured"] and p["passed"], p["failures"]
    assert p["decision_overlap_min"] >= 0.7 and p["logits_cosine_min"] > 0.99


def test_int4_graphs_run_in_ort_with_routing_near_fp32(fp32) -> None:
    from reroute_export.preprocess import load_image, samples

    path, prompt = samples()[0]
    ref = OrtArtifact.load(fp32, ["CPUExecutionProvider"])
    x = ref.prepare(load_image(path), prompt)
    want = ref.trace(x, max_new_tokens=2)
    for encoding in ("matmulnbits", "qdq"):
        got = OrtArtifact.load(_quantized(fp32, encoding), ["CPUExecutionProvider"]).trace(x, max_new_tokens=2)
        for layer, sel in want.decisions.items():
            overlap = len(set(sel) & set(got.decisions[layer])) / len(sel)
            assert overlap >= 0.5, f"{encoding} layer {layer}: overlap {overlap:.2f}"
        a, b = np.asarray(want.last_logits).ravel(), np.asarray(got.last_logits).ravel()
        assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.8


def _errors(folder: Path, trt: str) -> set[tuple[str, str, str]]:
    return {(f["graph"], f["op"], f["message"]) for f in lint(folder, trt)["findings"] if f["severity"] == "error"}


def test_lint_knows_which_tensorrt_takes_which(fp32) -> None:
    """Judged against the source's own findings (an export option may add its own, e.g. ORT attention)."""
    nb, dq = _quantized(fp32, "matmulnbits"), _quantized(fp32, "qdq")
    assert not _errors(dq, "11") - _errors(fp32, "11")
    new = _errors(nb, "11") - _errors(fp32, "11")
    assert new and all(op == "com.microsoft.MatMulNBits" and "--encoding qdq" in m for _, op, m in new)
    new = {m for _, _, m in _errors(dq, "10.3") - _errors(fp32, "10.3")}
    assert any("opset 21 > 18" in m for m in new) and any("JetPack" in m for m in new)


# ---------------------------------------------------------------- AWQ


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("graph, x_name", [("head_0.onnx", "norm"), ("segment_1.onnx", "o_proj")])
def test_awq_folding_is_exact_in_fp32(fp32, graph, x_name) -> None:
    """diag(s) folded into the weights and 1/s into the norm weight (or a Mul), unquantized: same outputs."""
    model = onnx.load(fp32 / graph)  # with its (tiny) weights
    name_nodes(model)
    linears, _ = plan_graph(model, "head.0" if graph.startswith("head") else "segment.1", routing_projections="quantize")
    x = linears[0].input  # q/k/v's input (the norm output) / o_proj's input (attention output)
    group = [lin for lin in linears if lin.input == x]
    s = np.random.default_rng(1).uniform(0.25, 4.0, group[0].k).astype(np.float32)
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    how, replaced = awq.fold(folded.graph, x, [lin.node for lin in group], s, TensorProto.FLOAT,
                             onnx.numpy_helper.to_array)
    assert how.startswith("norm weight") if x_name == "norm" else how == "Mul"
    for t in folded.graph.initializer:
        value = replaced.get(t.name)
        if any(lin.weight == t.name for lin in group):
            value = onnx.numpy_helper.to_array(t) * s[:, None]
        if value is not None:
            t.CopyFrom(onnx.numpy_helper.from_array(value.astype(np.float32), t.name))
    rng = np.random.default_rng(2)
    feeds = {}
    for i in model.graph.input:
        dims = [d.dim_value or 3 for d in i.type.tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
        feeds[i.name] = (rng.standard_normal(dims) if dtype == np.float32 else np.zeros(dims)).astype(dtype)
    if "past_length" in feeds:
        feeds["past_length"][:] = 0
        feeds["position_ids"] = np.arange(feeds["position_ids"].shape[-1]).reshape(feeds["position_ids"].shape)
    for want, got in zip(_run(model, feeds), _run(folded, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_awq_beats_rtn_on_the_recorded_activations(fp32) -> None:
    q = OrtArtifact.load(_quantized(fp32, "matmulnbits", method="awq")).manifest["quantization"]
    groups = [n["awq"] for g in q["graphs"].values() for n in g.get("nodes", []) if "awq" in n]
    assert groups and q["awq"]["recipe"]["name"] == "int4-awq"
    assert all(g["error_awq"] <= g["error_rtn"] for g in groups)
    assert sum(g["error_awq"] for g in groups) < 0.95 * sum(g["error_rtn"] for g in groups)
    assert any(g["alpha"] > 0 for g in groups)


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs_are_one_line_exit_2(fp32, tmp_path, capsys) -> None:
    out, empty = tmp_path / "out", tmp_path / "empty"
    empty.mkdir()
    cases = [
        ["--artifact", str(empty), "--weights", "int4"],  # not an artifact
        ["--artifact", str(_quantized(fp32, "qdq")), "--weights", "int4"],  # already quantized
        ["--artifact", str(fp32), "--weights", "int8", "--method", "awq"],
    ]
    for args in cases:
        assert main(["quantize", *args, "--output", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len([line for line in err if line.startswith("reroute-export: error:")]) == 1, err
        assert not out.exists()
    with pytest.raises(UserError, match="--block must be one of 32, 64, 128"):
        quantize_weights(fp32, out, block=48)
    assert not out.exists()


def test_parity_is_skipped_when_asked_or_when_it_cannot_fit(fp32, tmp_path, capsys, monkeypatch) -> None:
    """--no-parity, and a machine without room for both artifacts' sessions (a 7B fp16 -> int4
    parity peaked at 22.6 GB): the artifact is written, parity says why it was not measured,
    and the exit code is 1 (unmeasured), as for a failure."""
    assert main(["quantize", "--artifact", str(fp32), "--weights", "int8", "--output", str(tmp_path / "a"),
                 "--no-parity"]) == 1
    assert "parity vs source: not measured (not asked for" in capsys.readouterr().out
    assert (tmp_path / "a" / "manifest.json").is_file()
    from reroute_export import checkpoint_files

    monkeypatch.setattr(checkpoint_files, "available_bytes", lambda: 1 << 20)
    m = quantize_weights(fp32, tmp_path / "b", weights="int8", block=BLOCK, quiet=True)
    p = m["calibration_parity"]
    assert not p["measured"] and p["reason"].startswith("skipped: parity needs ~0.0 GiB")
    assert "0.0 GiB available" in p["reason"] and "reroute-export parity --artifact" in p["reason"]


def test_routing_projections_int8_float_or_quantized(fp32, tmp_path) -> None:
    """--routing-projections: head.j's q/k at 8 bits (default), kept float, or at the recipe's
    4 bits; bytes fall in that order, the manifest and the graph say which, and the artifact
    still runs its routing."""
    made = {rp: quantize_weights(fp32, tmp_path / rp, weights="int4", block=BLOCK, quiet=True, parity=False,
                                 **({} if rp == "int8" else {"routing_projections": rp}))
            for rp in ("float", "int8", "quantize")}
    assert {rp: m["quantization"]["routing_projections"] for rp, m in made.items()} == {
        "float": "float", "int8": "int8", "quantize": "quantize"}

    def reasons(m):
        return [x["reason"] for g in m["quantization"]["graphs"].values() for x in g.get("kept_float", [])]

    assert any("routing scores" in r for r in reasons(made["float"]))
    assert not any("routing scores" in r for r in reasons(made["int8"]) + reasons(made["quantize"]))
    after = {rp: m["quantization"]["weight_bytes"]["after"] for rp, m in made.items()}
    assert after["quantize"] < after["int8"] < after["float"]
    head = onnx.load(tmp_path / "int8" / "head_0.onnx", load_external_data=False)
    bits = sorted(next(a.i for a in n.attribute if a.name == "bits") for n in head.graph.node if n.op_type == "MatMulNBits")
    assert bits == [4, 8, 8]  # v_proj int4; q_proj, k_proj int8
    art = OrtArtifact.load(tmp_path / "quantize", ["CPUExecutionProvider"], verify=False)
    from reroute_export.preprocess import load_image, samples

    path, prompt = samples()[0]
    trace = art.trace(art.prepare(load_image(path), prompt), 2)
    assert [len(v) for v in trace.decisions.values()] == [s.keep for s in art.plan.stages]
    with pytest.raises(UserError, match="unknown routing projections"):
        quantize_weights(fp32, tmp_path / "bad", routing_projections="int2", quiet=True)


def test_int4_from_fp16_keeps_the_vision_graphs_weights_fp16_in_memory(tmp_path) -> None:
    """An int4 artifact quantized from fp16: its vision graph loads with the fp16-on-CPU session
    options (no Cast folded into an fp32 copy beside the fp16 weights), the decoder graphs
    with ORT's optimisations (their few float weights folded once, not cast every step); the
    artifact runs and routes."""
    from reroute_export.preprocess import load_image, samples

    out = tmp_path / "int4"
    m = quantize_weights(tiny_artifact("llava", precision="fp16"), out, weights="int4", block=BLOCK, quiet=True,
                         parity=False)
    assert m["quantization"]["activations"] == "fp16"
    art = OrtArtifact.load(out, ["CPUExecutionProvider"], verify=False)
    level = {role: g.session.get_session_options().graph_optimization_level for role, g in art.graphs.items()}
    assert level["vision"] == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert all(v != ort.GraphOptimizationLevel.ORT_DISABLE_ALL for r, v in level.items() if r != "vision")
    path, prompt = samples()[0]
    trace = art.trace(art.prepare(load_image(path), prompt), 2)
    assert [len(v) for v in trace.decisions.values()] == [s.keep for s in art.plan.stages]
