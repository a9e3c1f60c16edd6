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

BACKENDS = ("torch", "torch-static", "onnxruntime", "tensorrt")
TORCH_BACKENDS = ("torch", "torch-static")  # run on --device in --dtype; the others export fp32 from the CPU model
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
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
    cuda: bool = False  # torch on a GPU: synchronise before reading a clock; memory from torch.cuda

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def vision(self) -> None: ...

    def token(self, state: Any) -> int:
        """The greedy token a prefill/decode state holds (the memory pass records them)."""
        raise NotImplementedError

    def margin(self, state: Any) -> float | None:
        """Top-1 minus top-2 logit of a state (None where the state holds no logits): a
        divergence between backends where this is tiny is a near tie, not a routing error."""
        return None

    def decisions(self, state: Any) -> list[list[int]] | None:
        """Per stage, the kept visual indices of a prefill state (None: not exposed)."""
        return None

    def prefill(self) -> Any: ...

    def decode(self, state: Any, step: int) -> Any: ...

    def close(self) -> None: ...

    def one_pass(self, samples: Samples, decode_tokens: int, timed: bool = True) -> None:
        """Vision, prefill and `decode_tokens` greedy decode steps; times kept if `timed`."""
        self.sync()
        v_ms, _ = _ms(lambda: (self.vision(), self.sync()))
        p_ms, p_cpu, (state, _) = _ms_cpu(lambda: (self.prefill(), self.sync()))
        if not timed:
            self.routing = self.decisions(state)
        d_ms, tokens, margins = [], [self.token(state)] if not timed else [], [self.margin(state)]
        for step in range(decode_tokens):
            ms, (state, _) = _ms(lambda: (self.decode(state, step), self.sync()))
            d_ms.append(ms)
            if not timed:
                tokens.append(self.token(state))
                margins.append(self.margin(state))
        if not timed:
            self.tokens, self.margins = tokens, margins
        if timed:
            samples.vision_ms.append(v_ms)
            samples.prefill_ms.append(p_ms)
            samples.prefill_cpu_ms.append(p_cpu)
            samples.decode_ms.extend(d_ms)

    def memory_pass(self, samples: Samples, decode_tokens: int) -> None:
        """One untimed pass whose peak RSS growth is this runner's working memory."""
        gc.collect()
        if self.cuda:  # device memory: torch's allocator peak over what was allocated before
            import torch

            self.sync()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
            self.one_pass(samples, decode_tokens, timed=False)
            samples.peak_mb.append((torch.cuda.max_memory_allocated() - start) / 2**20)
            return
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
        self.cuda = inputs.input_ids.device.type == "cuda"
        self.extra = {}

    def vision(self) -> None:
        with self.torch.no_grad():
            self.loaded.family.image_features(self.loaded.model, self.inputs)

    def token(self, state: Any) -> int:
        return int(state[0][0].argmax())

    def margin(self, state: Any) -> float | None:
        return _top2_margin(state[0][0])

    def decisions(self, state: Any) -> list[list[int]] | None:
        return [d[0].tolist() for d in state[3]]

    def prefill(self) -> Any:
        pre = self.routed.prefill(self.inputs)
        return pre.logits, pre.next_position.clone(), pre.cache, pre.decisions

    def decode(self, state: Any, step: int) -> Any:
        logits, pos, cache = state[:3]
        logits = self.routed.decode_step(logits.argmax(-1), pos, cache)
        return logits, pos + 1, cache


