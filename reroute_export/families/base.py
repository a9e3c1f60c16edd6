"""What the routing engine needs to know about a model family, declared once.

A family says where the decoder lives, how prompt embeddings are built (text embeddings
with image features scattered into the image-token slots, exactly as the HF forward
does), and how the model's own position ids are computed (1-D for Llama, 3-D mRoPE
for Qwen2.5-VL). Everything else (scoring, routing, caches) is family-agnostic.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # torch only for annotations: the torch-free runtime imports every family
    import numpy as np
    import torch
    from torch import nn

    from .host import ImageRecipe


class Family:
    name: ClassVar[str]
    architectures: ClassVar[tuple[str, ...]]  # config.json "architectures" values
    model_class: ClassVar[str]  # transformers class name
    reference_spec: ClassVar[str]  # graphs/ entry whose schedules a local checkpoint inherits
    tiny_spec: ClassVar[str]  # graphs/ entry of the family's tiny random model
    position_dims: ClassVar[int]  # 1: (B, L) position ids; 3: (3, B, L) mRoPE
    # Checkpoint key -> module parameter name, for checkpoints saved before transformers 5
    # moved the decoder under model.language_model (applied in order, first match wins;
    # keys already in the module layout match none). Used by the streamed export, which
    # reads each weight straight from the safetensors files.
    checkpoint_renames: ClassVar[tuple[tuple[str, str], ...]] = ()
    # Host side (numpy + PIL + tokenizers; preprocess.Preprocessor and runtime/processor.py):
    prompt_template: ClassVar[str]  # one user turn holding one image: "{prompt}" and one image_token
    image_token: ClassVar[str]  # the placeholder, expanded to one token per visual feature
    video_token: ClassVar[str | None] = None  # mm_token_type_ids marks it 2 (image tokens 1)
    mm_token_types: ClassVar[bool] = False  # the HF forward takes mm_token_type_ids

    # -- model anatomy
    @staticmethod
    def decoder(model: nn.Module) -> nn.Module:
        """The text decoder: has .layers, .norm, .rotary_emb, .embed_tokens."""
        return model.model.language_model

    @staticmethod
    def lm_head(model: nn.Module) -> nn.Module:
        return model.lm_head

    @staticmethod
    def image_token_id(model: nn.Module) -> int:
        return int(model.config.image_token_id)

    # -- per-input computation
    @classmethod
    def image_features(cls, model: nn.Module, inputs: Any) -> torch.Tensor:
        """(num_images * N, D) projected visual tokens in prompt order."""
        raise NotImplementedError

    @classmethod
    def embed(cls, model: nn.Module, inputs: Any) -> torch.Tensor:
        """(B, L, D) prompt embeddings, image features in the image-token slots."""
        ids = inputs.input_ids
        embeds = model.get_input_embeddings()(ids)  # (B, L, D)
        feats = cls.image_features(model, inputs).to(embeds.dtype)  # (B*N, D)
        slots = (ids == cls.image_token_id(model)).unsqueeze(-1)  # (B, L, 1)
        return embeds.masked_scatter(slots, feats)

    @classmethod
    def positions(cls, model: nn.Module, inputs: Any) -> torch.Tensor:
        """The unpruned model's position ids: (B, L) or (3, B, L)."""
        raise NotImplementedError

    @classmethod
    def spec_overrides(cls, config: Any) -> dict[str, Any]:
        """Graph-spec fields read from a checkpoint's config (text and vision widths)."""
        raise NotImplementedError

    @classmethod
    def visual_tokens(cls, config: Any, image_size: int) -> int:
        """N visual tokens one square image of `image_size` px gives under `config`."""
        raise NotImplementedError

    # -- host side: numpy only, no torch (the artifact runtime calls these)
    @classmethod
    def host_images(cls, folder: Path, settings: dict[str, Any]) -> ImageRecipe:
        """The family's HF image processor in numpy + PIL, as a saved preprocessor folder
        (preprocessor_config.json + our reroute_preprocess.json `settings`) configures it."""
        raise NotImplementedError

    @classmethod
    def host_positions(cls, ids: np.ndarray, grid: np.ndarray | None, manifest: dict[str, Any]) -> np.ndarray:
        """The unpruned model's position ids for one prompt `ids` (L,): (1, L) or (3, 1, L)."""
        raise NotImplementedError

    @classmethod
    def host_grid(cls, manifest: dict[str, Any]) -> np.ndarray | None:
        """The image grid an artifact's static vision graph was exported for, if the family has one."""
        return None
