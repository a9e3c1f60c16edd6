"""What a benchmark run is asked for, checked against the library's own names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import contract as C
from ..errors import UserError
from ..plan import METHODS
from ..runtime import BACKENDS

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # --dtype -> torch dtype name
DEFAULT_METHODS = METHODS
DEFAULT_BACKENDS = ("torch", "onnxruntime")
# --precisions: the onnxruntime backend's artifacts. fp32/fp16 as `export --precision` writes
# them; int8/int4 weight-only from the fp32 artifact (`quantize`, rtn, its default block and
# encoding: QUANTIZE); each adds one record per method.
EXPORTED = C.PRECISIONS  # what `export --precision` writes; the rest are quantized from fp32
PRECISIONS = (*EXPORTED, "int8", "int4")
DEFAULT_PRECISIONS = ("fp32",)
QUANTIZE = {"method": "rtn", "block": 128, "encoding": "matmulnbits", "routing_projections": "int8"}  # quantize's defaults


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
    precisions: tuple[str, ...] = DEFAULT_PRECISIONS  # the onnxruntime backend's artifacts (PRECISIONS)
    attention: str = "auto"  # the onnxruntime backend's artifacts' attention form (export/attention.py FORMS)

    @property
    def torch_dtype(self) -> str:
        return self.dtype or ("fp32" if self.device == "cpu" else "fp16")


def _check_names(kind: str, given: tuple[str, ...], known: tuple[str, ...]) -> None:
    bad = [x for x in given if x not in known]
    if bad or not given:
        raise UserError(f"unknown {kind}(s) {', '.join(bad) or '(none given)'}; known: {', '.join(known)}")


def _check_device(device: str) -> None:
    if device == "cpu":
        return
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device here (torch {torch.__version__}, "
                        f"cuda available: {torch.cuda.is_available()}); use --device cpu")


def check_config(cfg: BenchConfig) -> None:
    """One-line errors for anything the run cannot do, before any model is loaded."""
    _check_names("method", cfg.methods, METHODS)
    _check_names("backend", cfg.backends, BACKENDS)
    if len(set(cfg.methods)) != len(cfg.methods) or len(set(cfg.backends)) != len(cfg.backends):
        raise UserError("--methods and --backends take each name once")
    _check_names("precision", cfg.precisions, PRECISIONS)
    if len(set(cfg.precisions)) != len(cfg.precisions):
        raise UserError("--precisions takes each name once")
    if cfg.precisions != DEFAULT_PRECISIONS and "onnxruntime" not in cfg.backends:
        raise UserError(f"--precisions {','.join(cfg.precisions)} applies to the onnxruntime backend, "
                        "which this run does not ask for (--backends)")
    if cfg.attention != "auto":
        from ..export.attention import FORMS

        _check_names("attention form", (cfg.attention,), tuple(FORMS))
        if "onnxruntime" not in cfg.backends:
            raise UserError(f"--attention {cfg.attention} applies to the onnxruntime backend's artifacts, "
                            "which this run does not ask for (--backends)")
    if cfg.torch_dtype not in DTYPES:
        raise UserError(f"unknown --dtype {cfg.torch_dtype}; known: {', '.join(DTYPES)}")
    _check_device(cfg.device)
    for name, value, low in (("--repeats", cfg.repeats, 1), ("--warmup", cfg.warmup, 0),
                             ("--threads", cfg.threads, 1), ("--decode-tokens", cfg.decode_tokens, 1)):
        if value < low:
            raise UserError(f"{name} must be >= {low}, got {value}")
