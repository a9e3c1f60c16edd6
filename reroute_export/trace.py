"""`trace`: run one input through the eager reference and report routing decisions,
last-prompt logits and greedy tokens, in the JSON contract CI parity checks consume.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from .errors import UserError
from .inputs import load_npy_inputs
from .plan import RoutingPlan
from .registry import Loaded
from .results import TraceResult


# ---------------------------------------------------------------- inputs


def arrays_to_inputs(input_ids: str, pixel_values: str, image_grid_thw: str | None) -> Any:
    """Processor outputs saved as .npy -> VLInputs (int64 ids (1, L), float32 pixels)."""
    return load_npy_inputs(input_ids, pixel_values, image_grid_thw).to_torch()


def check_inputs(loaded: Loaded, inputs: Any) -> None:
    """Family-specific input checks, as one-line errors instead of deep tracebacks."""
    fam = loaded.family
    if fam.image_grid and inputs.image_grid_thw is None:
        raise UserError(f"{fam.name} inputs need --image-grid-thw alongside --pixel-values")
    vocab = loaded.model.get_input_embeddings().num_embeddings
    if int(inputs.input_ids.max()) >= vocab or int(inputs.input_ids.min()) < 0:
        raise UserError(f"--input-ids hold token ids outside the vocabulary (0..{vocab - 1})")
    tokens = int((inputs.input_ids[0] == fam.image_token_id(loaded.model)).sum())
    fam.check_pixels(loaded.model.config, inputs, tokens)


def for_inputs(loaded: Loaded, inputs: Any) -> Loaded:
    """The model fitted to its inputs' geometry: N from the prompt's image tokens and, for
    Qwen2.5-VL, the preprocessor fixed to the inputs' grid. Processor outputs given as
    arrays define both; a registered default never overrides them."""
    loaded = spec_for_inputs(loaded, visual_token_count(loaded, inputs))
    if not loaded.family.image_grid or inputs.image_grid_thw is None:
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
    """The eager reference's trace (runtime.eager.EagerRuntime)."""
    from .runtime.eager import EagerRuntime

    return EagerRuntime(loaded, plan).trace(inputs, max_new_tokens)
