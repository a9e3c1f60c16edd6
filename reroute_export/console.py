"""Plain-text output shared by the commands: tables (JSON reports: files.write_json).

Here, not in cli.py, so that the stages that register their own subcommands (bench,
calibrate, inspect) print the same way without importing the CLI: imports run
cli -> library, never back.
"""

from __future__ import annotations

from typing import Any, Sequence


def table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    """Right-aligned plain-text table; a missing cell prints empty."""
    cells = [[str(c) for c in columns]] + [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
    if isinstance(v, list):
        return "-".join(str(x) for x in v)
    return str(v)

