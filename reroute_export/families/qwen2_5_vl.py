"""Qwen2.5-VL: windowed ViT + patch merger + Qwen2 decoder with 3-D mRoPE.

Every Qwen2.5-VL fact lives here: anatomy, prompt template and image/video tokens, the
image processor twice (transformers' `Qwen2VLImageProcessorPil` for the reference;
`QwenImages`, its steps in numpy + Pillow, for the torch-free runtime), the one fixed image
grid an export is made for, mRoPE position ids, the vision graph, input checks, routing-map
grid, the tiny model, spec overrides and checkpoint key renames. torch and transformers are
imported inside the methods that use them.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import PIL.Image

from ..errors import UserError
from .base import Family, OfflineIds, register_family, square_grid, text_overrides
from .host import PROCESSOR_CONFIG, ImageArrays, Pixels, read_json, rescale_normalize, resize, to_chw

if TYPE_CHECKING:  # torch lazily: importing a family must not cost the torch-free runtime torch
    import torch
    from torch import nn
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLForConditionalGeneration

    from ..preprocess import Preprocessor
    from ..tiny import Sizes, Where

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
# Qwen2.5-VL-7B as evaluated by the authors: images capped at 451584 px = 576 tokens.
DEFAULT_MAX_PIXELS = 451584
# Qwen2VLImageProcessorPil's class defaults
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 1280
TINY_IMAGE_SIZE = 224  # (224, 224) -> grid (1, 16, 16) -> 16 * 16 / 2**2 = 64 tokens
SPECIALS = [  # the tiny tokenizer's, appended after the vocab, in Qwen2's order
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


# ----------------------------------------------------------------------------- host side (numpy + PIL)


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


def fixed_image_size(max_pixels: int, factor: int, min_pixels: int = 0) -> tuple[int, int]:
    """Largest square (side a multiple of `factor` = patch*merge) with at most `max_pixels` pixels.

    Qwen2.5-VL's processor keeps the aspect ratio, so the grid (and the number of visual
    tokens) changes with each image; an exported graph wants one fixed grid, so every
    image is first resized to this square. 451584 px, factor 28 -> (672, 672) -> 576 tokens.
    The square must also have at least `min_pixels` (the processor's lower bound), or
    smart_resize would enlarge it and the grid would not be the one planned.
    """
    side = math.isqrt(max_pixels) // factor * factor
    if side < factor or side * side < min_pixels:
        raise UserError(f"no square image with sides a multiple of {factor} has {min_pixels}..{max_pixels} px "
                        f"(the processor's size bounds); give image_size or other bounds")
    return side, side


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
    """Qwen2VLImageProcessorPil's steps after our fixed-size resize (smart_resize, rescale,
    normalize, temporal repeat, merge-aware patchify), as Preprocessor.from_pretrained
    configures it for an artifact: every image first resized to the exported `image_size`.
    tests/test_runtime_torchfree.py holds pixels and grids equal to transformers'."""

    image_size: tuple[int, int]  # (H, W), the exported grid times the patch size
    buckets: tuple[tuple[int, int], ...]  # every fixed size the artifact has graphs for (image_size first)
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
        size = (int(settings["image_size"][0]), int(settings["image_size"][1]))
        buckets = tuple((int(h), int(w)) for h, w in settings.get("image_buckets") or [size])
        return cls(
            image_size=size, buckets=buckets,
            min_pixels=lo, max_pixels=min(hi, DEFAULT_MAX_PIXELS),  # load_preprocessor's cap
            resize_on=config.get("do_resize", True), pixels=Pixels.from_config(config),
            patch_size=int(config.get("patch_size", 14)), merge_size=int(config.get("merge_size", 2)),
            temporal_patch_size=int(config.get("temporal_patch_size", 2)),
        )

    def bucket(self, width: int, height: int) -> tuple[int, int]:
        """The artifact's size nearest (in log scale, per side) to the grid the processor
        would pick for this image (smart_resize at its own pixel bounds)."""
        if len(self.buckets) == 1:
            return self.buckets[0]
        factor = self.patch_size * self.merge_size
        th, tw = smart_resize(height, width, factor, self.min_pixels, self.max_pixels)
        return min(self.buckets, key=lambda b: abs(math.log(b[0] / th)) + abs(math.log(b[1] / tw)))

    def __call__(self, image: PIL.Image.Image) -> ImageArrays:
        height, width = self.bucket(*image.size)
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


def _runs(is_image: np.ndarray) -> list[tuple[bool, int, int]]:
    """Maximal runs of equal flags: (is_image, start, end) in sequence order."""
    cuts = np.flatnonzero(np.diff(is_image.astype(np.int8))) + 1
    bounds = [0, *cuts.tolist(), len(is_image)]
    return [(bool(is_image[a]), a, b) for a, b in zip(bounds, bounds[1:])]


