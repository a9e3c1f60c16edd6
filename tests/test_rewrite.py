"""The deployable decoder's modules and ONNX graphs against the eager engine."""

from __future__ import annotations

import functools
import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import FAMILIES, sample_inputs, tiny, tiny_artifact
from reroute_export import contract as C
from reroute_export.export.artifact import read_manifest
from reroute_export.export.decoder import DecoderExample
from reroute_export.export.onnx_ops import DOMAIN, inline_functions
from reroute_export.plan import make_plan
from reroute_export.routing import RoutedModel, generate
from reroute_export.runtime import OrtArtifact
from reroute_export.runtime.torch_static import TorchStaticRuntime

METHODS = ["none", "fastv", "pdrop", "reroute"]


def plan_for(family: str, method: str):
    return make_plan(tiny(family).spec, method, budget=None if method == "none" else 32)


def example(family: str) -> DecoderExample:
    m, inputs = tiny(family), sample_inputs(family)
    with torch.no_grad():
        embeds = m.family.embed(m.model, inputs)
    start = (inputs.input_ids[0] == m.family.image_token_id(m.model)).nonzero()[0]
    return DecoderExample(embeds, m.family.positions(m.model, inputs), start, int(m.spec.vision.visual_tokens))


@pytest.mark.parametrize("method", METHODS)
def test_segment_modules_equal_the_engine(family: str, method: str) -> None:
    """Segments, heads and routing graphs (the modules export traces) driven by the runtime's
    flow with fixed KV buffers give the engine's decisions, logits, tokens and caches."""
    m, inputs, plan = tiny(family), sample_inputs(family), plan_for(family, method)
    pre, ids = generate(RoutedModel(m.model, m.family, plan), inputs, 6)
    cache = RoutedModel(m.model, m.family, plan).prefill(inputs).cache  # before any decode step
    run = TorchStaticRuntime(m, plan, max_new_tokens=8).bind(inputs)
    state = run.prefill()
    assert [d.reshape(-1).tolist() for d in state.decisions] == [d.reshape(-1).tolist() for d in pre.decisions]
    torch.testing.assert_close(state.logits, pre.logits, atol=1e-5, rtol=0)
    pairs = state.kv.pairs()  # the valid rows of each layer's fixed buffer
    assert [k.shape[2] for k, _ in pairs] == cache.lengths()
    for (k, v), k_ref, v_ref in zip(pairs, cache.keys, cache.values):
        torch.testing.assert_close(k, k_ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(v, v_ref, atol=1e-5, rtol=0)
    buffers = [id(k) for k in state.kv.keys]
    tokens = [int(state.logits.argmax())]
    for step in range(5):
        state = run.decode(state, step)
        tokens.append(int(state.logits.argmax()))
    assert tokens == ids[0].tolist()
    assert [id(k) for k in state.kv.keys] == buffers  # written in place, never reallocated


@functools.lru_cache(maxsize=None)
def exported(family: str, method: str) -> dict[str, onnx.ModelProto]:
    """Role -> graph of the shared session artifact (tiny_artifact exports the same plan,
    budget 32, through the public pipeline)."""
    folder = tiny_artifact(family, method)
    return {role: onnx.load(folder / name) for role, name in read_manifest(folder)["graphs"].items()}


def run(proto: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


class HostSyncs(TorchDispatchMode):
    """Records the ops a CUDA graph capture cannot hold: a read back to the host (int(), .item(),
    `if tensor`), an op whose output shape depends on data (nonzero, masked_select, unique), a
    tensor made from host data (torch.tensor / from_numpy then .to), a copy between devices."""

    STOPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_dim",
             "unique_consecutive", "equal", "is_nonzero", "repeat_interleave", "lift_fresh", "lift_fresh_copy"}

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if name in self.STOPS or (name == "_to_copy" and "device" in kwargs):
            self.seen.append(name)
        return func(*args, **kwargs)


@pytest.mark.parametrize("method", METHODS)
def test_the_steps_a_gpu_captures_as_cuda_graphs_never_wait_on_the_host(family: str, method: str) -> None:
    """torch-static captures prefill and each decode step as CUDA graphs on a GPU (the GPU
    benchmark's decode figure). Capture fails, and the run falls back to eager modules, on any
    host read, data-dependent shape or host-made tensor inside a step. No GPU here, so the same
    steps run on the CPU under a dispatch mode that records such ops, after the warm-up the
    capture does (two passes: index tensors are made once and reused)."""
    m, inputs, plan = tiny(family), sample_inputs(family), plan_for(family, method)
    run = TorchStaticRuntime(m, plan, max_new_tokens=8).bind(inputs)
    with torch.no_grad():
        for _ in range(2):  # StaticRun._warm_up's passes
            state = run._prefill_eager()
            for step in range(3):
                state = run._decode_eager(state, step)
        with HostSyncs() as probe:  # what _record runs under torch.cuda.graph
            state = run._prefill_eager()
            for step in range(3):
                state = run._decode_eager(state, step)
        assert probe.seen == [], probe.seen
        with HostSyncs() as check:  # the probe sees what it is for
            int(state.logits.argmax())
            run.decoder.xp.index([12345])
        assert check.seen == ["_local_scalar_dense", "lift_fresh"], check.seen


@pytest.mark.parametrize("family_name", FAMILIES)
def test_graphs_follow_the_contract(family_name: str) -> None:
    """Routing graphs carry the reroute ops with their functions; every graph passes the
    full checker at IR 8 / opset <= 18 with no data-dependent ops; I/O names are the contract's."""
    graphs = exported(family_name, "reroute")
    plan = plan_for(family_name, "reroute")
    assert set(graphs) == {"vision", *(C.segment(s) for s in range(5)), *(C.head(j) for j in range(4)),
                           *(C.route(j) for j in range(4))}
    for role, proto in graphs.items():
        onnx.checker.check_model(proto, full_check=True)
        assert proto.ir_version == C.IR_VERSION
        assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) <= 18
        ops = {n.op_type for n in proto.graph.node} | {n.op_type for f in proto.functions for n in f.node}
        assert not ops & {"NonZero", "Loop", "If", "Unique"}, role
        if role.startswith("route"):
            assert {n.op_type for n in proto.graph.node if n.domain == DOMAIN} == {"SelectVisual", "RouteGather"}
            assert {f.name for f in proto.functions if f.domain == DOMAIN} == {"SelectVisual", "RouteGather"}
            assert not [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT
                        and np.prod(t.dims) > 64], "routing graphs hold no weights"
    for s, layers in enumerate(plan.segments):
        ins, outs = C.segment_io(layers, s > 0, s == len(plan.segments) - 1)
        assert [i.name for i in graphs[C.segment(s)].graph.input] == ins
        assert [o.name for o in graphs[C.segment(s)].graph.output] == outs


