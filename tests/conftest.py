"""Shared fixtures: every registered family's tiny model, built once per session."""

from __future__ import annotations

import functools

import pytest

from reroute_export.preprocess import load_image, samples
from reroute_export.families import families
from reroute_export.registry import load

FAMILIES = sorted(families())


@functools.lru_cache(maxsize=None)
def tiny(family: str):
    """The family's tiny random model (seeded), loaded through the public registry."""
    return load(families()[family].tiny_spec)


@functools.lru_cache(maxsize=None)
def sample_inputs(family: str, index: int = 0):
    path, prompt = samples()[index]
    return tiny(family).preprocessor([load_image(path)], [prompt])


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


ARTIFACTS_ENV = "REROUTE_TEST_ARTIFACTS"  # set by the controller, inherited by pytest-xdist workers


def pytest_configure(config) -> None:
    import os
    import tempfile

    if not hasattr(config, "workerinput") and ARTIFACTS_ENV not in os.environ:
        os.environ[ARTIFACTS_ENV] = config._reroute_artifacts = tempfile.mkdtemp(prefix="reroute-artifacts-")


def _artifact_root():
    """One folder per test run, shared by the pytest-xdist workers: an artifact one worker
    exported is reused by the other."""
    import os
    from pathlib import Path

    return Path(os.environ[ARTIFACTS_ENV])


def tiny_artifact(family: str, method: str = "reroute", precision: str = "fp32", inline: bool = False,
                  budget: float = 32):
    """A real exported artifact of the family's tiny model (fp32/fp16, any method), exported
    once per test run through the public pipeline and shared by every test file and worker.
    Treat it as read-only: copy it before tampering."""
    return _tiny_artifact(family, method, precision, inline, budget)


@functools.lru_cache(maxsize=None)
def _tiny_artifact(family: str, method: str, precision: str, inline: bool, budget: float):
    from reroute_export.pipeline import ExportOptions
    from reroute_export.plan import make_plan

    plan = make_plan(tiny(family).spec, method, budget=None if method == "none" else budget)
    opts = ExportOptions(precision=precision, inline_functions=inline, quiet=True, max_new_tokens=32,
                         max_prompt_tokens=plan.visual_tokens + 96)
    return shared_export(f"{family}-{method}-{precision}-b{budget:g}{'-inline' if inline else ''}", family, plan, opts)


def _once(name: str, write) -> "Path":
    """<the run's shared folder>/name, made by `write(out)` once per test run: a worker that
    finds it being made waits, then reuses it (manifest.json is written last)."""
    import fcntl

    out = _artifact_root() / name
    with open(out.parent / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "manifest.json").is_file():
            write(out)
    return out


def shared_export(name: str, family: str, plan, opts):
    """Export the family's tiny model with `plan` and `opts` into the run's shared folder under
    `name`, once per test run."""
    from reroute_export.pipeline import export_artifact

    return _once(name, lambda out: export_artifact(tiny(family), plan, sample_inputs(family), out, opts))


def shared_cli_export(name: str, *argv: str):
    """`reroute-export export ARGV --output <shared>/name`, run once per test run (as
    shared_export): the artifact, for tests of one command's output in several files."""
    from reroute_export.cli import main

    def write(out):
        assert main(["export", *argv, "--output", str(out)]) == 0, argv

    return _once(name, write)


STREAMED_LLAVA = ("--model", "tiny-llava", "--random-weights", "--budget", "32", "--quiet")


def streamed_tiny_llava():
    """`export --model tiny-llava --random-weights --budget 32` (streamed: one weights.data;
    the post-export check rebuilt the weights), shared. Read-only."""
    return shared_cli_export("tiny-llava-random-weights", *STREAMED_LLAVA)


def pytest_sessionfinish(session, exitstatus) -> None:
    """The controller (or a run without workers) removes the shared artifacts at the end."""
    import shutil

    created = getattr(session.config, "_reroute_artifacts", None)  # only the controller made one
    if created:
        shutil.rmtree(created, ignore_errors=True)


def build_wheel(work: "Path") -> "Path":
    """`pip wheel .` on a copy of the sources (nothing is written into the checkout), into
    work/dist; a failure shows pip's own message. Without build isolation (no network) when
    the installed setuptools meets pyproject's build requirement; an older one (a venv's
    bundled setuptools 65 against our >= 68) would fail the build, so pip then fetches one."""
    import shutil
    import sys
    import tomllib
    from pathlib import Path

    from packaging.requirements import Requirement

    root = Path(__file__).resolve().parent.parent
    src = work / "src"
    src.mkdir()
    # what the build reads: the project files and the folders the wheel carries (setup.py)
    litter = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.onnx", "*.onnx.data")
    for name in ("pyproject.toml", "setup.py", "README.md", "reroute_export", "graphs", "calibration"):
        if (root / name).is_dir():
            shutil.copytree(root / name, src / name, ignore=litter)
        else:
            shutil.copy2(root / name, src / name)
    needs = tomllib.loads((root / "pyproject.toml").read_text())["build-system"]["requires"]
    isolation = ["--no-build-isolation"] if all(_installed_satisfies(Requirement(r)) for r in needs) else []
    run_step([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(work / "dist"), str(src)])
    (wheel,) = (work / "dist").glob("reroute_export-*.whl")
    return wheel


def _installed_satisfies(requirement) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return requirement.specifier.contains(version(requirement.name), prereleases=True)
    except PackageNotFoundError:
        return False


def run_step(argv: list[str]) -> None:
    """One build/install step; a failure shows pip's own message, not just the exit code."""
    import subprocess

    out = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{' '.join(argv)}\n{(out.stdout + out.stderr)[-3000:]}"
