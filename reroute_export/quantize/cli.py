"""The `calibrate` subcommand: arguments (choices from the library's own names) and the command.

Importing this imports the quantizer (onnx): on a runtime-only install the CLI then shows
the one-line "needs the full install" stand-in instead (full_install.register_stage).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from ..files import write_json
from ..paths import shown_dir
from .calibration_set import CALIBRATION_ENV
from .recipes import LIBRARIES, PRECISIONS
from .report import print_summary
from .run import calibrate


def register_cli(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("calibrate", help="quantize an fp32 artifact to an INT8/FP8 QDQ artifact (routing active "
                                         "while calibrating) with a parity report against fp32")
    p.add_argument("--artifact", required=True, help="fp32 artifact folder (from `export`)")
    p.add_argument("--precision", required=True, choices=list(PRECISIONS))
    p.add_argument("--output", required=True, help="artifact folder to write (refused if it exists, unless --force)")
    p.add_argument("--recipe", help="recipe name in calibration/recipes (default: PRECISION-default) or a .json file")
    p.add_argument("--library", choices=list(LIBRARIES), help="override the recipe's quantization library")
    p.add_argument("--calibration-set", help=f"calibration set folder (default: ${CALIBRATION_ENV} or calibration/)")
    p.add_argument("--force", action="store_true", help="replace an existing artifact folder")
    p.add_argument("--json", metavar="OUT", help="write the new manifest as JSON to OUT ('-' for stdout)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(func=cmd_calibrate)
    return p


def cmd_calibrate(args: argparse.Namespace) -> int:
    quiet = args.quiet or args.json == "-"
    manifest = calibrate(args.artifact, args.output, args.precision, recipe=args.recipe, force=args.force,
                         quiet=quiet, library=getattr(args, "library", None),
                         calibration_set=getattr(args, "calibration_set", None))
    return finish(args, manifest, quiet, "calibrate", print_summary)


def finish(args: argparse.Namespace, manifest: dict[str, Any], quiet: bool, command: str,
           summary: Callable[[dict[str, Any], str], None]) -> int:
    """--json, the summary, and the exit code by the written artifact's parity (calibrate, quantize):
    0 within tolerances, 1 failed or could not be measured."""
    if args.json:
        write_json(args.json, manifest)
    parity = manifest["calibration_parity"]
    if not quiet:
        summary(manifest, args.output)
    if not parity.get("measured"):
        print(f"reroute-export: {command}: wrote {shown_dir(args.output)} but could not measure its parity: "
              f"{parity['reason']}", file=sys.stderr)
        return 1
    return 0 if parity["passed"] else 1
