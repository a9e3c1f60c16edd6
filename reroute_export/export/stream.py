"""Streaming weights: export graphs from a model whose parameters hold no data, and write
each weight once, from its source straight into the artifact's one weights file.

Why: torch.onnx's ModelProto path holds the weights several times over (the torch
parameters, the ONNX IR tensors, the serialised protobuf, the external-data copy): 4.8x
the fp16 weights on bench-llava, ~65 GB for a 7B model. Here

1. the model is built with its parameters on the meta device (`registry.build_random(...,
   "meta")` for --random-weights, `registry.load(folder, dtype, "meta")` for a checkpoint):
   no weight exists in memory; a *source* gives one weight on request (`random_source`
   draws it from a seed and its name, `checkpoint_source` reads it from the safetensors
   files through the family's key renames);
2. while tracing, each parameter is a one-element stand-in expanded to its shape (stride
   0, real CPU memory, so buffers and inputs stay on one device);
3. the exported, not yet optimised, ONNX IR has one initializer per parameter, named by
   its path in the traced module; each is re-bound to an `onnx_ir.LazyTensor` that asks
   the weight source for that one tensor when something reads it (the optimiser reads
   only small ones; the writer reads each once);
4. onnxscript's optimiser runs (what torch.onnx's optimize=True runs), then every large
   tensor is appended, one at a time, to ONE `weights.data` file for the whole artifact:
   a weight the vision, prefill and decode graphs share (the decoder's, in prefill and
   decode) is written once and every graph points at the same bytes (ONNX external data
   with offsets, read by ONNX Runtime and TensorRT's parser alike). The `reroute` local
   functions are attached to the small graph protos after.

Peak memory is the traced program plus one tensor and the source's own buffers:
independent of the model size (measured in BENCHMARKS.md). Disk: the weights once, not
once per graph.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import onnx
import torch

# A weight source: (parameter name in the HF model, shape, dtype) -> the tensor's values.
Source = Callable[[str, tuple[int, ...], torch.dtype], torch.Tensor]

WEIGHTS_FILE = "weights.data"  # the artifact's one external-data file (streamed exports)
ALIGN = 4096  # each tensor starts on a page: runtimes can map it without copying
EXTERNAL_ABOVE = 1024  # bytes; smaller tensors stay inside the graph proto


def random_source(model: torch.nn.Module, seed: int = 0) -> Source:
    """The --random-weights source: the values `registry.build_random` gives the same model on
    the CPU (so `parity` can rebuild the reference and compare)."""
    from ..tiny import random_tensor

    std = float(model.config.random_weight_std)
    return lambda name, shape, dtype: random_tensor(name, shape, dtype, std, seed, "cpu")


def checkpoint_source(folder: Path, model: torch.nn.Module, renames: tuple[tuple[str, str], ...]) -> Source:
    """Weights read one at a time from a checkpoint's *.safetensors files (memory-mapped by
    safetensors), found by the family's key renames; fails up front, naming them, when
    the checkpoint lacks a parameter of the model."""
    import re

    from safetensors import SafetensorError, safe_open

    from ..checkpoint_files import check_weight_files
    from ..errors import UserError

    check_weight_files(Path(folder))  # a truncated file fails here, naming it, not inside safe_open
    where: dict[str, tuple[Path, str]] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                name = key
                for pattern, repl in renames:
                    name, hits = re.subn(pattern, repl, key, count=1)
                    if hits:
                        break
                where[name] = (file, key)
    params = dict(model.named_parameters())  # tied parameters once, under their first name
    tied = getattr(model.config, "tie_word_embeddings", False) or getattr(
        getattr(model.config, "text_config", None), "tie_word_embeddings", False)
    if tied and "lm_head.weight" not in where:
        embed = next((n for n in where if n.endswith("embed_tokens.weight")), None)
        if embed is not None:
            where["lm_head.weight"] = where[embed]
    missing = [n for n in params if n not in where]
    if missing:
        raise UserError(f"{folder}: the checkpoint lacks {len(missing)} of the model's weights "
                        f"(first: {', '.join(missing[:3])})")

    def read(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        file, key = where[name]
        try:
            with safe_open(str(file), framework="pt") as f:
                t = f.get_tensor(key)
        except (SafetensorError, OSError) as e:  # the file changed or vanished since the check
            raise UserError(f"cannot read {key} from {file}: {e}") from None
        if tuple(t.shape) != shape:
            raise UserError(f"{file.name}: {key} has shape {tuple(t.shape)}, the model wants {shape}")
        return t.to(dtype)

    return read


def is_streamed(model: torch.nn.Module) -> bool:
    """True when the model's parameters hold no data (built on the meta device)."""
    return any(p.device.type == "meta" for p in model.parameters())


