"""LLaVA-1.5's processor on the host, in numpy + Pillow: prompt template, image token and
`CLIPImageProcessorPil`'s steps (resize the shortest edge, centre crop, rescale, normalize).

`preprocess.Preprocessor` (transformers) and the torch-free runtime both read the template
and token from here, so the two can only differ in the image steps, which
tests/test_runtime_torchfree.py compares pixel for pixel.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image

from ..errors import UserError
from .host import PROCESSOR_CONFIG, ImageArrays, Pixels, aspect_size, center_crop, read_json, resize
from .host import rescale_normalize, shortest_edge_size, to_chw

# The prompt llava-hf's chat template renders for one user turn holding one image.
TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"
IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class ClipImages:
    """CLIPImageProcessorPil as configured by a saved preprocessor_config.json."""

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
