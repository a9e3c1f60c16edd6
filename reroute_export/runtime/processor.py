"""An artifact's preprocessor/ folder run with numpy, Pillow and `tokenizers` only.

`preprocess.Preprocessor` re-does LlavaProcessor / Qwen2_5_VLProcessor with transformers;
this does the same from the files it saved, without torch or transformers, so an artifact
runs on a runtime-only install. Text: the family's template, the image placeholder
expanded to one token per visual feature, tokenized by `tokenizer.json` itself, which
holds the live tokenizer's post-processor (transformers saves its backend tokenizer as
is, so LLaVA's BOS is already in its template: nothing to add here). Images: the
family's host recipe (`Family.host_images`). tests/test_runtime_torchfree.py holds ids,
pixels, grids and decoded text equal to Preprocessor's.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import PIL.Image
from tokenizers import Tokenizer

from ..errors import UserError
from ..families.host import read_json, to_rgb
from ..inputs import ArrayInputs
from ..preprocess import SETTINGS_FILE  # preprocess imports torch/transformers only to make a Preprocessor
from ..families import get_family

if TYPE_CHECKING:
    from ..families.base import Family
    from ..families.host import ImageRecipe

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"

# transformers' clean_up_tokenization: applied on decode only when asked, and never to BPE
# models (TokenizersBackend._decode skips it there: it would eat real spaces).
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class ArtifactProcessor:
    """(image, prompt) -> `ArrayInputs`, and generated ids -> text, for one artifact."""

    def __init__(self, family: type[Family], tokenizer: Tokenizer, images: ImageRecipe,
                 clean_up: bool = False) -> None:
        self.family = family
        self.tokenizer = tokenizer
        self.images = images
        self.clean_up = clean_up and type(tokenizer.model).__name__ != "BPE"
        self.image_token_id = _token_id(tokenizer, family.image_token)
        self.video_token_id = _token_id(tokenizer, family.video_token) if family.video_token else None

    @classmethod
    def load(cls, folder: Path, family: str) -> ArtifactProcessor:
        folder = Path(folder)
        if not (folder / TOKENIZER_FILE).is_file():
            raise UserError(f"{folder} has no {TOKENIZER_FILE}: re-export the artifact")
        tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
        config = read_json(folder / TOKENIZER_CONFIG)
        # transformers' call: no truncation, padding to the longest (a no-op for one prompt),
        # special tokens in the text matched unless split_special_tokens
        tokenizer.no_truncation()
        tokenizer.no_padding()
        tokenizer.encode_special_tokens = bool(config.get("split_special_tokens", False))
        fam = get_family(family)
        images = fam.host_images(folder, read_json(folder / SETTINGS_FILE))
        return cls(fam, tokenizer, images, bool(config.get("clean_up_tokenization_spaces", False)))

    def render(self, prompt: str) -> str:
        """The templated prompt with the (unexpanded) image placeholder."""
        return self.family.prompt_template.replace("{prompt}", prompt)

    def __call__(self, image: PIL.Image.Image, prompt: str) -> ArrayInputs:
        """One image and prompt -> batch-1 inputs, as Preprocessor([image], [prompt])."""
        token = self.family.image_token
        if token in prompt:
            raise UserError(f"the prompt must not contain the image placeholder {token}")
        pixels = self.images(to_rgb(image))  # Preprocessor converts first, then the processor
        text = self.render(prompt).replace(token, token * pixels.tokens, 1)
        ids = np.array([self.tokenizer.encode(text).ids], dtype=np.int64)  # (1, L); default special tokens
        found = int((ids == self.image_token_id).sum())
        if found != pixels.tokens:  # a tokenizer that splits or merges the placeholder
            raise RuntimeError(f"image token expansion mismatch: expected {pixels.tokens}, tokenized {found}")
        return ArrayInputs(ids, pixels.pixel_values, np.ones_like(ids), pixels.image_grid_thw,
                           self._token_types(ids))

    def _token_types(self, ids: np.ndarray) -> np.ndarray | None:
        """(1, L) 0 text, 1 image, 2 video, for families whose forward takes them."""
        if not self.family.mm_token_types:
            return None
        types = (ids == self.image_token_id).astype(np.int64)
        if self.video_token_id is not None:
            types += 2 * (ids == self.video_token_id)
        return types

    def decode(self, ids: Any) -> str:
        """Generated ids -> text without special tokens (BOS/EOS/pad/image), as transformers'."""
        text = self.tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=True)
        if self.clean_up:
            for a, b in _CLEAN_UP:
                text = text.replace(a, b)
        return text


class TextStream:
    """Generated text while it is generated: `push(token)` gives the text that no later token
    can change, `finish()` the rest; the pieces joined are `decode(all tokens)`. The last word
    is held back: the clean-up rules above and a character split over byte tokens change it."""

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self.decode, self.ids, self.shown = decode, [], ""

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.decode(self.ids)
        safe = text[:max(text.rfind(" "), text.rfind("\n"), 0)]
        if "\ufffd" in safe or not safe.startswith(self.shown):
            return ""
        piece, self.shown = safe[len(self.shown):], safe
        return piece

    def finish(self) -> str:
        text = self.decode(self.ids)
        if not text.startswith(self.shown):  # no tokenizer of ours does this: say so rather than garble
            return f"\n(the text above was shown too early; in full:)\n{text}"
        return text[len(self.shown):]


def _token_id(tokenizer: Tokenizer, token: str) -> int:
    """Id of a special token that must be one vocabulary entry (transformers' convert_tokens_to_ids)."""
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise UserError(f"tokenizer has no {token} token")
    return int(token_id)
