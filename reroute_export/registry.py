"""Model names, declared once: a name or folder -> its spec, family, HF model and preprocessor.

`--model` takes a name from graphs/ (e.g. `llava-1.5-7b`, `tiny-llava`) or a local HF
checkpoint folder whose config.json names a registered architecture (families/). Real
checkpoints load from that folder or the local HF cache only; nothing is downloaded.
Built-in-code models (tiny-*, bench-*) and --random-weights architectures are built here
by their family's builder (`build`, `build_random`).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from .errors import MissingCheckpoint, UserError
from .progress import loading_bars_shown
from .families import family_for_architecture, get_family
from .spec import GraphSpec, TextSpec, VisionSpec, known_specs, load_spec

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedModel

    from .families.base import Family
    from .preprocess import Preprocessor


def known_models() -> list[str]:
    return list(known_specs())


@dataclass
class Loaded:
    """A model ready for routing: its spec, family, HF module and preprocessor."""

    spec: GraphSpec
    family: type["Family"]
    model: "nn.Module"
    preprocessor: "Preprocessor"
    source: str | None = None  # what loads it again: a registered name or an absolute folder path
    random_weights: bool = False  # a real architecture with seeded random weights (--random-weights)
    checkpoint: Path | None = None  # the folder its weights come from (a streamed export reads them there)


# ---------------------------------------------------------------- checkpoint folders


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"{folder} is not a checkpoint folder: config.json is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None


def _check_weights(folder: Path) -> None:
    if not (list(folder.glob("*.safetensors")) or list(folder.glob("pytorch_model*.bin"))):
        raise UserError(f"{folder} has no weights (*.safetensors or pytorch_model*.bin)")


def _folder_family(folder: Path) -> type["Family"]:
    archs = _read_config(folder).get("architectures") or []
    if not archs:
        raise UserError(f"{folder}/config.json names no architecture")
    return family_for_architecture(archs[0])


def _spec_for_config(name: str, family: type["Family"], config: Any, visual_tokens: int | None) -> GraphSpec:
    """A checkpoint's spec: its own widths, schedules from the closest registered spec."""
    over = family.spec_overrides(config)
    same_family = [s for s in known_specs().values() if s.family == family.name]
    exact = [s for s in same_family if s.text.num_layers == over["text"]["num_layers"]
             and s.text.hidden_size == over["text"]["hidden_size"]]
    base = exact[0] if exact else load_spec(family.reference_spec).with_layers(over["text"]["num_layers"])
    vision = {**base.vision.__dict__, **over["vision"]}
    if visual_tokens is not None:
        vision["visual_tokens"] = visual_tokens
    return replace(base, name=name, checkpoint=None, text=TextSpec(**over["text"]), vision=VisionSpec(**vision))


