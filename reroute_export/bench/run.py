"""`run_bench`: one record per (method, backend); see the package docstring for what is measured."""

from __future__ import annotations

import contextlib
import gc
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from ..check.loop import Observed
from ..errors import UserError
from ..runtime import ARTIFACT_BACKENDS, BACKENDS, TORCH_BACKENDS
from ..runtime.base import Greedy, Run, Runtime, greedy, trace_of
from .config import (DEFAULT_BACKENDS, DEFAULT_METHODS, DEFAULT_PRECISIONS, DTYPES, EXPORTED, PRECISIONS, QUANTIZE,
                     BenchConfig, check_config)
from .floors import artifact_weight_bytes, floor_fields, torch_weight_bytes
from .floors import measure as measure_floors
from .memory import rss_mb, working_memory_mb
from .report import add_measured_speedup, agreement
from .timing import Samples, timed_pass
from .traffic import kv_traffic

if TYPE_CHECKING:
    from ..progress import Steps
    from ..registry import Loaded

# Words appended to the sample prompt until the prompt has the spec's text-token count
# (LLaVA-1.5 benchmarks use ~40 text tokens around the 576 image tokens).
_FILLER = ("Describe the image in detail: the main objects, their colours, where they are, "
           "what is happening, and anything unusual you notice in the background of the picture.").split()


class _Skip(Exception):
    """A backend that cannot run here; the message is the records' status."""


@dataclass
class _Bound:
    """One (method, backend) ready to measure, and what its record says about the setup."""

    runtime: Runtime
    run: Run
    weights_rss_mb: float | None = None  # None: shared by every record of the backend (the torch model)
    extra: dict[str, Any] = field(default_factory=dict)
    layout: Any = None  # runtime/segmented.Layout: the fixed KV buffers (None: the eager engine's own cache)


@dataclass
class _Measured:
    samples: Samples
    memory_pass: Greedy  # the untimed pass's tokens, margins and decisions
    weights_rss_mb: float | None
    extra: dict[str, Any]
    layout: Any = None


# ---------------------------------------------------------------- inputs, plans, artifacts


def bench_inputs(loaded: Loaded) -> Any:
    """The first shipped sample photo; its prompt lengthened to the spec's text-token count."""
    from ..preprocess import load_image, samples

    path, prompt = samples()[0]
    image = load_image(path)
    n = loaded.preprocessor.visual_tokens or 0
    words = list(_FILLER)
    inputs = loaded.preprocessor([image], [prompt])
    while inputs.input_ids.shape[1] - n < loaded.spec.text_tokens and words:
        prompt = f"{prompt} {words.pop(0)}"
        inputs = loaded.preprocessor([image], [prompt])
    return inputs


def _plans(loaded: Loaded, cfg: BenchConfig) -> dict[str, Any]:
    from ..plan import make_plan

    return {m: make_plan(loaded.spec, m, budget=None if m == "none" else cfg.budget) for m in cfg.methods}


def _manifest_or_none(folder: Path) -> dict[str, Any] | None:
    from ..export.artifact import read_manifest

    if not (folder / "manifest.json").is_file():
        return None
    try:
        return read_manifest(folder, verify=False)
    except UserError:
        return None


def _reusable(folder: Path, loaded: Loaded, plan: Any, target: str, precision: str = "fp32",
              attention: str = "auto") -> bool:
    """An artifact of an earlier run for this model, plan, precision and attention form (with
    engines, for trt)."""
    manifest = _manifest_or_none(folder)
    if manifest is None:
        return False
    form = (manifest.get("decoder") or {}).get("attention")
    same = (manifest.get("model") == loaded.spec.name and manifest.get("plan") == plan.to_dict()
            and manifest.get("precision") == precision and attention in ("auto", form))
    return same and (target == "onnx" or bool((manifest.get("trt") or {}).get("built")))


