"""The ONNX Runtime side: host positions vs the HF model's, and OrtArtifact on a real
(fake-weights) artifact whose graphs are real ONNX run by real ONNX Runtime: the segmented
decoder's segment/head/route graphs (tests/fake_artifact.py), driven by runtime/segmented.py
over fixed KV buffers, checked against a numpy simulation of the whole flow."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FAMILIES, tiny
from fake_artifact import HD, NKV, Simulation, build_fake_artifact
from reroute_export import contract as C
from reroute_export.errors import UserError
from reroute_export.families.llava import llava_positions
from reroute_export.families.qwen2_5_vl import Qwen25VL, qwen_positions
from reroute_export.preprocess import Preprocessor, load_image, samples
from reroute_export.runtime import OrtArtifact
from reroute_export.runtime.positions import next_position

SAMPLES = samples()
QWEN2_5_VL = Qwen25VL.name


# ---------------------------------------------------------------- positions


def test_llava_positions() -> None:
    pos = llava_positions(7)
    assert pos.dtype == np.int64 and pos.shape == (1, 7)
    assert pos.tolist() == [list(range(7))]
    assert next_position(pos) == 7


def _hf_rope(model, ids: torch.Tensor, grid: torch.Tensor) -> np.ndarray:
    image_id = int(model.config.image_token_id)
    pos, _ = model.model.get_rope_index(ids, mm_token_type_ids=(ids == image_id).int(), image_grid_thw=grid)
    return pos.numpy()  # (3, 1, L)


def _qwen_case(image_size: tuple[int, int] | None, index: int):
    """Inputs from the tiny Qwen preprocessor, optionally with a non-square grid."""
    m = tiny(QWEN2_5_VL)
    pre = m.preprocessor
    if image_size is not None:
        pre = Preprocessor(Qwen25VL, pre.tokenizer, pre.image_processor, image_size=image_size)
    path, prompt = SAMPLES[index]
    return m.model, pre([load_image(path)], [prompt])


@pytest.mark.parametrize("image_size,index", [(None, 0), ((112, 224), 1)])
def test_qwen_positions_match_get_rope_index(image_size, index) -> None:
    model, inputs = _qwen_case(image_size, index)
    ref = _hf_rope(model, inputs.input_ids, inputs.image_grid_thw)
    got = qwen_positions(inputs.input_ids.numpy(), int(model.config.image_token_id),
                         inputs.image_grid_thw.numpy(), model.config.vision_config.spatial_merge_size)
    assert got.dtype == np.int64 and got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)
    assert next_position(got) == int(ref.max()) + 1 < inputs.input_ids.shape[1]  # mRoPE compresses the image


def test_qwen_positions_two_frame_grid_and_text_after_image() -> None:
    """A t=2 grid (HF advances the running index by max(h, w)/merge, not by the block max + 1)."""
    model = tiny(QWEN2_5_VL).model
    image = int(model.config.image_token_id)
    grid = torch.tensor([[2, 4, 6]])  # 2 * 2 * 3 = 12 tokens after a 2x2 merge
    ids = torch.tensor([[5, 6, 7] + [image] * 12 + [8, 9]])
    got = qwen_positions(ids.numpy(), image, grid.numpy(), 2)
    np.testing.assert_array_equal(got, _hf_rope(model, ids, grid))


# ---------------------------------------------------------------- the fake artifact


@functools.lru_cache(maxsize=None)
def _built(family: str, precision: str, root: str, method: str = "reroute") -> tuple[Path, object, object]:
    folder = Path(root) / f"{family}-{precision}-{method}"
    w, plan = build_fake_artifact(folder, tiny(family).preprocessor, precision=precision, method=method)
    return folder, w, plan


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("artifacts"))


def _inputs(family: str, index: int = 0):
    path, prompt = SAMPLES[index]
    return tiny(family).preprocessor([load_image(path)], [prompt])


def _reference(family: str, w, plan, inputs, steps: int, precision: str = "fp32") -> dict:
    m = tiny(family)
    positions = m.family.positions(m.model, inputs).numpy()  # the HF model's own position ids
    ids = inputs.input_ids[0].numpy()
    return Simulation(w, plan, precision).run(ids, m.preprocessor.image_token_id, inputs.pixel_values.numpy(),
                                              positions, steps)


def test_fake_graphs_follow_the_contract(root) -> None:
    """The fake's sessions declare exactly the contract's I/O names (so the tests below drive
    the runtime through the real interface): segments with fixed past buffers, heads, routes."""
    folder, _, plan = _built("llava", "fp32", root, "pdrop")
    art = OrtArtifact.load(folder, verify=False)
    roles = ["vision"] + [C.segment(0)]
    for j in range(len(plan.stages)):
        roles += [C.head(j), C.route(j), C.segment(j + 1)]
    assert list(art.manifest["graphs"]) == roles and art.manifest["decoder"]["segments"] == [[0, 1], [1, 3], [3, 4]]
    last = len(plan.segments) - 1
    for role, graph in art.graphs.items():
        kind, index = role.split(".")[0], int(role.split(".")[1]) if "." in role else 0
        want = {"vision": ([C.PIXEL_VALUES], [C.IMAGE_FEATURES]),
                "segment": lambda: C.segment_io(plan.segments[index], index > 0, index == last),
                "head": C.HEAD_IO, "route": lambda: C.route_io(index, index > 0)}[kind]
        want = want() if callable(want) else want
        got = ([i.name for i in graph.session.get_inputs()], graph.output_names)
        assert got == (list(want[0]), list(want[1])), role
    seg = {i.name: i.shape for i in art.graphs[C.segment(1)].session.get_inputs()}
    assert seg[C.PAST_LENGTH] == [1] and seg[C.past(1, "key")][:2] == [1, NKV] and seg[C.past(2, "value")][3] == HD
    assert not any(i.name == C.CANDIDATES for i in art.graphs[C.route(0)].session.get_inputs())  # chained: route.1 only


@pytest.mark.parametrize("family,method", [(f, "reroute") for f in FAMILIES] + [("llava", "pdrop")])
def test_prefill_matches_simulation(family, method, root) -> None:
    folder, w, plan = _built(family, "fp32", root, method)
    art = OrtArtifact.load(folder)
    inputs = _inputs(family)
    pre = art.prefill(inputs)
    ref = _reference(family, w, plan, inputs, 1)
    np.testing.assert_allclose(pre["logits"], ref["logits"], rtol=1e-5, atol=1e-4)
    assert pre["logits"].dtype == np.float32 and pre["logits"].shape == (len(w.table),)
    length, n = inputs.input_ids.shape[1], plan.visual_tokens
    pairs = pre["kv"].pairs()
    assert len(pairs) == plan.num_layers
    for i, ((k, v), (rk, rv)) in enumerate(zip(pairs, ref["kv"])):
        # stage rows: L before the first decision, then the L - N + K_j rows routing kept
        assert k.shape == v.shape == (1, NKV, length - n + plan.keep_per_layer()[i], HD), i
        # image rows: mean(pixel_values) is summed in a different order by ORT and numpy
        np.testing.assert_allclose(k, rk, atol=1e-4)
        np.testing.assert_allclose(v, rv, atol=1e-4)
    # the routing graphs' decisions, data-dependent (not simply the first K), ascending original indices
    got = [d.tolist() for d in pre["decisions"]]
    assert got == [d.tolist() for d in ref["decisions"]]
    assert [len(d) for d in got] == [s.keep for s in plan.stages] and all(d == sorted(d) for d in got)
    assert got[0] != list(range(plan.stages[0].keep)) and max(got[-1]) < n
    if not plan.recoverable:  # a delete method keeps a subset of the survivors
        assert set(got[1]) <= set(got[0])
    else:  # reroute re-scores all N: a token deferred at the first decision can come back
        assert not set(got[1]) <= set(got[0])
    m = tiny(family)
    assert pre["next_position"] == int(m.family.positions(m.model, inputs).max()) + 1


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_feeds_new_rows_back_as_past(family, root) -> None:
    folder, w, plan = _built(family, "fp32", root)
    art = OrtArtifact.load(folder, verify=False)
    inputs = _inputs(family, 1)
    ref = _reference(family, w, plan, inputs, 12)
    _, ids = art.generate(inputs, 12)
    assert ids == ref["ids"]
    assert len(set(ids)) > 1  # the loop really depends on the caches and positions


def test_decode_steps_match_simulation_and_a_wrong_length_is_caught(root) -> None:
    """Every decode step's logits and the final KV rows: the runtime passes each stage's
    buffers with the right valid length and position and writes the new row at that length."""
    folder, w, plan = _built(QWEN2_5_VL, "fp32", root)
    art = OrtArtifact.load(folder, verify=False)
    inputs = _inputs(QWEN2_5_VL, 1)
    ref = _reference(QWEN2_5_VL, w, plan, inputs, 6)
    pre = art.prefill(inputs)
    logits, kv, steps = pre["logits"], pre["kv"], []
    for step in range(5):
        logits, kv = art.decode_step(int(np.argmax(logits)), pre["next_position"] + step, kv)
        steps.append(logits)
    for got, want in zip(steps, ref["step_logits"], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    for (k, v), (rk, rv) in zip(kv.pairs(), ref["kv_final"], strict=True):
        np.testing.assert_allclose(k, rk, atol=1e-4)
        np.testing.assert_allclose(v, rv, atol=1e-4)
    # the simulation notices a valid length off by one (the fake is not blind to it)
    graph = art.graphs[C.segment(1)]
    art.graphs[C.segment(1)] = lambda feeds: graph({**feeds, C.PAST_LENGTH: feeds[C.PAST_LENGTH] + 1})
    try:
        pre = art.prefill(inputs)
        wrong = art.decode_step(int(np.argmax(pre["logits"])), pre["next_position"], pre["kv"])[0]
    finally:
        art.graphs[C.segment(1)] = graph
    assert np.abs(wrong - ref["step_logits"][0]).max() > 1e-2


class _Spy:
    """Stands in for one session: keeps each feed dict as the runtime built it (the very arrays)."""

    def __init__(self, graph, calls: list) -> None:
        self.graph, self.calls = graph, calls

    def __getattr__(self, name):
        return getattr(self.graph, name)

    def __call__(self, feeds):
        self.calls.append(dict(feeds))
        return self.graph(feeds)


def test_kv_buffers_are_allocated_once_and_written_in_place(root) -> None:
    """One fixed (1, nkv, M_s, hd) buffer per layer for the whole run: every decode step feeds
    the same array objects (no copy, no concatenation) and writes exactly one new row per
    layer, at the stage's length."""
    folder, w, plan = _built("llava", "fp32", root)
    art = OrtArtifact.load(folder, verify=False)
    made = []
    new_cache = art.decoder.new_cache
    art.decoder.new_cache = lambda rows=None: made.append(new_cache(rows)) or made[-1]
    calls: dict[str, list] = {C.segment(s): [] for s in range(len(plan.segments))}
    for role, sink in calls.items():
        art.graphs[role] = _Spy(art.graphs[role], sink)
    pre = art.prefill(_inputs("llava"))
    cache = pre["kv"]
    assert made == [cache]
    sizes = art.manifest["shapes"]["cache_tokens"]
    stage = {i: s for s, layers in enumerate(plan.segments) for i in layers}
    buffers = [(cache.keys[i], cache.values[i]) for i in range(plan.num_layers)]
    for i, (k, v) in enumerate(buffers):
        assert k.shape == v.shape == (1, NKV, sizes[stage[i]], HD)
    for role, sink in calls.items():  # prefill: T rows against a one-row dummy, past_length 0
        (feed,) = sink
        assert int(feed[C.PAST_LENGTH][0]) == 0
        assert all(feed[C.past(i, "key")].shape[2] == 1 for i in plan.segments[int(role.split(".")[1])])
        sink.clear()
    logits = pre["logits"]
    for step in range(4):
        before = [(k.copy(), v.copy()) for k, v in buffers]
        lengths = list(cache.lengths)
        logits, kv = art.decode_step(int(np.argmax(logits)), pre["next_position"] + step, cache)
        assert kv is cache and cache.lengths == [n + 1 for n in lengths]
        for i, ((k, v), (k0, v0)) in enumerate(zip(buffers, before)):
            assert cache.keys[i] is k and cache.values[i] is v  # the same arrays, written in place
            for now, was in ((k, k0), (v, v0)):
                changed = np.flatnonzero((now != was).any(axis=(0, 1, 3)))
                assert changed.tolist() == [lengths[stage[i]]], (step, i)  # one row, at the valid length
        for s, sink in calls.items():
            (feed,) = sink  # one call per segment per step, T = 1, the full fixed buffers themselves
            index = int(s.split(".")[1])
            assert feed[C.HIDDEN].shape[1] == 1 and int(feed[C.PAST_LENGTH][0]) == lengths[index]
            for i in plan.segments[index]:
                assert feed[C.past(i, "key")] is cache.keys[i] and feed[C.past(i, "value")] is cache.values[i]
            sink.clear()
    assert made == [cache]  # decoding allocated nothing new
    art.generate(_inputs("llava"), 3)
    assert len(made) == 2 and made[1] is not cache  # one new cache per run


