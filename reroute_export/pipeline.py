"""The conductor: load -> plan -> rewrite -> export -> build -> check, written into an
artifact folder atomically. It sits above every stage it runs (tests/test_imports.py).

Everything goes into a temporary sibling folder (ArtifactWriter); the post-export check
runs ONNX Runtime on the graphs in that folder against the eager fp32 reference; only
then is manifest.json written and the folder moved into place.
"""

from __future__ import annotations

import copy
import datetime as dt
import platform
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from . import __version__
from . import contract as C
from .check.loop import compare_runtimes
from .check.tolerances import tolerances
from .checkpoint_files import available_bytes
from .contract import Manifest
from .errors import UserError
from .export.artifact import ArtifactWriter
from .export.decoder import DecoderExample, export_decoder
from .export.stream import WeightStream, check_streamed, checkpoint_source, is_streamed, random_source
from .plan import RoutingPlan
from .progress import Steps
from .registry import Loaded
from .rewrite.precision import keep_layers_fp32
from .spec import spec_to_dict
from .export.attention import FORMS

PRECISIONS = dict(zip(C.PRECISIONS, (torch.float32, torch.float16)))  # export precision -> torch dtype


@dataclass(frozen=True)
class ExportOptions:
    precision: str = "fp32"
    max_prompt_tokens: int | None = None  # default: N + 512 text tokens
    max_new_tokens: int = 256
    inline_functions: bool = False
    force: bool = False
    check: bool = True
    check_tokens: int = 16
    quiet: bool = False
    target: str = "onnx"  # onnx | trt
    device: str = "gpu-trt10"  # a name from data/trt_devices.json (e.g. jetson-orin)
    plugin_lib: str | None = None
    fp32_layers: tuple[int, ...] = ()  # fp16 exports: decoder layers kept in fp32 (overflow fallback)
    image_buckets: tuple[tuple[int, int], ...] = ()  # Qwen2.5-VL: more image sizes (H, W) in pixels
    attention: str = "auto"  # export/attention.py FORMS, or auto: the target's default form

    @property
    def attention_form(self) -> str:
        from .export.attention import default_form

        if self.attention != "auto":
            return self.attention
        trt_version = None
        if self.target == "trt":
            from .build.trt import device

            trt_version = device(self.device)["trt_version"]
        return default_form(self.target, trt_version)


@dataclass
class ExportResult:
    path: Path
    manifest: Manifest
    check_failures: list[str]

    @property
    def engines_built(self) -> bool:
        return bool(self.manifest.get("trt", {}).get("built"))


def example_for(loaded: Loaded, inputs: Any, dtype: torch.dtype) -> DecoderExample:
    """Prefill example inputs from a real sample (batch 1), in the export dtype (a streamed
    model has no weights to embed with: zeros of the same shape, only shapes matter)."""
    if is_streamed(loaded.model):
        embeds = torch.zeros(1, inputs.input_ids.shape[1], loaded.spec.text.hidden_size, dtype=dtype)
    else:
        with torch.no_grad():
            embeds = loaded.family.embed(loaded.model, inputs).to(dtype)  # (1, L, D)
    positions = loaded.family.positions(loaded.model, inputs)
    ids = inputs.input_ids[0]
    start = (ids == loaded.family.image_token_id(loaded.model)).nonzero()[0]  # (1,)
    return DecoderExample(embeds, positions, start, int((ids == loaded.family.image_token_id(loaded.model)).sum()))


