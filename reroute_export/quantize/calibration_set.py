"""The calibration set: photographs whose licence allows shipping, one prompt each, each
image checked against the sha256 its manifest records."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import UserError
from ..export.artifact import sha256_file
from ..files import read_json
from ..paths import shipped_dir

if TYPE_CHECKING:
    from .recipes import Recipe

CALIBRATION_ENV = "REROUTE_EXPORT_CALIBRATION"  # a calibration set folder other than the shipped one
_CALIBRATION_MANIFEST = "manifest.json"


def calibration_dir() -> Path:
    """The calibration set: $REROUTE_EXPORT_CALIBRATION, else the shipped `calibration/`
    (the checkout's, or the wheel's copy inside the package: paths.shipped_dir)."""
    env = os.environ.get(CALIBRATION_ENV)
    return Path(env) if env else shipped_dir("calibration")


@dataclass(frozen=True)
class CalibrationSample:
    image: Path
    prompt: str
    entry: dict[str, Any]


def load_calibration_set(folder: Path | None = None, verify: bool = True) -> list[CalibrationSample]:
    """Every sample of the set's manifest, each image checked against its recorded sha256."""
    folder = Path(folder) if folder is not None else calibration_dir()
    path = folder / _CALIBRATION_MANIFEST
    if not path.is_file():
        raise UserError(f"calibration set not found: {path} is missing (set {CALIBRATION_ENV} to a calibration folder)")
    raw = read_json(path, "calibration set")
    entries = raw.get("samples") if isinstance(raw, dict) else None
    if not isinstance(entries, list) or not entries:
        raise UserError(f"calibration set {path} lists no samples")
    out = []
    for e in entries:
        if not isinstance(e, dict) or not {"file", "prompt", "licence", "sha256"} <= set(e):
            raise UserError(f"calibration set {path}: every sample needs file, prompt, licence and sha256")
        image = folder / e["file"]
        if not image.is_file():
            raise UserError(f"calibration set {path}: {e['file']} is missing")
        if verify and sha256_file(image) != e["sha256"]:
            raise UserError(f"calibration set {path}: {e['file']} checksum mismatch")
        out.append(CalibrationSample(image, str(e["prompt"]), e))
    return out


def pick(samples: list[CalibrationSample], recipe: Recipe) -> list[CalibrationSample]:
    """The recipe's number of samples, in the order its seed's permutation gives."""
    if recipe.samples > len(samples):
        raise UserError(f"recipe {recipe.name} asks for {recipe.samples} samples; "
                        f"the calibration set has {len(samples)}")
    order = np.random.default_rng(recipe.seed).permutation(len(samples))[: recipe.samples]
    return [samples[int(i)] for i in order]
