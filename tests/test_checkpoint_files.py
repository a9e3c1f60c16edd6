"""Damaged weight files: a truncated `.safetensors` (header or body), a truncated `.bin`, an
index naming a missing shard are one line naming the file, exit 2, nothing written, in
load, streamed export and trace alike; `.bin`-only checkpoints load where they fit and
are refused in one line where they do not."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from reroute_export import tiny
from reroute_export.checkpoint_files import check_weight_files, load_bytes
from reroute_export.errors import UserError
from reroute_export.families.llava import Llava
from reroute_export.registry import load
from test_bad_inputs import IMAGE, one_line_error


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny LLaVA saved as transformers saves it (one model.safetensors). Copy before damaging."""
    folder = tmp_path_factory.mktemp("ckpt") / "tiny-llava-ckpt"
    model, pre = Llava.tiny()
    tiny.save_checkpoint(model, pre, folder)
    return folder


@pytest.fixture()
def copy(checkpoint, tmp_path) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint, folder)
    return folder


def _weights(folder: Path) -> Path:
    (file,) = folder.glob("*.safetensors")
    return file


def _cut(path: Path, keep: int) -> None:
    """Keep the first `keep` bytes (negative: drop that many from the end), as a cut download does."""
    path.write_bytes(path.read_bytes()[:keep])


DAMAGE = {  # how -> (keep bytes (negative: drop from the end), what the message says)
    "length": (4, "shorter than the 8-byte header length"),
    "header": (100, "its header claims"),
    "body": (-1000, "truncated: its tensors need"),
}


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_truncated_safetensors_is_one_line_everywhere(how, copy, tmp_path, capsys) -> None:
    keep, said = DAMAGE[how]
    weights = _weights(copy)
    _cut(weights, keep)
    with pytest.raises(UserError, match=f"damaged checkpoint file {weights}: .*{said}"):
        load(str(copy))
    out = tmp_path / "out"
    for args in (["trace", "--model", copy, "--budget", "8", "--image", IMAGE, "--prompt", "hi"],
                 ["export", "--model", copy, "--stream-weights", "--budget", "8", "--output", out],
                 ["export", "--model", copy, "--budget", "8", "--output", out]):
        err = one_line_error(capsys, args)
        assert str(weights) in err and said in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no artifact, no temp folder, no lock


def test_bytes_past_the_last_tensor_are_damage(copy) -> None:
    with open(_weights(copy), "ab") as f:
        f.write(b"\0" * 10)
    with pytest.raises(UserError, match="10 bytes after the last tensor"):
        check_weight_files(copy)


def test_an_index_naming_a_missing_shard(copy) -> None:
    (copy / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}')
    with pytest.raises(UserError, match="names 1 missing shard.*model-00002-of-00002"):
        load(str(copy))


def test_a_file_damaged_after_the_check_fails_in_one_line_while_streaming(copy) -> None:
    """The up-front check cannot see a file changed later; the read says which tensor, in one line."""
    from reroute_export.export.stream import checkpoint_source
    from reroute_export.families.llava import Llava

    meta = load(str(copy), torch.float32, "meta")
    read = checkpoint_source(copy, meta.model, Llava.checkpoint_renames)
    _cut(_weights(copy), 100)
    name, param = next(iter(meta.model.named_parameters()))
    with pytest.raises(UserError, match="cannot read .* from .*model.safetensors"):
        read(name, tuple(param.shape), torch.float32)


# ---------------------------------------------------------------- .bin-only checkpoints


@pytest.fixture()
def bin_only(copy) -> Path:
    """The same checkpoint as the legacy pytorch_model.bin (a torch.save zip), no safetensors."""
    weights = _weights(copy)
    from safetensors.torch import load_file

    torch.save(load_file(weights), copy / "pytorch_model.bin")
    weights.unlink()
    return copy


def test_bin_only_checkpoint_loads_when_it_fits(bin_only) -> None:
    loaded = load(str(bin_only))
    params = sum(p.numel() for p in loaded.model.parameters())
    assert params > 0 and load_bytes(bin_only, 4) >= params * 4


def test_truncated_bin_is_one_line(bin_only, capsys) -> None:
    _cut(bin_only / "pytorch_model.bin", -1000)
    err = one_line_error(capsys, ["trace", "--model", bin_only, "--budget", "8", "--image", IMAGE, "--prompt", "hi"])
    assert "pytorch_model.bin" in err and "not a complete zip archive" in err


def test_bin_only_checkpoint_that_does_not_fit_is_one_line(bin_only, tmp_path, capsys, monkeypatch) -> None:
    """Too big for memory: no streaming to fall back on (safetensors only), so say how to get it."""
    import reroute_export.checkpoint_files as checkpoint_files

    monkeypatch.setattr(checkpoint_files, "available_bytes", lambda: 1 << 20)  # 1 MiB free: the memory boundary
    out = tmp_path / "out"
    for args in (["trace", "--model", bin_only, "--budget", "8", "--image", IMAGE, "--prompt", "hi"],
                 ["export", "--model", bin_only, "--budget", "8", "--output", out]):
        err = one_line_error(capsys, args)
        assert "GiB of memory is available" in err and "cannot be streamed" in err and "*.safetensors" in err, err
    assert not out.exists()
