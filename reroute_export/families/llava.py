"""LLaVA-1.5: CLIP ViT-L/14 + MLP projector + Llama decoder, 1-D RoPE.

Every LLaVA fact lives here: anatomy, prompt template and image token, the image
processor twice (transformers' `CLIPImageProcessorPil` for the reference; `ClipImages`,
its steps in numpy + Pillow, for the torch-free runtime), position ids, the vision graph,
input checks, the tiny model, spec overrides and checkpoint key renames. torch and
transformers are imported inside the methods that use them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import PIL.Image

from ..errors import UserError
from .base import Family, OfflineIds, register_family, text_overrides
from .host import PROCESSOR_CONFIG, ImageArrays, Pixels, aspect_size, center_crop, read_json, resize
from .host import rescale_normalize, shortest_edge_size, to_chw

if TYPE_CHECKING:  # torch lazily: importing a family must not cost the torch-free runtime torch
    import torch
    from torch import nn
    from transformers import CLIPImageProcessorPil, LlavaForConditionalGeneration, PreTrainedTokenizerFast

    from ..preprocess import Preprocessor
    from ..tiny import Sizes, Where

SPECIALS_FRONT = ["<unk>", "<s>", "</s>"]  # the tiny tokenizer's ids 0, 1, 2, as in Llama
SPECIALS_BACK = ["<image>", "<pad>"]  # appended after the vocab, as in llava-hf


# ----------------------------------------------------------------------------- host side (numpy + PIL)


@dataclass(frozen=True)
class ClipImages:
    """CLIPImageProcessorPil's steps (resize the shortest edge, centre crop, rescale, normalize)
    as configured by a saved preprocessor_config.json; tests/test_runtime_torchfree.py holds
    them pixel-equal to transformers'."""

    size: dict[str, int]  # shortest_edge [+ longest_edge], or height + width
    crop: tuple[int, int] | None  # (H, W); None: do_center_crop off
    resize_on: bool
    pixels: Pixels
    patch_size: int
    cls_token: bool  # vision_feature_select_strategy "full" keeps CLIP's CLS feature

    @classmethod
    def from_folder(cls, folder: Path, settings: dict[str, Any]) -> ClipImages:
        config = read_json(folder / PROCESSOR_CONFIG)
        crop = config.get("crop_size", {"height": 224, "width": 224})
        return cls(
            size=dict(config.get("size", {"shortest_edge": 224})),
            crop=(int(crop["height"]), int(crop["width"])) if config.get("do_center_crop", True) else None,
            resize_on=config.get("do_resize", True),
            pixels=Pixels.from_config(config),
            patch_size=int(settings.get("patch_size") or 14),
            cls_token=settings.get("vision_feature_select_strategy", "default") == "full",
        )

    def __call__(self, image: PIL.Image.Image) -> ImageArrays:
        chw = to_chw(image, self.pixels.convert_rgb)  # (3, H, W) uint8
        if self.resize_on:
            chw = resize(chw, *self._target(*chw.shape[1:]), self.pixels.resample)
        if self.crop is not None:
            chw = center_crop(chw, *self.crop)
        pixel_values = rescale_normalize(chw, self.pixels)[None]  # (1, 3, H, W)
        height, width = pixel_values.shape[-2:]
        tokens = (height // self.patch_size) * (width // self.patch_size) + self.cls_token
        return ImageArrays(np.ascontiguousarray(pixel_values), None, int(tokens))

    def _target(self, height: int, width: int) -> tuple[int, int]:
        """The resized (H, W), by the same size-dict cases as `PilBackend.resize`."""
        size = self.size
        if size.get("shortest_edge") and size.get("longest_edge"):
            return aspect_size(height, width, size["shortest_edge"], size["longest_edge"])
        if size.get("shortest_edge"):
            return shortest_edge_size(height, width, size["shortest_edge"])
        if size.get("height") and size.get("width"):
            return size["height"], size["width"]
        raise UserError(f"{PROCESSOR_CONFIG}: image size {size} is not one the runtime knows "
                        f"(shortest_edge[, longest_edge] or height and width)")


def llava_positions(length: int) -> np.ndarray:
    """(1, L) int64: 0..L-1 (batch 1, no padding), as the HF model's own."""
    return np.arange(length, dtype=np.int64)[None, :]


# ----------------------------------------------------------------------------- reference side (transformers)


def _check_clip_size(directory: Path, image_processor: CLIPImageProcessorPil, side: int) -> None:
    """LLaVA's processor must output the CLIP tower's own square.

    CLIP learns one position embedding per patch of a square grid; CLIPVisionEmbeddings
    only interpolates them (bicubic, non-square allowed) when asked, and
    LlavaForConditionalGeneration never asks: any other size raises "Input image size
    (H*W) doesn't match model (S*S)" inside the reference. So a non-square (or other
    sized) crop is refused here, in one line, instead of deep in the vision tower."""
    if image_processor.do_center_crop:
        size, what = image_processor.crop_size, "crop_size"
    else:
        size, what = image_processor.size, "size"
    height, width = size["height"], size["width"]
    if (height, width) != (side, side):
        got = f"{height}x{width}" if height and width else "images whose size varies with the input"
        raise UserError(f"{directory}: the image processor's {what} gives {got}, but LLaVA's CLIP tower takes only "
                        f"{side}x{side} (fixed square position embeddings, not interpolated by "
                        f"LlavaForConditionalGeneration); set {what} to {side}x{side}")


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
    # The prompt llava-hf's chat template renders for one user turn holding one image.
    prompt_template = "USER: <image>\n{prompt} ASSISTANT:"
    image_token = "<image>"
    map_fit = "crop"  # CLIP's processor centre-crops a square
    offline = OfflineIds(
        ids={"image_token_index": "<image>", "pad_token_id": "<pad>", "text_config.bos_token_id": "<s>",
             "text_config.eos_token_id": "</s>", "text_config.pad_token_id": "<pad>"},
        bos="<s>", eos=("</s>",), pad="<pad>",
    )

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
    def vision_module(cls, model: nn.Module) -> nn.Module:
        from ..rewrite.vision import LlavaVision

        return LlavaVision(model)

    @classmethod
    def check_pixels(cls, config: Any, inputs: Any, tokens: int) -> None:
        """CLIP takes only its own square (see _check_clip_size) and gives (S/p)^2 features."""
        side, patch = config.vision_config.image_size, config.vision_config.patch_size
        want = [inputs.input_ids.shape[0], 3, side, side]
        if list(inputs.pixel_values.shape) != want:
            raise UserError(f"--pixel-values has shape {list(inputs.pixel_values.shape)}; this model's CLIP tower "
                            f"takes {want}")
        features = (side // patch) ** 2 + (config.vision_feature_select_strategy != "default")
        if tokens != features:
            raise UserError(f"the prompt holds {tokens} image tokens; the image gives {features} features")

    @classmethod
    def spec_overrides(cls, config: Any) -> dict[str, Any]:
        v = config.vision_config
        return {
            "text": text_overrides(config.text_config),
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

    # -- preprocessing with transformers
    @classmethod
    def load_preprocessor(cls, directory: Path, tokenizer: Any, saved: dict[str, Any], config: dict[str, Any],
                          image_size: Any, max_pixels: int | None) -> Preprocessor:
        """Patch size / CLS strategy: our settings, else the model config, else llava-1.5's."""
        from transformers import CLIPImageProcessorPil

        from ..preprocess import Preprocessor, check_config_token

        if image_size not in ("auto", None):
            raise UserError("image_size is only used for qwen2.5-vl (LLaVA always crops to its square)")
        vision = config.get("vision_config") or {}
        patch = saved.get("patch_size") or vision.get("patch_size") or 14
        strategy = saved.get("vision_feature_select_strategy") or config.get(
            "vision_feature_select_strategy", "default"
        )
        image_processor = CLIPImageProcessorPil.from_pretrained(directory)
        if vision:  # a model's folder (an artifact's preprocessor/ has no config.json)
            _check_clip_size(directory, image_processor, int(vision.get("image_size", 224)))  # CLIP's default
        pre = Preprocessor(cls, tokenizer, image_processor, patch_size=patch, vision_feature_select_strategy=strategy)
        check_config_token(config, ("image_token_index", "image_token_id"), pre.image_token_id)
        return pre

    @classmethod
    def processor_visual_tokens(cls, pre: Preprocessor) -> int:
        crop = pre.image_processor.crop_size
        side = crop["height"] if isinstance(crop, dict) else int(crop.height)
        extra = 0 if pre.vision_feature_select_strategy == "default" else 1
        return (side // pre.patch_size) ** 2 + extra

    @classmethod
    def image_token_counts(cls, pre: Preprocessor, pixels: dict[str, Any]) -> list[int]:
        height, width = pixels["pixel_values"].shape[-2:]  # (B, 3, H, W)
        n = (height // pre.patch_size) * (width // pre.patch_size)
        # CLIP adds one CLS feature; "default" drops it, "full" keeps it.
        n += 0 if pre.vision_feature_select_strategy == "default" else 1
        return [n] * pixels["pixel_values"].shape[0]

    @classmethod
    def check_image_size(cls, pre: Preprocessor, size: tuple[int, ...]) -> None:
        raise UserError("image_size is only used for qwen2.5-vl (LLaVA always crops to its square)")

    @classmethod
    def for_grid(cls, pre: Preprocessor, grid_thw: tuple[int, int, int]) -> Preprocessor:
        raise UserError("a fixed image grid is only used for qwen2.5-vl")

    # -- the tiny model
    @classmethod
    def tiny(cls, seed: int = 0, attn_implementation: str = "sdpa", sizes: Sizes | None = None,
             where: Where | None = None) -> tuple[LlavaForConditionalGeneration, Preprocessor]:
        """Tiny LLaVA-1.5 (CLIP + projector + Llama), 64 visual tokens, seeded random weights;
        other `sizes` give the same model at another scale (e.g. bench-llava)."""
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

        from ..tiny import PATCH_SIZE, Sizes, build_model, set_generation_ids

        sizes = sizes or Sizes()
        tokenizer = cls.tiny_tokenizer()
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "<pad>", "<image>")}
        side = sizes.image_size
        vision = CLIPVisionConfig(
            image_size=side,
            patch_size=PATCH_SIZE,
            hidden_size=sizes.vision_hidden,
            intermediate_size=sizes.vision_intermediate,
            num_hidden_layers=sizes.vision_layers,
            num_attention_heads=sizes.vision_heads,
            projection_dim=32,
        )
        text = LlamaConfig(
            **sizes.text_fields(len(tokenizer)),
            bos_token_id=ids["<s>"],
            eos_token_id=ids["</s>"],
            pad_token_id=ids["<pad>"],
            tie_word_embeddings=False,
        )
        config = LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=ids["<image>"],
            image_seq_length=(side // PATCH_SIZE) ** 2,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            projector_hidden_act="gelu",
            tie_word_embeddings=False,
        )
        model = build_model(LlavaForConditionalGeneration, config, seed, attn_implementation, sizes.weight_std, where)
        set_generation_ids(model, bos=ids["<s>"], eos=ids["</s>"], pad=ids["<pad>"])
        return model, cls.tiny_preprocessor(tokenizer, side)

    @classmethod
    def tiny_tokenizer(cls) -> PreTrainedTokenizerFast:
        """Llama-style: BOS prepended by default (as llava-hf's tokenizer does), <image> and <pad> last."""
        from transformers import PreTrainedTokenizerFast

        from ..tiny import tokenizer_object

        return PreTrainedTokenizerFast(
            tokenizer_object=tokenizer_object(SPECIALS_FRONT, SPECIALS_BACK),
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            pad_token="<pad>",
            add_bos_token=True,
            add_eos_token=False,
            clean_up_tokenization_spaces=False,
            padding_side="left",
            extra_special_tokens={"image_token": "<image>"},
            chat_template=cls.chat_template(),  # llava-hf's, saved as chat_template.jinja
        )

    @classmethod
    def tiny_preprocessor(cls, tokenizer: PreTrainedTokenizerFast, side: int) -> Preprocessor:
        """llava-hf's CLIP preprocessing (resize shortest edge, centre crop) at `side` px."""
        from transformers import CLIPImageProcessorPil
        from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        from ..preprocess import Preprocessor
        from ..tiny import PATCH_SIZE

        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": side},
            crop_size={"height": side, "width": side},
            image_mean=OPENAI_CLIP_MEAN,
            image_std=OPENAI_CLIP_STD,
        )
        return Preprocessor(cls, tokenizer, image_processor, patch_size=PATCH_SIZE)

    # -- host side
    @classmethod
    def host_images(cls, folder: Path, settings: dict[str, Any]) -> ClipImages:
        return ClipImages.from_folder(folder, settings)

    @classmethod
    def host_positions(cls, ids: np.ndarray, grid: np.ndarray | None, manifest: dict[str, Any]) -> np.ndarray:
        return llava_positions(len(ids))  # (1, L)
