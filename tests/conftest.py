"""Shared fixtures: every registered family's tiny model, built once per session."""

from __future__ import annotations

import functools

import pytest

from reroute_export.preprocess import load_image, samples
from reroute_export.registry import families, load

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
