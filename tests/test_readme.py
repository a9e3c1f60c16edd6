"""Every `reroute-export` command in README.md's bash blocks runs as documented.

The blocks run top to bottom in one fresh folder shared by the whole README, as a
reader's shell would: a block may read a folder an earlier block wrote (`--artifact out/`
after the quick start's `--output out/`); that block runs first when it has not yet
(a block selected alone), and each block runs once. Only paths to shipped inputs (files
under the folders the package ships, e.g. reroute_export/data/samples/astronaut.jpg)
point into the repo; anything else, such as `out/` a newcomer's own README run left in
the repo root, stays relative to the fresh folder.
Exit code 0, or the documented 3 for `--target trt` on a machine without TensorRT.
A line marked `# not run by the README test: WHY` (a GPU command, a 7B export) is only
parsed: its subcommand and options must exist.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def readme_blocks() -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    out = [[line.strip() for line in b.splitlines() if line.strip().startswith("reroute-export ")] for b in blocks]
    return [b for b in out if b]


def test_readme_has_examples() -> None:
    commands = [c for b in readme_blocks() for c in b]
    assert any(c.startswith("reroute-export --model tiny-llava") and "--target onnx" in c for c in commands)
    assert any(" generate " in c for c in commands) and any(" parity " in c for c in commands)


SKIP = "# not run by the README test:"
SHIPPED = ("reroute_export", "graphs", "calibration")  # what the wheel carries (paths.py, pyproject)


def shipped_input(arg: str, root: Path = ROOT) -> str:
    """`arg` made absolute under `root` when it names a shipped input file, else unchanged: an
    output folder that happens to exist in the repo root (a README run there) is not an input."""
    path = Path(arg)
    if path.is_absolute() or not path.parts or path.parts[0] not in SHIPPED or not (root / path).is_file():
        return arg
    return str(root / path)


def _folders_after(command: str, flag: str) -> set[str]:
    argv = shlex.split(command.split(SKIP)[0])
    return {argv[i + 1].rstrip("/") for i, a in enumerate(argv[:-1]) if a == flag}


def block_writes(block: list[str]) -> set[str]:
    return {f for c in block if SKIP not in c for f in _folders_after(c, "--output")}


def block_needs(block: list[str]) -> set[str]:
    """The artifact folders a block reads and does not write itself."""
    return {f for c in block if SKIP not in c for f in _folders_after(c, "--artifact")} - block_writes(block)


def test_every_folder_a_block_reads_is_written_by_an_earlier_block() -> None:
    blocks = readme_blocks()
    for i, block in enumerate(blocks):
        for folder in block_needs(block):
            assert [j for j in range(i) if folder in block_writes(blocks[j])], (block[0], folder)


@pytest.fixture(scope="module")
def readme_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("readme")


_RAN: dict[int, str | None] = {}  # block index -> None (ran as documented) or what failed
_DONE: dict[str, subprocess.CompletedProcess] = {}  # command -> its run (stdout, stderr)


def _run_block(index: int, folder: Path) -> None:
    from reroute_export.cli import parse

    blocks = readme_blocks()
    if index not in _RAN:
        for need in sorted(block_needs(blocks[index])):
            _run_block(max(j for j in range(index) if need in block_writes(blocks[j])), folder)
        _RAN[index] = "did not finish (see the first test that ran this block)"
        for command in blocks[index]:
            if SKIP in command:
                argv = shlex.split(command.split(SKIP)[0])
                assert command.split(SKIP)[1].strip(), "say why the line is not run"
                assert parse(argv[1:]).func  # the documented subcommand and options exist
                continue
            argv = [shipped_input(a) for a in shlex.split(command)]
            out = subprocess.run([sys.executable, "-m", "reroute_export", *argv[1:]], capture_output=True,
                                 text=True, cwd=folder, timeout=600)
            _DONE[command] = out
            expected = 3 if "--target trt" in command else 0
            if out.returncode != expected or not out.stdout.strip():
                _RAN[index] = f"{command}\nexit {out.returncode}\n{out.stderr[-2000:]}"
                break
        else:
            _RAN[index] = None
    assert _RAN[index] is None, _RAN[index]


@pytest.mark.parametrize("index", range(len(readme_blocks())), ids=lambda i: readme_blocks()[i][0][:60])
def test_readme_block_runs(index: int, readme_dir: Path) -> None:
    _run_block(index, readme_dir)


def test_the_main_job_shows_its_progress(readme_dir: Path) -> None:
    """Off a TTY the export prints its steps, timed, and which decoder graph it is on (a 7B
    graph takes minutes): `[2/4] decoder graphs ...`, `graph 1/13: segment.0`."""
    main_job = readme_blocks()[0][0]
    assert main_job.startswith("reroute-export --model tiny-llava --budget 32 --target onnx")
    _run_block(0, readme_dir)
    lines = _DONE[main_job].stderr.splitlines()
    steps = [m.groups() for line in lines if (m := re.fullmatch(r"\[(\d)/(\d)\] (.+) \(\d+\.\ds\)", line))]
    assert [(int(i), int(n)) for i, n, _ in steps] == [(i, 4) for i in range(1, 5)], lines  # every step, no more
    assert steps[1][2].startswith("decoder graphs: 5 segments, 4 heads, 4 routing graphs"), steps
    graphs = [line.strip() for line in lines if line.strip().startswith("graph ")]
    assert graphs[0] == "graph 1/13: segment.0" and graphs[-1] == "graph 13/13: segment.4", graphs
    assert [int(g.split()[1].split("/")[0]) for g in graphs] == list(range(1, 14))


def test_an_export_without_output_names_its_folder_from_the_job(readme_dir: Path) -> None:
    """README's TensorRT line has no --output: the artifact goes to MODEL-METHOD-bBUDGET-trt/
    in the working folder, and the run says so."""
    blocks = readme_blocks()
    index = next(i for i, b in enumerate(blocks) if b[0].endswith("--target trt --device jetson-orin"))
    _run_block(index, readme_dir)
    folder = readme_dir / "tiny-llava-reroute-b32-trt"
    assert (folder / "manifest.json").is_file() and (folder / "build_trt.sh").is_file()
    assert _DONE[blocks[index][0]].stdout.startswith("wrote tiny-llava-reroute-b32-trt/ (tiny-llava, reroute, ")


def test_only_shipped_inputs_point_into_the_repo(tmp_path) -> None:
    """A newcomer ran the README in the repo root: out/, artifact/, parity.json are there now.
    They must not be rewritten (the tests would then refuse "output folder ... exists" or
    write into the repo); the sample photo must."""
    sample = tmp_path / "reroute_export" / "data" / "samples" / "astronaut.jpg"
    sample.parent.mkdir(parents=True)
    sample.write_bytes(b"jpg")
    for stray in ("out", "artifact", "int8"):
        (tmp_path / stray).mkdir()
    (tmp_path / "out" / "manifest.json").write_text("{}")
    (tmp_path / "parity.json").write_text("{}")
    assert shipped_input("reroute_export/data/samples/astronaut.jpg", tmp_path) == str(sample)
    for arg in ("out/", "artifact/", "int8/", "out/manifest.json", "parity.json", "--output", "/abs/out/",
                "reroute_export/data/samples/", "reroute_export/data/samples/missing.jpg"):
        assert shipped_input(arg, tmp_path) == arg


# ---------------------------------------------------------------- the layout table

CODE = re.compile(r"`([^`]+)`(?:\s*\(([^)]*)\))?")  # `path` optionally followed by (`file`, `file`, ...)


def layout_cells() -> list[str]:
    """The "where" cell of every row of README's "How the code is laid out" table."""
    section = (ROOT / "README.md").read_text().split("## How the code is laid out")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("|") and not line.startswith("|---")]
    return [row.strip().strip("|").split("|")[-1] for row in rows[1:]]  # rows[0]: the header