@dataclass
class WeightStream:
    """Maps the traced module's parameters back to the HF model's names and their source."""

    model: torch.nn.Module
    source: Source
    names: dict[int, str] = field(default_factory=dict)  # id(stand-in parameter) -> model name
    on_tensor: Callable[[str, int], None] | None = None  # progress: (name, bytes) as each is read
    # graph file -> {initializer: (model parameter name, transpose perm or None)}
    written: dict[str, dict[str, tuple[str, tuple[int, ...] | None]]] = field(default_factory=dict)
    placed: dict[tuple, tuple[int, int]] = field(default_factory=dict)  # tensor key -> (offset, length)

    @contextmanager
    def stand_ins(self) -> Iterator[None]:
        """Every meta parameter replaced by a stride-0 one-element CPU stand-in, for tracing;
        the meta parameters come back afterwards (tied parameters stay tied)."""
        saved: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
        made: dict[int, torch.nn.Parameter] = {}
        for mname, module in self.model.named_modules():
            for pname, param in list(module._parameters.items()):
                if param is None or param.device.type != "meta":
                    continue
                if id(param) not in made:
                    stand_in = torch.zeros((), dtype=param.dtype).expand(param.shape)
                    made[id(param)] = torch.nn.Parameter(stand_in, requires_grad=False)
                    self.names[id(made[id(param)])] = f"{mname}.{pname}" if mname else pname
                saved.append((module, pname, param))
                module._parameters[pname] = made[id(param)]
        try:
            yield
        finally:
            for module, pname, param in saved:
                module._parameters[pname] = param

    def bind(self, ir_model: Any, traced: torch.nn.Module) -> "StreamedGraph":
        """Re-bind every parameter initializer of `ir_model` to a lazy read of its source."""
        import onnx_ir as ir

        by_path = {path: self.names[id(p)] for path, p in traced.named_parameters(remove_duplicate=False)
                   if id(p) in self.names}
        bound: dict[str, str] = {}
        for name, value in ir_model.graph.initializers.items():
            if name in by_path:
                value.const_value = self._lazy(ir, by_path[name], value)
                bound[name] = by_path[name]
            elif _is_stand_in(value.const_value):
                raise RuntimeError(f"initializer {name} holds a parameter stand-in the stream cannot name")
        if not bound and by_path:
            raise RuntimeError("no initializer of the exported graph matched a parameter of the traced module")
        return StreamedGraph(ir_model, self, {k: (v, None) for k, v in bound.items()})

    def fold_transposes(self, graph: "StreamedGraph") -> None:
        """Transpose(weight) nodes become pre-transposed lazy initializers, one per (weight, perm).

        The optimiser folds a Transpose of a large single-use constant by reading it: every
        Linear weight would sit in memory, transposed, until the write (6.7 GB at the first
        third of a 7B prefill, measured). Folding them here keeps them lazy, and also folds the
        multi-use ones (the decision layers' q/k, used by the scoring pass too), which the
        optimiser leaves as run-time Transposes."""
        import onnx_ir as ir

        g = graph.ir_model.graph
        made: dict[tuple[str, tuple[int, ...]], Any] = {}
        touched = set()
        for node in list(g):
            if node.domain not in ("", "ai.onnx") or node.op_type != "Transpose":
                continue
            x = node.inputs[0]
            if x is None or x.name not in graph.names or graph.names[x.name][1] is not None:
                continue
            attr = node.attributes.get("perm")
            rank = len(x.shape)
            perm = tuple(int(i) for i in attr.value) if attr is not None else tuple(reversed(range(rank)))
            key = (x.name, perm)
            if key not in made:
                model_name = graph.names[x.name][0]
                shape = tuple(int(x.shape[i]) for i in perm)
                name = f"{x.name}.T" if perm == (1, 0) else f"{x.name}.perm{''.join(map(str, perm))}"
                value = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(x.dtype))
                value.const_value = self._lazy_transposed(ir, model_name, x, perm, name)
                g.register_initializer(value)
                graph.names[name] = (model_name, perm)
                made[key] = value
            node.outputs[0].replace_all_uses_with(made[key])
            g.remove(node, safe=True)
            touched.add(x.name)
        for name in touched:  # weights now used only transposed leave the graph
            if not g.initializers[name].uses():
                g.initializers.pop(name)
                graph.names.pop(name)

    def _lazy_transposed(self, ir: Any, model_name: str, x: Any, perm: tuple[int, ...], name: str) -> Any:
        base = self._lazy(ir, model_name, x)
        shape = tuple(int(x.shape[i]) for i in perm)
        return ir.LazyTensor(lambda: ir.tensor(base.numpy().transpose(perm).copy(), name=name),
                             dtype=x.dtype, shape=ir.Shape(shape), name=name)

    def _lazy(self, ir: Any, model_name: str, value: Any) -> Any:
        shape = tuple(int(d) for d in value.shape)
        dtype = _torch_dtype(value.dtype)

        def read() -> Any:
            t = self.source(model_name, shape, dtype)
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise RuntimeError(f"weight source gave {model_name} as {tuple(t.shape)} {t.dtype}, "
                                   f"the graph wants {shape} {dtype}")
            if self.on_tensor is not None:
                self.on_tensor(model_name, t.numel() * t.element_size())
            return ir.tensor(t.numpy(), name=value.name)

        return ir.LazyTensor(read, dtype=value.dtype, shape=ir.Shape(shape), name=value.name)

    def place(self, folder: Path, key: tuple, tensor: Any) -> tuple[int, int]:
        """(offset, length) of `tensor` in folder/weights.data, appending it the first time
        its key (model parameter, transpose, dtype) is seen."""
        if key not in self.placed:
            path = Path(folder) / WEIGHTS_FILE
            with open(path, "ab") as f:
                offset = f.tell()
                pad = -offset % ALIGN
                f.write(b"\0" * pad)
                length = _append(f, tensor)  # a lazy tensor reads its source here, once
            self.placed[key] = (offset + pad, length)
        return self.placed[key]

    def write_table(self, param_name: str, path: Path) -> None:
        """A (V, D) parameter (the token embeddings) as an .npy file: one tensor in memory."""
        import numpy as np

        param = dict(self.model.named_parameters())[param_name]
        np.save(path, self.source(param_name, tuple(param.shape), param.dtype).numpy())


