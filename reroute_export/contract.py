"""The artifact contract: file names, graph I/O names and the manifest's fields, shared by
export, runtime, build and checks (the bottom layer: it imports nothing of ours).

An artifact folder holds:

    manifest.json          model, family, plan (and the spec it was planned on), shapes, precision,
                           opset, versions, graphs (role -> file), decoder (segments, KV buffer
                           lengths), sha256 of every file
    vision.onnx            pixel_values -> image_features (N, D); Qwen2.5-VL: also the grid's tables
                           (VISION_TABLES), one graph for every image-size bucket (patch axis free)
    segment_{s}.onnx       layers [b_s, b_{s+1}) of stage s, run by prefill (compact rows) and
                           decode (one row) alike: each decoder weight is in exactly one segment
                           or head graph (rewrite/segments.py)
    head_{j}.onnx          decision j's layer: input_layernorm + q/k/v projections
    route_{j}.onnx         decision j's routing, no weights: score, SelectVisual, RouteGather
    embed_tokens.npy       (V, D) token embedding table, in the graphs' precision
    preprocessor/          tokenizer + image processor files (Preprocessor.save_pretrained);
                           Qwen2.5-VL: vision_grids.npz, each bucket's vision tables
    *.onnx.data            external weights, when a graph's weights pass 2 GB
    weights.data           streamed exports (--random-weights): every graph's external weights

Batch is 1 in every graph (edge deployment). N and every K_j are constants of the routing
graphs; row counts (text length, 1 in decode) and past-buffer lengths are free axes.

segment.s inputs
    hidden                 float (1, T, D)    rows entering the segment (embeddings for s = 0)
    query/key/value        (1, T, nh*hd) / (1, T, nkv*hd)   s >= 1: the first layer's, from head.(s-1)
    position_ids           int64 (1, T) 1-D RoPE, or (3, 1, T) Qwen2.5-VL mRoPE (the unpruned model's)
    past_length            int64 (1,)         valid rows of the buffers
    past.{i}.key/value     (1, nkv, P, hd)    layer i's fixed buffer (P = M_s in decode, a 1-row dummy in prefill)
segment.s outputs
    hidden_out             (1, T, D)          (the last segment: logits float32 (1, V) of the last row)
    new.{i}.key/value      (1, nkv, T, hd)    the rows' roped K and V, written by the host at past_length
    present.{i}.key/value  (1, nkv, M_s, hd)  instead, with a fused attention form (manifest decoder.attention
                           "ort-gqa" / "kv-scatter"): the buffer with the rows written in-graph at
                           past_length; the runtime binds it to the past buffer's memory (in place)

head.j: hidden (1, T, D) -> query, key, value (pre-rope)
route.j inputs: hidden, query, key, value (1, Tx, .), position_ids, visual_start int64 (1,),
    candidates int64 (1, m) (delete methods after their first decision: the survivors' indices)
route.j outputs: selected.j int64 (1, K_j) ascending original visual indices, kept int64 (1, T')
    (rows of the inputs kept), kept.hidden / kept.query / kept.key / kept.value / kept.position_ids
"""

from __future__ import annotations

from typing import Any, TypedDict

FORMAT = "reroute-export/2"  # bump when graph I/O changes; the loader refuses other formats

MANIFEST = "manifest.json"
VISION = "vision.onnx"
EMBEDDINGS = "embed_tokens.npy"
PREPROCESSOR = "preprocessor"

PRECISIONS = ("fp32", "fp16")  # what `export --precision` writes (calibrate makes int8/fp8 from fp32)

# Opset <= 18 for TensorRT 10.3 (JetPack 6.x); IR 8 is read by ONNX Runtime >= 1.14 and
# TensorRT 10.x (onnx 1.23 writes IR 14 by default, which older runtimes reject).
OPSET = 18
IR_VERSION = 8

PIXEL_VALUES = "pixel_values"
# Qwen2.5-VL's vision graph serves every image size: beside the patches it takes the grid's
# tables (rewrite/vision.py), computed at export per image-size bucket and shipped in
# preprocessor/VISION_GRIDS as "b{k}.{name}" arrays; the host feeds the bucket's.
WINDOW_INDEX, REVERSE_INDEX = "window_index", "reverse_index"  # (S / merge²,) int64 each
ROTARY_COS, ROTARY_SIN = "rotary_cos", "rotary_sin"  # (S, head_dim) float32 each, window order
WINDOW_BLOCKS = "window_blocks"  # (S,) int64: the attention window of each patch, window order
VISION_TABLES = (WINDOW_INDEX, REVERSE_INDEX, ROTARY_COS, ROTARY_SIN, WINDOW_BLOCKS)
VISION_GRIDS = "vision_grids.npz"
IMAGE_FEATURES = "image_features"
INPUTS_EMBEDS = "inputs_embeds"
POSITION_IDS = "position_ids"
VISUAL_START = "visual_start"
LOGITS = "logits"


