"""Images + prompts -> the exact tensors the HF processor of each family would produce.

Why not just `AutoProcessor`? On these machines transformers 5 picks torchvision-backed
image processors by default and Qwen2.5-VL's processor also needs a video processor
(torchvision), so a real checkpoint's full processor may not load. We load the tokenizer
and the PIL-backed image processor directly and re-do, step for step, what
`LlavaProcessor` / `Qwen2_5_VLProcessor` do: render the prompt template, expand the
image placeholder to one token per visual feature, tokenize with the tokenizer's
default special tokens, pad on the left. What differs between families (template, tokens,
image processor, token counts, a fixed grid) is the family's (families/<family>.py);
`Preprocessor` runs those steps for whichever family it is given.

Also here: `load_image` (one-line `UserError` for bad files) and the bundled sample
photographs (`sample_path`, `samples`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import PIL.Image
import PIL.ImageOps

from reroute_export.errors import UserError
from reroute_export.families.host import to_rgb

if TYPE_CHECKING:  # torch and transformers when a Preprocessor is made: `load_image` and
    # SETTINGS_FILE serve the torch-free runtime too (reroute_export/runtime/, cli generate)
    import torch
    from transformers import CLIPImageProcessorPil, Qwen2VLImageProcessorPil
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    from reroute_export.families.base import Family

    ImageProcessor = CLIPImageProcessorPil | Qwen2VLImageProcessorPil

# Our own settings file, written next to the HF files so a round trip keeps the grid.
SETTINGS_FILE = "reroute_preprocess.json"


@dataclass
class VLInputs:
    """Model inputs for one batch, in the layout the HF model's forward expects."""

    input_ids: torch.LongTensor  # (B, L) int64
    # LLaVA: (B, 3, H, W); Qwen2.5-VL: (num_patches, C*T*P*P) flattened patches. float32.
    pixel_values: torch.Tensor
    attention_mask: torch.LongTensor | None = None  # (B, L), 1 = real token, left padding
    image_grid_thw: torch.LongTensor | None = None  # (num_images, 3), Qwen2.5-VL only
    # (B, L) 0 = text, 1 = image, 2 = video: Qwen2.5-VL's forward needs it for 3-D mRoPE
    # positions (without it transformers 5.24 silently falls back to 1-D positions).
    mm_token_type_ids: torch.LongTensor | None = None

    def to(self, device: str | torch.device) -> "VLInputs":
        """The same inputs with every tensor on `device`."""
        import torch

        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return VLInputs(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()})

    def model_kwargs(self) -> dict[str, torch.Tensor]:
        """The non-None fields as keyword arguments for `model(**...)` / `model.generate(**...)`."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


# ----------------------------------------------------------------------------- images


# The models resize to at most 672 px a side, so a JPEG is decoded at 1/2, 1/4 or 1/8 scale
# (libjpeg's DCT scaling: no full-size image in memory) down to no less than twice that; the
# processor's own resize does the rest. Other formats cannot decode at reduced scale.
DRAFT_SIDE = 1344
MAX_DECODED_PIXELS = 89_478_485  # Pillow's own bomb threshold, ~256 MiB as RGB: the most we decode


def load_image(path: str | Path) -> PIL.Image.Image:
    """Open an image file as RGB (EXIF orientation applied, as transformers' `load_image` does).

    Raises `UserError` with a one-line message instead of PIL's varied exceptions (and its
    DecompressionBombWarning), so the CLI can report a bad `--image` without a traceback.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--image {path} is a folder, not an image file")
    if not path.is_file():
        raise UserError(f"image not found: {path}")
    try:
        with _own_size_limit(), PIL.Image.open(path) as image:
            full = image.size
            image.draft(image.mode, (DRAFT_SIDE, DRAFT_SIDE))  # JPEG only; a no-op for other formats
            _check_decoded_size(path, image, full)
            image.load()
            image = PIL.ImageOps.exif_transpose(image)
            return to_rgb(image)
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as exc:
        raise UserError(f"not an image or corrupt: {path}") from exc


class _own_size_limit:
    """Pillow's bomb check off while opening: it warns (or refuses, above 2x) on the full
    size, before `draft` can make the decode small; `_check_decoded_size` judges instead."""

    def __enter__(self) -> None:
        self.saved, PIL.Image.MAX_IMAGE_PIXELS = PIL.Image.MAX_IMAGE_PIXELS, None

    def __exit__(self, *exc: object) -> None:
        PIL.Image.MAX_IMAGE_PIXELS = self.saved


