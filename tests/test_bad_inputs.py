"""Bad input on the export/artifact side: one line, a non-zero exit, nothing created or changed.

(Model names, budgets, schedules and images are covered in test_cli.py.) Also: an export
interrupted by Ctrl-C or killed outright leaves the previous artifact intact and no
partial folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_artifact
from reroute_export.cli import main
from reroute_export import contract as C
from reroute_export.preprocess import samples

IMAGE, PROMPT = str(samples()[0][0]), samples()[0][1]


def tree(folder: Path) -> dict[str, str]:
    """Every file under folder (hidden ones too) -> sha256: 'nothing changed' means equal trees."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(capsys, args: list, code: int = 2) -> str:
    got = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert got == code, err
    assert err.count("\n") == 1 and err.startswith("reroute-export: error: "), err
    return err


@pytest.fixture()
def art_copy(tmp_path) -> Path:
    out = tmp_path / "art"
    shutil.copytree(tiny_artifact("llava"), out)
    return out


def test_existing_output_needs_force(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    before = tree(tmp_path)
    err = one_line_error(capsys, ["--model", "tiny-llava", "--budget", "32", "--target", "onnx", "--output", out])
    assert "exists; pass --force" in err
    err = one_line_error(capsys, ["--model", "tiny-llava", "--budget", "32", "--target", "onnx", "--output", out,
                                  "--force"])
    assert "not a reroute-export artifact" in err  # --force never deletes what we did not write
    assert tree(tmp_path) == before


def test_the_default_output_folder_is_refused_like_a_given_one(tmp_path, capsys, monkeypatch) -> None:
    """Without --output the export writes MODEL-METHOD-bBUDGET/ in the working folder; one that
    exists is refused (nothing written) as `--output` would be."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-llava-reroute-b32").mkdir()
    before = tree(tmp_path)
    err = one_line_error(capsys, ["--model", "tiny-llava", "--budget", "32", "--target", "onnx"])
    assert "output folder tiny-llava-reroute-b32 exists; pass --force" in err, err
    assert tree(tmp_path) == before


@pytest.mark.parametrize("args,message", [
    (["--budget", "64"], "valid budgets are 1..63"),
    (["--budget", "0"], "valid budgets are 1..63"),
    (["--drop-layers", "5,2", "--keep-ratios", "0.5,0.25"], "strictly increasing"),
    (["--drop-layers", "2,9", "--keep-ratios", "0.5,0.25"], "out of range"),
    (["--drop-layers", "2,5", "--keep-ratios", "0.5"], "keep ratios for 2"),
    (["--drop-layers", "2,5", "--keep-ratios", "0.5,1.5"], "(0, 1]"),
    (["--budget", "32", "--target", "tflite"], "unknown target 'tflite'"),
    (["--budget", "32", "--target", "trt", "--device", "jetson-tx1"], "unknown device 'jetson-tx1'"),
    (["--budget", "32", "--image", "README.md", "--prompt", "x"], "not an image"),
    (["--budget", "32", "--max-new-tokens", "0"], "generates at least 1 token"),
    (["--budget", "32", "--max-prompt-tokens", "-1"], "must be a positive number of tokens"),
    (["--budget", "32", "--image-buckets", ","], "no size given"),
])
def test_bad_export_arguments_write_nothing(args, message, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    out = tmp_path / "out"
    err = one_line_error(capsys, ["--model", "tiny-llava", *args, "--output", out])
    assert message in err, err
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [["--max-new-tokens", "0"], ["--max-prompt-tokens", "0"], ["--image-buckets", ","]])
def test_bounds_that_admit_no_token_are_refused_before_loading(args, tmp_path, capsys, monkeypatch) -> None:
    """A 7B checkpoint takes minutes to load: an artifact bound of 0 tokens (which used to be
    written, then fail its own post-export check) is refused before any loading."""
    import reroute_export.api as api

    def no_loading(*a, **k):
        raise AssertionError("loaded a model before refusing the arguments")

    monkeypatch.setattr(api, "_load_for_export", no_loading)
    err = one_line_error(capsys, ["--model", "llava-1.5-7b", "--random-weights", "--budget", "128", *args,
                                  "--output", tmp_path / "out"])
    assert args[0] in err, err
    assert list(tmp_path.iterdir()) == []


def test_corrupt_image_is_refused(tmp_path, capsys) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(Path(IMAGE).read_bytes()[:300])  # a truncated JPEG
    before = tree(tmp_path)
    err = one_line_error(capsys, ["trace", "--model", "tiny-llava", "--budget", "32", "--image", bad,
                                  "--prompt", "x"])
    assert "broken.jpg" in err
    assert tree(tmp_path) == before


def test_prompt_longer_than_the_artifact_is_refused(tmp_path, capsys) -> None:
    art = tiny_artifact("llava")
    limit = json.loads((art / C.MANIFEST).read_text())["shapes"]["max_prompt_tokens"]
    err = one_line_error(capsys, ["generate", "--artifact", art, "--image", IMAGE, "--prompt", "word " * limit])
    assert f"this artifact takes at most {limit}" in err


def test_artifact_with_a_missing_file(art_copy, capsys) -> None:
    (art_copy / C.file_of(C.segment(1))).unlink()
    before = tree(art_copy)
    err = one_line_error(capsys, ["generate", "--artifact", art_copy, "--image", IMAGE, "--prompt", PROMPT])
    assert f"{C.file_of(C.segment(1))} is missing" in err
    assert tree(art_copy) == before


def test_artifact_with_a_checksum_mismatch(art_copy, capsys) -> None:
    with open(art_copy / C.EMBEDDINGS, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x01\x02\x03")
    err = one_line_error(capsys, ["parity", "--artifact", art_copy])
    assert f"{C.EMBEDDINGS} checksum mismatch" in err


def test_artifact_from_an_incompatible_version(art_copy, capsys) -> None:
    manifest = json.loads((art_copy / C.MANIFEST).read_text())
    manifest["format"] = "reroute-export/0"
    (art_copy / C.MANIFEST).write_text(json.dumps(manifest))
    err = one_line_error(capsys, ["trace", "--artifact", art_copy, "--image", IMAGE, "--prompt", PROMPT])
    assert "incompatible version of reroute-export" in err and "re-export" in err


def test_not_an_artifact(tmp_path, capsys) -> None:
    err = one_line_error(capsys, ["generate", "--artifact", tmp_path, "--image", IMAGE, "--prompt", PROMPT])
    assert "manifest.json is missing" in err


# ---------------------------------------------------------------- interrupted exports


def _default_sigint() -> None:
    """In the child before exec: SIGINT back to its default action. A shell without job
    control starts `cmd &` with SIGINT ignored, pytest's workers and their children inherit
    that, and Python then installs no KeyboardInterrupt handler (a backgrounded suite is what
    made the ctrl-c case fail in two full runs); a terminal's Ctrl-C reaches a process whose
    SIGINT is at its default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _export_process(out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "reroute_export", "--model", "tiny-llava", "--budget", "32", "--target", "onnx",
           "--output", str(out), "--force", "--no-check"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)


def _wait_for_partial(out: Path, proc: subprocess.Popen, timeout: float = 240) -> Path:
    """Block until the exporter has written its first graph into its temporary sibling."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        partial = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")]
        if partial and (partial[0] / C.VISION).exists():
            return partial[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("export never started writing")


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "kill"])
def test_interrupted_export_keeps_the_previous_artifact(how: str, tmp_path) -> None:
    out = tmp_path / "artifact"
    shutil.copytree(tiny_artifact("llava"), out)
    before = tree(tmp_path)
    proc = _export_process(out)
    partial = _wait_for_partial(out, proc)
    proc.send_signal({"ctrl-c": signal.SIGINT, "sigterm": signal.SIGTERM, "kill": signal.SIGKILL}[how])
    _, err = proc.communicate(timeout=120)
    assert tree(out) == {k.split("/", 1)[1]: v for k, v in before.items() if k.startswith("artifact/")}
    if how != "kill":  # SIGTERM unwinds like Ctrl-C: one line, the temporary folder and lock removed
        code, said = (130, "reroute-export: interrupted\n") if how == "ctrl-c" else \
            (143, "reroute-export: terminated (SIGTERM)\n")
        assert proc.returncode == code and err.endswith(said), err
        assert not partial.exists()  # cleaned up on the way out
        assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"] and tree(tmp_path) == before
    else:
        assert proc.returncode == -signal.SIGKILL  # nothing could run: the next writer cleans up
        from reroute_export.export.artifact import cleanup_stale

        cleanup_stale(out)
        assert not partial.exists() and tree(tmp_path) == before


# ---------------------------------------------------------------- inputs once accepted silently


@pytest.mark.parametrize("args,message", [
    (["plan", "--model", "tiny-llava", "--budget", "abc"], "argument --budget: expected a number, got 'abc'"),
    (["--model", "tiny-llava", "--budget", "abc", "--output", "x"], "argument --budget: expected a number, got 'abc'"),
    (["trace", "--model", "tiny-llava", "--max-new-tokens", "ten"],
     "argument --max-new-tokens: expected an integer, got 'ten'"),
    (["plan", "--model", "tiny-llava", "--method", "magic"], "argument --method: invalid choice: 'magic'"),
    (["lint"], "the following arguments are required: target"),
])
def test_argument_errors_are_one_line_without_usage(args, message, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main(args)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"reroute-export: error: {message}"), err


def test_a_folder_as_image(tmp_path, capsys) -> None:
    err = one_line_error(capsys, ["trace", "--model", "tiny-llava", "--budget", "32", "--image", tmp_path,
                                  "--prompt", "x"])
    assert f"--image {tmp_path} is a folder, not an image file" in err


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that declares width x height (signature + IHDR + IEND): enough for Pillow to open it."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def test_a_huge_image_that_cannot_decode_small_is_named_with_its_size(tmp_path, capsys) -> None:
    png = _png_header(tmp_path / "huge.png", 15000, 12000)
    err = one_line_error(capsys, ["trace", "--model", "tiny-llava", "--budget", "32", "--image", png,
                                  "--prompt", "x"])
    assert f"image {png} is 15000x12000 (180.0 MP): above the 89.5 MP this decodes" in err
    assert "PNG cannot be decoded at reduced scale" in err


@pytest.mark.parametrize("size,decoded", [((12000, 9000), (3000, 2250)), ((15000, 12000), (1875, 1500))])
def test_big_jpegs_decode_at_reduced_scale_without_warnings(size, decoded, tmp_path) -> None:
    """Pillow warned (12000x9000) or refused as "corrupt" (15000x12000); the models resize to <= 672 px."""
    import warnings

    import PIL.Image

    from reroute_export.preprocess import load_image

    path = tmp_path / "big.jpg"
    PIL.Image.new("L", size, 128).save(path, quality=50)  # flat grey: ~0.2 s, small file
    limit = PIL.Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DecompressionBombWarning fails the test
        image = load_image(path)
    assert image.size == decoded and image.mode == "RGB"
    assert PIL.Image.MAX_IMAGE_PIXELS == limit  # Pillow's own limit is back for everyone else


def test_a_jpeg_too_big_even_at_one_eighth(tmp_path, monkeypatch) -> None:
    import PIL.Image

    from reroute_export import preprocess
    from reroute_export.errors import UserError

    path = tmp_path / "big.jpg"
    PIL.Image.new("L", (4000, 3000), 128).save(path)
    monkeypatch.setattr(preprocess, "DRAFT_SIDE", 64)  # so 1/8 is as far as the draft goes, as for a 40k px JPEG
    monkeypatch.setattr(preprocess, "MAX_DECODED_PIXELS", 100_000)  # 1/8 scale gives 500x375 = 187,500 px
    with pytest.raises(UserError, match=r"is 4000x3000 \(12.0 MP\): even at 1/8 scale 0.2 MP, above the 0.1 MP"):
        preprocess.load_image(path)


def test_eager_trace_past_the_model_positions_is_refused(capsys) -> None:
    from reroute_export.tiny import MAX_POSITIONS

    err = one_line_error(capsys, ["trace", "--model", "tiny-llava", "--budget", "32", "--image", IMAGE,
                                  "--prompt", "word " * MAX_POSITIONS])
    assert f"tiny-llava has {MAX_POSITIONS} (max_position_embeddings)" in err and "--max-new-tokens 16" in err


# ---------------------------------------------------------------- lint verifies an artifact first


@pytest.mark.parametrize("damage,message", [
    ("no manifest", "manifest.json is missing"),
    ("broken manifest", "manifest.json is unreadable"),
    ("changed byte", f"{C.file_of(C.segment(1))} checksum mismatch"),
])
def test_lint_refuses_what_every_other_command_refuses(damage, message, art_copy, capsys) -> None:
    if damage == "no manifest":
        (art_copy / C.MANIFEST).unlink()
    elif damage == "broken manifest":
        (art_copy / C.MANIFEST).write_text('{"format": "reroute-export/')
    else:
        with open(art_copy / C.file_of(C.segment(1)), "r+b") as f:
            f.seek(200)
            byte = f.read(1)
            f.seek(200)
            f.write(bytes([byte[0] ^ 1]))
    err = one_line_error(capsys, ["lint", art_copy])
    assert message in err, err
    assert main(["lint", str(art_copy / C.VISION), "--quiet"]) == 0  # a bare .onnx file stays lintable


def test_a_transformers_outside_the_supported_range_is_one_line_before_loading(capsys, monkeypatch, tmp_path) -> None:
    """transformers 5.16 and older fail deep in the Qwen2.5-VL vision forward (and before 5.5
    the PIL processors need torchvision): `load` says which range it needs, in one line. The
    range is pyproject.toml's, and the suite's own transformers is inside it."""
    import tomllib

    import transformers
    from reroute_export.registry import TRANSFORMERS_MIN, check_versions

    deps = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    assert f"transformers>={TRANSFORMERS_MIN},<6" in deps["dependencies"]
    check_versions()
    for old in ("5.16.1", "5.0.0", "6.0.0"):
        monkeypatch.setattr(transformers, "__version__", old)
        err = one_line_error(capsys, ["trace", "--model", "tiny-llava", "--budget", "32"])
        assert f"transformers {old} is installed; reroute-export needs transformers>={TRANSFORMERS_MIN},<6" in err
    err = one_line_error(capsys, ["--model", "tiny-llava", "--budget", "32", "--output", tmp_path / "out"])
    assert "transformers 6.0.0 is installed" in err and list(tmp_path.iterdir()) == []


def test_a_torch_outside_the_supported_range_is_one_line_before_loading(capsys, monkeypatch, tmp_path) -> None:
    """torch 2.6's export fixes the graphs' free token axes to the example's length (segment
    inputs `[1, '82', 64]`, not `[1, 'tokens', 64]`), and torch 2.9's refuses a segment's
    T = 1 (`guard ... size()[1] != 1`), so an export on either gives a wrong artifact or
    none: `load` refuses them in one line. pyproject's range is the same, and the suite's
    own torch (a local +cpu build) passes."""
    import tomllib

    import torch
    from reroute_export.registry import TORCH_RANGE, check_versions

    deps = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    assert TORCH_RANGE == "torch>=2.7,!=2.9.*" and TORCH_RANGE in deps["dependencies"]
    check_versions()
    for ok in ("2.7.0+cu126", "2.8.0", "2.10.0+cpu", "2.11.0+cu130", "2.13.0+cpu", "2.15.0.dev20270101"):
        monkeypatch.setattr(torch, "__version__", ok)
        check_versions()
    for bad in ("2.6.0+cu124", "2.9.1+cu128", "2.9.0", "1.13.1"):
        monkeypatch.setattr(torch, "__version__", bad)
        err = one_line_error(capsys, ["trace", "--model", "tiny-llava", "--budget", "32"])
        assert f"torch {bad} is installed" in err and "reroute-export needs torch>=2.7,!=2.9.*" in err
        assert ("cannot trace the one-token decode" in err) == bad.startswith("2.9")
    err = one_line_error(capsys, ["--model", "tiny-llava", "--budget", "32", "--output", tmp_path / "out"])
    assert "torch 1.13.1 is installed" in err and list(tmp_path.iterdir()) == []


def test_a_missing_submodule_of_an_installed_package_is_not_called_a_missing_install() -> None:
    """'needs the full install' is for a runtime-only install; a full install whose transformers
    lacks a submodule (another version) must not be told to install what it has."""
    from reroute_export.full_install import needs_full_install

    assert not needs_full_install(ModuleNotFoundError("no", name="transformers.models.not_a_model"))
