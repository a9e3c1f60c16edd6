"""`inspect DIR`: a real tiny artifact summarised; a tampered copy fails with one line, exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import tiny, tiny_artifact
from reroute_export import inspect_artifact
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
    assert {f["path"] for f in r["files"]} >= {"vision.onnx", "prefill.onnx", "decode.onnx", "embed_tokens.npy"}
    for f in r["files"]:
        assert f["bytes"] == (artifact / f["path"]).stat().st_size
    assert r["total_bytes"] == sum(f["bytes"] for f in r["files"]) and r["unlisted_files"] == []
    assert r["verification"] == {"checked": True, "ok": True, "problems": [], "files": len(r["files"])}
    g = r["graphs"]
    assert [v["name"] for v in g["vision"]["inputs"]] == ["pixel_values"]
    assert [v["name"] for v in g["prefill"]["inputs"]] == ["inputs_embeds", "position_ids", "visual_start"]
    assert sum(v["name"].startswith("selected.") for v in g["prefill"]["outputs"]) == len(plan.stages)
    assert g["prefill"]["opset"] == 18 and g["prefill"]["ir_version"] == 8
    assert r["check"]["passed"] is True and r["check"]["failures"] == []
    assert r["check"]["metrics"]["decision_exact"] == 1.0 and "logits_max_abs" in r["check"]["metrics"]
    assert r["trt"] is None and r["quantization"] is None and r["calibration_parity"] is None
    assert r["versions"]["reroute-export"] and r["created"]


@pytest.mark.parametrize("entry", ENTRIES)
def test_human_json_and_quiet_output(entry, artifact, tmp_path, capsys) -> None:
    code, out, err = run(entry, artifact, capsys=capsys)
    assert code == 0 and err == ""
    listed = len(json.loads((artifact / "manifest.json").read_text())["files"])  # graphs, tokenizer, chat template...
    for text in ("tiny-llava (llava)", "plan: reroute, N=64 visual tokens", "precision fp32  opset 18  IR 8",
                 "prefill.onnx", f"checksums: {listed} files verified", "post-export check: passed"):
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
    data = bytearray((copy / "prefill.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    (copy / "prefill.onnx").write_bytes(bytes(data))

    code, out, err = run(entry, copy, capsys=capsys)
    assert code == 2 and out == ""
    assert err.splitlines() == [f"reroute-export: error: artifact {copy}: prefill.onnx checksum mismatch"]
    code, _, err = run(entry, copy, "--json", tmp_path / "bad.json", capsys=capsys)
    assert code == 2 and len(err.splitlines()) == 1
    saved = json.loads((tmp_path / "bad.json").read_text())
    listed = len(json.loads((copy / "manifest.json").read_text())["files"])
    assert saved["verification"] == {"checked": True, "ok": False, "files": listed,
                                     "problems": ["prefill.onnx checksum mismatch"]}
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