def _export(loaded: Loaded, plan: Any, inputs: Any, folder: Path, target: str = "onnx",
            precision: str = "fp32", attention: str = "auto") -> float:
    """Export (or reuse) the artifact for `plan`; seconds spent exporting (0 when reused).
    target "trt" also builds TensorRT engines (where TensorRT and a GPU are present)."""
    from ..pipeline import ExportOptions, export_artifact

    if _reusable(folder, loaded, plan, target, precision, attention):
        return 0.0
    t0 = time.perf_counter()
    result = export_artifact(loaded, plan, inputs, folder,
                             ExportOptions(precision=precision, check=False, quiet=True, force=True, target=target,
                                           attention=attention))
    if target == "trt" and not result.engines_built:
        trt = result.manifest.get("trt", {})
        raise _Skip(f"skipped: no TensorRT engine was built ({trt.get('reason') or trt.get('error') or 'unknown'})")
    return time.perf_counter() - t0


def _quantized(source: Path, folder: Path, weights: str) -> float:
    """Weight-only quantize (or reuse) the fp32 artifact at `source` into `folder` with the
    bench's recipe (config.QUANTIZE); seconds spent (0 when reused). No parity pass: the
    bench judges the quantized record against the fp32 one itself."""
    from ..export.artifact import sha256_file
    from ..quantize.weights import PRECISION, quantize_weights

    manifest = _manifest_or_none(folder)
    q = (manifest or {}).get("quantization") or {}
    if (manifest is not None and manifest.get("precision") == PRECISION[weights]
            and all(q.get(k) == v for k, v in QUANTIZE.items())
            and (q.get("source_artifact") or {}).get("manifest_sha256") == sha256_file(source / "manifest.json")):
        return 0.0
    t0 = time.perf_counter()
    quantize_weights(source, folder, weights=weights, **QUANTIZE, force=True, quiet=True, parity=False)
    return time.perf_counter() - t0


def _load_artifact(folder: Path, threads: int, backend: str) -> Runtime:
    if backend == "tensorrt":
        from ..runtime.trt import TrtArtifact

        return TrtArtifact.load(folder, verify=False, device_kv=True)
    from ..runtime import OrtArtifact
    from ..runtime.ort import THREADS_ENV

    old = os.environ.get(THREADS_ENV)
    os.environ[THREADS_ENV] = str(threads)  # read by the runtime when it creates each session
    try:
        return OrtArtifact.load(folder, providers=["CPUExecutionProvider"], verify=False)
    finally:
        if old is None:
            os.environ.pop(THREADS_ENV, None)
        else:
            os.environ[THREADS_ENV] = old


def _tensorrt_skip() -> str | None:
    """None where TensorRT and a GPU are present, else the records' status."""
    from ..build.trt import tensorrt_status

    can, why = tensorrt_status()
    if can:
        return None
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "skipped: TensorRT not installed"
    return f"skipped: {why}"


def _skipped(cfg: BenchConfig) -> dict[str, str]:
    """Backends that cannot run in this configuration, with the records' status."""
    skipped = {b: why for b in cfg.backends if b == "tensorrt" and (why := _tensorrt_skip())}
    if cfg.device != "cpu" or cfg.torch_dtype != "fp32" or cfg.random_weights:
        for b in cfg.backends:  # the artifact backends export from an fp32 CPU model: not this one
            if b not in TORCH_BACKENDS:
                skipped[b] = (f"skipped: {b} exports the fp32 CPU model; this run holds the torch backends' "
                              f"{cfg.torch_dtype} model on {cfg.device}" + (" with random weights" if cfg.random_weights
                                                                            else "") + " (run it separately)")
    return skipped


# ---------------------------------------------------------------- the runs of one backend


def _torch_runs(backend: str, loaded: Loaded, plans: dict[str, Any], inputs: Any, cfg: BenchConfig,
                steps: Steps) -> dict[str, _Bound]:
    from ..runtime.eager import EagerRuntime
    from ..runtime.torch_static import TorchStaticRuntime

    x = inputs.to(cfg.device)
    sizes = torch_weight_bytes(loaded)
    d = cfg.torch_dtype
    if backend == "torch":
        runtimes: dict[str, Runtime] = {m: EagerRuntime(loaded, plans[m]) for m in cfg.methods}
        return {(m, d): _Bound(rt, rt.bind(x), extra=dict(sizes)) for m, rt in runtimes.items()}
    with steps.step("torch-static: build" + (" and capture CUDA graphs" if cfg.device != "cpu" else "")):
        runtimes = {m: TorchStaticRuntime(loaded, plans[m], cfg.decode_tokens) for m in cfg.methods}
        runs = {m: rt.bind(x) for m, rt in runtimes.items()}
        return {(m, d): _Bound(rt, runs[m], extra=dict(sizes), layout=runs[m].decoder.layout)
                for m, rt in runtimes.items()}


