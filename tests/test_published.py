"""Registered architectures are the published ones.

Each registered checkpoint's hub config.json ships as package data
(reroute_export/data/hf_configs/); `--random-weights NAME` builds that architecture and
the graph spec agrees with it field by field. The parameter counts are the published
checkpoints' own, counted on the meta device (no memory), tied weights once.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from reroute_export import published, registry
from reroute_export.cli import run
from reroute_export.errors import UserError
from reroute_export.families import get_family
from reroute_export.registry import load
from reroute_export.spec import known_specs

# The published checkpoints' parameter counts (HF model pages: 7.06B, 13.4B, 3.75B, 8.29B).
PUBLISHED_PARAMETERS = {
    "llava-1.5-7b": 7_063_427_072,
    "llava-1.5-13b": 13_351_494_656,
    "qwen2.5-vl-3b": 3_754_622_976,
    "qwen2.5-vl-7b": 8_292_166_656,
}
CHECKPOINT_SPECS = sorted(n for n, s in known_specs().items() if s.checkpoint is not None)


def test_every_registered_checkpoint_has_its_published_config() -> None:
    assert published.names() == CHECKPOINT_SPECS == sorted(PUBLISHED_PARAMETERS)
    sources = (published.CONFIG_DIR / "SOURCES.md").read_text()
    for name in CHECKPOINT_SPECS:  # the note names the file, the checkpoint and its hub page
        row = next(line for line in sources.splitlines() if line.startswith(f"| `{name}.json` |"))
        checkpoint = known_specs()[name].checkpoint
        assert f"`{checkpoint}`" in row and f"huggingface.co/{checkpoint}/blob/main/config.json" in row


@pytest.mark.parametrize("name", CHECKPOINT_SPECS)
def test_graph_spec_agrees_with_the_published_config(name: str) -> None:
    """layers, hidden, heads, KV heads, head_dim, intermediate, vocab; vision layers, hidden,
    intermediate, patch, image size (LLaVA: in the config) and visual tokens."""
    spec = known_specs()[name]
    assert published.disagreements(spec) == []
    family, config = get_family(spec.family), published.config(name)
    assert set(family.spec_overrides(config)["text"]) == set(spec.text.__dict__)  # every text field is checked


def test_a_disagreeing_spec_is_refused_in_one_line() -> None:
    spec = known_specs()["qwen2.5-vl-3b"]
    bad = replace(spec, text=replace(spec.text, num_layers=32), vision=replace(spec.vision, visual_tokens=600))
    assert published.disagreements(bad) == ["text.num_layers: spec 32, config 36",
                                            "vision.visual_tokens: spec 600, config 576"]
    with pytest.raises(UserError, match=r"^graphs/qwen2.5-vl-3b.json disagrees with the published "
                                        r"Qwen/Qwen2.5-VL-3B-Instruct config: text.num_layers") as e:
        registry.build_random(bad, torch.float16, "meta")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", CHECKPOINT_SPECS)
def test_random_weights_have_the_published_parameter_count(name: str) -> None:
    """Counted on what --random-weights builds, and on transformers' own build of the file:
    the offline token ids change no size."""
    from transformers import AutoModelForImageTextToText

    assert registry.parameter_count(known_specs()[name]) == PUBLISHED_PARAMETERS[name]
    with torch.device("meta"):
        reference = AutoModelForImageTextToText.from_config(published.config(name))
    assert sum(p.numel() for p in reference.parameters()) == PUBLISHED_PARAMETERS[name]


def test_qwen_3b_random_weights_are_the_published_architecture() -> None:
    """What Sizes.from_spec got wrong: 16 vision heads, full attention at [7, 15, 23, 31],
    tied embeddings, eps 1e-6, 128000 positions."""
    model = load("qwen2.5-vl-3b", torch.float16, "meta", random_weights=True).model
    visual, text = model.model.visual, model.config.text_config
    assert visual.blocks[0].attn.num_heads == 16 and list(visual.fullatt_block_indexes) == [7, 15, 23, 31]
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert text.rms_norm_eps == 1e-6 and text.max_position_embeddings == 128000
    assert text.rope_parameters["mrope_section"] == [16, 24, 24] and text.vocab_size == 151936


@pytest.mark.parametrize("name", CHECKPOINT_SPECS)
def test_token_ids_follow_the_offline_tokenizer(name: str) -> None:
    """The prompt's image tokens land where the model looks; the vocabulary stays published."""
    loaded = load(name, torch.float16, "meta", random_weights=True)
    model, pre = loaded.model, loaded.preprocessor
    assert loaded.family.image_token_id(model) == pre.image_token_id
    assert pre.visual_tokens == loaded.spec.vision.visual_tokens
    off = loaded.family.offline
    for path, token in off.ids.items():
        value = model.config
        for part in path.split("."):
            value = getattr(value, part)
        assert value == pre.tokenizer.convert_tokens_to_ids(token) < len(pre.tokenizer), path
    assert model.get_input_embeddings().weight.shape[0] == published.raw_config(name).get(
        "text_config", published.raw_config(name))["vocab_size"]


def test_models_json_lists_family_checkpoint_and_parameter_count(tmp_path, capsys) -> None:
    assert run(["models", "--json", "-"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)["models"]}
    assert set(listed) == set(known_specs())
    for name, count in PUBLISHED_PARAMETERS.items():
        assert listed[name]["parameters"] == count and listed[name]["checkpoint"] == known_specs()[name].checkpoint
    tiny_llava = listed["tiny-llava"]
    assert tiny_llava == {"name": "tiny-llava", "family": "llava", "checkpoint": None, "layers": 8,
                          "visual_tokens": 64, "parameters": tiny_llava["parameters"], "local_folder": None}
    built, _ = registry.build(known_specs()["tiny-llava"])  # a built-in model's count is the one it builds
    assert tiny_llava["parameters"] == sum(p.numel() for p in built.parameters())
    # a file, and the table (with its params column) on stdout
    assert run(["models", "--json", str(tmp_path / "models.json")]) == 0
    assert json.loads((tmp_path / "models.json").read_text())["models"] == list(listed.values())
    table = capsys.readouterr().out
    assert "params" in table.splitlines()[0] and "3,754,622,976" in table
