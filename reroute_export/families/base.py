"""What the routing engine needs to know about a model family, declared once.

A family says where the decoder lives, how prompt embeddings are built (text embeddings
with image features scattered into the image-token slots, exactly as the HF forward
does), and how the model's own position ids are computed (1-D for Llama, 3-D mRoPE
for Qwen2.5-VL). Everything else (scoring, routing, caches) is family-agnostic.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn


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
