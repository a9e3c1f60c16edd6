"""A checkpoint folder's weight files, checked before anything opens them.

safetensors and torch raise from deep inside a load (a Rust `SafetensorError`, miniz's
"failed finding central directory") and only when they reach the damaged file, after
minutes of work in a streamed export. A truncated download is the usual cause, and it
shows without reading the weights: a safetensors file is an 8-byte length, a JSON header
and a data buffer the header covers exactly; a `.bin` is a zip archive whose directory
sits at its end. So load (`registry`), the streamed export (`export.stream`) and
therefore trace and parity all go through `check_weight_files` first, and a damaged file
is one line naming it.
"""

from __future__ import annotations

import json
import math
import struct
import zipfile
from pathlib import Path
from typing import Any

from .errors import UserError

_HEADER_MAX = 100_000_000  # bytes; safetensors itself refuses larger headers
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
_STORED_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}  # config.json "dtype" -> bytes per weight
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _damaged(path: Path, why: str) -> UserError:
    return UserError(f"damaged checkpoint file {path}: {why}; re-download or re-save the checkpoint")


def safetensors_header(path: Path) -> dict[str, Any]:
    """The header of a safetensors file, after checking that the file holds exactly the
    bytes it declares (a truncated header or body fails here, naming the file)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _damaged(path, f"{size} bytes, shorter than the 8-byte header length")
        (length,) = struct.unpack("<Q", head)  # little-endian u64: the JSON header's length
        if length > _HEADER_MAX or 8 + length > size:
            raise _damaged(path, f"its header claims {length} bytes, the file holds {size - 8} after the length "
                                 f"(truncated?)")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise _damaged(path, "its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _damaged(path, "its header is not a JSON object")
    _check_body(path, header, size - 8 - length)
    return header


def _check_body(path: Path, header: dict[str, Any], have: int) -> None:
    """Every tensor's byte range inside the data buffer, which they cover to the end."""
    need = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in entry["data_offsets"])
            numel = math.prod(int(d) for d in entry["shape"])
        except (KeyError, TypeError, ValueError):
            raise _damaged(path, f"tensor {name} has no valid shape/data_offsets in the header") from None
        itemsize = _ITEMSIZE.get(str(entry.get("dtype")))
        if end < begin or (itemsize is not None and end - begin != numel * itemsize):
            raise _damaged(path, f"tensor {name}'s byte range {begin}..{end} does not fit its shape and dtype")
        need = max(need, end)
    if need > have:
        raise _damaged(path, f"truncated: its tensors need {need} bytes of data, the file holds {have}")
    if need < have:
        raise _damaged(path, f"{have - need} bytes after the last tensor (a partial or concatenated write?)")


def _check_bin(path: Path) -> None:
    """A torch.save zip archive whose directory is intact, or a legacy (pre-1.6) pickle."""
    with open(path, "rb") as f:
        first = f.read(1)
    if first == b"\x80":  # a pickle protocol byte: the legacy format, which has no directory to check
        return
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError):
        raise _damaged(path, "not a complete zip archive (the PyTorch format): truncated?") from None
    size = path.stat().st_size
    if any(e.header_offset + e.compress_size > size for e in entries):
        raise _damaged(path, "its zip directory points past the end of the file (truncated?)")


def weight_files(folder: Path) -> list[Path]:
    """The files transformers loads: *.safetensors when there are any, else pytorch_model*.bin."""
    return sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))


def check_weight_files(folder: Path) -> None:
    """One line naming the first damaged weight file, or a shard an index names and the folder lacks."""
    for index in _INDEXES:
        _check_index(folder, folder / index)
    for path in weight_files(folder):
        if path.suffix == ".safetensors":
            safetensors_header(path)
        else:
            _check_bin(path)


def _check_index(folder: Path, index: Path) -> None:
    if not index.is_file():
        return
    try:
        shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise _damaged(index, "not a JSON index with a weight_map") from None
    missing = sorted(s for s in shards if not (folder / s).is_file())
    if missing:
        raise UserError(f"checkpoint {folder} is incomplete: {index.name} names {len(missing)} missing "
                        f"shard(s) (first: {missing[0]}); finish the download")


# ---------------------------------------------------------------- memory


def load_bytes(folder: Path, itemsize: int) -> int:
    """Bytes the model's weights take once loaded at `itemsize` bytes per weight: exact for
    safetensors (shapes from the headers), from the stored bytes and config dtype for .bin."""
    files = weight_files(folder)
    if files and files[0].suffix == ".safetensors":
        numel = sum(math.prod(int(d) for d in e["shape"]) for f in files
                    for k, e in safetensors_header(f).items() if k != "__metadata__")
        return numel * itemsize
    stored = sum(_bin_data_bytes(f) for f in files)
    return stored * itemsize // _stored_itemsize(folder)


def _bin_data_bytes(path: Path) -> int:
    """Tensor bytes of a torch.save archive (its `*/data/*` storages); the file size for a legacy pickle."""
    if not zipfile.is_zipfile(path):
        return path.stat().st_size
    with zipfile.ZipFile(path) as archive:
        return sum(e.file_size for e in archive.infolist() if "/data/" in e.filename)


def _stored_itemsize(folder: Path) -> int:
    """Bytes per stored weight from config.json's dtype (fp32 when unsaid: the smaller estimate)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 4
    return _STORED_ITEMSIZE.get(str(config.get("dtype") or config.get("torch_dtype")), 4)


def check_fits(folder: Path, itemsize: int, dtype_name: str) -> None:
    """Refuse (one line) a whole-model load that cannot fit in the available memory, where
    the kernel would kill the process without a word; a .bin-only checkpoint cannot be
    streamed instead, so it says how to make one that can."""
    avail = available_bytes()
    need = load_bytes(folder, itemsize)
    if avail is None or need <= avail:
        return
    bin_only = not any(folder.glob("*.safetensors"))
    hint = ("; pytorch_model*.bin weights cannot be streamed one tensor at a time: convert the checkpoint to "
            "*.safetensors (save_pretrained on a machine with more memory)") if bin_only else ""
    raise UserError(f"{folder}: loading the weights needs ~{need / 2**30:.1f} GiB as {dtype_name}, "
                    f"{avail / 2**30:.1f} GiB of memory is available{hint}")


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where the kernel does not say)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