def _image_block(start: int, grid_thw: np.ndarray, merge: int) -> np.ndarray:
    """(3, t*h*w/merge²) temporal/height/width grid indices, offset by `start`.

    A still image has time interval 1 (transformers >= 5.x no longer scales images by
    tokens_per_second), so row 0 is simply the frame index.
    """
    t, h, w = int(grid_thw[0]), int(grid_thw[1]) // merge, int(grid_thw[2]) // merge
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")  # (t, h, w) each
    return np.stack([tt, hh, ww]).reshape(3, -1).astype(np.int64) + start  # (3, t*h*w)


def qwen_positions(
    input_ids: np.ndarray, image_token_id: int, image_grid_thw: np.ndarray, spatial_merge_size: int
) -> np.ndarray:
    """(3, 1, L) int64 mRoPE position ids for one prompt, as `Qwen2_5_VLModel.get_rope_index`.

    Text runs count 1-D in all three rows; each image run takes the next grid of
    `image_grid_thw` and gets grid indices offset by the running index, after which the
    running index advances by max(h, w) / merge (HF's rule; = the block's max + 1 for t = 1).
    """
    ids = np.asarray(input_ids).reshape(-1)  # (L,)
    if ids.size == 0:
        return np.zeros((3, 1, 0), dtype=np.int64)
    grids = iter(np.asarray(image_grid_thw).reshape(-1, 3))
    pos, blocks = 0, []
    for is_image, start, end in _runs(ids == image_token_id):
        if is_image:
            grid = next(grids)
            block = _image_block(pos, grid, spatial_merge_size)
            if block.shape[1] != end - start:
                raise ValueError(f"image run of {end - start} tokens but grid {grid.tolist()} gives {block.shape[1]}")
            blocks.append(block)
            pos += max(int(grid[1]), int(grid[2])) // spatial_merge_size
        else:
            blocks.append(np.broadcast_to(np.arange(pos, pos + end - start, dtype=np.int64), (3, end - start)))
            pos += end - start
    return np.concatenate(blocks, axis=1)[:, None, :]  # (3, 1, L)


