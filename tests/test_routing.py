"""The eager Reroute reference against the HF model and against the spec (DESIGN.md 1)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import FAMILIES, sample_inputs, tiny
from reroute_export.plan import RoutingPlan, Stage, make_plan
from reroute_export.preprocess import load_image, samples
from reroute_export.families import families
from reroute_export.routing import RoutedModel, generate
from reroute_export.routing.select import top_k_ascending

ATOL = 1e-4


def routed(family: str, plan: RoutingPlan) -> RoutedModel:
    m = tiny(family)
    return RoutedModel(m.model, m.family, plan)


def plan_for(family: str, method: str, **kw) -> RoutingPlan:
    return make_plan(tiny(family).spec, method, **kw)


def hf_kwargs(family: str, inputs) -> dict:
    kw = {"input_ids": inputs.input_ids, "pixel_values": inputs.pixel_values, "attention_mask": inputs.attention_mask}
    if inputs.image_grid_thw is not None:
        kw["image_grid_thw"] = inputs.image_grid_thw
        kw["mm_token_type_ids"] = (inputs.input_ids == tiny(family).family.image_token_id(tiny(family).model)).int()
    return kw


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL, what: str = "") -> None:
    diff = (a - b).abs()
    print(f"{what}: max diff {diff.max().item():.3g}, mean {diff.mean().item():.3g}")
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def test_every_family_has_a_tiny_model() -> None:
    """A family registered without a tiny spec would go untested: fail instead."""
    from reroute_export.spec import known_specs

    for name, fam in families().items():
        assert fam.tiny_spec in known_specs(), f"family {name} has no tiny model spec"
    assert set(FAMILIES) == {"llava", "qwen2.5-vl"}


def test_none_matches_hf_forward_and_generate(family: str) -> None:
    m, inputs = tiny(family), sample_inputs(family)
    with torch.no_grad():
        ref = m.model(**hf_kwargs(family, inputs)).logits[:, -1].float()
        hf_ids = m.model.generate(**hf_kwargs(family, inputs), max_new_tokens=8, do_sample=False,
                                  min_new_tokens=8, eos_token_id=None, pad_token_id=0)
    pre, ids = generate(routed(family, plan_for(family, "none")), inputs, 8)
    assert_close(pre.logits, ref, 1e-5, "none vs HF last logits")
    assert ids.tolist() == hf_ids[:, inputs.input_ids.shape[1]:].tolist()


def test_first_decision_uses_the_models_own_attention(family: str) -> None:
    """Scores at d_0 equal the HF layer's eager attention weights (last row, head mean)."""
    m, inputs = tiny(family), sample_inputs(family)
    plan = plan_for(family, "fastv", budget=32)
    d, keep = plan.stages[0].layer, plan.stages[0].keep
    model = m.model
    old = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(**hf_kwargs(family, inputs), output_attentions=True)
    finally:
        model.set_attn_implementation(old)
    attn = out.attentions[d][:, :, -1].mean(1)  # (B, L): layer d, last query row
    vis = inputs.input_ids == m.family.image_token_id(model)
    expected = top_k_ascending(attn[vis].view(1, -1), keep)
    pre = routed(family, plan).prefill(inputs)
    assert pre.decisions[0].tolist() == expected.tolist()


def test_reroute_with_one_decision_equals_fastv(family: str) -> None:
    inputs = sample_inputs(family)
    fastv = plan_for(family, "fastv", budget=32)
    reroute = dataclasses.replace(fastv, method="reroute")
    a_pre, a_ids = generate(routed(family, fastv), inputs, 16)
    b_pre, b_ids = generate(routed(family, reroute), inputs, 16)
    assert [d.tolist() for d in a_pre.decisions] == [d.tolist() for d in b_pre.decisions]
    assert_close(a_pre.logits, b_pre.logits, 1e-6, "fastv vs reroute-1")
    assert a_ids.tolist() == b_ids.tolist()


def test_keep_everything_equals_none(family: str) -> None:
    inputs = sample_inputs(family)
    full = plan_for(family, "reroute", keep_ratios=[1.0] * 4)
    a_pre, a_ids = generate(routed(family, plan_for(family, "none")), inputs, 16)
    b_pre, b_ids = generate(routed(family, full), inputs, 16)
    assert_close(a_pre.logits, b_pre.logits, 1e-5, "none vs keep-all")
    assert a_ids.tolist() == b_ids.tolist()


def test_deferred_rows_are_unchanged_through_a_stage(family: str) -> None:
    inputs = sample_inputs(family)
    plan = plan_for(family, "reroute", budget=24)
    r = routed(family, plan)
    pre = r.prefill(inputs, keep_buffers=True)
    vis, _ = r._spans(inputs.input_ids)
    for s in range(len(plan.stages) - 1):
        before, after = pre.buffers[s][0], pre.buffers[s + 1][0]
        kept = set(pre.decisions[s][0].tolist())
        deferred = [j for j in range(plan.visual_tokens) if j not in kept]
        rows = vis[0, deferred]
        assert torch.equal(before[rows], after[rows]), f"deferred rows changed in stage {s}"
        moved = vis[0, sorted(kept)]
        assert not torch.equal(before[moved], after[moved]), "kept rows should have been processed"


