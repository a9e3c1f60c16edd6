"""`inspect DIR`: a real tiny artifact summarised (graphs by role, each weight counted once,
the fixed KV buffers); a tampered copy fails with one line, exit 2."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import streamed_tiny_llava, tiny, tiny_artifact
from reroute_export import contract as C, inspect_artifact
from reroute_export.errors import UserError
from reroute_export.plan import make_plan


def _cli_has_inspect() -> bool:
    from reroute_export.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return "inspect" in sub.choices


def _via_cli(args: list[str]) -> int:
    from reroute_export.cli import main

    return main(["inspect", *args])


ENTRIES = [
    pytest.param(inspect_artifact.main, id="module"),
    pytest.param(_via_cli, id="cli", marks=pytest.mark.skipif(not _cli_has_inspect(),
                                                              reason="cli.py does not register `inspect` yet")),
]


@pytest.fixture(scope="module")
def artifact() -> Path:
    return tiny_artifact("llava")


def run(entry, *args, capsys) -> tuple[int, str, str]:
    code = entry([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _initializer_bytes(path: Path) -> int:
    """Ground truth for a graph's weight bytes: every initializer loaded with onnx."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def test_summary_fields(artifact) -> None:
    r = inspect_artifact.inspect(artifact)
    json.dumps(r)  # JSON-ready as is
    plan = make_plan(tiny("llava").spec, "reroute", budget=32)
    assert (r["model"], r["family"], r["precision"], r["opset"], r["ir_version"]) == \
        ("tiny-llava", "llava", "fp32", 18, 8)
    assert r["plan"]["method"] == "reroute" and r["plan"]["decision_layers"] == list(plan.decision_layers)
    assert [s["keep"] for s in r["plan"]["stages"]] == [s.keep for s in plan.stages]
    assert r["avg_visual_tokens"] == pytest.approx(plan.avg_visual_tokens)
    assert r["shapes"]["visual_tokens"] == 64 and r["shapes"]["max_prompt_tokens"] == 64 + 96
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert {f["path"] for f in r["files"]} >= {*manifest["graphs"].values(), "embed_tokens.npy"}
    for f in r["files"]:
        assert f["bytes"] == (artifact / f["path"]).stat().st_size
    assert r["total_bytes"] == sum(f["bytes"] for f in r["files"]) and r["unlisted_files"] == []
    assert r["verification"] == {"checked": True, "ok": True, "problems": [], "files": len(r["files"])}
    g = r["graphs"]
    assert [v["name"] for v in g["vision"]["inputs"]] == ["pixel_values"]
    for s, layers in enumerate(plan.segments):
        seg = g[C.segment(s)]
        inputs, outputs = C.segment_io(layers, s > 0, s == len(plan.segments) - 1)
        assert [v["name"] for v in seg["inputs"]] == inputs and [v["name"] for v in seg["outputs"]] == outputs
        assert seg["opset"] == 18 and seg["ir_version"] == 8
    for j in range(len(plan.stages)):
        assert [v["name"] for v in g[C.route(j)]["outputs"]][0] == C.selected(j)
    assert r["check"]["passed"] is True and r["check"]["failures"] == []
    assert r["check"]["metrics"]["decision_exact"] == 1.0 and "logits_max_abs" in r["check"]["metrics"]
    assert r["trt"] is None and r["quantization"] is None and r["calibration_parity"] is None
    assert r["versions"]["reroute-export"] and r["created"]


def test_graphs_by_role_with_their_layers(artifact) -> None:
    plan = make_plan(tiny("llava").spec, "reroute", budget=32)
    g = inspect_artifact.inspect(artifact)["graphs"]
    s_count = len(plan.stages)
    assert list(g) == ["vision", "segment.0", *[r for j in range(s_count)
                                                for r in (C.head(j), C.route(j), C.segment(j + 1))]]
    assert (g["vision"]["kind"], g["vision"]["layers"]) == ("vision", None)
    for s, layers in enumerate(plan.segments):
        assert (g[C.segment(s)]["kind"], g[C.segment(s)]["layers"]) == ("segment", [layers.start, layers.stop - 1])
    for j, st in enumerate(plan.stages):
        assert (g[C.head(j)]["kind"], g[C.head(j)]["layers"]) == ("head", [st.layer, st.layer])
        assert (g[C.route(j)]["kind"], g[C.route(j)]["layers"]) == ("route", [st.layer, st.layer])
    assert all(x["bucket"] == 0 for x in g.values())
    assert inspect_artifact._role_facts("route.1.b2", plan, [[r.start, r.stop] for r in plan.segments]) == \
        {"kind": "route", "bucket": 2, "index": 1, "layers": [plan.stages[1].layer] * 2}
    assert inspect_artifact._role_facts("vision", plan, [])["bucket"] == 0


