"""`parity --layers`: where an artifact drifts, decoder layer by decoder layer.

Per input, the eager fp32 reference and the artifact run the same routed prefill and the
first decode steps; each side records, per decoder layer, its output hidden state and the
roped K/V rows it caches:

    reference   forward hooks on the HF decoder layers; K/V read from its RoutedKVCache
    artifact    each segment graph run as an in-memory copy with every layer's output made
                a graph output (`tap_segment`), in place of the segment (OrtArtifact.graphs,
                by role) so the artifact's own host flow drives it; K/V from the segments'
                new.{i}.* rows (or present.{i}.*, the fused attention forms' buffers)

Rows: a layer of stage s runs in prefill on the rows kept at that stage (text ∪ the stage's
selected visual tokens, ascending original positions) on both sides, so rows are matched by
original position; where the two sides' routing differs only the rows both hold are
compared, and the report says so. Decode steps are teacher-forced: both sides take the
reference's greedy token, so a flipped token never misaligns the steps after it.

`--layers N` compares layers 0..N-1 and runs little more: segments wholly past N return
zeros (artifact) and layers past N pass their input through (reference), so an N-layer
gate costs N layers, not the model. Tolerances: tolerances.LAYER_DEFAULTS.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import tempfile
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .. import contract as C
from ..errors import GraphRunError, UserError
from ..files import check_folders_above, umask, write_json, writing
from ..progress import Steps
from .compare import PerInputReport
from .tolerances import LAYER_KINDS, layer_tolerances

PREFILL = "prefill"
ROW_AXIS = {"hidden": 0, "key": 1, "value": 1}  # hidden (T, D); key/value (nkv, T, hd), as cached


def decode_phase(step: int) -> str:
    return f"decode.{step}"


# ---------------------------------------------------------------- the artifact's layer outputs


class TapError(Exception):
    """A segment graph whose layer outputs cannot be located from its metadata."""


_SCOPE = re.compile(r"(?:^|\.)layers\.(\d+)(\.|$)")  # layers.5.mlp, model.layers.5
_NAMESPACE = re.compile(r"/layers\.(\d+)[.:]")


def node_layer(node: Any) -> tuple[int, bool] | None:
    """(decoder layer, whether the node sits directly in the layer's scope rather than in a
    submodule such as its MLP) from the exporter's metadata: Segment keeps its layers in a
    ModuleDict keyed by the model's layer index, so their scopes read `layers.{i}.*`."""
    meta = {p.key: p.value for p in node.metadata_props}
    scopes = meta.get("pkg.torch.onnx.name_scopes")
    if scopes:
        try:
            names = ast.literal_eval(scopes)
        except (ValueError, SyntaxError):
            names = []
        for k, name in enumerate(names):
            if m := _SCOPE.search(name):  # the outermost: [..., 'layers.5', 'add_7'] is the layer's own op
                return int(m.group(1)), not m.group(2) and k == len(names) - 2
        return None
    m = _NAMESPACE.search(meta.get("namespace", ""))
    return (int(m.group(1)), False) if m else None


def _residual_add(node: Any, direct: bool, consumers: dict[str, list[Any]]) -> str | None:
    """The output of the residual Add closing a layer, from the layer's last own node:

        layers.i.mlp.down_proj (MatMul) -> [Cast] -> Add(residual, mlp out) -> layer i's output
    """
    if direct and node.op_type == "Add":  # an exporter that scoped the residual into the layer
        return node.output[0]
    for _ in range(3):
        after = consumers.get(node.output[0], [])
        adds = [n for n in after if n.op_type == "Add"]
        if len(adds) == 1:
            return adds[0].output[0]
        if len(after) != 1 or after[0].op_type not in ("Cast", "Identity"):
            return None
        node = after[0]
    return None