def backend_precisions(backend: str, cfg: BenchConfig) -> tuple[str, ...]:
    """The precisions a backend's records are measured at: the torch dtype for the torch
    backends, --precisions for onnxruntime (in PRECISIONS order: fp32 exported before the
    quantized ones that are made from it), fp32 for tensorrt."""
    if backend in TORCH_BACKENDS:
        return (cfg.torch_dtype,)
    if backend != "onnxruntime":
        return DEFAULT_PRECISIONS
    return tuple(sorted(cfg.precisions, key=PRECISIONS.index))


def _artifact_folders(backend: str, loaded: Loaded, plans: dict[str, Any], inputs: Any, root: Path,
                      cfg: BenchConfig, steps: Steps) -> dict[tuple[str, str], tuple[Path, float]]:
    """Every (method, precision)'s artifact folder, exported or quantized (or reused), with
    the seconds that took."""
    target, suffix = ("trt", "-trt") if backend == "tensorrt" else ("onnx", "")
    attention = cfg.attention if backend == "onnxruntime" else "auto"
    if attention != "auto":
        suffix += f"-{attention}"
    out = {}
    for m in cfg.methods:
        fp32 = root / f"{loaded.spec.name}-{m}{suffix}"
        for p in backend_precisions(backend, cfg):
            folder = fp32 if p == "fp32" else root / f"{loaded.spec.name}-{m}{suffix}-{p}"
            if p in EXPORTED:
                with steps.step(f"export {m} artifact ({backend}, {p})"):
                    out[(m, p)] = folder, _export(loaded, plans[m], inputs, folder, target, p, attention)
            else:
                if (m, "fp32") not in out:
                    with steps.step(f"export {m} artifact ({backend}, fp32, to quantize)"):
                        _export(loaded, plans[m], inputs, fp32, target, attention=attention)
                with steps.step(f"quantize {m} artifact ({p} weights, {QUANTIZE['method']}, "
                                f"block {QUANTIZE['block']})"):
                    out[(m, p)] = folder, _quantized(fp32, folder, p)
    return out


def _artifact_steps(precisions: Sequence[str]) -> int:
    """Progress steps per method: one per precision, and the fp32 export a quantized one needs."""
    quantized = any(p not in EXPORTED for p in precisions)
    return len(precisions) + (quantized and "fp32" not in precisions)


def _artifact_runs(backend: str, loaded: Loaded, plans: dict[str, Any], inputs: Any, root: Path,
                   cfg: BenchConfig, steps: Steps) -> dict[tuple[str, str], _Bound]:
    """Export every (method, precision)'s artifact (engines too for tensorrt), then load and
    bind them all."""
    folders = _artifact_folders(backend, loaded, plans, inputs, root, cfg, steps)
    gc.collect()
    bound = {}
    for key, (folder, seconds) in folders.items():
        before = rss_mb()
        rt = _load_artifact(folder, cfg.threads, backend)
        # the host side of prefill, done once: the timer holds the graphs alone; a pass makes
        # decode_tokens + 1 tokens (KV buffers sized to that where the backend allows it)
        run = rt.bind(inputs, new_tokens=cfg.decode_tokens + 1)
        extra = ({"providers": rt.providers, "ort_threading": f"{cfg.threads} intra-op threads per session, "
                  "per-session pools (runtime default)"} if backend == "onnxruntime" else {"kv_on_device": True})
        made = "export_s" if key[1] in EXPORTED else "quantize_s"
        bound[key] = _Bound(rt, run, rss_mb() - before,
                            {**extra, made: seconds, **artifact_weight_bytes(folder),
                             **({"quantization": dict(QUANTIZE)} if made == "quantize_s" else {})},
                            layout=run.layout)
    return bound


def _memory_pass(run: Run, decode_tokens: int) -> tuple[float, float, Greedy]:
    """One untimed vision + prefill + greedy pass: its working memory, the process's peak
    RSS, and what it decoded."""
    return working_memory_mb(run, lambda: (run.vision(), greedy(run, decode_tokens + 1))[1])


