"""Host-side position ids after the prompt, in numpy.

The exported prefill graph takes position ids as an input (the unpruned model's: routing
never renumbers positions); each family computes a prompt's own (`Family.host_positions`:
1-D `arange` for LLaVA, 3-D mRoPE for Qwen2.5-VL). Decoding continues from here.
"""

from __future__ import annotations

import numpy as np


def next_position(position_ids: np.ndarray) -> int:
    """Position of the first generated token: max over every row and slot, plus one.
    Decoding then continues +1 per token (in all three rows for mRoPE)."""
    return int(np.max(position_ids)) + 1
