"""`reroute-export bench`: measured prefill / decode speed next to the planner's figures.

For every (method, backend) on the same inputs in one run: vision ms, prefill ms (p50,
p90), decode ms/token, peak memory, and the analytic figures of `plan.plan_report`
(prefill TFLOPs with and without the vision tower, KV-cache bytes, the theoretical
token-layer speedup vs `none`). A summary holds the three ratios the project tracks:

    reroute prefill speedup vs none, same backend, against the theoretical one
    reroute prefill / pdrop prefill (the cost of recoverability over physical delete)
    torch reroute prefill / onnxruntime reroute prefill (what the export buys)

Backends:
    torch        the eager reference `routing.RoutedModel` (prefill, decode_step)
    onnxruntime  the artifact `export.pipeline.export_artifact` writes, run by
                 `runtime.OrtArtifact` on CPU (the vision, prefill and decode graphs)
    tensorrt     where TensorRT and a GPU are present: the same artifact exported with
                 --target trt, its engines run by `runtime.trt.TrtArtifact` (KV caches
                 stay on the GPU); elsewhere every record says "skipped: ..." (never faked)

Method: each backend first runs one untimed memory pass per method, then warm-up and
timed rounds; within a round every method makes one vision + prefill + decode pass,
the first method rotating per round, so drift on a shared machine hits all methods
alike. Backends run one after the other, never concurrently. Prefill times the decoder
alone (embeddings with the image features are built once per method, outside the
timer); vision is timed on its own. `prefill_cpu_ms_p50` is process CPU time (all
threads): with --threads 1 it barely moves when other processes share the cores.

Peak memory (`peak_mem_mb`) is RSS, not tracemalloc (torch and ONNX Runtime allocate
outside Python's allocator): the peak RSS growth during the memory pass over the RSS
just before it, after glibc's malloc_trim and with VmHWM reset via /proc/self/clear_refs.
It counts activations, KV caches and runtime arenas; weights are `weights_rss_mb`
(ONNX Runtime sessions; the torch model is shared by every torch record).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from .errors import UserError
from .plan import METHODS

if TYPE_CHECKING:
    from .registry import Loaded

BACKENDS = ("torch", "onnxruntime", "tensorrt")
DEFAULT_METHODS = ("none", "fastv", "pdrop", "reroute")
DEFAULT_BACKENDS = ("torch", "onnxruntime")
# Words appended to the sample prompt until the prompt has the spec's text-token count
# (LLaVA-1.5 benchmarks use ~40 text tokens around the 576 image tokens).
_FILLER = ("Describe the image in detail: the main objects, their colours, where they are, "
           "what is happening, and anything unusual you notice in the background of the picture.").split()

TARGETS = {"fraction_of_theoretical": 0.9, "reroute_over_pdrop": 1.10, "onnxruntime_over_torch": 1.5}


# ---------------------------------------------------------------- memory


def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float:
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb / 1024
    import resource  # not Linux: the lifetime peak is the best there is

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def peak_rss() -> Iterator[list[float]]:
    """Yields a list that receives the RSS growth (MB) peak of the block over its start.

    Linux: VmHWM after resetting it through /proc/self/clear_refs ("5"), so the peak
    is this block's own, not the process's lifetime one.
    """
    out: list[float] = []
    try:
        Path("/proc/self/clear_refs").write_text("5")
        resettable = True
    except OSError:
        resettable = False
    start = rss_mb()
    yield out
    hwm = _status_kb("VmHWM") if resettable else None
    peak = hwm / 1024 if hwm is not None else rss_mb()
    out.append(max(0.0, peak - start))


def _malloc_trim() -> None:
    """glibc: return free heap pages to the OS (no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ---------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) without numpy."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class Samples:
    """What one (method, backend) collected: timed rounds, and its memory pass."""

    vision_ms: list[float] = field(default_factory=list)
    prefill_ms: list[float] = field(default_factory=list)
    prefill_cpu_ms: list[float] = field(default_factory=list)  # process CPU time, all threads
    decode_ms: list[float] = field(default_factory=list)  # one entry per generated token
    peak_mb: list[float] = field(default_factory=list)

    def figures(self) -> dict[str, float]:
        return {
            "vision_ms": percentile(self.vision_ms, 50),
            "prefill_ms_p50": percentile(self.prefill_ms, 50),
            "prefill_ms_p90": percentile(self.prefill_ms, 90),
            "prefill_ms_min": min(self.prefill_ms),
            "prefill_cpu_ms_p50": percentile(self.prefill_cpu_ms, 50),
            "decode_ms_per_token": percentile(self.decode_ms, 50),
            "peak_mem_mb": max(self.peak_mb),
        }


