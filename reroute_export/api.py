"""The Python API: plan a budget, export a model, run an artifact.

    import reroute_export as rx

    rx.plan("llava-1.5-7b", budget=128).theoretical_speedup
    rx.export("tiny-llava", budget=32, output="out/")
    rx.load_artifact("out/").generate("photo.jpg", "Describe the image.")

The CLI is a thin face over these functions (parse flags, call, print); what an export
decides (stream or load the weights, the default sample input, N and the plan from that
sample, early refusals) is decided here, so Python callers get the same behaviour and the
same one-line `UserError`s. Nothing here prints: progress goes to stderr only with
`progress=True`, notes (e.g. "streaming its weights") to the `log` callable given.

Module-level imports stay torch-free: `load_artifact` serves the runtime-only install
(numpy, Pillow, tokenizers, onnxruntime); `export` imports torch when called.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, Union

from .errors import UserError

if TYPE_CHECKING:
    import PIL.Image

    from .pipeline import ExportOptions, ExportResult
    from .inputs import ArrayInputs
    from .plan import RoutingPlan
    from .preprocess import VLInputs
    from .registry import Loaded
    from .results import TraceResult
    from .runtime.ort import OrtArtifact

Image = Union[str, Path, "PIL.Image.Image"]  # a file path or an image already open
Inputs = Union["ArrayInputs", "VLInputs"]  # processor outputs (numpy or torch)
Log = Callable[[str], None]

TARGETS = ("onnx", "trt")
PRECISIONS = ("fp32", "fp16")
RUNTIMES = ("onnxruntime", "tensorrt")


# ---------------------------------------------------------------- plan


@dataclass(frozen=True)
class PlanReport:
    """A routing plan and its static accounting, as `reroute-export plan` prints it."""

    plan: RoutingPlan
    accounting: dict[str, Any]  # plan.plan_report's: keep per stage, speedup, FLOPs, KV cache

    @property
    def keep(self) -> list[int]:
        return [s.keep for s in self.plan.stages]

    @property
    def avg_visual_tokens(self) -> float:
        return float(self.accounting["avg_visual_tokens"])

    @property
    def theoretical_speedup(self) -> float:
        return float(self.accounting["theoretical_speedup"])

    def to_json(self) -> dict[str, Any]:
        """What `reroute-export plan --json` writes."""
        return dict(self.accounting)


def plan(
    model: str,
    *,
    budget: float | None = None,
    method: str = "reroute",
    schedule: str | None = None,
    drop_layers: Sequence[int] | None = None,
    keep_ratios: Sequence[float] | None = None,
    keep: Sequence[int] | None = None,
    text_tokens: int | None = None,
) -> PlanReport:
    """Keep counts, speedup, FLOPs and KV cache for a routing budget; no weights are loaded."""
    from .plan import make_plan, plan_report
    from .registry import resolve_spec

    spec = resolve_spec(model)
    routing = make_plan(spec, method, budget=budget, schedule=schedule, drop_layers=drop_layers,
                        keep_ratios=keep_ratios, keep=keep)
    return PlanReport(routing, plan_report(spec, routing, text_tokens))


# ---------------------------------------------------------------- inputs


def as_image(image: Image) -> PIL.Image.Image:
    """A path opened as RGB (one-line errors for bad files), or an open image in RGB."""
    if isinstance(image, (str, Path)):
        from .preprocess import load_image

        return load_image(image)
    from .families.host import to_rgb

    return to_rgb(image)


def given_inputs(image: Image | None, prompt: str | None, inputs: Inputs | None,
                 prepare: Callable[[Any, str], Any]) -> Any:
    """Processor outputs as given, or (image, prompt) through `prepare`; None when neither."""
    if inputs is not None:
        if image is not None or prompt is not None:
            raise UserError("give an image and a prompt, or processor outputs (inputs), not both")
        return inputs
    if image is None and prompt is None:
        return None
    if image is None or prompt is None:
        raise UserError("an image goes with a prompt: give both")
    return prepare(as_image(image), prompt)


# ---------------------------------------------------------------- export


def export(
    model: str,
    *,
    output: str | Path,
    budget: float | None = None,
    method: str = "reroute",
    schedule: str | None = None,
    drop_layers: Sequence[int] | None = None,
    keep_ratios: Sequence[float] | None = None,
    keep: Sequence[int] | None = None,
    target: str = "onnx",
    precision: str = "fp32",
    fp32_layers: str | Sequence[int] | None = None,
    image_buckets: str | Sequence[tuple[int, int]] | None = None,
    attention: str = "auto",
    image: Image | None = None,
    prompt: str | None = None,
    inputs: Inputs | None = None,
    max_prompt_tokens: int | None = None,
    max_new_tokens: int = 256,
    inline_functions: bool = False,
    random_weights: bool = False,
    stream_weights: bool | None = None,
    device: str = "gpu-trt10",
    plugin_lib: str | None = None,
    force: bool = False,
    check: bool = True,
    progress: bool = False,
    log: Log | None = None,
) -> ExportResult:
    """Export `model` (a registered name or a checkpoint folder) with routing inside the
    decoder into the artifact folder `output`, written complete or not at all.

    The sample input (image + prompt, processor outputs, or by default the first shipped
    sample photo) fixes N (and the Qwen2.5-VL image grid) and feeds the post-export check.
    stream_weights: None reads the checkpoint tensor by tensor only when loading it would
    not fit in half the free memory (and says so through `log`); True always, False never.
    target "trt" also writes the TensorRT build plan and, where TensorRT and a GPU are
    here, builds the engines (`result.engines_built`). image_buckets (Qwen2.5-VL): more
    image sizes the artifact answers, "HxW,HxW" in pixels or (H, W) pairs; each gets its own
    vision and routing graphs (the same schedule at its N), the decoder segments are shared.
    attention: how each segment's attention updates its KV buffers, one of
    export/attention.py's FORMS (portable, ort-gqa, kv-scatter) or "auto", the target's
    default (ONNX Runtime and TensorRT 10.x: portable; TensorRT 11: kv-scatter). Returns the written manifest and
    the post-export check's failures (`result.check_failures`: empty when it passed).
    """
    from .pipeline import export_artifact
    from .plan import make_plan
    from .progress import loading_bars
    from .trace import for_inputs

    _refuse_early(output, force, target, precision, method, device, attention)  # before minutes of loading
    _check_lengths(max_prompt_tokens, max_new_tokens)
    buckets = _image_buckets(image_buckets)
    with loading_bars(progress):  # transformers' "Loading weights" bar: only when progress is asked for
        loaded = _load_for_export(model, precision, random_weights, stream_weights, log or _silent)
        sample = _export_sample(loaded, image, prompt, inputs)
        loaded = for_inputs(loaded, sample)  # N and the Qwen grid from the sample, not a default
        routing = make_plan(loaded.spec, method, budget=budget, schedule=schedule, drop_layers=drop_layers,
                            keep_ratios=keep_ratios, keep=keep)
        opts = _options(loaded, precision, fp32_layers, max_prompt_tokens, max_new_tokens, inline_functions, force,
                        check, progress, target, device, plugin_lib, buckets, attention)
        prompt_tokens = int(sample.input_ids.shape[1])
        if max_prompt_tokens is not None and max_prompt_tokens < prompt_tokens:
            raise UserError(f"--max-prompt-tokens {max_prompt_tokens} is shorter than the sample prompt "
                            f"({prompt_tokens} tokens)")
        return export_artifact(loaded, routing, sample, Path(output), opts)


def _check_lengths(max_prompt_tokens: int | None, max_new_tokens: int) -> None:
    """An artifact's bounds must each admit at least one token (refused before loading)."""
    if int(max_new_tokens) < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens}: an artifact generates at least 1 token")
    if max_prompt_tokens is not None and int(max_prompt_tokens) < 1:
        raise UserError(f"--max-prompt-tokens {max_prompt_tokens}: must be a positive number of tokens")


