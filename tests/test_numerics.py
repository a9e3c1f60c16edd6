"""Numerics guard: an fp16 overflow is caught by the post-export check, which names the
first layer whose KV cache holds a non-finite value; the documented fallback
(`--fp32-layers`) exports the same model with that part in fp32 and passes."""

from __future__ import annotations

import copy
from dataclasses import replace

import onnx
import torch

from conftest import sample_inputs, tiny
from reroute_export import contract as C
from reroute_export.pipeline import ExportOptions, export_artifact
from reroute_export.plan import make_plan

HOT = 4  # the layer whose keys overflow fp16 (not a decision layer of the plan)


def overflowing_llava():
    """tiny-llava with layer 4's keys scaled by 1e5 and its queries by 1e-5: the same
    function (q.k unchanged), but the keys pass 65504, fp16's largest value. (ONNX Runtime
    on CPU computes many fp16 ops in fp32 internally, so the overflow must reach a tensor
    stored in fp16: the KV cache.)"""
    loaded = tiny("llava")
    model = copy.deepcopy(loaded.model)
    attn = loaded.family.decoder(model).layers[HOT].self_attn
    with torch.no_grad():
        attn.k_proj.weight *= 1e5
        attn.q_proj.weight *= 1e-5
    return replace(loaded, model=model)


def test_fp16_overflow_is_named_and_fp32_layers_fix_it(tmp_path) -> None:
    loaded = overflowing_llava()
    plan = make_plan(loaded.spec, "fastv", budget=32)  # one decision: 4 graphs per export, not 13
    inputs = sample_inputs("llava")
    opts = ExportOptions(precision="fp16", quiet=True, max_new_tokens=8, max_prompt_tokens=160, check_tokens=4)
    bad = export_artifact(loaded, plan, inputs, tmp_path / "fp16", opts)
    assert bad.manifest["check"]["metrics"]["nonfinite_layer"] == HOT
    assert bad.check_failures[0].startswith(f"non-finite values first appear in the prefill KV cache of decoder "
                                            f"layer {HOT}")
    assert f"--fp32-layers {HOT - 1}-{HOT}" in bad.check_failures[0]

    fixed = export_artifact(loaded, plan, inputs, tmp_path / "mixed", replace(opts, fp32_layers=(HOT,)))
    assert fixed.manifest["check"]["passed"], fixed.check_failures
    assert fixed.manifest["fp32_layers"] == [HOT]
    types = {}  # every segment's past-buffer element types (each layer's buffers are one segment's)
    for s in range(len(plan.segments)):
        proto = onnx.load(tmp_path / "mixed" / C.file_of(C.segment(s)))
        types.update({i.name: i.type.tensor_type.elem_type for i in proto.graph.input})
    assert types[C.past(HOT, "key")] == onnx.TensorProto.FLOAT
    assert types[C.past(HOT + 1, "key")] == onnx.TensorProto.FLOAT16