def _ms(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) * 1e3, out


def _ms_cpu(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """Wall and process-CPU milliseconds. With one thread the CPU figure barely moves when
    other processes share the cores; with more it also counts worker threads' spin-waits."""
    c0 = time.process_time()
    wall, out = _ms(fn)
    return wall, (time.process_time() - c0) * 1e3, out


# ---------------------------------------------------------------- runners


class Runner:
    """One (method, backend): vision(), prefill() -> state, decode(state, step) -> state."""

    weights_rss_mb: float | None = None  # None: shared by every record of the backend (the torch model)
    extra: dict[str, Any]

    def vision(self) -> None: ...

    def prefill(self) -> Any: ...

    def decode(self, state: Any, step: int) -> Any: ...

    def close(self) -> None: ...

    def one_pass(self, samples: Samples, decode_tokens: int, timed: bool = True) -> None:
        """Vision, prefill and `decode_tokens` greedy decode steps; times kept if `timed`."""
        v_ms, _ = _ms(self.vision)
        p_ms, p_cpu, state = _ms_cpu(self.prefill)
        d_ms = []
        for step in range(decode_tokens):
            ms, state = _ms(lambda: self.decode(state, step))
            d_ms.append(ms)
        if timed:
            samples.vision_ms.append(v_ms)
            samples.prefill_ms.append(p_ms)
            samples.prefill_cpu_ms.append(p_cpu)
            samples.decode_ms.extend(d_ms)

    def memory_pass(self, samples: Samples, decode_tokens: int) -> None:
        """One untimed pass whose peak RSS growth is this runner's working memory."""
        gc.collect()
        _malloc_trim()  # hand freed heap back, or an earlier pass's pages hide this one's growth
        with peak_rss() as peak:
            self.one_pass(samples, decode_tokens, timed=False)
        samples.peak_mb.extend(peak)


class TorchRunner(Runner):
    """The eager reference: `RoutedModel.prefill` / `decode_step` on the HF modules."""

    def __init__(self, loaded: "Loaded", plan: Any, inputs: Any) -> None:
        import torch

        from .routing import RoutedModel

        self.torch, self.loaded, self.inputs = torch, loaded, inputs
        with torch.no_grad():
            embeds = loaded.family.embed(loaded.model, inputs)  # (1, L, D): built once, outside the timer

        class _Embedded(loaded.family):  # type: ignore[misc, valid-type]
            @classmethod
            def embed(cls, model: Any, inputs: Any) -> Any:
                return embeds

        self.routed = RoutedModel(loaded.model, _Embedded, plan)
        self.extra = {}

    def vision(self) -> None:
        with self.torch.no_grad():
            self.loaded.family.image_features(self.loaded.model, self.inputs)

    def prefill(self) -> Any:
        pre = self.routed.prefill(self.inputs)
        return pre.logits.argmax(-1), pre.next_position.clone(), pre.cache

    def decode(self, state: Any, step: int) -> Any:
        token, pos, cache = state
        logits = self.routed.decode_step(token, pos, cache)
        return logits.argmax(-1), pos + 1, cache


class ArtifactRunner(Runner):
    """An exported artifact's three graphs through `OrtArtifact`'s host glue: ONNX Runtime
    sessions (CPU here), or TensorRT engines via `runtime.trt.TrtArtifact` (KV kept on the GPU)."""

    def __init__(self, folder: Path, inputs: Any, threads: int, backend: str = "onnxruntime") -> None:
        import numpy as np

        from .export import contract as C
        from .runtime.positions import next_position

        self.np, self.C = np, C
        before = rss_mb()
        self.art = art = _load_artifact(folder, threads, backend)
        # The host side of OrtArtifact.prefill, done once so the timer holds the prefill graph alone.
        self.pixel_values = inputs.pixel_values
        self.feeds = art.prefill_feeds(inputs)
        self.next_position = next_position(self.feeds[C.POSITION_IDS])
        self.weights_rss_mb = rss_mb() - before
        if backend == "onnxruntime":
            self.extra = {"providers": art._prefill.session.get_providers(),
                          "ort_threading": f"{threads} intra-op threads per session, per-session pools "
                                           "(runtime default)"}
        else:
            self.extra = {"kv_on_device": True}

    def vision(self) -> None:
        self.art.run_vision(self.pixel_values)

    def prefill(self) -> Any:
        out = self.art.run_prefill(self.feeds)
        return int(self.np.argmax(out["logits"])), out["kv"]

    def decode(self, state: Any, step: int) -> Any:
        token, kv = state
        logits, kv = self.art.decode_step(token, self.next_position + step, kv)
        return int(self.np.argmax(logits)), kv

    def close(self) -> None:
        del self.art
        gc.collect()


def _load_artifact(folder: Path, threads: int, backend: str) -> Any:
    if backend == "tensorrt":
        from .runtime.trt import TrtArtifact

        return TrtArtifact.load(folder, verify=False, device_kv=True)
    from .runtime import OrtArtifact
    from .runtime.ort import THREADS_ENV

    old = os.environ.get(THREADS_ENV)
    os.environ[THREADS_ENV] = str(threads)  # read by the runtime when it creates each session
    try:
        return OrtArtifact.load(folder, providers=["CPUExecutionProvider"], verify=False)
    finally:
        if old is None:
            os.environ.pop(THREADS_ENV, None)
        else:
            os.environ[THREADS_ENV] = old


# ---------------------------------------------------------------- the benchmark


@dataclass(frozen=True)
class BenchConfig:
    model: str
    budget: float
    methods: tuple[str, ...] = DEFAULT_METHODS
    backends: tuple[str, ...] = DEFAULT_BACKENDS
    repeats: int = 10
    warmup: int = 2
    threads: int = 2
    decode_tokens: int = 8
    artifacts: Path | None = None  # keep (and reuse) exported artifacts here; default: a temp dir


def _check_config(cfg: BenchConfig) -> None:
    bad = [m for m in cfg.methods if m not in METHODS]
    if bad or not cfg.methods:
        raise UserError(f"unknown method(s) {', '.join(bad) or '(none given)'}; known: {', '.join(METHODS)}")
    bad = [b for b in cfg.backends if b not in BACKENDS]
    if bad or not cfg.backends:
        raise UserError(f"unknown backend(s) {', '.join(bad) or '(none given)'}; known: {', '.join(BACKENDS)}")
    if len(set(cfg.methods)) != len(cfg.methods) or len(set(cfg.backends)) != len(cfg.backends):
        raise UserError("--methods and --backends take each name once")
    for name, value, low in (("--repeats", cfg.repeats, 1), ("--warmup", cfg.warmup, 0),
                             ("--threads", cfg.threads, 1), ("--decode-tokens", cfg.decode_tokens, 1)):
        if value < low:
            raise UserError(f"{name} must be >= {low}, got {value}")


def bench_inputs(loaded: "Loaded") -> Any:
    """The first shipped sample photo; its prompt lengthened to the spec's text-token count."""
    from .preprocess import load_image, samples

    path, prompt = samples()[0]
    image = load_image(path)
    n = loaded.preprocessor.visual_tokens or 0
    words = list(_FILLER)
    inputs = loaded.preprocessor([image], [prompt])
    while inputs.input_ids.shape[1] - n < loaded.spec.text_tokens and words:
        prompt = f"{prompt} {words.pop(0)}"
        inputs = loaded.preprocessor([image], [prompt])
    return inputs


def _plans(loaded: "Loaded", cfg: BenchConfig) -> dict[str, Any]:
    from .plan import make_plan

    return {m: make_plan(loaded.spec, m, budget=None if m == "none" else cfg.budget) for m in cfg.methods}


def _export(loaded: "Loaded", plan: Any, inputs: Any, folder: Path, target: str = "onnx") -> float:
    """Export (or reuse) the artifact for `plan`; seconds spent exporting (0 when reused).
    target "trt" also builds TensorRT engines (where TensorRT and a GPU are present)."""
    from .export.artifact import read_manifest
    from .export.pipeline import ExportOptions, export_artifact

    if (folder / "manifest.json").is_file():
        try:
            manifest = read_manifest(folder, verify=False)
            same = manifest.get("model") == loaded.spec.name and manifest.get("plan") == plan.to_dict()
            if same and (target == "onnx" or (manifest.get("trt") or {}).get("built")):
                return 0.0
        except UserError:
            pass
    t0 = time.perf_counter()
    result = export_artifact(loaded, plan, inputs, folder,
                             ExportOptions(check=False, quiet=True, force=True, target=target))
    if target == "trt" and not result.engines_built:
        trt = result.manifest.get("trt", {})
        raise _Skip(f"skipped: no TensorRT engine was built ({trt.get('reason') or trt.get('error') or 'unknown'})")
    return time.perf_counter() - t0


class _Skip(Exception):
    """A backend that cannot run here; the message is the records' status."""


def _tensorrt_skip() -> str | None:
    """None where TensorRT and a GPU are present, else the records' status."""
    from .build.trt import tensorrt_status

    can, why = tensorrt_status()
    if can:
        return None
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "skipped: TensorRT not installed"
    return f"skipped: {why}"


def _round_robin(runners: dict[str, Runner], cfg: BenchConfig, steps: Any, backend: str) -> dict[str, Samples]:
    samples = {m: Samples() for m in runners}
    order = list(runners)
    rounds = cfg.warmup + cfg.repeats
    with steps.step(f"{backend}: memory pass"):
        for m in order:  # first run of each session/plan: arenas and caches grow here
            runners[m].memory_pass(samples[m], cfg.decode_tokens)
    for r in range(rounds):
        label = f"{backend}: {'warm-up' if r < cfg.warmup else 'timed'} round {r + 1}/{rounds}"
        with steps.step(label):
            for m in order[r % len(order):] + order[: r % len(order)]:  # rotate who goes first
                runners[m].one_pass(samples[m], cfg.decode_tokens, timed=r >= cfg.warmup)
    return samples


def _artifact_runners(loaded: "Loaded", plans: dict[str, Any], inputs: Any, root: Path, cfg: BenchConfig,
                      steps: Any, backend: str) -> dict[str, Runner]:
    """Export every method's artifact (engines too for tensorrt), then load them all."""
    target, suffix = ("trt", "-trt") if backend == "tensorrt" else ("onnx", "")
    folders = {m: root / f"{loaded.spec.name}-{m}{suffix}" for m in cfg.methods}
    export_s = {}
    for m in cfg.methods:
        with steps.step(f"export {m} artifact ({backend})"):
            export_s[m] = _export(loaded, plans[m], inputs, folders[m], target)
    gc.collect()
    runners: dict[str, Runner] = {}
    for m in cfg.methods:
        runners[m] = ArtifactRunner(folders[m], inputs, cfg.threads, backend)
        runners[m].extra["export_s"] = export_s[m]
    return runners


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
) -> list[dict[str, Any]]:
    """One record per (method, backend); see the module docstring for what is measured."""
    cfg = BenchConfig(model_name, float(budget), tuple(methods), tuple(backends), int(repeats), int(warmup),
                      int(threads), int(decode_tokens), Path(artifacts) if artifacts else None)
    _check_config(cfg)
    import torch

    from .plan import plan_report
    from .progress import Steps
    from .registry import load

    loaded = load(cfg.model)
    plans = _plans(loaded, cfg)  # bad budgets fail here, before any timing
    inputs = bench_inputs(loaded)
    n = plans[cfg.methods[0]].visual_tokens
    text_tokens = int(inputs.input_ids.shape[1]) - n
    reports = {m: plan_report(loaded.spec, p, text_tokens) for m, p in plans.items()}
    skipped = {b: why for b in cfg.backends if b == "tensorrt" and (why := _tensorrt_skip())}
    live = [b for b in BACKENDS if b in cfg.backends and b not in skipped]  # torch first: it exports nothing
    rounds = cfg.warmup + cfg.repeats
    exports = sum(b != "torch" for b in live) * len(cfg.methods)
    steps = Steps(len(live) * (rounds + 1) + exports, quiet=not progress, title="bench")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    results: dict[tuple[str, str], tuple[Samples, Runner]] = {}
    tmp = None
    try:
        for backend in live:
            try:
                if backend == "torch":
                    runners: dict[str, Runner] = {m: TorchRunner(loaded, plans[m], inputs) for m in cfg.methods}
                else:
                    if tmp is None and cfg.artifacts is None:
                        tmp = tempfile.TemporaryDirectory(prefix="reroute-bench-")
                    root = cfg.artifacts or Path(tmp.name)
                    runners = _artifact_runners(loaded, plans, inputs, root, cfg, steps, backend)
            except _Skip as e:
                skipped[backend] = str(e)
                continue
            try:
                for m, s in _round_robin(runners, cfg, steps, backend).items():
                    results[(m, backend)] = (s, runners[m])
            finally:
                for r in runners.values():
                    r.close()
    finally:
        steps.close()
        torch.set_num_threads(threads_before)
        if tmp is not None:
            tmp.cleanup()
    records: list[dict[str, Any]] = []
    for backend in cfg.backends:
        for m in cfg.methods:
            base = _record_base(cfg, loaded, plans[m], reports[m], m, backend, inputs)
            if backend in skipped:
                records.append({**base, "status": skipped[backend]})
                continue
            s, runner = results[(m, backend)]
            records.append({**base, "status": "ok", **s.figures(), "weights_rss_mb": runner.weights_rss_mb,
                            **runner.extra})
    _add_measured_speedup(records)
    return records


