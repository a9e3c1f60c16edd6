"""What this machine can do at best, measured in the same run as the records it bounds.

    copy bandwidth   one torch copy of a 256 MiB fp32 buffer into another, `threads` intra-op
                     threads, best of 5; reported STREAM-style (bytes read + bytes written per
                     second). A decode step reads every decoder weight once (batch 1: weight
                     reads dominate), so `decode_floor_ms` = decoder weight bytes / bandwidth
                     (+ the KV rows the step's attention reads, bench/traffic.py).
    GEMM FLOP rate   one ONNX Runtime session holding a single fp32 MatMul (prompt tokens x
                     hidden) @ (hidden x MLP width), the prefill's largest Linear, with the
                     bench's threads, best of 5; `prefill_floor_ms` = the plan's decoder prefill
                     FLOPs / that rate (plan.plan_report: 2 x MACs, attention included).

On a GPU run (--device cuda) both are measured on that GPU with torch instead (copy_ and a
matmul in the run's dtype). Both are floors for this machine, not for the graph: a record's
`decode_over_floor` of 1.3 means decode took 1.3x the time reading its weights once at copy speed would take. Weight
bytes come from the artifact's graph headers (build.trt.graph_weights: no weight is read to
be counted); the torch records count the decoder's and LM head's parameters.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

COPY_MIB = 256
REPEATS = 5


def _best(fn: Any, repeats: int, sync: Any) -> float:
    fn()  # pages touched, kernels and packed weights ready, before timing
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def copy_bandwidth(threads: int, device: str = "cpu", mib: int = COPY_MIB, repeats: int = REPEATS) -> dict[str, Any]:
    """The best of `repeats` copies of `mib` MiB on `device`: bytes read + written per second."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        src = torch.ones(mib << 18, device=device)  # fp32: 4 bytes each
        dst = torch.empty_like(src)
        best = _best(lambda: dst.copy_(src), repeats, _sync(device))
    finally:
        torch.set_num_threads(before)
    nbytes = src.numel() * src.element_size()
    return {"copy_gb_per_s": 2 * nbytes / best / 1e9, "copy_mib": mib, "repeats": repeats, "threads": threads,
            "copy_device": device,
            "convention": "bytes read + bytes written per second (STREAM copy), best of the repeats, torch copy_"}


def _sync(device: str) -> Any:
    if device == "cpu":
        return lambda: None
    import torch

    return lambda: torch.cuda.synchronize(device)


def gemm_rate_torch(m: int, k: int, n: int, device: str, dtype: str, repeats: int = REPEATS) -> dict[str, Any]:
    """The best of `repeats` torch matmuls (m, k) @ (k, n) on a GPU in the torch backends' dtype."""
    import torch

    from .config import DTYPES

    dt = getattr(torch, DTYPES[dtype])
    x = torch.randn(m, k, device=device, dtype=dt)
    w = torch.randn(k, n, device=device, dtype=dt)
    best = _best(lambda: x @ w, repeats, _sync(device))
    return {"gemm_gflop_per_s": 2 * m * k * n / best / 1e9, "shape": [m, k, n], "repeats": repeats,
            "runtime": f"torch matmul on {device}, {dtype}, best of the repeats"}


def gemm_rate(m: int, k: int, n: int, threads: int, repeats: int = REPEATS) -> dict[str, Any]:
    """The best of `repeats` runs of one fp32 MatMul (m, k) @ (k, n) in ONNX Runtime on CPU."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32) * 0.02, "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = rng.standard_normal((m, k), dtype=np.float32)
    best = _best(lambda: session.run(None, {"x": x}), repeats, lambda: None)
    return {"gemm_gflop_per_s": 2 * m * k * n / best / 1e9, "shape": [m, k, n], "repeats": repeats,
            "threads": threads, "runtime": "onnxruntime CPUExecutionProvider, fp32 MatMul, best of the repeats"}


def measure(spec: Any, prompt_tokens: int, threads: int, device: str = "cpu", dtype: str = "fp32") -> dict[str, Any]:
    """Both floors for this run: copy bandwidth, and a GEMM of the prefill's largest Linear,
    on the CPU (ONNX Runtime's GEMM) or, for a GPU run, on that GPU (torch, its dtype)."""
    t = spec.text
    shape = (prompt_tokens, t.hidden_size, t.intermediate_size)
    gemm = gemm_rate(*shape, threads) if device == "cpu" else gemm_rate_torch(*shape, device, dtype)
    return {**copy_bandwidth(threads, device), **gemm}


# ---------------------------------------------------------------- weight bytes per record


DECODER_KINDS = ("segment", "head")  # graphs a decode step runs; vision runs once, route graphs hold no weight


def artifact_weight_bytes(folder: Path) -> dict[str, int]:
    """{"weight_bytes": every graph's, "decoder_weight_bytes": segment and head graphs'} from
    the graph headers (the host-side embed_tokens.npy is neither: a gather, not a MatMul)."""
    import onnx

    from ..build.trt import graph_weights
    from ..export.artifact import read_manifest
    from ..quantize.recipes import kind

    manifest = read_manifest(folder, verify=False)
    total = decoder = 0
    for role, name in manifest["graphs"].items():
        n = graph_weights(onnx.load(Path(folder) / name, load_external_data=False))[0]
        total += n
        decoder += n if kind(role) in DECODER_KINDS else 0
    return {"weight_bytes": total, "decoder_weight_bytes": decoder}


def torch_weight_bytes(loaded: Any) -> dict[str, int]:
    """The decoder's parameters but the token embeddings, plus the LM head (tied: counted once
    more, since decode reads it as the LM head), and the whole model's."""
    decoder = loaded.family.decoder(loaded.model)
    embed = decoder.get_input_embeddings()
    skip = {id(p) for p in embed.parameters()} if embed is not None else set()
    size = sum(p.numel() * p.element_size() for p in decoder.parameters() if id(p) not in skip)
    head = sum(p.numel() * p.element_size() for p in loaded.family.lm_head(loaded.model).parameters())
    total = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    return {"weight_bytes": total, "decoder_weight_bytes": size + head}


def floor_fields(record: dict[str, Any], floors: dict[str, Any]) -> dict[str, Any]:
    """decode/prefill floors of one measured record, and how far above them it ran."""
    out: dict[str, Any] = {}
    kv_read = (record.get("kv_traffic_per_decode_step") or {}).get("after_read_bytes", 0)
    if record.get("decoder_weight_bytes") and floors.get("copy_gb_per_s"):
        floor = (record["decoder_weight_bytes"] + kv_read) / (floors["copy_gb_per_s"] * 1e9) * 1e3
        out["decode_floor_ms"] = floor
        out["decode_over_floor"] = record["decode_ms_per_token"] / floor
    if floors.get("gemm_gflop_per_s"):
        floor = record["prefill_tflops"] * 1e12 / (floors["gemm_gflop_per_s"] * 1e9) * 1e3
        out["prefill_floor_ms"] = floor
        out["prefill_over_floor"] = record["prefill_ms_p50"] / floor
    return out
