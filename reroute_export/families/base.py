"""What the rest of the package needs to know about a model family, declared once.

A family says where the decoder lives, how prompt embeddings are built (text embeddings
with image features scattered into the image-token slots, exactly as the HF forward
does), how the model's own position ids are computed (1-D for Llama, 3-D mRoPE for
Qwen2.5-VL), and every other per-family fact: its prompt and image processor (numpy +
PIL for the torch-free runtime, transformers' for the reference), its vision graph, its
tiny random-weight model, spec overrides and checkpoint key renames. Everything else
(scoring, routing, caches, export) is family-agnostic and reads these members.

`Family` is abstract: a family module must implement every abstract member
(tests/test_families.py fails on a registered family that does not). Families are classes
used as namespaces (classmethods only), never instantiated. torch and transformers are
imported inside the methods that use them: the torch-free runtime imports every family.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import UserError

if TYPE_CHECKING:  # torch only for annotations: the torch-free runtime imports every family
    import numpy as np
    import PIL.Image
    import torch
    from torch import nn
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

    from ..preprocess import Preprocessor
    from ..tiny import Sizes, Where
    from .host import ImageRecipe

REGISTERED: dict[str, type[Family]] = {}  # name -> family; filled by @register_family


def register_family(cls: type[Family]) -> type[Family]:
    """Class decorator: make a family known by name (families.get_family) and architecture."""
    REGISTERED[cls.name] = cls
    return cls


@dataclass(frozen=True)
class OfflineIds:
    """How a family's published config meets the offline tokenizer (--random-weights): which
    config fields hold token ids (dotted path -> the offline token whose id they take), and the
    generation ids. Only ids move: they size nothing, so the vocabulary and parameter count stay
    the published ones, and the offline prompt's image tokens land where the model looks."""

    ids: dict[str, str] = field(default_factory=dict)
    bos: str | None = None
    eos: tuple[str, ...] = ()  # generation stops at any; one -> an int, as the tiny builders set it
    pad: str = ""


def square_grid(n: int, hint: str = "") -> tuple[int, int]:
    """(side, side) for a square count of visual tokens; a one-line error otherwise."""
    side = math.isqrt(n)
    if side * side != n:
        raise UserError(f"{n} visual tokens do not form a square patch grid{hint}; cannot draw a routing map")
    return side, side


def text_overrides(text_config: Any) -> dict[str, Any]:
    """The graph spec's text fields from an HF text_config (Llama and Qwen2 name them alike)."""
    heads = text_config.num_attention_heads
    return dict(
        num_layers=text_config.num_hidden_layers, hidden_size=text_config.hidden_size, num_heads=heads,
        num_kv_heads=text_config.num_key_value_heads or heads,
        head_dim=getattr(text_config, "head_dim", None) or text_config.hidden_size // heads,
        intermediate_size=text_config.intermediate_size, vocab_size=text_config.vocab_size,
    )