def layer_outputs(graph: Any, layers: range) -> dict[int, str]:
    """Decoder layer i -> the tensor holding its output hidden state, in one segment graph.
    Raises TapError when a layer's output cannot be located."""
    last: dict[int, tuple[Any, bool]] = {}
    consumers: dict[str, list[Any]] = defaultdict(list)
    for node in graph.node:  # topologically sorted (the ONNX spec): the last one wins
        if (found := node_layer(node)) is not None:
            last[found[0]] = (node, found[1])
        for name in node.input:
            consumers[name].append(node)
    out = {}
    for i in layers:
        if i not in last:
            raise TapError(f"no node carries layer {i}'s scope (layers.{i}.*) in its metadata")
        node, direct = last[i]
        if (name := _residual_add(node, direct, consumers)) is None:
            raise TapError(f"no residual Add after layer {i}'s last node {node.name} ({node.op_type})")
        out[i] = name
    return out


def _reaches(graph: Any, name: str, target: str) -> bool:
    """`name` is `target`, or becomes it through Casts/Identities (the segment's out_dtype cast)."""
    by_input = {n.input[0]: n for n in graph.node if n.op_type in ("Cast", "Identity") and n.input}
    for _ in range(3):
        if name == target:
            return True
        if name not in by_input:
            return False
        name = by_input[name].output[0]
    return name == target


def tap_segment(path: Path, layers: range, last: bool) -> tuple[bytes, dict[int, str], str | None]:
    """The segment at `path` as bytes with every layer's output a graph output (external
    weights stay on disk), layer -> output name, and why only some could be located (or None).
    Self-check: a non-last segment's last layer must be its hidden_out."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    note = None
    try:
        names = layer_outputs(graph, layers)
        if not last and not _reaches(graph, names[layers[-1]], C.HIDDEN_OUT):
            raise TapError(f"layer {layers[-1]}'s located output {names[layers[-1]]} is not {C.HIDDEN_OUT}")
    except TapError as e:  # hidden states at the segment's end only; K/V of every layer still compared
        names, note = ({} if last else {layers[-1]: C.HIDDEN_OUT}), f"{path.name}: {e}"
    outputs = {o.name for o in graph.output}
    types = {v.name: v.type.tensor_type.elem_type for v in graph.value_info}
    hidden_type = next(i.type.tensor_type.elem_type for i in graph.input if i.name == C.HIDDEN)
    for name in names.values():
        if name not in outputs:
            graph.output.append(onnx.helper.make_tensor_value_info(name, types.get(name, hidden_type), None))
            outputs.add(name)
    return model.SerializeToString(), names, note


# ---------------------------------------------------------------- recording


@dataclass
class Capture:
    """One side's tensors: phase ("prefill", "decode.0", ...) -> layer -> kind -> array
    (hidden (T, D); key, value (nkv, T, hd)), copies in the side's own dtype."""

    phase: str = PREFILL
    tensors: dict[str, dict[int, dict[str, np.ndarray]]] = field(default_factory=dict)
    decisions: list[np.ndarray] = field(default_factory=list)

    def put(self, layer: int, kind: str, x: Any) -> None:
        self.tensors.setdefault(self.phase, {}).setdefault(layer, {})[kind] = np.array(x, copy=True)

    def get(self, phase: str, layer: int, kind: str) -> np.ndarray | None:
        return self.tensors.get(phase, {}).get(layer, {}).get(kind)


