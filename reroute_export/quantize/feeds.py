"""Calibration feeds with routing active: every graph observed on the feeds the ONNX Runtime
runtime itself builds for it, stored once, served to the quantizers one graph and one feed
at a time.

One pass over the calibration samples records every graph role at once: the vision graph
sees the processed photos; each segment.s and head.j sees the prefill's rows (the host
embedding of (prompt, fp32 image features) with the unpruned model's positions, then the
rows routing kept) *and* real greedy decode steps (one row against the fp32 prefill's KV
buffers), because prefill and decode run the very same segment and head graphs. The
routing graphs run while the others are observed (so after a decision only the kept visual
tokens reach a layer, and that is what its MatMuls see) but are not recorded: they are
never quantized (recipes.FLOAT_KINDS).

Each feed is written to disk the moment its graph is called (`FeedStore`), so memory holds
one feed, not every sample's. The moment matters: a feed holds the runtime's own arrays,
which it goes on writing in place (each stage's fixed KV buffers get the step's new rows
at `past_length` right after the call; reroute's write-back buffer, which head.j and
route.j read, gets the next stage's rows), so feeds kept by reference
(`OrtArtifact.recording`) would show later values. A `past.*` buffer is stored as its
valid rows (below `past_length`) when every row above is zero, and rebuilt on reading: the
feed read back is the one the graph received, bit for bit.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from .. import contract as C

if TYPE_CHECKING:
    from ..runtime.ort import OrtArtifact

_ROWS = "#rows"  # suffix of the stored full row count of a compacted past buffer


class FeedStore:
    """Each role's recorded feeds, one .npz file per feed under `folder/ROLE/`."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.counts: dict[str, int] = {}

    def add(self, role: str, feed: dict[str, np.ndarray]) -> None:
        n = self.counts.get(role, 0)
        path = self.folder / role / f"{n:06d}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            np.savez(f, **_compact(feed))
        self.counts[role] = n + 1

    def count(self, role: str) -> int:
        return self.counts.get(role, 0)

    def feeds(self, role: str) -> Iterator[dict[str, np.ndarray]]:
        """The role's feeds in the order they were recorded, read one at a time."""
        for n in range(self.count(role)):
            with np.load(self.folder / role / f"{n:06d}.npz") as z:
                yield _expand({k: z[k] for k in z.files})


def _compact(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """past.* buffers (1, nkv, M, hd) -> their first past_length rows, where the rest are zeros."""
    if C.PAST_LENGTH not in feed:
        return dict(feed)
    p = int(np.asarray(feed[C.PAST_LENGTH]).reshape(-1)[0])
    out: dict[str, np.ndarray] = {}
    for name, x in feed.items():
        if name.startswith("past.") and x.ndim == 4 and 0 <= p <= x.shape[2] and not x[:, :, p:].any():
            out[name] = np.ascontiguousarray(x[:, :, :p])
            out[name + _ROWS] = np.array(x.shape[2], dtype=np.int64)
        else:
            out[name] = x
    return out


def _expand(stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for name, x in stored.items():
        if name.endswith(_ROWS):
            continue
        if name + _ROWS in stored:
            full = np.zeros((*x.shape[:2], int(stored[name + _ROWS]), *x.shape[3:]), dtype=x.dtype)
            full[:, :, :x.shape[2]] = x
            x = full
        out[name] = x
    return out


class _Storing:
    """Stands in for one graph: stores each feed as the graph receives it (cast to its
    declared input types), then runs it."""

    def __init__(self, graph: Any, role: str, store: FeedStore) -> None:
        self.graph, self.role, self.store = graph, role, store

    def __getattr__(self, name: str) -> Any:
        return getattr(self.graph, name)

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.store.add(self.role, {n: np.ascontiguousarray(feeds[n], dtype=t)
                                   for n, t in self.graph.input_types.items() if n in feeds})
        return self.graph(feeds)  # a missing input is the graph's own error


@contextmanager
def _storing(art: OrtArtifact, roles: list[str], store: FeedStore) -> Iterator[None]:
    saved = {role: art.graphs[role] for role in roles}
    try:
        for role, graph in saved.items():
            art.graphs[role] = _Storing(graph, role, store)
        yield
    finally:
        art.graphs.update(saved)


def record_feeds(art: OrtArtifact, inputs: list[Any], roles: list[str], decode_steps: int,
                 store: FeedStore) -> dict[str, int]:
    """Run the fp32 artifact on every input (routed prefill, then up to `decode_steps` greedy
    steps) with the runtime's own host code, storing what each of `roles` receives.
    Returns how many prefills and decode steps ran."""
    limit = int(art.shapes.get("max_new_tokens", decode_steps + 1))
    steps = min(decode_steps, max(0, limit - 1))
    eos = art.manifest.get("eos_token_id")
    runs = {"prefill_runs": 0, "decode_steps": 0}
    with _storing(art, roles, store):
        for x in inputs:
            # vision graph + host embedding + routed prefill, KV buffers sized to this run as
            # generate() sizes them: the decode feeds are the ones generate() gives the graphs
            pre = art.prefill(x, steps + 1)
            runs["prefill_runs"] += 1
            logits, kv = pre["logits"], pre["kv"]
            for step in range(steps):
                token = int(np.argmax(logits))
                if token == eos and step:  # as generate() stops; the first step always runs, so
                    break                  # every segment and head sees a decode row of every sample
                logits, kv = art.decode_step(token, pre["next_position"] + step, kv)
                runs["decode_steps"] += 1
    return runs


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
