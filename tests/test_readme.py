"""Every `reroute-export` command in README.md's bash blocks runs and exits 0."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [line.strip() for b in blocks for line in b.splitlines() if line.strip().startswith("reroute-export ")]


def test_readme_has_examples() -> None:
    assert any(" trace " in c for c in readme_commands())


@pytest.mark.parametrize("command", readme_commands())
def test_readme_example_runs(command: str, tmp_path) -> None:
    argv = shlex.split(command)
    argv = [str(ROOT / a) if (ROOT / a).exists() and "/" in a else a for a in argv]
    out = subprocess.run([sys.executable, "-m", "reroute_export", *argv[1:]], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
