"""The Python API (reroute_export.api): the CLI is a thin face over it, so the two agree.

README's example (the issue's one-liner export among its lines) runs as written in a fresh
interpreter; the artifact it writes is then run through the API and through `reroute-export generate`, which must give the same
tokens; `rx.plan` gives `plan --json`'s numbers; bad input raises `UserError` with the
CLI's one-line message.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import reroute_export as rx
from reroute_export.cli import main
from reroute_export.errors import UserError
from reroute_export.preprocess import load_image, samples

ROOT = Path(__file__).resolve().parent.parent
IMAGE, PROMPT = (str(x) for x in samples()[0])


def run_cli(capsys, *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def readme_python_example() -> str:
    """README's "Python API" block, with its shipped inputs made absolute."""
    import re

    section = (ROOT / "README.md").read_text().split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S)[1]
    return code.replace('"reroute_export/data/', f'"{ROOT}/reroute_export/data/')


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, str]:
    """README's "Python API" block, as written, in a fresh interpreter from an empty folder: it
    plans, exports tiny-llava in one line (`rx.export("tiny-llava", budget=32, output="out/")`),
    then generates and traces. (the artifact, the run, the generated text it printed)"""
    cwd = tmp_path_factory.mktemp("api")
    done = subprocess.run([sys.executable, "-c", readme_python_example()], cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.split("\n")  # plan, check, the generated text (any lines), the trace
    assert lines[1] == "True []" and lines[-2].startswith("dict_keys(") and lines[-1] == "", done.stdout
    return cwd / "out", done, "\n".join(lines[2:-2])


def test_readme_python_example_runs(example) -> None:
    out, done, text = example
    assert done.stdout.startswith("[153, 153, 76, 38] ")  # the 7B plan's K_j, no weights loaded
    assert (out / "manifest.json").is_file() and (out / "segment_0.onnx").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == "tiny-llava" and manifest["check"]["passed"]  # post-export check ran, passed
    assert text.strip(), "the generated text is printed"
    assert "[1/" not in done.stderr, "the library shows no progress unless asked (progress=True)"


def test_api_tokens_equal_cli_generate(example, capsys) -> None:
    out, _, printed = example
    code, text, _ = run_cli(capsys, "generate", "--artifact", out, "--image", IMAGE, "--prompt", PROMPT, "--json", "-")
    assert code == 0
    cli = json.loads(text)
    art = rx.load_artifact(out)
    got = art.trace(IMAGE, PROMPT, max_new_tokens=32)
    assert got.generated_ids == cli["generated_ids"] and got.decisions == cli["decisions"]
    assert got.text == cli["text"] == printed
    assert art.generate(load_image(IMAGE), PROMPT) == got.text  # an open PIL image is the same input
    assert art.generate(inputs=art.inputs(IMAGE, PROMPT)) == got.text  # processor outputs too
    pieces: list[str] = []
    assert art.generate(IMAGE, PROMPT, on_text=pieces.append) == got.text == "".join(pieces)  # streamed


def test_plan_equals_cli_plan_json(capsys) -> None:
    code, text, _ = run_cli(capsys, "plan", "--model", "llava-1.5-7b", "--budget", "128", "--json", "-")
    assert code == 0
    report = rx.plan("llava-1.5-7b", budget=128)
    assert report.to_json() == json.loads(text)
    assert report.keep == [s["keep"] for s in json.loads(text)["stages"]]
    assert abs(report.avg_visual_tokens - 128) <= 1 and report.theoretical_speedup > 1


def _existing(tmp_path: Path) -> Path:
    folder = tmp_path / "theirs"
    folder.mkdir()
    (folder / "notes.txt").write_text("not an artifact")
    return folder


# (the API call, the same request on the command line); the folder is made per test
BAD = [
    (lambda d: rx.plan("llava-9b", budget=128), ["plan", "--model", "llava-9b", "--budget", "128"]),
    (lambda d: rx.plan("llava-1.5-7b", budget=0), ["plan", "--model", "llava-1.5-7b", "--budget", "0"]),
    (lambda d: rx.plan("llava-1.5-7b", drop_layers=[3, 9], keep_ratios=[0.5]),
     ["plan", "--model", "llava-1.5-7b", "--drop-layers", "3,9", "--keep-ratios", "0.5"]),
    (lambda d: rx.export("tiny-llava", budget=32, target="tflite", output=d / "o"),
     ["export", "--model", "tiny-llava", "--budget", "32", "--target", "tflite", "--output", "{d}/o"]),
    (lambda d: rx.export("tiny-llava", budget=32, output=_existing(d)),
     ["export", "--model", "tiny-llava", "--budget", "32", "--output", "{d}/theirs"]),
    (lambda d: rx.export("tiny-llava", budget=32, output=d / "o", fp32_layers="2-3"),
     ["export", "--model", "tiny-llava", "--budget", "32", "--output", "{d}/o", "--fp32-layers", "2-3"]),
    (lambda d: rx.export("tiny-llava", budget=32, output=d / "o", image=d / "missing.jpg", prompt="x"),
     ["export", "--model", "tiny-llava", "--budget", "32", "--output", "{d}/o", "--image", "{d}/missing.jpg",
      "--prompt", "x"]),
    (lambda d: rx.load_artifact(d / "none"),
     ["generate", "--artifact", "{d}/none", "--image", IMAGE, "--prompt", "x"]),
]


@pytest.mark.parametrize("call, argv", BAD, ids=lambda x: " ".join(x[:4]) if isinstance(x, list) else "")
def test_bad_input_raises_the_cli_message(call, argv, tmp_path, capsys) -> None:
    with pytest.raises(UserError) as raised:
        call(tmp_path)
    code, _, err = run_cli(capsys, *[a.replace("{d}", str(tmp_path)) for a in argv])
    assert code == 2 and err == f"reroute-export: error: {raised.value}\n"
    assert not (tmp_path / "o").exists()


def test_api_only_errors_are_user_errors(tmp_path) -> None:
    """What the CLI's flags rule out (argparse choices, flag pairs) the API checks itself."""
    with pytest.raises(UserError, match="unknown method 'magic'"):
        rx.plan("llava-1.5-7b", budget=128, method="magic")
    with pytest.raises(UserError, match="unknown precision 'int4'"):
        rx.export("tiny-llava", budget=32, precision="int4", output=tmp_path / "o")
    with pytest.raises(UserError, match="unknown runtime 'tflite'"):
        rx.load_artifact(tmp_path, runtime="tflite")
    with pytest.raises(UserError, match="an image goes with a prompt"):
        rx.export("tiny-llava", budget=32, image=IMAGE, output=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_import_is_lazy_and_torch_free() -> None:
    """`import reroute_export` and the API's names cost no torch (the runtime install has none);
    rx.plan / rx.export are the submodules too, so module imports keep working."""
    code = ("import sys, reroute_export as rx\n"
            "names = (rx.load_artifact, rx.Artifact, rx.PlanReport, rx.UserError, rx.plan, rx.export)\n"
            "assert not {'torch', 'transformers', 'onnxruntime'} & set(sys.modules), sorted(sys.modules)\n"
            "assert rx.plan('llava-1.5-7b', budget=128).keep == [153, 153, 76, 38]\n"
            "from reroute_export.plan import make_plan\n"
            "import reroute_export.export.artifact as A\n"
            "assert callable(rx.export) and rx.export.artifact is A and 'torch' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def _imports(path: Path) -> set[str]:
    """Absolute names of the modules `path` imports (relative ones resolved in the package)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(x for x in (base, node.module) if x)
            names |= {module, *(f"{module}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return names


def test_no_library_module_imports_the_cli() -> None:
    """Imports run cli -> library only (shared printing lives in console.py)."""
    offenders = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "reroute_export").rglob("*.py"))
                 if p.name not in ("cli.py", "__main__.py") and "reroute_export.cli" in _imports(p)]
    assert offenders == []
