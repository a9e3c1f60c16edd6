"""`bench` on the tiny LLaVA: one round, two methods, both live backends, TensorRT reported
as skipped. Checks the record contract and that every figure is a positive finite
number; no timing assertions (CI machines are shared and noisy)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from conftest import tiny_artifact
from reroute_export.bench import cli as bench_cli, report, run as bench_run, timing, traffic
from reroute_export.errors import UserError

MODEL, BUDGET, METHODS = "tiny-llava", 32, ("none", "reroute")
TIMED = ("vision_ms", "prefill_ms_p50", "prefill_ms_p90", "decode_ms_per_token")
ANALYTIC = ("theoretical_speedup", "prefill_tflops", "prefill_tflops_none", "prefill_tflops_with_vision",
            "kv_cache_bytes_fp16")


def _artifacts(tmp_path: Path) -> Path:
    """The session's tiny artifacts (same plans: budget 32) under the names bench reuses."""
    root = tmp_path / "artifacts"
    root.mkdir()
    for m in METHODS:
        (root / f"{MODEL}-{m}").symlink_to(tiny_artifact("llava", m, budget=BUDGET), target_is_directory=True)
    return root


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reroute-export")
    bench_cli.register_cli(parser.add_subparsers(dest="command"))
    return parser


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_cli_writes_records_and_summary(tmp_path: Path) -> None:
    out, md = tmp_path / "out.json", tmp_path / "out.md"
    args = _parser().parse_args([
        "bench", "--model", MODEL, "--budget", str(BUDGET), "--methods", ",".join(METHODS),
        "--backends", "torch,onnxruntime,tensorrt", "--repeats", "1", "--warmup", "0", "--decode-tokens", "2",
        "--artifacts", str(_artifacts(tmp_path)), "--json", str(out), "--markdown", str(md), "--quiet",
    ])
    assert args.func is bench_cli.cmd_bench and args.threads == 2
    assert args.func(args) == 0
    payload = json.loads(out.read_text())
    records = payload["records"]
    assert [(r["method"], r["backend"]) for r in records] == [
        (m, b) for b in ("torch", "onnxruntime", "tensorrt") for m in METHODS]
    for r in records:
        assert all(_positive(r[k]) for k in ANALYTIC), r
        if r["backend"] == "tensorrt":
            assert r["status"].startswith("skipped: ")  # never a fake timing
            assert "prefill_ms_p50" not in r
            continue
        assert r["status"] == "ok"
        assert all(_positive(r[k]) for k in TIMED), r
        assert math.isfinite(r["peak_mem_mb"]) and r["peak_mem_mb"] >= 0
        assert _positive(r["peak_rss_mb"]) and r["peak_rss_mb"] >= r["peak_mem_mb"]
        assert r["prefill_ms_p90"] >= r["prefill_ms_p50"]
        assert r["threads"] == 2 and r["repeats"] == 1
    none, rr = records[0], records[1]
    assert none["theoretical_speedup"] == 1 and rr["theoretical_speedup"] > 1
    assert rr["kv_cache_bytes_fp16"] < none["kv_cache_bytes_fp16"]
    summary = payload["summary"]
    assert set(summary["per_backend"]) == {"torch", "onnxruntime"}
    for entry in summary["per_backend"].values():
        assert _positive(entry["reroute_speedup_vs_none"]) and _positive(entry["fraction_of_theoretical"])
    assert _positive(summary["onnxruntime_over_torch"])
    for m in METHODS:  # the artifact reproduces the eager reference: same decisions, same greedy tokens
        agree = summary["greedy_tokens_agree"][m]["onnxruntime_vs_torch"]
        assert agree["tokens_equal_fraction"] == 1.0 and agree["decisions_equal"] is True
    assert len(records[1]["decisions"]) == 4 and len(records[1]["greedy_tokens"]) == 3  # prefill + 2 steps
    assert payload["machine"]["cpu_count"] >= 1
    assert "| reroute | onnxruntime |" in md.read_text()
    _check_traffic(records, summary, md.read_text())


def _expected_traffic(method: str, prompt: int, buffers: list[int], elem: int) -> dict:
    """Per layer, from keep_per_layer (not plan.cache_tokens): the prompt's cache rows."""
    from reroute_export.plan import make_plan
    from conftest import tiny

    spec = tiny("llava").spec
    plan = make_plan(spec, method, budget=None if method == "none" else BUDGET)
    row = 2 * spec.text.num_kv_heads * spec.text.head_dim * elem
    rows = [prompt - plan.visual_tokens + k for k in plan.keep_per_layer()]
    stage = [s for s, layers in enumerate(plan.segments) for _ in layers]
    return {"before": sum(p * row + (p + 1) * row for p in rows), "write": plan.num_layers * row,
            "read": sum(buffers[s] * row for s in stage)}


