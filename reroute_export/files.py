"""Writing files the way users expect: whole or not at all, with the usual permissions,
and a full disk or a read-only folder reported as one line naming the path.

Every report (trace/parity/plan/bench/calibrate --json, --markdown, routing maps) and the
artifact writer go through here, so these three rules hold for all of them at once.
`write_json` is the one JSON writer: "-" prints to stdout, anything else is a file;
`read_json` reads a user's JSON file (input sets, recipes, calibration sets) with a one-line error.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import UserError

# Causes that are the destination's, not a bug of ours: full disk or quota, a read-only or
# unwritable folder, a file where a folder should be. Anything else keeps its traceback.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
                          errno.ENOTDIR, errno.EISDIR})


def write_error(path: str | Path, e: OSError) -> UserError | None:
    """The one-line error for `e` raised while writing `path`, or None for other causes."""
    if e.errno not in WRITE_ERRNOS:
        return None
    return UserError(f"cannot write {path}: {e.strerror or e}")


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn a destination's OSError (see WRITE_ERRNOS) inside the block into a UserError naming `path`."""
    try:
        yield
    except OSError as e:
        failure = write_error(path, e)
        if failure is None:
            raise
        raise failure from None


def check_folders_above(path: str | Path) -> None:
    """A file where a folder above `path` should be: mkdir's bare "File exists" names neither."""
    for above in Path(path).parents:
        if above.exists():
            if not above.is_dir():
                raise UserError(f"cannot write {path}: {above} is a file, not a folder")
            return


def umask() -> int:
    """The process umask, read without changing it where Linux shows it (os.umask sets it to read it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def usual_mode(path: str | Path) -> None:
    """mkstemp makes 0600 files (private temporaries); a finished output gets what open()
    would have given it: 0666 less the umask (an executable keeps its x bits, less the umask)."""
    x = os.stat(path).st_mode & 0o111
    os.chmod(path, (0o666 | x) & ~umask())


def write_atomic(path: str | Path, data: bytes) -> None:
    """`data` at `path`, whole or not at all: a temp file in the same folder, then os.replace.
    The temp file is removed on any failure (Ctrl-C, SIGTERM, a full disk)."""
    path = Path(path)
    check_folders_above(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            usual_mode(tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def write_text(path: str | Path, text: str) -> None:
    """A text report at `path`, whole or not at all (write_atomic)."""
    write_atomic(path, text.encode("utf-8"))


def read_json(path: Path, what: str) -> Any:
    """`path` parsed as JSON; invalid JSON is a one-line error naming `what` and the path."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"{what} {path} is not valid JSON ({e})") from None


def write_json(path: str | Path, payload: Any) -> None:
    """A JSON report: printed when `path` is "-", else written whole or not at all."""
    text = json.dumps(payload, indent=1)
    if str(path) == "-":
        print(text)
        return
    write_text(path, text + "\n")
