"""Qwen2.5-VL at any image size: one artifact, visual-token buckets (issue 13 item 3).

Each bucket has its own routing graphs (its N and K_j) and vision tables (window order,
rotary table, window ids); the vision graph, whose patch axis is free, and the decoder's
segments and heads are shared. An image is resized to the bucket nearest to the grid the
processor would give it, and must then trace exactly like the eager reference at that size.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import tempfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from conftest import sample_inputs, shared_export, tiny, tiny_artifact
from reroute_export import contract as C
from reroute_export.check.layers import run_layer_parity
from reroute_export.check.parity import run_parity
from reroute_export.errors import UserError
from reroute_export.export.artifact import read_manifest
from reroute_export.pipeline import ExportOptions, export_artifact
from reroute_export.preprocess import samples
from reroute_export.plan import make_plan
from reroute_export.runtime import OrtArtifact
from reroute_export.runtime.eager import EagerRuntime

FAMILY = "qwen2.5-vl"
BUCKETS = ((112, 168), (168, 112))  # H x W in pixels, beside the sample's own 224 x 224


@functools.lru_cache(maxsize=None)
def bucketed() -> Path:
    plan = make_plan(tiny(FAMILY).spec, "reroute", budget=32)
    opts = ExportOptions(quiet=True, max_new_tokens=16, max_prompt_tokens=plan.visual_tokens + 96,
                         image_buckets=BUCKETS)
    return shared_export("qwen2.5-vl-buckets", FAMILY, plan, opts)  # test_trt.py plans engines from it too


def test_buckets_share_the_vision_graph_and_segments_and_own_routing_graphs() -> None:
    manifest = read_manifest(bucketed())
    grids = [b["grid"] for b in manifest["buckets"]]
    assert grids == [[1, 16, 16], [1, 8, 12], [1, 12, 8]]
    assert [b["plan"]["visual_tokens"] for b in manifest["buckets"]] == [64, 24, 24]
    roles = set(manifest["graphs"])
    assert [r for r in roles if r.startswith("vision")] == ["vision"]
    assert {C.route(j, k) for j in range(4) for k in (1, 2)} <= roles
    assert sum(r.startswith("segment.") for r in roles) == 5 and sum(r.startswith("head.") for r in roles) == 4
    # K_j of a bucket is the schedule's ratio at its own N
    plan0 = manifest["buckets"][0]["plan"]
    for b in manifest["buckets"][1:]:
        assert [s["ratio"] for s in b["plan"]["stages"]] == [s["ratio"] for s in plan0["stages"]]
    assert manifest["check"]["passed"]  # the post-export check runs the sample's bucket


@pytest.mark.parametrize("size,bucket", [((224, 224), 0), ((150, 100), 1), ((100, 150), 2)])
def test_three_image_sizes_each_trace_like_eager_at_that_size(size: tuple[int, int], bucket: int) -> None:
    art = OrtArtifact.load(bucketed(), verify=False)
    rng = np.random.default_rng(sum(size))
    image = PIL.Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8))  # W x H
    inputs = art.prepare(image, "What is in the picture?")
    k = art._bucket_of(inputs.image_grid_thw)
    assert k == bucket
    got = art.trace(inputs, 8)
    ref = EagerRuntime(tiny(FAMILY), art.bucket_plans[k]).trace(inputs.to_torch(), 8)
    assert got.plan == art.plan_for(inputs) == art.bucket_plans[k]  # the trace reports the plan it ran
    assert got.decisions == ref.decisions
    assert np.abs(np.array(got.last_logits) - np.array(ref.last_logits)).max() <= 1e-4
    assert got.generated_ids == ref.generated_ids and ref.generated_ids


def test_a_grid_of_no_bucket_is_refused_in_one_line() -> None:
    art = OrtArtifact.load(bucketed(), verify=False)
    inputs = sample_inputs(FAMILY)
    bad = dataclasses.replace(inputs, image_grid_thw=torch.tensor([[1, 4, 4]]))
    with pytest.raises(UserError, match=r"none of the artifact's grids \(\[1, 16, 16\], \[1, 8, 12\], \[1, 12, 8\]\)"):
        art.prefill(bad)


def test_llava_takes_no_buckets() -> None:
    loaded = tiny("llava")
    plan = make_plan(loaded.spec, "reroute", budget=32)
    with pytest.raises(UserError, match="buckets are for Qwen2.5-VL"):
        export_artifact(loaded, plan, sample_inputs("llava"), Path(tempfile.mkdtemp()) / "x",
                        ExportOptions(quiet=True, image_buckets=((336, 336),)))


def _sized_images(folder: Path) -> Path:
    """An input set of one photo at three sizes, one per bucket (the reference must follow each)."""
    photo = PIL.Image.open(samples()[1][0]).convert("RGB")  # the cat: a photo, so routing is not all ties
    rows = []
    for i, size in enumerate([(224, 224), (150, 100), (100, 150)]):  # W x H: buckets 0, 1, 2
        photo.resize(size).save(folder / f"size{i}.png")
        rows.append({"image": f"size{i}.png", "prompt": "What is in the picture?"})
    (folder / "inputs.json").write_text(json.dumps(rows))
    return folder / "inputs.json"


def test_parity_runs_each_input_against_the_reference_at_its_bucket(tmp_path: Path) -> None:
    """`parity` and `parity --layers` on images of three sizes: the eager reference runs each
    with its bucket's plan (before, every input got bucket 0's N = 64 and the smaller ones
    stopped with "inputs hold [24] image tokens per sample; the plan is for 64")."""
    inputs = str(_sized_images(tmp_path))
    report = run_parity(bucketed(), inputs=inputs, tokens=4, quiet=True)
    assert report.passed, report.failures
    assert [r["reference"]["decisions"] for r in report.to_json()["inputs"]] == \
        [r["artifact"]["decisions"] for r in report.to_json()["inputs"]]
    kept = [len(r["artifact"]["decisions"]["1"]) for r in report.to_json()["inputs"]]
    art = OrtArtifact.load(bucketed(), verify=False)
    assert kept == [art.bucket_plans[k].stages[0].keep for k in (0, 1, 2)]
    layers = run_layer_parity(bucketed(), inputs=inputs, layers=2, steps=1, quiet=True)
    assert layers.passed, layers.failures


def test_trace_and_its_map_follow_the_bucket_the_image_ran_in(tmp_path: Path, capsys) -> None:
    """`trace --artifact` of an image in bucket 1 (8 x 12 patches: 4 x 6 merged tokens) reports
    that bucket's N and keep counts and draws its 4 x 6 grid, not bucket 0's 8 x 8."""
    from reroute_export.cli import main
    from reroute_export.viz import grid_for

    inputs = _sized_images(tmp_path)
    out, png = tmp_path / "t.json", tmp_path / "map.png"
    code = main(["trace", "--artifact", str(bucketed()), "--image", str(tmp_path / "size1.png"), "--prompt", "What?",
                 "--max-new-tokens", "2", "--json", str(out), "--map", str(png)])
    shown = capsys.readouterr().out
    assert code == 0 and inputs.is_file() and png.is_file()
    got = json.loads(out.read_text())
    art = OrtArtifact.load(bucketed(), verify=False)
    assert got["plan"] == art.bucket_plans[1].to_dict() and got["plan"]["visual_tokens"] == 24
    assert [len(got["decisions"][str(s.layer)]) for s in art.bucket_plans[1].stages] == \
        [s.keep for s in art.bucket_plans[1].stages]
    assert "N=24" in shown
    assert grid_for(FAMILY, 24, art.bucket_grids[1]) == (4, 6)


def test_inspect_lists_the_image_sizes_an_artifact_takes() -> None:
    from reroute_export.inspect_artifact import format_report, inspect

    report = inspect(bucketed(), verify=False)
    buckets = read_manifest(bucketed())["buckets"]
    assert [(b["image_size"], b["grid"], b["visual_tokens"], b["keep"]) for b in report["image_sizes"]] == \
        [([224, 224], [1, 16, 16], 64, [s["keep"] for s in buckets[0]["plan"]["stages"]]),
         ([112, 168], [1, 8, 12], 24, [s["keep"] for s in buckets[1]["plan"]["stages"]]),
         ([168, 112], [1, 12, 8], 24, [s["keep"] for s in buckets[2]["plan"]["stages"]])]
    text = format_report(report)
    assert "image sizes: 3 " in text
    assert any(line.split()[:4] == ["1", "112x168", "1x8x12", "24"] for line in text.splitlines())
    single = inspect(tiny_artifact(FAMILY), verify=False)  # one image size
    assert single["image_sizes"] is None and "image sizes" not in format_report(single)


def test_one_vision_graph_holds_the_vision_weights_once_and_takes_each_sizes_tables() -> None:
    """The vision graph's patch axis is free and every grid-dependent table is an input (the
    shipped vision_grids.npz holds each bucket's, at the shapes the manifest gives TensorRT),
    so the artifact holds the vision tower's weights once however many sizes it takes."""
    import onnx

    folder = bucketed()
    manifest = read_manifest(folder, verify=False)
    assert sorted(p.name for p in folder.glob("vision*")) == ["vision.onnx", "vision.onnx.data"]
    graph = onnx.load(str(folder / C.VISION), load_external_data=False).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert list(dims) == [C.PIXEL_VALUES, *C.VISION_TABLES]
    assert all(isinstance(d[0], str) and d[0] for d in dims.values())  # the patch axis is symbolic
    art = OrtArtifact.load(folder, verify=False)
    for k, bucket in enumerate(manifest["buckets"]):
        tables = art.vision_tables[k]
        assert list(tables) == list(C.VISION_TABLES)
        assert {n: list(a.shape) for n, a in tables.items()} == \
            {n: s for n, s in bucket["vision_inputs"].items() if n != C.PIXEL_VALUES}
        assert len(tables[C.WINDOW_BLOCKS]) == bucket["vision_inputs"][C.PIXEL_VALUES][0] == np.prod(bucket["grid"])
    assert not np.array_equal(art.vision_tables[1][C.WINDOW_INDEX], art.vision_tables[2][C.WINDOW_INDEX])