def _flat(x: Any) -> list[int]:
    """A (1, 3) tensor / array / nested list -> [t, h, w]."""
    return [int(v) for v in np.asarray(x).reshape(-1).tolist()]


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
    # The prompt Qwen2.5-VL-Instruct's chat template renders for one user turn holding one image.
    prompt_template = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    image_token = IMAGE_TOKEN
    video_token = VIDEO_TOKEN
    mm_token_types = True  # 3-D mRoPE positions come from them
    image_grid = True
    map_fit = "resize"  # the whole image, resized to the fixed grid
    # vision_token_id (<|vision_pad|>) is read by no transformers 5 code: left as published
    offline = OfflineIds(
        ids={"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
             "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
             "text_config.bos_token_id": "<|endoftext|>", "text_config.eos_token_id": "<|im_end|>",
             "text_config.pad_token_id": "<|endoftext|>"},
        bos=None, eos=("<|im_end|>", "<|endoftext|>"), pad="<|endoftext|>",
    )

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
    def vision_module(cls, model: nn.Module) -> nn.Module:
        from ..rewrite.vision import QwenVision

        return QwenVision(model)

    @classmethod
    def vision_tables(cls, model: nn.Module, image_grid_thw: tuple[int, int, int] | None) -> dict[str, Any]:
        from ..rewrite.vision import grid_tables

        if image_grid_thw is None:
            raise ValueError("Qwen2.5-VL's vision tables need the image grid")
        return grid_tables(model.model.visual, tuple(int(x) for x in image_grid_thw))

    @classmethod
    def check_pixels(cls, config: Any, inputs: Any, tokens: int) -> None:
        """Pixel rows, grid and image tokens must agree (the model would fail deep inside)."""
        vision = config.vision_config
        grid = inputs.image_grid_thw.tolist()
        patches = sum(t * h * w for t, h, w in grid)
        width = getattr(vision, "in_channels", 3) * vision.temporal_patch_size * vision.patch_size ** 2
        if tuple(inputs.pixel_values.shape) != (patches, width):
            raise UserError(f"--pixel-values has shape {list(inputs.pixel_values.shape)}; the grid {grid} makes "
                            f"[{patches}, {width}]")
        if tokens != patches // vision.spatial_merge_size ** 2:
            raise UserError(f"the prompt holds {tokens} image tokens; the grid {grid} makes "
                            f"{patches // vision.spatial_merge_size ** 2}")

    @classmethod
    def spec_overrides(cls, config: Any) -> dict[str, Any]:
        v = config.vision_config
        return {
            "text": text_overrides(config.text_config),
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

    # -- preprocessing with transformers
    @classmethod
    def load_preprocessor(cls, directory: Path, tokenizer: Any, saved: dict[str, Any], config: dict[str, Any],
                          image_size: Any, max_pixels: int | None) -> Preprocessor:
        """Fixed grid by default: saved size, else the largest square within the processor's
        own bounds, its longest_edge capped at the authors' 451584 px (the checkpoint's
        settings win over the registered default: 50176 px -> 224x224 -> 64 tokens)."""
        from transformers import Qwen2VLImageProcessorPil

        from ..preprocess import Preprocessor, check_config_token

        image_processor = Qwen2VLImageProcessorPil.from_pretrained(directory)
        cap = max_pixels or min(image_processor.size["longest_edge"], DEFAULT_MAX_PIXELS)
        image_processor.size["longest_edge"] = cap  # the evaluated setting caps images
        if image_size == "auto":
            if saved.get("image_size"):
                image_size = tuple(saved["image_size"])
            else:
                factor = image_processor.patch_size * image_processor.merge_size
                image_size = fixed_image_size(cap, factor, image_processor.size["shortest_edge"])
        pre = Preprocessor(cls, tokenizer, image_processor, image_size=image_size)
        check_config_token(config, ("image_token_id",), pre.image_token_id)
        return pre

    @classmethod
    def processor_visual_tokens(cls, pre: Preprocessor) -> int | None:
        if pre.image_size is None:
            return None
        step = pre.image_processor.patch_size * pre.image_processor.merge_size
        return (pre.image_size[0] // step) * (pre.image_size[1] // step)

    @classmethod
    def image_token_counts(cls, pre: Preprocessor, pixels: dict[str, Any]) -> list[int]:
        merge = pre.image_processor.merge_size
        # grid (t, h, w) in patches; the merger fuses merge x merge patches into one token
        return [int(thw.prod()) // merge**2 for thw in pixels["image_grid_thw"]]

    @classmethod
    def fit_images(cls, pre: Preprocessor, images: list[PIL.Image.Image]) -> list[PIL.Image.Image]:
        """A fixed grid: every image resized to image_size first (PIL bicubic)."""
        if pre.image_size is None:
            return images
        height, width = pre.image_size
        return [
            image if image.size == (width, height) else image.resize((width, height), PIL.Image.Resampling.BICUBIC)
            for image in images
        ]

    @classmethod
    def check_image_size(cls, pre: Preprocessor, size: tuple[int, ...]) -> None:
        """A fixed size must survive smart_resize unchanged: multiples of patch*merge."""
        factor = pre.image_processor.patch_size * pre.image_processor.merge_size
        if len(size) != 2 or any(s <= 0 or s % factor for s in size):
            raise UserError(f"image_size must be (H, W), both multiples of {factor}; got {size}")
        pixels = size[0] * size[1]
        lo, hi = pre.image_processor.size["shortest_edge"], pre.image_processor.size["longest_edge"]
        if not lo <= pixels <= hi:
            raise UserError(f"image_size {size} has {pixels} px, outside the processor's [{lo}, {hi}]")

    @classmethod
    def for_grid(cls, pre: Preprocessor, grid_thw: tuple[int, int, int]) -> Preprocessor:
        """Processor outputs given as arrays define the grid an artifact is exported for; its
        own preprocessor must then resize every image to that size, so the pixel bounds
        widen to admit it (smart_resize would otherwise move it back inside them)."""
        from ..preprocess import Preprocessor

        patch = pre.image_processor.patch_size
        size = (int(grid_thw[1]) * patch, int(grid_thw[2]) * patch)
        if pre.image_size == size:
            return pre
        processor = copy.deepcopy(pre.image_processor)
        bounds, pixels = processor.size, size[0] * size[1]
        bounds["shortest_edge"] = min(bounds["shortest_edge"], pixels)
        bounds["longest_edge"] = max(bounds["longest_edge"], pixels)
        return Preprocessor(cls, pre.tokenizer, processor, image_size=size)

    # -- the tiny model
    @classmethod
    def tiny(cls, seed: int = 0, attn_implementation: str = "sdpa", sizes: Sizes | None = None,
             where: Where | None = None) -> tuple[Qwen2_5_VLForConditionalGeneration, Preprocessor]:
        """Tiny Qwen2.5-VL (windowed ViT + 2x2 merger + mRoPE decoder), fixed 224x224 grid;
        other `sizes` give the same model at another scale (e.g. bench-qwen2.5-vl, 672x672)."""
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        from ..tiny import PATCH_SIZE, Sizes, build_model, set_generation_ids

        sizes = sizes or Sizes(image_size=TINY_IMAGE_SIZE)
        tokenizer = cls.tiny_tokenizer()
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
        head_dim = sizes.head_dim  # tiny: 16 -> 8 rotary frequencies = 2 (t) + 3 (h) + 3 (w)
        vision = dict(
            depth=sizes.vision_layers,
            hidden_size=sizes.vision_hidden,
            num_heads=sizes.vision_heads,
            intermediate_size=sizes.vision_intermediate,
            patch_size=PATCH_SIZE,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[sizes.vision_layers - 1],
            out_hidden_size=sizes.text_hidden,
        )
        text = dict(
            **sizes.text_fields(len(tokenizer)),
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": sizes.mrope_section},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        )
        assert sum(text["rope_parameters"]["mrope_section"]) == head_dim // 2
        config = Qwen2_5_VLConfig(
            vision_config=vision,
            text_config=text,
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
            tie_word_embeddings=False,
        )
        model = build_model(Qwen2_5_VLForConditionalGeneration, config, seed, attn_implementation, sizes.weight_std,
                            where)
        eos = [ids["<|im_end|>"], ids["<|endoftext|>"]]  # as Qwen2.5-VL-Instruct's generation_config
        set_generation_ids(model, bos=None, eos=eos, pad=ids["<|endoftext|>"])
        return model, cls.tiny_preprocessor(tokenizer, sizes.image_size)

    @classmethod
    def tiny_tokenizer(cls) -> PreTrainedTokenizerFast:
        """Qwen2-style: no BOS, pad = <|endoftext|>, eos = <|im_end|>."""
        from transformers import PreTrainedTokenizerFast

        from ..tiny import tokenizer_object

        return PreTrainedTokenizerFast(
            tokenizer_object=tokenizer_object([], SPECIALS),
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            add_bos_token=False,
            add_eos_token=False,
            clean_up_tokenization_spaces=False,
            padding_side="left",
            extra_special_tokens={"image_token": IMAGE_TOKEN, "video_token": VIDEO_TOKEN},
            chat_template=cls.chat_template(),  # Qwen2.5-VL-Instruct's processor template
        )

    @classmethod
    def tiny_preprocessor(cls, tokenizer: PreTrainedTokenizerFast, side: int) -> Preprocessor:
        """Qwen2.5-VL-Instruct's image processor, every image resized to side x side (one fixed grid)."""
        from transformers import Qwen2VLImageProcessorPil

        from ..preprocess import Preprocessor
        from ..tiny import PATCH_SIZE

        image_processor = Qwen2VLImageProcessorPil(
            patch_size=PATCH_SIZE,
            temporal_patch_size=2,
            merge_size=2,
            min_pixels=MIN_PIXELS,
            max_pixels=MAX_PIXELS,
        )
        return Preprocessor(cls, tokenizer, image_processor, image_size=(side, side))

    # -- host side
    @classmethod
    def host_images(cls, folder: Path, settings: dict[str, Any]) -> QwenImages:
        return QwenImages.from_folder(folder, settings)

    @classmethod
    def host_positions(cls, ids: np.ndarray, grid: np.ndarray | None, manifest: dict[str, Any]) -> np.ndarray:
        merge = int(manifest["spatial_merge_size"])
        return qwen_positions(ids, int(manifest["image_token_id"]), grid, merge)  # (3, 1, L)

    @classmethod
    def host_grid(cls, manifest: dict[str, Any]) -> np.ndarray:
        return np.asarray(manifest.get("image_grid_thw"), dtype=np.int64).reshape(1, 3)  # (1, 3)

    # -- routing maps
    @classmethod
    def map_grid(cls, n_visual: int, image_grid_thw: Any = None, *, merge: int = 2) -> tuple[int, int]:
        """The merged grid (h / merge, w / merge) of `image_grid_thw` (t, h, w) in patches (one
        image, t = 1); without a grid a square token count is taken as a square image."""
        if image_grid_thw is None:
            return square_grid(n_visual, " (give the image grid: image_grid_thw)")
        thw = _flat(image_grid_thw)
        if len(thw) != 3:
            raise UserError(f"image_grid_thw must be one (t, h, w) triple for a routing map, got {thw}")
        t, h, w = thw
        if t != 1 or h % merge or w % merge:
            raise UserError(f"routing maps draw one still image; image_grid_thw {thw} is not (1, h, w) "
                            f"with h and w multiples of {merge}")
        grid = (h // merge, w // merge)
        if grid[0] * grid[1] != n_visual:
            raise UserError(f"image_grid_thw {thw} gives {grid[0]}x{grid[1]} = {grid[0] * grid[1]} merged tokens, "
                            f"but the trace has {n_visual} visual tokens")
        return grid
