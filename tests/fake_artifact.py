"""A small but real artifact: ONNX graphs built with onnx.helper, run by real ONNX Runtime.

The graphs follow the artifact contract (contract.py) exactly, but compute simple
closed-form functions so that a numpy simulation (`Simulation`) predicts every output:

    vision   image_features = mean(pixel_values) * A + B                     (N, D)
    prefill  logits = (x[-1] + sin(max(position_ids)) + 0.001 * visual_start) @ W
             present.i.key = x[:, :L - N + K_i] as (1, nkv, T_i, hd); value = key * (i + 1)
             selected.s = 3 * arange(K_s) + s
    decode   present.i.key = concat(past.i.key, x); value = concat(past.i.value, x * (i + 1))
             logits = (x + sum_i mean_T(present.i.value) + sin(max(position_ids))) @ W

So the host-side runtime (embedding lookup, image-slot writes, positions, the KV loop)
is tested for real without the decoder exporter. Lives in tests/, not in the package.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from reroute_export import contract as C
from reroute_export.export.artifact import ArtifactWriter
from reroute_export.families.qwen2_5_vl import Qwen25VL
from reroute_export.plan import RoutingPlan, Stage
from reroute_export.preprocess import Preprocessor

NKV, HD = 2, 4
D = NKV * HD
ELEM = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16}
NP = {"fp32": np.float32, "fp16": np.float16}
QWEN2_5_VL = Qwen25VL.name


def fake_plan(n: int) -> RoutingPlan:
    return RoutingPlan("reroute", 3, n, (Stage(1, n // 4, 0.25), Stage(2, n // 8, 0.125)))


class Weights:
    def __init__(self, vocab: int, n: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.table = rng.standard_normal((vocab, D)).astype(np.float32)  # (V, D)
        self.A = rng.standard_normal((n, D)).astype(np.float32)  # (N, D)
        self.B = rng.standard_normal((n, D)).astype(np.float32)
        self.W = rng.standard_normal((D, vocab)).astype(np.float32)  # (D, V)


# ---------------------------------------------------------------- graph building


class _G:
    """Tiny node-list builder with unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def const(self, value: np.ndarray) -> str:
        name = f"c{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        self.count += 1
        out = out or f"t{self.count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=f"n{self.count}", **attrs))
        return out

    def model(self, inputs, outputs) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "fake", inputs, outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", C.OPSET)])
        model.ir_version = C.IR_VERSION
        onnx.checker.check_model(model)
        return model


def _pos_shape(family: str, length: str | int) -> list:
    return [3, 1, length] if family == QWEN2_5_VL else [1, length]


def vision_graph(w: Weights, rank: int, precision: str) -> onnx.ModelProto:
    g, el = _G(), ELEM[precision]
    x = g.op("Cast", "pixel_values", to=TensorProto.FLOAT)
    m = g.op("ReduceMean", x, keepdims=0)  # scalar
    f = g.op("Add", g.op("Mul", m, g.const(w.A)), g.const(w.B))  # (N, D)
    g.op("Cast", f, out=C.IMAGE_FEATURES, to=el)
    inputs = [helper.make_tensor_value_info(C.PIXEL_VALUES, el, [f"p{i}" for i in range(rank)])]
    return g.model(inputs, [helper.make_tensor_value_info(C.IMAGE_FEATURES, el, list(w.A.shape))])


def _heads(g: _G, x: str) -> str:
    """(1, T, D) -> (1, nkv, T, hd)."""
    return g.op("Transpose", g.op("Reshape", x, g.const(np.array([1, -1, NKV, HD]))), perm=[0, 2, 1, 3])


def _pos_term(g: _G) -> str:
    """sin(max position): bounded, yet an off-by-one position changes every logit."""
    return g.op("Sin", g.op("Cast", g.op("ReduceMax", C.POSITION_IDS, keepdims=0), to=TensorProto.FLOAT))


