"""`lint`: crafted graphs TensorRT would reject fail, naming the node; real graphs pass."""

from __future__ import annotations

import json

import onnx

from reroute_export import contract as C
import pytest
from onnx import TensorProto, helper

from reroute_export.check.lint import lint, lint_model
from reroute_export.cli import main


def graph(nodes, inputs, outputs, initializers=(), functions=(), opset=18, ir=8, extra_opsets=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), *extra_opsets], functions=list(functions))
    m.ir_version = ir
    return m


X = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5000])
Y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
I = helper.make_tensor_value_info("i", TensorProto.INT64, None)


def errors(model):
    return [f for f in lint_model(model, "crafted.onnx") if f.severity == "error"]


def test_nonzero_is_named() -> None:
    m = graph([helper.make_node("NonZero", ["x"], ["i"], name="find_nonzero")], [X], [I])
    (err,) = errors(m)
    assert err.node == "find_nonzero" and "data-dependent" in err.message


def test_topk_over_3840_is_named() -> None:
    k = helper.make_tensor("k", TensorProto.INT64, [1], [4096])
    m = graph([helper.make_node("TopK", ["x", "k"], ["y", "i"], name="big_topk", axis=1)], [X], [Y, I], [k])
    (err,) = errors(m)
    assert err.node == "big_topk" and "K=4096 > 3840" in err.message


def test_topk_with_computed_k_and_unsorted() -> None:
    kin = helper.make_tensor_value_info("kin", TensorProto.INT64, [1])
    m = graph([helper.make_node("TopK", ["x", "kin"], ["y", "i"], name="t", axis=1, sorted=0)], [X, kin], [Y, I])
    msgs = " ".join(e.message for e in errors(m))
    assert "sorted=0" in msgs and "not a constant" in msgs


def test_custom_node_without_function_is_named() -> None:
    m = graph([helper.make_node("Mystery", ["x"], ["y"], name="custom_thing", domain="reroute")], [X], [Y],
              extra_opsets=[helper.make_opsetid("reroute", 1)])
    (err,) = errors(m)
    assert err.node == "custom_thing" and "local function" in err.message
    # with a plugin_namespace it is fine
    m.graph.node[0].attribute.append(helper.make_attribute("plugin_namespace", "reroute"))
    assert not errors(m)


def test_scatter_reduction_opset_ir_and_double() -> None:
    d = helper.make_tensor_value_info("d", TensorProto.DOUBLE, [2])
    nodes = [helper.make_node("ScatterND", ["x", "i", "x"], ["y"], name="sc", reduction="add"),
             helper.make_node("Relu", ["d"], ["r"], name="relu64")]
    m = graph(nodes, [X, I, d], [Y], opset=19, ir=11)
    msgs = [e.message for e in errors(m)]
    assert any("reduction" in x for x in msgs) and any("opset 19 > 18" in x for x in msgs)
    assert any("IR version 11 > 10" in x for x in msgs) and any("DOUBLE" in x for x in msgs)
    assert not any("opset" in e.message for e in lint_model(m, "m", "11") if e.severity == "error")


def test_cli_exit_codes_and_json(tmp_path, capsys) -> None:
    bad = graph([helper.make_node("NonZero", ["x"], ["i"], name="nz")], [X], [I])
    onnx.save(bad, tmp_path / "bad.onnx")
    out = tmp_path / "lint.json"
    assert main(["lint", str(tmp_path / "bad.onnx"), "--json", str(out)]) == 1
    report = json.loads(out.read_text())
    assert report["findings"][0]["node"] == "nz"
    assert "nz" in capsys.readouterr().out
    assert main(["lint", str(tmp_path / "missing.onnx")]) == 2
    good = graph([helper.make_node("Relu", ["x"], ["y"], name="r")], [X], [Y])
    onnx.save(good, tmp_path / "good.onnx")
    assert main(["lint", str(tmp_path / "good.onnx"), "--trt-version", "11"]) == 0


