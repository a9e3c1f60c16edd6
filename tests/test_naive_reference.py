"""A second, deliberately naive Reroute written from DESIGN.md 1, compared with the engine.

Differences on purpose: the full buffer is updated after EVERY layer (inactive rows
copied through) instead of compact sequences with write-back at decisions; scores come
from the full (L x L) attention matrix's last row; selection uses Python sorting.
"""

from __future__ import annotations

import torch

from conftest import sample_inputs, tiny
from reroute_export.plan import make_plan
from reroute_export.routing import RoutedModel


def naive_reroute(family: str, plan, inputs):
    m = tiny(family)
    model, fam = m.model, m.family
    dec = fam.decoder(model)
    ids = inputs.input_ids[0].tolist()
    image_id = fam.image_token_id(model)
    vis = [i for i, t in enumerate(ids) if t == image_id]
    text = [i for i, t in enumerate(ids) if t != image_id]
    with torch.no_grad():
        H = fam.embed(model, inputs)[0]  # (L, D)
        cos, sin = dec.rotary_emb(H[None], fam.positions(model, inputs))
        active = list(range(len(ids)))
        stages = {s.layer: s.keep for s in plan.stages}
        decisions = []
        for i, layer in enumerate(dec.layers):
            if i in stages:
                attn = layer.self_attn
                cfg = attn.config
                x = layer.input_layernorm(H)
                q = attn.q_proj(x).view(len(ids), cfg.num_attention_heads, -1).transpose(0, 1)
                k = attn.k_proj(x).view(len(ids), cfg.num_key_value_heads, -1).transpose(0, 1)
                c, s_ = cos[0], sin[0]
                rot = lambda t: t * c + torch.cat([-t[..., t.shape[-1] // 2:], t[..., : t.shape[-1] // 2]], -1) * s_
                q, k = rot(q), rot(k)
                k = k.repeat_interleave(cfg.num_attention_heads // cfg.num_key_value_heads, 0)
                full = torch.softmax((q @ k.transpose(1, 2)).float() / q.shape[-1] ** 0.5, -1)  # (h, L, L)
                score = full[:, -1].mean(0)  # last query row, mean over heads
                ranked = sorted(range(len(vis)), key=lambda j: (-score[vis[j]].item(), j))
                chosen = sorted(ranked[: stages[i]])
                decisions.append(chosen)
                active = sorted(text + [vis[j] for j in chosen])
            sub = H[active][None]  # (1, T, D)
            t = len(active)
            mask = torch.full((t, t), torch.finfo(H.dtype).min).triu(1)[None, None]
            out = layer(sub, attention_mask=mask, position_embeddings=(cos[:, active], sin[:, active]))
            H = H.clone()
            H[active] = out[0]  # inactive rows pass through unchanged
        logits = fam.lm_head(model)(dec.norm(H[-1]))
    return decisions, logits


def test_engine_matches_naive_reference(family: str) -> None:
    m, inputs = tiny(family), sample_inputs(family)
    for budget in (16, 24, 40):
        plan = make_plan(m.spec, "reroute", budget=budget)
        naive_dec, naive_logits = naive_reroute(family, plan, inputs)
        pre = RoutedModel(m.model, m.family, plan).prefill(inputs)
        assert [d[0].tolist() for d in pre.decisions] == naive_dec
        diff = (pre.logits[0] - naive_logits).abs().max().item()
        print(f"budget {budget}: max logit diff vs naive {diff:.3g}")
        assert diff < 1e-4