class StaticRunner(Runner):
    """The static-shape rewrite (`rewrite.decoder.StaticPrefill` / `StaticDecode`: the modules
    the ONNX graphs are exported from) run by torch.

    On a GPU, prefill and every decode step are captured once as CUDA graphs and replayed:
    every shape is fixed by the plan, so the whole greedy chain (prefill -> argmax ->
    embedding -> decode step -> ...) replays with no host synchronisation, which the eager
    reference's data-dependent shapes (nonzero, per-sample index sets) rule out. Each
    runner's graphs share one private memory pool (replayed in capture order). On the CPU
    the same modules run eagerly.
    """

    def __init__(self, loaded: "Loaded", plan: Any, inputs: Any, decode_tokens: int) -> None:
        import torch

        from .rewrite.decoder import static_decode, static_prefill

        self.torch, self.loaded, self.inputs = torch, loaded, inputs
        model, fam = loaded.model, loaded.family
        device = inputs.input_ids.device
        with torch.no_grad():
            self.embeds = fam.embed(model, inputs)  # built once, outside the timer (as TorchRunner)
            self.positions = fam.positions(model, inputs)
        vis = (inputs.input_ids[0] == fam.image_token_id(model)).nonzero()
        self.visual_start = vis[:1, 0].clone()  # (1,) the contiguous visual block's first position
        self.layers = plan.num_layers
        first = int(self.positions.max()) + 1
        shape = (3, 1, 1) if fam.position_dims == 3 else (1, 1)
        self.step_positions = [torch.full(shape, first + i, dtype=torch.long, device=device)
                               for i in range(decode_tokens)]
        self.embed_tokens = fam.decoder(model).embed_tokens
        self.prefill_module = static_prefill(model, fam, plan)
        self.decode_module = static_decode(model, fam, plan)
        self.cuda = device.type == "cuda"
        self.graphs: list[Any] = []
        self.extra = {"cuda_graphs": False}
        if self.cuda:
            try:
                self._capture(decode_tokens)
            except RuntimeError as e:  # say so in the record and measure the modules eagerly
                self.graphs, self.outputs = [], []
                self.extra = {"cuda_graphs": False, "capture_error": f"{type(e).__name__}: {str(e)[:300]}"}

    def _prefill_eager(self) -> Any:
        out = self.prefill_module(self.embeds, self.positions, self.visual_start)
        return out[0], out[1:1 + 2 * self.layers], out[1 + 2 * self.layers:]

    def _decode_eager(self, state: Any, step: int) -> Any:
        logits, kv = state[:2]
        x = self.embed_tokens(logits.argmax(-1).view(-1, 1))  # greedy, on the device
        out = self.decode_module(x, self.step_positions[step], *kv)
        return out[0], out[1:]

    def _capture(self, decode_tokens: int) -> None:
        torch = self.torch
        before = torch.cuda.memory_allocated()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside capture: cuBLAS handles, workspaces, lazy inits
                state = self._prefill_eager()
                for i in range(decode_tokens):
                    state = self._decode_eager(state, i)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        pool = torch.cuda.graph_pool_handle()
        t0 = time.perf_counter()
        with torch.no_grad():
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                state = self._prefill_eager()
            self.graphs.append(g)
            self.outputs = [state]
            for i in range(decode_tokens):
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    state = self._decode_eager(state, i)
                self.graphs.append(g)
                self.outputs.append(state)  # kept alive: the next step's inputs live here
        torch.cuda.synchronize()
        self.extra = {"cuda_graphs": True, "graphs": len(self.graphs),
                      "capture_s": round(time.perf_counter() - t0, 3),
                      "graph_pool_mb": round((torch.cuda.memory_allocated() - before) / 2**20, 1)}

    def vision(self) -> None:
        with self.torch.no_grad():
            self.loaded.family.image_features(self.loaded.model, self.inputs)

    def token(self, state: Any) -> int:
        return int(state[0].argmax(-1)[0])

    def margin(self, state: Any) -> float | None:
        return _top2_margin(state[0][0])

    def decisions(self, state: Any) -> list[list[int]] | None:
        return [d[0].tolist() for d in state[2]]

    def prefill(self) -> Any:
        if self.graphs:
            self.graphs[0].replay()
            return self.outputs[0]
        with self.torch.no_grad():
            return self._prefill_eager()

    def decode(self, state: Any, step: int) -> Any:
        if self.graphs:
            self.graphs[1 + step].replay()
            return self.outputs[1 + step]
        with self.torch.no_grad():
            return self._decode_eager(state, step)

    def close(self) -> None:
        self.graphs.clear()
        self.outputs = []


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

    def token(self, state: Any) -> int:
        return int(self.np.argmax(state[0]))

    def margin(self, state: Any) -> float | None:
        top = self.np.sort(state[0])[-2:]
        return float(top[1] - top[0])

    def decisions(self, state: Any) -> list[list[int]] | None:
        return [d.tolist() for d in state[2]]

    def prefill(self) -> Any:
        out = self.art.run_prefill(self.feeds)
        return out["logits"], out["kv"], out["decisions"]

    def decode(self, state: Any, step: int) -> Any:
        logits, kv = state[:2]
        logits, kv = self.art.decode_step(int(self.np.argmax(logits)), self.next_position + step, kv)
        return logits, kv

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
    device: str = "cpu"  # where the torch backends run ("cuda", "cuda:1", ...)
    dtype: str | None = None  # torch backends' weights: fp32 on the CPU, fp16 on a GPU by default
    random_weights: bool = False  # a real architecture (llava-1.5-7b) with seeded random weights

    @property
    def torch_dtype(self) -> str:
        return self.dtype or ("fp32" if self.device == "cpu" else "fp16")


