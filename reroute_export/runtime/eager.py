"""The eager reference as a runtime: the routing engine (`routing.RoutedModel`) on the HF model.

Every exported graph is checked against this backend ("torch" in bench records). `trace`
is `routing.generate` itself; `bind` builds the input's embeddings (image features written
into the image-token slots) once, so that a run's `prefill` is the decoder alone.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from ..inputs import ArrayInputs
from ..plan import RoutingPlan
from ..results import TraceResult
from ..routing import RoutedModel, generate
from .base import State

if TYPE_CHECKING:
    from ..families.base import Family
    from ..preprocess import VLInputs
    from ..registry import Loaded


def torch_inputs(inputs: Any) -> VLInputs:
    """Model inputs as torch tensors: an artifact's numpy ones are converted, torch ones kept."""
    return inputs.to_torch() if isinstance(inputs, ArrayInputs) else inputs


class TorchRuntime:
    """What the torch backends share: a loaded model (on its device, in its dtype) and a plan."""

    backend = "torch"

    def __init__(self, loaded: Loaded, plan: RoutingPlan) -> None:
        self.loaded, self.plan = loaded, plan

    @property
    def eos_token_id(self) -> int | None:
        return getattr(self.loaded.preprocessor.tokenizer, "eos_token_id", None)

    def prepare(self, image: Any, prompt: str) -> VLInputs:
        return self.loaded.preprocessor([image], [prompt])

    def close(self) -> None:
        """The model is the caller's (shared by every runtime made from it): nothing to release."""


class TorchRun:
    """What the torch runs share: the inputs on the model's device, the vision tower alone."""

    def __init__(self, loaded: Loaded, inputs: VLInputs) -> None:
        self.loaded, self.inputs = loaded, inputs
        self.cuda = inputs.input_ids.device.type == "cuda"
        self.details: dict[str, Any] = {}

    def sync(self) -> None:
        if self.cuda:  # kernels run asynchronously: a clock read without this times the launch
            torch.cuda.synchronize()

    def vision(self) -> torch.Tensor:
        with torch.no_grad():
            return self.loaded.family.image_features(self.loaded.model, self.inputs)  # (N, D)

    def close(self) -> None:
        """Nothing held beyond what garbage collection frees."""


class EagerRuntime(TorchRuntime):
    """The routing engine on the HF modules: `routing.generate` for `trace`."""

    def __init__(self, loaded: Loaded, plan: RoutingPlan) -> None:
        super().__init__(loaded, plan)
        self.routed = RoutedModel(loaded.model, loaded.family, plan)

    def bind(self, inputs: Any) -> EagerRun:
        return EagerRun(self.loaded, self.plan, torch_inputs(inputs))

    def trace(self, inputs: Any, max_new_tokens: int = 16) -> TraceResult:
        pre, new_ids = generate(self.routed, torch_inputs(inputs), max_new_tokens, eos_token_id=self.eos_token_id)
        decisions = {str(s.layer): d[0].tolist() for s, d in zip(self.plan.stages, pre.decisions)}
        ids = new_ids[0].tolist()
        return TraceResult(decisions, pre.logits[0].tolist(), ids, self.loaded.preprocessor.decode(ids), self.plan)


class ArtifactReference(TorchRuntime):
    """The eager reference for an artifact: each input runs with the plan the artifact runs it
    with (`art.plan_for`: a Qwen2.5-VL artifact's image-size buckets each have their own N and
    K_j), so that an image of any size the artifact takes is compared like for like."""

    def __init__(self, loaded: Loaded, art: Any) -> None:
        super().__init__(loaded, art.plan)
        self.plan_for = art.plan_for
        self.per_plan: dict[RoutingPlan, EagerRuntime] = {}

    def runtime_for(self, inputs: Any) -> EagerRuntime:
        plan = self.plan_for(inputs)
        if plan not in self.per_plan:
            self.per_plan[plan] = EagerRuntime(self.loaded, plan)
        return self.per_plan[plan]

    def bind(self, inputs: Any) -> EagerRun:
        return self.runtime_for(inputs).bind(inputs)

    def trace(self, inputs: Any, max_new_tokens: int = 16) -> TraceResult:
        return self.runtime_for(inputs).trace(inputs, max_new_tokens)


def _embedded(family: type[Family], embeds: torch.Tensor) -> type[Family]:
    """The family with `embed` answering these precomputed embeddings (B, L, D)."""

    class Embedded(family):  # type: ignore[misc, valid-type]
        @classmethod
        def embed(cls, model: Any, inputs: Any) -> torch.Tensor:
            return embeds

    return Embedded


class EagerRun(TorchRun):
    """One input through `RoutedModel.prefill` / `decode_step`, its embeddings built once."""

    def __init__(self, loaded: Loaded, plan: RoutingPlan, inputs: VLInputs) -> None:
        super().__init__(loaded, inputs)
        with torch.no_grad():
            embeds = loaded.family.embed(loaded.model, inputs)  # (1, L, D): built once, outside any timer
        self.routed = RoutedModel(loaded.model, _embedded(loaded.family, embeds), plan)

    def prefill(self) -> State:
        pre = self.routed.prefill(self.inputs)
        return State(pre.logits, pre.cache, pre.decisions, pre.next_position.clone())  # logits (1, V)

    def decode(self, state: State, step: int) -> State:
        token = state.logits.argmax(-1)  # (1,), on the device: no host round trip
        logits = self.routed.decode_step(token, state.next_position + step, state.kv)
        return replace(state, logits=logits)
