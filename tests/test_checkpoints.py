"""Checkpoint folders as users bring them, built in code, each exported and traced.

The matrix: both families; a Qwen2.5-VL processor whose pixel bounds are not the
registered default (the fixed grid and N come from the checkpoint's own processor, or
from the given processor arrays); tied and untied embeddings; safetensors shards and a
single `pytorch_model.bin`; in-memory and streamed exports. Each folder is exported
with plan flags by the bare command form (`reroute-export --model DIR ...`, the in-memory
ones with the post-export check), then `trace --model DIR` (eager) and `trace --artifact A` (ONNX
Runtime) with the same flags must agree: decisions identical, last logits within 1e-4,
greedy tokens identical. The folders look like hub downloads: HF files only, none of
our own settings.

LLaVA and non-square images: CLIP's position embeddings form a fixed square grid.
`CLIPVisionEmbeddings` can interpolate them (bicubic, non-square too) but only when
asked, and `LlavaForConditionalGeneration` never asks, so the HF reference itself
refuses any other size ("Input image size (H*W) doesn't match model"). A checkpoint
whose processor crops to a non-square (or other-sized) image is therefore refused in
one line when it is loaded (`test_llava_crop_must_be_clips_square`).

Four exports, shared by every test here (about 2 minutes on 2 CPU cores).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from reroute_export import tiny
from reroute_export.cli import main
from reroute_export import contract as C
from reroute_export.families import get_family
from reroute_export.families.llava import Llava
from reroute_export.families.qwen2_5_vl import TINY_IMAGE_SIZE
from reroute_export.preprocess import SETTINGS_FILE, Preprocessor, load_image, sample_path

pytestmark = pytest.mark.slow

PLAN = ["--method", "reroute", "--drop-layers", "2,4,5", "--keep-ratios", "0.5,0.25,0.125"]
IMAGE, PROMPT = sample_path("astronaut.jpg"), "Describe the image."
WIDE_IMAGE = sample_path("chelsea.jpg")  # 3:2, for a dynamic (non-square) Qwen grid
TOKENS = 4


@dataclass(frozen=True)
class Case:
    family: str
    sizes: tiny.Sizes
    tied: bool
    weights: str  # "shards" (several *.safetensors + index) or "bin" (one pytorch_model.bin)
    visual_tokens: int  # N the checkpoint's own processor gives an image
    bounds: tuple[int, int] | None = None  # Qwen: preprocessor_config size {shortest_edge, longest_edge}
    stream: bool = False  # export with --stream-weights (read tensor by tensor)
    dynamic: bool = False  # export from processor arrays of HF's aspect-keeping resize (non-square grid)


CASES = {
    # 84 px CLIP: N = 36, not the 576 of the llava-1.5-7b spec a 6-layer checkpoint inherits from
    "llava-84px-tied-shards-streamed": Case("llava", tiny.Sizes(image_size=84, text_layers=6), True, "shards",
                                            36, stream=True),
    "llava-untied-bin": Case("llava", tiny.Sizes(), False, "bin", 64),
    # the processor: exactly 224x224 = 50176 px -> grid 1x16x16 -> 64 tokens (7B spec: 576)
    "qwen-50176px-tied-bin": Case("qwen2.5-vl", tiny.Sizes(image_size=224, text_layers=6), True, "bin", 64,
                                  bounds=(50176, 50176)),
    # at most 28224 px: fixed square 168x168 -> 36 tokens; the export's arrays come from HF's
    # dynamic resize of a 3:2 photo instead -> grid 1x8x14 -> 28 tokens, and they win
    "qwen-28224px-untied-shards-streamed": Case("qwen2.5-vl", tiny.Sizes(image_size=TINY_IMAGE_SIZE), False, "shards", 36,
                                                bounds=(3136, 28224), stream=True, dynamic=True),
}
INPUTS = [(name, kind) for name, case in CASES.items()
          for kind in (("arrays", "image-via-artifact") if case.dynamic else ("image", "arrays"))]


# ---------------------------------------------------------------- building checkpoint folders


def tie_embeddings(model: torch.nn.Module) -> None:
    """What a tied checkpoint's config says, and its lm_head shares the token embeddings."""
    model.config.tie_word_embeddings = True
    model.config.get_text_config().tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.get_input_embeddings().weight


