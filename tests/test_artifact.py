"""Artifacts are written complete or not at all, and read back only when intact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from reroute_export.errors import UserError
from reroute_export import contract as C
from reroute_export.export.artifact import ArtifactWriter, read_manifest, sha256_file


def write(out: Path, payload: str = "a", *, force: bool = False) -> dict:
    with ArtifactWriter(out, force=force) as w:
        (w.path / "prefill.onnx").write_text(payload)
        (w.path / "preprocessor").mkdir()
        (w.path / "preprocessor" / "tokenizer.json").write_text("{}")
        manifest = {"model": "m"}
        w.write_manifest(manifest)
    return manifest


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


def test_success_writes_manifest_with_checksums(tmp_path) -> None:
    out = tmp_path / "art"
    manifest = write(out)
    assert siblings(out) == []
    on_disk = read_manifest(out)
    assert on_disk == manifest and on_disk["format"] == C.FORMAT and on_disk["model"] == "m"
    assert set(on_disk["files"]) == {"prefill.onnx", "preprocessor/tokenizer.json"}
    assert on_disk["files"]["prefill.onnx"] == {"sha256": sha256_file(out / "prefill.onnx"), "bytes": 1}


def test_exception_mid_write_keeps_previous_artifact(tmp_path) -> None:
    out = tmp_path / "art"
    write(out, "old")
    before = snapshot(out)
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with ArtifactWriter(out, force=True) as w:
                (w.path / "prefill.onnx").write_text("new, half written")
                raise exc
        assert snapshot(out) == before
        assert siblings(out) == []


def test_no_manifest_means_nothing_published(tmp_path) -> None:
    out = tmp_path / "art"
    with pytest.raises(RuntimeError, match="without write_manifest"):
        with ArtifactWriter(out) as w:
            (w.path / "prefill.onnx").write_text("x")
    assert not out.exists() and siblings(out) == []


def test_files_written_after_the_manifest_are_refused(tmp_path) -> None:
    out = tmp_path / "art"
    with pytest.raises(RuntimeError, match="changed after write_manifest"):
        with ArtifactWriter(out) as w:
            w.write_manifest({})
            (w.path / "late.onnx").write_text("x")
    assert not out.exists()


def test_existing_output_needs_force(tmp_path) -> None:
    out = tmp_path / "art"
    write(out, "old")
    before = snapshot(out)
    with pytest.raises(UserError, match=rf"^output folder {out} exists; pass --force to replace it$"):
        write(out, "new")
    assert snapshot(out) == before
    write(out, "new", force=True)
    assert (out / "prefill.onnx").read_text() == "new" and siblings(out) == []
    read_manifest(out)


def test_force_never_replaces_what_we_did_not_write(tmp_path) -> None:
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_text("precious")
    (out / "manifest.json").write_text('{"name": "a web app manifest"}')
    with pytest.raises(UserError, match="not a reroute-export artifact"):
        write(out, force=True)
    assert (out / "holiday.jpg").read_text() == "precious" and siblings(out) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    write(empty, force=True)  # an empty folder is fine
    read_manifest(empty)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        write(a_file, force=True)


def test_read_manifest_detects_tampering(tmp_path) -> None:
    out = tmp_path / "art"
    write(out, "abc")
    (out / "prefill.onnx").write_text("abd")  # same size, different bytes
    with pytest.raises(UserError, match=rf"^artifact {out}: prefill.onnx checksum mismatch$"):
        read_manifest(out)
    read_manifest(out, verify=False)
    (out / "prefill.onnx").unlink()
    with pytest.raises(UserError, match="prefill.onnx is missing"):
        read_manifest(out)


def test_read_manifest_refuses_other_formats_and_non_artifacts(tmp_path) -> None:
    out = tmp_path / "art"
    write(out)
    raw = json.loads((out / C.MANIFEST).read_text())
    (out / C.MANIFEST).write_text(json.dumps({**raw, "format": "reroute-export/0"}))
    with pytest.raises(UserError, match=r"incompatible version of reroute-export \(format reroute-export/0, "
                                        rf"this version reads {C.FORMAT}\); re-export it"):
        read_manifest(out)
    (out / C.MANIFEST).write_text("{not json")
    with pytest.raises(UserError, match="manifest.json is unreadable"):
        read_manifest(out)
    (out / C.MANIFEST).unlink()
    with pytest.raises(UserError, match="manifest.json is missing"):
        read_manifest(out)
    with pytest.raises(UserError, match="artifact folder not found"):
        read_manifest(tmp_path / "nope")


# ---------------------------------------------------------------- killed writers


WRITER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from reroute_export.export.artifact import ArtifactWriter
    out, how = Path(sys.argv[1]), sys.argv[2]
    with ArtifactWriter(out, force=True) as w:
        (w.path / "prefill.onnx").write_text("half written")
        print(w.path, flush=True)
        if how == "exit":
            os._exit(1)  # no finally, no __exit__: like SIGKILL
        raise RuntimeError("boom")
""")


def run_writer(out: Path, how: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WRITER, str(out), how], capture_output=True, text=True, timeout=60)


def test_writer_process_raising_leaves_nothing(tmp_path) -> None:
    out = tmp_path / "art"
    write(out, "old")
    before = snapshot(out)
    proc = run_writer(out, "raise")
    assert proc.returncode == 1 and "boom" in proc.stderr
    assert snapshot(out) == before and siblings(out) == []


def test_killed_writer_leftovers_are_cleaned_by_the_next_run(tmp_path) -> None:
    out = tmp_path / "art"
    write(out, "old")
    before = snapshot(out)
    proc = run_writer(out, "exit")
    assert proc.returncode == 1
    stale = Path(proc.stdout.strip())
    assert stale.is_dir() and stale.name.startswith(f".{out.name}.tmp-")  # what a SIGKILL leaves
    assert snapshot(out) == before  # the previous artifact is untouched
    # the next writer removes it; a second writer while one is live is refused (the output's
    # lock), so a live writer's temp folder is never touched
    with ArtifactWriter(out, force=True) as live:
        assert not stale.exists() and live.path.is_dir()
        with pytest.raises(UserError, match=f"another export is writing {out}"):
            write(out, "new", force=True)
        assert live.path.is_dir()
        live.write_manifest({})
    assert siblings(out) == []


def test_killed_during_commit_restores_the_previous_artifact(tmp_path) -> None:
    """A writer killed between moving the old artifact aside and renaming the new one in."""
    out = tmp_path / "art"
    write(out, "old")
    before = snapshot(out)
    dead = _dead_pid()
    os.rename(out, tmp_path / f".art.old-{dead}-00ff00ff")
    write(tmp_path / "other")  # unrelated output: leaves art's siblings alone
    assert not out.exists()
    with pytest.raises(UserError, match="exists; pass --force"):
        write(out, "new")  # the restored artifact is protected like any other
    assert snapshot(out) == before


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid
