"""Activation-aware weight scaling (AWQ) for weight-only INT4, calibrated with routing active.

Per group of Linears that read one activation X (q/k/v on a layer's input norm, gate/up on
its post-attention norm, o_proj, down_proj), the input channels are scaled by

    s = mean|X|^alpha / sqrt(max * min)          (per input channel, normalised around 1)
    Y = X W = (X diag(s)^-1) (diag(s) W)         (exact in real arithmetic)

and diag(s) W is what gets quantized: channels that carry large activations get finer
steps. alpha is grid-searched in [0, 1] per group to minimise sum_i ||X W_i - X diag(s)^-1
Q(diag(s) W_i)||^2 on the recorded activations; alpha = 0 (s = 1) is plain round-to-nearest
and is on the grid, so the chosen scaling never does worse than RTN on those activations.

Where 1/s goes (`fold`): into the RMSNorm weight when X is `weight * normed` and every reader
of X is in the group (no extra op: q/k/v and gate/up), else a Mul by 1/s on the group's
edges only (o_proj, down_proj, or a group sharing X with float readers such as head.j's
q/k). Either is the same fp32 function up to rounding (tests/test_quantize_weights.py).

What X is: `record_feeds` (feeds.py) runs the fp32 artifact with the runtime's own host code
on the calibration set, routing graphs active, and stores every segment and head graph's
feeds (routed prefill rows and greedy decode rows); each graph is then run again on its
feeds in an in-memory copy that also returns its quantized MatMuls' inputs, accumulating
per-channel mean |X| and keeping a seeded sample of rows for the search. The recipe
(calibration/recipes/int4-awq.json) keeps this small.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import UserError
from ..files import read_json
from .encodings import dequantize_blocks, quantize_blocks
from .recipes import recipes_dir

DEFAULT_RECIPE = "int4-awq"


@dataclass
class AwqRecipe:
    name: str
    samples: int = 2
    seed: int = 0
    decode_steps: int = 2
    rows: int = 128  # activation rows kept per group for the alpha search
    grid: int = 11  # alphas 0, 0.1, ..., 1
    source: str = ""
    description: str = ""

    def alphas(self) -> np.ndarray:
        return np.linspace(0.0, 1.0, self.grid)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "samples": self.samples, "seed": self.seed,
                "decode_steps": self.decode_steps, "rows": self.rows, "alphas": self.alphas().round(4).tolist()}


def load_awq_recipe(spec: str | None = None) -> AwqRecipe:
    path = Path(spec) if spec and (spec.endswith(".json") or os.sep in spec) else recipes_dir() / f"{spec or DEFAULT_RECIPE}.json"
    if not path.is_file():
        raise UserError(f"AWQ recipe {path} not found")
    raw = read_json(path, "recipe")
    keys = {"samples", "seed", "decode_steps", "rows", "grid"}
    if not isinstance(raw, dict) or raw.get("method") != "awq":
        raise UserError(f"recipe {path} is not an AWQ recipe (\"method\": \"awq\")")
    for k in keys & set(raw):
        if not isinstance(raw[k], int) or isinstance(raw[k], bool) or raw[k] < (0 if k in ("seed", "decode_steps") else 1):
            raise UserError(f"recipe {path}: {k} must be a positive integer, got {raw[k]!r}")
    if raw.get("grid", 11) < 2:
        raise UserError(f"recipe {path}: grid must be at least 2 (alpha 0 and 1)")
    return AwqRecipe(name=str(raw.get("name", path.stem)), source=str(path), description=str(raw.get("description", "")),
                     **{k: raw[k] for k in keys & set(raw)})


# ---------------------------------------------------------------- activations


@dataclass
class Activation:
    """One group input's statistics: per-channel mean |x| and a sample of rows."""

    k: int
    abs_sum: np.ndarray = field(init=False)
    count: int = 0
    rows: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.abs_sum = np.zeros(self.k, np.float64)

    def add(self, x: np.ndarray, rng: np.random.Generator, keep: int) -> None:
        x = np.asarray(x, np.float32).reshape(-1, self.k)  # (R, K)
        self.abs_sum += np.abs(x).sum(axis=0, dtype=np.float64)
        self.count += len(x)
        take = rng.choice(len(x), size=min(keep, len(x)), replace=False) if len(x) > keep else np.arange(len(x))
        self.rows.append(x[np.sort(take)])

    def mean_abs(self) -> np.ndarray:
        return (self.abs_sum / max(self.count, 1)).astype(np.float32)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        x = np.concatenate(self.rows)
        return x if len(x) <= n else x[np.sort(rng.choice(len(x), size=n, replace=False))]


