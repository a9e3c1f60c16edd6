"""The CLI contract: `plan` and `trace` outputs, checkpoint folders, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny
from reroute_export.cli import main
from reroute_export.preprocess import load_image, samples

SAMPLE, PROMPT = samples()[0]


def run_cli(*args: str, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def trace_json(tmp_path: Path, *args: str, capsys, name: str = "t.json") -> dict:
    out = tmp_path / name
    code, _, err = run_cli("trace", *args, "--json", out, capsys=capsys)
    assert code == 0, err
    return json.loads(out.read_text())


def test_plan_json(tmp_path, capsys) -> None:
    out = tmp_path / "plan.json"
    code, text, _ = run_cli("plan", "--model", "llava-1.5-7b", "--budget", "128", "--json", out, capsys=capsys)
    assert code == 0
    report = json.loads(out.read_text())
    assert abs(report["avg_visual_tokens"] - 128) <= 1
    assert report["stages"] == [{"layer": 2, "layers": [2, 6], "keep": 153, "ratio": report["stages"][0]["ratio"]},
                                *report["stages"][1:]]
    assert "avg visual tokens per layer: 127.84" in text
    assert "theoretical prefill speedup" in text and "KV cache" in text


@pytest.mark.parametrize("family_model", ["tiny-llava", "tiny-qwen2.5-vl"])
def test_trace_json_contract_and_npy_inputs(family_model, tmp_path, capsys) -> None:
    common = ["--model", family_model, "--method", "reroute", "--budget", "24", "--max-new-tokens", "16"]
    by_image = trace_json(tmp_path, *common, "--image", SAMPLE, "--prompt", PROMPT, capsys=capsys)
    assert set(by_image) >= {"decisions", "last_logits", "generated_ids"}
    assert len(by_image["generated_ids"]) == 16
    for layer, kept in by_image["decisions"].items():
        assert kept == sorted(kept) and all(0 <= j < 64 for j in kept)
    # the same inputs as processor-output arrays
    fam = family_model.removeprefix("tiny-")
    inputs = tiny(fam).preprocessor([load_image(SAMPLE)], [PROMPT])
    np.save(tmp_path / "ids.npy", inputs.input_ids.numpy())
    np.save(tmp_path / "pv.npy", inputs.pixel_values.numpy())
    extra = []
    if inputs.image_grid_thw is not None:
        np.save(tmp_path / "thw.npy", inputs.image_grid_thw.numpy())
        extra = ["--image-grid-thw", tmp_path / "thw.npy"]
    by_npy = trace_json(tmp_path, *common, "--input-ids", tmp_path / "ids.npy", "--pixel-values",
                        tmp_path / "pv.npy", *extra, capsys=capsys, name="n.json")
    assert by_npy["decisions"] == by_image["decisions"]
    assert by_npy["generated_ids"] == by_image["generated_ids"]
    assert np.allclose(by_npy["last_logits"], by_image["last_logits"], atol=1e-6)


@pytest.mark.parametrize("family", ["llava", "qwen2.5-vl"])
def test_checkpoint_folder_equals_registered_tiny(family, tmp_path, capsys) -> None:
    from reroute_export.tiny import save_checkpoint

    m = tiny(family)
    folder = tmp_path / f"ckpt-{family}"
    save_checkpoint(m.model, m.preprocessor, folder)
    args = ["--method", "pdrop", "--budget", "24", "--image", SAMPLE, "--prompt", PROMPT]
    a = trace_json(tmp_path, "--model", m.spec.name, *args, capsys=capsys, name="a.json")
    b = trace_json(tmp_path, "--model", folder, *args, capsys=capsys, name="b.json")
    assert a["decisions"] == b["decisions"] and a["generated_ids"] == b["generated_ids"]
    assert np.abs(np.array(a["last_logits"]) - np.array(b["last_logits"])).max() < 1e-4
    code, text, _ = run_cli("plan", "--model", folder, "--budget", "24", capsys=capsys)
    assert code == 0 and "N=64" in text


def test_trace_human_output(capsys) -> None:
    code, text, _ = run_cli("trace", "--model", "tiny-llava", "--budget", "32", "--image", SAMPLE,
                            "--prompt", PROMPT, "--max-new-tokens", "4", capsys=capsys)
    assert code == 0
    assert "re-entered" in text and "generated:" in text


@pytest.mark.parametrize(
    "args,message",
    [
        (["plan", "--model", "llava-9b", "--budget", "128"], "unknown model 'llava-9b'; known: "),
        (["plan", "--model", "llava-1.5-7b", "--budget", "0"], "valid budgets are 1..575"),
        (["plan", "--model", "llava-1.5-7b", "--budget", "128", "--drop-layers", "3,3"], "strictly increasing"),
        (["plan", "--model", "llava-1.5-7b", "--drop-layers", "3,9", "--keep-ratios", "0.5"], "1 keep ratios for 2"),
        (["trace", "--model", "tiny-llava", "--budget", "32", "--image", "README.md", "--prompt", "x"], "not an image"),
        (["trace", "--model", "tiny-llava", "--budget", "32"], "give --image FILE --prompt TEXT"),
        (["trace", "--model", "llava-1.5-7b", "--budget", "32", "--image", "x.png", "--prompt", "x"],
         "not in the local HF cache"),
        (["trace", "--model", "./no/such/folder", "--budget", "32"], "does not exist"),
        (["--model", "llava-1.5-7b", "--budget", "128", "--target", "trt"], "not in the local HF cache"),  # the brief's line
    ],
)
def test_bad_input_is_one_line(args, message, capsys, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-home" / "hub"))
    before = set(Path.cwd().iterdir())
    code, _, err = run_cli(*args, capsys=capsys)
    assert code == 2
    assert message in err and err.count("\n") == 1, err
    assert set(Path.cwd().iterdir()) == before


def test_folder_without_config_or_weights(tmp_path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli("plan", "--model", tmp_path / "empty", "--budget", "8", capsys=capsys)
    assert code == 2 and "config.json is missing" in err
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    code, _, err = run_cli("plan", "--model", odd, "--budget", "8", capsys=capsys)
    assert code == 2 and "unsupported architecture BertModel" in err


@pytest.mark.parametrize("argv,folder", [
    ("--model llava-1.5-7b --budget 128 --target trt", "llava-1.5-7b-reroute-b128-trt"),
    ("--model tiny-llava --budget 32", "tiny-llava-reroute-b32"),
    ("--model tiny-qwen2.5-vl --budget 12.5 --method pdrop --precision fp16", "tiny-qwen2.5-vl-pdrop-b12.5-fp16"),
    ("--model tiny-llava --method none", "tiny-llava-none"),
    ("--model llava-hf/llava-1.5-7b-hf/ --drop-layers 2,8 --keep 64,32", "llava-1.5-7b-hf-reroute"),
])
def test_an_export_without_output_writes_a_folder_named_from_the_job(argv, folder) -> None:
    from reroute_export.cli import default_output, parse

    assert default_output(parse(argv.split())) == folder


def test_console_script_version() -> None:
    out = subprocess.run([sys.executable, "-m", "reroute_export", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("reroute-export ")


def _cli_process(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    import os

    return subprocess.Popen([sys.executable, "-m", "reroute_export", *args], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_models_says_which_checkpoints_are_here(tmp_path) -> None:
    """`models` looks each checkpoint up in the local HF cache (offline, as `load` does): one
    laid out the way huggingface_hub caches it is found, the others are "not found" with one
    line saying how to provide them; built-in models need none."""
    hub = tmp_path / "hub"
    repo = hub / "models--llava-hf--llava-1.5-7b-hf"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    env = {"HF_HOME": str(tmp_path), "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    out, err = _cli_process("models", "--json", "-", env=env).communicate(timeout=300)
    listed = {m["name"]: m for m in json.loads(out)["models"]}
    assert listed["llava-1.5-7b"]["local_folder"] == str(snapshot)
    assert listed["qwen2.5-vl-3b"]["local_folder"] is None and listed["tiny-llava"]["local_folder"] is None
    out, err = _cli_process("models", env=env).communicate(timeout=300)
    rows = {line.split()[0]: line.split()[-1] for line in out.splitlines() if line.strip()[:1].isalnum()}
    assert rows["llava-1.5-7b"] == "cache" and rows["qwen2.5-vl-7b"] == "found" and rows["tiny-llava"] == "-"
    assert "--random-weights runs any of them without one" in out and not err


def test_a_reader_that_stops_early_ends_the_command_quietly() -> None:
    """`reroute-export models --json - | head -1`: the closed pipe stops the command with the
    SIGPIPE status (141) and no traceback."""
    proc = _cli_process("models", "--json", "-")
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 141 and err == ""