def to_single_bin(folder: Path) -> None:
    """Replace the safetensors (hub key layout, as transformers wrote it) by one pytorch_model.bin."""
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
        file.unlink()
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    torch.save(state, folder / "pytorch_model.bin")


def set_bounds(folder: Path, bounds: tuple[int, int]) -> None:
    path = folder / "preprocessor_config.json"
    config = json.loads(path.read_text())
    config["size"] = {"shortest_edge": bounds[0], "longest_edge": bounds[1]}
    path.write_text(json.dumps(config, indent=2))


def build_checkpoint(case: Case, folder: Path) -> Path:
    build = get_family(case.family).tiny
    model, pre = build(seed=1, sizes=case.sizes)
    if case.tied:
        tie_embeddings(model)
    model.save_pretrained(folder, max_shard_size="200KB" if case.weights == "shards" else "50GB")
    pre.save_pretrained(folder)
    (folder / SETTINGS_FILE).unlink()  # a hub folder: HF files only
    if case.bounds:
        set_bounds(folder, case.bounds)
    if case.weights == "bin":
        to_single_bin(folder)
    shards = list(folder.glob("*.safetensors"))
    assert len(shards) > 1 if case.weights == "shards" else not shards and (folder / "pytorch_model.bin").is_file()
    return folder


def save_arrays(pre: Preprocessor, image: Path, folder: Path) -> list[str]:
    """The processor's outputs for one image + prompt as .npy, and the trace flags that pass them."""
    inputs = pre([load_image(image)], [PROMPT])
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "ids.npy", inputs.input_ids.numpy())
    np.save(folder / "pv.npy", inputs.pixel_values.numpy())
    flags = ["--input-ids", folder / "ids.npy", "--pixel-values", folder / "pv.npy"]
    if inputs.image_grid_thw is not None:
        np.save(folder / "thw.npy", inputs.image_grid_thw.numpy())
        flags += ["--image-grid-thw", folder / "thw.npy"]
    return [str(f) for f in flags]


@dataclass
class Exported:
    folder: Path  # the checkpoint
    artifact: Path
    arrays: list[str]  # trace flags of the processor arrays the cases compare on