def _digests(array: np.ndarray) -> set[str]:
    """A weight as stored either way round (the exporter may store a Linear weight transposed)."""
    out = {hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()}
    if array.ndim == 2:
        out.add(hashlib.sha256(np.ascontiguousarray(array.T).tobytes()).hexdigest())
    return out


@pytest.mark.parametrize("family_name", FAMILIES)
def test_each_decoder_weight_is_in_exactly_one_graph(family_name: str) -> None:
    """Prefill and decode share the segment and head graphs: every decoder matrix is stored in
    exactly one graph, and the decoder graphs hold nothing else of that size."""
    m = tiny(family_name)
    graphs = exported(family_name, "reroute")
    where: dict[str, list[str]] = {}
    for role, proto in graphs.items():
        for t in proto.graph.initializer:
            if np.prod(t.dims) > 1024:
                d = hashlib.sha256(np.ascontiguousarray(onnx.numpy_helper.to_array(t)).tobytes()).hexdigest()
                where.setdefault(d, []).append(role)
    decoder = m.family.decoder(m.model)
    mats = [p for layer in decoder.layers for p in layer.parameters() if p.dim() == 2]
    mats.append(m.family.lm_head(m.model).weight)
    for p in mats:
        roles = {r for d in _digests(p.detach().numpy()) for r in where.get(d, [])}
        assert len(roles) == 1 and not roles & {"vision"}, roles
        found = [r for d in _digests(p.detach().numpy()) for r in where.get(d, [])]
        assert len(found) == 1, found  # once, not once per graph that uses it


