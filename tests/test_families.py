"""One home per family: families/<family>.py declares every per-family fact, and nothing
outside families/ branches on a family's name.

A family is a `Family` subclass (families/base.py). Every abstract member (anatomy,
positions, vision graph, input checks, spec overrides, preprocessing recipe, tiny builder,
host-side image steps and positions) must be implemented, and every declared class
attribute (names, specs, template, tokens, map fit, offline ids) set; the family lookup
imports every module of families/, so a module there that registers nothing is a mistake.
"""

from __future__ import annotations

import ast
import inspect
import pkgutil
from pathlib import Path

import pytest

from reroute_export import families as families_pkg
from reroute_export.families import families
from reroute_export.families.base import Family
from reroute_export.spec import known_specs

ROOT = Path(__file__).resolve().parent.parent / "reroute_export"
SUPPORT_MODULES = {"base", "host"}  # families/ modules that declare no family
FAMILIES = families()


def required_attributes() -> list[str]:
    """Class attributes `Family` declares without a value: each family must set them."""
    return [name for name in Family.__annotations__ if name not in vars(Family)]


def _function(owner: type, name: str) -> object:
    member = inspect.getattr_static(owner, name)
    return getattr(member, "__func__", member)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_implements_every_member(name: str) -> None:
    fam = FAMILIES[name]
    missing = [a for a in required_attributes() if not hasattr(fam, a)]
    assert not missing, f"{name} does not set {missing}"
    assert not inspect.isabstract(fam), f"{name} leaves abstract: {sorted(fam.__abstractmethods__)}"
    inherited = [m for m in sorted(Family.__abstractmethods__) if _function(fam, m) is _function(Family, m)]
    assert not inherited, f"{name} inherits the base's unimplemented {inherited}"


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_facts_resolve(name: str) -> None:
    """The names a family declares point at things that exist."""
    fam = FAMILIES[name]
    assert fam.name == name and fam.tiny_spec in known_specs() and fam.reference_spec in known_specs()
    assert known_specs()[fam.tiny_spec].family == known_specs()[fam.reference_spec].family == name
    assert fam.prompt_template.count("{prompt}") == 1 and fam.prompt_template.count(fam.image_token) == 1
    assert "{% for message in messages %}" in fam.chat_template()
    assert fam.map_fit in ("crop", "resize") and fam.position_dims in (1, 3)
    assert set(fam.offline.eos) and fam.offline.pad and fam.offline.ids


def test_every_family_module_registers_a_family() -> None:
    declared = {fam.__module__.rpartition(".")[2] for fam in FAMILIES.values()}
    modules = {m.name for m in pkgutil.iter_modules(families_pkg.__path__)}
    assert modules - SUPPORT_MODULES == declared, "a module in families/ that registers no family"
    assert len(declared) == len(FAMILIES), "one family per module"


def _family_words() -> set[str]:
    """Each family's name ("qwen2.5-vl") and the constant spelling it used to have (QWEN2_5_VL)."""
    names = set(FAMILIES)
    return names | {n.upper().replace(".", "_").replace("-", "_") for n in names}


def _name_uses(source: str, where: str, words: set[str]) -> list[str]:
    """Family names as string literals, and constants named after a family, in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in words:
            found.append(f"{where}:{node.lineno} {node.value!r}")
        elif isinstance(node, ast.Name) and node.id in words:
            found.append(f"{where}:{node.lineno} {node.id}")
    return found


def test_no_family_name_outside_families() -> None:
    """`if family == "qwen2.5-vl"` belongs in a family method: a per-family fact lives in
    families/<family>.py, read through the `Family` members everywhere else."""
    words = _family_words()
    outside = [p for p in sorted(ROOT.rglob("*.py")) if "families" not in p.relative_to(ROOT).parts]
    found = [use for path in outside
             for use in _name_uses(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT.parent)), words)]
    assert not found, "family names outside families/:\n" + "\n".join(found)


def test_the_name_check_sees_what_it_looks_for() -> None:
    """Guard the guard: the literal and the constant are both caught."""
    source = 'LLAVA = "llava"\nif fam == LLAVA or fam.name == "qwen2.5-vl":\n    pass\n'
    assert len(_name_uses(source, "x.py", _family_words())) == 4  # two literals, the constant twice
