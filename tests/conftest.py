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


_ARTIFACT_ROOT: list = []


def tiny_artifact(family: str, method: str = "reroute", precision: str = "fp32", inline: bool = False,
                  budget: float = 32):
    """A real exported artifact of the family's tiny model (fp32/fp16, any method), exported
    once per test session through the public pipeline and shared by every test file.
    Treat it as read-only: copy it before tampering."""
    return _tiny_artifact(family, method, precision, inline, budget)


@functools.lru_cache(maxsize=None)
def _tiny_artifact(family: str, method: str, precision: str, inline: bool, budget: float):
    import tempfile
    from pathlib import Path

    from reroute_export.pipeline import ExportOptions, export_artifact
    from reroute_export.plan import make_plan

    if not _ARTIFACT_ROOT:
        _ARTIFACT_ROOT.append(Path(tempfile.mkdtemp(prefix="reroute-artifacts-")))
    loaded = tiny(family)
    plan = make_plan(loaded.spec, method, budget=None if method == "none" else budget)
    out = _ARTIFACT_ROOT[0] / f"{family}-{method}-{precision}{'-inline' if inline else ''}"
    opts = ExportOptions(precision=precision, inline_functions=inline, quiet=True, max_new_tokens=32,
                         max_prompt_tokens=plan.visual_tokens + 96)
    export_artifact(loaded, plan, sample_inputs(family), out, opts)
    return out


def pytest_sessionfinish(session, exitstatus) -> None:
    import shutil

    for root in _ARTIFACT_ROOT:
        shutil.rmtree(root, ignore_errors=True)