def _one_path(name: str, bases: list[Path]) -> Path:
    found = [base / name for base in bases if (base / name).exists()]
    assert len(found) == 1, f"README's layout table names {name!r}: found {found} under {bases}"
    return found[0].resolve()


def layout_paths(cell: str) -> list[Path]:
    """Paths a cell names: from the repo root or reroute_export/; files in parentheses
    after a folder are in that folder."""
    out = []
    for match in CODE.finditer(cell):
        folder = _one_path(match.group(1), [ROOT, ROOT / "reroute_export"])
        out.append(folder)
        out += [_one_path(name, [folder]) for name in re.findall(r"`([^`]+)`", match.group(2) or "")]
    return out


def test_layout_table_matches_the_tree() -> None:
    """Every path the table names exists, and every module of the package is named by a row
    (a package's __init__.py by its folder)."""
    cells = layout_cells()
    assert len(cells) > 10
    named = {p for cell in cells for p in layout_paths(cell)}
    modules = sorted((ROOT / "reroute_export").rglob("*.py"))
    unnamed = [str(m.relative_to(ROOT)) for m in modules
               if m.resolve() not in named and not (m.name == "__init__.py" and m.parent.resolve() in named)]
    assert not unnamed, f"modules no row of README's layout table names: {unnamed}"
