"""Routed prefill and decoding over the unmodified HF decoder layers (DESIGN.md section 1).

Prefill keeps a full buffer H (B, L, D) and a compact sequence h of the kept rows:

    layers 0 .. d_0-1        run on all L tokens
    at each decision d_s     H[kept] = h                   write back (deferred rows keep their state)
                             score on H (reroute: all N candidates)
                             or on h (delete: survivors only)
                             kept = sort(text ∪ top-K_s visual)
                             h = H[kept]                   compact, (B, L - N + K_s, D)
    layers of stage s        run on h with the kept rows' ORIGINAL rotary cos/sin

Physical delete (fastv, pdrop) is the same loop with candidates limited to the tokens
still present, so "reroute with one decision == fastv" holds by construction and is
tested. Decoding does no routing: each new token attends to every layer's own cache.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..families.base import Family
from ..plan import RoutingPlan
from .cache import RoutedKVCache
from .scoring import last_row_scores
from .select import gather_rows, kept_positions, scatter_rows, top_k_ascending


@dataclass
class Prefill:
    logits: torch.Tensor  # (B, V) at the last prompt position
    decisions: list[torch.Tensor]  # per stage: (B, K_s) ascending visual indices 0..N-1
    cache: RoutedKVCache
    next_position: torch.Tensor  # (B,) position id of the first generated token
    buffers: list[torch.Tensor] = field(default_factory=list)  # H at each decision, if asked


def cache_keyword(layer: nn.Module) -> str:
    """The keyword an HF decoder layer takes its KV cache by: `cache` in transformers 5.2x,
    `past_key_values` before (5.17, the lent GPU's image). A layer given the other name takes
    it into **kwargs and caches nothing, so the name is read off the layer's own signature."""
    params = inspect.signature(type(layer).forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise UserError(f"{type(layer).__name__}.forward takes no KV cache argument (neither `cache` nor "
                    "`past_key_values`): this transformers version is not supported")


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool (B, Q, K) -> additive (B, 1, Q, K): works for eager and sdpa attention."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(1)


def prefill_mask(key_ok: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Causal over the compact sequence (indices are sorted, so this is causal in
    original order), padding keys masked; the diagonal stays open so a padding query
    row never sees an all-masked softmax."""
    t, dev = key_ok.shape[1], key_ok.device
    causal = torch.ones(t, t, dtype=torch.bool, device=dev).tril()  # (T, T)
    allowed = (causal & key_ok[:, None, :]) | torch.eye(t, dtype=torch.bool, device=dev)  # (B, T, T)
    return additive_mask(allowed, dtype)


class RoutedModel:
    """An HF VLM plus a routing plan; the eager reference for every exported graph."""

    def __init__(self, model: nn.Module, family: type[Family], plan: RoutingPlan) -> None:
        self.model, self.family, self.plan = model, family, plan
        self.decoder = family.decoder(model)
        self.layers = list(self.decoder.layers)
        if len(self.layers) != plan.num_layers:
            raise UserError(f"plan is for {plan.num_layers} layers, the model has {len(self.layers)}")
        self.stage_at = {s.layer: i for i, s in enumerate(plan.stages)}
        self.cache_kw = cache_keyword(self.layers[0])

    # ------------------------------------------------------------ prefill

    def _spans(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence positions of visual (B, N) and text (B, L - N) tokens."""
        is_vis = ids == self.family.image_token_id(self.model)  # (B, L)
        counts = is_vis.sum(1)
        n = self.plan.visual_tokens
        if not bool((counts == n).all()):
            raise UserError(f"inputs hold {counts.tolist()} image tokens per sample; the plan is for {n}")
        b = ids.shape[0]
        vis = is_vis.nonzero()[:, 1].view(b, n)  # row-major: ascending per sample
        text = (~is_vis).nonzero()[:, 1].view(b, -1)
        return vis, text

    def _decide(self, stage: int, layer: nn.Module, H, h, kept, cos, sin, key_ok, vis_pos, text_pos):
        """Score, select K_s visual tokens, and return (selected, new kept positions)."""
        b, length = key_ok.shape
        # Reroute scores every token on the full buffer; delete only what is still there.
        seq = torch.arange(length, device=key_ok.device).expand(b, -1) if self.plan.recoverable else kept  # (B, T)
        x = H if self.plan.recoverable else h
        probs = last_row_scores(layer, x, gather_rows(cos, seq), gather_rows(sin, seq), key_ok.gather(1, seq))
        full = torch.full((b, length), float("-inf"), device=probs.device).scatter(1, seq, probs)  # (B, L)
        selected = top_k_ascending(full.gather(1, vis_pos), self.plan.stages[stage].keep)  # (B, K_s)
        return selected, kept_positions(text_pos, vis_pos, selected)

    @torch.no_grad()
    def prefill(self, inputs: Any, keep_buffers: bool = False) -> Prefill:
        ids = inputs.input_ids
        b, length = ids.shape
        vis_pos, text_pos = self._spans(ids)
        key_ok = (
            inputs.attention_mask.bool() if inputs.attention_mask is not None
            else torch.ones(b, length, dtype=torch.bool, device=ids.device)
        )
        H = self.family.embed(self.model, inputs)  # (B, L, D)
        positions = self.family.positions(self.model, inputs)  # (B, L) or (3, B, L)
        cos, sin = self.decoder.rotary_emb(H, positions)  # (B, L, hd) each
        cache = RoutedKVCache(len(self.layers))
        kept = torch.arange(length, device=ids.device).expand(b, -1)  # (B, T) positions of the compact rows
        h, decisions, buffers = H, [], []
        mask = prefill_mask(key_ok, H.dtype)
        for i, layer in enumerate(self.layers):
            if i in self.stage_at:
                H = scatter_rows(H, kept, h)  # write back; deferred rows keep their state
                if keep_buffers:
                    buffers.append(H.clone())
                selected, kept = self._decide(self.stage_at[i], layer, H, h, kept, cos, sin, key_ok, vis_pos, text_pos)
                decisions.append(selected)
                h = gather_rows(H, kept)  # (B, L - N + K_s, D)
                mask = prefill_mask(key_ok.gather(1, kept), H.dtype)
            cache.key_ok[i] = key_ok.gather(1, kept)
            h = layer(h, attention_mask=mask, position_embeddings=(gather_rows(cos, kept), gather_rows(sin, kept)),
                      use_cache=True, **{self.cache_kw: cache})
        logits = self.family.lm_head(self.model)(self.decoder.norm(h[:, -1]))  # (B, V)
        next_pos = positions.reshape(-1, b, length).amax(dim=(0, 2)) + 1  # (B,)
        return Prefill(logits.float(), decisions, cache, next_pos, buffers)

    # ------------------------------------------------------------ decoding

    def _decode_positions(self, pos: torch.Tensor) -> torch.Tensor:
        """(B,) -> the layout the rotary module wants for one new token."""
        p = pos.view(-1, 1)  # (B, 1)
        return p.unsqueeze(0).expand(3, -1, -1) if self.family.position_dims == 3 else p

    @torch.no_grad()
    def decode_step(self, token: torch.Tensor, position: torch.Tensor, cache: RoutedKVCache) -> torch.Tensor:
        """One new token (B,) at position (B,) through every layer: logits (B, V)."""
        x = self.decoder.embed_tokens(token.view(-1, 1))  # (B, 1, D)
        cos, sin = self.decoder.rotary_emb(x, self._decode_positions(position))
        for i, layer in enumerate(self.layers):
            ok = torch.cat([cache.key_ok[i], torch.ones_like(cache.key_ok[i][:, :1])], dim=1)  # (B, T_i + 1)
            cache.key_ok[i] = ok
            mask = additive_mask(ok[:, None, :], x.dtype)  # (B, 1, 1, T_i + 1)
            x = layer(x, attention_mask=mask, position_embeddings=(cos, sin), use_cache=True, **{self.cache_kw: cache})
        return self.family.lm_head(self.model)(self.decoder.norm(x[:, -1])).float()


@torch.no_grad()
def generate(
    routed: RoutedModel, inputs: Any, max_new_tokens: int, eos_token_id: int | None = None
) -> tuple[Prefill, torch.Tensor]:
    """Greedy decoding. Returns the prefill result and (B, T_new) new token ids; a
    sample that emitted EOS keeps emitting it while the others finish."""
    pre = routed.prefill(inputs)
    logits, pos = pre.logits, pre.next_position.clone()
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    out = []
    for step in range(max_new_tokens):
        token = logits.argmax(-1)  # (B,)
        if eos_token_id is not None:
            token = torch.where(done, torch.full_like(token, eos_token_id), token)
            done |= token == eos_token_id
        out.append(token)
        if step + 1 == max_new_tokens or bool(done.all()):
            break
        logits = routed.decode_step(token, pos, pre.cache)
        pos = pos + 1
    ids = torch.stack(out, dim=1) if out else torch.zeros(logits.shape[0], 0, dtype=torch.long, device=logits.device)
    return pre, ids