def _round_robin(bound: dict[tuple[str, str], _Bound], cfg: BenchConfig, steps: Steps, backend: str
                 ) -> dict[tuple[str, str], _Measured]:
    samples = {m: Samples() for m in bound}
    passes = {}
    order = list(bound)
    rounds = cfg.warmup + cfg.repeats
    with steps.step(f"{backend}: memory pass"):
        for m in order:  # first run of each session/plan: arenas and caches grow here
            peak, rss, passes[m] = _memory_pass(bound[m].run, cfg.decode_tokens)
            samples[m].peak_mb.append(peak)
            samples[m].peak_rss_mb.append(rss)
    for r in range(rounds):
        with steps.step(f"{backend}: {'warm-up' if r < cfg.warmup else 'timed'} round {r + 1}/{rounds}"):
            for m in order[r % len(order):] + order[: r % len(order)]:  # rotate who goes first
                timed_pass(bound[m].run, samples[m], cfg.decode_tokens, keep=r >= cfg.warmup)
    return {m: _Measured(samples[m], passes[m], b.weights_rss_mb, {**b.extra, **b.run.details}, b.layout)
            for m, b in bound.items()}


@contextlib.contextmanager
def _artifact_root(cfg: BenchConfig, live: list[str]) -> Iterator[Path | None]:
    """cfg.artifacts, or a temporary folder (removed afterwards) when an artifact backend runs."""
    if cfg.artifacts is not None or not set(live) & set(ARTIFACT_BACKENDS):
        yield cfg.artifacts
        return
    with tempfile.TemporaryDirectory(prefix="reroute-bench-") as tmp:
        yield Path(tmp)


def _measure_backend(backend: str, loaded: Loaded, plans: dict[str, Any], inputs: Any, root: Path | None,
                     cfg: BenchConfig, steps: Steps) -> dict[tuple[str, str], _Measured]:
    if backend in TORCH_BACKENDS:
        bound = _torch_runs(backend, loaded, plans, inputs, cfg, steps)
    else:
        bound = _artifact_runs(backend, loaded, plans, inputs, root, cfg, steps)
    try:
        return _round_robin(bound, cfg, steps, backend)
    finally:
        for b in bound.values():
            b.run.close()
            b.runtime.close()
        bound.clear()
        gc.collect()  # sessions and arenas go before the next backend's memory pass


def _measure(loaded: Loaded, plans: dict[str, Any], inputs: Any, cfg: BenchConfig, live: list[str],
             skipped: dict[str, str], progress: bool) -> dict[tuple[str, str, str], _Measured]:
    """Every live backend in turn; one that turns out unable to run joins `skipped`."""
    import torch

    from ..progress import Steps

    rounds = cfg.warmup + cfg.repeats
    exports = sum(_artifact_steps(backend_precisions(b, cfg)) for b in live if b in ARTIFACT_BACKENDS)
    exports = exports * len(cfg.methods) + ("torch-static" in live)
    steps = Steps(len(live) * (rounds + 1) + exports, quiet=not progress, title="bench")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    out: dict[tuple[str, str, str], _Measured] = {}
    try:
        with _artifact_root(cfg, live) as root:
            for backend in live:
                try:
                    measured = _measure_backend(backend, loaded, plans, inputs, root, cfg, steps)
                except _Skip as e:
                    skipped[backend] = str(e)
                    continue
                out.update({(m, backend, p): x for (m, p), x in measured.items()})
    finally:
        steps.close()
        torch.set_num_threads(threads_before)
    return out


# ---------------------------------------------------------------- records


def _agreements(measured: dict[tuple[str, str, str], _Measured], plans: dict[str, Any],
                cfg: BenchConfig) -> dict[tuple[str, str, str], dict[str, Any]]:
    """Per method, every record's memory pass judged against a reference's. Records at a
    backend's own precision (the torch dtype, fp32 artifacts): against the eager torch
    backend when it ran, else the first that did. Other precisions of onnxruntime (fp16,
    int8, int4): against its fp32 record, so what is judged is the precision alone."""
    out = {}
    for m in cfg.methods:
        base = [(b, backend_precisions(b, cfg)[0]) for b in cfg.backends]
        ran = sorted((k for k in base if (m, *k) in measured), key=lambda k: k[0] != "torch")  # stable
        seen = {k: _observed(plans[m], measured[(m, *k)].memory_pass) for k in ran}
        for k in ran[1:]:
            out[(m, *k)] = {"reference": ran[0][0], **agreement(seen[ran[0]], seen[k])}
        fp32 = (m, "onnxruntime", "fp32")
        for p in cfg.precisions:
            if fp32 in measured and p != "fp32" and (m, "onnxruntime", p) in measured:
                got = _observed(plans[m], measured[(m, "onnxruntime", p)].memory_pass)
                ref = _observed(plans[m], measured[fp32].memory_pass)
                out[(m, "onnxruntime", p)] = {"reference": "onnxruntime fp32", **agreement(ref, got)}
    return out


