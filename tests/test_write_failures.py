"""Where output goes wrong: a full disk, a read-only folder, a file where a folder should
be, a second export to the same path, SIGTERM. Each is one line naming the path, a
non-zero exit and nothing half-written; outputs get the usual permissions.

A real full disk and a real read-only filesystem are small tmpfs mounts, made where this
process may mount (root with CAP_SYS_ADMIN) and skipped elsewhere; the same errors are
also raised at the OS boundary (an OSError with the errno the kernel gives) so every
machine runs those paths.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from reroute_export import cli
from reroute_export.cli import main
from reroute_export.errors import UserError
from reroute_export.export import artifact as A
from reroute_export.export.artifact import ArtifactWriter
from test_bad_inputs import IMAGE, one_line_error, tree

PLAN = ["plan", "--model", "tiny-llava", "--budget", "32"]
EXPORT = ["--model", "tiny-llava", "--budget", "32", "--no-check", "--quiet"]


def _finish(w: ArtifactWriter) -> None:
    (w.path / "a.bin").write_bytes(b"x" * 10)
    w.write_manifest({})


# ---------------------------------------------------------------- full disk, read-only, not a folder


@pytest.mark.parametrize("code,cause", [(errno.ENOSPC, "No space left on device"),
                                        (errno.EROFS, "Read-only file system")])
def test_a_write_failing_in_the_writer_is_one_line_and_leaves_nothing(code, cause, tmp_path) -> None:
    out = tmp_path / "out"
    with pytest.raises(UserError, match=f"^cannot write {out}: {cause}$"):
        with ArtifactWriter(out) as w:
            (w.path / "prefill.onnx").write_bytes(b"half")
            raise OSError(code, os.strerror(code), str(w.path / "prefill.onnx"))  # what write() raises there
    assert list(tmp_path.iterdir()) == []


def test_too_little_free_space_is_refused_before_writing(tmp_path, monkeypatch) -> None:
    out = tmp_path / "out"
    monkeypatch.setattr(A.shutil, "disk_usage", lambda path: SimpleNamespace(total=4 << 20, used=1 << 20,
                                                                            free=3 << 20))
    with pytest.raises(UserError, match=rf"not enough free space for {out}: the export writes at least "
                                        rf"1.0 GiB, {tmp_path} has 3.0 MiB free"):
        with ArtifactWriter(out, expected_bytes=1 << 30):
            raise AssertionError("the writer must refuse before the body runs")
    assert list(tmp_path.iterdir()) == []


def test_a_file_where_a_folder_should_be(tmp_path, capsys) -> None:
    (tmp_path / "afile").write_text("x")
    before = tree(tmp_path)
    err = one_line_error(capsys, [*EXPORT, "--output", tmp_path / "afile" / "sub" / "out"])
    assert f"{tmp_path / 'afile'} is a file, not a folder" in err
    err = one_line_error(capsys, [*PLAN, "--json", tmp_path / "afile" / "plan.json"])
    assert f"{tmp_path / 'afile'} is a file, not a folder" in err
    assert tree(tmp_path) == before


@pytest.fixture()
def tmpfs(tmp_path):
    """mount(size, ro) -> a fresh tmpfs folder, unmounted after the test; skips where mounting is not allowed."""
    mounts: list[Path] = []

    def mount(size: str, ro: bool = False) -> Path:
        where = tmp_path / f"mnt{len(mounts)}"
        where.mkdir()
        opts = f"size={size}" + (",ro" if ro else "")
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip() or res.returncode}")
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", str(where)], check=False)


def test_a_real_full_disk(tmpfs) -> None:
    disk = tmpfs("256k")
    out = disk / "out"
    with pytest.raises(UserError, match=f"^cannot write {out}: No space left on device$"):
        with ArtifactWriter(out) as w:
            (w.path / "weights.data").write_bytes(b"\0" * (1 << 20))
            _finish(w)
    assert list(disk.iterdir()) == []


def test_a_real_read_only_filesystem(tmpfs, capsys) -> None:
    ro = tmpfs("64k", ro=True)
    err = one_line_error(capsys, [*EXPORT, "--output", ro / "out"])  # refused before the model loads
    assert err == f"reroute-export: error: cannot write {ro / 'out'}: Read-only file system\n"
    err = one_line_error(capsys, [*PLAN, "--json", ro / "plan.json"])
    assert f"cannot write {ro / 'plan.json'}: Read-only file system" in err


# ---------------------------------------------------------------- one writer per output


def test_a_second_writer_to_the_same_output_is_refused(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    with ArtifactWriter(out, force=True) as first:
        with pytest.raises(UserError, match=rf"^another export is writing {out} \(pid {os.getpid()}\)$"):
            ArtifactWriter(out, force=True).__enter__()
        err = one_line_error(capsys, [*EXPORT, "--output", out, "--force"])  # refused before loading
        assert f"another export is writing {out} (pid {os.getpid()})" in err
        _finish(first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the lock file went with the writer
    with ArtifactWriter(out, force=True) as again:  # and the next writer may take it
        _finish(again)


def test_the_lock_is_let_go_when_the_export_fails(tmp_path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ValueError):
        with ArtifactWriter(out):
            raise ValueError("boom")
    assert list(tmp_path.iterdir()) == []
    with ArtifactWriter(out) as w:
        _finish(w)


# ---------------------------------------------------------------- permissions


@pytest.fixture()
def umask_027():
    old = os.umask(0o027)
    yield 0o640
    os.umask(old)


def test_reports_get_the_usual_mode(tmp_path, umask_027, capsys) -> None:
    out = tmp_path / "plan.json"
    assert main([*PLAN, "--json", str(out), "--quiet"]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == umask_027
    trace_json, png = tmp_path / "trace.json", tmp_path / "map.png"
    assert main(["trace", "--model", "tiny-llava", "--budget", "32", "--image", IMAGE, "--prompt", "hi",
                 "--max-new-tokens", "2", "--json", str(trace_json), "--map", str(png), "--quiet"]) == 0
    assert {stat.S_IMODE(p.stat().st_mode) for p in (trace_json, png)} == {umask_027}
    assert json.loads(trace_json.read_text())["generated_ids"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.png", "plan.json", "trace.json"]


def test_an_artifact_gets_the_usual_modes(tmp_path, umask_027) -> None:
    """onnx writes a graph's external data 0600; a published artifact is readable as open() makes files."""
    out = tmp_path / "out"
    with ArtifactWriter(out) as w:
        private, script = w.path / "g.onnx.data", w.path / "sub" / "run.sh"
        script.parent.mkdir()
        for path, mode in ((private, 0o600), (script, 0o755)):
            path.write_bytes(b"x")
            path.chmod(mode)
        w.write_manifest({})
    assert stat.S_IMODE((out / "g.onnx.data").stat().st_mode) == umask_027
    assert stat.S_IMODE((out / "sub" / "run.sh").stat().st_mode) == 0o750  # executable stays so


def test_an_interrupted_report_leaves_no_temp_file(tmp_path, monkeypatch) -> None:
    from reroute_export import files

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        files.write_atomic(tmp_path / "r.json", b"{}")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- SIGTERM


def test_sigterm_unwinds_like_ctrl_c(tmp_path, capsys, monkeypatch) -> None:
    """In process: SIGTERM mid-write raises through the writer (which cleans up); exit 143, one line."""
    out = tmp_path / "out"

    def export_then_sigterm(argv):
        with ArtifactWriter(out) as w:
            (w.path / "prefill.onnx").write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("SIGTERM did not interrupt")

    monkeypatch.setattr(cli, "run", export_then_sigterm)
    assert main([]) == 128 + signal.SIGTERM
    assert capsys.readouterr().err == "reroute-export: terminated (SIGTERM)\n"
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # main put the default back