def _hub_folder(spec: GraphSpec) -> Path:
    """The local HF-cache snapshot of a registered checkpoint, or a one-line error."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec.checkpoint, local_files_only=True))
    except Exception:  # noqa: BLE001  (any miss means: not available offline)
        raise MissingCheckpoint(
            f"{spec.name}: checkpoint {spec.checkpoint} is not in the local HF cache; "
            f"run `huggingface-cli download {spec.checkpoint}` on a connected machine "
            f"(or copy it here) and pass --model /path/to/folder or set HF_HOME"
        ) from None


# ---------------------------------------------------------------- resolution


def resolve_spec(model: str) -> GraphSpec:
    """The static spec of `model` without loading weights (enough for `plan`)."""
    folder = Path(model)
    if folder.is_dir():
        family = _folder_family(folder)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(folder)
        return _spec_for_config(folder.name, family, config, _folder_visual_tokens(folder, family))
    if model in known_specs():
        return load_spec(model)
    if "/" in model or model.startswith("."):
        raise UserError(f"checkpoint folder {model} does not exist")
    return load_spec(model)  # raises the unknown-model error with the known list


def _folder_visual_tokens(folder: Path, family: type["Family"]) -> int | None:
    """N as the folder's own processor makes it (its pixel bounds, crop, saved grid). The
    spec's default only when the folder has no processor to ask; a processor that cannot
    serve the model is an error, never silently replaced by a registered default."""
    from .preprocess import Preprocessor

    if not (folder / "preprocessor_config.json").is_file():
        return None
    try:
        return Preprocessor.from_pretrained(folder, family).visual_tokens
    except UserError:
        raise
    except Exception:  # noqa: BLE001  (no tokenizer files, so no Preprocessor: spec default)
        return None


# The transformers and torch this package runs on (pyproject.toml's bounds say the same; a
# test holds them equal). transformers 5.16 and older fail the Qwen2.5-VL vision rotary call;
# before 5.5 the PIL image processors need torchvision. torch 2.6's export fixes the graphs'
# free token axes to the example's length; torch 2.9's refuses a segment's T = 1 (a broadcast
# matmul's decomposition, and reshapes of transposed heads, guard the token axis `!= 1`). The
# whole suite passes on 2.7, 2.8, 2.10, 2.11 and 2.13. Checked at load: the GPU image's python
# has its own packages, and a PYTHONPATH run gets no pip check.
TRANSFORMERS_MIN = "5.17"
TORCH_MIN = "2.7"
TORCH_EXCLUDED = ("2.9",)
TORCH_RANGE = f"torch>={TORCH_MIN}" + "".join(f",!={v}.*" for v in TORCH_EXCLUDED)


def check_versions() -> None:
    """One line, not a traceback deep in a model's forward or a graph with fixed token axes,
    for a torch outside its range or a transformers too old or too new. torch first:
    transformers disables an old torch (with its own multi-line notice) when it is imported."""
    import torch
    from packaging.version import Version

    release = Version(torch.__version__).release  # 2.9.1+cu128 and 2.12.0.dev… alike
    minor = ".".join(map(str, release[:2]))
    if release < Version(TORCH_MIN).release or minor in TORCH_EXCLUDED:
        why = " (its export cannot trace the one-token decode)" if minor in TORCH_EXCLUDED else ""
        raise UserError(f"torch {torch.__version__} is installed{why}; reroute-export needs {TORCH_RANGE}: "
                        f"pip install '{TORCH_RANGE}'")
    import transformers

    found = Version(transformers.__version__)
    if not Version(TRANSFORMERS_MIN) <= found < Version("6"):
        raise UserError(f"transformers {transformers.__version__} is installed; reroute-export needs "
                        f"transformers>={TRANSFORMERS_MIN},<6: pip install 'transformers>={TRANSFORMERS_MIN},<6'")


def load(model: str, dtype: "torch.dtype | None" = None, device: "str | torch.device" = "cpu",
         random_weights: bool = False) -> Loaded:
    """Spec, family, HF model (eval mode) and preprocessor for `model`.

    random_weights: a registered real architecture (llava-1.5-7b, ...) at full size with
    seeded random weights and the offline tokenizer, built in `dtype` on `device`.
    device "meta": no parameter holds data (random weights or a checkpoint alike); the
    streamed export reads or draws each weight when it writes it.
    """
    import torch

    check_versions()
    dtype = dtype or torch.float32
    folder = Path(model)
    if random_weights:
        if folder.is_dir():
            raise UserError("--random-weights takes a registered model name (e.g. llava-1.5-7b), not a folder")
        spec = resolve_spec(model)
        net, pre = build_random(spec, dtype, device)
        return Loaded(spec, get_family(spec.family), net, pre, source=model, random_weights=True)
    if not folder.is_dir():
        spec = resolve_spec(model)
        family = get_family(spec.family)
        if spec.checkpoint is None:
            if str(device) == "meta":
                raise UserError(f"{model} is built in code with its own weights; streaming is for checkpoints "
                                f"and --random-weights")
            return _on(replace(_load_tiny(spec, family, dtype), source=model), device)
        return _on(replace(_load_folder(_hub_folder(spec), dtype, model, device), source=model), device)
    return _on(replace(_load_folder(folder, dtype, None, device), source=str(folder.resolve())), device)


def checkpoint_folder(model: str) -> Path | None:
    """The local folder `load(model)` reads weights from (None: built in code, or absent)."""
    folder = Path(model)
    if folder.is_dir():
        return folder
    spec = resolve_spec(model)
    if spec.checkpoint is None:
        return None
    try:
        return _hub_folder(spec)
    except MissingCheckpoint:
        return None


def checkpoint_bytes(model: str) -> int | None:
    """Bytes of the weight files `load(model)` would read (None: built in code, or absent)."""
    folder = checkpoint_folder(model)
    if folder is None:
        return None
    files = list(folder.glob("*.safetensors")) or list(folder.glob("pytorch_model*.bin"))
    return sum(f.stat().st_size for f in files) or None


def _on(loaded: Loaded, device: "str | torch.device") -> Loaded:
    if str(device) not in ("cpu", "meta"):
        loaded.model.to(device)
    return loaded


def _load_tiny(spec: GraphSpec, family: type["Family"], dtype: "torch.dtype") -> Loaded:
    model, pre = build(spec)  # tiny-* and bench-*: sizes from the spec, seeded weights
    return Loaded(spec, family, model.to(dtype).eval(), pre)


def _load_folder(folder: Path, dtype: "torch.dtype", name: str | None = None,
                 device: "str | torch.device" = "cpu") -> Loaded:
    import transformers

    from .checkpoint_files import check_fits, check_weight_files
    from .preprocess import Preprocessor

    family = _folder_family(folder)
    _check_weights(folder)
    check_weight_files(folder)  # a truncated file: one line naming it, not safetensors' traceback
    cls = getattr(transformers, family.model_class)
    pre = Preprocessor.from_pretrained(folder, family)  # a bad processor fails before the weights load
    if str(device) == "meta":  # the architecture only: the streamed export reads each weight from the files
        from .tiny import meta_parameters

        if not list(folder.glob("*.safetensors")):
            raise UserError(f"{folder}: streaming weights needs *.safetensors files (this folder has .bin only)")
        with meta_parameters():
            model = cls._from_config(cls.config_class.from_pretrained(folder), dtype=dtype).eval()
    else:
        check_fits(folder, dtype.itemsize, str(dtype).removeprefix("torch."))  # one line, not a silent OOM kill
        with _transformers_bars(loading_bars_shown()):
            model = cls.from_pretrained(folder, dtype=dtype).eval()
    spec = _spec_for_config(name or folder.name, family, model.config, pre.visual_tokens)
    return Loaded(spec, family, model, pre, checkpoint=folder.resolve())


@contextmanager
def _transformers_bars(show: bool) -> Iterator[None]:
    """transformers' progress bars on or off inside the block (a global switch there: restored after)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if show else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