def _observed(plan: Any, g: Greedy) -> Observed:
    return Observed(trace_of(plan, g), margins=g.margins)


def _record_base(cfg: BenchConfig, loaded: Loaded, plan: Any, rep: dict[str, Any], method: str, backend: str,
                 precision: str, inputs: Any) -> dict[str, Any]:
    return {
        "model": loaded.spec.name, "method": method, "backend": backend,
        "device": cfg.device if backend in TORCH_BACKENDS else ("cuda" if backend == "tensorrt" else "cpu"),
        "dtype": precision if precision in _ELEM_BYTES else "fp32",  # activations (int8/int4: weights only)
        "precision": precision,  # weights
        "baseline_precision": precision == backend_precisions(backend, cfg)[0],
        "random_weights": loaded.random_weights,
        "budget": None if method == "none" else cfg.budget,
        "stages": [{"layer": s.layer, "keep": s.keep} for s in plan.stages],
        "avg_visual_tokens": plan.avg_visual_tokens,
        "prompt_tokens": int(inputs.input_ids.shape[1]), "visual_tokens": plan.visual_tokens,
        "text_tokens": rep["text_tokens"],
        "threads": cfg.threads, "repeats": cfg.repeats, "warmup": cfg.warmup, "decode_tokens": cfg.decode_tokens,
        "theoretical_speedup": rep["theoretical_speedup"],
        "prefill_tflops": rep["prefill_tflops"], "prefill_tflops_none": rep["prefill_tflops_none"],
        "vision_tflops": rep["vision_tflops"],
        "prefill_tflops_with_vision": rep["prefill_tflops"] + rep["vision_tflops"],
        "kv_cache_bytes_fp16": rep["kv_cache_bytes_fp16"], "kv_cache_bytes_fp16_none": rep["kv_cache_bytes_fp16_none"],
        "kv_cache_entries": rep["kv_cache_entries"],
        "peak_mem_kind": ("peak torch.cuda allocation growth during one untimed vision+prefill+decode pass "
                          "(CUDA-graph pools are allocated at capture: graph_pool_mb)"
                          if backend in TORCH_BACKENDS and cfg.device != "cpu" else
                          "peak RSS growth during one untimed vision+prefill+decode pass, after malloc_trim "
                          "(VmHWM reset via /proc/self/clear_refs); weights excluded (weights_rss_mb)"),
        "peak_rss_kind": "the bench process's peak RSS (VmHWM) during the memory pass: weights, runtimes and the "
                         "torch model every backend of the run shares included",
    }


_ELEM_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
_BUFFERS_FROM = {"onnxruntime": "the run's buffers: prompt + decode tokens",
                 "tensorrt": "the artifact's decoder.cache_tokens (the engines' decode profile)",
                 "torch-static": "torch-static's buffers: prompt + max new tokens"}


def _itemsize(dtype: Any) -> int:
    """A torch dtype's or a numpy dtype's bytes per element."""
    size = getattr(dtype, "itemsize", None)
    if isinstance(size, int):
        return size
    import numpy as np

    return np.dtype(dtype).itemsize