def _silent(message: str) -> None:
    """The default `log`: a library says nothing unless asked."""


def _refuse_early(output: str | Path, force: bool, target: str, precision: str, method: str, device: str,
                  attention: str = "auto") -> None:
    """The refusals that need no model: an output folder that could not be replaced, and
    unknown target, precision, method, TensorRT device or attention form (or one the target
    cannot run)."""
    from .export.artifact import check_output
    from .plan import METHODS

    if target not in TARGETS:
        raise UserError(f"unknown target {target!r}; use --target onnx or --target trt")
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; use {' or '.join(PRECISIONS)}")
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    check_output(Path(output), force)
    trt_version = None
    if target == "trt":
        from .build.trt import device as trt_device

        trt_version = trt_device(device)["trt_version"]
    _check_attention(attention, target, device, trt_version)


def _check_attention(attention: str, target: str, device: str, trt_version: str | None) -> None:
    from .export.attention import FORMS

    if attention != "auto" and attention not in FORMS:
        raise UserError(f"unknown attention form {attention!r}; known: auto, {', '.join(FORMS)}")
    if target != "trt":
        return
    if attention == "ort-gqa":
        raise UserError("--attention ort-gqa is ONNX Runtime's GroupQueryAttention, which TensorRT cannot parse; "
                        "use --attention portable (or kv-scatter for TensorRT 11)")
    if attention == "kv-scatter" and int(str(trt_version).split(".")[0]) < 11:
        raise UserError(f"--attention kv-scatter needs opset 24 (TensorRT 11); {device} has TensorRT {trt_version}: "
                        f"use --attention portable or --device gpu-trt11")


