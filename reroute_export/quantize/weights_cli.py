"""The `quantize` subcommand (weight-only INT4/INT8): arguments from the library's own names.

Importing this imports onnx (through weights.py): on a runtime-only install the CLI shows the
one-line "needs the full install" stand-in instead (full_install.register_stage)."""

from __future__ import annotations

import argparse
from typing import Any

from .calibration_set import CALIBRATION_ENV
from .cli import finish
from .encodings import BLOCKS, ENCODINGS
from .weights import METHODS, ROUTING_CHOICES, ROUTING_PROJECTIONS, WEIGHTS, print_summary, quantize_weights


def register_cli(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("quantize", help="weight-only INT4/INT8 (block-wise, RTN or AWQ) of an fp32/fp16 artifact, "
                                        "as ONNX Runtime MatMulNBits or TensorRT's blocked DequantizeLinear")
    p.add_argument("--artifact", required=True, help="fp32 or fp16 artifact folder (from `export`)")
    p.add_argument("--weights", required=True, choices=list(WEIGHTS))
    p.add_argument("--method", default="rtn", choices=list(METHODS),
                   help="rtn: round to nearest; awq: activation-aware scaling calibrated with routing active (int4); "
                        "modelopt-awq: NVIDIA ModelOpt's INT4 awq_lite on the same feeds (int4, qdq; "
                        "pip install 'reroute-export[modelopt]')")
    p.add_argument("--block", type=int, default=128, choices=list(BLOCKS), help="input rows per scale")
    p.add_argument("--encoding", default=None, choices=list(ENCODINGS),
                   help="matmulnbits: ONNX Runtime (com.microsoft); qdq: DequantizeLinear-21 + MatMul (TensorRT >= 10; "
                        "ONNX Runtime fuses it into MatMulNBits at load). Default: matmulnbits, qdq for modelopt-awq")
    p.add_argument("--output", required=True, help="artifact folder to write (refused if it exists, unless --force)")
    p.add_argument("--calibration-set", help=f"--method awq: calibration set folder (default: ${CALIBRATION_ENV} "
                                             "or calibration/)")
    p.add_argument("--force", action="store_true", help="replace an existing artifact folder")
    p.add_argument("--routing-projections", default=ROUTING_PROJECTIONS, choices=list(ROUTING_CHOICES),
                   help="head.j's q/k projections, which feed the routing scores: int8 whatever --weights "
                        "says (default: 1/18 of int4's rounding), kept float, or quantized like every other "
                        "decoder Linear (smallest; routing then reads int4-rounded weights)")
    p.add_argument("--no-parity", action="store_true",
                   help="skip the parity pass against the source (it runs both artifacts; exit 1: unmeasured)")
    p.add_argument("--json", metavar="OUT", help="write the new manifest as JSON to OUT ('-' for stdout)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(func=cmd_quantize)
    return p


def cmd_quantize(args: argparse.Namespace) -> int:
    quiet = args.quiet or args.json == "-"
    manifest = quantize_weights(args.artifact, args.output, weights=args.weights, method=args.method,
                                block=args.block, encoding=args.encoding, force=args.force, quiet=quiet,
                                calibration_set=args.calibration_set, parity=not args.no_parity,
                                routing_projections=args.routing_projections)
    return finish(args, manifest, quiet, "quantize", print_summary)
