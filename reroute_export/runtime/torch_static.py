"""The export's modules run by torch ("torch-static" in bench records).

`rewrite.segments.Program` holds the modules the ONNX graphs are exported from (segments,
decision heads, routing graphs), driven by the same flow as the ONNX Runtime artifact
(runtime/segmented.Decoder) over torch tensors: fixed KV buffers allocated once per run on
the model's device, written in place. On a GPU, a bound run captures prefill and each of
its decode steps once as CUDA graphs and replays them: every shape is fixed by the plan,
so the whole greedy chain (prefill -> argmax -> embedding -> decode step -> ...) replays
with no host synchronisation, which the eager engine's data-dependent shapes (nonzero,
per-sample index sets) rule out. A run's graphs share one private memory pool, replayed in
capture order. On the CPU (or past the captured steps) the same modules run eagerly.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..plan import RoutingPlan
from ..results import TraceResult
from ..rewrite.segments import Program, kv_dtypes
from .base import State, greedy, trace_of
from .eager import TorchRun, TorchRuntime, torch_inputs
from .segmented import Arrays, Decoder, Layout

if TYPE_CHECKING:
    from ..preprocess import VLInputs
    from ..registry import Loaded


class TorchArrays(Arrays):
    """runtime/segmented's allocations as torch tensors on one device. Index tensors (positions,
    past lengths) are made once per value and reused: a CUDA graph captured after a warm-up
    pass finds them already on the device (no host copy may happen while capturing)."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self._made: dict[tuple, torch.Tensor] = {}

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype, device=self.device)

    def index(self, values: Any) -> torch.Tensor:
        arr = np.asarray(values, dtype=np.int64)
        key = (arr.shape, arr.tobytes())
        if key not in self._made:
            self._made[key] = torch.from_numpy(arr.copy()).to(self.device)
        return self._made[key]

    def copy(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    def to_index(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1).long()


class TorchStaticRuntime(TorchRuntime):
    """The deployable decoder's modules on the loaded model; `decode_steps` decode steps are
    prepared ahead by every bound run (captured as CUDA graphs on a GPU).

    `max_tokens` sizes the KV buffers (prompt + new tokens; default: what a run needs)."""

    backend = "torch-static"

    def __init__(self, loaded: Loaded, plan: RoutingPlan, decode_steps: int = 0, max_new_tokens: int = 256) -> None:
        super().__init__(loaded, plan)
        self.program = Program(loaded.model, loaded.family, plan)
        self.call = self.program.caller()
        self.decode_steps = decode_steps
        self.max_new_tokens = max_new_tokens

    def decoder_for(self, prompt_tokens: int, device: Any) -> Decoder:
        """The flow with buffers for this prompt length plus max_new_tokens (+ the captured steps)."""
        attn = self.loaded.family.decoder(self.loaded.model).layers[0].self_attn
        new = max(self.max_new_tokens, self.decode_steps + 1)
        layout = Layout(self.plan, self.plan.cache_tokens(prompt_tokens, new), attn.config.num_key_value_heads,
                        attn.head_dim, kv_dtypes(self.loaded.model, self.loaded.family),
                        self.loaded.family.position_dims)
        return Decoder(layout, self.call, TorchArrays(device))

    def bind(self, inputs: Any) -> StaticRun:
        return StaticRun(self, torch_inputs(inputs), self.decode_steps)

    def trace(self, inputs: Any, max_new_tokens: int = 16) -> TraceResult:
        """Greedy decoding with the modules run eagerly (no capture for a one-off run)."""
        g = greedy(StaticRun(self, torch_inputs(inputs), 0), max_new_tokens, self.eos_token_id)
        return trace_of(self.plan, g, self.loaded.preprocessor.decode(g.tokens))


class StaticRun(TorchRun):
    """One input through the static modules: embeddings, positions and the visual block's
    start built once; `steps` decode steps' positions made ahead (and captured on a GPU)."""

    def __init__(self, rt: TorchStaticRuntime, inputs: VLInputs, steps: int) -> None:
        super().__init__(rt.loaded, inputs)
        model, fam = rt.loaded.model, rt.loaded.family
        with torch.no_grad():
            self.embeds = fam.embed(model, inputs)  # (1, L, D): outside any timer
            self.positions = fam.positions(model, inputs)  # (1, L) or (3, 1, L)
        vis = (inputs.input_ids[0] == fam.image_token_id(model)).nonzero()  # (N, 1)
        self.visual_start = int(vis[0, 0])  # the contiguous visual block's first position
        self.first = int(self.positions.max()) + 1
        self.embed_tokens = fam.decoder(model).embed_tokens
        self.decoder = rt.decoder_for(self.embeds.shape[1], self.embeds.device)
        self.graphs: list[Any] = []
        self.outputs: list[State] = []
        self.details = {"cuda_graphs": False}
        if self.cuda and steps:
            self._capture_or_say_why(steps)

    # ------------------------------------------------------------ the modules, eagerly

    def _prefill_eager(self) -> State:
        logits, cache, decisions = self.decoder.prefill(self.embeds, self.positions, self.visual_start)
        return State(logits, cache, decisions, self.first)

    def _decode_eager(self, state: State, step: int) -> State:
        x = self.embed_tokens(state.logits.argmax(-1).view(-1, 1))  # (1, 1, D): greedy, on the device
        logits = self.decoder.decode(x, self.first + step, state.kv)  # the buffers grow in place
        return replace(state, logits=logits)

    # ------------------------------------------------------------ CUDA graphs

    def _capture_or_say_why(self, steps: int) -> None:
        try:
            self.details = self._capture(steps)
        except RuntimeError as e:  # say so in the record and run the modules eagerly
            self.graphs, self.outputs = [], []
            self.details = {"cuda_graphs": False, "capture_error": f"{type(e).__name__}: {str(e)[:300]}"}

    def _warm_up(self, steps: int) -> None:
        """Eager passes outside capture: cuBLAS handles, workspaces and lazy inits happen here."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(2):
                state = self._prefill_eager()
                for i in range(steps):
                    state = self._decode_eager(state, i)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()

    def _record(self, pool: Any, step: int | None) -> None:
        """Capture prefill (step None) or decode step `step` reading the previous outputs."""
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            state = self._prefill_eager() if step is None else self._decode_eager(self.outputs[-1], step)
        self.graphs.append(g)
        self.outputs.append(state)  # kept alive: the next step's inputs live here

    def _capture(self, steps: int) -> dict[str, Any]:
        before = torch.cuda.memory_allocated()
        self._warm_up(steps)
        pool = torch.cuda.graph_pool_handle()
        t0 = time.perf_counter()
        with torch.no_grad():
            for step in [None, *range(steps)]:
                self._record(pool, step)
        torch.cuda.synchronize()
        return {"cuda_graphs": True, "graphs": len(self.graphs), "capture_s": round(time.perf_counter() - t0, 3),
                "graph_pool_mb": round((torch.cuda.memory_allocated() - before) / 2**20, 1)}

    # ------------------------------------------------------------ runtime.base.Run

    def prefill(self) -> State:
        if self.graphs:
            self.graphs[0].replay()
            return self.outputs[0]
        with torch.no_grad():
            return self._prefill_eager()

    def decode(self, state: State, step: int) -> State:
        """A captured step reads its inputs from the previous graph's outputs (replay in order)."""
        if step + 1 < len(self.graphs):
            self.graphs[1 + step].replay()
            return self.outputs[1 + step]
        with torch.no_grad():
            return self._decode_eager(state, step)

    def close(self) -> None:
        self.graphs.clear()
        self.outputs = []
