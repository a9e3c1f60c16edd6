"""Model inputs as numpy arrays: what the artifact runtime takes, with no torch anywhere.

`ArrayInputs` has the fields (and layouts) of `preprocess.VLInputs`, the HF processor's
outputs, held as numpy arrays; the torch side gets a `VLInputs` from it with `to_torch()`.
`load_npy_inputs` reads processor outputs saved as .npy (`--input-ids/--pixel-values
[/--image-grid-thw]`) with one-line errors.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import numpy as np

from .errors import UserError

if TYPE_CHECKING:
    from .preprocess import VLInputs


@dataclass
class ArrayInputs:
    """One prompt's model inputs in numpy, laid out as the HF processor's."""

    input_ids: np.ndarray  # (B, L) int64
    pixel_values: np.ndarray  # float32; LLaVA (B, 3, H, W), Qwen2.5-VL (num_patches, C*T*P*P)
    attention_mask: np.ndarray | None = None  # (B, L) int64, 1 = real token
    image_grid_thw: np.ndarray | None = None  # (num_images, 3) int64, Qwen2.5-VL only
    mm_token_type_ids: np.ndarray | None = None  # (B, L) int64: 0 text, 1 image, 2 video (Qwen2.5-VL)

    def to_torch(self) -> VLInputs:
        """The same inputs as torch tensors (`VLInputs`), for the eager reference."""
        import torch

        from .preprocess import VLInputs

        arrays = {f.name: getattr(self, f.name) for f in fields(self)}
        return VLInputs(**{k: None if v is None else torch.from_numpy(np.ascontiguousarray(v))
                           for k, v in arrays.items()})


def _load_npy(path: str, what: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"{what} file not found: {path}") from None
    except (ValueError, OSError) as e:
        raise UserError(f"{what} is not a .npy array: {path} ({e})") from None


def load_npy_inputs(input_ids: str, pixel_values: str, image_grid_thw: str | None) -> ArrayInputs:
    """Processor outputs saved as .npy -> ArrayInputs (int64 ids (1, L), float32 pixels)."""
    ids = _load_npy(input_ids, "--input-ids")
    if ids.ndim != 2 or ids.shape[0] != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise UserError(f"--input-ids must be an integer array of shape [1, L], got {ids.dtype} {list(ids.shape)}")
    pv = _load_npy(pixel_values, "--pixel-values")
    if not np.issubdtype(pv.dtype, np.floating):
        raise UserError(f"--pixel-values must be a float array, got {pv.dtype}")
    grid = None
    if image_grid_thw is not None:
        grid = _load_npy(image_grid_thw, "--image-grid-thw")
        if grid.ndim != 2 or grid.shape[1] != 3:
            raise UserError(f"--image-grid-thw must have shape [num_images, 3], got {list(grid.shape)}")
        grid = grid.astype(np.int64)
    return ArrayInputs(ids.astype(np.int64), pv.astype(np.float32), image_grid_thw=grid)
