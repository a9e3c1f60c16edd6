"""The attention forms (export/attention.py): each lowering of reroute::CachedAttention against
the torch op, the torch op against the portable split softmax, in-place KV writes through
ONNX Runtime IO binding, and one end-to-end export in the TensorRT 11 form."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from reroute_export import contract as C
from reroute_export.export.attention import FORMS, default_form, lower
from reroute_export.export.onnx_ops import DOMAIN
from reroute_export.rewrite.attention import cached_attention
from reroute_export.routing.scoring import apply_rope

NH, NKV, HD, M = 4, 2, 16, 12  # GroupQueryAttention's rotary needs head_dim % 16 == 0
SCALE = HD ** -0.5


def _inputs(t: int, past: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    pk, pv = torch.zeros(1, NKV, M, HD), torch.zeros(1, NKV, M, HD)
    pk[:, :, :past], pv[:, :, :past] = r(1, NKV, past, HD), r(1, NKV, past, HD)
    return r(1, t, NH * HD), r(1, t, NKV * HD), r(1, t, NKV * HD), pk, pv, torch.tensor([past])


def _portable(q, k, v, pk, pv, pl):
    """rewrite/segments.attend's math (no rope: cos 1, sin 0) over the valid buffer rows."""
    from reroute_export.rewrite.segments import attend

    class _Attn:  # the attributes attend reads from a decoder layer
        scaling = SCALE

        class config:
            num_attention_heads, num_key_value_heads = NH, NKV

        head_dim = HD

    layer = type("L", (), {"self_attn": _Attn})()
    t = q.shape[1]
    cos, sin = torch.ones(1, t, HD), torch.zeros(1, t, HD)
    return attend(layer, q, k, v, cos, sin, pk, pv, pl)


@pytest.mark.parametrize("t,past", [(5, 0), (1, 5), (3, 7)])
def test_cached_attention_matches_the_portable_split_softmax(t, past):
    q, k, v, pk, pv, pl = _inputs(t, past)
    out, present_k, present_v = cached_attention(q, k, v, pk, pv, pl, NH, NKV, SCALE)
    ref, k_new, v_new = _portable(q, k, v, pk, pv, pl)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(present_k[:, :, past:past + t], k_new)
    torch.testing.assert_close(present_v[:, :, past:past + t], v_new)
    torch.testing.assert_close(present_k[:, :, :past], pk[:, :, :past])  # the rest untouched
    assert torch.equal(present_k[:, :, past + t:], pk[:, :, past + t:])


