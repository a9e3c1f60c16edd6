"""Printed messages say what is true: a slowdown is "slower", a row that passes shows the
bound it passed (or that none applied), a folder is printed with one slash, and the
TensorRT estimate separates what running needs from the workspace limit."""

from __future__ import annotations

from reroute_export import paths
from reroute_export.bench.report import TARGETS, speed_text, summarize, summary_lines
from reroute_export.build import trt as B
from reroute_export.quantize.report import print_summary
from reroute_export.check.parity import ParityReport, summary_rows
from reroute_export.check.tolerances import tolerances
from reroute_export.cli import print_trt

MIB = 1 << 20


# ---------------------------------------------------------------- bench


def test_speed_text_says_slower_for_a_slowdown() -> None:
    assert speed_text(0.55) == "1.82x slower"
    assert speed_text(2.0) == "2.00x faster" and speed_text(1.0) == "1.00x faster"


def test_bench_summary_of_a_slower_reroute() -> None:
    records = [{"method": m, "backend": "onnxruntime", "status": "ok", "prefill_ms_p50": ms, "theoretical_speedup": t}
               for m, ms, t in (("none", 10.0, 1.0), ("reroute", 18.2, 1.6))]
    lines = summary_lines(summarize(records))
    line = next(x for x in lines if "than none" in x)
    assert "1.82x slower than none" in line and "faster" not in line, line
    assert summarize(records)["targets"] == TARGETS


# ---------------------------------------------------------------- parity


def _report(precision: str, **metrics: float) -> ParityReport:
    m = {"decision_exact": 0.5, "decision_overlap": 0.8, "first_differing_stage": 4, "logits_max_abs": 0.3,
         "logits_mean_abs": 0.05, "logits_cosine": 0.95, "top1_agree": False, "top5_overlap": 0.6,
         "token_agreement": 0.0, "first_divergent_step": 0, "vision_max_abs": 0.02, "vision_mean_abs": 0.001,
         "vision_cosine": 0.999, **metrics}
    report = ParityReport("int8/", "tiny-llava", precision, tolerances("llava", precision), 16)
    report.inputs.append({"input": "astronaut", "metrics": m, "failures": []})
    return report


def test_int8_row_shows_each_value_with_its_bound() -> None:
    (row,) = summary_rows(_report("int8"))
    assert row["result"] == "pass"
    assert row["tokens"] == "0.00 (not checked), first differs at step 0"  # why 0.00 passes
    assert row["cosine"] == "0.95000 (≥ 0.9)"
    assert row["routing"] == "overlap 0.80, exact stages 0.50, first differs: layer 4 (overlap ≥ 0.7)"
    assert row["logits max diff"] == "3.00e-01 (not checked)"


def test_fp32_row_shows_the_tight_bounds() -> None:
    (row,) = summary_rows(_report("fp32", decision_exact=1.0, decision_overlap=1.0, first_differing_stage=None,
                                  token_agreement=1.0, first_divergent_step=None, logits_max_abs=2e-5,
                                  vision_max_abs=3e-5))
    assert row["routing"] == "exact (exact stages ≥ 1)"
    assert row["tokens"] == "1.00 (≥ 1)"
    assert row["logits max diff"] == "2.00e-05 (≤ 0.0001)"
    assert row["vision"] == "max diff 3.00e-05 (≤ 0.0001)"


def test_fp16_vision_cell_shows_the_bounded_cosine() -> None:
    (row,) = summary_rows(_report("fp16"))
    assert row["vision"] == "max diff 2.00e-02 (not checked), cosine 0.99900 (≥ 0.99)"


# ---------------------------------------------------------------- paths


def test_folders_print_with_one_slash() -> None:
    assert paths.shown_dir("int8/") == paths.shown_dir("int8") == "int8/"
    assert paths.shown_dir("./out//") == "out/"


def test_calibrate_summary_path_has_one_slash(capsys) -> None:
    manifest = {"model": "tiny-qwen2.5-vl", "precision": "int8",
                "quantization": {"library": "onnxruntime", "version": "1.25", "graphs": {"prefill": {"quantized_nodes": 3}},
                                 "calibration": {"samples": ["a", "b"]}},
                "calibration_parity": {"measured": False, "reason": "no samples"}}
    print_summary(manifest, "int8/")
    out = capsys.readouterr().out
    assert out.startswith("wrote int8/ (tiny-qwen2.5-vl") and "//" not in out, out


# ---------------------------------------------------------------- TensorRT memory


def _small_model_memory() -> dict:
    """A 4.6 MiB model (the tiny one) with the default 4 GiB workspace limit."""
    weights = {"vision": int(0.6 * MIB), "prefill": 2 * MIB, "decode": 2 * MIB}
    manifest = {"shapes": {"max_prompt_tokens": 160, "hidden_size": 64, "head_dim": 16}}
    return B.memory_estimate(weights, kv_bytes=MIB // 4, workspace_mib=4096, device_memory_gib=8,
                             act_bytes=B.activation_bytes(manifest, 4))


def test_running_memory_is_the_need_not_the_workspace() -> None:
    mem = _small_model_memory()
    need = mem["weights_gib"] + mem["kv_io_peak_gib"] + mem["activations_gib"]
    assert abs(mem["run_gib"] - need) < 1e-12 and mem["run_gib"] < 0.01  # MiB, not 4 GiB
    assert mem["workspace_gib"] == 4.0 and mem["activations_gib"] > 0
    text = B.memory_text(mem)
    assert text.startswith(f"running {B.size_text(mem['run_gib'])} (weights 4.6 MiB + KV cache 256.0 KiB"), text
    assert "workspace limit 4.00 GiB (a cap on tactic scratch space, not a need)" in text


def test_size_text_scales() -> None:
    assert B.size_text(4.01) == "4.01 GiB" and B.size_text(4.6 / 1024) == "4.6 MiB"
    assert B.size_text(0.5 / 2**20) == "0.5 KiB"


def test_print_trt_reports_each_part(capsys) -> None:
    rec = {"memory": _small_model_memory(), "built": False, "reason": "no TensorRT here", "device": "jetson-orin",
           "trt_version": "10.3", "warnings": []}
    print_trt(rec, "out-trt/")
    out = capsys.readouterr().out
    assert "copy out-trt/ to the device" in out and "bash out-trt/build_trt.sh" in out and "//" not in out
    # 4.6 MiB weights + 0.25 MiB KV (the fixed buffers, once) + activations; the 4 GiB workspace only bounds the build
    assert "running 5.9 MiB (weights 4.6 MiB" in out and "running 4.01 GiB" not in out, out
    assert "building up to 4.01 GiB (3 copies of the largest graph + the workspace limit)" in out
    assert "activations" in out and "workspace limit 4.00 GiB" in out
