"""Data flows one way: every module's imports, read with `ast`, go down the layers below.

Layers, lowest first. A module may import its own layer and those below it, never above;
imports that run (module level and inside functions) must form no cycle. Imports under
`if TYPE_CHECKING:` never run, so they are held to the direction only (a type may name its
own layer both ways, e.g. `Preprocessor` and `Family` name each other).

     0 foundation   the package itself (`__version__`), errors, paths, files, progress,
                    console, full_install, _callable
     1 contract     spec, plan, contract (file and graph I/O names, `Manifest`), results (`TraceResult`)
     2 load parts   families.base (the `Family` interface), families.host (numpy/PIL image steps),
                    preprocess, inputs, tiny (the tiny models' parts), checkpoint_files
     3 routing      routing/ (the eager routing engine)
     4 rewrite      rewrite/ (static-shape decoder and vision towers, custom ops, fp32 layers)
     5 load         families (the lookup), families/<family>.py, published, registry
     6 export       export/ (ONNX graphs, `reroute` functions, streamed weights, artifact folder)
     7 build        build/ (TensorRT engines and build plans)
     8 runtime      runtime/ (ONNX Runtime, TensorRT, eager and static-shape torch backends)
     9 reports      trace, viz, inspect_artifact
    10 check        check/ (parity, tolerances, lint, the comparison loop)
    11 pipeline     pipeline (the conductor: load -> plan -> rewrite -> export -> build -> check)
    12 stages       quantize/, bench/ (each runs the pipeline's stages and artifacts)
    13 api          api
    14 cli          cli, __main__

Why "load" sits above routing and rewrite although it runs first: routing, rewrite and
export see a family only through the `Family` interface (layer 2); a concrete family
composes their parts (its vision graph is a static-shape rewrite, rewrite/vision.py) and
the registry composes families, checkpoints and tiny builders. The family lookup finds
the family modules by listing families/ (adding a family is one file), an import `ast`
cannot see; it only goes down to layer 5's own modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "reroute_export"

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("", "errors", "paths", "files", "progress", "console", "full_install", "_callable")),
    ("contract", ("spec", "plan", "contract", "results")),
    ("load parts", ("families.base", "families.host", "preprocess", "inputs", "tiny", "checkpoint_files")),
    ("routing", ("routing",)),
    ("rewrite", ("rewrite",)),
    ("load", ("families", "published", "registry")),
    ("export", ("export",)),
    ("build", ("build",)),
    ("runtime", ("runtime",)),
    ("reports", ("trace", "viz", "inspect_artifact")),
    ("check", ("check",)),
    ("pipeline", ("pipeline",)),
    ("stages", ("quantize", "bench")),
    ("api", ("api",)),
    ("cli", ("cli", "__main__")),
]

# (importer, imported): the one kind of import allowed against the layers, and why.
EXCEPTIONS: dict[tuple[str, str], str] = {
    ("_callable", "api"): "calling the modules `reroute_export.plan` / `.export` calls the public API function of "
                          "the same name (_callable.py): imported when called, never at import",
    ("", "api"): "the package types its lazily resolved public names (PEP 562) under TYPE_CHECKING",
    ("", "pipeline"): "the package types its lazily resolved public names (PEP 562) under TYPE_CHECKING",
}


def module_name(path: Path) -> str:
    """reroute_export/export/vision.py -> "export.vision"; the package itself -> ""."""
    parts = list(path.relative_to(ROOT / PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def layer_of(module: str) -> int:
    """The layer whose longest matching entry (a module or a package prefix) names `module`."""
    best, depth = None, -1
    for index, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            matches = module == entry or (entry and module.startswith(entry + ".")) or (not entry and not module)
            if matches and len(entry) > depth:
                best, depth = index, len(entry)
    if best is None:
        raise AssertionError(f"module {module!r} is in no layer: add it to LAYERS in tests/test_imports.py")
    return best


def _target(base: str, name: str) -> str:
    """`from base import name`: the submodule when `name` is one, else `base` itself."""
    full = f"{base}.{name}" if base else name
    return full if full in MODULES else base


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str | None:
    """The imported module relative to the package ("" is the package), or None if not ours."""
    if node.level:
        here = module.split(".") if module else []
        if not is_package:
            here = here[:-1]
        base = here[: len(here) - node.level + 1] + ([node.module] if node.module else [])
        return ".".join(p for p in base if p)
    name = node.module or ""
    if name == PACKAGE or name.startswith(PACKAGE + "."):
        return name[len(PACKAGE) + 1:]
    return None


def imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported module, line, under TYPE_CHECKING) for every import of ours in `module`,
    at module level, inside functions and classes alike."""
    path = MODULES[module]
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, typing_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for stmt in child.body:
                    visit_one(stmt, True)
                for stmt in child.orelse:
                    visit_one(stmt, typing_only)
            else:
                visit_one(child, typing_only)

    def visit_one(node: ast.AST, typing_only: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    found.append((alias.name[len(PACKAGE) + 1:], node.lineno, typing_only))
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node, path.name == "__init__.py")
            if base is not None:
                found.extend((_target(base, alias.name), node.lineno, typing_only) for alias in node.names)
        else:
            visit(node, typing_only)

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return [(m, line, typing) for m, line, typing in found if m in MODULES]


def _shown(module: str) -> str:
    return module or PACKAGE


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        layer_of(module)


def test_no_import_goes_up_a_layer() -> None:
    upward = []
    for module in MODULES:
        for target, line, _ in imports(module):
            if layer_of(target) > layer_of(module) and (module, target) not in EXCEPTIONS:
                upward.append(f"{MODULES[module].relative_to(ROOT)}:{line} imports {_shown(target)} "
                              f"({LAYERS[layer_of(module)][0]} -> {LAYERS[layer_of(target)][0]})")
    assert not upward, "imports against the layers (move the code down instead):\n" + "\n".join(upward)


def test_no_library_module_imports_the_cli() -> None:
    cli = {m for m in MODULES if layer_of(m) == len(LAYERS) - 1}
    users = [f"{_shown(m)} imports {t}" for m in MODULES if m not in cli for t, _, _ in imports(m) if t in cli]
    assert not users, users


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), or a self-import."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges[v]:
                out.append(sorted(component))

    for v in edges:
        if v not in index:
            strong(v)
    return out


def test_no_import_cycle() -> None:
    """Over the imports that run; an allowed exception is not an edge (it is imported on call)."""
    edges = {m: {t for t, _, typing_only in imports(m) if not typing_only and (m, t) not in EXCEPTIONS}
             for m in MODULES}
    cycles = _cycles(edges)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(map(_shown, c)) for c in cycles)


def test_exceptions_are_still_needed() -> None:
    """An exception the code no longer needs is removed, so the list stays the truth."""
    present = {(m, t) for m in MODULES for t, _, _ in imports(m)}
    assert set(EXCEPTIONS) <= present, sorted(set(EXCEPTIONS) - present)


def test_the_checker_sees_relative_and_function_level_imports() -> None:
    """Guard the guard: the parser resolves the forms this package uses."""
    found = {t for t, _, _ in imports("pipeline")}
    assert {"contract", "export.vision", "runtime.eager", "build.trt", ""} <= found
    assert ("families.base", True) in {(t, typing) for t, _, typing in imports("preprocess")}
    assert layer_of("families.base") < layer_of("routing") < layer_of("families.llava") == layer_of("families")
