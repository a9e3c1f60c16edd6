"""Exported artifacts against the eager reference, through the CLI a user types.

`trace --artifact` must equal `trace --model` (decisions identical, last logits within
1e-4, 16 greedy tokens identical) for every method and both tiny families, on an input
other than the one the artifact was exported with; fp16 artifacts are judged by agreement.
"""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import FAMILIES, sample_inputs, tiny, tiny_artifact
from reroute_export.cli import main
from reroute_export import contract as C
from reroute_export.export.artifact import read_manifest
from reroute_export.export.exporter import STACK_TRACE
from reroute_export.export.onnx_ops import DOMAIN
from reroute_export.files import umask
from reroute_export.preprocess import load_image, samples

METHODS = ["none", "fastv", "pdrop", "reroute"]
IMAGE, PROMPT = str(samples()[1][0]), samples()[1][1]  # the export post-check used samples()[0]


def plan_args(method: str) -> list[str]:
    return ["--method", method] + ([] if method == "none" else ["--budget", "32"])


def trace_json(tmp_path: Path, name: str, *args: str) -> dict:
    out = tmp_path / f"{name}.json"
    code = main(["trace", *map(str, args), "--max-new-tokens", "16", "--json", str(out), "--quiet"])
    assert code == 0
    return json.loads(out.read_text())


def assert_same_trace(ref: dict, got: dict) -> None:
    assert got["decisions"] == ref["decisions"]
    diff = np.abs(np.array(got["last_logits"]) - np.array(ref["last_logits"])).max()
    assert diff <= 1e-4, diff
    assert got["generated_ids"] == ref["generated_ids"]
    assert ref["generated_ids"]


TRACED = [("llava", m) for m in METHODS] + [("qwen2.5-vl", m) for m in ("pdrop", "reroute")]


@pytest.mark.parametrize(("family", "method"), TRACED)
def test_trace_artifact_equals_trace_model(family: str, method: str, tmp_path) -> None:
    """Every method on LLaVA; Qwen2.5-VL (mRoPE positions through the routed graphs) with a
    non-recoverable and a recoverable schedule: its `none`/`fastv` graphs are the same
    segment/route code as LLaVA's (tests/test_rewrite.py runs all four on each family's
    modules), and each export costs about a minute of the suite."""
    art = tiny_artifact(family, method)
    ref = trace_json(tmp_path, "ref", "--model", tiny(family).spec.name, *plan_args(method),
                     "--image", IMAGE, "--prompt", PROMPT)
    got = trace_json(tmp_path, "art", "--artifact", art, "--image", IMAGE, "--prompt", PROMPT)
    assert len(ref["decisions"]) == (0 if method == "none" else 1 if method == "fastv" else 4)
    assert_same_trace(ref, got)


def test_trace_artifact_takes_processor_arrays(tmp_path) -> None:
    """--input-ids/--pixel-values/--image-grid-thw (what the HF processor gives) run the artifact too."""
    inputs = sample_inputs("qwen2.5-vl", 2)
    files = {}
    for name, x in [("ids", inputs.input_ids), ("pv", inputs.pixel_values), ("thw", inputs.image_grid_thw)]:
        files[name] = tmp_path / f"{name}.npy"
        np.save(files[name], x.numpy())
    arrays = ["--input-ids", files["ids"], "--pixel-values", files["pv"], "--image-grid-thw", files["thw"]]
    ref = trace_json(tmp_path, "ref", "--model", "tiny-qwen2.5-vl", "--budget", "32", *arrays)
    got = trace_json(tmp_path, "art", "--artifact", tiny_artifact("qwen2.5-vl"), *arrays)
    assert_same_trace(ref, got)


def test_artifact_folder_contents_and_graph_checks() -> None:
    folder = tiny_artifact("llava")
    manifest = read_manifest(folder)  # verifies every sha256
    graphs = list(manifest["graphs"].values())
    assert len(graphs) == 1 + 5 + 4 + 4  # vision, 5 segments, 4 heads, 4 routing graphs
    for name in (*graphs, C.EMBEDDINGS, f"{C.PREPROCESSOR}/tokenizer.json"):
        assert name in manifest["files"], name
    assert manifest["opset"] <= 18 and manifest["ir_version"] == C.IR_VERSION
    assert manifest["plan"]["stages"] and manifest["shapes"]["visual_tokens"] == 64
    assert {"torch", "transformers", "onnx", "onnxruntime"} <= set(manifest["versions"])
    assert manifest["check"]["passed"] and manifest["check"]["metrics"]["decision_exact"] == 1.0
    for graph in graphs:
        proto = onnx.load(folder / graph)
        onnx.checker.check_model(proto, full_check=True)
        assert proto.ir_version == C.IR_VERSION
        names = [n.name for n in proto.graph.node]
        assert len(set(names)) == len(names)  # deterministic, unique node names
        # no exporting machine's paths (stack traces); the module path layers.py reads stays
        keys = {p.key for n in proto.graph.node for p in n.metadata_props}
        assert STACK_TRACE not in keys and "pkg.torch.onnx.name_scopes" in keys, graph
    route = onnx.load(folder / C.file_of(C.route(0)))
    assert {n.op_type for n in route.graph.node if n.domain == DOMAIN} == {"SelectVisual", "RouteGather"}
    assert {f.name for f in route.functions if f.domain == DOMAIN} == {"SelectVisual", "RouteGather"}
    usual = 0o666 & ~umask()  # onnx writes external data 0600: the writer gives every file the usual mode
    assert {rel: stat.S_IMODE((folder / rel).stat().st_mode) for rel in manifest["files"]} == \
        {rel: usual for rel in manifest["files"]}