def _check_decoded_size(path: Path, image: PIL.Image.Image, full: tuple[int, int]) -> None:
    """Refuse an image whose decode (after any JPEG draft) would pass MAX_DECODED_PIXELS."""
    width, height = image.size
    if width * height <= MAX_DECODED_PIXELS:
        return
    limit = f"the {MAX_DECODED_PIXELS / 1e6:.1f} MP this decodes"
    scale = round(full[0] / width)  # the draft chose 1, 2, 4 or 8
    how = (f"even at 1/{scale} scale {width * height / 1e6:.1f} MP, above {limit}" if image.format == "JPEG"
           else f"above {limit}, and {image.format or 'this format'} cannot be decoded at reduced scale (JPEG can)")
    raise UserError(f"image {path} is {full[0]}x{full[1]} ({full[0] * full[1] / 1e6:.1f} MP): {how}; "
                    f"downscale it first")


# ----------------------------------------------------------------------------- samples


def _samples_dir() -> Path:
    """The bundled sample folder, resolved through the installed package."""
    return Path(str(resources.files("reroute_export").joinpath("data").joinpath("samples")))


def sample_path(name: str) -> Path:
    """Path of a bundled sample photograph (see data/samples/LICENSES.md), e.g. 'astronaut.jpg'."""
    path = _samples_dir() / name
    if not path.is_file():
        raise UserError(f"no bundled sample named {name!r}")
    return path


def samples() -> list[tuple[Path, str]]:
    """(image path, prompt) pairs of the bundled samples, in samples.json order."""
    entries = json.loads((_samples_dir() / "samples.json").read_text(encoding="utf-8"))
    return [(sample_path(entry["image"]), entry["prompt"]) for entry in entries]


# ----------------------------------------------------------------------------- preprocessor


