"""Qwen2.5-VL: windowed ViT + patch merger + Qwen2 decoder with 3-D mRoPE."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..registry import register_family
from . import qwen2_5_vl_host
from .base import Family

if TYPE_CHECKING:  # torch lazily: importing a family must not cost the torch-free runtime torch
    import numpy as np
    import torch
    from torch import nn


@register_family
class Qwen25VL(Family):
    name = "qwen2.5-vl"
    architectures = ("Qwen2_5_VLForConditionalGeneration",)
    model_class = "Qwen2_5_VLForConditionalGeneration"
    reference_spec = "qwen2.5-vl-7b"
    tiny_spec = "tiny-qwen2.5-vl"
    position_dims = 3
    checkpoint_renames = (  # Qwen/Qwen2.5-VL-*-Instruct layout
        (r"^visual\.", "model.visual."),
        (r"^model\.(?!language_model\.|visual\.)", "model.language_model."),
    )
    prompt_template = qwen2_5_vl_host.TEMPLATE
    image_token = qwen2_5_vl_host.IMAGE_TOKEN
    video_token = qwen2_5_vl_host.VIDEO_TOKEN
    mm_token_types = True  # 3-D mRoPE positions come from them

    @classmethod
    def image_features(cls, model: nn.Module, inputs: Any) -> torch.Tensor:
        out = model.model.get_image_features(
            inputs.pixel_values.to(model.dtype), inputs.image_grid_thw, return_dict=True
        )
        import torch

        return torch.cat(list(out.pooler_output), dim=0)  # (sum_i t*h*w/merge^2, D)

    @classmethod
    def positions(cls, model: nn.Module, inputs: Any) -> torch.Tensor:
        ids = inputs.input_ids
        kinds = (ids == cls.image_token_id(model)).int()  # mm_token_type_ids: 1 = image
        pos, _ = model.model.get_rope_index(
            ids, mm_token_type_ids=kinds, image_grid_thw=inputs.image_grid_thw,
            attention_mask=inputs.attention_mask,
        )
        return pos  # (3, B, L)

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
                patch_size=v.patch_size, num_layers=v.depth, hidden_size=v.hidden_size,
                intermediate_size=v.intermediate_size,
            ),
        }

    @classmethod
    def visual_tokens(cls, config: Any, image_size: int) -> int:
        # (side / patch)^2 patches, merged spatial_merge_size^2 -> 1 before the decoder
        v = config.vision_config
        return (image_size // (v.patch_size * v.spatial_merge_size)) ** 2

    @classmethod
    def host_images(cls, folder: Path, settings: dict[str, Any]) -> qwen2_5_vl_host.QwenImages:
        return qwen2_5_vl_host.QwenImages.from_folder(folder, settings)

    @classmethod
    def host_positions(cls, ids: np.ndarray, grid: np.ndarray | None, manifest: dict[str, Any]) -> np.ndarray:
        from ..runtime.positions import qwen_positions  # lazily: runtime/ imports the families

        merge = int(manifest["spatial_merge_size"])
        return qwen_positions(ids, int(manifest["image_token_id"]), grid, merge)  # (3, 1, L)

    @classmethod
    def host_grid(cls, manifest: dict[str, Any]) -> np.ndarray:
        import numpy as np

        return np.asarray(manifest.get("image_grid_thw"), dtype=np.int64).reshape(1, 3)  # (1, 3)
