"""Saved tiny-model folders carry the family's standard chat template, so other tools
(`apply_chat_template`, AutoProcessor) render the very prompt our preprocessor builds."""

from __future__ import annotations

import pytest
from transformers import AutoProcessor, AutoTokenizer, Qwen2_5_VLProcessor

from conftest import FAMILIES, tiny
from reroute_export.families import get_family
from reroute_export.families.llava import Llava
from reroute_export.families.qwen2_5_vl import Qwen25VL
from reroute_export.tiny import save_checkpoint

PROMPT = "Describe the image."
OURS = {"llava": Llava.prompt_template, "qwen2.5-vl": Qwen25VL.prompt_template}
ONE_IMAGE_TURN = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]


def test_every_family_has_a_template() -> None:
    assert set(OURS) == set(FAMILIES)
    for family in FAMILIES:
        assert "{% for message in messages %}" in get_family(family).chat_template()


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_tokenizer_renders_our_template(family: str, tmp_path) -> None:
    loaded = tiny(family)
    save_checkpoint(loaded.model, loaded.preprocessor, tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text(encoding="utf-8") == get_family(family).chat_template()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)  # what another tool loads
    text = tokenizer.apply_chat_template(ONE_IMAGE_TURN, tokenize=False, add_generation_prompt=True)
    assert text == OURS[family].replace("{prompt}", PROMPT) == loaded.preprocessor.render(PROMPT)


@pytest.mark.parametrize("family", FAMILIES)
def test_processor_reads_the_template(family: str, tmp_path) -> None:
    """The processor side: transformers 5 reads chat_template.jinja for the processor too (the
    file it writes itself; chat_template.json is the legacy name). Qwen's full processor needs
    torchvision (its video processor), so only its template loading is exercised there."""
    tiny(family).preprocessor.save_pretrained(tmp_path)  # what an artifact's preprocessor/ holds
    if family == Llava.name:
        processor = AutoProcessor.from_pretrained(tmp_path)
        text = processor.apply_chat_template(ONE_IMAGE_TURN, tokenize=False, add_generation_prompt=True)
        assert text == OURS[family].replace("{prompt}", PROMPT)
    else:
        processor_dict, _ = Qwen2_5_VLProcessor.get_processor_dict(tmp_path)
        assert processor_dict["chat_template"] == get_family(family).chat_template()