def _check_traffic(records, summary, md: str) -> None:
    """KV-cache bytes per decode step: one row per layer written into the fixed buffers, all
    their rows read (ONNX Runtime: the run's buffers, its prompt rows + the pass's tokens,
    fewer than the artifact's M_s); the concat layout's whole-cache copy at the prompt's lengths."""
    for r in records:
        t = r["kv_traffic_per_decode_step"]
        assert t["prompt_tokens"] == r["prompt_tokens"] and t["elem_bytes"] == [4]
        if r["backend"] == "onnxruntime":
            manifest = json.loads((Path(tiny_artifact("llava", r["method"], budget=BUDGET)) / "manifest.json")
                                  .read_text())
            assert t["buffer_rows"] == [p + r["decode_tokens"] + 1 for p in t["prompt_rows"]]
            assert all(n < m for n, m in zip(t["buffer_rows"], manifest["decoder"]["cache_tokens"]))
        want = _expected_traffic(r["method"], r["prompt_tokens"], t["buffer_rows"], 4)
        assert (t["before_copy_bytes"], t["after_write_bytes"], t["after_read_bytes"]) == \
            (want["before"], want["write"], want["read"]), r["method"]
        assert t["before_copy_read_bytes"] + t["before_copy_write_bytes"] == t["before_copy_bytes"]
        assert t["after_write_bytes"] * 10 < t["before_copy_bytes"]
    by_method = summary["kv_traffic_per_decode_step"]
    assert set(by_method) == set(METHODS) and all(t["backend"] == "onnxruntime" for t in by_method.values())
    assert by_method["reroute"]["before_copy_bytes"] < by_method["none"]["before_copy_bytes"]  # fewer rows cached
    assert "reroute: KV cache traffic removed: " in md and " KB/step (one new row per layer)" in md


def test_run_bench_torch_only_without_export() -> None:
    records = bench_run.run_bench(MODEL, BUDGET, ["pdrop"], ["torch"], repeats=1, warmup=0, threads=1,
                              progress=False, decode_tokens=1)
    (r,) = records
    assert r["method"] == "pdrop" and r["backend"] == "torch" and r["threads"] == 1
    assert all(_positive(r[k]) for k in TIMED + ANALYTIC)
    summary = report.summarize(records)
    assert summary["per_backend"] == {} and "onnxruntime_over_torch" not in summary


def test_torch_static_backend_matches_the_eager_reference() -> None:
    """The export's static-shape modules run by torch (eagerly on a CPU; CUDA graphs on a GPU):
    identical decisions and greedy tokens to the eager engine, and the static/eager ratio."""
    records = bench_run.run_bench("tiny-qwen2.5-vl", BUDGET, ["reroute"], ["torch", "torch-static"], repeats=1,
                              warmup=0, threads=1, progress=False, decode_tokens=3)
    eager, static = records
    assert static["backend"] == "torch-static" and static["status"] == "ok" and static["cuda_graphs"] is False
    assert all(_positive(static[k]) for k in TIMED)
    assert static["decisions"] == eager["decisions"] and len(static["decisions"]) == 4
    assert static["greedy_tokens"] == eager["greedy_tokens"]
    summary = report.summarize(records)
    assert _positive(summary["static_over_eager"]) and _positive(summary["static_over_eager_decode"])
    assert summary["greedy_tokens_agree"]["reroute"]["torch-static_vs_torch"]["decisions_equal"] is True


def test_random_weights_run_in_another_dtype_skip_the_artifact_backends() -> None:
    records = bench_run.run_bench(MODEL, BUDGET, ["reroute"], ["torch", "onnxruntime"], repeats=1, warmup=0,
                              progress=False, decode_tokens=1, dtype="bf16", random_weights=True)
    torch_rec, ort = records
    assert torch_rec["status"] == "ok" and torch_rec["dtype"] == "bf16" and torch_rec["random_weights"] is True
    assert ort["status"].startswith("skipped: onnxruntime exports the fp32 CPU model")


@pytest.mark.parametrize("kwargs,message", [
    ({"device": "cuda"}, "--device cuda: no CUDA device here"),
    ({"dtype": "int4"}, "unknown --dtype int4"),
    ({"methods": ["reroute", "prune"]}, "unknown method"),
    ({"backends": ["tvm"]}, "unknown backend"),
    ({"repeats": 0}, "--repeats must be >= 1"),
    ({"precisions": ["int3"]}, "unknown precision"),
    ({"precisions": ["fp32", "int4"]}, "applies to the onnxruntime backend"),
    ({"budget": 1000}, "budget 1000 out of range"),
    ({"attention": "flash"}, "unknown attention form"),
    ({"attention": "ort-gqa"}, "applies to the onnxruntime backend's artifacts"),
])
def test_bad_input_is_one_line_user_error(kwargs, message) -> None:
    import torch

    if kwargs.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    call = {"model_name": MODEL, "budget": BUDGET, "methods": ["reroute"], "backends": ["torch"],
            "repeats": 1, "warmup": 0, "progress": False, **kwargs}
    with pytest.raises(UserError, match=message) as e:
        bench_run.run_bench(**call)
    assert "\n" not in str(e.value)