def test_export_is_deterministic(tmp_path) -> None:
    """Two exports of the same model and plan give byte-identical graphs."""
    a = tiny_artifact("llava", "fastv")
    out = tmp_path / "again"
    assert main(["export", "--model", "tiny-llava", "--method", "fastv", "--budget", "32", "--output", str(out),
                 "--max-new-tokens", "32", "--max-prompt-tokens", "160", "--no-check", "--quiet"]) == 0
    graphs = read_manifest(a)["graphs"].values()
    assert read_manifest(out)["graphs"] == read_manifest(a)["graphs"]
    for graph in graphs:
        assert (out / graph).read_bytes() == (a / graph).read_bytes(), graph


def test_inlined_artifact_runs_the_same(tmp_path) -> None:
    art = tiny_artifact("qwen2.5-vl", inline=True)
    for name in read_manifest(art)["graphs"].values():
        proto = onnx.load(art / name)
        assert not [n for n in proto.graph.node if n.domain == DOMAIN] and not proto.functions
        onnx.checker.check_model(proto, full_check=True)
    ref = trace_json(tmp_path, "ref", "--artifact", tiny_artifact("qwen2.5-vl"), "--image", IMAGE, "--prompt", PROMPT)
    got = trace_json(tmp_path, "art", "--artifact", art, "--image", IMAGE, "--prompt", PROMPT)
    assert got["decisions"] == ref["decisions"] and got["generated_ids"] == ref["generated_ids"]


