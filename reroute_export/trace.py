"""`trace`: run one input through the eager reference and report routing decisions,
last-prompt logits and greedy tokens, in the JSON contract CI parity checks consume.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .inputs import load_npy_inputs
from .plan import RoutingPlan
from .registry import Loaded
from .results import TraceResult, save_json, stage_table  # noqa: F401  (re-exported: torch-free home)
from .routing import RoutedModel, generate


# ---------------------------------------------------------------- inputs


def arrays_to_inputs(input_ids: str, pixel_values: str, image_grid_thw: str | None) -> Any:
    """Processor outputs saved as .npy -> VLInputs (int64 ids (1, L), float32 pixels)."""
    return load_npy_inputs(input_ids, pixel_values, image_grid_thw).to_torch()


def check_inputs(loaded: Loaded, inputs: Any) -> None:
    """Family-specific input checks, as one-line errors instead of deep tracebacks."""
    if loaded.family.name == "qwen2.5-vl" and inputs.image_grid_thw is None:
        raise UserError("qwen2.5-vl inputs need --image-grid-thw alongside --pixel-values")
    vocab = loaded.model.get_input_embeddings().num_embeddings
    if int(inputs.input_ids.max()) >= vocab or int(inputs.input_ids.min()) < 0:
        raise UserError(f"--input-ids hold token ids outside the vocabulary (0..{vocab - 1})")
    tokens = int((inputs.input_ids[0] == loaded.family.image_token_id(loaded.model)).sum())
    if loaded.family.name == "qwen2.5-vl":
        _check_qwen_pixels(loaded.model.config.vision_config, inputs, tokens)
    else:
        _check_llava_pixels(loaded.model.config, inputs, tokens)


def _check_qwen_pixels(vision: Any, inputs: Any, tokens: int) -> None:
    """Pixel rows, grid and image tokens must agree (the model would fail deep inside)."""
    grid = inputs.image_grid_thw.tolist()
    patches = sum(t * h * w for t, h, w in grid)
    width = getattr(vision, "in_channels", 3) * vision.temporal_patch_size * vision.patch_size ** 2
    if tuple(inputs.pixel_values.shape) != (patches, width):
        raise UserError(f"--pixel-values has shape {list(inputs.pixel_values.shape)}; the grid {grid} makes "
                        f"[{patches}, {width}]")
    if tokens != patches // vision.spatial_merge_size ** 2:
        raise UserError(f"the prompt holds {tokens} image tokens; the grid {grid} makes "
                        f"{patches // vision.spatial_merge_size ** 2}")


def _check_llava_pixels(config: Any, inputs: Any, tokens: int) -> None:
    """CLIP takes only its own square (see preprocess._check_clip_size) and gives (S/p)^2 features."""
    side, patch = config.vision_config.image_size, config.vision_config.patch_size
    want = [inputs.input_ids.shape[0], 3, side, side]
    if list(inputs.pixel_values.shape) != want:
        raise UserError(f"--pixel-values has shape {list(inputs.pixel_values.shape)}; this model's CLIP tower "
                        f"takes {want}")
    features = (side // patch) ** 2 + (config.vision_feature_select_strategy != "default")
    if tokens != features:
        raise UserError(f"the prompt holds {tokens} image tokens; the image gives {features} features")


def for_inputs(loaded: Loaded, inputs: Any) -> Loaded:
    """The model fitted to its inputs' geometry: N from the prompt's image tokens and, for
    Qwen2.5-VL, the preprocessor fixed to the inputs' grid. Processor outputs given as
    arrays define both; a registered default never overrides them."""
    loaded = spec_for_inputs(loaded, visual_token_count(loaded, inputs))
    if loaded.family.name != "qwen2.5-vl" or inputs.image_grid_thw is None:
        return loaded
    grid = tuple(int(x) for x in inputs.image_grid_thw[0])
    return replace(loaded, preprocessor=loaded.preprocessor.for_grid(grid))


def visual_token_count(loaded: Loaded, inputs: Any) -> int:
    """N image tokens per sample in these inputs (the plan is made for this N)."""
    counts = (inputs.input_ids == loaded.family.image_token_id(loaded.model)).sum(1)
    if int(counts.min()) == 0:
        raise UserError("the prompt holds no image tokens: give an image (or ids made by the model's processor)")
    return int(counts[0])


def spec_for_inputs(loaded: Loaded, n: int) -> Loaded:
    """The same model with the spec's visual token count set to what the inputs carry."""
    if n == loaded.spec.vision.visual_tokens:
        return loaded
    spec = replace(loaded.spec, vision=replace(loaded.spec.vision, visual_tokens=n))
    return replace(loaded, spec=spec)


def max_positions(model: torch.nn.Module) -> int | None:
    """The decoder's max_position_embeddings (text_config's for a VLM), if the config says."""
    for config in (getattr(model.config, "text_config", None), model.config):
        n = getattr(config, "max_position_embeddings", None)
        if n:
            return int(n)
    return None


def check_positions(loaded: Loaded, inputs: Any, max_new_tokens: int) -> None:
    """Refuse a prompt plus greedy tokens past the model's positions: the eager model runs on
    without a word and returns noise (an artifact refuses past its own max_prompt_tokens)."""
    limit = max_positions(loaded.model)
    if limit is None:
        return
    with torch.no_grad():  # Qwen's M-RoPE ids: image tokens share positions, so count the ids, not tokens
        last = int(loaded.family.positions(loaded.model, inputs).max())
    need = last + 1 + max_new_tokens
    if need > limit:
        raise UserError(f"the prompt ({inputs.input_ids.shape[1]} tokens) and --max-new-tokens {max_new_tokens} "
                        f"need {need} positions; {loaded.spec.name} has {limit} (max_position_embeddings): "
                        f"shorten the prompt or lower --max-new-tokens")


# ---------------------------------------------------------------- run


def run_trace(loaded: Loaded, plan: RoutingPlan, inputs: Any, max_new_tokens: int = 16) -> TraceResult:
    routed = RoutedModel(loaded.model, loaded.family, plan)
    eos = getattr(loaded.preprocessor.tokenizer, "eos_token_id", None)
    pre, new_ids = generate(routed, inputs, max_new_tokens, eos_token_id=eos)
    decisions = {str(s.layer): d[0].tolist() for s, d in zip(plan.stages, pre.decisions)}
    ids = new_ids[0].tolist()
    return TraceResult(decisions, pre.logits[0].tolist(), ids, loaded.preprocessor.decode(ids), plan)


def write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically (temp file + rename): no half-written reports, the usual
    permissions, and a full disk or read-only folder as one line."""
    from .files import write_atomic

    write_atomic(path, text.encode("utf-8"))