def _check_config(cfg: BenchConfig) -> None:
    bad = [m for m in cfg.methods if m not in METHODS]
    if bad or not cfg.methods:
        raise UserError(f"unknown method(s) {', '.join(bad) or '(none given)'}; known: {', '.join(METHODS)}")
    bad = [b for b in cfg.backends if b not in BACKENDS]
    if bad or not cfg.backends:
        raise UserError(f"unknown backend(s) {', '.join(bad) or '(none given)'}; known: {', '.join(BACKENDS)}")
    if len(set(cfg.methods)) != len(cfg.methods) or len(set(cfg.backends)) != len(cfg.backends):
        raise UserError("--methods and --backends take each name once")
    if cfg.torch_dtype not in DTYPES:
        raise UserError(f"unknown --dtype {cfg.torch_dtype}; known: {', '.join(DTYPES)}")
    if cfg.device != "cpu":
        import torch

        if not cfg.device.startswith("cuda") or not torch.cuda.is_available():
            raise UserError(f"--device {cfg.device}: no CUDA device here (torch {torch.__version__}, "
                            f"cuda available: {torch.cuda.is_available()}); use --device cpu")
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


def _top2_margin(logits: Any) -> float:
    top = logits.float().topk(2).values
    return float(top[0] - top[1])


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
    device: str = "cpu",
    dtype: str | None = None,
    random_weights: bool = False,
) -> list[dict[str, Any]]:
    """One record per (method, backend); see the module docstring for what is measured."""
    cfg = BenchConfig(model_name, float(budget), tuple(methods), tuple(backends), int(repeats), int(warmup),
                      int(threads), int(decode_tokens), Path(artifacts) if artifacts else None, device, dtype,
                      random_weights)
    _check_config(cfg)
    import torch

    from .plan import plan_report
    from .progress import Steps
    from .registry import load

    torch_dtype = getattr(torch, DTYPES[cfg.torch_dtype])
    loaded = load(cfg.model, torch_dtype, cfg.device, random_weights=cfg.random_weights)
    plans = _plans(loaded, cfg)  # bad budgets fail here, before any timing
    inputs = bench_inputs(loaded)
    n = plans[cfg.methods[0]].visual_tokens
    text_tokens = int(inputs.input_ids.shape[1]) - n
    reports = {m: plan_report(loaded.spec, p, text_tokens) for m, p in plans.items()}
    skipped = {b: why for b in cfg.backends if b == "tensorrt" and (why := _tensorrt_skip())}
    if cfg.device != "cpu" or cfg.torch_dtype != "fp32" or cfg.random_weights:
        for b in cfg.backends:  # the artifact backends export from an fp32 CPU model: not this one
            if b not in TORCH_BACKENDS:
                skipped[b] = (f"skipped: {b} exports the fp32 CPU model; this run holds the torch backends' "
                              f"{cfg.torch_dtype} model on {cfg.device}" + (" with random weights" if cfg.random_weights
                                                                            else "") + " (run it separately)")
    live = [b for b in BACKENDS if b in cfg.backends and b not in skipped]  # torch first: it exports nothing
    rounds = cfg.warmup + cfg.repeats
    exports = sum(b not in TORCH_BACKENDS for b in live) * len(cfg.methods) + ("torch-static" in live)
    steps = Steps(len(live) * (rounds + 1) + exports, quiet=not progress, title="bench")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    results: dict[tuple[str, str], tuple[Samples, Runner]] = {}
    tmp = None
    try:
        for backend in live:
            try:
                if backend == "torch":
                    runners: dict[str, Runner] = {m: TorchRunner(loaded, plans[m], inputs.to(cfg.device))
                                                  for m in cfg.methods}
                elif backend == "torch-static":
                    with steps.step("torch-static: build" + (" and capture CUDA graphs" if cfg.device != "cpu"
                                                             else "")):
                        runners = {m: StaticRunner(loaded, plans[m], inputs.to(cfg.device), cfg.decode_tokens)
                                   for m in cfg.methods}
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
                            "greedy_tokens": getattr(runner, "tokens", None),
                            "top2_margins": getattr(runner, "margins", None),
                            "decisions": getattr(runner, "routing", None), **runner.extra})
    _add_measured_speedup(records)
    return records