def test_a_run_that_says_its_length_gets_buffers_of_that_size(root) -> None:
    """generate(n) allocates per stage the prompt's rows + n, not the artifact's M_s, and
    decodes what the full buffers decode; the segments read every buffer row (masked), so
    fewer rows is less work. A step past the run's size is refused before any graph runs."""
    folder, w, plan = _built("llava", "fp32", root)
    art = OrtArtifact.load(folder, verify=False)
    inputs = _inputs("llava")
    full = art.prefill(inputs)  # no count given: the artifact's M_s
    sized = art.prefill(inputs, new_tokens=4)
    length, sizes = inputs.input_ids.shape[1], art.manifest["shapes"]["cache_tokens"]
    assert full["kv"].rows == sizes
    assert sized["kv"].rows == [p + 4 for p in plan.cache_tokens(length, 0)]
    assert all(n < m for n, m in zip(sized["kv"].rows, sizes))
    stage = {i: s for s, layers in enumerate(plan.segments) for i in layers}
    assert all(k.shape[2] == sized["kv"].rows[stage[i]] for i, k in enumerate(sized["kv"].keys))
    np.testing.assert_array_equal(sized["logits"], full["logits"])
    a, b = full, sized
    for step in range(3):  # generate(4) decodes 3 steps after the prefill's token
        la, _ = art.decode_step(int(np.argmax(a["logits"])), a["next_position"] + step, a["kv"])
        lb, _ = art.decode_step(int(np.argmax(b["logits"])), b["next_position"] + step, b["kv"])
        np.testing.assert_allclose(lb, la, rtol=0, atol=1e-5)
        a, b = {**a, "logits": la}, {**b, "logits": lb}
    assert art.generate(inputs, 4)[1] == _reference("llava", w, plan, inputs, 4)["ids"]
    art.decode_step(0, b["next_position"] + 3, b["kv"])  # the 4th decode step: the last spare row
    with pytest.raises(RuntimeError, match=r"^stage 0's KV buffer holds \d+ rows; \d+ asked \(the run's prompt"):
        art.decode_step(0, b["next_position"] + 4, b["kv"])
    run = art.bind(inputs, new_tokens=4)  # what a benchmark binds: the same sizes, readable before the run
    assert run.layout.cache_tokens == sized["kv"].rows and run.prefill().kv.rows == sized["kv"].rows