# -- the deployable decoder (rewrite/segments.py): segments, decision heads, routing graphs

HIDDEN = "hidden"
HIDDEN_OUT = "hidden_out"
QUERY, KEY, VALUE = "query", "key", "value"
PAST_LENGTH = "past_length"
KEPT = "kept"
CANDIDATES = "candidates"


def segment(s: int) -> str:
    """Role of stage s's segment graph (layers [b_s, b_{s+1}))."""
    return f"segment.{s}"


def head(j: int) -> str:
    """Role of decision j's head graph (its layer's norm + q/k/v)."""
    return f"head.{j}"


def route(j: int, bucket: int | None = None) -> str:
    """Role of decision j's weight-free routing graph (per visual-token bucket for Qwen)."""
    return f"route.{j}" if bucket is None else f"route.{j}.b{bucket}"


def vision() -> str:
    """Role of the vision graph: one per artifact, whatever its image sizes."""
    return "vision"


def file_of(role: str) -> str:
    """segment.0 -> segment_0.onnx, route.1.b2 -> route_1_b2.onnx, vision -> vision.onnx."""
    return role.replace(".", "_") + ".onnx"


def new(i: int, kind: str) -> str:
    """The T new rows of layer i's K or V a segment returns (written at past_length)."""
    return f"new.{i}.{kind}"


def present(i: int, kind: str) -> str:
    """Layer i's whole K or V buffer after the segment wrote its rows in-graph (fused attention
    forms, rewrite/attention.py): the same shape as past.{i}.*, bound to the same memory."""
    return f"present.{i}.{kind}"


# How a segment's attention updates its KV buffers (manifest["decoder"]["attention"]):
# "portable" returns new rows for the host to write; the in-graph forms write them inside.
PORTABLE = "portable"
ATTENTION_FORMS = (PORTABLE, "ort-gqa", "kv-scatter")  # export/attention.py describes and lowers each


def kv_in_graph(attention: str) -> bool:
    return attention != PORTABLE


def kept(name: str) -> str:
    return f"kept.{name}"


def segment_io(layers: range, headed: bool, last: bool, attention: str = PORTABLE) -> tuple[list[str], list[str]]:
    kv_in = [past(i, k) for i in layers for k in ("key", "value")]
    out = present if kv_in_graph(attention) else new
    kv_out = [out(i, k) for i in layers for k in ("key", "value")]
    inputs = [HIDDEN, *([QUERY, KEY, VALUE] if headed else []), POSITION_IDS, PAST_LENGTH, *kv_in]
    return inputs, [LOGITS if last else HIDDEN_OUT, *kv_out]


HEAD_IO = ([HIDDEN], [QUERY, KEY, VALUE])


def route_io(j: int, chained: bool) -> tuple[list[str], list[str]]:
    inputs = [HIDDEN, QUERY, KEY, VALUE, POSITION_IDS, VISUAL_START, *([CANDIDATES] if chained else [])]
    rows = [kept(n) for n in (HIDDEN, QUERY, KEY, VALUE, POSITION_IDS)]
    return inputs, [selected(j), KEPT, *rows]


PAST_PREFIX = "past."


def past(i: int, kind: str) -> str:
    return f"{PAST_PREFIX}{i}.{kind}"


def selected(stage: int) -> str:
    return f"selected.{stage}"


class Manifest(TypedDict, total=False):
    """manifest.json: what export/artifact.py writes and reads back. A TypedDict, not a
    dataclass: the file is this dict as JSON in the order its keys were set, so typing it
    changes no byte, and stages add their own keys (check, trt, quantization) as they run."""

    format: str  # FORMAT
    model: str
    model_source: str | None  # what loads the model again: a registered name or a folder
    family: str
    plan: dict[str, Any]  # RoutingPlan.to_dict()
    spec: dict[str, Any]  # the graph spec the plan was made on
    random_weights: bool
    weights_written: str  # "streamed" | "in memory"
    precision: str
    opset: int
    ir_version: int
    inline_functions: bool
    shapes: dict[str, Any]  # prompt/new-token bounds, widths, visual_rows_per_layer, cache_tokens (M_s)
    fp32_layers: list[int]
    graphs: dict[str, str]  # role (vision, segment.s, head.j, route.j[.bK]) -> file name
    image_grid_thw: list[int] | None
    spatial_merge_size: int | None
    image_token_id: int
    eos_token_id: int | None
    versions: dict[str, str]
    created: str  # ISO 8601, UTC
    files: dict[str, dict[str, Any]]  # POSIX path -> {"sha256", "bytes"}
    stream_check: dict[str, Any]
    check: dict[str, Any]  # the post-export check: metrics, tolerances, passed, failures
    trt: dict[str, Any]
    quantization: dict[str, Any]
    calibration_parity: dict[str, Any]
