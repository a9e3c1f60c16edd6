"""KV-cache traffic of one decode step, from the plan and the prompt length.

The deployable decoder (rewrite/segments.py) keeps one fixed buffer (1, nkv, M_s, hd) per
layer for K and for V, allocated once per run; a decode step writes one new row per layer
at past_length (runtime/segmented.Cache.write) and attention reads the buffer in place
(all M_s rows: the rows past past_length are masked, not skipped). The layout it replaced
(prefill.onnx + decode.onnx) concatenated past and new K/V in every step: per layer a copy
of the whole cache, reading its P rows and writing P + 1, for K and for V.

    row_i          = 2 * nkv * hd * elem_i                 (one K row and one V row of layer i)
    before (copy)  = sum_i (P_i + (P_i + 1)) * row_i       P_i: the prompt's cache rows of layer i's stage
    after (write)  = sum_i row_i
    after (read)   = sum_i M_s(i) * row_i                  the fixed buffers attention reads

P_s = plan.cache_tokens(L, 0) (L rows before the first decision, L - N + K_j after
decision j): the first decode step's cache, when the copy is cheapest. Attention reads the
cache in both layouts; the before layout read the P_i + 1 concatenated rows
(`before_attention_read_bytes`), the fixed buffers read M_s rows.
"""

from __future__ import annotations

from typing import Any, Sequence


def kv_traffic(plan: Any, num_kv_heads: int, head_dim: int, prompt_tokens: int,
               elem_bytes: int | Sequence[int], buffer_rows: Sequence[int], buffer_rows_from: str) -> dict[str, Any]:
    """Bytes of KV cache moved by one decode step after a prompt of `prompt_tokens` tokens,
    in the fixed-buffer layout (`buffer_rows` M_s per segment) and in the concat layout."""
    segments = plan.segments
    prompt_rows = plan.cache_tokens(prompt_tokens, 0)  # P_s per stage
    if len(buffer_rows) != len(segments):
        raise ValueError(f"{len(buffer_rows)} buffer lengths for {len(segments)} segments")
    layers = [(s, i) for s, r in enumerate(segments) for i in r]
    elems = [int(elem_bytes)] * len(layers) if isinstance(elem_bytes, int) else [int(e) for e in elem_bytes]
    rows = {i: 2 * num_kv_heads * head_dim * elems[i] for _, i in layers}  # one K row + one V row
    copy_read = sum(prompt_rows[s] * rows[i] for s, i in layers)
    copy_write = sum((prompt_rows[s] + 1) * rows[i] for s, i in layers)
    return {
        "prompt_tokens": int(prompt_tokens),
        "prompt_rows": [int(p) for p in prompt_rows],
        "buffer_rows": [int(m) for m in buffer_rows],
        "buffer_rows_from": buffer_rows_from,
        "elem_bytes": sorted(set(elems)),
        "before_copy_read_bytes": copy_read,
        "before_copy_write_bytes": copy_write,
        "before_copy_bytes": copy_read + copy_write,
        "before_attention_read_bytes": copy_write,  # attention over the P + 1 concatenated rows
        "after_write_bytes": sum(rows.values()),
        "after_read_bytes": sum(buffer_rows[s] * rows[i] for s, i in layers),
    }


def _decimal(n: float, units: Sequence[str] = ("B", "KB", "MB", "GB")) -> str:
    for unit in units:
        if abs(n) < 1000 or unit == units[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def traffic_line(method: str, t: dict[str, Any]) -> str:
    """`reroute: KV cache traffic removed: 25.70 MB/step → 524.29 KB/step ...`"""
    return (f"{method}: KV cache traffic removed: {_decimal(t['before_copy_bytes'])}/step (concat: copy of "
            f"{'/'.join(map(str, t['prompt_rows']))} rows per layer) → {_decimal(t['after_write_bytes'])}/step "
            f"(one new row per layer); attention reads {_decimal(t['after_read_bytes'])}/step of fixed buffers "
            f"({'/'.join(map(str, t['buffer_rows']))} rows, {t['buffer_rows_from']}) vs "
            f"{_decimal(t['before_attention_read_bytes'])}/step concatenated")