def prefill_graph(w: Weights, plan: RoutingPlan, family: str, precision: str) -> onnx.ModelProto:
    g, el = _G(), ELEM[precision]
    x = g.op("Cast", C.INPUTS_EMBEDS, to=TensorProto.FLOAT)  # (1, L, D)
    last = g.op("Gather", x, g.const(np.array(-1)), axis=1)  # (1, D)
    vs = g.op("Cast", C.VISUAL_START, to=TensorProto.FLOAT)  # (1,)
    h = g.op("Add", g.op("Add", last, _pos_term(g)),
             g.op("Mul", vs, g.const(np.float32(0.001))))
    g.op("MatMul", h, g.const(w.W), out=C.LOGITS)  # (1, V) float32
    length = g.op("Gather", g.op("Shape", x), g.const(np.array([1])))  # (1,) = [L]
    outputs = [helper.make_tensor_value_info(C.LOGITS, TensorProto.FLOAT, [1, w.W.shape[1]])]
    for i, keep in enumerate(plan.keep_per_layer()):
        end = g.op("Sub", length, g.const(np.array([plan.visual_tokens - keep])))  # [L - N + K_i]
        key = _heads(g, g.op("Slice", x, g.const(np.array([0])), end, g.const(np.array([1]))))
        value = g.op("Mul", key, g.const(np.float32(i + 1)))
        for kind, t in (("key", key), ("value", value)):
            g.op("Cast", t, out=C.present(i, kind), to=el)
            outputs.append(helper.make_tensor_value_info(C.present(i, kind), el, [1, NKV, f"T{i}", HD]))
    for s, stage in enumerate(plan.stages):
        g.op("Identity", g.const(3 * np.arange(stage.keep)[None] + s), out=C.selected(s))
        outputs.append(helper.make_tensor_value_info(C.selected(s), TensorProto.INT64, [1, stage.keep]))
    inputs = [helper.make_tensor_value_info(C.INPUTS_EMBEDS, el, [1, "L", D]),
              helper.make_tensor_value_info(C.POSITION_IDS, TensorProto.INT64, _pos_shape(family, "L")),
              helper.make_tensor_value_info(C.VISUAL_START, TensorProto.INT64, [1])]
    return g.model(inputs, outputs)


def decode_graph(w: Weights, plan: RoutingPlan, family: str, precision: str) -> onnx.ModelProto:
    g, el = _G(), ELEM[precision]
    x = g.op("Cast", C.INPUTS_EMBEDS, to=TensorProto.FLOAT)  # (1, 1, D)
    xk = _heads(g, x)  # (1, nkv, 1, hd)
    inputs = [helper.make_tensor_value_info(C.INPUTS_EMBEDS, el, [1, 1, D]),
              helper.make_tensor_value_info(C.POSITION_IDS, TensorProto.INT64, _pos_shape(family, 1))]
    outputs, means = [helper.make_tensor_value_info(C.LOGITS, TensorProto.FLOAT, [1, w.W.shape[1]])], []
    for i in range(plan.num_layers):
        new = {"key": xk, "value": g.op("Mul", xk, g.const(np.float32(i + 1)))}
        for kind in ("key", "value"):
            past = g.op("Cast", C.past(i, kind), to=TensorProto.FLOAT)
            cat = g.op("Concat", past, new[kind], axis=2)  # (1, nkv, P_i + 1, hd)
            g.op("Cast", cat, out=C.present(i, kind), to=el)
            inputs.append(helper.make_tensor_value_info(C.past(i, kind), el, [1, NKV, f"P{i}", HD]))
            outputs.append(helper.make_tensor_value_info(C.present(i, kind), el, [1, NKV, f"P{i}+1", HD]))
        means.append(g.op("ReduceMean", cat, g.const(np.array([2])), keepdims=0))  # (1, nkv, hd)
    s = g.op("Reshape", g.op("Sum", *means), g.const(np.array([1, D])))  # (1, D)
    flat = g.op("Reshape", x, g.const(np.array([1, D])))
    h = g.op("Add", g.op("Add", flat, s), _pos_term(g))
    g.op("MatMul", h, g.const(w.W), out=C.LOGITS)
    return g.model(inputs, outputs)


# ---------------------------------------------------------------- the artifact