def _append(f: BinaryIO, tensor: Any) -> int:
    """Write one tensor's bytes; a plain numeric array goes out from its own buffer (tobytes()
    would hold a second copy: 262 MB more for a 7B's fp16 embeddings)."""
    array = tensor.numpy()
    if array.dtype.kind in "fiub" and array.dtype.isnative and array.flags.c_contiguous:
        f.write(memoryview(array.reshape(-1)).cast("B"))
        return array.nbytes
    data = tensor.tobytes()
    f.write(data)
    return len(data)


@dataclass
class StreamedGraph:
    """An exported graph whose weights are lazy; `write` optimises it and streams it to disk."""

    ir_model: Any
    stream: WeightStream
    names: dict[str, tuple[str, tuple[int, ...] | None]]  # initializer -> (model parameter, transpose perm)
    inline: bool = False
    attention: str = "portable"  # the attention form export/attention.py lowers to

    def write(self, path: Path, finish: Callable[[onnx.ModelProto, bool, str], onnx.ModelProto]) -> None:
        import onnx_ir as ir
        import onnxscript.optimizer

        self.stream.fold_transposes(self)  # before the optimiser, which would read them to fold
        onnxscript.optimizer.optimize_ir(self.ir_model)  # as torch.onnx's optimize=True
        path = Path(path)
        for value in self.ir_model.graph.initializers.values():
            t = value.const_value
            if t is None or t.nbytes <= EXTERNAL_ABOVE:
                continue
            source = self.names.get(value.name)  # a weight: shared across graphs; else this graph's constant
            key = (*source, t.dtype) if source else (path.name, value.name, t.dtype)
            offset, length = self.stream.place(path.parent, key, t)
            value.const_value = ir.ExternalTensor(WEIGHTS_FILE, offset, length, t.dtype, shape=t.shape,
                                                  name=value.name, base_dir=str(path.parent))
        ir.save(self.ir_model, path)  # references only: the weights are already on disk
        proto = onnx.load(path, load_external_data=False)  # the graph alone: weights stay on disk
        onnx.save_model(finish(proto, self.inline, self.attention), path)
        self.stream.written[path.name] = {t.name: self.names[t.name] for t in proto.graph.initializer
                                          if t.name in self.names}


