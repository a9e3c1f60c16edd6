"""The published HF `config.json` of every registered checkpoint, kept as package data.

Why: `--random-weights qwen2.5-vl-3b` must build exactly the checkpoint's architecture
(vision heads, full-attention blocks, tied embeddings, norm eps, max positions: fields a
graph spec does not carry), offline and without the checkpoint. Each file in
data/hf_configs/ is the hub's config.json as published, named after the registered
model; SOURCES.md says where each was read. The graph spec (graphs/*.json) must agree
with it field by field (`disagreements`), so `plan` and the built model never differ.
`build` makes that architecture with seeded random weights (registry.build_random).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedModel

    from .preprocess import Preprocessor
    from .spec import GraphSpec
    from .tiny import Where

CONFIG_DIR = Path(__file__).resolve().parent / "data" / "hf_configs"


def names() -> list[str]:
    """Registered models that have a published config here."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


@lru_cache(maxsize=None)
def _read(name: str) -> str:
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise UserError(f"no published config for {name}; known: {', '.join(names())} "
                        f"(add its hub config.json as {path})")
    return path.read_text()


def raw_config(name: str) -> dict[str, Any]:
    """The published config.json of registered model `name`, as a fresh dict."""
    return json.loads(_read(name))


def config(name: str) -> "PreTrainedConfig":
    """The transformers config the published file gives (a new object: callers may edit it)."""
    from transformers import CONFIG_MAPPING

    raw = raw_config(name)
    return CONFIG_MAPPING[raw["model_type"]].from_dict(raw)


def disagreements(spec: "GraphSpec") -> list[str]:
    """Spec fields that differ from the published config, as 'text.num_layers: spec 32, config 36'."""
    from .families import get_family

    family = get_family(spec.family)
    cfg = config(spec.name)
    want = family.spec_overrides(cfg)
    want["vision"]["visual_tokens"] = family.visual_tokens(cfg, spec.vision.image_size)
    out = []
    for part, fields in want.items():
        have = getattr(spec, part)
        out += [f"{part}.{k}: spec {getattr(have, k)}, config {v}" for k, v in fields.items() if getattr(have, k) != v]
    return out


def check_spec(spec: "GraphSpec") -> None:
    """One-line UserError when a registered spec no longer matches its checkpoint's config."""
    wrong = disagreements(spec)
    if wrong:
        raise UserError(f"graphs/{spec.name}.json disagrees with the published {spec.checkpoint} config: "
                        + "; ".join(wrong))


def build(spec: "GraphSpec", seed: int, attn_implementation: str,
          where: "Where") -> tuple["PreTrainedModel", "Preprocessor"]:
    """The checkpoint's own architecture from its published config, seeded random weights,
    token ids from the family's offline tokenizer (`Family.offline`)."""
    import transformers

    from .families import get_family
    from .tiny import build_model, set_generation_ids, weight_std_for

    check_spec(spec)  # the plan reads the spec; the model must be the same one
    family = get_family(spec.family)
    cfg, off = config(spec.name), family.offline
    tokenizer = family.tiny_tokenizer()
    token_id = tokenizer.convert_tokens_to_ids
    for path, token in off.ids.items():
        _set_path(cfg, path, token_id(token))
    std = weight_std_for(cfg.text_config.hidden_size)
    model = build_model(getattr(transformers, family.model_class), cfg, seed, attn_implementation, std, where)
    eos = [token_id(t) for t in off.eos]
    set_generation_ids(model, bos=token_id(off.bos) if off.bos else None, eos=eos[0] if len(eos) == 1 else eos,
                       pad=token_id(off.pad))
    return model, family.tiny_preprocessor(tokenizer, spec.vision.image_size)


def _set_path(config: "PreTrainedConfig", path: str, value: int) -> None:
    """config.a.b = value for path "a.b"."""
    *parents, name = path.split(".")
    for part in parents:
        config = getattr(config, part)
    setattr(config, name, value)