def _load_for_export(model: str, precision: str, random_weights: bool, stream_weights: bool | None,
                     log: Log) -> Loaded:
    """The model in memory, or on the meta device when its weights are streamed into the
    artifact (drawn for random weights, read from the checkpoint's safetensors files)."""
    from .pipeline import PRECISIONS as DTYPES
    from .registry import load

    if random_weights:
        return load(model, DTYPES[precision], "meta", random_weights=True)
    if stream_weights is None:
        size = too_big_to_load(model)
        if size:
            log(f"the checkpoint ({size / 2**30:.1f} GiB) would not fit in memory whole; "
                f"streaming its weights into the artifact one tensor at a time")
        stream_weights = bool(size)
    if stream_weights:
        return load(model, DTYPES[precision], "meta")  # weights read from the files as written
    return load(model)


def too_big_to_load(model: str) -> int:
    """The checkpoint's bytes when loading it in fp32 (x2 an fp16/bf16 checkpoint) plus an export
    copy would pass half the free memory, else 0. Also 0 for a .bin-only checkpoint, which
    cannot stream: it loads whole where it fits, and `load` refuses it in one line where not."""
    from .checkpoint_files import available_bytes
    from .registry import checkpoint_bytes, checkpoint_folder

    folder = checkpoint_folder(model)
    if folder is None or not any(folder.glob("*.safetensors")):
        return 0
    size, avail = checkpoint_bytes(model), available_bytes()
    return 0 if size is None or avail is None or size * 3 <= avail // 2 else size


def _export_sample(loaded: Loaded, image: Image | None, prompt: str | None, inputs: Inputs | None) -> VLInputs:
    """The user's sample (checked against the model), else the first shipped sample photo and prompt."""
    from .preprocess import samples
    from .trace import check_inputs

    def prepare(im: Any, text: str) -> VLInputs:
        return loaded.preprocessor([im], [text])

    given = given_inputs(image, prompt, inputs, prepare)
    if given is None:
        path, text = samples()[0]
        return prepare(as_image(path), text)
    given = given.to_torch() if hasattr(given, "to_torch") else given  # numpy ArrayInputs -> VLInputs
    if given.input_ids.shape[0] != 1:
        raise UserError("export takes one sample input (batch 1)")
    check_inputs(loaded, given)
    return given


def _options(loaded: Loaded, precision: str, fp32_layers: str | Sequence[int] | None, max_prompt_tokens: int | None,
             max_new_tokens: int, inline_functions: bool, force: bool, check: bool, progress: bool, target: str,
             device: str, plugin_lib: str | None, image_buckets: tuple[tuple[int, int], ...] = (),
             attention: str = "auto") -> ExportOptions:
    from .pipeline import ExportOptions

    return ExportOptions(precision=precision, max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_new_tokens,
                         inline_functions=inline_functions, force=force, check=check, quiet=not progress,
                         target=target, device=device, plugin_lib=plugin_lib,
                         fp32_layers=_fp32_layers(fp32_layers, precision, loaded.spec.text.num_layers),
                         image_buckets=image_buckets, attention=attention)