def test_weight_bytes_per_graph_and_each_decoder_weight_once(artifact) -> None:
    r = inspect_artifact.inspect(artifact)
    manifest = json.loads((artifact / "manifest.json").read_text())
    for role, name in manifest["graphs"].items():  # read without loading the weights, yet exact
        assert r["graphs"][role]["weights"]["bytes"] == _initializer_bytes(artifact / name), role
        external = r["graphs"][role]["weights"]["external"]  # an in-memory export: each graph's own .data file
        assert set(external) <= {name + ".data"}, role
        assert all(n <= (artifact / f).stat().st_size for f, n in external.items())
    w = r["weights"]
    assert w["bytes"] == w["referenced_bytes"] == sum(x["weights"]["bytes"] for x in r["graphs"].values())
    assert w["shared_bytes"] == 0 and w["embed_tokens_bytes"] == (artifact / C.EMBEDDINGS).stat().st_size
    assert w["by_kind"]["route"] < 4096 * len(r["plan"]["stages"])  # no weights: rope frequencies, scalars
    # The decoder's parameters (layers, final norm, LM head) in the segments and heads, once each:
    # a q/k/v projection both in head.j and its segment would add a layer's projections again.
    loaded = tiny("llava")
    lm, head = loaded.family.decoder(loaded.model), loaded.family.lm_head(loaded.model)
    params = 4 * sum(p.numel() for m in (lm.layers, lm.norm, head) for p in m.parameters())
    decoder = w["by_kind"]["segment"] + w["by_kind"]["head"]
    graphs = len(r["plan"]["stages"]) * 2 + 1
    assert params <= decoder < params + 2048 * graphs, (params, decoder)  # + rope tables and scalar constants
    text = inspect_artifact.format_report(r)
    assert "each weight stored once" in text
    for role in manifest["graphs"]:
        assert f"  {role} " in text


def test_kv_buffers_per_segment(artifact) -> None:
    r = inspect_artifact.inspect(artifact)
    manifest = json.loads((artifact / "manifest.json").read_text())
    sh, kv = manifest["shapes"], r["kv_buffers"]
    assert [s["cache_tokens"] for s in kv["segments"]] == manifest["decoder"]["cache_tokens"]
    assert [s["layers"] for s in kv["segments"]] == [[a, b - 1] for a, b in manifest["decoder"]["segments"]]
    for s, (a, b) in zip(kv["segments"], manifest["decoder"]["segments"]):
        assert s["bytes"] == (b - a) * 2 * sh["num_kv_heads"] * s["cache_tokens"] * sh["head_dim"] * 4  # fp32
        assert s["dtypes"] == ["float32"]
    assert kv["bytes"] == sum(s["bytes"] for s in kv["segments"])
    text = inspect_artifact.format_report(r)
    assert "KV buffers (fixed, allocated once per run; float32" in text
    for s in kv["segments"]:
        span = "-".join(dict.fromkeys(str(x) for x in s["layers"]))
        assert re.search(rf"^  {re.escape(s['segment'])}\s+{span}\s+{s['cache_tokens']}\s", text, re.M), s


