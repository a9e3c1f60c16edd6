"""Attention with the KV write inside the graph: one torch op, lowered per target after export.

The portable segment (rewrite/segments.py `attend`) returns each layer's new K/V rows and
the host writes them into the fixed buffer. Runtimes with a fused path want the write and
the attention in one node over a buffer they update in place:

    ort-gqa     com.microsoft GroupQueryAttention, past and present bound to one buffer,
                seqlens_k = past_length + T - 1 (ONNX Runtime CPU and CUDA)
    kv-scatter  TensorScatter-24 (the write) + Attention-24 (boolean mask), opset 24: the
                standard ops that TensorRT 11 maps to IKVCacheUpdateLayer / IAttention

In the traced segment both are this one op, `reroute::cached_attention`; export replaces the
node with the form's ops (export/attention.py). Its torch body is the reference both lowerings
are tested against, and what torch code runs when it calls a fused-form Program.

    q (1, T, nh*hd), k/v (1, T, nkv*hd)  roped q and k, v as projected
    past_k/past_v (1, nkv, M, hd)        the layer's buffer, rows [0, past_length) valid
    -> out (1, T, nh*hd), present_k/present_v (1, nkv, M, hd) with rows [p, p + T) written
"""

from __future__ import annotations

import torch

# A contract-level table (contract.ATTENTION_FORMS) names the forms; this op serves the in-graph ones.


@torch.library.custom_op("reroute::cached_attention", mutates_args=())
def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor,
                     past_v: torch.Tensor, past_length: torch.Tensor, num_heads: int, kv_heads: int,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _cached(q, k, v, past_k, past_v, past_length, num_heads, kv_heads, scale)


@torch.library.custom_op("reroute::cached_attention_rope", mutates_args=())
def cached_attention_rope(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor,
                          past_v: torch.Tensor, past_length: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          num_heads: int, kv_heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """cached_attention with the rotary inside: q and k as projected (pre-rope), cos/sin (1, T, hd)
    each row's own (the model's rotary module on the routed positions, halves duplicated).
    ort-gqa lowers it to GroupQueryAttention's own rotary (do_rotary), fed those rows as its
    cos/sin cache, so the per-layer Split/Neg/Concat/Mul/Add of rotate_half leave the graph."""
    from ..routing.scoring import apply_rope

    b, t, _ = q.shape
    hd = past_k.shape[-1]
    q = apply_rope(q.view(b, t, num_heads, hd).transpose(1, 2), cos, sin).transpose(1, 2).reshape(b, t, num_heads * hd)
    k = apply_rope(k.view(b, t, kv_heads, hd).transpose(1, 2), cos, sin).transpose(1, 2).reshape(b, t, kv_heads * hd)
    return _cached(q, k, v, past_k, past_v, past_length, num_heads, kv_heads, scale)


def _cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
            past_length: torch.Tensor, num_heads: int, kv_heads: int,
            scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, t, _ = q.shape
    hd = past_k.shape[-1]
    g = num_heads // kv_heads
    p = int(past_length.reshape(()).item())
    kh = k.view(b, t, kv_heads, hd).transpose(1, 2)  # (1, nkv, T, hd)
    vh = v.view(b, t, kv_heads, hd).transpose(1, 2)
    present_k, present_v = past_k.clone(), past_v.clone()
    present_k[:, :, p:p + t] = kh
    present_v[:, :, p:p + t] = vh
    qg = q.view(b, t, kv_heads, g, hd).permute(0, 2, 3, 1, 4)  # (1, nkv, g, T, hd)
    scores = (qg @ present_k.unsqueeze(2).transpose(-1, -2)) * scale  # (1, nkv, g, T, M)
    cols = torch.arange(past_k.shape[2], device=q.device).view(1, -1)
    rows = (p + torch.arange(t, device=q.device)).view(-1, 1)
    scores = scores.masked_fill(cols > rows, torch.finfo(q.dtype).min)  # causal over absolute positions
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)  # as HF eager attention
    out = probs @ present_v.unsqueeze(2)  # (1, nkv, g, T, hd)
    return out.permute(0, 3, 1, 2, 4).reshape(b, t, num_heads * hd), present_k, present_v


@cached_attention.register_fake
def _(q, k, v, past_k, past_v, past_length, num_heads, kv_heads, scale):
    return q.new_empty(q.shape), past_k.new_empty(past_k.shape), past_v.new_empty(past_v.shape)


@cached_attention_rope.register_fake
def _(q, k, v, past_k, past_v, past_length, cos, sin, num_heads, kv_heads, scale):
    return q.new_empty(q.shape), past_k.new_empty(past_k.shape), past_v.new_empty(past_v.shape)