def _record_base(cfg: BenchConfig, loaded: "Loaded", plan: Any, rep: dict[str, Any], method: str, backend: str,
                 inputs: Any) -> dict[str, Any]:
    return {
        "model": loaded.spec.name, "method": method, "backend": backend,
        "device": cfg.device if backend in TORCH_BACKENDS else ("cuda" if backend == "tensorrt" else "cpu"),
        "dtype": cfg.torch_dtype if backend in TORCH_BACKENDS else "fp32",
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
    out["greedy_tokens_agree"] = _tokens_agree(records)
    t, st = _find(records, "reroute", "torch"), _find(records, "reroute", "torch-static")
    if t is not None and st is not None:
        out["static_over_eager"] = t["prefill_ms_p50"] / st["prefill_ms_p50"]
        out["static_over_eager_decode"] = t["decode_ms_per_token"] / st["decode_ms_per_token"]
    o = _find(records, "reroute", "onnxruntime")
    if t is not None and o is not None:
        ratio = t["prefill_ms_p50"] / o["prefill_ms_p50"]
        out["onnxruntime_over_torch"] = ratio
        out["onnxruntime_over_torch_met"] = ratio >= TARGETS["onnxruntime_over_torch"]
    return out


def _tokens_agree(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method and backend against the first backend (the eager torch reference when it
    ran), from the memory pass: the fraction of greedy tokens equal up to the first
    difference, the reference's top-2 logit margin at that step, whether the routing
    decisions are identical (backends that expose them)."""
    out: dict[str, dict[str, Any]] = {}
    for m in dict.fromkeys(r["method"] for r in records):
        runs = [r for r in records if r["method"] == m and r.get("status") == "ok" and r.get("greedy_tokens")]
        runs.sort(key=lambda r: r["backend"] != "torch")  # the eager reference first when it ran
        if len(runs) < 2:
            continue
        ref = runs[0]["greedy_tokens"]
        for r in runs[1:]:
            got = r["greedy_tokens"]
            same = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
            entry: dict[str, Any] = {"tokens_equal_fraction": same / max(1, len(ref))}
            margins = runs[0].get("top2_margins") or []
            if same < len(ref) and same < len(margins) and margins[same] is not None:
                entry["first_difference"] = same
                entry["reference_top2_margin_there"] = margins[same]
            if runs[0].get("decisions") is not None and r.get("decisions") is not None:
                entry["decisions_equal"] = runs[0]["decisions"] == r["decisions"]
            out.setdefault(m, {})[f"{r['backend']}_vs_{runs[0]['backend']}"] = entry
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
            lines.append(f"{backend}: reroute prefill {speed_text(e['reroute_speedup_vs_none'])} than none; "
                         f"theoretical {e['theoretical_speedup']:.2f}x -> {e['fraction_of_theoretical']:.2f} of it "
                         f"(target >= {t['fraction_of_theoretical']}: {_met(e['fraction_of_theoretical_met'])})")
        if "reroute_over_pdrop" in e:
            lines.append(f"{backend}: reroute prefill / pdrop prefill = {e['reroute_over_pdrop']:.3f} "
                         f"(target <= {t['reroute_over_pdrop']}: {_met(e['reroute_over_pdrop_met'])})")
    for m, agree in summary.get("greedy_tokens_agree", {}).items():
        lines.append(f"{m}: " + "; ".join(_agree_text(k, v) for k, v in agree.items()))
    if "static_over_eager" in summary:
        lines.append(f"reroute, torch eager / torch-static: prefill {summary['static_over_eager']:.2f}x, "
                     f"decode {summary['static_over_eager_decode']:.2f}x")
    if "onnxruntime_over_torch" in summary:
        lines.append(f"reroute prefill, torch eager / onnxruntime = {summary['onnxruntime_over_torch']:.2f}x "
                     f"(target >= {t['onnxruntime_over_torch']}: {_met(summary['onnxruntime_over_torch_met'])})")
    return lines


def speed_text(speedup: float) -> str:
    """none's time over ours as words that are true either way: 1.82x faster, or 1.82x slower
    (a 0.55x "speedup" is a slowdown, and "0.55x faster" says the opposite)."""
    if speedup >= 1:
        return f"{speedup:.2f}x faster"
    return f"{1 / speedup:.2f}x slower"  # both times are measured, so speedup > 0


def _agree_text(pair: str, e: dict[str, Any]) -> str:
    text = f"{pair}: greedy tokens equal for {e['tokens_equal_fraction']:.2f} of the steps"
    if "first_difference" in e:
        text += (f" (first difference at step {e['first_difference']}, where the reference's top-2 logit "
                 f"margin is {e['reference_top2_margin_there']:.3g})")
    if "decisions_equal" in e:
        text += f", routing decisions {'identical' if e['decisions_equal'] else 'DIFFERENT'}"
    return text


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
        f"torch {m['torch']}, onnxruntime {m['onnxruntime']}. Torch backends on {b.get('device', 'cpu')} in "
        f"{b.get('dtype', 'fp32')}{' (random weights)' if b.get('random_weights') else ''}. "
        f"Threads {b['threads']}, warm-up {b['warmup']}, "
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
                   help="comma-separated: torch,torch-static,onnxruntime,tensorrt (default: torch,onnxruntime); "
                        "torch-static runs the export's static-shape modules, as CUDA graphs on a GPU")
    p.add_argument("--device", default="cpu", help="where the torch backends run: cpu (default) or cuda[:N]")
    p.add_argument("--dtype", choices=list(DTYPES), help="torch backends' weights (default fp32 on cpu, fp16 on cuda)")
    p.add_argument("--random-weights", action="store_true",
                   help="a registered real architecture (e.g. llava-1.5-7b) at full size with seeded random "
                        "weights, built in --dtype on --device; no checkpoint needed")
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
                        decode_tokens=args.decode_tokens, artifacts=args.artifacts, device=args.device,
                        dtype=args.dtype, random_weights=args.random_weights)
    payload = {
        "bench": {"model": args.model, "budget": args.budget, "methods": list(args.methods),
                  "backends": list(args.backends), "repeats": args.repeats, "warmup": args.warmup,
                  "threads": args.threads, "decode_tokens": args.decode_tokens, "device": args.device,
                  "dtype": args.dtype or ("fp32" if args.device == "cpu" else "fp16"),
                  "random_weights": args.random_weights},
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