@pytest.mark.parametrize("family", FAMILIES)
def test_fp16_artifact_agrees_with_fp32_reference(family: str, tmp_path) -> None:
    art = tiny_artifact(family, precision="fp16")
    for graph in read_manifest(art)["graphs"].values():
        onnx.checker.check_model(onnx.load(art / graph), full_check=True)
    out = tmp_path / "parity.json"
    assert main(["parity", "--artifact", str(art), "--json", str(out), "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert report["precision"] == "fp16" and report["passed"]
    for r in report["inputs"]:
        m = r["metrics"]
        print(f"{family} fp16 {r['input']}: overlap per stage {[round(s['overlap'], 3) for s in m['stages']]}, "
              f"cosine {m['logits_cosine']:.5f}, tokens {m['token_agreement']:.2f}")
        assert min(s["overlap"] for s in m["stages"]) >= 0.9
        assert m["logits_cosine"] > 0.99 and 0 <= m["token_agreement"] <= 1


@pytest.mark.parametrize("family", FAMILIES)
def test_manifest_shapes_are_what_the_runtime_holds(family: str) -> None:
    """The manifest's `visual_rows_per_layer` (the plan's K per layer) and `cache_tokens` (M_s)
    describe the KV the artifact really keeps: after prefill each stage's buffers hold the
    prompt's text rows plus that stage's visual rows, inside its fixed buffer."""
    from reroute_export.runtime.ort import OrtArtifact

    art = OrtArtifact.load(tiny_artifact(family))
    shapes = art.manifest["shapes"]
    inputs = art.prepare(load_image(IMAGE), PROMPT)
    pre = art.prefill(inputs)
    text = inputs.input_ids.shape[1] - shapes["visual_tokens"]
    rows = shapes["visual_rows_per_layer"]
    assert len(rows) == shapes["num_layers"] and min(rows) > 0
    assert pre["kv"].lengths == [text + rows[layers.start] for layers in art.plan.segments]
    assert all(rows[i] == rows[layers.start] for layers in art.plan.segments for i in layers)  # one K per stage
    assert all(n <= m for n, m in zip(pre["kv"].lengths, shapes["cache_tokens"]))


def test_generate_from_artifact(capsys, tmp_path) -> None:
    """`generate` prints the text while it is generated: what it printed is the text its
    --json records, then a newline."""
    art = tiny_artifact("llava")
    code = main(["generate", "--artifact", str(art), "--image", IMAGE, "--prompt", PROMPT, "--max-new-tokens", "8",
                 "--json", str(tmp_path / "g.json")])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.strip() and printed == json.loads((tmp_path / "g.json").read_text())["text"] + "\n"


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_text_joins_to_the_decoded_text(family) -> None:
    """TextStream's pieces joined are decode(ids), token by token, for real text (words show
    before the end: only the last word is held back) and for random ids (byte pieces that
    never form a character, clean-up rules such as " ." -> "."); never "shown too early"."""
    from reroute_export.api import load_artifact
    from reroute_export.runtime.processor import TextStream

    proc = load_artifact(tiny_artifact(family)).runner.preprocessor
    words = "An astronaut , riding a horse . It 's on the moon ? Yes ! 宇航员 in a café\nthe end"
    rng = np.random.default_rng(0)
    vocab = proc.tokenizer.get_vocab_size()
    runs = [proc.tokenizer.encode(words, add_special_tokens=False).ids,
            *(rng.integers(0, vocab, 40).tolist() for _ in range(30))]
    for clean_up in (False, True):  # the tokenizer's own setting, and transformers' clean-up rules on
        proc.clean_up = clean_up
        for n, ids in enumerate(runs):
            stream = TextStream(proc.decode)
            pieces = [stream.push(t) for t in ids]
            rest = stream.finish()
            assert "".join(pieces) + rest == proc.decode(ids), (clean_up, n, pieces, rest)
            assert "shown too early" not in rest, (clean_up, n, ids)
        stream = TextStream(proc.decode)
        shown = "".join(stream.push(t) for t in runs[0])  # before finish(): all but the last word
        assert shown == proc.decode(runs[0])[:-len(" end")], shown
        assert shown.startswith("An astronaut, riding a horse. It's" if clean_up else "An astronaut , riding"), shown


def test_plan_flags_must_match_the_artifact(capsys, tmp_path) -> None:
    art = tiny_artifact("llava")
    assert main(["trace", "--artifact", str(art), "--budget", "32", "--image", IMAGE, "--prompt", PROMPT,
                 "--quiet"]) == 0
    code = main(["trace", "--artifact", str(art), "--budget", "16", "--image", IMAGE, "--prompt", PROMPT])
    err = capsys.readouterr().err
    assert code == 2 and "exported for reroute keeping" in err and len(err.strip().splitlines()) == 1


def tampered(tmp_path: Path, edit, role: str) -> Path:
    """A copy of the fp32 artifact with `edit(ModelProto)` applied to the graph of `role` and the
    manifest's checksums rewritten, as a broken exporter would leave it (not a corrupted copy)."""
    from reroute_export.export.artifact import ArtifactWriter

    src = tiny_artifact("llava")
    out = tmp_path / "tampered"
    with ArtifactWriter(out) as w:
        shutil.rmtree(w.path)
        shutil.copytree(src, w.path)
        proto = onnx.load(w.path / C.file_of(role))
        edit(proto)
        onnx.save(proto, w.path / C.file_of(role))
        w.write_manifest(json.loads((src / C.MANIFEST).read_text()))
    return out


def test_parity_fails_on_a_perturbed_weight(tmp_path, capsys) -> None:
    def perturb(proto) -> None:
        from onnx import numpy_helper

        init = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)) if "layers.3." in t.name else 0)
        w = numpy_helper.to_array(init).copy()
        w.flat[: w.size // 4] += 0.5
        init.CopyFrom(numpy_helper.from_array(w, init.name))

    art = tampered(tmp_path, perturb, C.segment(2))  # layers 3-4
    code = main(["parity", "--artifact", str(art), "--markdown", str(tmp_path / "report.md")])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAILED" in out and ("logits_max_abs" in out or "decision" in out)
    assert "would pass" in out or "first differing stage" in out
    assert "FAILED" in (tmp_path / "report.md").read_text()


def test_parity_fails_on_a_changed_k(tmp_path, capsys) -> None:
    """K is baked into the routing graph's static shapes: a K edited in one node makes the
    routing graph inconsistent. parity reports it as a failed check naming the graph and
    node (exit 1), not a crash."""
    def change_k(proto) -> None:
        node = next(n for n in proto.graph.node if n.op_type == "SelectVisual")
        attr = next(a for a in node.attribute if a.name == "k")
        attr.ints[0] -= 3

    art = tampered(tmp_path, change_k, C.route(1))
    code = main(["parity", "--artifact", str(art), "--json", str(tmp_path / "p.json")])
    out = capsys.readouterr().out
    assert code == 1 and "FAILED" in out
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["failures"] and all("route_1.onnx failed in ONNX Runtime" in f and "node" in f
                                      for f in report["failures"]), report["failures"]


def test_parity_tolerance_override_and_bad_values(tmp_path, capsys) -> None:
    art = tiny_artifact("llava")
    assert main(["parity", "--artifact", str(art), "--tol", "logits_max_abs_max=1e-12", "--quiet"]) == 1
    code = main(["parity", "--artifact", str(art), "--tol", "nonsense=1"])
    assert code == 2 and "unknown tolerance 'nonsense'" in capsys.readouterr().err
    code = main(["parity", "--artifact", str(tmp_path / "missing")])
    assert code == 2 and "artifact folder not found" in capsys.readouterr().err