def test_generate_stops_at_eos_and_keeps_it(root) -> None:
    folder, w, plan = _built("llava", "fp32", root)
    art = OrtArtifact.load(folder, verify=False)
    inputs = _inputs("llava")
    ids = _reference("llava", w, plan, inputs, 12)["ids"]
    k = next(i for i in range(1, len(ids)) if ids[i] not in ids[:i])
    _, got = art.generate(inputs, 12, eos_token_id=ids[k])
    assert got == ids[:k + 1]
    assert art.generate(inputs, 0)[1] == []


@pytest.mark.parametrize("family", FAMILIES)
def test_trace_has_the_eager_contract(family, root) -> None:
    folder, w, plan = _built(family, "fp32", root)
    art = OrtArtifact.load(folder, verify=False)
    inputs = _inputs(family)
    result = art.trace(inputs, 5)
    assert set(result.to_json()) == {"decisions", "last_logits", "generated_ids", "text", "plan"}
    assert list(result.decisions) == [str(s.layer) for s in plan.stages]
    ref = _reference(family, w, plan, inputs, 5)
    assert list(result.decisions.values()) == [d.tolist() for d in ref["decisions"]]
    assert result.plan == plan and result.generated_ids == ref["ids"]
    assert result.text == art.preprocessor.decode(result.generated_ids)
    assert isinstance(result.last_logits[0], float)