def test_reroute_brings_tokens_back_and_pdrop_cannot(family: str) -> None:
    inputs = sample_inputs(family)
    re = routed(family, plan_for(family, "reroute", budget=24)).prefill(inputs).decisions
    pd = routed(family, plan_for(family, "pdrop", budget=24)).prefill(inputs).decisions
    for a, b in zip(pd, pd[1:]):
        assert set(b[0].tolist()) <= set(a[0].tolist()), "pdrop must be monotonic"
    came_back = [set(b[0].tolist()) - set(a[0].tolist()) for a, b in zip(re, re[1:])]
    assert any(came_back), "reroute never re-selected a deferred token on this input"


def test_kv_cache_lengths_follow_the_plan(family: str) -> None:
    inputs = sample_inputs(family)
    plan = plan_for(family, "reroute", budget=24)
    pre, ids = generate(routed(family, plan), inputs, 4)
    length, n = inputs.input_ids.shape[1], plan.visual_tokens
    prompt = [length - n + k for k in plan.keep_per_layer()]
    # after 4 greedy tokens, 3 have been fed back through every layer
    assert pre.cache.lengths() == [p + 3 for p in prompt]
    assert sum(prompt) < length * plan.num_layers


def test_batch_of_two_equals_each_alone(family: str) -> None:
    m = tiny(family)
    (p0, q0), (p1, q1) = samples()[0], samples()[1]
    images = [load_image(p0), load_image(p1)]
    batch = m.preprocessor(images, [q0, q1 + " Answer in one word."])  # different lengths: left padding
    assert batch.attention_mask is not None and not bool(batch.attention_mask.all())
    plan = plan_for(family, "reroute", budget=24)
    b_pre, b_ids = generate(routed(family, plan), batch, 8)
    for i, (img, q) in enumerate([(images[0], q0), (images[1], q1 + " Answer in one word.")]):
        solo = m.preprocessor([img], [q])
        s_pre, s_ids = generate(routed(family, plan), solo, 8)
        assert [d[i].tolist() for d in b_pre.decisions] == [d[0].tolist() for d in s_pre.decisions]
        assert_close(b_pre.logits[i], s_pre.logits[0], ATOL, f"batch row {i} vs alone")
        assert b_ids[i].tolist() == s_ids[0].tolist()


def test_ties_break_toward_the_lower_index() -> None:
    scores = torch.tensor([[0.1, 0.5, 0.5, 0.2, 0.5]])
    assert top_k_ascending(scores, 2).tolist() == [[1, 2]]
    assert top_k_ascending(scores, 3).tolist() == [[1, 2, 4]]


def test_plan_and_inputs_must_agree() -> None:
    from reroute_export.errors import UserError

    m, inputs = tiny("llava"), sample_inputs("llava")
    wrong = RoutingPlan("reroute", m.spec.text.num_layers, 10, (Stage(1, 5, 0.5),))
    with pytest.raises(UserError, match="image tokens"):
        RoutedModel(m.model, m.family, wrong).prefill(inputs)


def test_the_engine_passes_its_cache_by_the_name_the_installed_transformers_takes(family: str) -> None:
    """transformers 5.2x decoder layers take the KV cache as `cache`; earlier 5.x (5.17: the
    lent GPU's image) as `past_key_values`, and a layer given the other name caches nothing.
    A layer class with the older signature (forwarding to the installed one) must give the
    same prefill and greedy tokens."""
    import copy
    import inspect

    from reroute_export.errors import UserError
    from reroute_export.routing.engine import cache_keyword

    m, inputs = tiny(family), sample_inputs(family)
    plan = make_plan(m.spec, "reroute", budget=32)
    pre, ids = generate(RoutedModel(m.model, m.family, plan), inputs, 5)
    model = copy.deepcopy(m.model)
    layers = m.family.decoder(model).layers
    current = type(layers[0])
    installed = cache_keyword(layers[0])
    other = {"cache": "past_key_values", "past_key_values": "cache"}[installed]

    class OtherSignature(current):
        """The installed layer behind the other version's signature (the cache under `other`)."""

        def forward(self, hidden_states, attention_mask=None, position_ids=None, use_cache=False,
                    position_embeddings=None, **kwargs):
            kwargs[installed] = kwargs.pop(other, None)
            return current.forward(self, hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                   use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)

    OtherSignature.forward.__signature__ = inspect.Signature([
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("hidden_states", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        *(inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)
          for n in ("attention_mask", "position_ids", other, "use_cache", "position_embeddings")),
        inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)])
    for layer in layers:
        layer.__class__ = OtherSignature
    routed = RoutedModel(model, m.family, plan)
    assert routed.cache_kw == other
    old_pre, old_ids = generate(routed, inputs, 5)
    assert [d.tolist() for d in old_pre.decisions] == [d.tolist() for d in pre.decisions]
    torch.testing.assert_close(old_pre.logits, pre.logits, atol=1e-5, rtol=0)
    assert old_ids.tolist() == ids.tolist()

    class NoCache(torch.nn.Module):
        def forward(self, hidden_states, **kwargs):
            return hidden_states

    with pytest.raises(UserError, match="takes no KV cache argument"):
        cache_keyword(NoCache())