def test_bytes_two_graphs_point_at_are_counted_once(artifact, tmp_path) -> None:
    """Graphs whose external weights share a file: a region two graphs reference counts once,
    and the summary says how many bytes were shared (the segment layout shares none)."""
    import onnx

    copy = tmp_path / "shared"
    shutil.copytree(artifact, copy)
    model = onnx.load(str(copy / "head_0.onnx"))
    onnx.save_model(model, str(copy / "head_0.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="shared.data", size_threshold=1024)
    shutil.copyfile(copy / "head_0.onnx", copy / "head_1.onnx")  # head.1 now points at head.0's bytes
    r = inspect_artifact.inspect(copy, verify=False)
    head0 = r["graphs"]["head.0"]["weights"]
    assert head0["external"]["shared.data"] > 0 and r["graphs"]["head.1"]["weights"] == head0
    w = r["weights"]
    assert w["shared_bytes"] == head0["external"]["shared.data"]
    assert w["external"]["shared.data"] == head0["external"]["shared.data"]  # once, though two graphs point at it
    assert w["bytes"] == w["referenced_bytes"] - w["shared_bytes"]
    assert "referenced by more than one graph, counted once" in inspect_artifact.format_report(r)


def test_streamed_weights_data_counted_once() -> None:
    """A streamed export (--random-weights): every graph's external weights in one shared
    weights.data; the per-graph bytes add up to the file's distinct bytes, none shared."""
    out = streamed_tiny_llava()
    r = inspect_artifact.inspect(out)
    w = r["weights"]
    assert set(w["external"]) == {"weights.data"} and w["shared_bytes"] == 0
    assert w["bytes"] == w["referenced_bytes"] == sum(g["weights"]["bytes"] for g in r["graphs"].values())
    assert w["external"]["weights.data"] == sum(g["weights"]["external"].get("weights.data", 0)
                                                for g in r["graphs"].values())
    assert w["external"]["weights.data"] <= (out / "weights.data").stat().st_size  # alignment padding aside
    assert r["graphs"]["segment.0"]["weights"]["external"]["weights.data"] > 0


@pytest.mark.parametrize("entry", ENTRIES)
def test_human_json_and_quiet_output(entry, artifact, tmp_path, capsys) -> None:
    code, out, err = run(entry, artifact, capsys=capsys)
    assert code == 0 and err == ""
    listed = len(json.loads((artifact / "manifest.json").read_text())["files"])  # graphs, tokenizer, chat template...
    for text in ("tiny-llava (llava)", "plan: reroute, N=64 visual tokens", "precision fp32  opset 18  IR 8",
                 "segment_0.onnx", "graphs: 14 (1 vision, 5 segments, 4 heads, 4 routing)", "KV buffers", f"checksums: {listed} files verified", "post-export check: passed"):
        assert text in out, text
    code, out, _ = run(entry, artifact, "--json", tmp_path / "inspect.json", "--quiet", capsys=capsys)
    assert code == 0 and out == ""
    saved = json.loads((tmp_path / "inspect.json").read_text())
    assert saved["model"] == "tiny-llava" and saved["verification"]["ok"] is True
    code, out, _ = run(entry, artifact, "--json", "-", capsys=capsys)
    assert code == 0 and json.loads(out)["plan"]["method"] == "reroute"


@pytest.mark.parametrize("entry", ENTRIES)
def test_tampered_copy_fails_verification_with_one_line(entry, artifact, tmp_path, capsys) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    data = bytearray((copy / "segment_0.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    (copy / "segment_0.onnx").write_bytes(bytes(data))

    code, out, err = run(entry, copy, capsys=capsys)
    assert code == 2 and out == ""
    assert err.splitlines() == [f"reroute-export: error: artifact {copy}: segment_0.onnx checksum mismatch"]
    code, _, err = run(entry, copy, "--json", tmp_path / "bad.json", capsys=capsys)
    assert code == 2 and len(err.splitlines()) == 1
    saved = json.loads((tmp_path / "bad.json").read_text())
    listed = len(json.loads((copy / "manifest.json").read_text())["files"])
    assert saved["verification"] == {"checked": True, "ok": False, "files": listed,
                                     "problems": ["segment_0.onnx checksum mismatch"]}
    code, out, _ = run(entry, copy, "--no-verify", capsys=capsys)
    assert code == 0 and "checksums: not verified" in out

    (copy / "embed_tokens.npy").unlink()
    code, _, err = run(entry, copy, capsys=capsys)
    assert code == 2 and err.splitlines() == [
        f"reroute-export: error: artifact {copy}: embed_tokens.npy is missing (and 1 more)"]
    assert inspect_artifact.inspect(artifact)["verification"]["ok"]  # the original is untouched


@pytest.mark.parametrize("entry", ENTRIES)
def test_not_an_artifact(entry, artifact, tmp_path, capsys) -> None:
    code, out, err = run(entry, tmp_path / "absent", capsys=capsys)
    assert code == 2 and out == "" and err.splitlines() == [
        f"reroute-export: error: artifact folder not found: {tmp_path / 'absent'}"]
    code, _, err = run(entry, tmp_path, capsys=capsys)
    assert code == 2 and "manifest.json is missing" in err and len(err.splitlines()) == 1
    old = tmp_path / "old"
    shutil.copytree(artifact, old)
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**manifest, "format": "reroute-export/0"}))
    code, _, err = run(entry, old, capsys=capsys)
    assert code == 2 and "incompatible version" in err and len(err.splitlines()) == 1
    with pytest.raises(UserError, match="incompatible version"):
        inspect_artifact.inspect(old)


def test_trt_and_quantization_records_are_summarised(artifact, tmp_path, capsys) -> None:
    copy = tmp_path / "int8"
    shutil.copytree(artifact, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest.pop("check")
    manifest.update({
        "precision": "int8",
        "quantization": {"library": "onnxruntime", "version": "1.32.0", "format": "QDQ", "precision": "int8",
                         "scheme": "int8 symmetric", "recipe": {}},
        "calibration_parity": {"measured": True, "passed": False, "failures": ["logits_cosine = 0.9 < 0.99"],
                               "logits_cosine_min": 0.9, "inputs": [{"input": "a"}, {"input": "b"}]},
        "trt": {"device": "jetson-orin", "trt_version": "10.3", "built": False, "reason": "build on the device"},
    })
    (copy / "manifest.json").write_text(json.dumps(manifest))  # the manifest is not in its own file list
    r = inspect_artifact.inspect(copy)
    assert r["verification"]["ok"] and r["check"] is None
    assert r["quantization"]["library"] == "onnxruntime" and r["trt"]["device"] == "jetson-orin"
    assert r["calibration_parity"]["inputs"] == 2 and r["calibration_parity"]["passed"] is False
    text = inspect_artifact.format_report(r)
    assert "quantization: int8 QDQ via onnxruntime 1.32.0 (int8 symmetric)" in text
    assert "parity vs fp32 source (2 samples): FAILED: logits_cosine = 0.9 < 0.99" in text
    assert "TensorRT: build plan for jetson-orin (TensorRT 10.3), no engine built: build on the device" in text
    assert "post-export check" not in text
