"""The ONNX Runtime side: host positions vs the HF model's, and OrtArtifact on a real
(fake-weights) artifact whose graphs are real ONNX run by real ONNX Runtime."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FAMILIES, tiny
from fake_artifact import HD, NKV, Simulation, build_fake_artifact
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
def _built(family: str, precision: str, root: str) -> tuple[Path, object, object]:
    folder = Path(root) / f"{family}-{precision}"
    w, plan = build_fake_artifact(folder, tiny(family).preprocessor, precision=precision)
    return folder, w, plan


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("artifacts"))


def _inputs(family: str, index: int = 0):
    path, prompt = SAMPLES[index]
    return tiny(family).preprocessor([load_image(path)], [prompt])


def _reference(family: str, w, plan, inputs, steps: int) -> dict:
    m = tiny(family)
    positions = m.family.positions(m.model, inputs).numpy()  # the HF model's own position ids
    ids = inputs.input_ids[0].numpy()
    return Simulation(w, plan).run(ids, m.preprocessor.image_token_id, inputs.pixel_values.numpy(), positions, steps)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_matches_simulation(family, root) -> None:
    folder, w, plan = _built(family, "fp32", root)
    art = OrtArtifact.load(folder)
    inputs = _inputs(family)
    pre = art.prefill(inputs)
    ref = _reference(family, w, plan, inputs, 1)
    np.testing.assert_allclose(pre["logits"], ref["logits"], rtol=1e-5, atol=1e-4)
    assert pre["logits"].dtype == np.float32 and pre["logits"].shape == (len(w.table),)
    length, n = inputs.input_ids.shape[1], plan.visual_tokens
    for i, ((k, v), (rk, rv)) in enumerate(zip(pre["kv"], ref["kv"])):
        assert k.shape == (1, NKV, length - n + plan.keep_per_layer()[i], HD)
        # image rows: mean(pixel_values) is summed in a different order by ORT and numpy
        np.testing.assert_allclose(k, rk, atol=1e-4)
        np.testing.assert_allclose(v, rv, atol=1e-4 * (i + 1))
    assert [d.tolist() for d in pre["decisions"]] == [(3 * np.arange(s.keep) + j).tolist()
                                                     for j, s in enumerate(plan.stages)]
    m = tiny(family)
    assert pre["next_position"] == int(m.family.positions(m.model, inputs).max()) + 1


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_feeds_present_back_as_past(family, root) -> None:
    folder, w, plan = _built(family, "fp32", root)
    art = OrtArtifact.load(folder, verify=False)
    inputs = _inputs(family, 1)
    ref = _reference(family, w, plan, inputs, 12)
    _, ids = art.generate(inputs, 12)
    assert ids == ref["ids"]
    assert len(set(ids)) > 1  # the loop really depends on the caches and positions


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
    result = art.trace(_inputs(family), 5)
    assert set(result.to_json()) == {"decisions", "last_logits", "generated_ids", "text", "plan"}
    assert list(result.decisions) == [str(s.layer) for s in plan.stages]
    assert result.plan == plan and len(result.generated_ids) == 5
    assert result.text == art.preprocessor.decode(result.generated_ids)
    assert isinstance(result.last_logits[0], float)


def test_fp16_graphs_get_fp16_inputs_and_give_float32_logits(root) -> None:
    folder, w, plan = _built(QWEN2_5_VL, "fp16", root)
    art = OrtArtifact.load(folder)
    inputs = _inputs(QWEN2_5_VL)
    pre = art.prefill(inputs)
    ref = _reference(QWEN2_5_VL, w, plan, inputs, 1)
    assert pre["logits"].dtype == np.float32 and pre["kv"][0][0].dtype == np.float16
    np.testing.assert_allclose(pre["logits"], ref["logits"], rtol=2e-2, atol=5e-2)
    assert len(art.generate(inputs, 4)[1]) == 4


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