def test_fp16_graphs_get_fp16_inputs_and_give_float32_logits(root) -> None:
    folder, w, plan = _built(QWEN2_5_VL, "fp16", root)
    art = OrtArtifact.load(folder)
    inputs = _inputs(QWEN2_5_VL)
    pre = art.prefill(inputs)
    ref = _reference(QWEN2_5_VL, w, plan, inputs, 4, "fp16")  # fp16 wherever a graph hands a tensor over
    assert pre["logits"].dtype == np.float32 and art.embed_dtype == np.float16
    assert all(k.dtype == v.dtype == np.float16 for k, v in pre["kv"].pairs())
    assert art.graphs[C.segment(1)].dtype(C.QUERY) == np.float16
    np.testing.assert_allclose(pre["logits"], ref["logits"], rtol=1e-3, atol=1e-3)
    assert [d.tolist() for d in pre["decisions"]] == [d.tolist() for d in ref["decisions"]]
    assert art.generate(inputs, 4)[1] == ref["ids"]


# ---------------------------------------------------------------- checks before any graph runs


def test_prompt_longer_than_the_artifact_is_refused(tmp_path) -> None:
    pre = tiny("llava").preprocessor
    build_fake_artifact(tmp_path / "a", pre, max_prompt_tokens=70)
    art = OrtArtifact.load(tmp_path / "a")
    path, prompt = SAMPLES[0]
    length = _inputs("llava").input_ids.shape[1]
    with pytest.raises(UserError, match=rf"^prompt has {length} tokens; this artifact takes at most 70$"):
        art.prepare(load_image(path), prompt)
    with pytest.raises(UserError, match="at most 70"):
        art.prefill(_inputs("llava"))  # the .npy route checks too


