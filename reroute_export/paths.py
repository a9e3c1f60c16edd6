"""Where the shipped data folders live, and how a folder is shown in a message.

The checkout keeps `graphs/` and `calibration/` at the repository root (beside the
package); a wheel carries them inside the package (`reroute_export/graphs`, ...: see
pyproject's package-dir mapping), since nothing outside the package is installed.
`shipped_dir` is the one resolver both layouts go through.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
SHIPPED = ("graphs", "calibration")  # top-level folders the wheel maps into the package


def shipped_dir(name: str) -> Path:
    """`graphs` / `calibration`: inside the package when installed from a wheel, else the checkout's.

    The packaged copy wins: beside an installed package lies site-packages, where a folder
    of that name would belong to some other distribution."""
    if name not in SHIPPED:
        raise ValueError(f"{name!r} is not a shipped folder ({', '.join(SHIPPED)})")
    packaged = PACKAGE / name
    return packaged if packaged.is_dir() else PACKAGE.parent / name


def shown_dir(path: str | Path) -> str:
    """A folder as messages show it: normalised, with one trailing slash (`int8/` -> `int8/`, not `int8//`)."""
    return str(Path(path)) + "/"