@pytest.mark.parametrize("family_name", ["llava", "qwen2.5-vl"])
def test_exported_decoder_graphs_pass(family_name, tmp_path) -> None:
    from test_rewrite import exported

    graphs = exported(family_name, "reroute")
    for role, proto in graphs.items():
        onnx.save(proto, tmp_path / C.file_of(role))
    for trt in ("10.3", "11"):
        for role in graphs:  # bare graphs, by file: a folder must be a verified artifact
            report = lint(tmp_path / C.file_of(role), trt)
            assert report["passed"], (role, report["findings"])


# ---------------------------------------------------------------- weight-only quantized graphs (quantize)


def _weight_only(encoding: str):
    """x (1, 64) @ a 64 x 8 int4 weight, as `quantize` writes it."""
    if encoding == "matmulnbits":
        b = helper.make_tensor("b", TensorProto.UINT8, [8, 2, 16], bytes(256), raw=True)
        s = helper.make_tensor("s", TensorProto.FLOAT, [8, 2], [1.0] * 16)
        node = helper.make_node("MatMulNBits", ["x64", "b", "s"], ["y"], name="q_proj", domain="com.microsoft",
                                K=64, N=8, bits=4, block_size=32)
        return graph([node], [X64], [Y], [b, s], extra_opsets=[helper.make_opsetid("com.microsoft", 1)])
    w = helper.make_tensor("w", TensorProto.INT4, [64, 8], bytes(256), raw=True)
    s = helper.make_tensor("s", TensorProto.FLOAT, [2, 8], [1.0] * 16)
    nodes = [helper.make_node("DequantizeLinear", ["w", "s"], ["wf"], name="q_proj/dq", axis=0, block_size=32),
             helper.make_node("MatMul", ["x64", "wf"], ["y"], name="q_proj")]
    return graph(nodes, [X64], [Y], [w, s], opset=21, ir=10)


X64 = helper.make_tensor_value_info("x64", TensorProto.FLOAT, [1, 64])


def test_matmulnbits_is_refused_naming_qdq() -> None:
    for trt in ("10.3", "11"):
        (err,) = [f for f in lint_model(_weight_only("matmulnbits"), "q.onnx", trt) if f.severity == "error"]
        assert err.op == "com.microsoft.MatMulNBits" and "--encoding qdq" in err.message


def test_blocked_int4_dequantize_needs_opset_21() -> None:
    m = _weight_only("qdq")
    assert not [f for f in lint_model(m, "q.onnx", "11") if f.severity == "error"]
    msgs = " ".join(f.message for f in lint_model(m, "q.onnx", "10.3") if f.severity == "error")
    assert "opset 21 > 18" in msgs and "blocked DequantizeLinear" in msgs


def test_polygraphy_runs_only_when_asked(tmp_path, capsys, monkeypatch) -> None:
    """`--polygraphy` runs polygraphy's own `check lint` (the test extra installs it with ModelOpt)
    and reports its exit code; without it, nothing is started. A bare file's shapes are
    unknown: its run is reported, not judged."""
    _with_polygraphy(monkeypatch)
    good = graph([helper.make_node("Relu", ["x"], ["y"], name="r")], [X], [Y])
    onnx.save(good, tmp_path / "good.onnx")
    assert lint(tmp_path / "good.onnx")["polygraphy"] == {}
    assert main(["lint", str(tmp_path / "good.onnx"), "--polygraphy"]) == 0
    assert "polygraphy check lint good.onnx: exit 0 (shapes unknown" in capsys.readouterr().out