class Built(dict):
    """Every case's checkpoint folder and artifact, built on first use and shared."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, name: str) -> Exported:
        self[name] = make(name, CASES[name], self.root / name)
        return self[name]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return Built(tmp_path_factory.mktemp("checkpoints"))


def make(name: str, case: Case, root: Path) -> Exported:
    folder = build_checkpoint(case, root / "checkpoint")  # named like the issue's: not a registered model
    if case.dynamic:  # HF's own aspect-keeping resize, under the folder's bounds
        pre = Preprocessor.from_pretrained(folder, get_family(case.family), image_size=None)
        arrays = save_arrays(pre, WIDE_IMAGE, root / "arrays")
        sample = arrays
    else:
        arrays = save_arrays(Preprocessor.from_pretrained(folder, get_family(case.family)), IMAGE, root / "arrays")
        sample = ["--image", str(IMAGE), "--prompt", PROMPT]
    artifact = root / "artifact"
    # the bare command form (no `export`), as the README's main job; the in-memory exports keep
    # the post-export check (eager from the folder vs the artifact)
    args = ["--model", str(folder), *PLAN, *sample, "--output", str(artifact), "--max-new-tokens",
            str(TOKENS), "--max-prompt-tokens", "160", "--quiet"]
    assert main(args + (["--stream-weights", "--no-check"] if case.stream else [])) == 0, name
    return Exported(folder, artifact, arrays)


def trace(tmp_path: Path, name: str, *args: str, flags: list[str] = PLAN) -> dict:
    out = tmp_path / f"{name}.json"
    assert main(["trace", *map(str, args), *flags, "--max-new-tokens", str(TOKENS), "--json", str(out),
                 "--quiet"]) == 0
    return json.loads(out.read_text())


def error_line(capsys: pytest.CaptureFixture) -> str:
    """The one error line on stderr (transformers' progress bars aside), and no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.split("\n") if line.strip() and "\r" not in line]  # bars redraw with \r
    assert len(lines) == 1 and lines[0].startswith("reroute-export: error: ") and "Traceback" not in err, err
    return lines[0]


def assert_same(ref: dict, got: dict) -> None:
    assert got["decisions"] == ref["decisions"]
    diff = np.abs(np.array(got["last_logits"]) - np.array(ref["last_logits"])).max()
    assert diff <= 1e-4, diff
    assert got["generated_ids"] == ref["generated_ids"] and len(ref["generated_ids"]) == TOKENS


# ---------------------------------------------------------------- the matrix


@pytest.mark.parametrize("name,kind", INPUTS, ids=[f"{n}-{k}" for n, k in INPUTS])
def test_eager_checkpoint_equals_its_artifact(name: str, kind: str, built, tmp_path: Path) -> None:
    b = built[name]
    if kind == "image":
        inputs = ["--image", str(IMAGE), "--prompt", PROMPT]
        ref = trace(tmp_path, "ref", "--model", b.folder, *inputs)
        got = trace(tmp_path, "art", "--artifact", b.artifact, *inputs)
    elif kind == "arrays":
        ref = trace(tmp_path, "ref", "--model", b.folder, *b.arrays)
        got = trace(tmp_path, "art", "--artifact", b.artifact, *b.arrays)
    else:  # the artifact's own preprocessor must give the grid it was exported for
        pre = Preprocessor.from_pretrained(b.artifact / C.PREPROCESSOR, get_family(CASES[name].family))
        ref = trace(tmp_path, "ref", "--model", b.folder, *save_arrays(pre, WIDE_IMAGE, tmp_path / "own"))
        got = trace(tmp_path, "art", "--artifact", b.artifact, "--image", WIDE_IMAGE, "--prompt", PROMPT)
    assert_same(ref, got)


@pytest.mark.parametrize("name", list(CASES))
def test_geometry_comes_from_the_checkpoint(name: str, built, tmp_path: Path) -> None:
    """N (and the Qwen grid) are the checkpoint's processor's, or the given arrays', never a
    registered spec's default; `plan --model DIR` agrees with the checkpoint's processor."""
    case, b = CASES[name], built[name]
    manifest = json.loads((b.artifact / C.MANIFEST).read_text())
    n = 28 if case.dynamic else case.visual_tokens
    assert manifest["plan"]["visual_tokens"] == n
    assert [s["keep"] for s in manifest["plan"]["stages"]] == [n // 2, n // 4, n // 8]
    if case.family == "qwen2.5-vl":
        side = round(case.visual_tokens ** 0.5) * 2  # patches per side of the fixed square
        assert manifest["image_grid_thw"] == ([1, 8, 14] if case.dynamic else [1, side, side])
    assert manifest["weights_written"] == ("streamed" if case.stream else "in memory")
    assert manifest["model_source"] == str(b.folder.resolve())
    assert manifest.get("check", {}).get("passed") is (None if case.stream else True)
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", str(b.folder), "--budget", "8", "--json", str(out), "--quiet"]) == 0
    assert json.loads(out.read_text())["visual_tokens"] == case.visual_tokens


# ---------------------------------------------------------------- plan flags against the artifact's record


@pytest.mark.parametrize("flags,message", [
    (["--drop-layers", "2,4,5", "--keep-ratios", "0.5,0.25,0.25"],
     "--keep-ratios 0.5,0.25,0.25 asks K=[32, 16, 16] at layers [2, 4, 5]"),
    (["--drop-layers", "1,4,5", "--keep-ratios", "0.5,0.25,0.125"],
     "--drop-layers 1,4,5 asks K=[32, 16, 8] at layers [1, 4, 5]"),
    (["--drop-layers", "2,4,5", "--keep", "32,16,9"], "--keep 32,16,9 asks K=[32, 16, 9] at layers [2, 4, 5]"),
    (["--budget", "16"], "--budget 16 asks K="),
    (["--method", "pdrop", "--budget", "16"], "--method pdrop asks for pdrop"),
])
def test_plan_flags_are_checked_against_the_artifacts_record(flags, message, built, capsys) -> None:
    """The artifact's model ('checkpoint') is registered nowhere: its manifest's spec decides."""
    b = built["qwen-50176px-tied-bin"]
    run = ["trace", "--artifact", str(b.artifact), *b.arrays, "--max-new-tokens", "1", "--quiet"]
    assert main(run + PLAN) == 0
    assert main(run + ["--drop-layers", "2,4,5", "--keep", "32,16,8"]) == 0  # the same K, given as counts
    assert main(run + flags) == 2
    err = error_line(capsys)
    assert message in err and "the artifact was exported for reroute keeping 32,16,8 of 64 at layers 2,4,5" in err


def test_an_artifact_without_a_recorded_spec(built, tmp_path: Path, capsys) -> None:
    """Older manifests record no spec: an unregistered model's plan flags cannot be checked (one line)."""
    b = built["qwen-50176px-tied-bin"]
    old = tmp_path / "old"
    shutil.copytree(b.artifact, old)
    manifest = json.loads((old / C.MANIFEST).read_text())
    del manifest["spec"]
    (old / C.MANIFEST).write_text(json.dumps(manifest))
    assert main(["trace", "--artifact", str(old), *b.arrays, *PLAN, "--max-new-tokens", "1"]) == 2
    err = error_line(capsys)
    assert "records no spec" in err and "'checkpoint' is not registered" in err


# ---------------------------------------------------------------- what such folders cannot do


def test_llava_crop_must_be_clips_square(tmp_path: Path, capsys) -> None:
    folder = build_checkpoint(CASES["llava-untied-bin"], tmp_path / "checkpoint")
    config = json.loads((folder / "preprocessor_config.json").read_text())
    config["crop_size"] = {"height": 112, "width": 140}
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    capsys.readouterr()  # transformers' progress bars while saving
    for args in (["plan", "--budget", "16"], ["trace", *PLAN, "--image", IMAGE, "--prompt", PROMPT],
                 ["export", *PLAN, "--output", tmp_path / "art"]):
        assert main([args[0], "--model", str(folder), *map(str, args[1:])]) == 2
        assert "crop_size gives 112x140, but LLaVA's CLIP tower takes only 112x112" in error_line(capsys)
    assert not (tmp_path / "art").exists()
    # why: the HF model itself (the reference) refuses anything but its square
    model = Llava.tiny()[0]
    with pytest.raises(ValueError, match="doesn't match model"):
        model.model.get_image_features(torch.zeros(1, 3, 112, 140), vision_feature_layer=-2,
                                       vision_feature_select_strategy="default")


def test_arrays_that_do_not_fit_the_model_are_one_line(built, tmp_path: Path, capsys) -> None:
    """Processor arrays define N and the grid, but they must agree with each other and the model."""
    qwen, llava = built["qwen-50176px-tied-bin"], built["llava-untied-bin"]
    np.save(tmp_path / "thw.npy", np.array([[1, 16, 20]]))  # pixel rows are for 1x16x16
    np.save(tmp_path / "pv.npy", np.zeros((1, 3, 112, 140), dtype=np.float32))  # CLIP takes 112x112
    for model, arrays, message in [
        (qwen.folder, [*qwen.arrays[:4], "--image-grid-thw", tmp_path / "thw.npy"],
         "the grid [[1, 16, 20]] makes [320, 1176]"),
        (llava.folder, [*llava.arrays[:2], "--pixel-values", tmp_path / "pv.npy"],
         "this model's CLIP tower takes [1, 3, 112, 112]"),
    ]:
        assert main(["trace", "--model", str(model), *PLAN, *map(str, arrays)]) == 2
        assert message in error_line(capsys)


def test_streaming_a_bin_checkpoint_is_refused(built, tmp_path: Path, capsys) -> None:
    b = built["llava-untied-bin"]
    assert main(["export", "--model", str(b.folder), "--stream-weights", *PLAN, "--output",
                 str(tmp_path / "art")]) == 2
    assert "needs *.safetensors files" in error_line(capsys)
    assert not (tmp_path / "art").exists()


def test_transformers_loading_bar_shows_in_the_cli_unless_quiet_and_never_from_the_library(built, capsys) -> None:
    """A checkpoint load draws transformers' "Loading weights" bar on stderr: the CLI lets it
    show (minutes for a 7B), --quiet and the library (which prints nothing unless asked) do not."""
    from reroute_export import registry

    folder = built[next(iter(CASES))].folder
    args = ["trace", "--model", str(folder), *PLAN, "--image", str(IMAGE), "--prompt", PROMPT, "--max-new-tokens", "1"]
    assert main(args) == 0
    assert "Loading weights" in capsys.readouterr().err
    assert main([*args, "--quiet"]) == 0
    assert "Loading weights" not in capsys.readouterr().err
    registry.load(str(folder))
    assert capsys.readouterr().err == ""
