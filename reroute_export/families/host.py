"""Host-side image steps shared by the families: numpy and Pillow only, no torch, no transformers.

An artifact must run where only numpy, Pillow, tokenizers and onnxruntime are installed
(runtime/processor.py). Each family's HF image processor (transformers 5's PIL backend:
`PilBackend` in image_processing_backends.py, the helpers in image_transforms.py) is
re-done step for step, with the same dtypes at every step, so the pixels are the very
same floats: the steps the families share are here, each family's recipe composes them
(`ClipImages` in llava.py, `QwenImages` in qwen2_5_vl.py); tests/test_runtime_torchfree.py
holds them equal on the shipped photos.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import PIL.Image

# transformers' OPENAI_CLIP_MEAN / _STD: the class defaults of both families' processors
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROCESSOR_CONFIG = "preprocessor_config.json"


@dataclass(frozen=True)
class ImageArrays:
    """One image as the family's vision graph takes it."""

    pixel_values: np.ndarray  # float32; LLaVA (1, 3, H, W), Qwen2.5-VL (t*h*w, C*T*P*P) patches
    image_grid_thw: np.ndarray | None  # (1, 3) int64 grid in patches, Qwen2.5-VL only
    tokens: int  # image tokens the prompt's placeholder expands to


class ImageRecipe(Protocol):
    """A family's image processor: one PIL image -> `ImageArrays`."""

    def __call__(self, image: PIL.Image.Image) -> ImageArrays: ...


@dataclass(frozen=True)
class Pixels:
    """The rescale/normalize settings both processors share (their saved config or class defaults)."""

    resample: int
    rescale: float | None  # None: do_rescale off
    mean: tuple[float, ...] | None  # None: do_normalize off
    std: tuple[float, ...] | None
    convert_rgb: bool

    @classmethod
    def from_config(cls, config: dict[str, Any], resample: int = PIL.Image.Resampling.BICUBIC) -> Pixels:
        normalize = config.get("do_normalize", True)
        return cls(
            resample=int(config.get("resample", resample)),
            rescale=float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else None,
            mean=_floats(config.get("image_mean", CLIP_MEAN)) if normalize else None,
            std=_floats(config.get("image_std", CLIP_STD)) if normalize else None,
            convert_rgb=config.get("do_convert_rgb", True),
        )


def _floats(value: float | Sequence[float]) -> tuple[float, ...]:
    return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file as a dict, or {} when absent (HF's class defaults then apply)."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


# ----------------------------------------------------------------------------- steps


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """A plain RGB image: transparency (an alpha band, or a `transparency` key, which a palette
    image keeps as a colour after PIL's convert("RGB")) composited onto white, as transformers
    5.2x's convert_to_rgb does. Earlier 5.x dropped it; an image with no transparency left
    reads the same in every version, and in the torch-free processor."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def to_chw(image: PIL.Image.Image, convert_rgb: bool) -> np.ndarray:
    """PIL image -> (C, H, W) uint8, as `PilBackend.process_image` (convert_to_rgb first:
    transparency, including a palette's `transparency` key, is composited onto white)."""
    if convert_rgb:
        image = to_rgb(image)
    pixels = np.array(image)  # (H, W, C) or (H, W)
    return pixels[None] if pixels.ndim == 2 else np.moveaxis(pixels, -1, 0)  # (C, H, W)


def resize(chw: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """(C, H, W) uint8 -> (C, height, width) uint8 through PIL, as transformers' `resize`."""
    hwc = chw[0] if chw.shape[0] == 1 else np.moveaxis(chw, 0, -1)  # PIL wants (H, W[, C])
    out = np.array(PIL.Image.fromarray(hwc).resize((width, height), resample=resample))
    return out[None] if out.ndim == 2 else np.moveaxis(out, -1, 0)  # (C, height, width)


def shortest_edge_size(height: int, width: int, edge: int) -> tuple[int, int]:
    """(H, W) with the shorter side scaled to `edge` (get_resize_output_image_size, no max)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = edge, int(edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def aspect_size(height: int, width: int, edge: int, max_edge: int) -> tuple[int, int]:
    """(H, W) for a {shortest_edge, longest_edge} size (get_size_with_aspect_ratio)."""
    raw = None
    if max(height, width) / min(height, width) * edge > max_edge:
        raw = max_edge * min(height, width) / max(height, width)
        edge = int(round(raw))
    if (height <= width and height == edge) or (width <= height and width == edge):
        return height, width
    scale = raw if raw is not None else edge
    if width < height:
        return int(scale * height / width), edge
    return edge, int(scale * width / height)


def center_crop(chw: np.ndarray, height: int, width: int) -> np.ndarray:
    """(C, H, W) -> (C, height, width): the centre, zero-padded first where the image is
    smaller (the padding split as transformers' center_crop: the larger half after)."""
    _, h, w = chw.shape
    pad_h, pad_w = max(height - h, 0), max(width - w, 0)
    if pad_h or pad_w:
        before_h, before_w = math.ceil(pad_h / 2), math.ceil(pad_w / 2)
        chw = np.pad(chw, ((0, 0), (before_h, pad_h - before_h), (before_w, pad_w - before_w)))
        _, h, w = chw.shape
    top, left = (h - height) // 2, (w - width) // 2
    return chw[:, top:top + height, left:left + width]


def rescale_normalize(chw: np.ndarray, px: Pixels) -> np.ndarray:
    """(C, H, W) uint8 -> float32, in transformers' dtypes: rescale in float64 then cast,
    normalize in float32 with float32 mean and std."""
    image = chw
    if px.rescale is not None:
        image = (image.astype(np.float64) * px.rescale).astype(np.float32)
    if px.mean is not None and px.std is not None:
        if not np.issubdtype(image.dtype, np.floating):
            image = image.astype(np.float32)
        channels = image.shape[0]
        mean = np.array(px.mean * channels if len(px.mean) == 1 else px.mean, dtype=image.dtype)  # (C,)
        std = np.array(px.std * channels if len(px.std) == 1 else px.std, dtype=image.dtype)  # (C,)
        image = (image - mean[:, None, None]) / std[:, None, None]
    return image.astype(np.float32)
