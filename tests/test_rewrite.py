"""Static-shape rewrites and the decoder ONNX graphs against the eager engine."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import FAMILIES, sample_inputs, tiny, tiny_artifact
from reroute_export import contract as C
from reroute_export.export.decoder import DecoderExample, decode_example
from reroute_export.export.onnx_ops import DOMAIN, inline_functions
from reroute_export.plan import make_plan
from reroute_export.rewrite.decoder import static_decode, static_prefill
from reroute_export.routing import RoutedModel, generate

METHODS = ["none", "fastv", "pdrop", "reroute"]


def plan_for(family: str, method: str):
    return make_plan(tiny(family).spec, method, budget=None if method == "none" else 32)


def example(family: str) -> DecoderExample:
    m, inputs = tiny(family), sample_inputs(family)
    with torch.no_grad():
        embeds = m.family.embed(m.model, inputs)
    start = (inputs.input_ids[0] == m.family.image_token_id(m.model)).nonzero()[0]
    return DecoderExample(embeds, m.family.positions(m.model, inputs), start)


@pytest.mark.parametrize("method", METHODS)
def test_static_prefill_and_decode_equal_the_engine(family: str, method: str) -> None:
    m, inputs, plan = tiny(family), sample_inputs(family), plan_for(family, method)
    ex = example(family)
    pre, ids = generate(RoutedModel(m.model, m.family, plan), inputs, 4)
    with torch.no_grad():
        out = static_prefill(m.model, m.family, plan)(ex.inputs_embeds, ex.position_ids, ex.visual_start)
    n_kv = 2 * plan.num_layers
    assert [d.tolist() for d in out[1 + n_kv:]] == [d.tolist() for d in pre.decisions]
    torch.testing.assert_close(out[0], pre.logits, atol=1e-6, rtol=0)
    # decode with the static module reproduces the engine's greedy tokens
    past, token, pos = list(out[1:1 + n_kv]), out[0].argmax(-1), pre.next_position.clone()
    dec = static_decode(m.model, m.family, plan)
    got = [int(token)]
    for _ in range(3):
        p = pos.view(1, 1) if m.family.position_dims == 1 else pos.view(1, 1, 1).expand(3, 1, 1)
        with torch.no_grad():
            res = dec(m.family.decoder(m.model).embed_tokens(token.view(1, 1)), p, *past)
        past, token, pos = list(res[1:]), res[0].argmax(-1), pos + 1
        got.append(int(token))
    assert got == ids[0].tolist()


@functools.lru_cache(maxsize=None)
def exported(family: str, method: str) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """The graphs export_prefill/export_decode wrote into the shared session artifact
    (tiny_artifact exports the same plan, budget 32, through the public pipeline)."""
    folder = tiny_artifact(family, method)
    return onnx.load(folder / C.PREFILL), onnx.load(folder / C.DECODE)


def run(proto: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("family_name", FAMILIES)
def test_prefill_graph_carries_reroute_ops_with_functions(family_name: str) -> None:
    prefill, decode = exported(family_name, "reroute")
    custom = [n for n in prefill.graph.node if n.domain == DOMAIN]
    assert {n.op_type for n in custom} == {"SelectVisual", "RouteGather", "RouteScatter"}
    assert {f.name for f in prefill.functions if f.domain == DOMAIN} == {"SelectVisual", "RouteGather", "RouteScatter"}
    for proto in (prefill, decode):
        onnx.checker.check_model(proto, full_check=True)
        assert proto.ir_version == C.IR_VERSION
        assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) <= 18
        ops = {n.op_type for n in proto.graph.node} | {n.op_type for f in proto.functions for n in f.node}
        assert not ops & {"NonZero", "Loop", "If", "Unique"}
    names = [i.name for i in prefill.graph.input]
    assert names == [C.INPUTS_EMBEDS, C.POSITION_IDS, C.VISUAL_START]


@pytest.mark.parametrize("method", METHODS)
def test_onnx_prefill_and_decode_match_the_engine(family: str, method: str) -> None:
    m, inputs, plan = tiny(family), sample_inputs(family), plan_for(family, method)
    prefill, decode = exported(family, method)
    ex = example(family)
    feeds = {C.INPUTS_EMBEDS: ex.inputs_embeds.numpy(), C.POSITION_IDS: ex.position_ids.numpy(),
             C.VISUAL_START: ex.visual_start.numpy()}
    out = run(prefill, feeds)
    pre = RoutedModel(m.model, m.family, plan).prefill(inputs)
    n_kv = 2 * plan.num_layers
    assert [o.tolist() for o in out[1 + n_kv:]] == [d.tolist() for d in pre.decisions]
    diff = np.abs(out[0] - pre.logits.numpy()).max()
    print(f"{family} {method}: prefill logits max diff {diff:.3g}")
    assert diff < 1e-4
    assert [out[1 + 2 * i].shape[2] for i in range(plan.num_layers)] == pre.cache.lengths()
    # one decode step against the ONNX prefill's KV
    attn = m.family.decoder(m.model).layers[0].self_attn
    args = decode_example(plan, ex, attn.config.num_key_value_heads, attn.head_dim)
    feeds = {C.INPUTS_EMBEDS: args[0].numpy(), C.POSITION_IDS: args[1].numpy()}
    feeds.update({C.past(i, kind): out[1 + 2 * i + j] for i in range(plan.num_layers)
                  for j, kind in enumerate(("key", "value"))})
    step = run(decode, feeds)
    with torch.no_grad():
        ref = static_decode(m.model, m.family, plan)(args[0], args[1], *[torch.from_numpy(x) for x in out[1:1 + n_kv]])
    assert np.abs(step[0] - ref[0].numpy()).max() < 1e-4
    assert step[1].shape[2] == out[1].shape[2] + 1


def test_inlined_graph_runs_the_same() -> None:
    prefill, _ = exported("llava", "reroute")
    flat = inline_functions(prefill)
    assert not [n for n in flat.graph.node if n.domain == DOMAIN] and not flat.functions
    onnx.checker.check_model(flat, full_check=True)
    ex = example("llava")
    feeds = {C.INPUTS_EMBEDS: ex.inputs_embeds.numpy(), C.POSITION_IDS: ex.position_ids.numpy(),
             C.VISUAL_START: ex.visual_start.numpy()}
    a, b = run(prefill, feeds), run(flat, feeds)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_topk_bounds_and_text_length_is_free() -> None:
    prefill, _ = exported("llava", "reroute")
    for f in prefill.functions:
        for n in f.node:
            if n.op_type == "TopK":
                assert {a.name: a.i for a in n.attribute}.get("sorted", 1) == 1
    ks = [a.ints[0] for n in prefill.graph.node if n.op_type == "SelectVisual" for a in n.attribute if a.name == "k"]
    assert ks and max(ks) <= 3840
    # a longer prompt runs through the same artifact (text length is a free axis)
    ex = example("llava")
    extra = 7
    emb = torch.cat([ex.inputs_embeds[:, :1].expand(1, extra, -1), ex.inputs_embeds], 1)
    pos = torch.arange(emb.shape[1]).view(1, -1)
    feeds = {C.INPUTS_EMBEDS: emb.numpy(), C.POSITION_IDS: pos.numpy(),
             C.VISUAL_START: (ex.visual_start + extra).numpy()}
    out = run(prefill, feeds)
    m, plan = tiny("llava"), plan_for("llava", "reroute")
    with torch.no_grad():
        ref = static_prefill(m.model, m.family, plan)(emb, pos, ex.visual_start + extra)
    assert np.abs(out[0] - ref[0].numpy()).max() < 1e-4
