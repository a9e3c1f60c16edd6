"""Tiny models + preprocessing: determinism, HF-processor parity, forward/generate, round trips."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch
from transformers import (
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
)

from reroute_export.errors import UserError
from reroute_export.families import get_family
from reroute_export.families.llava import Llava
from reroute_export.families.qwen2_5_vl import Qwen25VL, fixed_image_size
from reroute_export.preprocess import (
    Preprocessor,
    VLInputs,
    load_image,
    sample_path,
    samples,
)
from reroute_export.tiny import save_checkpoint

tiny_llava, tiny_qwen2_5_vl = Llava.tiny, Qwen25VL.tiny

BUILDERS: dict[str, tuple[Callable[..., tuple[PreTrainedModel, Preprocessor]], type[PreTrainedModel]]] = {
    "llava": (tiny_llava, LlavaForConditionalGeneration),
    "qwen2.5-vl": (tiny_qwen2_5_vl, Qwen2_5_VLForConditionalGeneration),
}
N_VISUAL = 64  # both tiny families
FAMILIES = list(BUILDERS)


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request: pytest.FixtureRequest) -> tuple[str, PreTrainedModel, Preprocessor]:
    build, _ = BUILDERS[request.param]
    model, pre = build(seed=0)
    return request.param, model, pre


@pytest.fixture(scope="module")
def images() -> list:
    """Two real photographs of different aspect ratios (square astronaut, 3:2 cat)."""
    return [load_image(sample_path("astronaut.jpg")), load_image(sample_path("chelsea.jpg"))]


def forward_kwargs(family: str, inputs: VLInputs, image_token_id: int) -> dict[str, torch.Tensor]:
    """What the HF forward needs; Qwen2.5-VL needs mm_token_type_ids for its 3-D mRoPE."""
    kwargs = {
        "input_ids": inputs.input_ids,
        "attention_mask": inputs.attention_mask,
        "pixel_values": inputs.pixel_values,
    }
    if family == "qwen2.5-vl":
        kwargs["image_grid_thw"] = inputs.image_grid_thw
        kwargs["mm_token_type_ids"] = (inputs.input_ids == image_token_id).int()
    return kwargs


# --------------------------------------------------------------------------- (a) seeds


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_weights_different_seed_different(family: str) -> None:
    build, _ = BUILDERS[family]
    a, _ = build(seed=0)
    b, _ = build(seed=0)
    c, _ = build(seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())
    assert all(v.dtype == torch.float32 for v in sa.values() if v.is_floating_point())


def test_building_does_not_touch_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_llava(seed=5)
    assert torch.equal(torch.rand(3), expected)


# --------------------------------------------------------------------------- (b) inputs, forward, generate


def test_config_token_ids_match_tokenizer(tiny) -> None:
    family, model, pre = tiny
    cfg, tok = model.config, pre.tokenizer
    assert cfg.image_token_id == pre.image_token_id
    assert cfg.text_config.vocab_size == len(tok)
    if family == "llava":
        assert pre.image_token_id == tok.convert_tokens_to_ids("<image>")
        assert cfg.text_config.bos_token_id == tok.bos_token_id
        assert cfg.text_config.eos_token_id == tok.eos_token_id
        assert cfg.text_config.pad_token_id == tok.pad_token_id
    else:
        assert pre.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
        assert cfg.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
        assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
        assert cfg.text_config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")


def test_text_round_trips_through_tokenizer(tiny) -> None:
    _, _, pre = tiny
    text = "Describe the image.\n  Tabs\tand ünïcödé — 猫 🐱, <b>tags</b> {braces}"
    ids = pre.tokenizer.encode(text, add_special_tokens=False)
    assert pre.decode(ids) == text


def test_inputs_shapes_and_image_token_count(tiny, images) -> None:
    family, _, pre = tiny
    inputs = pre(images[:1], ["Describe the image."])
    assert inputs.input_ids.dtype == torch.int64 and inputs.input_ids.shape[0] == 1
    assert int((inputs.input_ids == pre.image_token_id).sum()) == N_VISUAL
    assert inputs.attention_mask.shape == inputs.input_ids.shape and bool(inputs.attention_mask.all())
    assert inputs.pixel_values.dtype == torch.float32
    if family == "llava":
        assert inputs.pixel_values.shape == (1, 3, 112, 112)
        assert inputs.input_ids[0, 0] == pre.tokenizer.bos_token_id  # Llama tokenizer adds BOS
        assert inputs.image_grid_thw is None
    else:
        # 224x224 -> 16x16 patches of 14 px, each flattened to C*T*P*P = 3*2*14*14
        assert inputs.pixel_values.shape == (256, 1176)
        assert inputs.image_grid_thw.tolist() == [[1, 16, 16]]
        assert torch.equal(inputs.mm_token_type_ids, (inputs.input_ids == pre.image_token_id).long())
    # the image tokens form one contiguous run
    where = (inputs.input_ids[0] == pre.image_token_id).nonzero().flatten()
    assert int(where[-1] - where[0]) == N_VISUAL - 1


def test_every_image_gets_the_same_grid(tiny, images) -> None:
    """Square and 3:2 photos give the same number of tokens (LLaVA crops, Qwen fixed size)."""
    _, _, pre = tiny
    inputs = pre(images, ["a", "b"])
    assert (inputs.input_ids == pre.image_token_id).sum(dim=1).tolist() == [N_VISUAL, N_VISUAL]


def test_forward_finite_and_not_flat(tiny, images) -> None:
    family, model, pre = tiny
    inputs = pre(images[:1], ["Describe the image."])
    with torch.no_grad():
        logits = model(**forward_kwargs(family, inputs, pre.image_token_id)).logits  # (1, L, vocab)
    assert logits.shape == (*inputs.input_ids.shape, model.config.text_config.vocab_size)
    assert bool(torch.isfinite(logits).all())
    assert float(logits[0, -1].std()) > 0.1  # weights spread enough for distinct logits


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_is_not_uniform(family: str, images) -> None:
    """Reroute ranks visual tokens by attention: a near-flat random init would make that meaningless."""
    build, _ = BUILDERS[family]
    model, pre = build(seed=0, attn_implementation="eager")
    inputs = pre(images[:1], ["Describe the image."])
    with torch.no_grad():
        out = model(**forward_kwargs(family, inputs, pre.image_token_id), output_attentions=True)
    visual = inputs.input_ids[0] == pre.image_token_id  # (L,)
    for layer_attn in out.attentions:  # each (1, heads, L, L)
        score = layer_attn[0, :, -1].mean(dim=0)[visual]  # last query -> image keys, head mean: (64,)
        assert float(score.max() / score.min()) > 1.5  # routing can rank visual tokens
        assert float(score.std() / score.mean()) > 0.1


def test_generate(tiny, images) -> None:
    family, model, pre = tiny
    inputs = pre(images[:1], ["What is it?"])
    kwargs = forward_kwargs(family, inputs, pre.image_token_id)
    with torch.no_grad():
        out = model.generate(**kwargs, max_new_tokens=4, do_sample=False)
    new = out[0, inputs.input_ids.shape[1]:]
    assert 1 <= new.numel() <= 4
    assert isinstance(pre.decode(new.tolist()), str)
    # the preprocessor's own kwargs give the same greedy continuation
    with torch.no_grad():
        again = model.generate(**inputs.model_kwargs(), max_new_tokens=4, do_sample=False)
    assert torch.equal(out, again)


# --------------------------------------------------------------------------- (c) checkpoint round trip


def test_checkpoint_round_trip(tiny, images, tmp_path: Path) -> None:
    family, model, pre = tiny
    save_checkpoint(model, pre, tmp_path)
    _, model_cls = BUILDERS[family]
    loaded = model_cls.from_pretrained(tmp_path).eval()
    pre2 = Preprocessor.from_pretrained(tmp_path, get_family(family))
    assert pre2.image_token_id == pre.image_token_id and pre2.image_size == pre.image_size
    a = pre(images, ["Describe the image.", "What is it?"])
    b = pre2(images, ["Describe the image.", "What is it?"])
    for name in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None and y is None) or torch.equal(x, y), name
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    single = pre(images[:1], ["Describe the image."])
    with torch.no_grad():
        l1 = model(**forward_kwargs(family, single, pre.image_token_id)).logits
        l2 = loaded(**forward_kwargs(family, single, pre.image_token_id)).logits
    assert torch.equal(l1, l2)


# --------------------------------------------------------------------------- (d) batching


def test_left_padding(tiny, images) -> None:
    _, _, pre = tiny
    prompts = ["Hi", "Describe the image in great detail, please."]
    batch = pre(images, prompts)
    singles = [pre([img], [p]) for img, p in zip(images, prompts)]
    lengths = [s.input_ids.shape[1] for s in singles]
    assert lengths[0] < lengths[1] and batch.input_ids.shape == (2, max(lengths))
    assert batch.attention_mask.sum(dim=1).tolist() == lengths
    pad = max(lengths) - lengths[0]
    assert batch.attention_mask[0, :pad].eq(0).all() and batch.attention_mask[0, pad:].eq(1).all()
    assert batch.input_ids[0, :pad].eq(pre.tokenizer.pad_token_id).all()
    assert torch.equal(batch.input_ids[0, pad:], singles[0].input_ids[0])
    assert torch.equal(batch.input_ids[1], singles[1].input_ids[0])


def test_left_padded_batch_generates_like_singles(tiny, images) -> None:
    """The attention mask (and, for Qwen, mRoPE positions) make padding invisible to generate()."""
    _, model, pre = tiny
    prompts = ["Hi", "Describe the image in great detail, please."]
    batch = pre(images, prompts)
    with torch.no_grad():
        together = model.generate(**batch.model_kwargs(), max_new_tokens=3, do_sample=False)
        for i, single in enumerate(pre([img], [p]) for img, p in zip(images, prompts)):
            alone = model.generate(**single.model_kwargs(), max_new_tokens=3, do_sample=False)
            assert torch.equal(together[i, batch.input_ids.shape[1]:], alone[0, single.input_ids.shape[1]:])


# --------------------------------------------------------------------------- (e) errors, samples


def test_load_image_rejects_bad_files(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    with pytest.raises(UserError, match="not an image or corrupt"):
        load_image(text)
    truncated = tmp_path / "broken.jpg"
    truncated.write_bytes(sample_path("coffee.jpg").read_bytes()[:200])
    with pytest.raises(UserError):
        load_image(truncated)
    with pytest.raises(UserError):
        load_image(tmp_path / "missing.png")


def test_bad_calls_raise_user_error(images) -> None:
    _, pre = tiny_llava()
    with pytest.raises(UserError):
        pre(images, ["only one prompt"])
    with pytest.raises(UserError):
        pre(images[:1], ["two <image> placeholders"])


def test_samples_bundled_with_licences() -> None:
    pairs = samples()
    assert len(pairs) >= 2
    licences = (pairs[0][0].parent / "LICENSES.md").read_text()
    for path, prompt in pairs:
        assert path.is_file() and path.name in licences and prompt.strip()
        image = load_image(path)
        assert image.mode == "RGB" and max(image.size) <= 336


def test_fixed_image_size_for_qwen_7b_cap() -> None:
    assert fixed_image_size(451584, 28) == (672, 672)  # grid 48x48 -> 576 tokens
    assert fixed_image_size(50176, 28, 50176) == (224, 224)
    with pytest.raises(UserError, match="no square image"):
        fixed_image_size(50000, 28, 50000)  # 196x196 is under the lower bound, 224x224 over the upper


def test_qwen_checkpoint_bounds_set_the_grid(tmp_path: Path) -> None:
    """A hub folder's own pixel bounds (no settings of ours) fix the square: 50176 px -> 224x224."""
    import json

    from reroute_export.preprocess import SETTINGS_FILE

    _, pre = tiny_qwen2_5_vl()
    pre.save_pretrained(tmp_path)
    (tmp_path / SETTINGS_FILE).unlink()
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    config["size"] = {"shortest_edge": 50176, "longest_edge": 50176}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    loaded = Preprocessor.from_pretrained(tmp_path, Qwen25VL)
    assert loaded.image_size == (224, 224) and loaded.visual_tokens == 64
    wide = loaded.for_grid((1, 8, 14))  # arrays given with another grid: the copy admits it
    assert wide.image_size == (112, 196) and wide.visual_tokens == 28 and loaded.image_size == (224, 224)


