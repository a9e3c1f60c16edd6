"""Visual-token importance at a decision layer, from the last query row only.

score_j = mean_h softmax_j(q_last,h . k_j,h * head_dim^-0.5), with q and k taken from
the decision layer's own input_layernorm / q_proj / k_proj and rotated with the tokens'
ORIGINAL position ids. Only one query row is computed: O(L * d), not O(L^2).
"""

from __future__ import annotations

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, hd); cos/sin: (B, T, hd) as produced by the model's rotary module."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def last_row_scores(
    layer: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_ok: torch.Tensor
) -> torch.Tensor:
    """Head-averaged attention of the last position over all T keys: (B, T) float32.

    h: (B, T, D) the layer's input; cos/sin: (B, T, hd); key_ok: (B, T) bool, False on
    padding (excluded from the softmax).
    """
    attn = layer.self_attn
    cfg = attn.config
    x = layer.input_layernorm(h)  # (B, T, D)
    q, k = attn.q_proj(x[:, -1:]), attn.k_proj(x)  # (B, 1, nh*hd), (B, T, nkv*hd)
    return scores_from_qk(q, k, cos, sin, key_ok, cfg.num_attention_heads, cfg.num_key_value_heads, attn.head_dim)


def scores_from_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_ok: torch.Tensor,
                   nh: int, nkv: int, hd: int) -> torch.Tensor:
    """The score from projected rows: q (B, 1, nh*hd) of the last position, k (B, T, nkv*hd)
    of every position, both pre-rope; cos/sin (B, T, hd). (B, T) float32. The exported
    routing graph (rewrite/segments.Route) calls this very function."""
    b, t, _ = k.shape
    q = q.view(b, 1, nh, hd).transpose(1, 2)  # (B, nh, 1, hd)
    k = k.view(b, t, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
    q = apply_rope(q, cos[:, -1:], sin[:, -1:])
    k = apply_rope(k, cos, sin).repeat_interleave(nh // nkv, dim=1)  # (B, nh, T, hd)
    logits = (q.float() @ k.float().transpose(-1, -2)) * hd**-0.5  # (B, nh, 1, T)
    logits = logits.masked_fill(~key_ok[:, None, None, :], float("-inf"))
    return logits.softmax(dim=-1).mean(dim=1)[:, 0]  # (B, T)