class Preprocessor:
    """Turns (image, prompt) pairs into `VLInputs` exactly as the family's HF processor would.

    family: the model family (families/): template, tokens and the image rules.
    image_size: Qwen2.5-VL only; (H, W), multiples of patch*merge. Every image is resized
        to exactly this size (PIL bicubic) before the HF image processor so that all images
        share one grid; None keeps HF's aspect-preserving dynamic resize (grid varies).
    patch_size / vision_feature_select_strategy: LLaVA only; the CLIP tower's patch size
        and whether the CLS feature is dropped ("default") or kept ("full").
    """

    family: type[Family]
    tokenizer: PreTrainedTokenizerBase
    image_processor: ImageProcessor
    image_token: str
    image_token_id: int
    video_token_id: int | None
    image_size: tuple[int, int] | None

    def __init__(
        self,
        family: type[Family],
        tokenizer: PreTrainedTokenizerBase,
        image_processor: ImageProcessor,
        *,
        image_size: tuple[int, int] | None = None,
        patch_size: int = 14,
        vision_feature_select_strategy: Literal["default", "full"] = "default",
    ) -> None:
        self.family = family
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token = family.image_token
        self.image_token_id = _token_id(tokenizer, self.image_token)
        self.video_token_id = _token_id(tokenizer, family.video_token) if family.video_token else None
        self.patch_size = patch_size
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.image_size = tuple(image_size) if image_size is not None else None
        if self.image_size is not None:
            family.check_image_size(self, self.image_size)

    # -- public ---------------------------------------------------------------------

    def __call__(self, images: list[PIL.Image.Image], prompts: list[str]) -> VLInputs:
        """One image per prompt -> padded batch. Mirrors ProcessorMixin.__call__ for one image each."""
        if len(images) != len(prompts) or not prompts:
            raise UserError(f"need one image per prompt, got {len(images)} images and {len(prompts)} prompts")
        pixels = self._process_images(images)
        counts = self._image_token_counts(pixels)  # visual tokens per image
        texts = [self._render(prompt, n) for prompt, n in zip(prompts, counts)]
        # Default add_special_tokens, like the processors: LLaVA's Llama tokenizer prepends
        # BOS, Qwen's adds nothing.
        enc = self.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
        input_ids = enc["input_ids"].long()  # (B, L)
        self._check_expansion(input_ids, counts)
        return VLInputs(
            input_ids=input_ids,
            pixel_values=pixels["pixel_values"].float(),
            attention_mask=enc["attention_mask"].long(),  # (B, L)
            image_grid_thw=pixels.get("image_grid_thw"),
            mm_token_type_ids=self._mm_token_type_ids(input_ids),
        )

    @property
    def visual_tokens(self) -> int | None:
        """N visual tokens every image gets, or None when the grid varies per image."""
        return self.family.processor_visual_tokens(self)

    def for_grid(self, grid_thw: tuple[int, int, int]) -> Preprocessor:
        """Qwen2.5-VL: a copy fixed to the image size of `grid_thw` (t, h, w in patches)."""
        return self.family.for_grid(self, grid_thw)

    def render(self, prompt: str) -> str:
        """The templated prompt with the (unexpanded) image placeholder, for display/logging."""
        return self.family.prompt_template.replace("{prompt}", prompt)

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Generated ids -> text, without special tokens (BOS/EOS/pad/image)."""
        if hasattr(ids, "tolist"):  # a tensor or an array
            ids = ids.tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def save_pretrained(self, directory: str | Path, buckets: list[list[int]] | None = None) -> None:
        """Write tokenizer + image processor in HF formats, plus our grid settings (`buckets`:
        an artifact's further fixed image sizes (H, W), Qwen2.5-VL)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)
        settings = {
            "family": self.family.name,
            "image_size": list(self.image_size) if self.image_size else None,
            "image_buckets": [list(self.image_size), *buckets] if buckets and self.image_size else [],
            "patch_size": self.patch_size,
            "vision_feature_select_strategy": self.vision_feature_select_strategy,
        }
        (directory / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        family: type[Family],
        *,
        image_size: tuple[int, int] | None | Literal["auto"] = "auto",
        max_pixels: int | None = None,
    ) -> Preprocessor:
        """Load tokenizer + PIL image processor from a checkpoint folder (ours or a real HF one).

        Qwen2.5-VL: the image processor's pixel cap becomes `max_pixels` (default: at most
        451584, the authors' setting). image_size="auto": our saved setting if present, else
        the largest square under the cap (451584 -> 672x672, 576 tokens); None = HF's
        dynamic, aspect-preserving resize. Never touches torchvision or the video processor.
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise UserError(f"checkpoint folder not found: {directory}")
        saved = _read_json(directory / SETTINGS_FILE)
        config = _read_json(directory / "config.json")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(directory)
        return family.load_preprocessor(directory, tokenizer, saved, config, image_size, max_pixels)

    # -- steps ----------------------------------------------------------------------

    def _render(self, prompt: str, num_image_tokens: int) -> str:
        """Template the prompt, then expand the single placeholder (processor's replace_image_token)."""
        if self.image_token in prompt:
            raise UserError(f"the prompt must not contain the image placeholder {self.image_token}")
        text = self.render(prompt)
        return text.replace(self.image_token, self.image_token * num_image_tokens, 1)

    def _process_images(self, images: list[PIL.Image.Image]) -> dict[str, torch.Tensor]:
        """Run the PIL image processor; for a fixed Qwen grid, resize to image_size first."""
        images = self.family.fit_images(self, [to_rgb(image) for image in images])
        out = self.image_processor(images, return_tensors="pt")
        return dict(out)

    def _image_token_counts(self, pixels: dict[str, torch.Tensor]) -> list[int]:
        """Visual tokens per image, as LlavaProcessor / Qwen2_5_VLProcessor compute them."""
        return self.family.image_token_counts(self, pixels)

    def _check_expansion(self, input_ids: torch.Tensor, counts: list[int]) -> None:
        """Guard against a tokenizer that splits or merges the placeholder token."""
        found = (input_ids == self.image_token_id).sum(dim=1).tolist()
        if found != counts:
            raise RuntimeError(f"image token expansion mismatch: expected {counts}, tokenized {found}")

    def _mm_token_type_ids(self, input_ids: torch.Tensor) -> torch.LongTensor | None:
        """Qwen2.5-VL only: 1 for image tokens, 2 for video tokens, 0 otherwise (ProcessorMixin rule)."""
        if not self.family.mm_token_types:
            return None
        types = (input_ids == self.image_token_id).long()  # (B, L)
        if self.video_token_id is not None:
            types = types + 2 * (input_ids == self.video_token_id).long()
        return types


# ----------------------------------------------------------------------------- helpers


def _token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    """Id of a special token that must be a single vocabulary entry."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise UserError(f"tokenizer has no {token} token")
    return int(token_id)


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON file as a dict, or {} when absent."""
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def check_config_token(config: dict, keys: tuple[str, ...], token_id: int) -> None:
    """The model config's image token id must be the tokenizer's, or features land on wrong tokens."""
    for key in keys:
        if key in config and config[key] != token_id:
            raise UserError(
                f"config.json {key}={config[key]} but the tokenizer's image token id is {token_id}"
            )
