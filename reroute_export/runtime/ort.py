"""Run an exported artifact with ONNX Runtime: vision -> routed prefill -> greedy decode.

Everything outside the graphs happens here on the host, in numpy: the embedding lookup
(the table ships as embed_tokens.npy, memory-mapped), writing image features into the
image-token slots, the family's position ids; runtime/segmented.py drives the decoder's
graphs (segments, decision heads, routing graphs: each weight in one session) and keeps
the fixed per-layer KV buffers, allocated once per run (of the run's length where it is
known: `generate`, `bind(inputs, new_tokens)`) and written in place.

Threads: ONNX Runtime's default intra-op pool, or REROUTE_EXPORT_THREADS if set.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import onnxruntime as ort
import PIL.Image

# Nothing here may import torch or transformers, even indirectly: an artifact runs on an
# install of numpy, Pillow, tokenizers and onnxruntime alone (tests/test_runtime_torchfree.py).
from ..errors import GraphRunError, UserError
from .. import contract as C
from ..export.artifact import read_manifest
from ..inputs import ArrayInputs
from ..plan import RoutingPlan
from ..families import get_family
from ..results import TraceResult
from .base import State
from .segmented import Cache, Decoder, Layout
from .positions import next_position
from .processor import ArtifactProcessor

if TYPE_CHECKING:
    from ..preprocess import VLInputs

    # numpy (this runtime's processor, .npy files) or torch tensors (the eager side's Preprocessor)
    Inputs = ArrayInputs | VLInputs

THREADS_ENV = "REROUTE_EXPORT_THREADS"

_ELEMENT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(bfloat16)": np.float32,  # numpy has no bf16; ORT would refuse the feed anyway
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
}
MANIFEST_KEYS = ("family", "plan", "shapes", "image_token_id")
BUCKET = "bucket"  # prefill_feeds' host-side entry: the image-size bucket the input runs in


def vision_tables(folder: Path, buckets: int) -> list[dict[str, np.ndarray]]:
    """Each bucket's vision tables (Qwen2.5-VL, contract.VISION_TABLES), read once; [{}...]
    for a vision graph that takes the pixels alone."""
    path = Path(folder) / C.PREPROCESSOR / C.VISION_GRIDS
    if not path.is_file():
        return [{} for _ in range(buckets)]
    with np.load(path) as z:
        out = [{n: z[f"b{k}.{n}"] for n in C.VISION_TABLES if f"b{k}.{n}" in z.files} for k in range(buckets)]
    if not all(out):
        raise UserError(f"artifact {folder}: {C.PREPROCESSOR}/{C.VISION_GRIDS} lacks a bucket's tables; re-export it")
    return out


def _route_role(bucket: int):
    """Decision j -> the routing graph of `bucket` (bucket 0 keeps the plain names)."""
    return lambda j: C.route(j, bucket or None)


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it, CPU always as the fallback."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def _threads() -> int:
    threads = os.environ.get(THREADS_ENV)
    if not threads:
        return 0  # ORT's default: one per core
    try:
        return int(threads)
    except ValueError:
        raise UserError(f"{THREADS_ENV} must be an integer, got {threads!r}") from None


def _session_options(fp16_on_cpu: bool = False) -> ort.SessionOptions:
    """Per-session options. Each session has its own intra-op pool. Its workers spin between
    the ops of a run (a worker put to sleep pays a wake-up on every parallel op) and stop
    spinning as the run returns: a decode step runs the segment and head sessions one after
    another, and workers still spinning after their session's run would take the cores from
    the next session's (left spinning, 9 sessions on 2 cores made a decode step 5x slower;
    never spinning made it 4-22 % slower than this; bench-llava, BENCHMARKS.md). A
    process-wide pool would avoid both, but it forces every ORT session in the process, the
    user's own included, to use it: not a library's call to make.
    """
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: provider-placement notes are not the user's concern
    opts.intra_op_num_threads = _threads()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    if fp16_on_cpu:
        # The CPU provider has no fp16 MatMul here: ORT wraps fp16 nodes in Casts, and any
        # graph optimisation level turns every weight's Cast into an fp32 copy at load (2x the
        # stored bytes: a 7B fp16 artifact needs 27 GB). With optimisations off the weights stay
        # fp16 in memory and each node casts its own weight when it runs (BENCHMARKS.md).
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        # ...but the default topological order runs every weight's Cast first (they depend on
        # nothing), so all of a segment's fp32 copies are alive at once; priority order casts
        # each weight just before its MatMul (7B segment of 1.8 GB: peak 3.5 -> 2.2 GB).
        opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        # and no per-session arena: each would keep its own peak of fp32 weight copies
        # (thirteen sessions at 7B: 6.7 GB held after use); freed copies go back at once
        opts.enable_cpu_mem_arena = False
    return opts


def _fp16_on_load(manifest: dict[str, Any], role: str) -> bool:
    """Whether graph `role` gets the fp16-on-CPU session options (weights kept fp16, each cast
    when its node runs). Every graph of an fp16 artifact (else a 7B does not fit); of a
    weight-only artifact quantized from fp16, only the vision graph: it runs once per image,
    and folding its Casts kept fp32 copies beside the fp16 weights (7B int4: +1.45 GiB RSS),
    while the segments and heads, run every decode step, keep ORT's folded fp32 copies of
    their few float weights (LM head, norms): casting those each step made 7B int4 decode 2x
    slower (BENCHMARKS.md)."""
    if manifest.get("precision") == "fp16":
        return True
    return (manifest.get("quantization") or {}).get("activations") == "fp16" and role.split(".")[0] == C.vision()


def _numpy(x: Any) -> np.ndarray:
    """torch tensors (VLInputs fields) or arrays (ArrayInputs) -> numpy, without importing torch."""
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


class Graph:
    """One ORT session fed by name, each input cast to the element type the graph declares
    (fp32 or fp16 graphs take the same host arrays)."""

    def __init__(self, path: Path, providers: list[str], fp16: bool = False, model: bytes | None = None) -> None:
        """`model`: an in-memory edit of the file at `path` (check/layers.py adds outputs to a
        segment), its external weights still read from beside `path`."""
        self.name = path.name
        self.on_cpu = providers[0] == "CPUExecutionProvider"
        opts = _session_options(fp16_on_cpu=fp16 and providers[0] == "CPUExecutionProvider")
        if model is not None:
            opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
        try:
            self.session = ort.InferenceSession(str(path) if model is None else model, opts, providers=providers)
        except Exception as e:  # noqa: BLE001  (ORT raises its own exception zoo)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot load {path}: {first}") from None
        self.input_types = {i.name: _ELEMENT_TYPES.get(i.type, np.float32) for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        # fused attention forms: present.{i}.* is written into past.{i}.*'s memory (in place, CPU)
        prefix = C.present(0, "key").removesuffix("0.key")
        self.aliases = {o: C.PAST_PREFIX + o.removeprefix(prefix) for o in self.output_names
                        if o.startswith(prefix) and self.on_cpu}

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(self.input_types[name])

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Feeds the graph does not declare are dropped (an exporter may prune an unused
        input); one it declares but is not given is a contract break."""
        missing = sorted(set(self.input_types) - set(feeds))
        if missing:
            raise RuntimeError(f"{self.name} wants inputs {missing} that the runtime does not provide")
        cast = {n: np.ascontiguousarray(feeds[n], dtype=t) for n, t in self.input_types.items()}
        try:
            if self.aliases:
                return self._run_in_place(cast)
            outputs = self.session.run(None, cast)
        except Exception as e:  # noqa: BLE001  (ORT's runtime errors carry the failing node's name)
            text = str(e).strip()
            detail = text[text.find("running "):] if "running " in text else text.splitlines()[0] if text else ""
            raise GraphRunError(f"{self.name} failed in ONNX Runtime: {detail}") from None
        return dict(zip(self.output_names, outputs))

    def _run_in_place(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """IO binding: each present buffer is bound to its past buffer's memory, so the graph's
        KV write (GroupQueryAttention, TensorScatter) lands in the host's buffer and nothing is
        copied; the other outputs come back as usual."""
        io = self.session.io_binding()
        for name, a in feeds.items():
            io.bind_input(name, "cpu", 0, a.dtype, a.shape, a.ctypes.data)
        for name in self.output_names:
            if name in self.aliases:
                a = feeds[self.aliases[name]]
                io.bind_output(name, "cpu", 0, a.dtype, a.shape, a.ctypes.data)
            else:
                io.bind_output(name, "cpu")
        self.session.run_with_iobinding(io)
        got = dict(zip(self.output_names, io.get_outputs()))  # OrtValues: read only the unaliased ones
        return {name: feeds[self.aliases[name]] if name in self.aliases else got[name].numpy()
                for name in self.output_names}


@dataclass
class _Checked:
    """Validated batch-1 inputs in numpy."""

    ids: np.ndarray  # (L,) int64
    grid: np.ndarray | None  # (1, 3) Qwen2.5-VL image grid, else None
    visual_start: int
    bucket: int  # which of the artifact's image sizes (0: the only one, or the export sample's)


class OrtArtifact:
    """An artifact folder loaded for inference: manifest, plan, preprocessor, one session per
    graph. A `runtime.base.Runtime` (bind, trace, close)."""

    backend = "onnxruntime"
    # The segments take any past length, so a run that says how many tokens it will generate
    # gets buffers of its own prompt + those tokens, not the artifact's M_s: attention reads
    # every buffer row (masked past past_length) in the portable form, so on bench-llava the
    # default M_s (N + 512 prompt tokens + 256 new) held 5x the rows a 617-token prompt and 16 new use.
    sized_buffers = True
    manifest: dict[str, Any]
    plan: RoutingPlan
    family: str
    preprocessor: ArtifactProcessor

    def __init__(self, folder: Path, manifest: dict[str, Any], graphs: dict[str, Graph],
                 embed_tokens: np.ndarray, preprocessor: ArtifactProcessor) -> None:
        self.folder, self.manifest = folder, manifest
        self.plan = RoutingPlan.from_dict(manifest["plan"])
        self.family = manifest["family"]
        self.host = get_family(self.family)  # the family's host-side rules (positions, grid)
        self.preprocessor = preprocessor
        self.embed_tokens = embed_tokens  # (V, D), memory-mapped
        self.graphs = graphs  # role -> session: vision, segment.s, head.j, route.j(.bk)
        first = graphs[C.segment(0)]
        self.embed_dtype = first.dtype(C.HIDDEN)
        kv_types = {}
        for s in range(len(self.plan.segments)):
            kv_types.update({i: graphs[C.segment(s)].dtype(C.past(i, "key")) for i in self.plan.segments[s]})
        self.layout = Layout(self.plan, list(manifest["shapes"]["cache_tokens"]), int(manifest["shapes"]["num_kv_heads"]),
                             int(manifest["shapes"]["head_dim"]), [kv_types[i] for i in range(self.plan.num_layers)],
                             self.host.position_dims, manifest["decoder"].get("attention", C.PORTABLE))
        # visual-token buckets (Qwen2.5-VL): per image size its grid, plan (N_k, K_j), vision
        # tables and routing graphs; the vision graph, segments and heads are shared. One bucket when none were exported.
        raw = manifest.get("buckets") or [{"grid": manifest.get("image_grid_thw"), "plan": manifest["plan"],
                                           "max_prompt_tokens": manifest["shapes"]["max_prompt_tokens"]}]
        self.bucket_grids = [None if b["grid"] is None else np.asarray(b["grid"], dtype=np.int64).reshape(1, 3)
                             for b in raw]
        self.bucket_plans = [RoutingPlan.from_dict(b["plan"]) for b in raw]
        self.bucket_limits = [int(b["max_prompt_tokens"]) for b in raw]
        self.vision_tables = vision_tables(folder, len(raw))  # fed with each bucket's pixels
        self.decoders = [Decoder(replace(self.layout, plan=p), self._call, route_role=_route_role(k))
                         for k, p in enumerate(self.bucket_plans)]
        self.decoder = self.decoders[0]

    def _call(self, role: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.graphs[role](feeds)

    @classmethod
    def load(cls, folder: Path, providers: list[str] | None = None, *, verify: bool = True) -> "OrtArtifact":
        folder = Path(folder)
        manifest = read_manifest(folder, verify=verify)
        lacking = [k for k in MANIFEST_KEYS if k not in manifest]
        if lacking:
            raise UserError(f"artifact {folder}: manifest lacks {', '.join(lacking)}; re-export it")
        if "decoder" not in manifest or C.segment(0) not in manifest.get("graphs", {}):
            raise UserError(f"artifact {folder} has no segment graphs (an earlier layout); re-export it")
        providers = providers or default_providers()

        def graph(role: str, name: str) -> Graph:
            return Graph(folder / name, providers, fp16=_fp16_on_load(manifest, role))

        graphs = {role: graph(role, name) for role, name in manifest["graphs"].items()}
        embed = np.load(folder / C.EMBEDDINGS, mmap_mode="r")  # (V, D): GBs for 7B; page in on use
        pre = ArtifactProcessor.load(folder / C.PREPROCESSOR, manifest["family"])
        return cls(folder, manifest, graphs, embed, pre)

    # ------------------------------------------------------------ inputs

    @property
    def shapes(self) -> dict[str, Any]:
        return self.manifest["shapes"]

    def _check_length(self, length: int, bucket: int = 0) -> None:
        limit = self.bucket_limits[bucket]
        if length > limit:
            raise UserError(f"prompt has {length} tokens; this artifact takes at most {limit}")

    def prepare(self, image: PIL.Image.Image, prompt: str) -> ArrayInputs:
        """(image, prompt) -> model inputs (numpy) with the artifact's own tokenizer and image
        processor; `.to_torch()` gives the eager reference the very same inputs."""
        inputs = self.preprocessor(image, prompt)
        self._check_length(int(inputs.input_ids.shape[1]), self._bucket_of(inputs.image_grid_thw))
        return inputs

    def _check(self, inputs: Inputs) -> _Checked:
        """One-line errors for inputs this artifact cannot run, before any graph sees them."""
        ids = _numpy(inputs.input_ids).astype(np.int64)  # (1, L)
        if ids.ndim != 2 or ids.shape[0] != 1:
            raise UserError(f"an artifact runs one prompt at a time (input ids [1, L]), got {list(ids.shape)}")
        if inputs.attention_mask is not None and not _numpy(inputs.attention_mask).all():
            raise UserError("padded inputs are not supported: give one unpadded prompt")
        ids = ids[0]  # (L,)
        bucket = self._bucket_of(inputs.image_grid_thw)
        self._check_length(len(ids), bucket)
        vocab = self.embed_tokens.shape[0]
        if ids.min() < 0 or ids.max() >= vocab:
            raise UserError(f"input ids hold token ids outside the vocabulary (0..{vocab - 1})")
        return _Checked(ids, self.bucket_grids[bucket], self._visual_start(ids, bucket), bucket)

    def _visual_start(self, ids: np.ndarray, bucket: int = 0) -> int:
        """Index of the first of N contiguous image tokens (the prefill graph's contract)."""
        slots = np.flatnonzero(ids == int(self.manifest["image_token_id"]))  # (N,)
        n = self.bucket_plans[bucket].visual_tokens
        if len(slots) != n:
            raise UserError(f"the prompt holds {len(slots)} image tokens; this artifact was exported for {n}")
        if n and slots[-1] - slots[0] != n - 1:
            raise UserError("the image tokens must form one contiguous block")
        return int(slots[0]) if n else 0

    def plan_for(self, inputs: Inputs) -> RoutingPlan:
        """The routing plan this artifact runs `inputs` with: the plan of the image-size bucket
        their grid is (N and K_j at that size; `plan` itself for every input of an artifact
        without buckets). What an eager reference must run to be compared with it."""
        return self.bucket_plans[self._bucket_of(inputs.image_grid_thw)]

    def _bucket_of(self, given: Any) -> int:
        """Qwen2.5-VL: each vision graph is static, so the grid must be one the artifact was
        exported for (its preprocessor resizes every image to the nearest of them)."""
        if self.bucket_grids[0] is None or given is None:
            return 0
        grid = _numpy(given).reshape(-1, 3)
        for k, fixed in enumerate(self.bucket_grids):
            if np.array_equal(grid, fixed):
                return k
        known = ", ".join(str(g[0].tolist()) for g in self.bucket_grids)
        if len(self.bucket_grids) == 1:
            raise UserError(f"image grid {grid.reshape(-1).tolist()} differs from the exported grid {known}; "
                            f"use the artifact's preprocessor")
        raise UserError(f"image grid {grid.reshape(-1).tolist()} is none of the artifact's grids ({known}); "
                        f"use the artifact's preprocessor")

    # ------------------------------------------------------------ prefill

    def _positions(self, c: _Checked) -> np.ndarray:
        """The unpruned model's position ids: (1, L) or (3, 1, L)."""
        return self.host.host_positions(c.ids, c.grid, self.manifest)

    def _embeds(self, c: _Checked, pixel_values: Any) -> np.ndarray:
        """(1, L, D) token embeddings with the vision graph's features in the image slots."""
        dtype = self.embed_dtype
        feats = self.run_vision(pixel_values, c.bucket)  # (N, D)
        embeds = self.embed_tokens[c.ids].astype(dtype)  # (L, D): fancy indexing copies from the mmap
        n = self.bucket_plans[c.bucket].visual_tokens
        if feats.shape[0] != n:
            raise RuntimeError(f"{C.VISION} gave {feats.shape[0]} image features; the plan is for {n}")
        embeds[c.visual_start:c.visual_start + n] = feats.astype(dtype)
        return embeds[None]  # (1, L, D)

    def run_vision(self, pixel_values: Any, bucket: int = 0) -> np.ndarray:
        """A vision graph alone: (N, D) image features, as float32."""
        out = self.graphs[C.vision()]({C.PIXEL_VALUES: _numpy(pixel_values), **self.vision_tables[bucket]})
        return out[C.IMAGE_FEATURES].reshape(-1, self.embed_tokens.shape[1]).astype(np.float32)

    def prefill_feeds(self, inputs: Inputs) -> dict[str, np.ndarray]:
        """The host side of prefill: checked inputs -> the prefill graph's feeds (vision runs here)."""
        c = self._check(inputs)
        return {
            C.INPUTS_EMBEDS: self._embeds(c, inputs.pixel_values),
            C.POSITION_IDS: self._positions(c),  # (1, L) or (3, 1, L)
            C.VISUAL_START: np.array([c.visual_start], dtype=np.int64),  # (1,)
            BUCKET: np.array(c.bucket),  # host-side: which image size's routing graphs run
        }

    def buffer_rows(self, feeds: dict[str, np.ndarray], new_tokens: int | None) -> list[int] | None:
        """The KV buffer rows per stage a run on `feeds` generating `new_tokens` gets: sized to
        the run where the backend allows it and the count is known, else None (M_s)."""
        if new_tokens is None or not self.sized_buffers:
            return None
        decoder = self.decoders[int(feeds.get(BUCKET, 0))]
        return decoder.layout.rows_for(int(feeds[C.INPUTS_EMBEDS].shape[1]), new_tokens)

    def run_prefill(self, feeds: dict[str, np.ndarray], new_tokens: int | None = None) -> dict[str, Any]:
        """The routed prefill on prepared feeds: last logits (V,), the filled KV buffers,
        decisions, next position. `new_tokens`: at most that many tokens will be generated
        (buffers sized to the run); None: any number up to the artifact's limit."""
        decoder = self.decoders[int(feeds.get(BUCKET, 0))]
        logits, cache, decisions = decoder.prefill(feeds[C.INPUTS_EMBEDS], feeds[C.POSITION_IDS],
                                                   int(feeds[C.VISUAL_START][0]), self.buffer_rows(feeds, new_tokens))
        return {
            "logits": logits.reshape(-1).astype(np.float32),  # (V,)
            "kv": cache,
            "decisions": [d.reshape(-1).astype(np.int64) for d in decisions],
            "next_position": next_position(feeds[C.POSITION_IDS]),
            "plan": decoder.plan,  # the input's image-size bucket's (N, K_j)
        }

    def prefill(self, inputs: Inputs, new_tokens: int | None = None) -> dict[str, Any]:
        """Vision + routed prefill: last logits (V,), per-layer KV, decisions, next position
        (`new_tokens` as in run_prefill)."""
        return self.run_prefill(self.prefill_feeds(inputs), new_tokens)

    # ------------------------------------------------------------ decoding

    def decode_step(self, token: int, position: int, kv: Cache) -> tuple[np.ndarray, Cache]:
        """One token at `position` (all three mRoPE rows alike) against the KV buffers, which
        it extends in place by one row: logits (V,) and the same cache."""
        embed = np.asarray(self.embed_tokens[token], dtype=self.embed_dtype)[None, None, :]  # (1, 1, D)
        logits = self.decoder.decode(embed, position, kv)
        return logits.reshape(-1).astype(np.float32), kv

    def generate(
        self, inputs: Inputs, max_new_tokens: int, eos_token_id: int | None = None,
        on_token: Callable[[int], None] | None = None,
    ) -> tuple[dict[str, Any], list[int]]:
        """Greedy decoding, as the eager `routing.generate`: the EOS token is kept and ends it.
        `on_token(id)` is called as each token is chosen."""
        limit = int(self.shapes.get("max_new_tokens", max_new_tokens))
        if not 0 <= max_new_tokens <= limit:
            raise UserError(f"max new tokens must be in 0..{limit} for this artifact, got {max_new_tokens}")
        pre = self.prefill(inputs, max_new_tokens)
        logits, kv, ids = pre["logits"], pre["kv"], []
        for step in range(max_new_tokens):
            token = int(np.argmax(logits))  # first maximum on ties, as torch.argmax
            ids.append(token)
            if on_token is not None:
                on_token(token)
            if token == eos_token_id or step + 1 == max_new_tokens:
                break
            logits, kv = self.decode_step(token, pre["next_position"] + step, kv)
        return pre, ids

    def trace(self, inputs: Inputs, max_new_tokens: int = 16,
              on_token: Callable[[int], None] | None = None) -> TraceResult:
        """The eager `trace` contract (decisions, last logits, greedy ids, text, plan)."""
        pre, ids = self.generate(inputs, max_new_tokens, self.manifest.get("eos_token_id"), on_token)
        plan = pre["plan"]
        decisions = {str(s.layer): d.tolist() for s, d in zip(plan.stages, pre["decisions"])}
        return TraceResult(decisions, pre["logits"].tolist(), ids, self.preprocessor.decode(ids), plan)

    # ------------------------------------------------------------ runtime.base.Runtime

    def bind(self, inputs: Inputs, new_tokens: int | None = None) -> "ArtifactRun":
        """The host side of prefill done once (vision runs here): the run's calls are graphs
        alone. `new_tokens`: the most tokens the run will generate (sizes its KV buffers)."""
        return ArtifactRun(self, inputs, new_tokens)

    @property
    def providers(self) -> list[str]:
        """The execution providers ONNX Runtime placed the first segment on."""
        return self.graphs[C.segment(0)].session.get_providers()

    @contextmanager
    def recording(self, role: str) -> Iterator[list[dict[str, np.ndarray]]]:
        """Every feed dict the `role` graph ("vision", "segment.0", "head.1", ...) receives
        inside the block, cast to its declared input types: what calibration observes."""
        graph = self.graphs[role]
        sink: list[dict[str, np.ndarray]] = []
        self.graphs[role] = _Recorder(graph, sink)
        try:
            yield sink
        finally:
            self.graphs[role] = graph

    def close(self) -> None:
        """Nothing to release early: the sessions go with the object."""


class ArtifactRun:
    """One input bound to an artifact (a `runtime.base.Run`): checks, embedding lookup,
    image-slot writes and positions done at bind time."""

    cuda = False  # ONNX Runtime and TensorRT runs return synchronised

    def __init__(self, art: OrtArtifact, inputs: Inputs, new_tokens: int | None = None) -> None:
        self.art, self.pixel_values, self.new_tokens = art, inputs.pixel_values, new_tokens
        self.feeds = art.prefill_feeds(inputs)
        self.bucket = int(self.feeds[BUCKET])
        # the decoder's layout with the buffer lengths this run allocates (a benchmark reads them)
        layout = art.decoders[self.bucket].layout
        self.layout = replace(layout, cache_tokens=art.buffer_rows(self.feeds, new_tokens) or layout.cache_tokens)
        self.details: dict[str, Any] = {}

    def sync(self) -> None:
        pass

    def vision(self) -> np.ndarray:
        return self.art.run_vision(self.pixel_values, self.bucket)  # (N, D)

    def prefill(self) -> State:
        out = self.art.run_prefill(self.feeds, self.new_tokens)
        return State(out["logits"], out["kv"], out["decisions"], out["next_position"])

    def decode(self, state: State, step: int) -> State:
        token = int(np.argmax(state.logits))
        logits, kv = self.art.decode_step(token, state.next_position + step, state.kv)
        return replace(state, logits=logits, kv=kv)

    def close(self) -> None:
        pass


class _Recorder:
    """Stands in for one graph: runs it and keeps each feed dict as the graph receives it."""

    def __init__(self, graph: Graph, sink: list[dict[str, np.ndarray]]) -> None:
        self.graph, self.sink = graph, sink

    def __getattr__(self, name: str) -> Any:
        return getattr(self.graph, name)

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # copies: the runtime reuses its arrays (the KV buffers, the write-back buffer) in place
        self.sink.append({n: np.array(feeds[n], dtype=t, copy=True) for n, t in self.graph.input_types.items()})
        return self.graph(feeds)