def _traffic(loaded: Loaded, plan: Any, backend: str, dtype: str, prompt_tokens: int, cfg: BenchConfig,
             layout: Any) -> dict[str, Any]:
    """KV-cache bytes one decode step moves (bench/traffic.py), at this record's KV dtype and
    buffers; the eager engine keeps its own cache, so its record uses the buffers this run
    needs (prompt + decode tokens)."""
    from ..export.attention import FORMS

    t = loaded.spec.text
    if layout is not None:
        rows, source = layout.cache_tokens, _BUFFERS_FROM.get(backend, backend)
        if FORMS[layout.attention].valid_rows_only:  # reads past_length + 1 rows, not the buffers
            rows = [p + 1 for p in plan.cache_tokens(prompt_tokens, 0)]
            source = (f"the valid rows ({layout.attention} reads past_length + 1 of "
                      f"{'/'.join(map(str, layout.cache_tokens))})")
        return kv_traffic(plan, t.num_kv_heads, t.head_dim, prompt_tokens, [_itemsize(d) for d in layout.kv_dtypes],
                          rows, source)
    return kv_traffic(plan, t.num_kv_heads, t.head_dim, prompt_tokens, _ELEM_BYTES.get(dtype, 4),
                      plan.cache_tokens(prompt_tokens, cfg.decode_tokens),
                      "prompt + decode tokens" + (" (the eager engine keeps its own cache)" if backend == "torch" else ""))


def _measured_fields(x: _Measured, agreed: dict[str, Any] | None) -> dict[str, Any]:
    g = x.memory_pass
    return {"status": "ok", **x.samples.figures(), "weights_rss_mb": x.weights_rss_mb, "greedy_tokens": g.tokens,
            "top2_margins": g.margins, "decisions": g.decisions, **x.extra,
            **({"agreement": agreed} if agreed else {})}


def _records(cfg: BenchConfig, loaded: Loaded, plans: dict[str, Any], inputs: Any,
             measured: dict[tuple[str, str, str], _Measured], skipped: dict[str, str],
             floors: dict[str, Any]) -> list[dict[str, Any]]:
    from ..plan import plan_report

    text_tokens = int(inputs.input_ids.shape[1]) - plans[cfg.methods[0]].visual_tokens
    reports = {m: plan_report(loaded.spec, p, text_tokens) for m, p in plans.items()}
    agreed = _agreements(measured, plans, cfg)
    records = []
    for backend in cfg.backends:
        for p in backend_precisions(backend, cfg):
            for m in cfg.methods:
                base = _record_base(cfg, loaded, plans[m], reports[m], m, backend, p, inputs)
                key = (m, backend, p)
                x = measured.get(key) if backend not in skipped else None
                base["kv_traffic_per_decode_step"] = _traffic(loaded, plans[m], backend, base["dtype"],
                                                              base["prompt_tokens"], cfg, x.layout if x else None)
                if x is not None and x.layout is not None:
                    base["attention"] = x.layout.attention
                if x is None:
                    records.append({**base, "status": skipped.get(backend, "skipped: not measured")})
                    continue
                record = {**base, **_measured_fields(x, agreed.get(key)), "floors": floors}
                records.append({**record, **floor_fields(record, floors)})
    add_measured_speedup(records)
    return records


def run_bench(
    model_name: str,
    budget: float,
    methods: Sequence[str] = DEFAULT_METHODS,
    backends: Sequence[str] = DEFAULT_BACKENDS,
    repeats: int = 10,
    warmup: int = 2,
    threads: int = 2,
    progress: bool = True,
    *,
    decode_tokens: int = 8,
    artifacts: str | Path | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    random_weights: bool = False,
    precisions: Sequence[str] = DEFAULT_PRECISIONS,
    attention: str = "auto",
) -> list[dict[str, Any]]:
    """One record per (method, backend, precision); see the package docstring for what is measured."""
    cfg = BenchConfig(model_name, float(budget), tuple(methods), tuple(backends), int(repeats), int(warmup),
                      int(threads), int(decode_tokens), Path(artifacts) if artifacts else None, device, dtype,
                      random_weights, tuple(precisions), attention)
    check_config(cfg)
    import torch

    from ..registry import load

    loaded = load(cfg.model, getattr(torch, DTYPES[cfg.torch_dtype]), cfg.device, random_weights=cfg.random_weights)
    plans = _plans(loaded, cfg)  # bad budgets fail here, before any timing
    inputs = bench_inputs(loaded)
    skipped = _skipped(cfg)
    live = [b for b in BACKENDS if b in cfg.backends and b not in skipped]  # torch first: it exports nothing
    floors = measure_floors(loaded.spec, int(inputs.input_ids.shape[1]), cfg.threads, cfg.device,
                            cfg.torch_dtype)  # before any backend: the machine as quiet as the run finds it
    measured = _measure(loaded, plans, inputs, cfg, live, skipped, progress)
    return _records(cfg, loaded, plans, inputs, measured, skipped, floors)