def test_decode_has_one_shape_and_writes_in_place() -> None:
    """Every decode step feeds each segment the same shapes (T = 1, the run's fixed buffers:
    its prompt rows + 6, at most M_s) and the same buffer objects; only past_length and the
    new row change."""
    art = OrtArtifact.load(tiny_artifact("llava", "reroute"), verify=False)
    inputs = sample_inputs("llava")
    with art.recording(C.segment(2)) as feeds:
        art.generate(inputs, 6)
    decode = feeds[1:]  # the first call is prefill's
    assert len(decode) == 5
    cache = art.plan.cache_tokens(inputs.input_ids.shape[1], 6)[2]
    assert cache < art.shapes["cache_tokens"][2]
    for f in decode:
        assert f[C.HIDDEN].shape[1] == 1
        assert all(f[C.past(i, kind)].shape[2] == cache for i in art.plan.segments[2] for kind in ("key", "value"))
    assert [int(f[C.PAST_LENGTH][0]) for f in decode] == [decode[0][C.PAST_LENGTH][0] + i for i in range(5)]
    assert feeds[0][C.past(art.plan.segments[2][0], "key")].shape[2] == 1  # prefill: a one-row dummy


def test_inlined_graphs_run_the_same() -> None:
    graphs = exported("llava", "reroute")
    art = OrtArtifact.load(tiny_artifact("llava", "reroute"), verify=False)
    for role in (C.route(0), C.segment(1)):
        with art.recording(role) as feeds:
            art.generate(sample_inputs("llava"), 2)
        flat = inline_functions(graphs[role])
        assert not [n for n in flat.graph.node if n.domain == DOMAIN] and not flat.functions
        onnx.checker.check_model(flat, full_check=True)
        for f in feeds:
            a, b = run(graphs[role], f), run(flat, f)
            assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_topk_bounds_and_text_length_is_free() -> None:
    graphs = exported("llava", "reroute")
    for role, proto in graphs.items():
        for f in proto.functions:
            for n in f.node:
                if n.op_type == "TopK":
                    assert {a.name: a.i for a in n.attribute}.get("sorted", 1) == 1
    ks = [a.ints[0] for p in graphs.values() for n in p.graph.node if n.op_type == "SelectVisual"
          for a in n.attribute if a.name == "k"]
    assert ks and max(ks) <= 3840
    # a longer prompt runs through the same artifact (text length is a free axis) as through the modules
    ex = example("llava")
    extra = 7
    emb = torch.cat([ex.inputs_embeds[:, :1].expand(1, extra, -1), ex.inputs_embeds], 1)
    pos = torch.arange(emb.shape[1]).view(1, -1)
    vs = int(ex.visual_start) + extra
    art = OrtArtifact.load(tiny_artifact("llava", "reroute"), verify=False)
    logits, cache, decisions = art.decoder.prefill(emb.numpy(), pos.numpy(), vs)
    m, plan = tiny("llava"), plan_for("llava", "reroute")
    ref = TorchStaticRuntime(m, plan, max_new_tokens=4).decoder_for(emb.shape[1], "cpu")
    r_logits, _, r_decisions = ref.prefill(emb, pos, vs)
    assert [d.reshape(-1).tolist() for d in decisions] == [d.reshape(-1).tolist() for d in r_decisions]
    assert np.abs(logits - r_logits.numpy()).max() < 1e-4