# ---------------------------------------------------------------- built-in-code models


def build(spec: GraphSpec, seed: int = 0, attn_implementation: str = "sdpa") -> tuple[PreTrainedModel, Preprocessor]:
    """The built-in-code model a graph spec without a checkpoint describes (tiny-*, bench-*)."""
    from .tiny import Sizes

    return get_family(spec.family).tiny(seed, attn_implementation, Sizes.from_spec(spec))


def build_random(
    spec: GraphSpec, dtype: "torch.dtype", device: "str | torch.device" = "cpu", seed: int = 0,
    attn_implementation: str = "sdpa",
) -> tuple[PreTrainedModel, Preprocessor]:
    """`--random-weights`: a registered real architecture (e.g. llava-1.5-7b) at full size with
    seeded random weights, built directly in `dtype` on `device` (no fp32 copy: 7B in fp16 is
    14 GB, not 28). device "meta" allocates no parameter: the streaming export draws each
    one later, a tensor at a time, with `tiny.random_tensor`. A registered checkpoint's
    architecture is its published config.json (`published.build`), the offline byte-level
    tokenizer's token ids put in; a built-in-code spec (tiny-*, bench-*) keeps its own builder."""
    import torch

    from . import published
    from .tiny import Sizes, Where

    where = Where(dtype, torch.device(device))
    if spec.checkpoint is not None:
        return published.build(spec, seed, attn_implementation, where)
    sizes = replace(Sizes.from_spec(spec), vocab_size=spec.text.vocab_size)
    return get_family(spec.family).tiny(seed, attn_implementation, sizes, where)


def parameter_count(spec: GraphSpec) -> int:
    """Parameters of the model `spec` names, built on the meta device (no memory; tied ones once)."""
    import torch

    model, _ = build_random(spec, torch.float32, "meta")
    return sum(p.numel() for p in model.parameters())  # parameters() yields a shared tensor once