def _image_buckets(given: str | Sequence[tuple[int, int]] | None) -> tuple[tuple[int, int], ...]:
    """'448x448,336x672' or [(448, 448), ...] -> ((H, W), ...) in pixels."""
    if not given:
        return ()
    if not isinstance(given, str):
        return tuple((int(h), int(w)) for h, w in given)
    out = []
    for part in (p.strip() for p in given.split(",") if p.strip()):
        h, x, w = part.lower().partition("x")
        if not x or not h.isdigit() or not w.isdigit():
            raise UserError(f"--image-buckets: {part!r} is not HEIGHTxWIDTH in pixels (e.g. 448x672)")
        out.append((int(h), int(w)))
    if not out:
        raise UserError(f"--image-buckets {given!r}: no size given (HEIGHTxWIDTH in pixels, e.g. 448x672)")
    return tuple(out)


def _fp32_layers(layers: str | Sequence[int] | None, precision: str, num_layers: int) -> tuple[int, ...]:
    """'20-23' / '28-' / [20, 21] -> range-checked layer indices (fp16 exports only)."""
    if not layers:
        return ()
    if precision == "fp32":
        raise UserError("--fp32-layers is for --precision fp16 exports (an fp32 export is fp32 throughout)")
    from .rewrite.precision import parse_layers

    text = layers if isinstance(layers, str) else ",".join(str(int(i)) for i in layers)
    try:
        return tuple(parse_layers(text, num_layers))
    except ValueError as e:
        raise UserError(str(e)) from None


# ---------------------------------------------------------------- run an artifact


class Artifact:
    """An exported artifact loaded for inference: text with `generate`, the parity contract
    (decisions, last logits, greedy ids, text) with `trace`. `runner` is the OrtArtifact or
    TrtArtifact underneath, for its lower-level steps (prefill, decode_step)."""

    def __init__(self, runner: OrtArtifact) -> None:
        self.runner = runner

    @property
    def manifest(self) -> dict[str, Any]:
        return self.runner.manifest

    @property
    def plan(self) -> RoutingPlan:
        return self.runner.plan

    @property
    def family(self) -> str:
        return self.runner.family

    def inputs(self, image: Image | None = None, prompt: str | None = None,
               inputs: Inputs | None = None) -> Inputs:
        """(image, prompt) through the artifact's own tokenizer and image processor, or
        processor outputs as given."""
        got = given_inputs(image, prompt, inputs, self.runner.prepare)
        if got is None:
            raise UserError("give an image and a prompt, or processor outputs (inputs)")
        return got

    def trace(self, image: Image | None = None, prompt: str | None = None, *, inputs: Inputs | None = None,
              max_new_tokens: int = 16, on_text: Log | None = None) -> TraceResult:
        """Routing decisions, last-prompt logits and greedy tokens, as `reroute-export trace`.
        `on_text(piece)` gets the text while it is generated; the pieces joined are `.text`."""
        from .runtime.processor import TextStream

        given = self.inputs(image, prompt, inputs)
        if on_text is None:
            return self.runner.trace(given, max_new_tokens)
        stream = TextStream(self.runner.preprocessor.decode)
        result = self.runner.trace(given, max_new_tokens, on_token=lambda token: on_text(stream.push(token)))
        on_text(stream.finish())
        return result

    def generate(self, image: Image | None = None, prompt: str | None = None, *, inputs: Inputs | None = None,
                 max_new_tokens: int = 32, on_text: Log | None = None) -> str:
        """Greedy text for one image and prompt, as `reroute-export generate` (which prints it
        through `on_text` while it is generated)."""
        return self.trace(image, prompt, inputs=inputs, max_new_tokens=max_new_tokens, on_text=on_text).text


def runtime_class(name: str) -> type[OrtArtifact]:
    """The artifact runner: ONNX Runtime (CPU, or CUDA when present) or TensorRT engines."""
    if name not in RUNTIMES:
        raise UserError(f"unknown runtime {name!r}; use {' or '.join(RUNTIMES)}")
    if name == "tensorrt":
        from .runtime.trt import TrtArtifact

        return TrtArtifact
    from .runtime import OrtArtifact

    return OrtArtifact


def load_artifact(path: str | Path, runtime: str = "onnxruntime", *, verify: bool = True) -> Artifact:
    """An exported artifact folder, its manifest and checksums verified (`verify`), ready to
    run with ONNX Runtime or (`runtime="tensorrt"`) its TensorRT engines."""
    return Artifact(runtime_class(runtime).load(Path(path), verify=verify))