def _graph() -> onnx.ModelProto:
    f = TensorProto.FLOAT
    node = helper.make_node("CachedAttention", ["q", "k", "v", "pk", "pv", "pl"], ["out", "present.0.key",
                            "present.0.value"], domain=DOMAIN, name="layers.0/attn", num_heads=NH, kv_heads=NKV,
                            scale=SCALE)
    vi = helper.make_tensor_value_info
    g = helper.make_graph([node], "g", [vi("q", f, [1, "T", NH * HD]), vi("k", f, [1, "T", NKV * HD]),
                                        vi("v", f, [1, "T", NKV * HD]), vi("pk", f, [1, NKV, M, HD]),
                                        vi("pv", f, [1, NKV, M, HD]), vi("pl", TensorProto.INT64, [1])],
                          [vi("out", f, [1, "T", NH * HD]), vi("present.0.key", f, [1, NKV, M, HD]),
                           vi("present.0.value", f, [1, NKV, M, HD])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", C.OPSET), helper.make_opsetid(DOMAIN, 1)])
    m.ir_version = C.IR_VERSION
    return m


@pytest.mark.parametrize("form", [f for f in FORMS if FORMS[f].in_graph_kv])
def test_each_lowering_runs_in_onnxruntime_like_the_torch_op(form, tmp_path):
    import onnxruntime as ort

    model = lower(_graph(), form)
    onnx.checker.check_model(model, full_check=True)
    ops = {n.op_type for n in model.graph.node}
    assert "CachedAttention" not in ops
    assert ("GroupQueryAttention" in ops) == (form == "ort-gqa") and ("TensorScatter" in ops) == (form == "kv-scatter")
    assert max(o.version for o in model.opset_import if o.domain == "") == FORMS[form].opset
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for t, past in [(5, 0), (1, 5), (3, 7)]:
        args = _inputs(t, past, seed=t + past)
        want = cached_attention(*args, NH, NKV, SCALE)
        got = sess.run(None, dict(zip(["q", "k", "v", "pk", "pv", "pl"], [a.numpy() for a in args])))
        for w, g in zip(want, got):
            np.testing.assert_allclose(g, w.numpy(), atol=2e-5, rtol=1e-4)


def _rope_rows(positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (1, T, HD) of a LLaMA rotary at these (routed, non-contiguous) positions."""
    inv = 1.0 / (10000 ** (torch.arange(0, HD, 2, dtype=torch.float32) / HD))
    ang = torch.tensor(positions, dtype=torch.float32)[:, None] * inv[None]
    emb = torch.cat([ang, ang], dim=-1)[None]
    return emb.cos(), emb.sin()


def test_the_rotary_moves_into_group_query_attention_exactly():
    """ort-gqa's CachedAttentionRope: GroupQueryAttention applies each row's own rotary
    (do_rotary, the rows' cos/sin as its cache) like rope-then-cached_attention in torch,
    for routed positions with gaps and a buffer already holding rows."""
    import onnxruntime as ort

    from reroute_export.rewrite.attention import cached_attention_rope

    model = _graph()
    node = model.graph.node[0]
    node.op_type = "CachedAttentionRope"
    node.input.extend(["cos", "sin"])
    vi, f = helper.make_tensor_value_info, TensorProto.FLOAT
    model.graph.input.extend([vi("cos", f, [1, "T", HD]), vi("sin", f, [1, "T", HD])])
    model = lower(model, "ort-gqa")
    onnx.checker.check_model(model, full_check=True)
    (gqa,) = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert {a.name: a.i for a in gqa.attribute}["do_rotary"] == 1
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for t, past, positions in [(5, 0, [0, 1, 2, 40, 97]), (1, 5, [130]), (3, 7, [200, 201, 380])]:
        q, k, v, pk, pv, pl = _inputs(t, past, seed=t + past)
        cos, sin = _rope_rows(positions)
        want = cached_attention_rope(q, k, v, pk, pv, pl, cos, sin, NH, NKV, SCALE)
        roped = [apply_rope(x.view(1, t, n, HD).transpose(1, 2), cos, sin).transpose(1, 2).reshape(1, t, n * HD)
                 for x, n in ((q, NH), (k, NKV))]
        for w, r in zip(want, cached_attention(*roped, v, pk, pv, pl, NH, NKV, SCALE)):
            assert torch.equal(w, r)  # the torch op is rope, then cached_attention
        got = sess.run(None, dict(zip(["q", "k", "v", "pk", "pv", "pl", "cos", "sin"],
                                      [a.numpy() for a in (q, k, v, pk, pv, pl, cos, sin)])))
        for w, g in zip(want, got):
            np.testing.assert_allclose(g, w.numpy(), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("form", ["ort-gqa", "kv-scatter"])
def test_the_runtime_binds_present_to_the_past_buffer_in_place(form, tmp_path):
    """runtime/ort.Graph: with past.0.* and present.0.* in one graph, the write lands in the
    host's buffer (same memory, no copy), decode step after decode step."""
    from reroute_export.runtime.ort import Graph

    model = lower(_graph(), form)
    # the runtime pairs present.{i}.* with past.{i}.*: rename the buffer inputs to the contract's names
    for n in model.graph.node:
        n.input[:] = [{"pk": C.past(0, "key"), "pv": C.past(0, "value")}.get(x, x) for x in n.input]
    for i in model.graph.input:
        i.name = {"pk": C.past(0, "key"), "pv": C.past(0, "value")}.get(i.name, i.name)
    onnx.save(model, tmp_path / "g.onnx")
    graph = Graph(tmp_path / "g.onnx", ["CPUExecutionProvider"])
    assert graph.aliases == {C.present(0, "key"): C.past(0, "key"), C.present(0, "value"): C.past(0, "value")}
    q, k, v, pk, pv, _ = _inputs(1, 0)
    keys, values = pk.numpy().copy(), pv.numpy().copy()
    for step in range(3):
        q, k, v = (torch.randn_like(x) for x in (q, k, v))
        feeds = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), C.past(0, "key"): keys, C.past(0, "value"): values,
                 "pl": np.array([step])}
        out = graph(feeds)
        assert out[C.present(0, "key")] is keys  # the host's own buffer came back, written
        np.testing.assert_allclose(keys[0, :, step], k.numpy().reshape(NKV, HD), atol=1e-6)


def test_auto_picks_the_fused_form_the_target_runs():
    assert default_form("onnx", None) == C.PORTABLE  # one file for ONNX Runtime and TensorRT 10.3
    assert default_form("trt", "10.3") == C.PORTABLE  # JetPack 6.x
    assert default_form("trt", "11") == "kv-scatter"
    assert tuple(FORMS) == C.ATTENTION_FORMS


def test_rope_then_cached_attention_is_the_segment_attention():
    """attend_in_graph ropes q and k exactly as the portable path does before attending."""
    from reroute_export.rewrite.segments import attend_in_graph

    q, k, v, pk, pv, pl = _inputs(3, 4)
    ang = torch.randn(1, 3, HD // 2).repeat(1, 1, 2)
    cos, sin = ang.cos(), ang.sin()
    layer = type("L", (), {"self_attn": type("A", (), {"scaling": SCALE, "head_dim": HD,
                                                         "config": type("c", (), {"num_attention_heads": NH,
                                                                                  "num_key_value_heads": NKV})})})()
    out, present_k, _ = attend_in_graph(layer, q, k, v, cos, sin, pk, pv, pl)
    k_roped = apply_rope(k.view(1, 3, NKV, HD).transpose(1, 2), cos, sin)
    torch.testing.assert_close(present_k[:, :, 4:7], k_roped)
    from reroute_export.rewrite.segments import attend

    ref, _, _ = attend(layer, q, k, v, cos, sin, pk, pv, pl)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_a_kv_scatter_export_passes_its_check_and_lints_for_tensorrt_11_only(tmp_path):
    """End to end on Qwen2.5-VL (mRoPE): the opset-24 artifact's post-export parity check passes,
    lint passes for TensorRT 11 (TensorScatter flagged as unconfirmed) and fails for 10.3."""
    from reroute_export import api
    from reroute_export.check.lint import lint

    out = tmp_path / "kvs"
    result = api.export("tiny-qwen2.5-vl", output=out, budget=32, attention="kv-scatter")
    manifest = json.loads((out / C.MANIFEST).read_text())
    assert result.check_failures == [] and manifest["check"]["passed"]
    assert manifest["decoder"]["attention"] == "kv-scatter" and manifest["opset"] == 24
    for name in manifest["graphs"].values():  # the routing graphs' local functions raised with them
        onnx.checker.check_model(str(out / name))
    seg = onnx.load(out / manifest["graphs"][C.segment(1)], load_external_data=False)
    assert [o.name for o in seg.graph.output][1].startswith("present.")
    assert lint(out, "11")["passed"]
    report = lint(out, "10.3")
    assert not report["passed"]
    assert any("opset 24 > 18" in f["message"] for f in report["findings"])
