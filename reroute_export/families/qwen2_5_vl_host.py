"""Qwen2.5-VL's processor on the host, in numpy + Pillow: prompt template, image tokens and
`Qwen2VLImageProcessorPil`'s steps after our fixed-size resize (smart_resize, rescale,
normalize, temporal repeat, merge-aware patchify).

`preprocess.Preprocessor` (transformers) and the torch-free runtime both read the template
and tokens from here; tests/test_runtime_torchfree.py compares their pixels and grids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image

from ..errors import UserError
from .host import PROCESSOR_CONFIG, ImageArrays, Pixels, read_json, rescale_normalize, resize, to_chw

# The prompt Qwen2.5-VL-Instruct's chat template renders for one user turn holding one image.
TEMPLATE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
# Qwen2.5-VL-7B as evaluated by the authors: images capped at 451584 px = 576 tokens.
DEFAULT_MAX_PIXELS = 451584
# Qwen2VLImageProcessorPil's class defaults
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 1280


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """transformers' qwen2_vl smart_resize: sides multiples of `factor`, pixels within
    [min_pixels, max_pixels], aspect ratio kept as closely as possible."""
    if max(height, width) / min(height, width) > 200:
        raise UserError(f"image aspect ratio must be under 200, got {max(height, width) / min(height, width)}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify(chw: np.ndarray, patch: int, merge: int, temporal: int) -> np.ndarray:
    """(C, H, W) -> (gh*gw, C*T*P*P), rows in the merger's order (each merge x merge block
    of patches consecutive), the still frame repeated T times, as HF's `patchify`."""
    c, h, w = chw.shape
    gh, gw = h // patch, w // patch
    x = chw.reshape(c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, P, P)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], temporal, patch, patch))  # (.., C, T, P, P)
    return x.reshape(gh * gw, c * temporal * patch * patch)


@dataclass(frozen=True)
class QwenImages:
    """Qwen2VLImageProcessorPil as Preprocessor.from_pretrained configures it for an
    artifact: every image first resized to the exported `image_size`."""

    image_size: tuple[int, int]  # (H, W), the exported grid times the patch size
    min_pixels: int
    max_pixels: int
    resize_on: bool
    pixels: Pixels
    patch_size: int
    merge_size: int
    temporal_patch_size: int

    @classmethod
    def from_folder(cls, folder: Path, settings: dict[str, Any]) -> QwenImages:
        config = read_json(folder / PROCESSOR_CONFIG)
        size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS, **config.get("size", {})}
        # the processor's __init__: legacy min_pixels / max_pixels keys override size
        lo = int(config.get("min_pixels") or size["shortest_edge"])
        hi = int(config.get("max_pixels") or size["longest_edge"])
        if not settings.get("image_size"):
            raise UserError(f"{folder}: the preprocessor has no fixed image size (the vision graph is static); "
                            f"re-export the artifact")
        return cls(
            image_size=(int(settings["image_size"][0]), int(settings["image_size"][1])),
            min_pixels=lo, max_pixels=min(hi, DEFAULT_MAX_PIXELS),  # Preprocessor._qwen_from's cap
            resize_on=config.get("do_resize", True), pixels=Pixels.from_config(config),
            patch_size=int(config.get("patch_size", 14)), merge_size=int(config.get("merge_size", 2)),
            temporal_patch_size=int(config.get("temporal_patch_size", 2)),
        )

    def __call__(self, image: PIL.Image.Image) -> ImageArrays:
        height, width = self.image_size
        if image.size != (width, height):  # Preprocessor's fixed grid: PIL bicubic to the exported size
            image = image.resize((width, height), PIL.Image.Resampling.BICUBIC)
        chw = to_chw(image, self.pixels.convert_rgb)  # (3, H, W) uint8
        if self.resize_on:
            factor = self.patch_size * self.merge_size
            chw = resize(chw, *smart_resize(*chw.shape[1:], factor, self.min_pixels, self.max_pixels),
                         self.pixels.resample)
        image_f = rescale_normalize(chw, self.pixels)  # (3, H, W) float32
        patches = patchify(image_f, self.patch_size, self.merge_size, self.temporal_patch_size)
        grid = np.array([[1, image_f.shape[1] // self.patch_size, image_f.shape[2] // self.patch_size]],
                        dtype=np.int64)  # (1, 3)
        return ImageArrays(np.ascontiguousarray(patches), grid, int(grid.prod()) // self.merge_size ** 2)