# --------------------------------------------------------------------------- parity with HF processors


def test_llava_matches_llava_processor(images) -> None:
    _, pre = tiny_llava()
    try:
        proc = LlavaProcessor(
            image_processor=pre.image_processor,
            tokenizer=pre.tokenizer,
            patch_size=14,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,  # CLIP's CLS, as in llava-hf/llava-1.5-7b-hf
        )
    except Exception as exc:  # pragma: no cover - depends on the installed transformers
        pytest.skip(f"LlavaProcessor cannot be built without torchvision here: {exc}")
    prompts = ["Describe the image.", "What is it?"]
    ours = pre(images, prompts)
    texts = [pre.render(p) for p in prompts]
    ref = proc(images=images, text=texts, padding=True, padding_side="left", return_tensors="pt")
    assert torch.equal(ref["input_ids"], ours.input_ids)
    assert torch.equal(ref["attention_mask"], ours.attention_mask)
    assert torch.equal(ref["pixel_values"], ours.pixel_values)


def test_qwen_matches_qwen_processor(images) -> None:
    """Qwen2_5_VLProcessor insists on a video processor (torchvision), so build it field by field."""
    _, pre = tiny_qwen2_5_vl()
    try:
        proc = object.__new__(Qwen2_5_VLProcessor)
        proc.image_processor, proc.tokenizer, proc.chat_template = pre.image_processor, pre.tokenizer, None
        proc.image_token, proc.video_token = "<|image_pad|>", "<|video_pad|>"
        proc.image_token_id, proc.video_token_id = pre.image_token_id, pre.video_token_id
        resized = [img.resize((224, 224), resample=3) for img in images]  # the fixed grid
        prompts = ["Describe the image.", "What is it?"]
        texts = [pre.render(p) for p in prompts]
        ref = proc(images=resized, text=texts, padding=True, padding_side="left", return_tensors="pt")
    except Exception as exc:  # pragma: no cover - depends on processor internals
        pytest.skip(f"Qwen2_5_VLProcessor cannot be driven without a video processor: {exc}")
    ours = pre(images, prompts)
    for name in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids"):
        assert torch.equal(ref[name], getattr(ours, name)), name
