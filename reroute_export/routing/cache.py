"""A KV cache whose length differs per layer (DESIGN.md 1, "KV cache and decoding").

Each layer caches K/V for exactly the tokens it processed in prefill: L before the
first decision, L - N + K_s in stage s. HF attention modules only call `update`, so
this duck-typed cache plugs into the unmodified HF decoder layers.
"""

from __future__ import annotations

import torch


class RoutedKVCache:
    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers  # (B, nkv, T_l, hd)
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.key_ok: list[torch.Tensor | None] = [None] * num_layers  # (B, T_l) bool, False = padding

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.keys[layer_idx] is not None:
            k = torch.cat([self.keys[layer_idx], k], dim=2)
            v = torch.cat([self.values[layer_idx], v], dim=2)
        self.keys[layer_idx], self.values[layer_idx] = k, v
        return k, v

    def lengths(self) -> list[int]:
        """Cached entries per layer."""
        return [0 if k is None else k.shape[2] for k in self.keys]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths()[layer_idx]