def test_inputs_the_artifact_cannot_run(root) -> None:
    folder, _, plan = _built(QWEN2_5_VL, "fp32", root)
    art = OrtArtifact.load(folder, verify=False)
    inputs = _inputs(QWEN2_5_VL)
    ids = inputs.input_ids.clone()
    ids[ids == art.preprocessor.image_token_id] = 0
    with pytest.raises(UserError, match=f"0 image tokens; this artifact was exported for {plan.visual_tokens}"):
        art.prefill(type(inputs)(input_ids=ids, pixel_values=inputs.pixel_values))
    with pytest.raises(UserError, match="differs from the exported grid"):
        art.prefill(type(inputs)(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values,
                                 image_grid_thw=torch.tensor([[1, 8, 32]])))
    with pytest.raises(UserError, match="one prompt at a time"):
        art.prefill(type(inputs)(input_ids=inputs.input_ids.repeat(2, 1), pixel_values=inputs.pixel_values))
    with pytest.raises(UserError, match=r"max new tokens must be in 0\.\.32"):
        art.generate(inputs, 33)
    # without a grid the exported one is used (it is fixed anyway)
    art.prefill(type(inputs)(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values))


def test_load_verifies_checksums(tmp_path) -> None:
    build_fake_artifact(tmp_path / "a", tiny("llava").preprocessor)
    table = np.load(tmp_path / "a" / "embed_tokens.npy")
    table[3, 0] += 1.0
    np.save(tmp_path / "a" / "embed_tokens.npy", table)  # still a valid .npy, different bytes
    with pytest.raises(UserError, match="embed_tokens.npy checksum mismatch"):
        OrtArtifact.load(tmp_path / "a")
    OrtArtifact.load(tmp_path / "a", verify=False)  # the exporter's own check skips re-hashing
