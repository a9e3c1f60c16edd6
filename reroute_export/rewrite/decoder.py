"""Static-shape rerouted decoders: `model -> module` rewrites for export (HF model untouched).

`static_prefill(model, family, plan)` and `static_decode(model, family, plan)` wrap the
model's own decoder layers; every shape is fixed by the plan (N, K_s) and the text
length, which stays a free (symbolic) axis. Prefill and decode are separate graphs.
They are the eager engine's algorithm with two export-friendly changes, both tested for
equivalence against it (tests/test_rewrite.py):

- visual tokens are one contiguous block starting at `visual_start` (one image per
  prompt), so kept positions come from arithmetic, not from a data-dependent search;
- physical delete scores the compact sequence directly (its visual block is contiguous
  too), reroute scores the full buffer after write-back, exactly as in the engine.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..families.base import Family
from ..plan import RoutingPlan
from ..routing.scoring import last_row_scores
from ..routing.select import gather_rows
from . import ops


class _OneLayerCache:
    """Duck-typed cache for one layer: remembers this call's K/V (prefill) or appends to
    the given past (decode). HF attention only calls `update`."""

    def __init__(self, past: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.past = past
        self.kv: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.past is not None:
            k = torch.cat([self.past[0], k], dim=2)  # (B, nkv, P + 1, hd)
            v = torch.cat([self.past[1], v], dim=2)
        self.kv = (k, v)
        return k, v


def causal_mask(length_like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(1, 1, T, T) additive causal mask from Range/compare ops (no Trilu needed)."""
    i = torch.arange(length_like.shape[1], device=length_like.device)
    future = i.view(1, -1) > i.view(-1, 1)  # (T, T)
    mask = torch.zeros(future.shape, dtype=dtype, device=future.device).masked_fill(future, torch.finfo(dtype).min)
    return mask[None, None]


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Reversible patch: plain matmul/softmax attention while exporting.

    Avoids sdpa's GQA packing and `is_causal` SymBool branch under torch.export
    (transformers' own TODO in integrations/sdpa_attention.py), and gives TensorRT the
    MatMul-Softmax-MatMul pattern its MHA fusion recognises.
    """
    old = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(old)


class StaticPrefill(nn.Module):
    """(inputs_embeds (1, L, D), position_ids, visual_start (1,)) -> logits, KV per layer, decisions."""

    def __init__(self, model: nn.Module, family: type[Family], plan: RoutingPlan) -> None:
        super().__init__()
        self.decoder = family.decoder(model)
        self.lm_head = family.lm_head(model)
        self.plan = plan
        self.stage_at = {s.layer: i for i, s in enumerate(plan.stages)}

    def _decide(self, stage: int, layer: nn.Module, x, cos, sin, visual_start, m: int, cand):
        """Score x's last row, keep K_s of its visual block [vs, vs + m)."""
        b = x.shape[0]
        ok = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)  # batch 1, no padding
        probs = last_row_scores(layer, x, cos, sin, ok)  # (B, T) float32
        local = ops.select_visual(probs, visual_start, m, self.plan.stages[stage].keep)  # (B, K)
        chosen = local if cand is None else cand.gather(1, local)  # original visual indices
        rows, idx = ops.route_gather(x, local, visual_start, m)  # (B, T', D), (B, T')
        return chosen.view(b, -1), rows, idx

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, visual_start: torch.Tensor):
        n = self.plan.visual_tokens
        cos, sin = self.decoder.rotary_emb(inputs_embeds, position_ids)  # (B, L, hd)
        H = h = inputs_embeds
        h_cos, h_sin, idx, cand, m = cos, sin, None, None, n
        presents, decisions = [], []
        mask = causal_mask(h, h.dtype)
        for i, layer in enumerate(self.decoder.layers):
            if i in self.stage_at:
                if self.plan.recoverable:  # write back, score all N on the full buffer
                    H = h if idx is None else ops.route_scatter(H, h, idx)  # before d_0, h is full
                    x, x_cos, x_sin, m, cand = H, cos, sin, n, None
                else:  # delete: candidates are the survivors, block still contiguous
                    x, x_cos, x_sin = h, h_cos, h_sin
                chosen, h, idx = self._decide(self.stage_at[i], layer, x, x_cos, x_sin, visual_start, m, cand)
                h_cos, h_sin = gather_rows(x_cos, idx), gather_rows(x_sin, idx)
                decisions.append(chosen)
                cand, m = chosen, chosen.shape[1]
                mask = causal_mask(h, h.dtype)
            cache = _OneLayerCache()
            h = layer(h, attention_mask=mask, position_embeddings=(h_cos, h_sin), cache=cache, use_cache=True)
            presents.extend(cache.kv)
        logits = self.lm_head(self.decoder.norm(h[:, -1])).float()  # (B, V)
        return (logits, *presents, *decisions)


class StaticDecode(nn.Module):
    """(inputs_embeds (1, 1, D), position_ids, past k/v per layer) -> logits, present k/v."""

    def __init__(self, model: nn.Module, family: type[Family], plan: RoutingPlan) -> None:
        super().__init__()
        self.decoder = family.decoder(model)
        self.lm_head = family.lm_head(model)
        self.num_layers = plan.num_layers

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor):
        cos, sin = self.decoder.rotary_emb(inputs_embeds, position_ids)  # (B, 1, hd)
        x, presents = inputs_embeds, []
        for i, layer in enumerate(self.decoder.layers):
            cache = _OneLayerCache((past[2 * i], past[2 * i + 1]))
            # one query row attends to its whole cache: no mask
            x = layer(x, attention_mask=None, position_embeddings=(cos, sin), cache=cache, use_cache=True)
            presents.extend(cache.kv)
        return (self.lm_head(self.decoder.norm(x[:, -1])).float(), *presents)


def static_prefill(model: nn.Module, family: type[Family], plan: RoutingPlan) -> StaticPrefill:
    return StaticPrefill(model, family, plan).eval()


def static_decode(model: nn.Module, family: type[Family], plan: RoutingPlan) -> StaticDecode:
    return StaticDecode(model, family, plan).eval()
