"""Streamed export (`--random-weights`): parameters on the meta device, each weight drawn
and written one tensor at a time. What must hold: the files on disk carry exactly the
weights `registry.build_random` gives the materialised model, so the artifact matches that
model as closely as an in-memory export does (checked by the post-export parity check and
by reading weights back), and nothing of the model is ever materialised during export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from reroute_export import registry, tiny
from reroute_export.cli import run
from reroute_export.errors import UserError
from reroute_export.export.stream import WeightStream, is_streamed, random_source
from reroute_export.registry import load

from conftest import streamed_tiny_llava


def test_random_weights_are_a_function_of_the_name() -> None:
    """Materialised on the CPU (the parity reference) == drawn one at a time (the stream)."""
    cpu = load("tiny-llava", torch.float32, "cpu", random_weights=True)
    meta = load("tiny-llava", torch.float32, "meta", random_weights=True)
    assert is_streamed(meta.model) and not is_streamed(cpu.model)
    source = random_source(meta.model)
    for name, param in list(cpu.model.named_parameters())[::7]:
        assert torch.equal(source(name, tuple(param.shape), param.dtype), param.detach()), name
    again = load("tiny-llava", torch.float32, "cpu", random_weights=True)
    assert all(torch.equal(a, b) for a, b in zip(cpu.model.parameters(), again.model.parameters()))


@pytest.mark.parametrize("shape", [(4097, 1031), (1025, 4099), (40, 7, 100003)])
def test_a_large_matrix_drawn_in_blocks_equals_one_draw(shape: tuple[int, ...]) -> None:
    """random_tensor draws a matrix above DRAW_ELEMENTS a block of rows at a time (bounded
    memory for a 7B's embeddings); the values must be those of one draw of the whole shape,
    odd row lengths included (blocks of a multiple of 16 elements)."""
    import zlib

    assert tiny._rows_per_draw(shape) is not None and tiny._rows_per_draw(shape) < shape[0]
    gen = torch.Generator().manual_seed(3 * 1_000_003 + zlib.crc32(b"m.weight"))
    whole = (torch.randn(shape, generator=gen, dtype=torch.float32) * 0.02).to(torch.float16)
    assert torch.equal(tiny.random_tensor("m.weight", shape, torch.float16, 0.02, seed=3), whole)


def test_stand_ins_hold_no_data_and_restore_the_meta_parameters() -> None:
    meta = load("llava-1.5-7b", torch.float16, "meta", random_weights=True)  # 7B: only possible without data
    stream = WeightStream(meta.model, random_source(meta.model))
    q = meta.model.model.language_model.layers[0].self_attn.q_proj
    with stream.stand_ins():
        w = q.weight
        assert w.device.type == "cpu" and w.shape == (4096, 4096) and w.stride() == (0, 0)
        assert stream.names[id(w)] == "model.language_model.layers.0.self_attn.q_proj.weight"
    assert q.weight.device.type == "meta"


def test_streamed_export_matches_the_materialised_model() -> None:
    out = streamed_tiny_llava()  # export --model tiny-llava --random-weights --budget 32
    m = json.loads((out / "manifest.json").read_text())
    assert m["random_weights"] is True and m["weights_written"] == "streamed"
    # The post-export check rebuilt the fp32 weights on the CPU and ran the artifact against them.
    assert m["check"]["passed"] is True
    assert m["check"]["metrics"]["decision_exact"] == 1 and m["check"]["metrics"]["logits_max_abs"] < 1e-4
    for graph in m["graphs"]:
        assert m["stream_check"][graph]["checker"] == "passed"
        if not graph.startswith("route"):  # routing graphs hold no weights
            assert m["stream_check"][graph]["weights_read_back"], graph
    # one weights file: every graph's weights in it, each stored once
    assert not list(out.glob("*.onnx.data"))
    import onnx

    def places(name: str) -> list[tuple[str, str]]:
        proto = onnx.load(out / name, load_external_data=False)
        return [tuple(e.value for e in t.external_data if e.key in ("location", "offset"))
                for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]

    spots = [p for name in m["graphs"].values() for p in places(name)]
    assert {loc for loc, _ in spots} == {"weights.data"}
    assert len(set(spots)) == len(spots)  # no two graphs point at the same bytes: each weight is in one graph
    # parity reloads the same seeded weights from the manifest's record
    assert run(["parity", "--artifact", str(out), "--max-new-tokens", "4", "--quiet"]) == 0
    from reroute_export.inspect_artifact import format_report, inspect

    text = format_report(inspect(out))
    assert "weights: seeded random (--random-weights), streamed into one shared weights.data" in text
    assert "post-export check: passed" in text


def test_inspect_reports_a_skipped_check_as_skipped() -> None:
    from reroute_export.inspect_artifact import _check_summary

    c = _check_summary({"passed": None, "skipped": "skipped: the check needs ~53 GiB"})
    assert c["passed"] is None and c["skipped"].startswith("skipped:")


def test_random_weights_take_a_registered_name(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    model, pre = registry.build(load("tiny-llava").spec)
    tiny.save_checkpoint(model, pre, ckpt)
    with pytest.raises(UserError, match="--random-weights takes a registered model name"):
        load(str(ckpt), random_weights=True)


# ---------------------------------------------------------------- checkpoints, read tensor by tensor


def _checkpoint(tmp_path: Path, spec: str) -> tuple[Path, torch.nn.Module]:
    model, pre = registry.build(load(spec).spec)
    folder = tmp_path / spec
    tiny.save_checkpoint(model, pre, folder)  # transformers writes the hub layout (e.g. language_model.model.*)
    return folder, model


@pytest.mark.parametrize("spec", ["tiny-qwen2.5-vl"])  # llava's renames: the unit test below
def test_streamed_checkpoint_export_matches_transformers_loader(tmp_path: Path, spec: str) -> None:
    """--stream-weights reads each weight from the safetensors files through the family's
    key renames; the post-export check's reference is transformers' own from_pretrained."""
    folder, _ = _checkpoint(tmp_path, spec)
    out = tmp_path / "art"
    assert run(["export", "--model", str(folder), "--stream-weights", "--budget", "32", "--output", str(out),
                "--quiet"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["weights_written"] == "streamed" and m["random_weights"] is False
    assert m["check"]["passed"] is True and m["check"]["metrics"]["decision_exact"] == 1
    assert m["check"]["metrics"]["logits_max_abs"] < 1e-4


def test_checkpoint_source_takes_both_key_layouts_and_names_what_is_missing(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from reroute_export.export.stream import checkpoint_source
    from reroute_export.families.llava import Llava

    folder, model = _checkpoint(tmp_path, "tiny-llava")
    (file,) = folder.glob("*.safetensors")
    hub = load_file(file)
    assert any(k.startswith("language_model.model.") for k in hub)  # the llava-hf layout
    params = dict(model.named_parameters())
    name = "model.language_model.layers.3.mlp.up_proj.weight"
    read = checkpoint_source(folder, model, Llava.checkpoint_renames)
    assert torch.equal(read(name, tuple(params[name].shape), torch.float32), params[name].detach())
    # the module layout (keys as named_parameters) passes through unchanged
    save_file({n: p.detach().contiguous() for n, p in params.items()}, file, metadata={"format": "pt"})
    read = checkpoint_source(folder, model, Llava.checkpoint_renames)
    assert torch.equal(read(name, tuple(params[name].shape), torch.float32), params[name].detach())
    # a missing weight is named before any work
    save_file({n: p.detach().contiguous() for n, p in params.items() if n != name}, file, metadata={"format": "pt"})
    with pytest.raises(UserError, match="lacks 1 of the model's weights.*up_proj"):
        checkpoint_source(folder, model, Llava.checkpoint_renames)
