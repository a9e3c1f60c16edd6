"""`calibrate`: an fp32 artifact -> a quantized (QDQ) ONNX artifact, calibrated with routing active.

    reroute-export calibrate --artifact DIR --precision int8|fp8 --output DIR [--recipe NAME|FILE]

What is calibrated, and on what
    The calibration set ships in `calibration/` (photographs whose licence allows shipping,
    one prompt each, sources and licences in `calibration/manifest.json`); a recipe
    (`calibration/recipes/*.json`) says how many samples, the seed that picks and orders
    them, how many decode steps per sample, which graphs, and the quantizer settings.
    Every graph role of the artifact (manifest["graphs"]: vision, segment.s, head.j,
    route.j; buckets such as route.0.b1 by their prefix) is calibrated on the feeds the ONNX
    Runtime runtime itself builds for it, recorded in one pass over the samples, each feed
    stored the moment its graph is called (feeds.py): the vision graph on the processed
    photos (with image-size buckets, every photo in every bucket); each segment and
    decision head on the prefill's rows (the host embedding of (prompt, fp32 image
    features) with the unpruned model's positions, then the rows routing kept) and on
    real greedy decode steps (one row against the fp32 prefill's fixed KV buffers), since
    prefill and decode run the very same segment and head graphs. The routing graphs run
    while the others are observed, so the ranges are those of the routed model: after a
    decision only the kept visual tokens reach a layer, and that is what the layer's
    MatMuls see.

What is quantized
    Weight-bearing MatMul/Gemm of the vision, segment and head graphs (weights per output
    channel, their input activations per tensor, symmetric: TensorRT's explicit-quantization
    pattern), each written under its own file name. Left in floating point: the routing
    graphs route.j, copied byte for byte (they hold no weights, and routing/scoring stays
    float so decisions are exact: the fp32 TopK on whatever q/k the head gives it, never a
    token moved across the boundary by a rounded score); attention MatMuls (activation x
    activation); the LM head in the last segment (by default); head.j's q/k projections
    where a recipe says `routing_projections: float` (weight-only `quantize` keeps them at 8
    bits by default, weights.py); and everything else. The manifest
    lists each excluded MatMul/Gemm and why, and each float graph with its reason.

Library: onnxruntime.quantization (`quantize_static`, QuantFormat.QDQ, MinMax calibration)
    It is already a dependency, runs on CPU, handles graphs with local functions and a
    dynamic text axis, and writes standard QuantizeLinear/DequantizeLinear pairs that
    TensorRT consumes as explicit quantization. NVIDIA ModelOpt's ONNX PTQ (0.47) is the
    library TensorRT recommends; its `[onnx]` extra pins onnx~=1.21 and, on x86-64 Linux,
    onnxruntime-gpu~=1.24 and cupy-cuda12x, which cannot sit beside this project's onnx
    1.23 and CPU onnxruntime 1.32, so the `modelopt` extra installs ModelOpt without it,
    plus the few packages its ONNX path imports (pyproject.toml). Recipe
    `"library": "modelopt"` or `--library modelopt` then uses it instead, on the same
    calibration feeds and exclusions, after inlining the `reroute` functions (it sends a
    graph with custom-domain ops to TensorRT's execution provider); it runs on CPU
    (tests/test_quantize_modelopt.py). Weight-only INT4 by ModelOpt is `quantize --method
    modelopt-awq` (modelopt_int4.py).

FP8
    ONNX Runtime's own FP8 path needs its "Distribution" (histogram) calibrator, which
    cannot merge activations of different text lengths, and sets scales from the
    standard deviation rather than the maximum. So fp8 is calibrated like int8 (max,
    symmetric) and the Q/DQ pairs are then rewritten to FLOAT8E4M3FN with TensorRT's and
    ModelOpt's convention, scale = amax / 448 (weights re-quantized from the fp32 values
    per channel). FP8 QuantizeLinear needs opset 19 and IR 9, so an fp8 artifact
    declares those (TensorRT >= 10 parses them; Jetson Orin has no FP8 at all). ONNX
    Runtime's CPU provider runs FP8 Q/DQ by emulation (QuantizeLinear-19 /
    DequantizeLinear-19 kernels, fp32 math in between), so the parity numbers are
    those of FP8 rounding, not of FP8 tensor-core arithmetic. Where this onnxruntime
    build cannot run them, the artifact is still written (it passes onnx.checker), the
    manifest says parity was not measured and why, and the command exits 1.

Output: a complete artifact folder (written atomically through ArtifactWriter) with the
quantized graphs, the fp32 artifact's embed_tokens.npy and preprocessor/, and a manifest
recording the precision, the quantization (library, version, recipe, calibration
samples, excluded nodes) and `calibration_parity`: quantized vs fp32 artifact, both run
by ONNX Runtime on CPU on the shipped sample photos (routing agreement per stage, last
logits cosine, greedy token agreement, vision features cosine), judged with the
precision's tolerances from check/tolerances.py.

Exit codes (the CLI's): 0 written and parity within tolerances; 1 written but parity
failed or could not be measured; 2 could not run (bad input, one line).

The package, one concern per module:

    calibration_set.py  the shipped (or $REROUTE_EXPORT_CALIBRATION) set, checksummed; samples picked by seed
    recipes.py          recipes (calibration/recipes/*.json) and their checks; PRECISIONS, LIBRARIES, KINDS
    feeds.py            every graph's calibration feeds, recorded in one pass from the runtime's own host code
    select.py           which MatMul/Gemm nodes are quantized, and why the others are not
    quantizers.py       ONNX Runtime's quantize_static and NVIDIA ModelOpt on those feeds and nodes
    fp8.py              symmetric int8 Q/DQ rewritten to FLOAT8E4M3FN (scale = amax / 448)
    report.py           calibration parity (check.loop: quantized vs fp32 artifact) and the summary
    weights.py          `quantize`: weight-only INT4/INT8 (RTN, AWQ: awq.py; encodings.py)
    modelopt_int4.py    `quantize --method modelopt-awq`: NVIDIA ModelOpt's INT4 awq_lite on the same feeds
    run.py              calibrate(): the artifact in, the quantized artifact out
    cli.py              the `calibrate` subcommand
"""
