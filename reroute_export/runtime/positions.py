"""Host-side position ids in numpy, identical to the HF models' own.

The exported prefill graph takes position ids as an input (the unpruned model's: routing
never renumbers positions), so the runtime must reproduce each family's rule without
torch or the HF model: 1-D `arange` for LLaVA, 3-D mRoPE for Qwen2.5-VL.
"""

from __future__ import annotations

import numpy as np


def llava_positions(length: int) -> np.ndarray:
    """(1, L) int64: 0..L-1 (batch 1, no padding)."""
    return np.arange(length, dtype=np.int64)[None, :]


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


def next_position(position_ids: np.ndarray) -> int:
    """Position of the first generated token: max over every row and slot, plus one.
    Decoding then continues +1 per token (in all three rows for mRoPE)."""
    return int(np.max(position_ids)) + 1