def _is_stand_in(tensor: Any) -> bool:
    raw = getattr(tensor, "raw", None)
    return isinstance(raw, torch.Tensor) and raw.numel() > 1 and 0 in raw.stride()


def _torch_dtype(ir_dtype: Any) -> torch.dtype:
    """An ONNX IR element type as torch's (the float types a weight can have)."""
    import onnx_ir as ir

    known = {ir.DataType.FLOAT: torch.float32, ir.DataType.FLOAT16: torch.float16,
             ir.DataType.BFLOAT16: torch.bfloat16}
    if ir_dtype not in known:
        raise RuntimeError(f"streamed weights of ONNX type {ir_dtype} are not supported")
    return known[ir_dtype]


def check_streamed(folder: Path, graphs: dict[str, str], stream: WeightStream, samples: int = 3) -> dict[str, Any]:
    """What can be checked without loading the model: each graph passes onnx.checker (by
    path, external data included) and a few weights read back from the data files equal
    their source's values (first, middle and last streamed tensor of each graph)."""
    import numpy as np
    from onnx import numpy_helper

    out: dict[str, Any] = {}
    for key, fname in graphs.items():
        path = folder / fname
        onnx.checker.check_model(str(path))
        proto = onnx.load(path, load_external_data=False)
        external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        weights = [t for t in external if t.name in stream.written[fname]]  # not the graph's own constants
        picks = sorted({0, len(weights) // 2, len(weights) - 1}) if weights else []
        checked = []
        for i in picks[:samples]:
            t = weights[i]
            onnx.external_data_helper.load_external_data_for_tensor(t, str(folder))
            got = numpy_helper.to_array(t)
            name, perm = stream.written[fname][t.name]
            shape = tuple(got.shape) if perm is None else tuple(got.shape[perm.index(i)] for i in range(got.ndim))
            dtype = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16}[got.dtype]
            want = stream.source(name, shape, dtype).numpy()
            if perm is not None:
                want = want.transpose(perm)
            if not np.array_equal(got, want):
                raise RuntimeError(f"{fname}: weight {t.name} read back from disk differs from its source")
            checked.append(t.name)
        out[key] = {"checker": "passed", "external_tensors": len(external), "weights_read_back": checked}
    return out