def _record_base(cfg: BenchConfig, loaded: "Loaded", plan: Any, rep: dict[str, Any], method: str, backend: str,
                 inputs: Any) -> dict[str, Any]:
    return {
        "model": loaded.spec.name, "method": method, "backend": backend,
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
        "peak_mem_kind": "peak RSS growth during one untimed vision+prefill+decode pass, after malloc_trim "
                         "(VmHWM reset via /proc/self/clear_refs); weights excluded (weights_rss_mb)",
    }


def _find(records: list[dict[str, Any]], method: str, backend: str) -> dict[str, Any] | None:
    for r in records:
        if r["method"] == method and r["backend"] == backend and r.get("status") == "ok":
            return r
    return None


def _add_measured_speedup(records: list[dict[str, Any]]) -> None:
    """measured_speedup: none's prefill p50 over this record's, same backend, same run."""
    for r in records:
        none = _find(records, "none", r["backend"])
        if r.get("status") == "ok" and none is not None:
            r["measured_speedup"] = none["prefill_ms_p50"] / r["prefill_ms_p50"]


# ---------------------------------------------------------------- summary


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The three tracked ratios, per backend where they are per backend, each with its target."""
    out: dict[str, Any] = {"targets": dict(TARGETS), "per_backend": {}}
    for backend in dict.fromkeys(r["backend"] for r in records):
        rr, none, pdrop = (_find(records, m, backend) for m in ("reroute", "none", "pdrop"))
        if rr is None:
            continue
        entry: dict[str, Any] = {}
        if none is not None:
            speed = none["prefill_ms_p50"] / rr["prefill_ms_p50"]
            frac = speed / rr["theoretical_speedup"]
            entry.update(reroute_speedup_vs_none=speed, theoretical_speedup=rr["theoretical_speedup"],
                         fraction_of_theoretical=frac,
                         fraction_of_theoretical_met=frac >= TARGETS["fraction_of_theoretical"])
        if pdrop is not None:
            ratio = rr["prefill_ms_p50"] / pdrop["prefill_ms_p50"]
            entry.update(reroute_over_pdrop=ratio, reroute_over_pdrop_met=ratio <= TARGETS["reroute_over_pdrop"])
        out["per_backend"][backend] = entry
    t, o = _find(records, "reroute", "torch"), _find(records, "reroute", "onnxruntime")
    if t is not None and o is not None:
        ratio = t["prefill_ms_p50"] / o["prefill_ms_p50"]
        out["onnxruntime_over_torch"] = ratio
        out["onnxruntime_over_torch_met"] = ratio >= TARGETS["onnxruntime_over_torch"]
    return out


def machine() -> dict[str, Any]:
    import onnxruntime
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = _meminfo_gib()
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "memory_gib": mem, "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "onnxruntime_providers": onnxruntime.get_available_providers()}


def _meminfo_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


# ---------------------------------------------------------------- printing


COLUMNS = ["method", "backend", "vision_ms", "prefill_ms_p50", "prefill_ms_p90", "decode_ms_per_token",
           "peak_mem_mb", "measured_speedup", "theoretical_speedup", "prefill_tflops", "kv_cache_mib"]


def _rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        row = {**r, "kv_cache_mib": r["kv_cache_bytes_fp16"] / 2**20}
        if r.get("status") != "ok":
            row = {c: row.get(c, "") for c in ("method", "backend", "theoretical_speedup", "prefill_tflops",
                                               "kv_cache_mib")}
            row["vision_ms"] = r["status"]
        rows.append(row)
    return rows


def summary_lines(summary: dict[str, Any]) -> list[str]:
    t = summary["targets"]
    lines = []
    for backend, e in summary["per_backend"].items():
        if "reroute_speedup_vs_none" in e:
            lines.append(f"{backend}: reroute prefill {e['reroute_speedup_vs_none']:.2f}x faster than none; "
                         f"theoretical {e['theoretical_speedup']:.2f}x -> {e['fraction_of_theoretical']:.2f} of it "
                         f"(target >= {t['fraction_of_theoretical']}: {_met(e['fraction_of_theoretical_met'])})")
        if "reroute_over_pdrop" in e:
            lines.append(f"{backend}: reroute prefill / pdrop prefill = {e['reroute_over_pdrop']:.3f} "
                         f"(target <= {t['reroute_over_pdrop']}: {_met(e['reroute_over_pdrop_met'])})")
    if "onnxruntime_over_torch" in summary:
        lines.append(f"reroute prefill, torch eager / onnxruntime = {summary['onnxruntime_over_torch']:.2f}x "
                     f"(target >= {t['onnxruntime_over_torch']}: {_met(summary['onnxruntime_over_torch_met'])})")
    return lines


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def markdown(payload: dict[str, Any]) -> str:
    b, m = payload["bench"], payload["machine"]
    head = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    body = ["| " + " | ".join(_cell(row.get(c, "")) for c in COLUMNS) + " |" for row in _rows(payload["records"])]
    return "\n".join([
        f"## {b['model']}, budget {b['budget']:g}",
        "",
        f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, {m['memory_gib']} GiB, GPU: {m['gpu'] or 'none'}; "
        f"torch {m['torch']}, onnxruntime {m['onnxruntime']}. Threads {b['threads']}, warm-up {b['warmup']}, "
        f"repeats {b['repeats']}, {b['decode_tokens']} decode tokens per pass. Load average (1, 5, 15 min) "
        f"before {m.get('load_average_before')}, after {m.get('load_average_after')}.",
        "",
        *head, *body, "",
        *[f"- {line}" for line in summary_lines(payload["summary"])], "",
    ])


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


# ---------------------------------------------------------------- CLI


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def register_cli(sub: Any) -> argparse.ArgumentParser:
    """Add the `bench` subcommand to an argparse subparsers object."""
    p = sub.add_parser("bench", help="measure prefill/decode speed per method and backend",
                       description="Measured vision / prefill / decode speed and peak memory per (method, "
                                   "backend), next to the planner's FLOPs, KV bytes and theoretical speedup.")
    p.add_argument("--model", required=True, help="registered name (e.g. bench-llava) or a local checkpoint folder")
    p.add_argument("--budget", type=float, required=True, help="average visual tokens per decoder layer")
    p.add_argument("--methods", type=_names, default=list(DEFAULT_METHODS),
                   help="comma-separated: none,fastv,pdrop,reroute (default: all four)")
    p.add_argument("--backends", type=_names, default=list(DEFAULT_BACKENDS),
                   help="comma-separated: torch,onnxruntime[,tensorrt] (default: torch,onnxruntime)")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for torch and ONNX Runtime (default 2)")
    p.add_argument("--decode-tokens", type=int, default=8, help="greedy decode steps per pass (default 8)")
    p.add_argument("--artifacts", metavar="DIR", help="export ONNX artifacts here and reuse them on later runs "
                                                      "(default: a temporary folder, removed afterwards)")
    p.add_argument("--json", metavar="OUT", help="write records and summary as JSON to OUT ('-' for stdout)")
    p.add_argument("--markdown", metavar="OUT", help="write a Markdown table to OUT")
    p.add_argument("--quiet", action="store_true", help="no progress and no table")
    p.set_defaults(func=cmd_bench)
    return p


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cmd_bench(args: argparse.Namespace) -> int:
    load_before = _load_average()  # a busy shared machine skews every figure: record it
    records = run_bench(args.model, args.budget, args.methods, args.backends, args.repeats, args.warmup,
                        args.threads, progress=not args.quiet and args.json != "-",
                        decode_tokens=args.decode_tokens, artifacts=args.artifacts)
    payload = {
        "bench": {"model": args.model, "budget": args.budget, "methods": list(args.methods),
                  "backends": list(args.backends), "repeats": args.repeats, "warmup": args.warmup,
                  "threads": args.threads, "decode_tokens": args.decode_tokens},
        "machine": {**machine(), "load_average_before": load_before, "load_average_after": _load_average()},
        "records": records, "summary": summarize(records),
    }
    if args.json == "-":
        print(json.dumps(payload, indent=1))
    elif args.json:
        Path(args.json).write_text(json.dumps(payload, indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(markdown(payload))
    if not args.quiet and args.json != "-":
        from .cli import table

        print(table(_rows(records), COLUMNS))
        for line in summary_lines(payload["summary"]):
            print(line)
    return 0