def collect(model_path: Path, inputs: list[str], feeds: Any, keep_rows: int, seed: int,
            read: Callable[[onnx.TensorProto], np.ndarray]) -> dict[str, Activation]:
    """Run the graph at `model_path` on `feeds`, returning the statistics of each tensor named
    in `inputs` (exposed as extra outputs of an in-memory copy). Its external weights are
    handed to ONNX Runtime as the memmaps `read` gives (add_external_initializers), not
    copied beside the copy."""
    import onnxruntime as ort

    model = onnx.load(model_path, load_external_data=False)
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in inputs if n not in known)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    values = [ort.OrtValue.ortvalue_from_numpy(np.asarray(read(t))) for t in external]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_external_initializers([t.name for t in external], values)
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    stats: dict[str, Activation] = {}
    rng = np.random.default_rng(seed)
    for feed in feeds:
        for name, x in zip(inputs, session.run(inputs, feed)):
            stats.setdefault(name, Activation(int(x.shape[-1]))).add(x, rng, keep_rows)
    return stats


# ---------------------------------------------------------------- the search


def _scales(mean_abs: np.ndarray, alpha: float) -> np.ndarray:
    s = np.maximum(mean_abs, 1e-4) ** alpha  # (K,)
    return (s / np.sqrt(s.max() * s.min())).astype(np.float32)


def output_error(x: np.ndarray, weights: list[np.ndarray], s: np.ndarray, bits: int, block: int) -> float:
    """sum_i ||X W_i - X diag(s)^-1 Q(diag(s) W_i)||^2 (s = 1: round-to-nearest)."""
    err = 0.0
    for w in weights:
        codes, scales = quantize_blocks(w * s[:, None], bits, block)
        approx = dequantize_blocks(codes, scales, block) / s[:, None]  # (K, N)
        err += float(np.square(x @ (w - approx)).sum())
    return err


@dataclass(frozen=True)
class Choice:
    alpha: float
    scales: np.ndarray  # (K,) what multiplies W's rows (and divides X)
    error_rtn: float
    error_awq: float

    def record(self) -> dict[str, float]:
        return {"alpha": round(self.alpha, 4), "error_rtn": self.error_rtn, "error_awq": self.error_awq,
                "error_ratio": self.error_awq / self.error_rtn if self.error_rtn else 1.0}


def search(x: np.ndarray, mean_abs: np.ndarray, weights: list[np.ndarray], bits: int, block: int,
           alphas: np.ndarray) -> Choice:
    """The alpha of the grid with the least output error on the activation rows `x` (n, K)."""
    errors = [output_error(x, weights, _scales(mean_abs, float(a)), bits, block) for a in alphas]
    best = int(np.argmin(errors))
    rtn = output_error(x, weights, np.ones_like(mean_abs), bits, block)
    return Choice(float(alphas[best]), _scales(mean_abs, float(alphas[best])), rtn, min(errors[best], rtn))


# ---------------------------------------------------------------- folding 1/s


def fold(graph: onnx.GraphProto, x: str, readers: list[str], s: np.ndarray, float_type: int,
         read: Callable[[onnx.TensorProto], np.ndarray]) -> tuple[str, dict[str, np.ndarray]]:
    """Make the nodes `readers` (MatMuls reading `x`) read x / s; the caller scales their
    weights' rows by s. Returns (how: "norm weight NAME" | "Mul", {initializer: new value})."""
    norm = _norm_weight(graph, x, readers)
    if norm is not None:
        return f"norm weight {norm.name}", {norm.name: (read(norm).astype(np.float32) / s).astype(read(norm).dtype)}
    scaled = f"{x}/awq"
    inv = numpy_helper.from_array((1.0 / s).astype(helper.tensor_dtype_to_np_dtype(float_type)), f"{scaled}.inv_scale")
    graph.initializer.append(inv)
    mul = helper.make_node("Mul", [x, inv.name], [scaled], name=f"{scaled}/Mul")
    nodes = list(graph.node)
    first = min(i for i, n in enumerate(nodes) if n.name in readers)
    for n in nodes:
        if n.name in readers:
            n.input[0] = scaled
    del graph.node[:]
    graph.node.extend([*nodes[:first], mul, *nodes[first:]])
    return "Mul", {}


def _norm_weight(graph: onnx.GraphProto, x: str, readers: list[str]) -> onnx.TensorProto | None:
    """The (K,) initializer of a `Mul(weight, normed)` producing x, when x and that weight
    have no other readers (so dividing the weight changes nothing else)."""
    inits = {t.name: t for t in graph.initializer}
    producer = next((n for n in graph.node if x in n.output), None)
    if producer is None or producer.op_type != "Mul" or x in {o.name for o in graph.output}:
        return None
    consts = [i for i in producer.input if i in inits and len(inits[i].dims) == 1]
    if len(consts) != 1:
        return None
    uses = lambda name: [n.name for n in graph.node if name in n.input]  # noqa: E731
    if sorted(uses(x)) != sorted(readers) or len(uses(consts[0])) != 1:
        return None
    return inits[consts[0]]