def test_a_local_function_on_another_opset_than_its_model_is_an_error() -> None:
    """ONNX's checker refuses a graph whose local function imports another version of a domain
    than the model (the kv-scatter export once raised its routing graphs to opset 24 and left
    their SelectVisual/RouteGather functions at 18)."""
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    fn = helper.make_function("reroute", "Twice", ["a"], ["b"],
                              [helper.make_node("Constant", [], ["c"], value=two), helper.make_node("Mul", ["a", "c"], ["b"])],
                              [helper.make_opsetid("", 18)])
    node = helper.make_node("Twice", ["x"], ["y"], domain="reroute", name="twice")
    for model_opset, bad in ((18, False), (24, True)):
        m = graph([node], [X], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5000])], functions=[fn],
                  opset=model_opset, ir=10,
                  extra_opsets=[helper.make_opsetid("reroute", 1)])
        found = [f for f in lint_model(m, "crafted.onnx", "11") if f.severity == "error"]
        assert bool(found) == bad, found
        if bad:
            assert found[0].op == "reroute.Twice" and "opset 18, the model 24, and Constant differ" in found[0].message
            with pytest.raises(onnx.checker.ValidationError, match="not compatible"):
                onnx.checker.check_model(m)


def _with_polygraphy(monkeypatch) -> None:
    import os
    import shutil
    import sys

    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if shutil.which("polygraphy") is None:
        pytest.skip("polygraphy is not installed (pip install polygraphy)")


@pytest.mark.slow
def test_polygraphy_runs_each_artifact_graph_at_the_artifacts_shapes(capsys, monkeypatch) -> None:
    """In an artifact folder, polygraphy gets each dynamic input's shape from the TensorRT build
    plan's profiles (the routing graphs' scored rows): every graph of the tiny artifact passes
    it, and its verdict counts. Fed polygraphy's own default (1 for each dynamic axis) a
    routing graph fails, which is why the shapes are given."""
    from conftest import tiny_artifact
    from reroute_export.check.lint import artifact_shapes, polygraphy_lint

    _with_polygraphy(monkeypatch)
    art = tiny_artifact("llava")
    manifest = json.loads((art / C.MANIFEST).read_text())
    shapes = artifact_shapes(art)
    assert set(shapes) == set(manifest["graphs"].values())
    route = manifest["graphs"][C.route(0)]
    n = manifest["plan"]["visual_tokens"]
    assert shapes[route][C.HIDDEN][1] > n and shapes[manifest["graphs"][C.vision()]] == {}
    assert polygraphy_lint(art / route)["returncode"] != 0  # polygraphy's default shapes
    assert main(["lint", str(art), "--polygraphy"]) == 0
    out = capsys.readouterr().out
    assert out.count("exit 0 at the artifact's shapes") == len(shapes) - 1  # all but the static vision graph
    assert "polygraphy check lint vision.onnx: exit 0" in out


@pytest.mark.slow
def test_a_graph_polygraphy_fails_at_the_artifacts_shapes_fails_the_lint(tmp_path, capsys, monkeypatch) -> None:
    """A head graph whose projection weight has one row too many (a broken exporter's output,
    checksums rewritten): the support table has nothing against it, ONNX Runtime cannot run it,
    so polygraphy fails it and lint exits 1 naming the graph."""
    import numpy as np
    from onnx import numpy_helper

    from test_export_artifact import tampered

    _with_polygraphy(monkeypatch)

    def one_row_too_many(proto) -> None:
        inits = {t.name: t for t in proto.graph.initializer}
        weight = next(inits[i] for n in proto.graph.node if n.op_type == "MatMul" for i in n.input if i in inits)
        w = numpy_helper.to_array(weight)
        weight.CopyFrom(numpy_helper.from_array(np.concatenate([w, w[:1]]), weight.name))

    art = tampered(tmp_path, one_row_too_many, C.head(0))
    assert main(["lint", str(art)]) == 0  # the operator table alone passes it
    capsys.readouterr()
    assert main(["lint", str(art), "--polygraphy"]) == 1
    out = capsys.readouterr().out
    assert "polygraphy check lint head_0.onnx: exit 1 at the artifact's shapes" in out
    assert "polygraphy failed 1 graphs: head_0.onnx)" in out
