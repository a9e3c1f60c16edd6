"""Calibration feeds with routing active: each graph observed on the feeds the ONNX Runtime
runtime itself builds for it (`OrtArtifact.recording`), served to the quantizers one at a time.

The vision graph sees the processed photos; the prefill graph the host embedding of
(prompt, fp32 image features) with the unpruned model's positions, the routing running
inside it; the decode graph real greedy steps whose `past.*` are the fp32 prefill's caches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

if TYPE_CHECKING:
    from ..runtime.ort import OrtArtifact


def calibration_feeds(art: OrtArtifact, inputs: list[Any], role: str,
                      decode_steps: int) -> Iterator[dict[str, np.ndarray]]:
    """Feeds for one graph, produced one at a time by running the fp32 artifact with the
    runtime's own host code (so a 7B decode step's caches are held once, not per sample)."""
    limit = int(art.shapes.get("max_new_tokens", decode_steps + 1))
    steps = min(decode_steps, max(0, limit - 1))
    eos = art.manifest.get("eos_token_id")
    for x in inputs:
        with art.recording(role) as sink:
            pre = art.prefill(x)  # vision graph + host embedding + routed prefill
        yield from sink
        if role != "decode":
            continue
        logits, kv = pre["logits"], pre["kv"]
        for step in range(steps):
            token = int(np.argmax(logits))
            if token == eos and step:  # as generate() stops; the first step always runs, so
                break                  # the decode graph sees every sample
            with art.recording("decode") as sink:
                logits, kv = art.decode_step(token, pre["next_position"] + step, kv)
            yield from sink


class FeedReader:
    """onnxruntime.quantization.CalibrationDataReader over a feed iterator (imported lazily)."""

    def __init__(self, feeds: Iterator[dict[str, np.ndarray]]) -> None:
        self.feeds, self.count = feeds, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        item = next(self.feeds, None)
        self.count += item is not None
        return item

    def __iter__(self) -> "FeedReader":  # the rest of the CalibrationDataReader protocol
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


class ListReader(FeedReader):
    """A rewindable reader over materialized feeds (ModelOpt reads the data more than once)."""

    def __init__(self, feeds: Iterator[dict[str, np.ndarray]]) -> None:
        self.items = list(feeds)
        super().__init__(iter(self.items))
        self.count = len(self.items)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)

    def get_first(self) -> dict[str, np.ndarray]:
        return self.items[0]

    def rewind(self) -> None:
        self.feeds = iter(self.items)
