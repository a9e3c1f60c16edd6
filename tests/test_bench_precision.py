"""`bench --precisions`: one record per (method, precision) of the onnxruntime backend, each
with its weight bytes, judged against fp32, and timed against the machine's floors measured
in the same run (bench/floors.py). No timing assertions: figures must be positive and finite,
and the ratios must follow from the records' own numbers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_artifact
from reroute_export.bench import floors, report, run as bench_run

MODEL, BUDGET = "tiny-llava", 32


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    root = tmp_path_factory.mktemp("artifacts")
    (root / f"{MODEL}-reroute").symlink_to(tiny_artifact("llava", "reroute", budget=BUDGET), target_is_directory=True)
    return bench_run.run_bench(MODEL, BUDGET, ["reroute"], ["onnxruntime"], repeats=1, warmup=0, threads=1,
                               progress=False, decode_tokens=3, artifacts=root, precisions=["fp32", "int8", "int4"])


def test_one_record_per_precision_with_weight_bytes(records) -> None:
    by = {r["precision"]: r for r in records}
    assert set(by) == {"fp32", "int8", "int4"} and all(r["status"] == "ok" for r in records)
    assert [r["baseline_precision"] for r in records] == [True, False, False]
    for r in records:
        assert r["dtype"] == "fp32"  # weight-only: activations stay fp32
        assert 0 < r["decoder_weight_bytes"] < r["weight_bytes"]
    # int8 codes + scales: under 0.35 of fp32's decoder bytes; int4 under int8 (the LM head and
    # head q/k at 8 bits, so neither reaches 1/4 or 1/8)
    assert by["int4"]["decoder_weight_bytes"] < by["int8"]["decoder_weight_bytes"] < by["fp32"]["decoder_weight_bytes"]
    assert by["int4"]["quantization"] == {"method": "rtn", "block": 128, "encoding": "matmulnbits",
                                          "routing_projections": "int8"}
    assert "quantize_s" in by["int4"] and "export_s" in by["fp32"]


def test_quantized_records_are_judged_against_fp32(records) -> None:
    by = {r["precision"]: r for r in records}
    assert "agreement" not in by["fp32"]  # no torch backend ran: nothing to judge fp32 against
    for p in ("int8", "int4"):
        a = by[p]["agreement"]
        assert a["reference"] == "onnxruntime fp32"
        assert len(a["stage_overlap"]) == len(by[p]["stages"])
        assert all(0 <= x <= 1 for x in a["stage_overlap"])
        assert 0 <= a["tokens_equal_fraction"] <= 1
    # the overlap is what check.loop.judge measures on the two memory passes' decisions
    fp32, int8 = by["fp32"]["decisions"], by["int8"]["decisions"]  # per stage: kept visual indices
    assert len(fp32) == len(int8) == len(by["int8"]["agreement"]["stage_overlap"])
    for x, kept, other in zip(by["int8"]["agreement"]["stage_overlap"], fp32, int8):
        assert x == pytest.approx(len(set(kept) & set(other)) / len(kept))


def test_floors_are_measured_and_ratios_follow(records) -> None:
    f = records[0]["floors"]
    assert _positive(f["copy_gb_per_s"]) and _positive(f["gemm_gflop_per_s"])
    assert all(r["floors"] == f for r in records)  # measured once per run
    for r in records:
        read = r["kv_traffic_per_decode_step"]["after_read_bytes"]
        assert r["decode_floor_ms"] == pytest.approx((r["decoder_weight_bytes"] + read) / (f["copy_gb_per_s"] * 1e6))
        assert r["decode_over_floor"] == pytest.approx(r["decode_ms_per_token"] / r["decode_floor_ms"])
        assert r["prefill_floor_ms"] == pytest.approx(r["prefill_tflops"] * 1e6 / f["gemm_gflop_per_s"])
        assert r["prefill_over_floor"] > 0


def test_summary_lines_per_precision(records) -> None:
    summary = report.summarize(records)
    per = summary["per_precision"]["reroute"]
    assert set(per) == {"fp32", "int8", "int4"}
    fp32 = next(r for r in records if r["precision"] == "fp32")
    int4 = next(r for r in records if r["precision"] == "int4")
    assert per["int4"]["decode_speedup_vs_fp32"] == pytest.approx(fp32["decode_ms_per_token"] / int4["decode_ms_per_token"])
    assert per["int4"]["weight_bytes_over_fp32"] == pytest.approx(int4["weight_bytes"] / fp32["weight_bytes"])
    assert "weight_bytes_over_fp16" not in per["int4"]  # no fp16 record ran: no ratio is invented
    lines = report.summary_lines(summary)
    assert any(line.startswith("onnxruntime int4 (reroute): weights ") and "routing overlap per stage" in line
               for line in lines)
    assert any(line.startswith("floors measured in this run: copy ") for line in lines)
    # the tracked ratios stay about the baseline records
    assert report.find(records, "reroute", "onnxruntime") is fp32


def test_artifact_weight_bytes_read_the_headers(tmp_path: Path) -> None:
    """The header count equals the bytes of the tensors themselves, loaded."""
    import onnx
    from onnx import numpy_helper

    from reroute_export.export.artifact import read_manifest

    art = tiny_artifact("llava", "reroute", budget=BUDGET)
    counted = floors.artifact_weight_bytes(art)
    total = 0
    for name in read_manifest(art, verify=False)["graphs"].values():
        model = onnx.load(art / name)
        total += sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    assert counted["weight_bytes"] == total


def test_gemm_rate_runs_the_shape_asked() -> None:
    out = floors.gemm_rate(8, 16, 32, threads=1, repeats=2)
    assert out["shape"] == [8, 16, 32] and _positive(out["gemm_gflop_per_s"])
    bw = floors.copy_bandwidth(1, mib=8, repeats=2)
    assert _positive(bw["copy_gb_per_s"]) and bw["copy_mib"] == 8
    assert np.isfinite(bw["copy_gb_per_s"])
