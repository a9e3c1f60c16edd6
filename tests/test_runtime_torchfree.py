"""Running an artifact needs numpy, Pillow, tokenizers and onnxruntime only.

1. The artifact's own numpy/PIL/tokenizers preprocessor (runtime/processor.py) gives what
   the transformers one (preprocess.Preprocessor) gives: the same ids, bit-equal pixels,
   grids, masks and decoded text, for both families, on the shipped photos and on images
   that take the odd branches (alpha, palette transparency, grey, smaller than the crop).
2. Importing the runtime imports no torch or transformers (a cheap guard for everyone).
3. The documented install, in a fresh venv: `pip install --no-deps` the wheel, then the
   `[runtime]` extra's packages (read from pyproject.toml); torch and transformers cannot be
   imported there, `reroute-export generate/trace --artifact` on artifacts exported here
   give the full install's tokens, and a torch-needing command says so in one line.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from conftest import FAMILIES, build_wheel, tiny_artifact
from reroute_export import contract as C
from reroute_export.families import get_family
from reroute_export.preprocess import Preprocessor, load_image, samples
from reroute_export.runtime import OrtArtifact
from reroute_export.runtime.processor import ArtifactProcessor

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = samples()
FIELDS = ("input_ids", "pixel_values", "attention_mask", "image_grid_thw", "mm_token_type_ids")
TOKENS = 8


def _odd_images() -> dict[str, PIL.Image.Image]:
    """Images through the processors' rarer branches, built from a shipped photo."""
    photo = load_image(SAMPLES[0][0])
    rgba = photo.convert("RGBA")
    rgba.putalpha(PIL.Image.linear_gradient("L").resize(photo.size))  # alpha -> composited on white
    palette = photo.convert("P", palette=PIL.Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 3  # one palette entry transparent
    return {"rgba": rgba, "palette": palette, "grey": photo.convert("L"),
            "small": photo.resize((40, 30)),  # under the crop: zero-padded
            "wide": photo.crop((0, 0, photo.width, photo.height // 3))}


def _processors(family: str) -> tuple[Preprocessor, ArtifactProcessor]:
    folder = tiny_artifact(family) / C.PREPROCESSOR
    return Preprocessor.from_pretrained(folder, get_family(family)), ArtifactProcessor.load(folder, family)


def _assert_same(ref, got, what: str) -> None:
    for name in FIELDS:
        a, b = getattr(ref, name), getattr(got, name)
        assert (a is None) == (b is None), f"{what}: {name}"
        if a is None:
            continue
        a = a.numpy()
        assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {name} {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        print(f"{what}: {name} {list(a.shape)} max|diff| {diff.max():.3g} mean {diff.mean():.3g}")
        np.testing.assert_array_equal(b, a, err_msg=f"{what}: {name}")


@pytest.mark.parametrize("family", FAMILIES)
def test_processor_matches_preprocessor(family: str) -> None:
    ref, got = _processors(family)
    assert got.image_token_id == ref.image_token_id and got.render("hi") == ref.render("hi")
    cases = {p.name: (load_image(p), q) for p, q in SAMPLES}
    cases.update({name: (image, SAMPLES[0][1]) for name, image in _odd_images().items()})
    for name, (image, prompt) in cases.items():
        _assert_same(ref([image], [prompt]), got(image, prompt), f"{family} {name}")
    vocab = got.tokenizer.get_vocab_size()
    ids = list(range(0, vocab, 3)) + [ref.image_token_id, ref.tokenizer.eos_token_id or 0]
    assert got.decode(ids) == ref.decode(ids)  # special tokens skipped the same way
    assert got.decode(np.array(ids)) == got.decode(ids)


def test_host_steps_match_transformers() -> None:
    """The size rules and the crop on the inputs no shipped config reaches (padding crops,
    {shortest, longest} edges, far-off aspect ratios), against transformers' own functions."""
    from transformers.image_transforms import center_crop, get_resize_output_image_size, get_size_with_aspect_ratio
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    from reroute_export.families import host
    from reroute_export.families.qwen2_5_vl import smart_resize

    rng = np.random.default_rng(0)
    for h, w in [(30, 40), (41, 17), (224, 224), (7, 500), (333, 111)]:
        chw = rng.integers(0, 256, (3, h, w), dtype=np.uint8)  # (3, H, W)
        for crop in [(32, 32), (50, 20), (9, 61)]:
            np.testing.assert_array_equal(host.center_crop(chw, *crop), center_crop(chw, crop))
        for edge in (16, 112, 224):
            assert host.shortest_edge_size(h, w, edge) == get_resize_output_image_size(
                chw, edge, default_to_square=False, input_data_format="channels_first")
            assert host.aspect_size(h, w, edge, 300) == get_size_with_aspect_ratio((h, w), edge, 300)
        for lo, hi in [(3136, 451584), (56 * 56, 28 * 28 * 1280), (100_000, 200_000)]:
            assert smart_resize(h * 4, w * 4, 28, lo, hi) == hf_smart_resize(h * 4, w * 4, 28, lo, hi)


def test_runtime_imports_no_torch() -> None:
    code = ("import sys, reroute_export.runtime, reroute_export.preprocess, reroute_export.registry, "
            "reroute_export.families as f; f.families();"
            "bad = [m for m in ('torch', 'transformers', 'onnx') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]


# ---------------------------------------------------------------- the runtime install, in a fresh venv

def runtime_requirements() -> list[str]:
    """The `[runtime]` extra: what README's torch-free install puts beside the wheel."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["optional-dependencies"]["runtime"]


def _run(argv: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory) -> Path:
    """A fresh venv holding the wheel (no deps) and the [runtime] packages, nothing else."""
    work = tmp_path_factory.mktemp("torchfree")
    start = time.monotonic()
    wheel = build_wheel(work)
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q"]
    for step in ([*pip, "--no-deps", str(wheel)], [*pip, *runtime_requirements()]):  # README's two lines
        out = _run(step, work)
        assert out.returncode == 0, out.stderr[-3000:]
    print(f"runtime venv: wheel built and installed with {runtime_requirements()} in "
          f"{time.monotonic() - start:.1f} s")
    return venv


@pytest.mark.slow
def test_runtime_venv_has_no_torch(runtime_venv: Path, tmp_path: Path) -> None:
    python = str(runtime_venv / "bin" / "python")
    for module in ("torch", "transformers", "onnx"):
        out = _run([python, "-c", f"import {module}"], tmp_path)
        assert out.returncode != 0 and "ModuleNotFoundError" in out.stderr, module
    out = _run([python, "-c", "import reroute_export; print(reroute_export.__file__)"], tmp_path)
    assert Path(out.stdout.strip()).is_relative_to(runtime_venv), out.stdout + out.stderr  # the wheel's


def _import_seconds(python: str, cwd: Path) -> float:
    """Cumulative import time of reroute_export.runtime (python -X importtime), in seconds."""
    out = _run([python, "-X", "importtime", "-c", "import reroute_export.runtime"], cwd)
    assert out.returncode == 0, out.stderr[-2000:]
    (line,) = [ln for ln in out.stderr.splitlines() if re.search(r"\|\s*reroute_export\.runtime$", ln)]
    return int(line.split("|")[1]) / 1e6


def _full_install_ids(artifact: Path, family: str, image: Path, prompt: str) -> tuple[list[int], dict]:
    """What the full install ran before: transformers' Preprocessor feeding OrtArtifact."""
    art = OrtArtifact.load(artifact)
    inputs = Preprocessor.from_pretrained(artifact / C.PREPROCESSOR, get_family(family))([load_image(image)], [prompt])
    result = art.trace(inputs, TOKENS)
    return result.generated_ids, result.decisions


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_without_torch_gives_the_full_install_tokens(runtime_venv: Path, family: str,
                                                              tmp_path: Path) -> None:
    artifact = tiny_artifact(family)  # exported here, with the full install
    image, prompt = SAMPLES[1]
    want_ids, want_decisions = _full_install_ids(artifact, family, image, prompt)
    cli = str(runtime_venv / "bin" / "reroute-export")
    argv = ["--artifact", str(artifact), "--image", str(image), "--prompt", prompt,
            "--max-new-tokens", str(TOKENS), "--json", "-"]
    start = time.monotonic()
    out = _run([cli, "generate", *argv], tmp_path)
    seconds = time.monotonic() - start
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout)
    assert got["generated_ids"] == want_ids and got["decisions"] == want_decisions
    traced = _run([cli, "trace", *argv], tmp_path)
    assert traced.returncode == 0, traced.stderr[-3000:]
    assert json.loads(traced.stdout)["generated_ids"] == want_ids
    here = _import_seconds(sys.executable, tmp_path)
    there = _import_seconds(str(runtime_venv / "bin" / "python"), tmp_path)
    print(f"{family}: torch-free `generate` {seconds:.2f} s wall, tokens {got['generated_ids']} = full install's; "
          f"import reroute_export.runtime {there:.3f} s (runtime venv) vs {here:.3f} s (this venv)")


@pytest.mark.slow
@pytest.mark.parametrize("argv", [["export", "--model", "tiny-llava", "--output", "out"],
                                  ["--model", "tiny-llava", "--budget", "32", "--output", "out"],
                                  ["calibrate", "--help"], ["trace", "--model", "tiny-llava", "--image", "x.jpg",
                                                            "--prompt", "hi"]])
def test_torch_commands_say_they_need_the_full_install(runtime_venv: Path, argv: list[str],
                                                       tmp_path: Path) -> None:
    out = _run([str(runtime_venv / "bin" / "reroute-export"), *argv], tmp_path)
    command = "export" if argv[0].startswith("--") else argv[0]
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"reroute-export: error: `{command}` needs the full install "
                                               f"(torch, transformers): pip install reroute-export"]


def test_runtime_extra_lists_only_runtime_packages() -> None:
    names = {re.split(r"[<>=\[ ;]", r, maxsplit=1)[0].lower() for r in runtime_requirements()}
    assert names == {"numpy", "pillow", "tokenizers", "onnxruntime"}