def bucket_plans(loaded: Loaded, plan: RoutingPlan, inputs: Any, opts: ExportOptions) -> list[dict[str, Any]]:
    """The artifact's image sizes: the sample's (bucket 0, `plan`) and each --image-buckets
    size with the same schedule at its own N (`RoutingPlan.for_visual_tokens`)."""
    grid = tuple(int(x) for x in inputs.image_grid_thw[0]) if inputs.image_grid_thw is not None else None
    if not opts.image_buckets:
        return [{"grid": grid, "plan": plan}]
    if grid is None:
        raise UserError(f"--image-buckets: {loaded.family.name} takes one image size "
                        f"({loaded.spec.vision.image_size} px); buckets are for Qwen2.5-VL")
    patch, merge = loaded.preprocessor.image_processor.patch_size, loaded.preprocessor.image_processor.merge_size
    out = [{"grid": grid, "plan": plan}]
    for size in opts.image_buckets:
        loaded.family.check_image_size(loaded.preprocessor, tuple(size))
        g = (1, size[0] // patch, size[1] // patch)
        if any(b["grid"] == g for b in out):
            continue  # the sample's own size, or given twice
        out.append({"grid": g, "plan": plan.for_visual_tokens(g[1] * g[2] // merge ** 2)})
    return out


def shapes(loaded: Loaded, plan: RoutingPlan, opts: ExportOptions, buckets: list[dict[str, Any]] | None = None
           ) -> dict[str, Any]:
    """Graph bounds: the prompt's text budget is the same for every bucket, so the longest
    prompt (and each segment's KV buffer) is the largest bucket's."""
    t = loaded.spec.text
    text = (opts.max_prompt_tokens or plan.visual_tokens + 512) - plan.visual_tokens
    plans = [b["plan"] for b in buckets] if buckets else [plan]
    max_prompt = text + max(p.visual_tokens for p in plans)
    cache = [max(col) for col in zip(*(p.cache_tokens(text + p.visual_tokens, opts.max_new_tokens) for p in plans))]
    return {
        "max_prompt_tokens": max_prompt, "max_new_tokens": opts.max_new_tokens,
        "visual_tokens": plan.visual_tokens, "hidden_size": t.hidden_size, "num_layers": t.num_layers,
        "num_kv_heads": t.num_kv_heads, "head_dim": t.head_dim,
        "vocab_size": int(loaded.model.get_input_embeddings().num_embeddings),
        "visual_rows_per_layer": plan.keep_per_layer(),  # layer i's KV after prefill: the text rows + these
        "cache_tokens": cache,  # each segment's fixed KV buffer
        "max_text_tokens": text,
    }


def versions() -> dict[str, str]:
    import onnxruntime
    import transformers

    return {"reroute-export": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def _write_graphs(loaded: Loaded, plan: RoutingPlan, inputs: Any, folder: Path, opts: ExportOptions,
                  steps: Steps) -> tuple[Manifest, WeightStream | None]:
    from .export.vision import export_vision

    dtype = PRECISIONS[opts.precision]
    # An fp16 copy only when the model is not in the export dtype already (meta copies are free).
    same = next(loaded.model.parameters()).dtype == dtype
    model = loaded.model if same and not opts.fp32_layers else copy.deepcopy(loaded.model).to(dtype)
    if opts.fp32_layers and dtype != torch.float32:
        keep_layers_fp32(model, loaded.family, opts.fp32_layers)
    stream = _stream_for(loaded, model, steps)
    buckets = bucket_plans(loaded, plan, inputs, opts)
    grid = buckets[0]["grid"]
    sh = shapes(loaded, plan, opts, buckets)
    with steps.step("vision graph" if len(buckets) == 1 else f"vision graph ({len(buckets)} image sizes)"):
        tables = export_vision(model, loaded.family, folder / C.VISION, example_pixel_values=inputs.pixel_values,
                               grids=[b["grid"] for b in buckets], dtype=dtype, stream=stream)
    example = example_for(loaded, inputs, dtype)
    form = opts.attention_form
    extra = [(k, b["plan"]) for k, b in enumerate(buckets[1:], start=1)]
    with steps.step(f"decoder graphs: {len(plan.stages) + 1} segments, {len(plan.stages)} heads, "
                    f"{len(plan.stages) * len(buckets)} routing graphs"):
        decoder_files = export_decoder(model, loaded.family, plan, example, sh["max_prompt_tokens"],
                                       sh["cache_tokens"], folder, inline=opts.inline_functions, stream=stream,
                                       on_graph=lambda role, i, n: steps.note(f"graph {i}/{n}: {role}"), buckets=extra,
                                       attention=form)
    with steps.step("embeddings and preprocessor"):
        if stream is not None:
            embed = model.get_input_embeddings().weight
            stream.write_table(next(n for n, p in model.named_parameters() if p is embed), folder / C.EMBEDDINGS)
        else:
            table = model.get_input_embeddings().weight.detach().to(dtype).numpy()  # (V, D)
            np.save(folder / C.EMBEDDINGS, table)
        loaded.preprocessor.save_pretrained(folder / C.PREPROCESSOR,
                                            buckets=[_pixels(loaded, b["grid"]) for b in buckets[1:]])
        if tables[0]:  # each bucket's vision tables, fed beside its pixels (contract.VISION_TABLES)
            np.savez(folder / C.PREPROCESSOR / C.VISION_GRIDS,
                     **{f"b{k}.{name}": a for k, tab in enumerate(tables) for name, a in tab.items()})
    vision_cfg = getattr(loaded.model.config, "vision_config", None)
    return {
        "model": loaded.spec.name, "model_source": loaded.source, "family": loaded.family.name, "plan": plan.to_dict(),
        "spec": spec_to_dict(loaded.spec),  # what the plan was made on: plan flags are checked against it
        "random_weights": loaded.random_weights, "weights_written": "streamed" if stream is not None else "in memory",
        "precision": opts.precision, "opset": FORMS[form].opset, "ir_version": FORMS[form].ir_version,
        "inline_functions": opts.inline_functions, "shapes": sh,
        "fp32_layers": list(opts.fp32_layers) if opts.precision != "fp32" else [],
        "graphs": {C.vision(): C.VISION, **decoder_files},
        "decoder": {"segments": [[r.start, r.stop] for r in plan.segments], "cache_tokens": sh["cache_tokens"],
                    "attention": form},
        "image_grid_thw": list(grid) if grid else None,
        "buckets": [{"grid": list(b["grid"]), "image_size": _pixels(loaded, b["grid"]), "plan": b["plan"].to_dict(),
                     "max_prompt_tokens": sh["max_text_tokens"] + b["plan"].visual_tokens,
                     "vision_inputs": {C.PIXEL_VALUES: [int(np.prod(b["grid"])), int(inputs.pixel_values.shape[1])],
                                       **{n: list(a.shape) for n, a in tab.items()}}}
                    for b, tab in zip(buckets, tables)] if len(buckets) > 1 else [],
        "spatial_merge_size": getattr(vision_cfg, "spatial_merge_size", None),
        "image_token_id": loaded.family.image_token_id(loaded.model),
        "eos_token_id": getattr(loaded.preprocessor.tokenizer, "eos_token_id", None),
        "versions": versions(), "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }, stream


def _pixels(loaded: Loaded, grid: tuple[int, int, int]) -> list[int]:
    patch = loaded.preprocessor.image_processor.patch_size
    return [grid[1] * patch, grid[2] * patch]


def _stream_for(loaded: Loaded, model: torch.nn.Module, steps: Steps) -> WeightStream | None:
    """A weight stream when the model's parameters are data-free: drawn (--random-weights)
    or read from the checkpoint's safetensors files; a progress note every GiB."""
    if not is_streamed(model):
        return None
    done = [0, 0]

    def tick(name: str, nbytes: int) -> None:
        done[0] += nbytes
        if done[0] - done[1] >= 1 << 30:
            done[1] = done[0]
            steps.note(f"weights streamed: {done[0] / 2**30:.1f} GiB")

    if loaded.random_weights:
        source = random_source(model)
    elif loaded.checkpoint is not None:
        source = checkpoint_source(loaded.checkpoint, model, loaded.family.checkpoint_renames)
    else:
        raise ValueError("a data-free model needs --random-weights or a checkpoint folder")
    return WeightStream(model, source, on_tensor=tick)


def reference_for_check(loaded: Loaded) -> tuple[Loaded | None, str | None]:
    """The eager fp32 reference of the post-export check: the loaded model itself, or for a
    streamed export (random weights or a checkpoint read tensor by tensor) the same weights
    loaded whole on the CPU, by transformers' own loader for a checkpoint, when the
    reference and the ONNX Runtime sessions fit in half the available memory."""
    if not is_streamed(loaded.model):
        return loaded, None
    from .registry import load

    params = sum(p.numel() for p in loaded.model.parameters())  # tied ones once
    need = params * (4 + 2)  # fp32 reference + the ONNX Runtime sessions (each weight once) at 2 bytes
    avail = available_bytes()
    if avail is not None and need > avail // 2:
        return None, (f"skipped: the check needs ~{need / 2**30:.0f} GiB (fp32 reference + ONNX Runtime "
                      f"sessions), {avail / 2**30:.0f} GiB available; run `reroute-export parity --artifact "
                      f"DIR` on a machine with more memory")
    ref = load(loaded.source or loaded.spec.name, torch.float32, "cpu", random_weights=loaded.random_weights)
    return replace(loaded, model=ref.model), None


def post_export_check(loaded: Loaded, plan: RoutingPlan, inputs: Any, folder: Path, manifest: Manifest,
                      opts: ExportOptions) -> tuple[dict[str, Any], list[str]]:
    """Run the artifact (ONNX Runtime) and the eager fp32 reference on the same input: the
    trace contract and the prefill KV's finiteness (the vision graph is `parity`'s to judge)."""
    from .runtime import OrtArtifact
    from .runtime.eager import EagerRuntime

    tol = tolerances(loaded.family.name, opts.precision)
    art = OrtArtifact.load(folder, verify=False)
    tokens = min(opts.check_tokens, opts.max_new_tokens)  # an artifact decodes at most its max_new_tokens
    (judged,) = compare_runtimes(EagerRuntime(loaded, plan), art, [("sample", inputs)], tokens, tol,
                                 vision=False)
    bad = judged.failures
    return {"metrics": judged.metrics, "tolerances": tol, "passed": not bad, "failures": bad}, bad


def artifact_bytes(loaded: Loaded, opts: ExportOptions) -> int:
    """At least what the export writes: every weight once at the export precision (each
    decoder weight lives in one segment or head graph, shared by prefill and decode)."""
    params = sum(p.numel() for p in loaded.model.parameters())  # tied ones once
    return params * PRECISIONS[opts.precision].itemsize


def export_artifact(loaded: Loaded, plan: RoutingPlan, inputs: Any, output: Path, opts: ExportOptions) -> ExportResult:
    if opts.precision not in PRECISIONS:
        raise ValueError(f"precision {opts.precision}")
    steps = Steps(3 + opts.check + (opts.target == "trt") + is_streamed(loaded.model), quiet=opts.quiet,
                  title="export")
    try:
        with ArtifactWriter(Path(output), force=opts.force, expected_bytes=artifact_bytes(loaded, opts)) as writer:
            manifest, stream = _write_graphs(loaded, plan, inputs, writer.path, opts, steps)
            writer.write_manifest(manifest)  # the runtime reads it during the check
            bad: list[str] = []
            if stream is not None:
                with steps.step("streamed weights: onnx.checker, weights read back"):
                    manifest["stream_check"] = check_streamed(writer.path, manifest["graphs"], stream)
            if opts.check:
                with steps.step("parity check (ONNX Runtime vs eager fp32)"):
                    reference, why = reference_for_check(loaded)
                    if reference is None:
                        manifest["check"] = {"passed": None, "skipped": why}
                    else:
                        manifest["check"], bad = post_export_check(reference, plan, inputs, writer.path, manifest,
                                                                   opts)
            if opts.target == "trt":
                with steps.step("TensorRT build plan / engines"):
                    manifest["trt"] = tensorrt_stage(writer.path, manifest, opts)
            writer.write_manifest(manifest)
    finally:
        steps.close()
    return ExportResult(Path(output), manifest, bad)


def tensorrt_stage(folder: Path, manifest: Manifest, opts: ExportOptions) -> dict[str, Any]:
    """Always the build plan and script; engines too where TensorRT and the target GPU are here."""
    from .build import trt

    plan = trt.build_plan(folder, manifest, opts.device, opts.plugin_lib)
    trt.write_build_files(folder, plan)
    can, why = trt.tensorrt_status()
    if opts.device.startswith("jetson"):
        can, why = False, f"engines for {opts.device} must be built on the device (engines are not portable)"
    record = {"device": opts.device, "trt_version": plan["trt_version"], "build_plan": "build_plan.json",
              "build_script": "build_trt.sh", "memory": plan["memory"], "warnings": plan.get("warnings", [])}
    if not can:
        return {**record, "built": False, "reason": why}
    return {**record, **trt.build_engines(folder, plan)}  # "built" True, or False with "reason"/"error"
