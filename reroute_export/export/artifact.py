"""Writing an artifact folder complete or not at all, and reading one back with checks.

An export takes minutes and writes gigabytes; a crash, Ctrl-C or full disk half way must
not leave a folder that looks like an artifact, and `--force` must not destroy the
previous artifact before the new one is finished. So everything is written into a
temporary sibling `.OUT.tmp-PID-XXXX` (same parent: the final rename is atomic), the
manifest lists the sha256 of every file, and only a finished folder is renamed into place.

Sibling names carry the writer's PID so that a later run can tell the leftovers of a
killed writer (SIGKILL, `os._exit`: no `finally` ran) from those of a live one, and
clean up only the former. A writer holds an flock on `.OUT.lock` from start to commit:
a second export to the same OUT is refused, not raced. A full disk or a read-only
folder is one line naming OUT; where the size is known, free space is checked first.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from types import TracebackType
from typing import Any, cast

from .. import contract as C
from ..contract import Manifest
from ..errors import UserError
from ..files import check_folders_above, usual_mode, write_error, writing

_CHUNK = 1 << 20  # hash in 1 MiB reads: graphs with external weights reach gigabytes


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------- sibling folders


def _sibling(output: Path, kind: str) -> Path:
    """`.OUT.<kind>-PID-RANDOM` next to OUT: same filesystem, so os.rename is atomic."""
    return output.parent / f".{output.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _stale_siblings(output: Path, kind: str) -> list[Path]:
    """Siblings of `kind` left by writers that are no longer running."""
    pattern = re.compile(rf"^\.{re.escape(output.name)}\.{kind}-(\d+)-[0-9a-f]+$")
    found = []
    if output.parent.is_dir():
        for path in output.parent.iterdir():
            match = pattern.match(path.name)
            if match and path.is_dir() and not _pid_alive(int(match.group(1))):
                found.append(path)
    return sorted(found)


def cleanup_stale(output: Path) -> None:
    """Remove what killed writers left next to `output`.

    A temp folder is an unfinished export: delete it. An `.old` folder is a previous
    artifact moved aside during a commit: if the writer died before the new folder took
    its place (`output` missing) it is restored, otherwise the replacement finished and
    only the deletion was cut short. A lock file nobody holds (the kernel let go of a
    killed writer's flock) is removed; a held one, ours included, stays.
    """
    for tmp in _stale_siblings(output, "tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
    for old in _stale_siblings(output, "old"):
        if not output.exists():
            os.rename(old, output)
        else:
            shutil.rmtree(old, ignore_errors=True)
    if _lock_path(output).exists():
        try:
            _unlock(output, _lock(output))
        except (UserError, OSError):
            pass  # held by a live writer (or by this one), or not ours to remove


# ---------------------------------------------------------------- what we may replace


def _is_our_artifact(folder: Path) -> bool:
    """A manifest.json whose "format" is ours: a web app's manifest.json does not count."""
    try:
        raw = json.loads((folder / C.MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and str(raw.get("format", "")).startswith("reroute-export/")


def _check_replaceable(output: Path, force: bool) -> None:
    """Refuse (one line) unless `output` is absent, or --force and ours or empty."""
    if not output.exists() and not output.is_symlink():
        return
    if not output.is_dir() or output.is_symlink():
        raise UserError(f"output {output} exists and is not a folder; choose another --output")
    if not force:
        raise UserError(f"output folder {output} exists; pass --force to replace it")
    if not (_is_our_artifact(output) or not any(output.iterdir())):
        raise UserError(
            f"output folder {output} is not a reroute-export artifact (no manifest.json of ours) "
            "and not empty; refusing to replace it"
        )


def check_output(output: Path, force: bool) -> None:
    """Fail early (one line) if `output` could not be replaced, is being written by another
    export, or sits in a folder we cannot write; the writer checks again."""
    cleanup_stale(output)
    _check_replaceable(output, force)
    check_folders_above(output)
    if output.parent.is_dir():
        with writing(output):
            _unlock(output, _lock(output))  # taken and let go: only a probe, before minutes of work


# ---------------------------------------------------------------- one writer per output


def _lock_path(output: Path) -> Path:
    return output.parent / f".{output.name}.lock"


def _lock(output: Path) -> int:
    """An exclusive flock on `.OUT.lock`, holding our PID: two `--force` exports to one OUT
    would otherwise both say "wrote" while one silently replaced the other."""
    path = _lock_path(output)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(f"another export is writing {output} (pid {holder})") from None
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, path):
            break
        os.close(fd)  # the holder unlinked it between our open and our lock: lock the new one
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (st.st_dev, st.st_ino)


def _unlock(output: Path, fd: int) -> None:
    """Remove the lock file while still holding it (nothing is left beside OUT); a process
    that opened it meanwhile sees it is gone once it gets the lock, and makes a new one."""
    try:
        _lock_path(output).unlink(missing_ok=True)
    finally:
        os.close(fd)


def check_free_space(output: Path, need: int | None) -> None:
    """Refuse (one line) when OUT's filesystem has clearly too little room for `need` bytes."""
    if not need:
        return
    free = shutil.disk_usage(output.parent).free
    if free < need:
        raise UserError(f"not enough free space for {output}: the export writes at least {_size(need)}, "
                        f"{output.parent} has {_size(free)} free")


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# ---------------------------------------------------------------- the writer


def _listing(folder: Path) -> dict[str, dict[str, Any]]:
    """Every regular file under `folder` except the manifest, by POSIX relative path."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
        rel = path.relative_to(folder).as_posix()
        if rel != C.MANIFEST:
            files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return files


def _fsync_tree(folder: Path) -> None:
    """Flush file contents and directory entries before the rename publishes them."""
    for path in [*folder.rglob("*"), folder]:
        if path.is_symlink():
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError as e:  # some filesystems refuse fsync on directories
            if e.errno not in (errno.EINVAL, errno.EBADF):
                raise
        finally:
            os.close(fd)


def _usual_modes(folder: Path) -> None:
    """Every file as open() would have made it (0666 less the umask; an executable keeps its
    x bits). Not every writer does: onnx's external-data writer makes `<graph>.onnx.data` 0600,
    which a serving user or container other than the exporter's could not read."""
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            usual_mode(path)


class ArtifactWriter:
    """Context manager: write into `.path`, call `write_manifest`, and the folder appears
    at `output` on a clean exit; on any exception (KeyboardInterrupt too) nothing does
    and a previous artifact at `output` is left byte-identical.

        with ArtifactWriter(out, force=True) as w:
            onnx.save(model, w.path / "segment_0.onnx")
            w.write_manifest({...})
    """

    path: Path

    def __init__(self, output: Path, *, force: bool = False, expected_bytes: int | None = None) -> None:
        self.output = Path(output)
        self.force = force
        self.expected_bytes = expected_bytes  # what it will write, where known: checked against free space
        self._manifest_files: dict[str, dict[str, Any]] | None = None

    def __enter__(self) -> "ArtifactWriter":
        check_folders_above(self.output)
        with writing(self.output):
            self.output.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = _lock(self.output)
        try:
            with writing(self.output):
                cleanup_stale(self.output)
                _check_replaceable(self.output, self.force)
                check_free_space(self.output, self.expected_bytes)
                self.path = _sibling(self.output, "tmp")
                self.path.mkdir()
        except BaseException:
            _unlock(self.output, self._lock_fd)
            raise
        return self

    def write_manifest(self, manifest: Manifest) -> None:
        """Hash every file written so far into `manifest` (updated in place, so the caller
        holds what was written) and write it. Call again after adding fields or files."""
        manifest["format"] = C.FORMAT
        manifest["files"] = _listing(self.path)
        text = json.dumps(manifest, indent=1, sort_keys=False) + "\n"
        tmp = self.path / f".{C.MANIFEST}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.path / C.MANIFEST)
        self._manifest_files = manifest["files"]

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            with writing(self.output):  # a full disk during the commit's fsync: one line too
                try:
                    if exc_type is None:
                        self._commit()
                finally:
                    if self.path.exists():  # failed, or the commit itself failed
                        shutil.rmtree(self.path, ignore_errors=True)
        finally:
            _unlock(self.output, self._lock_fd)
        failure = write_error(self.output, exc) if isinstance(exc, OSError) else None
        if failure is not None:  # the disk filled (or turned read-only) while writing: say so, once
            raise failure from None

    # -- commit --------------------------------------------------------------------

    def _check_complete(self) -> None:
        """Only a folder whose manifest lists exactly what is there may be published."""
        if self._manifest_files is None:
            raise RuntimeError("ArtifactWriter finished without write_manifest(); nothing was published")
        now = {rel: e["bytes"] for rel, e in _listing_sizes(self.path).items()}
        listed = {rel: e["bytes"] for rel, e in self._manifest_files.items()}
        if now != listed:
            changed = sorted(set(now.items()) ^ set(listed.items()))
            raise RuntimeError(f"files changed after write_manifest(): {[rel for rel, _ in changed]}")

    def _commit(self) -> None:
        self._check_complete()
        _usual_modes(self.path)
        _fsync_tree(self.path)
        old: Path | None = None
        if self.output.exists() or self.output.is_symlink():
            _check_replaceable(self.output, self.force)  # it may have appeared meanwhile
            old = _sibling(self.output, "old")
            os.rename(self.output, old)
        try:
            os.rename(self.path, self.output)
        except BaseException:
            if old is not None:
                os.rename(old, self.output)  # put the previous artifact back
            raise
        _fsync_dir(self.output.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _listing_sizes(folder: Path) -> dict[str, dict[str, int]]:
    """Like `_listing` without hashing: a cheap check that nothing changed since."""
    return {
        p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size}
        for p in folder.rglob("*")
        if p.is_file() and not p.is_symlink() and p.relative_to(folder).as_posix() != C.MANIFEST
    }


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # best effort: the rename already happened
    finally:
        os.close(fd)


# ---------------------------------------------------------------- reading


def _load_manifest(folder: Path) -> Manifest:
    if not folder.is_dir():
        raise UserError(f"artifact folder not found: {folder}")
    path = folder / C.MANIFEST
    if not path.is_file():
        raise UserError(f"{folder} is not a reroute-export artifact: {C.MANIFEST} is missing")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"artifact {folder}: {C.MANIFEST} is unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"artifact {folder}: {C.MANIFEST} is not a JSON object")
    return cast(Manifest, raw)


def _verify_files(folder: Path, files: dict[str, Any]) -> None:
    for rel, entry in files.items():
        path = folder / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise UserError(f"artifact {folder}: manifest lists a path outside the folder: {rel}")
        if not path.is_file():
            raise UserError(f"artifact {folder}: {rel} is missing")
        if path.stat().st_size != entry.get("bytes") or sha256_file(path) != entry.get("sha256"):
            raise UserError(f"artifact {folder}: {rel} checksum mismatch")


def read_manifest(folder: Path, *, verify: bool = True) -> Manifest:
    """The manifest of an artifact folder, refusing other formats; `verify` re-hashes
    every listed file (seconds per GB) so a truncated copy fails here, not inside ORT."""
    folder = Path(folder)
    manifest = _load_manifest(folder)
    fmt = manifest.get("format")
    if fmt != C.FORMAT:
        raise UserError(
            f"artifact {folder} was made by an incompatible version of reroute-export "
            f"(format {fmt}, this version reads {C.FORMAT}); re-export it"
        )
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise UserError(f"artifact {folder}: {C.MANIFEST} lists no files")
    if verify:
        _verify_files(folder, files)
    return manifest