def test_kv_traffic_by_hand() -> None:
    """Two stages (layers 0-1 keep all 10 visual tokens, layers 2-3 keep 4) after a 16-token
    prompt: 16 and 10 cache rows; one K+V row of a layer is 2 * 2 heads * 8 dims * 2 bytes."""
    from reroute_export.plan import RoutingPlan, Stage

    plan = RoutingPlan("pdrop", 4, 10, (Stage(2, 4, 0.4),))
    t = traffic.kv_traffic(plan, 2, 8, 16, 2, [20, 14], "test")
    row = 2 * 2 * 8 * 2
    assert t["prompt_rows"] == [16, 10] and t["buffer_rows"] == [20, 14]
    assert t["before_copy_read_bytes"] == (16 + 16 + 10 + 10) * row
    assert t["before_copy_write_bytes"] == t["before_attention_read_bytes"] == (17 + 17 + 11 + 11) * row
    assert t["after_write_bytes"] == 4 * row and t["after_read_bytes"] == (20 + 20 + 14 + 14) * row
    line = traffic.traffic_line("pdrop", t)
    assert line.startswith("pdrop: KV cache traffic removed: 6.91 KB/step") and "→ 256 B/step" in line
    with pytest.raises(ValueError):
        traffic.kv_traffic(plan, 2, 8, 16, 2, [20], "test")


def test_percentile_matches_numpy() -> None:
    import numpy as np

    xs = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0]
    for q in (0, 50, 90, 100):
        assert timing.percentile(xs, q) == pytest.approx(np.percentile(xs, q))


def test_ort_gqa_artifacts_read_only_the_valid_rows(tmp_path: Path) -> None:
    """`--attention ort-gqa`: the onnxruntime record runs that form (same decisions and tokens
    as the eager reference) and its decode floor counts the past_length + 1 rows
    GroupQueryAttention reads, not the fixed buffers."""
    recs = bench_run.run_bench(MODEL, BUDGET, ["fastv"], ["torch", "onnxruntime"], repeats=1, warmup=0,
                               threads=1, progress=False, decode_tokens=3, artifacts=tmp_path, attention="ort-gqa")
    ort = next(r for r in recs if r["backend"] == "onnxruntime")
    assert ort["status"] == "ok" and ort["attention"] == "ort-gqa", ort.get("status")
    assert ort["agreement"]["decisions_equal"] and ort["agreement"]["tokens_equal_fraction"] == 1.0
    t = ort["kv_traffic_per_decode_step"]
    assert t["buffer_rows"] == [p + 1 for p in t["prompt_rows"]] and "ort-gqa" in t["buffer_rows_from"]
    manifest = json.loads((tmp_path / f"{MODEL}-fastv-ort-gqa" / "manifest.json").read_text())
    assert manifest["decoder"]["attention"] == "ort-gqa"
    assert all(m > p + 1 for m, p in zip(manifest["shapes"]["cache_tokens"], t["prompt_rows"]))


def test_memory_breakdown_script_reports_each_phase(tmp_path) -> None:
    """benchmarks/memory_breakdown.py (the 7B int4 breakdown in BENCHMARKS.md) on the tiny
    artifact: sessions by graph kind, the KV buffers, then vision, prefill and decode peaks;
    a missing folder is a one-line error."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_breakdown.py"
    done = subprocess.run([sys.executable, str(script), str(tiny_artifact("llava")), "--decode-tokens", "2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("loaded in ") and any(x.strip().startswith("segment  sessions +") for x in lines)
    assert [x.split()[0] for x in lines[-3:]] == ["vision", "prefill", "decode"] and "peak " in lines[-1]
    bad = subprocess.run([sys.executable, str(script), str(tmp_path / "none")], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "not found" in bad.stderr


def test_a_bench_where_every_backend_is_skipped_fails_in_one_line(tmp_path: Path, capsys) -> None:
    """`bench --backends tensorrt` without TensorRT: the table still shows the planner's figures
    and why each record was skipped, and the command exits 2 (a CI job must not read nothing
    measured as a pass)."""
    from reroute_export.build.trt import tensorrt_status
    from reroute_export.cli import main

    if tensorrt_status()[0]:
        pytest.skip("TensorRT and a GPU are here: the tensorrt backend runs")
    out = tmp_path / "b.json"
    code = main(["bench", "--model", MODEL, "--budget", str(BUDGET), "--methods", "reroute", "--backends", "tensorrt",
                 "--repeats", "1", "--warmup", "0", "--json", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "bench measured nothing: every backend was skipped (TensorRT not installed)" in err
    assert json.loads(out.read_text())["records"][0]["status"] == "skipped: TensorRT not installed"