def build_fake_artifact(
    folder: Path, pre: Preprocessor, *, precision: str = "fp32", max_prompt_tokens: int = 512,
    max_new_tokens: int = 32, eos_token_id: int | None = None, pixel_rank: int | None = None,
) -> tuple[Weights, RoutingPlan]:
    n = pre.visual_tokens
    plan = fake_plan(n)
    vocab = len(pre.tokenizer)
    w = Weights(vocab, n)
    family = pre.family.name
    rank = pixel_rank or (2 if family == QWEN2_5_VL else 4)
    grid = [1, *(s // pre.image_processor.patch_size for s in pre.image_size)] if family == QWEN2_5_VL else None
    with ArtifactWriter(folder, force=True) as writer:
        onnx.save(vision_graph(w, rank, precision), writer.path / C.VISION)
        onnx.save(prefill_graph(w, plan, family, precision), writer.path / C.PREFILL)
        onnx.save(decode_graph(w, plan, family, precision), writer.path / C.DECODE)
        np.save(writer.path / C.EMBEDDINGS, w.table.astype(NP[precision]))
        pre.save_pretrained(writer.path / C.PREPROCESSOR)
        writer.write_manifest({
            "model": f"fake-{family}", "family": family, "plan": plan.to_dict(), "precision": precision,
            "opset": C.OPSET,
            "shapes": {"max_prompt_tokens": max_prompt_tokens, "max_new_tokens": max_new_tokens,
                       "visual_tokens": n, "hidden_size": D, "num_layers": plan.num_layers,
                       "num_kv_heads": NKV, "head_dim": HD, "vocab_size": vocab},
            "graphs": {"vision": C.VISION, "prefill": C.PREFILL, "decode": C.DECODE},
            "image_grid_thw": grid, "spatial_merge_size": 2 if family == QWEN2_5_VL else None,
            "image_token_id": pre.image_token_id, "eos_token_id": eos_token_id,
        })
    return w, plan


# ---------------------------------------------------------------- numpy simulation


class Simulation:
    """What the fake graphs compute, given the reference (HF) position ids."""

    def __init__(self, w: Weights, plan: RoutingPlan) -> None:
        self.w, self.plan = w, plan

    def embeds(self, ids: np.ndarray, image_token_id: int, pixel_values: np.ndarray) -> tuple[np.ndarray, int]:
        x = self.w.table[ids].copy()  # (L, D)
        start = int(np.flatnonzero(ids == image_token_id)[0])
        x[start:start + self.plan.visual_tokens] = pixel_values.mean() * self.w.A + self.w.B
        return x, start

    def run(self, ids: np.ndarray, image_token_id: int, pixel_values: np.ndarray, positions: np.ndarray,
            steps: int) -> dict:
        x, start = self.embeds(ids, image_token_id, pixel_values)
        n, length = self.plan.visual_tokens, len(ids)
        logits = (x[-1] + np.sin(np.float32(positions.max())) + 0.001 * start) @ self.w.W  # (V,)
        kv = []
        for i, keep in enumerate(self.plan.keep_per_layer()):
            key = x[:length - n + keep].reshape(1, -1, NKV, HD).transpose(0, 2, 1, 3)  # (1, nkv, T_i, hd)
            kv.append((key, key * (i + 1)))
        out = {"logits": logits, "kv": [tuple(a.copy() for a in p) for p in kv], "ids": [], "start": start}
        pos = int(positions.max()) + 1
        for step in range(steps):
            token = int(np.argmax(logits))
            out["ids"].append(token)
            if step + 1 == steps:
                break
            xt = self.w.table[token]  # (D,)
            xk = xt.reshape(1, 1, NKV, HD).transpose(0, 2, 1, 3)  # (1, nkv, 1, hd)
            kv = [(np.concatenate([k, xk], 2), np.concatenate([v, xk * (i + 1)], 2)) for i, (k, v) in enumerate(kv)]
            s = sum(v.mean(axis=2) for _, v in kv).reshape(D)
            logits = (xt + s + np.sin(np.float32(pos + step))) @ self.w.W
        return out