class _SegmentTap:
    """Stands in for one segment graph: runs its tapped copy and records each wanted layer's
    output and new K/V rows, or, wholly past the wanted layers, returns zeros of the right
    shapes without running anything (what comes after is not compared)."""

    def __init__(self, original: Any, graph: Any | None, layers: range, names: dict[int, str],
                 wanted: range, zeros: dict[str, Any]) -> None:
        self.original, self.graph, self.layers, self.names = original, graph, layers, names
        self.wanted, self.zeros = wanted, zeros
        self.capture = Capture()

    def __getattr__(self, name: str) -> Any:  # input_types, output_names, ...: the graph's
        return getattr(self.graph if self.graph is not None else self.original, name)

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.graph is None:
            return self._skipped(feeds)
        out = self.graph(feeds)
        p, t = int(np.asarray(feeds[C.PAST_LENGTH]).reshape(-1)[0]), int(feeds[C.HIDDEN].shape[1])
        for i in (i for i in self.layers if i in self.wanted):
            if i in self.names:
                self.capture.put(i, "hidden", out[self.names[i]][0])  # (T, D)
            for kind in ("key", "value"):
                rows = out[C.new(i, kind)] if C.new(i, kind) in out else out[C.present(i, kind)][:, :, p:p + t]
                self.capture.put(i, kind, rows[0])  # (nkv, T, hd)
        return out

    def _skipped(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t, z = int(feeds[C.HIDDEN].shape[1]), self.zeros
        out = {}
        for name in self.original.output_names:
            if name == C.LOGITS:
                out[name] = np.zeros((1, z["vocab"]), dtype=np.float32)
            elif name == C.HIDDEN_OUT:
                out[name] = np.zeros((1, t, z["hidden"]), dtype=feeds[C.HIDDEN].dtype)
            else:  # new.{i}.key/value: zero rows; present.{i}.* (in-graph KV): the buffer, unchanged
                _, i, kind = name.split(".")
                out[name] = (np.zeros((1, z["kv_heads"], t, z["head_dim"]), dtype=np.float32)
                             if name == C.new(int(i), kind) else feeds[C.past(int(i), kind)])
        return out


class ArtifactTaps:
    """An artifact's segments, tapped: each segment holding a wanted layer is replaced by its
    tapped copy for good, the original session dropped first (the artifact is this run's
    own), so every weight is loaded once, as in `generate`; the other segments are stubbed.
    The host flow that drives them is the artifact's own (OrtArtifact.graphs, by role)."""

    def __init__(self, art: Any, wanted: range) -> None:
        from ..runtime.ort import Graph

        self.art, self.wanted = art, wanted
        self.notes: list[str] = []
        fp16 = art.manifest.get("precision") == "fp16"
        zeros = {"vocab": int(art.shapes.get("vocab_size", art.embed_tokens.shape[0])),
                 "hidden": int(art.embed_tokens.shape[1]), "kv_heads": art.layout.num_kv_heads,
                 "head_dim": art.layout.head_dim}
        self.taps: list[_SegmentTap] = []
        segments = art.plan.segments
        for s, layers in enumerate(segments):
            role = C.segment(s)
            original, graph, names = art.graphs[role], None, {}
            if any(i in wanted for i in layers):
                path = art.folder / art.manifest["graphs"][role]
                model, names, note = tap_segment(path, layers, s == len(segments) - 1)
                if note:
                    self.notes.append(f"hidden states compared at the segment's end only ({note})")
                providers = original.session.get_providers()
                del art.graphs[role]  # the original's weights go before the copy's come
                original = None
                graph = Graph(path, providers, fp16=fp16, model=model)
            tap = _SegmentTap(original, graph, layers, names, wanted, zeros)
            art.graphs[role] = tap
            self.taps.append(tap)

    @contextmanager
    def recording(self, capture: Capture) -> Iterator[Capture]:
        """The taps record into `capture` inside the block."""
        for tap in self.taps:
            tap.capture = capture
        try:
            yield capture
        finally:
            for tap in self.taps:
                tap.capture = Capture()


class _PassThrough:
    """Stands in for a reference decoder layer past the compared ones: returns its input
    unchanged (the decision heads still read the real layer's weights through it)."""

    def __init__(self, layer: Any) -> None:
        self.layer = layer

    def __getattr__(self, name: str) -> Any:
        return getattr(self.layer, name)

    def __call__(self, hidden: Any, *args: Any, **kwargs: Any) -> Any:
        return hidden


@contextmanager
def eager_taps(run: Any, capture: Capture, wanted: range) -> Iterator[Capture]:
    """Forward hooks on the reference run's HF decoder layers (their outputs, as the routing
    engine runs them); layers past `wanted` pass their input through."""
    layers = run.routed.layers  # the run's own list: the shared model is not touched

    def hook(i: int):
        def record(module: Any, args: Any, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output  # (1, T, D)
            capture.put(i, "hidden", out[0].detach().float().cpu().numpy())

        return record

    handles = [layers[i].register_forward_hook(hook(i)) for i in wanted]
    past = range(wanted.stop, len(layers))
    originals = {i: layers[i] for i in past}
    for i in past:
        layers[i] = _PassThrough(layers[i])
    try:
        yield capture
    finally:
        for h in handles:
            h.remove()
        for i, layer in originals.items():
            layers[i] = layer


def _eager_kv(capture: Capture, cache: Any, wanted: range, last_row: bool) -> None:
    """The reference's roped K/V rows from its RoutedKVCache: all of prefill's, or the last one."""
    for i in wanted:
        for kind, held in (("key", cache.keys[i]), ("value", cache.values[i])):
            rows = held[0, :, -1:] if last_row else held[0]  # (nkv, T, hd)
            capture.put(i, kind, rows.detach().float().cpu().numpy())


def observe_layers(reference: Any, taps: ArtifactTaps, inputs: Any, steps: int) -> tuple[Capture, Capture]:
    """Both sides on one input: prefill, then `steps` teacher-forced decode steps."""
    from ..runtime.base import host

    wanted = taps.wanted
    ref_cap, got_cap = Capture(), Capture()
    ref_run, got_run = reference.bind(inputs.to_torch()), taps.art.bind(inputs)
    with eager_taps(ref_run, ref_cap, wanted), taps.recording(got_cap):
        ref, got = ref_run.prefill(), got_run.prefill()
        _eager_kv(ref_cap, ref.kv, wanted, last_row=False)
        ref_cap.decisions = [host(d).reshape(-1) for d in ref.decisions]
        got_cap.decisions = [np.asarray(d).reshape(-1) for d in got.decisions]
        for step in range(steps):
            ref_cap.phase = got_cap.phase = decode_phase(step)
            forced = replace(got, logits=host(ref.logits).reshape(-1))  # the reference's greedy token
            ref, got = ref_run.decode(ref, step), got_run.decode(forced, step)
            _eager_kv(ref_cap, ref.kv, wanted, last_row=True)
    ref_run.close()
    got_run.close()
    return ref_cap, got_cap


# ---------------------------------------------------------------- comparing


def stage_rows(ids: np.ndarray, image_token_id: int, decisions: list[np.ndarray]) -> list[np.ndarray]:
    """Per stage, the original positions of the rows its layers run on in prefill (ascending):
    every row before the first decision, then text ∪ the stage's selected visual tokens."""
    vis, text = np.flatnonzero(ids == image_token_id), np.flatnonzero(ids != image_token_id)
    return [np.arange(len(ids))] + [np.sort(np.concatenate([text, vis[d.astype(np.int64)]])) for d in decisions]


def tensor_metrics(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Cosine, relative L2 error ||got - ref|| / ||ref|| and max |diff| over all elements."""
    a, b = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    d, na = b - a, float(np.linalg.norm(a))
    return {"cosine": float(a @ b / (na * np.linalg.norm(b) + 1e-30)),
            "rel_err": float(np.linalg.norm(d) / (na + 1e-30)), "max_abs": float(np.abs(d).max()) if d.size else 0.0}


def _judge(phase: str, kind: str, m: dict[str, float], tol: dict[str, float]) -> list[str]:
    """One message per bound missed; NaN misses every bound."""
    where = "prefill" if phase == PREFILL else f"decode step {phase.split('.')[1]}"
    bad = []
    for metric in ("cosine", "rel_err", "max_abs"):
        for bound_kind, ok in (("min", lambda v, b: v >= b), ("max", lambda v, b: v <= b)):
            bound = tol.get(f"{kind}_{metric}_{bound_kind}")
            if bound is not None and not ok(m[metric], bound):
                sign = "<" if bound_kind == "min" else ">"
                bad.append(f"{where} {kind} {metric.replace('_', ' ')} {m[metric]:.4g} {sign} {bound:g}")
    return bad


def _select(x: np.ndarray, kind: str, idx: np.ndarray) -> np.ndarray:
    return np.take(x, idx, axis=ROW_AXIS[kind])


def compare_layer(i: int, stage: int, ref: Capture, got: Capture, rows: tuple[np.ndarray, np.ndarray],
                  steps: int, tol: dict[str, float]) -> dict[str, Any]:
    """One layer's row: per phase and kind the metrics, then its failures."""
    rows_ref, rows_got = rows
    common = np.intersect1d(rows_ref, rows_got)
    pick = {PREFILL: (np.searchsorted(rows_ref, common), np.searchsorted(rows_got, common))}
    entry: dict[str, Any] = {"layer": i, "stage": stage, "rows": int(len(common)), "rows_reference": int(len(rows_ref)),
                             "rows_artifact": int(len(rows_got)), "phases": {}, "failures": []}
    for phase in [PREFILL] + [decode_phase(k) for k in range(steps)]:
        entry["phases"][phase] = {}
        for kind in LAYER_KINDS:
            a, b = ref.get(phase, i, kind), got.get(phase, i, kind)
            if a is None or b is None:
                continue
            if phase == PREFILL:
                for x, n, side in ((a, len(rows_ref), "reference"), (b, len(rows_got), "artifact")):
                    if x.shape[ROW_AXIS[kind]] != n:  # our row bookkeeping, not the artifact: a bug
                        raise RuntimeError(f"layer {i} {kind}: the {side} ran {x.shape[ROW_AXIS[kind]]} rows, "
                                           f"its routing says {n}")
                a, b = _select(a, kind, pick[PREFILL][0]), _select(b, kind, pick[PREFILL][1])
            m = tensor_metrics(a, b)
            entry["phases"][phase][kind] = m
            entry["failures"] += _judge(phase, kind, m, tol)
    return entry


def routing_notes(rows: list[tuple[np.ndarray, np.ndarray]], plan: Any, wanted: range) -> list[str]:
    """Where the sides kept different rows, among the stages holding a compared layer (past
    those, --layers N routes on pass-through states: nothing to report)."""
    notes = []
    for s in range(1, len(rows)):
        a, b = rows[s]
        if plan.segments[s].start < wanted.stop and not np.array_equal(a, b):
            span = plan.segments[s]
            notes.append(f"routing differs at decision {s - 1} (layer {plan.stages[s - 1].layer}): layers "
                         f"{span.start}-{span.stop - 1} compared on the {len(np.intersect1d(a, b))} rows both hold "
                         f"(reference {len(a)}, artifact {len(b)})")
    return notes


def compare_input(name: str, ref: Capture, got: Capture, ids: np.ndarray, image_token_id: int, plan: Any,
                  wanted: range, steps: int, tol: dict[str, float]) -> dict[str, Any]:
    """One input's record: a row per layer, the routing notes, the first drifting layer."""
    rows_ref = stage_rows(ids, image_token_id, ref.decisions)
    rows_got = stage_rows(ids, image_token_id, got.decisions)
    stage_of = {i: s for s, span in enumerate(plan.segments) for i in span}
    layers = [compare_layer(i, stage_of[i], ref, got, (rows_ref[stage_of[i]], rows_got[stage_of[i]]), steps, tol)
              for i in wanted]
    first = next((r for r in layers if r["failures"]), None)
    failures = []
    if first is not None:
        shown = first["failures"][:3] + (["..."] if len(first["failures"]) > 3 else [])
        failures.append(f"first drift at decoder layer {first['layer']} ({'; '.join(shown)})")
    return {"input": name, "layers": layers, "first_drift": None if first is None else first["layer"],
            "routing": routing_notes(list(zip(rows_ref, rows_got)), plan, wanted), "failures": failures}


# ---------------------------------------------------------------- the run


@dataclass
class LayerReport(PerInputReport):
    artifact: str
    model: str
    precision: str
    tolerances: dict[str, float]
    layers: int  # decoder layers compared (0..layers-1)
    steps: int  # decode steps compared after prefill
    notes: list[str] = field(default_factory=list)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    dump: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"artifact": self.artifact, "model": self.model, "precision": self.precision,
                "tolerances": self.tolerances, "layers": self.layers, "steps": self.steps, "passed": self.passed,
                "failures": self.failures, "notes": self.notes, "dump": self.dump, "inputs": self.inputs}


def run_layer_parity(artifact: Path, model: str | None = None, inputs: str | None = None, layers: int | None = None,
                     steps: int = 2, overrides: dict[str, float] | None = None, dump: Path | None = None,
                     quiet: bool = False) -> LayerReport:
    """Reference and artifact layer by layer on every input of the set (`layers`: only the
    first N; None or 0: all). Never raises for drift (see `LayerReport.failures`), only for
    inputs or artifacts it cannot run."""
    from ..preprocess import load_image
    from ..runtime.eager import ArtifactReference
    from ..runtime.ort import OrtArtifact
    from .parity import input_set, reference_model

    items = input_set(inputs)
    art = OrtArtifact.load(Path(artifact))
    m = art.manifest
    total = art.plan.num_layers
    if layers is not None and not 0 <= layers <= total:
        raise UserError(f"--layers takes 1..{total} (this artifact's decoder layers), got {layers}")
    limit = int(art.shapes.get("max_new_tokens", steps + 1))
    if not 0 <= steps < limit:
        raise UserError(f"--layer-steps must be in 0..{limit - 1} for this artifact, got {steps}")
    wanted = range(layers or total)
    loaded, source = reference_model(art, model)
    reference = ArtifactReference(loaded, art)  # per input its image-size bucket's plan
    tol = layer_tolerances(m["family"], m["precision"], overrides)
    report = LayerReport(str(artifact), source, m["precision"], tol, len(wanted), steps)
    taps = ArtifactTaps(art, wanted)
    report.notes += taps.notes
    captured = []
    steps_bar = Steps(len(items), quiet=quiet, title="parity --layers")
    try:
        for item in items:
            with steps_bar.step(f"{item.name}: {len(wanted)} layers, prefill + {steps} decode steps"):
                prepared = art.prepare(load_image(item.image), item.prompt)
                try:
                    ref, got = observe_layers(reference, taps, prepared, steps)
                except GraphRunError as e:  # the artifact itself is broken: a failed check, not a crash
                    report.inputs.append({"input": item.name, "layers": [], "first_drift": None, "routing": [],
                                          "failures": [f"the artifact did not run: {e}"]})
                    continue
                ids = np.asarray(prepared.input_ids).reshape(-1)
                record = compare_input(item.name, ref, got, ids, int(m["image_token_id"]), art.plan, wanted, steps, tol)
                report.inputs.append(record)
                captured.append((item.name, ref, got, stage_rows(ids, int(m["image_token_id"]), ref.decisions),
                                 stage_rows(ids, int(m["image_token_id"]), got.decisions)))
    finally:
        steps_bar.close()
    if dump is not None:
        write_dump(Path(dump), report, captured, art.plan)
        report.dump = str(dump)
    return report


# ---------------------------------------------------------------- --dump


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name)


def _side_tensors(cap: Capture, rows: list[np.ndarray], plan: Any) -> dict[str, np.ndarray]:
    """`{phase}.layers.{i}.{kind}` -> array, and `prefill.layers.{i}.positions` (the rows'
    original positions), for one side."""
    stage_of = {i: s for s, span in enumerate(plan.segments) for i in span}
    out = {}
    for phase, by_layer in cap.tensors.items():
        for i, kinds in by_layer.items():
            for kind, x in kinds.items():
                out[f"{phase}.layers.{i}.{kind}"] = np.ascontiguousarray(x)
            if phase == PREFILL:
                out[f"{phase}.layers.{i}.positions"] = rows[stage_of[i]].astype(np.int64)
    return out


def write_dump(folder: Path, report: LayerReport, captured: list[tuple], plan: Any) -> None:
    """Per input `<input>.reference.safetensors` and `<input>.artifact.safetensors`, and
    index.json; written in a temporary folder beside `folder`, then moved into place (a
    previous dump there is replaced, any other non-empty folder refused)."""
    from safetensors.numpy import save_file

    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not (folder / "index.json").is_file())):
        raise UserError(f"--dump {folder} exists and is not a parity dump; give a new folder")
    check_folders_above(folder)
    with writing(folder):
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
        try:
            index = {"artifact": report.artifact, "model": report.model, "precision": report.precision,
                     "layers": report.layers, "steps": report.steps,
                     "layout": {"hidden": "(T, D)", "key": "(num_kv_heads, T, head_dim), roped",
                                "value": "(num_kv_heads, T, head_dim)",
                                "positions": "(T,) original positions of the prefill rows",
                                "names": "{phase}.layers.{i}.{kind}, phase prefill or decode.{step}"},
                     "inputs": []}
            for name, ref, got, rows_ref, rows_got in captured:
                entry: dict[str, Any] = {"input": name}
                for side, cap, rows in (("reference", ref, rows_ref), ("artifact", got, rows_got)):
                    tensors = _side_tensors(cap, rows, plan)
                    file = f"{_slug(name)}.{side}.safetensors"
                    save_file(tensors, str(tmp / file), metadata={"input": name, "side": side})
                    entry[side] = {"file": file, "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype)}
                                                             for k, v in tensors.items()}}
                index["inputs"].append(entry)
            write_json(tmp / "index.json", index)
            os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it private; a finished dump is the user's
            _move_into_place(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _move_into_place(tmp: Path, folder: Path) -> None:
    if not folder.exists():
        os.replace(tmp, folder)
        return
    old = folder.parent / f".{folder.name}.{os.getpid()}.old"
    os.replace(folder, old)
    try:
        os.replace(tmp, folder)
    except BaseException:
        os.replace(old, folder)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- reports


def _cos(m: dict[str, Any] | None) -> str:
    return "-" if m is None else f"{m['cosine']:.5f}"


def _rows_cell(r: dict[str, Any]) -> str:
    """Rows compared: "57", or "36 of 37" where routing differs ("36 of 37/38": reference/artifact)."""
    n, ref, got = r["rows"], r["rows_reference"], r["rows_artifact"]
    if n == ref == got:
        return str(n)
    return f"{n} of {ref}" if ref == got else f"{n} of {ref}/{got}"


def summary_rows(record: dict[str, Any], steps: int) -> list[dict[str, Any]]:
    """One row per layer: prefill cosines, the worst decode step's, the verdict."""
    out = []
    for r in record["layers"]:
        pre = r["phases"][PREFILL]
        row = {"layer": r["layer"], "stage": r["stage"],
               "rows": _rows_cell(r),
               **{f"prefill {k}": _cos(pre.get(k)) for k in LAYER_KINDS}}
        for k in LAYER_KINDS:
            seen = [r["phases"][decode_phase(s)].get(k) for s in range(steps)]
            seen = [m for m in seen if m is not None]
            row[f"decode {k}"] = _cos(min(seen, key=lambda m: m["cosine"])) if seen else "-"
        row["result"] = "pass" if not r["failures"] else ("FIRST DRIFT" if r["layer"] == record["first_drift"]
                                                           else "FAIL")
        out.append(row)
    return out


COLUMNS = ["layer", "stage", "rows", *(f"prefill {k}" for k in LAYER_KINDS), *(f"decode {k}" for k in LAYER_KINDS),
           "result"]


def verdict(record: dict[str, Any], layers: int) -> str:
    if record["failures"]:
        return f"parity --layers: {record['input']}: {record['failures'][0]}"
    return f"parity --layers: {record['input']}: no drift over {layers} layers"


def markdown(report: LayerReport) -> str:
    lines = [f"## reroute-export parity --layers: {'passed' if report.passed else 'FAILED'}", "",
             f"Artifact `{report.artifact}` ({report.precision}) against the eager fp32 reference `{report.model}`, "
             f"decoder layers 0-{report.layers - 1}: each layer's output hidden state and roped K/V rows, prefill "
             f"and {report.steps} teacher-forced decode steps (cosine; decode: the worst step).", ""]
    for r in report.inputs:
        lines += [f"### {r['input']}", "", verdict(r, report.layers), ""]
        lines += [f"- {note}" for note in r["routing"]] + ([""] if r["routing"] else [])
        if r["layers"]:
            lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
            lines += ["| " + " | ".join(str(row[c]) for c in COLUMNS) + " |" for row in summary_rows(r, report.steps)]
            lines.append("")
    lines += [f"- {note}" for note in report.notes]
    lines += ["", "Tolerances: " + ", ".join(f"`{k}`={v:g}" for k, v in sorted(report.tolerances.items()))]
    return "\n".join(lines) + "\n"
