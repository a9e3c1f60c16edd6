"""LLaVA-1.5: CLIP ViT-L/14 + MLP projector + Llama decoder, 1-D RoPE."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..registry import register_family
from . import llava_host
from .base import Family

if TYPE_CHECKING:  # torch lazily: importing a family must not cost the torch-free runtime torch
    import numpy as np
    import torch
    from torch import nn


@register_family
class Llava(Family):
    name = "llava"
    architectures = ("LlavaForConditionalGeneration",)
    model_class = "LlavaForConditionalGeneration"
    reference_spec = "llava-1.5-7b"
    tiny_spec = "tiny-llava"
    position_dims = 1
    checkpoint_renames = (  # llava-hf/llava-1.5-*-hf layout
        (r"^language_model\.lm_head\.", "lm_head."),
        (r"^language_model\.model\.", "model.language_model."),
        (r"^vision_tower\.", "model.vision_tower."),
        (r"^multi_modal_projector\.", "model.multi_modal_projector."),
    )
    prompt_template = llava_host.TEMPLATE
    image_token = llava_host.IMAGE_TOKEN

    @staticmethod
    def image_token_id(model: nn.Module) -> int:
        cfg = model.config
        return int(getattr(cfg, "image_token_id", None) or cfg.image_token_index)

    @classmethod
    def image_features(cls, model: nn.Module, inputs: Any) -> torch.Tensor:
        cfg = model.config
        out = model.model.get_image_features(
            pixel_values=inputs.pixel_values.to(model.dtype),
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            return_dict=True,
        )
        import torch

        return torch.cat(list(out.pooler_output), dim=0)  # (B*N, D)

    @classmethod
    def positions(cls, model: nn.Module, inputs: Any) -> torch.Tensor:
        ids, mask = inputs.input_ids, inputs.attention_mask
        if mask is None:
            import torch

            return torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)  # (B, L)
        # Left padding: positions count real tokens only, as HF generate does.
        return (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, L)

    @classmethod
    def spec_overrides(cls, config: Any) -> dict[str, Any]:
        t, v = config.text_config, config.vision_config
        heads = t.num_attention_heads
        return {
            "text": dict(
                num_layers=t.num_hidden_layers, hidden_size=t.hidden_size, num_heads=heads,
                num_kv_heads=t.num_key_value_heads or heads,
                head_dim=getattr(t, "head_dim", None) or t.hidden_size // heads,
                intermediate_size=t.intermediate_size, vocab_size=t.vocab_size,
            ),
            "vision": dict(
                image_size=v.image_size, patch_size=v.patch_size, num_layers=v.num_hidden_layers,
                hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                visual_tokens=cls.visual_tokens(config, v.image_size),
            ),
        }

    @classmethod
    def visual_tokens(cls, config: Any, image_size: int) -> int:
        # one token per patch; the "full" strategy keeps the CLS token too
        full = getattr(config, "vision_feature_select_strategy", "default") == "full"
        return (image_size // config.vision_config.patch_size) ** 2 + full

    @classmethod
    def host_images(cls, folder: Path, settings: dict[str, Any]) -> llava_host.ClipImages:
        return llava_host.ClipImages.from_folder(folder, settings)

    @classmethod
    def host_positions(cls, ids: np.ndarray, grid: np.ndarray | None, manifest: dict[str, Any]) -> np.ndarray:
        from ..runtime.positions import llava_positions  # lazily: runtime/ imports the families

        return llava_positions(len(ids))  # (1, L)
