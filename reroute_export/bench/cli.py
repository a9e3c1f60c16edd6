"""The `bench` subcommand: arguments (choices from the library's own names) and the command."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import UserError
from ..plan import METHODS
from ..runtime import BACKENDS
from .config import DEFAULT_BACKENDS, DEFAULT_METHODS, DEFAULT_PRECISIONS, DTYPES, PRECISIONS, QUANTIZE


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def register_cli(sub: Any) -> argparse.ArgumentParser:
    """Add the `bench` subcommand to an argparse subparsers object."""
    p = sub.add_parser("bench", help="measure prefill/decode speed per method and backend",
                       description="Measured vision / prefill / decode speed and peak memory per (method, "
                                   "backend), next to the planner's FLOPs, KV bytes and theoretical speedup.")
    p.add_argument("--model", required=True, help="registered name (e.g. bench-llava) or a local checkpoint folder")
    p.add_argument("--budget", type=float, required=True, help="average visual tokens per decoder layer")
    p.add_argument("--methods", type=_names, default=list(DEFAULT_METHODS),
                   help=f"comma-separated: {','.join(METHODS)} (default: all four)")
    p.add_argument("--backends", type=_names, default=list(DEFAULT_BACKENDS),
                   help=f"comma-separated: {','.join(BACKENDS)} (default: {','.join(DEFAULT_BACKENDS)}); "
                        "torch-static runs the export's static-shape modules, as CUDA graphs on a GPU")
    p.add_argument("--precisions", type=_names, default=list(DEFAULT_PRECISIONS),
                   help=f"comma-separated weight precisions of the onnxruntime backend's artifacts: "
                        f"{','.join(PRECISIONS)} (default fp32); int8/int4 are weight-only, quantized from the "
                        f"fp32 artifact ({QUANTIZE['method']}, block {QUANTIZE['block']}, {QUANTIZE['encoding']}); "
                        "each is judged against fp32 and timed against the machine's floors measured in the run")
    p.add_argument("--attention", default="auto",
                   help="attention form of the onnxruntime backend's artifacts (export --attention: portable, "
                        "ort-gqa, kv-scatter; default auto, what `export --target onnx` picks)")
    p.add_argument("--device", default="cpu", help="where the torch backends run: cpu (default) or cuda[:N]")
    p.add_argument("--dtype", choices=list(DTYPES), help="torch backends' weights (default fp32 on cpu, fp16 on cuda)")
    p.add_argument("--random-weights", action="store_true",
                   help="a registered real architecture (e.g. llava-1.5-7b) at full size with seeded random "
                        "weights, built in --dtype on --device; no checkpoint needed")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for torch and ONNX Runtime (default 2)")
    p.add_argument("--decode-tokens", type=int, default=8, help="greedy decode steps per pass (default 8)")
    p.add_argument("--artifacts", metavar="DIR", help="export ONNX artifacts here and reuse them on later runs "
                                                      "(default: a temporary folder, removed afterwards)")
    p.add_argument("--json", metavar="OUT", help="write records and summary as JSON to OUT ('-' for stdout)")
    p.add_argument("--markdown", metavar="OUT", help="write a Markdown table to OUT")
    p.add_argument("--quiet", action="store_true", help="no progress and no table")
    p.set_defaults(func=cmd_bench)
    return p


def _payload(args: argparse.Namespace, records: list[dict[str, Any]], load_before: Any) -> dict[str, Any]:
    from .machine import load_average, machine
    from .report import summarize

    return {
        "bench": {"model": args.model, "budget": args.budget, "methods": list(args.methods),
                  "backends": list(args.backends), "precisions": list(args.precisions),
                  "attention": args.attention, "repeats": args.repeats, "warmup": args.warmup,
                  "threads": args.threads, "decode_tokens": args.decode_tokens, "device": args.device,
                  "dtype": args.dtype or ("fp32" if args.device == "cpu" else "fp16"),
                  "random_weights": args.random_weights},
        "machine": {**machine(), "load_average_before": load_before, "load_average_after": load_average()},
        "records": records, "summary": summarize(records),
    }


def cmd_bench(args: argparse.Namespace) -> int:
    from ..files import write_json, write_text
    from .machine import load_average
    from .report import COLUMNS, markdown, rows, summary_lines
    from .run import run_bench

    load_before = load_average()  # a busy shared machine skews every figure: record it
    records = run_bench(args.model, args.budget, args.methods, args.backends, args.repeats, args.warmup,
                        args.threads, progress=not args.quiet and args.json != "-",
                        decode_tokens=args.decode_tokens, artifacts=args.artifacts, device=args.device,
                        dtype=args.dtype, random_weights=args.random_weights, precisions=args.precisions,
                        attention=args.attention)
    payload = _payload(args, records, load_before)
    if args.json:
        write_json(args.json, payload)
    if args.markdown:
        write_text(args.markdown, markdown(payload))
    if not args.quiet and args.json != "-":
        from ..console import table

        print(table(rows(records), COLUMNS))
        for line in summary_lines(payload["summary"]):
            print(line)
    if not any(r.get("status") == "ok" for r in records):  # a CI job must not read "nothing" as a pass
        why = sorted({r.get("status", "skipped").removeprefix("skipped: ") for r in records})
        raise UserError(f"bench measured nothing: every backend was skipped ({'; '.join(why)})")
    return 0