class Family(abc.ABC):
    """One model family, declared once: a namespace of class attributes and classmethods
    (never instantiated). Register a subclass with @register_family."""

    # -- identity and anatomy
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
    # -- prompt (preprocess.Preprocessor and runtime/processor.py alike)
    prompt_template: ClassVar[str]  # one user turn holding one image: "{prompt}" and one image_token
    image_token: ClassVar[str]  # the placeholder, expanded to one token per visual feature
    video_token: ClassVar[str | None] = None  # mm_token_type_ids marks it 2 (image tokens 1)
    mm_token_types: ClassVar[bool] = False  # the HF forward takes mm_token_type_ids
    image_grid: ClassVar[bool] = False  # inputs carry image_grid_thw; the vision graph is fixed to one grid
    # -- routing maps: how the processor lays the image over the patch grid ("crop" or "resize")
    map_fit: ClassVar[str]
    # -- --random-weights: the published config's token-id fields under the offline tokenizer
    offline: ClassVar[OfflineIds]
    # -- parity bounds this family needs beyond check/tolerances.py's per-precision defaults
    tolerance_overrides: ClassVar[dict[str, dict[str, float]]] = {}  # precision -> metric -> bound

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

    # -- per-input computation (torch: the eager reference and the export)
    @classmethod
    @abc.abstractmethod
    def image_features(cls, model: nn.Module, inputs: Any) -> torch.Tensor:
        """(num_images * N, D) projected visual tokens in prompt order."""

    @classmethod
    def embed(cls, model: nn.Module, inputs: Any) -> torch.Tensor:
        """(B, L, D) prompt embeddings, image features in the image-token slots."""
        ids = inputs.input_ids
        embeds = model.get_input_embeddings()(ids)  # (B, L, D)
        feats = cls.image_features(model, inputs).to(embeds.dtype)  # (B*N, D)
        slots = (ids == cls.image_token_id(model)).unsqueeze(-1)  # (B, L, 1)
        return embeds.masked_scatter(slots, feats)

    @classmethod
    @abc.abstractmethod
    def positions(cls, model: nn.Module, inputs: Any) -> torch.Tensor:
        """The unpruned model's position ids: (B, L) or (3, B, L)."""

    @classmethod
    @abc.abstractmethod
    def vision_module(cls, model: nn.Module) -> nn.Module:
        """The module export/vision.py writes as vision.onnx: pixel values (+ vision_tables) -> (N, D)."""

    @classmethod
    def vision_tables(cls, model: nn.Module, image_grid_thw: tuple[int, int, int] | None) -> dict[str, Any]:
        """The vision graph's inputs beside the pixels for one image grid, in the order its
        module takes them (contract.VISION_TABLES); none for a fixed-size tower."""
        return {}

    @classmethod
    @abc.abstractmethod
    def check_pixels(cls, config: Any, inputs: Any, tokens: int) -> None:
        """One-line UserError when processor outputs given as arrays (trace/export --pixel-values)
        do not fit the model `config`, whose forward would fail deep inside; `tokens`: the
        prompt's image tokens."""

    # -- checkpoint config
    @classmethod
    @abc.abstractmethod
    def spec_overrides(cls, config: Any) -> dict[str, Any]:
        """Graph-spec fields read from a checkpoint's config (text and vision widths)."""

    @classmethod
    @abc.abstractmethod
    def visual_tokens(cls, config: Any, image_size: int) -> int:
        """N visual tokens one square image of `image_size` px gives under `config`."""

    # -- preprocessing with transformers (preprocess.Preprocessor calls these)
    @classmethod
    @abc.abstractmethod
    def load_preprocessor(cls, directory: Path, tokenizer: Any, saved: dict[str, Any], config: dict[str, Any],
                          image_size: Any, max_pixels: int | None) -> Preprocessor:
        """`Preprocessor.from_pretrained`'s family part: the PIL image processor of `directory`,
        configured from our `saved` settings and the model `config` (both {} when absent)."""

    @classmethod
    @abc.abstractmethod
    def processor_visual_tokens(cls, pre: Preprocessor) -> int | None:
        """N visual tokens every image gets through `pre`, or None when the grid varies per image."""

    @classmethod
    @abc.abstractmethod
    def image_token_counts(cls, pre: Preprocessor, pixels: dict[str, Any]) -> list[int]:
        """Visual tokens per image in the image processor's outputs, as the HF processor counts them."""

    @classmethod
    def fit_images(cls, pre: Preprocessor, images: list[PIL.Image.Image]) -> list[PIL.Image.Image]:
        """The RGB images as the image processor should see them (a fixed grid resizes first)."""
        return images

    @classmethod
    @abc.abstractmethod
    def check_image_size(cls, pre: Preprocessor, size: tuple[int, ...]) -> None:
        """One-line UserError unless every image can be resized to `size` (H, W) and keep it."""

    @classmethod
    @abc.abstractmethod
    def for_grid(cls, pre: Preprocessor, grid_thw: tuple[int, int, int]) -> Preprocessor:
        """`pre` fixed to the image size of `grid_thw` (t, h, w in patches), or a UserError."""

    @classmethod
    def chat_template(cls) -> str:
        """The family's standard HF chat template (data/chat_templates/, sources in SOURCES.md).

        Saved with the tiny models' tokenizers so their folders work in other tools too
        (`apply_chat_template`, AutoProcessor); for one user turn holding one image it renders
        exactly `prompt_template` (tests/test_chat_template.py)."""
        path = resources.files("reroute_export").joinpath("data", "chat_templates", f"{cls.name}.jinja")
        if not path.is_file():
            raise UserError(f"no chat template for family {cls.name!r} (data/chat_templates/{cls.name}.jinja)")
        return path.read_text(encoding="utf-8").rstrip("\n")  # an editor's final newline would render

    # -- the tiny random-weight model (tiny.py's parts, the real HF classes)
    @classmethod
    @abc.abstractmethod
    def tiny(cls, seed: int = 0, attn_implementation: str = "sdpa", sizes: Sizes | None = None,
             where: Where | None = None) -> tuple[PreTrainedModel, Preprocessor]:
        """The family's built-in-code model at `sizes` (None: the tiny model's own), seeded
        random weights; `where`: built directly in that dtype on that device."""

    @classmethod
    @abc.abstractmethod
    def tiny_tokenizer(cls) -> PreTrainedTokenizerFast:
        """The offline byte-level tokenizer with the family's special tokens and chat template."""

    @classmethod
    @abc.abstractmethod
    def tiny_preprocessor(cls, tokenizer: PreTrainedTokenizerFast, side: int) -> Preprocessor:
        """The family's HF image processor for `side` px images, around `tokenizer`."""

    # -- host side: numpy only, no torch (the artifact runtime calls these)
    @classmethod
    @abc.abstractmethod
    def host_images(cls, folder: Path, settings: dict[str, Any]) -> ImageRecipe:
        """The family's HF image processor in numpy + PIL, as a saved preprocessor folder
        (preprocessor_config.json + our reroute_preprocess.json `settings`) configures it."""

    @classmethod
    @abc.abstractmethod
    def host_positions(cls, ids: np.ndarray, grid: np.ndarray | None, manifest: dict[str, Any]) -> np.ndarray:
        """The unpruned model's position ids for one prompt `ids` (L,): (1, L) or (3, 1, L)."""

    @classmethod
    def host_grid(cls, manifest: dict[str, Any]) -> np.ndarray | None:
        """The image grid an artifact's static vision graph was exported for, if the family has one."""
        return None

    # -- routing maps (viz.py)
    @classmethod
    def map_grid(cls, n_visual: int, image_grid_thw: Any = None, *, merge: int = 2) -> tuple[int, int]:
        """(H, W) of the visual-token grid: token i is cell (i // W, i % W). By default the
        square patch grid, row-major (576 -> 24 x 24)."""
        return square_grid(n_visual)
