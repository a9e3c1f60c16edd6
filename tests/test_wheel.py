"""A wheel carries everything the CLI needs: built, installed into a fresh environment that
cannot see the source tree, and run from a folder outside it.

`pip wheel . && pip install dist/*.whl`, in the cheapest form that is still honest: the
build runs on a copy of the sources (conftest.build_wheel: nothing is written into the
checkout), without build isolation where the installed setuptools is new enough (no
network); the fresh venv gets the wheel, without dependencies, before it is told where
the current environment's dependencies are (one `.pth` line naming that site-packages
folder: torch is not installed twice, and since a `.pth` line adds a folder without
running that folder's own `.pth` files, the checkout's editable install there stays
invisible). Then `reroute-export models` and the README's main job run from an empty folder.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import sysconfig
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import build_wheel, run_step
from test_readme import readme_blocks, shipped_input

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    site: Path  # the fresh venv's site-packages, where the wheel went
    seconds: float  # build + install

    def bin(self, name: str) -> Path:
        return self.venv / ("Scripts" if os.name == "nt" else "bin") / name

    def run(self, argv: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _site_packages(venv: Path) -> Path:
    return Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    start = time.monotonic()
    work = tmp_path_factory.mktemp("wheel")
    wheel = build_wheel(work)
    venv = work / "venv"
    run_step([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    # This environment's pip installs into the fresh one, seeing only the fresh one's packages:
    # the dependencies' .pth comes after, or pip would find (and try to replace) the checkout's install.
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    run_step([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)])
    site = _site_packages(venv)
    deps = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    (site / "_reroute_test_deps.pth").write_text("".join(f"{d}\n" for d in deps))
    return Installed(wheel, venv, site, time.monotonic() - start)


def test_wheel_carries_the_data_folders(installed: Installed) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    for folder in ("graphs", "calibration"):  # every shipped file, mapped into the package
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                assert f"reroute_export/{path.relative_to(ROOT).as_posix()}" in names
    for path in (ROOT / "reroute_export" / "data").rglob("*"):  # reroute_export/data/**, any type
        if path.is_file() and "__pycache__" not in path.parts:
            assert path.relative_to(ROOT).as_posix() in names
    print(f"wheel {installed.wheel.name}: {installed.wheel.stat().st_size / 1024:.0f} KiB, "
          f"built and installed in {installed.seconds:.1f} s")


def test_installed_package_is_the_wheel(installed: Installed, tmp_path) -> None:
    code = ("import reroute_export, reroute_export.quantize.calibration_set as c, reroute_export.spec as s;"
            "print(reroute_export.__file__); print(s.graphs_dir()); print(c.calibration_dir());"
            "print(len(c.load_calibration_set()))")
    out = installed.run([str(installed.bin("python")), "-c", code], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    module, graphs, calibration, samples = out.stdout.split()
    for path in (module, graphs, calibration):  # inside the fresh venv, nothing from the checkout
        assert Path(path).is_relative_to(installed.site) and not Path(path).is_relative_to(ROOT), path
    assert int(samples) > 0  # the calibration set and its checksums came along


def test_models_lists_every_registered_model(installed: Installed, tmp_path) -> None:
    out = installed.run([str(installed.bin("reroute-export")), "models"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ("tiny-llava", "tiny-qwen2.5-vl", "llava-1.5-7b", "qwen2.5-vl-7b"):
        assert name in out.stdout


def test_readme_main_job_runs_from_the_wheel(installed: Installed, tmp_path) -> None:
    """The README's main job (export, generate, inspect), shipped inputs taken from the wheel."""
    (block,) = [b for b in readme_blocks() if any(" generate " in c for c in b) and any("inspect" in c for c in b)]
    for command in block:
        argv = [shipped_input(a, installed.site) for a in shlex.split(command)[1:]]
        out = installed.run([str(installed.bin("reroute-export")), *argv], cwd=tmp_path)
        assert out.returncode == 0, f"{command}\n{out.stderr[-2000:]}"
        assert out.stdout.strip(), command
