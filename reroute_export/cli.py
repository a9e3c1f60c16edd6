"""The `reroute-export` console script: subcommands over the typed library API.

Exit codes: 0 success; 1 a check failed; 2 could not run (bad input, missing
checkpoint: one line on stderr, no traceback); 3 `--target trt` wrote the ONNX artifact
and its TensorRT build plan but built no engine here (no TensorRT/GPU, or a Jetson
target); 130 interrupted (Ctrl-C); 143 terminated (SIGTERM; 129 SIGHUP), cleaned up like Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn, Sequence

from . import __version__, api
from . import contract as C
from .console import table
from .files import write_json
from .errors import UserError
from .paths import shown_dir

# ---------------------------------------------------------------- argument groups


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line errors: no usage dump (`--help` has it), and a bad
    number says what was expected. Subparsers are made of this class too (argparse uses
    the parent's class), so every subcommand's flags behave alike."""

    def error(self, message: str) -> NoReturn:
        print(f"reroute-export: error: {_plain_error(message)}", file=sys.stderr)
        raise SystemExit(2)


_TYPE_ERROR = re.compile(r"invalid (int|float) value: (.*)$")


def _plain_error(message: str) -> str:
    """argparse's "invalid float value: 'abc'" as "expected a number, got 'abc'"."""
    m = _TYPE_ERROR.search(message)
    if m is None:
        return message
    return f"{message[:m.start()]}expected {'an integer' if m[1] == 'int' else 'a number'}, got {m[2]}"


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required,
                   help="registered name (see `reroute-export models`) or a local checkpoint folder")


def add_plan_args(p: argparse.ArgumentParser, default_method: str = "reroute") -> None:
    from .plan import METHODS

    g = p.add_argument_group("routing plan")
    g.add_argument("--method", default=default_method, choices=list(METHODS),
                   help="routing method (default: reroute; with --artifact, the artifact's)")
    g.add_argument("--budget", type=float, help="average visual tokens per decoder layer")
    g.add_argument("--schedule", help="named schedule shape from the model's graph spec (e.g. reroute-fastv)")
    g.add_argument("--drop-layers", type=_ints, help="decision layers, 0-based, e.g. 2,7,15,23")
    g.add_argument("--keep-ratios", type=_floats, help="keep ratio per decision layer, of the original N")
    g.add_argument("--keep", type=_ints, help="keep count per decision layer, e.g. 152,152,76,38")


def add_input_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inputs (an image and prompt, or processor outputs as .npy)")
    g.add_argument("--image", help="image file")
    g.add_argument("--prompt", help="question about the image")
    g.add_argument("--input-ids", help="int64 [1, L] token ids (.npy)")
    g.add_argument("--pixel-values", help="float32 pixel values in the model's layout (.npy)")
    g.add_argument("--image-grid-thw", help="int64 [1, 3] image grid (.npy, qwen2.5-vl)")


def add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="OUT", help="write the result as JSON to OUT ('-' for stdout)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--verbose", action="store_true", help="print the details (files, per-step timings)")


def plan_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The routing-plan flags as keyword arguments of make_plan / api.plan / api.export."""
    return {"method": args.method or "reroute", "budget": args.budget, "schedule": args.schedule,
            "drop_layers": args.drop_layers, "keep_ratios": args.keep_ratios, "keep": args.keep}


def plan_from_args(spec: Any, args: argparse.Namespace):
    from .plan import make_plan

    return make_plan(spec, **plan_kwargs(args))


# ---------------------------------------------------------------- subcommands


def cmd_models(args: argparse.Namespace) -> int:
    from .spec import known_specs
    from .registry import checkpoint_folder, parameter_count

    # parameters: the architecture built on the meta device (a checkpoint's from its published config);
    # local_folder: where the checkpoint was found offline (the local HF cache), None when it was not
    models = [{"name": s.name, "family": s.family, "checkpoint": s.checkpoint, "layers": s.text.num_layers,
               "visual_tokens": s.vision.visual_tokens, "parameters": parameter_count(s),
               "local_folder": str(checkpoint_folder(s.name) or "") or None if s.checkpoint else None}
              for s in known_specs().values()]
    if args.json:
        write_json(args.json, {"models": models})
    if not args.quiet and args.json != "-":
        rows = [{"model": m["name"], "family": m["family"], "layers": m["layers"],
                 "visual tokens": m["visual_tokens"], "params": f"{m['parameters']:,}",
                 "checkpoint": m["checkpoint"] or "built in code",
                 "here": "-" if not m["checkpoint"] else "in HF cache" if m["local_folder"] else "not found"}
                for m in models]
        print(table(rows, ["model", "family", "layers", "visual tokens", "params", "checkpoint", "here"]))
        if any(m["checkpoint"] and not m["local_folder"] for m in models):
            print("a checkpoint not found here: download it on a connected machine (huggingface-cli download NAME) "
                  "and copy it into the HF cache (HF_HOME), or pass --model /path/to/folder; "
                  "--random-weights runs any of them without one")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    report = api.plan(args.model, text_tokens=args.text_tokens, **plan_kwargs(args)).to_json()
    if args.json:
        write_json(args.json, report)
    if not args.quiet and args.json != "-":
        print_plan(report, args.budget)
    return 0


def print_plan(r: dict[str, Any], budget: float | None) -> None:
    print(f"{r['model']}  method={r['method']}  layers={r['num_layers']}  "
          f"N={r['visual_tokens']} visual + {r['text_tokens']} text tokens")
    rows = [{"decision": "-" if g["layer"] < 0 else g["layer"], "layers": g["layers"], "K": g["keep"],
             "ratio": g.get("ratio", 1.0), "tokens/layer": g["keep"] + r["text_tokens"]} for g in r["layer_groups"]]
    print(table(rows, ["decision", "layers", "K", "ratio", "tokens/layer"]))
    met = "" if budget is None else f"  (budget {budget:g}: off by {r['avg_visual_tokens'] - budget:+.2f})"
    print(f"avg visual tokens per layer: {r['avg_visual_tokens']:.2f}{met}")
    print(f"theoretical prefill speedup (token-layers vs none): {r['theoretical_speedup']:.3f}x")
    print(f"prefill TFLOPs: {r['prefill_tflops']:.3f} (none: {r['prefill_tflops_none']:.3f}; "
          f"vision tower: {r['vision_tflops']:.3f})")
    mib = 1 << 20
    print(f"KV cache: {r['kv_cache_entries']} token-layer entries, {r['kv_cache_bytes_fp16'] / mib:.1f} MiB fp16 "
          f"(none: {r['kv_cache_bytes_fp16_none'] / mib:.1f} MiB)")


NEED_INPUTS = "give --image FILE --prompt TEXT, or --input-ids ids.npy --pixel-values pv.npy"


def sample_args(args: argparse.Namespace) -> dict[str, Any]:
    """--image/--prompt, or --input-ids/--pixel-values[/--image-grid-thw] read into numpy
    ArrayInputs, as the API's `image`/`prompt` or `inputs` keywords; {} when none is given."""
    from .inputs import load_npy_inputs

    if args.input_ids or args.pixel_values:
        if args.image or args.prompt:
            raise UserError("give --image/--prompt or --input-ids/--pixel-values, not both")
        if not (args.input_ids and args.pixel_values):
            raise UserError("--input-ids and --pixel-values go together")
        return {"inputs": load_npy_inputs(args.input_ids, args.pixel_values, args.image_grid_thw)}
    if args.image and args.prompt is not None:
        return {"image": args.image, "prompt": args.prompt}
    if args.image or args.prompt is not None:
        raise UserError(NEED_INPUTS)
    return {}


def need_sample(args: argparse.Namespace) -> dict[str, Any]:
    """sample_args for a command that cannot run without an input (trace, generate)."""
    given = sample_args(args)
    if not given:
        raise UserError(NEED_INPUTS)
    return given


def load_inputs(loaded: Any, args: argparse.Namespace) -> Any:
    """The eager reference's inputs (torch VLInputs), checked against the model."""
    from .trace import check_inputs

    given = need_sample(args)
    if "inputs" in given:
        inputs = given["inputs"].to_torch()
    else:
        inputs = loaded.preprocessor([api.as_image(given["image"])], [given["prompt"]])
    check_inputs(loaded, inputs)
    return inputs


def cmd_trace(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 0:
        raise UserError("--max-new-tokens must be >= 0")
    if (args.model is None) == (args.artifact is None):
        raise UserError("give --model NAME|DIR (eager reference) or --artifact DIR (exported graphs), one of them")
    if args.map and not args.image:
        raise UserError("--map needs an --image (routing maps draw the picture the tokens came from)")
    if args.artifact:
        art = load_artifact(args)
        inputs = art.inputs(**need_sample(args))  # Qwen2.5-VL: resized to the artifact's nearest image size
        result = art.trace(inputs=inputs, max_new_tokens=args.max_new_tokens)
        name = f"{art.manifest['model']} (artifact {shown_dir(args.artifact)}, {art.manifest['precision']})"
        family, thw = art.family, inputs.image_grid_thw
    else:  # the eager reference: torch and transformers (the --artifact path needs neither)
        from .registry import load
        from .trace import check_positions, for_inputs, run_trace

        loaded = load(args.model)
        inputs = load_inputs(loaded, args)
        check_positions(loaded, inputs, args.max_new_tokens)
        loaded = for_inputs(loaded, inputs)
        result = run_trace(loaded, plan_from_args(loaded.spec, args), inputs, args.max_new_tokens)
        name = loaded.spec.name
        family, thw = loaded.family.name, inputs.image_grid_thw
    if args.json:
        write_json(args.json, result.to_json())
    if args.map:
        draw_map(result, args, family, thw)
    if not args.quiet and args.json != "-":
        print_trace(name, result)
    return 0


def print_trace(name: str, result: Any) -> None:
    from .results import stage_table

    plan = result.plan
    print(f"{name}  method={plan.method}  N={plan.visual_tokens}  avg visual tokens/layer={plan.avg_visual_tokens:.2f}")
    if plan.stages:
        print(table(stage_table(result), ["layer", "kept", "deferred", "re-entered"]))
    print(f"generated: {result.generated_ids}")
    print(f"text: {result.text!r}")


def draw_map(result: Any, args: argparse.Namespace, family: str, image_grid_thw: Any) -> None:
    from .preprocess import load_image
    from .viz import map_for

    map_for(load_image(args.image), result, family, args.map, image_grid_thw=image_grid_thw)
    if not args.quiet and args.json != "-":
        print(f"routing map: {args.map}")


runtime_class = api.runtime_class  # the artifact runner for --runtime (parity takes the class)


def add_runtime_arg(p: argparse.ArgumentParser) -> None:
    from .runtime import ARTIFACT_BACKENDS

    p.add_argument("--runtime", default="onnxruntime", choices=list(ARTIFACT_BACKENDS),
                   help="run the artifact's ONNX graphs (ONNX Runtime) or its TensorRT engines (built by --target trt)")


PLAN_FLAGS = ("budget", "schedule", "drop_layers", "keep_ratios", "keep")


def load_artifact(args: argparse.Namespace) -> api.Artifact:
    """An exported artifact (manifest verified) for --runtime; plan flags, if given, must
    describe the plan it was exported with (an artifact's routing is fixed in its graphs)."""
    art = api.load_artifact(args.artifact, getattr(args, "runtime", "onnxruntime"))
    given = [f for f in PLAN_FLAGS if getattr(args, f, None) is not None]
    method = getattr(args, "method", None)
    if method not in (None, art.plan.method):
        raise UserError(f"--method {method} asks for {method}; the artifact was exported for "
                        f"{art.plan.describe()}: drop the plan flags or export that plan")
    if given:
        asked = plan_from_args(artifact_spec(art.manifest, art.plan), args)
        if not asked.same_routing(art.plan):
            raise UserError(f"{plan_difference(args, asked, art.plan)}; the artifact was exported for "
                            f"{art.plan.describe()}: drop the plan flags or export that plan")
    return art


def artifact_spec(manifest: dict[str, Any], plan: Any) -> Any:
    """The spec the artifact's plan was made on, as its manifest records it (schedules, depth,
    N): a checkpoint folder's artifact needs no registry. Older manifests: the registered spec."""
    from dataclasses import replace

    from .spec import known_specs, spec_from_dict

    if "spec" in manifest:
        spec = spec_from_dict(manifest["spec"])
    elif manifest["model"] in known_specs():
        spec = known_specs()[manifest["model"]]
    else:
        raise UserError(f"the artifact's manifest records no spec (exported by an older reroute-export) and its "
                        f"model {manifest['model']!r} is not registered here, so plan flags cannot be checked; "
                        f"drop them (its plan: {plan.describe()}) or re-export it")
    return replace(spec, text=replace(spec.text, num_layers=plan.num_layers),
                   vision=replace(spec.vision, visual_tokens=plan.visual_tokens))


def plan_difference(args: argparse.Namespace, asked: Any, have: Any) -> str:
    """The plan flag that asks for other routing than the artifact's, and what it asks."""
    if asked.decision_layers != have.decision_layers and args.drop_layers is not None:
        culprits = ["drop_layers"]
    else:  # the keep counts differ, or the layers came from a schedule (--budget/--schedule)
        culprits = [f for f in PLAN_FLAGS if f != "drop_layers" and getattr(args, f, None) is not None]
    flags = " ".join(f"--{f.replace('_', '-')} {_flag_value(getattr(args, f))}" for f in culprits)
    return f"{flags} asks K={[s.keep for s in asked.stages]} at layers {list(asked.decision_layers)}"


def _flag_value(value: Any) -> str:
    """A plan flag's value as typed: 0.5,0.25 / 2,4,6 / 32."""
    items = value if isinstance(value, list) else [value]
    return ",".join(f"{v:g}" if isinstance(v, (int, float)) else str(v) for v in items)


def cmd_generate(args: argparse.Namespace) -> int:
    """Image + prompt -> text from an exported artifact (ONNX Runtime), greedy; the text is
    printed while it is generated."""
    shown = not args.quiet and args.json != "-"
    art, sample = load_artifact(args), need_sample(args)
    result = art.trace(**sample, max_new_tokens=args.max_new_tokens,
                       on_text=(lambda piece: print(piece, end="", flush=True)) if shown else None)
    if shown:
        print()
    if args.json:
        write_json(args.json, {"text": result.text, "generated_ids": result.generated_ids,
                              "decisions": result.decisions})
    return 0


def default_output(args: argparse.Namespace) -> str:
    """The folder an export without --output writes, named from the job in the working folder:
    MODEL-METHOD[-bBUDGET][-PRECISION][-trt], e.g. llava-1.5-7b-reroute-b128-trt."""
    model = Path(args.model.rstrip("/") or "/")
    name = model.resolve().name if model.is_dir() else model.stem if model.is_file() else model.name
    method = args.method or "reroute"
    parts = [name or "artifact", method]
    if args.budget is not None and method != "none":
        parts.append(f"b{args.budget:g}")
    if args.precision != "fp32":
        parts.append(args.precision)
    if args.target == "trt":
        parts.append("trt")
    return "-".join(parts)


def cmd_export(args: argparse.Namespace) -> int:
    if args.output is None:
        args.output = default_output(args)  # "wrote DIR/" at the end names it
    result = api.export(
        args.model, output=args.output, target=args.target, precision=args.precision, fp32_layers=args.fp32_layers,
        image_buckets=args.image_buckets, attention=args.attention,
        max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
        inline_functions=args.inline_functions, random_weights=args.random_weights,
        stream_weights=True if args.stream_weights else None, device=args.device, plugin_lib=args.plugin_lib,
        force=args.force, check=not args.no_check, progress=not args.quiet, log=_note,
        **plan_kwargs(args), **sample_args(args))
    check = result.manifest.get("check")
    if args.json:
        write_json(args.json, result.manifest)
    if not args.quiet and args.json != "-":
        from .plan import RoutingPlan

        plan = RoutingPlan.from_dict(result.manifest["plan"])
        print(f"wrote {shown_dir(result.path)} ({result.manifest['model']}, {plan.method}, avg visual tokens/layer "
              f"{plan.avg_visual_tokens:.2f}, {args.precision})")
        if check:
            print_check(check)
        if args.verbose:
            print(table([{"file": f, "bytes": e["bytes"], "sha256": e["sha256"][:16]}
                         for f, e in result.manifest["files"].items()], ["file", "bytes", "sha256"]))
        if args.target == "trt":
            print_trt(result.manifest["trt"], result.path)
    if result.check_failures:
        return 1
    if args.target == "trt" and not result.engines_built:
        if result.manifest["trt"].get("error"):
            return 1  # TensorRT ran and rejected a graph: a failure, not "build it elsewhere"
        from .build.trt import EXIT_NOT_BUILT

        return EXIT_NOT_BUILT
    return 0


def _note(message: str) -> None:
    """The library's notes during an export (e.g. streaming the weights), on stderr."""
    print(f"reroute-export: {message}", file=sys.stderr)


def print_trt(rec: dict[str, Any], path: Any) -> None:
    from .build.trt import memory_text

    for warning in rec.get("warnings", []):
        print(f"warning: {warning}")
    if rec["built"]:
        print(f"TensorRT {rec['tensorrt_version']} engines built on {rec['gpu']} (sm {rec['compute_capability']}): "
              + ", ".join(e["engine"] for e in rec["engines"].values()))
        return
    if rec.get("error"):
        print(f"TensorRT build FAILED: {rec['reason']}: {rec['error']}")
        return
    print(f"no TensorRT engine was built: {rec['reason']}.")
    folder = shown_dir(path)
    print(f"to build for {rec['device']} (TensorRT {rec['trt_version']}), copy {folder} to the device and run "
          f"`bash {folder}build_trt.sh` (plan: {folder}build_plan.json). Estimated memory: "
          f"{memory_text(rec['memory'])}.")


def print_check(check: dict[str, Any]) -> None:
    if check.get("skipped"):
        print(f"post-export check {check['skipped']}")
        return
    m = check["metrics"]
    rows = [{"check": "routing, per stage", "value": " ".join(f"{s['layer']}:{s['overlap']:.2f}" for s in m["stages"])
             or "-", "result": "exact" if m["decision_exact"] == 1 else "differs"},
            {"check": "last logits max |diff|", "value": m["logits_max_abs"], "result": ""},
            {"check": "last logits cosine", "value": m["logits_cosine"], "result": ""},
            {"check": "greedy tokens agreeing", "value": f"{m['token_agreement']:.2f} of {m['tokens']}",
             "result": "" if m["first_divergent_step"] is None else f"first differs at step {m['first_divergent_step']}"}]
    print(table(rows, ["check", "value", "result"]))
    print("post-export check: " + ("passed" if check["passed"] else "FAILED: " + "; ".join(check["failures"])))


def cmd_parity(args: argparse.Namespace) -> int:
    from .check.parity import COLUMNS, markdown, parse_overrides, run_parity, summary_rows

    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be >= 1")
    overrides = parse_overrides(args.tol)
    if args.layers is not None or args.dump:
        return cmd_parity_layers(args, overrides)
    maps: dict[str, str] = {}
    on_result = None
    if args.markdown:
        def on_result(item, ref, got, art, inputs):  # noqa: ANN001  (draw maps only where routing differs)
            if ref.decisions != got.decisions:
                maps[item.name] = parity_map(item, ref, got, art, inputs, Path(args.markdown))

    report = run_parity(Path(args.artifact), args.model, args.inputs, args.max_new_tokens, overrides,
                        quiet=args.quiet or args.json == "-", on_result=on_result,
                        runner=runtime_class(args.runtime))
    if args.json:
        write_json(args.json, report.to_json())
    if args.markdown:
        from .files import write_text

        write_text(args.markdown, markdown(report, maps))
    if not args.quiet and args.json != "-":
        print(table(summary_rows(report), COLUMNS))
        for f in report.failures:
            print(f"FAILED {f}")
        print(f"parity: {'passed' if report.passed else 'FAILED'} ({len(report.inputs)} inputs, "
              f"{report.precision} artifact vs fp32 reference)")
    return 0 if report.passed else 1


def cmd_parity_layers(args: argparse.Namespace, overrides: dict[str, float]) -> int:
    """parity --layers [N] (--dump DIR implies it): the first decoder layer over tolerance, per input."""
    from .check.layers import COLUMNS, markdown, run_layer_parity, summary_rows, verdict

    if args.runtime != "onnxruntime":
        raise UserError("parity --layers taps the artifact's ONNX graphs: use --runtime onnxruntime")
    report = run_layer_parity(Path(args.artifact), args.model, args.inputs, args.layers, args.layer_steps, overrides,
                              dump=Path(args.dump) if args.dump else None, quiet=args.quiet or args.json == "-")
    if args.json:
        write_json(args.json, report.to_json())
    if args.markdown:
        from .files import write_text

        write_text(args.markdown, markdown(report))
    if not args.quiet and args.json != "-":
        for record in report.inputs:
            if record["layers"]:
                print(table(summary_rows(record, report.steps), COLUMNS))
            for note in record["routing"]:
                print(f"note: {record['input']}: {note}")
            print(verdict(record, report.layers))
        for note in report.notes:
            print(f"note: {note}")
        if report.dump:
            print(f"per-layer tensors: {report.dump}/index.json")
        print(f"parity --layers: {'passed' if report.passed else 'FAILED'} ({len(report.inputs)} inputs, "
              f"{report.layers} layers, prefill + {report.steps} decode steps, {report.precision} artifact "
              f"vs fp32 reference)")
    return 0 if report.passed else 1


def parity_map(item: Any, ref: Any, got: Any, art: Any, inputs: Any, markdown_path: Any) -> str:
    """Reference-vs-artifact routing maps beside the markdown report; returns the relative link.
    The grid is the one the input ran at (a Qwen2.5-VL artifact's image-size bucket)."""
    from .preprocess import load_image
    from .viz import fit_for, grid_for, side_by_side

    name = f"{markdown_path.stem}-{''.join(c if c.isalnum() else '-' for c in item.name)}.png"
    grid = grid_for(art.family, ref.plan.visual_tokens, inputs.image_grid_thw)
    side_by_side(ref, got, load_image(item.image), grid, markdown_path.parent / name, fit=fit_for(art.family))
    return name


def cmd_lint(args: argparse.Namespace) -> int:
    from .check.lint import lint

    quiet = args.quiet or args.json == "-"
    report = lint(Path(args.target), args.trt_version, polygraphy=args.polygraphy, quiet=quiet)
    if args.json:
        write_json(args.json, report)
    if not quiet:
        if report["findings"]:
            print(table(report["findings"], ["severity", "graph", "node", "op", "message"]))
        for name, poly in report["polygraphy"].items():
            print(f"polygraphy check lint {name}: {polygraphy_status(poly)}")
            if poly["ran"] and poly["returncode"] != 0:
                print("    " + "\n    ".join(poly["output"].strip().splitlines()[-6:]))
        verdict = "passed" if report["passed"] else "FAILED"
        failed = report["polygraphy_failed"]
        print(f"lint for TensorRT {report['trt_version']}: {verdict} "
              f"({report['errors']} errors, {report['warnings']} warnings"
              + (f"; polygraphy failed {len(failed)} graphs: {', '.join(failed)}" if failed else "") + ")")
    return 0 if report["passed"] else 1


def polygraphy_status(poly: dict[str, Any]) -> str:
    if not poly["ran"]:
        return poly["reason"]
    if not poly["judged"]:
        return f"exit {poly['returncode']} (shapes unknown: every dynamic axis fed 1; reported, not judged)"
    return f"exit {poly['returncode']}" + (" at the artifact's shapes" if poly["input_shapes"] else "")


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="reroute-export",
        description="Export VLMs with in-decoder Reroute visual-token routing.",
    )
    parser.add_argument("--version", action="version", version=f"reroute-export {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("models", help="list registered models (family, checkpoint, layers, visual tokens, parameters)")
    add_output_args(p)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("plan", help="keep counts, FLOPs and KV cache for a routing budget (no weights needed)")
    add_model_args(p)
    add_plan_args(p)
    p.add_argument("--text-tokens", type=int, help="text tokens in the prompt for the accounting (default: spec)")
    add_output_args(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("trace", help="one input through the eager reference (--model) or an artifact (--artifact): "
                                     "decisions, logits, greedy tokens")
    add_model_args(p, required=False)
    p.add_argument("--artifact", help="exported artifact folder, run with ONNX Runtime (instead of --model)")
    add_runtime_arg(p)
    add_plan_args(p, default_method=None)
    add_input_args(p)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--map", metavar="PNG", help="draw the routing map (active/deferred/re-entered patches per stage)")
    add_output_args(p)
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("generate", help="image + prompt -> text from an exported artifact (ONNX Runtime, greedy)")
    p.add_argument("--artifact", required=True, help="exported artifact folder")
    add_runtime_arg(p)
    add_input_args(p)
    p.add_argument("--max-new-tokens", type=int, default=32)
    add_output_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("parity", help="eager fp32 reference vs an exported artifact on a set of inputs (CI check)")
    p.add_argument("--artifact", required=True, help="exported artifact folder")
    p.add_argument("--model", help="reference model (default: the one the artifact was exported from)")
    add_runtime_arg(p)
    p.add_argument("--inputs", help="input set: JSON list of {image, prompt}, or a folder with inputs.json "
                                    "(default: the shipped sample photos)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="greedy tokens compared per input")
    p.add_argument("--tol", action="append", metavar="NAME=VALUE",
                   help="override one tolerance, e.g. logits_max_abs_max=1e-3 (repeatable)")
    p.add_argument("--markdown", metavar="OUT", help="write a Markdown report (routing maps where routing differs)")
    g = p.add_argument_group("per-layer drift (--layers)")
    g.add_argument("--layers", type=int, nargs="?", const=0, metavar="N",
                   help="compare every decoder layer's hidden state and K/V rows instead, and name the first "
                        "layer over tolerance; N: only layers 0..N-1 (a fast CI gate)")
    g.add_argument("--layer-steps", type=int, default=2, metavar="S",
                   help="decode steps compared after prefill by --layers (default 2; teacher-forced)")
    g.add_argument("--dump", metavar="DIR", help="write the per-layer tensors of both sides as safetensors "
                                                 "(+ index.json); implies --layers")
    add_output_args(p)
    p.set_defaults(func=cmd_parity)

    p = sub.add_parser("lint", help="check ONNX graphs against what TensorRT accepts")
    p.add_argument("target", help="artifact folder or .onnx file")
    p.add_argument("--trt-version", default="10.3", choices=["10.3", "11"])
    p.add_argument("--polygraphy", action="store_true",
                   help="also run `polygraphy check lint` on each graph (ONNX Runtime on generated inputs, "
                        "~5 s a graph; reported, not judged)")
    add_output_args(p)
    p.set_defaults(func=cmd_lint)

    p = sub.add_parser("export", help="export ONNX graphs with routing inside the decoder (+ post-export check)")
    add_export_args(p)
    p.set_defaults(func=cmd_export)

    # Commands that live beside their stage (each module registers its own subparser); on a
    # runtime-only install a module that cannot be imported leaves a one-line stand-in.
    from .full_install import register_stage

    register_stage(sub, "quantize.cli", "calibrate")
    register_stage(sub, "quantize.weights_cli", "quantize")
    register_stage(sub, "bench.cli", "bench")
    register_stage(sub, "inspect_artifact", "inspect")
    return parser


def add_export_args(p: argparse.ArgumentParser) -> None:
    from .contract import PRECISIONS

    add_model_args(p)
    add_plan_args(p)
    g = p.add_argument_group("export")
    g.add_argument("--target", default="onnx", help="onnx, or trt (ONNX + TensorRT engines or build plan)")
    g.add_argument("--device", default="gpu-trt10",
                   help="TensorRT target: gpu-trt10, gpu-trt11, jetson-orin, jetson-orin-nx, jetson-orin-nano")
    g.add_argument("--plugin-lib", help="TensorRT plugin library implementing reroute ops (default: local functions)")
    g.add_argument("--output", help="artifact folder to write (refused if it exists, unless --force); default "
                                   "MODEL-METHOD-bBUDGET[-PRECISION][-trt] in the working folder")
    g.add_argument("--precision", default="fp32", choices=list(PRECISIONS))
    g.add_argument("--fp32-layers", metavar="RANGE",
                   help="fp16 exports: keep these decoder layers in fp32, e.g. 28-31 or 28- (fp16 overflow fallback)")
    g.add_argument("--image-buckets", metavar="HxW,...",
                   help="qwen2.5-vl: more image sizes in pixels (multiples of 28), e.g. 448x448,336x672; each image "
                        "is resized to the nearest; LLaVA takes one size")
    g.add_argument("--attention", default="auto", choices=["auto", *C.ATTENTION_FORMS],
                   help="how segments update their KV buffers: portable (host writes rows; TensorRT 10.3), ort-gqa "
                        "(ONNX Runtime GroupQueryAttention, in place), kv-scatter (opset-24 TensorScatter + Attention; "
                        "TensorRT 11); auto: portable for --target onnx, by TensorRT version for --target trt")
    g.add_argument("--max-prompt-tokens", type=int, help="longest prompt the artifact takes (default N + 512)")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--inline-functions", action="store_true", help="write reroute ops expanded into standard ops")
    g.add_argument("--force", action="store_true", help="replace an existing artifact folder")
    g.add_argument("--no-check", action="store_true", help="skip the post-export parity check")
    g.add_argument("--random-weights", action="store_true",
                   help="a registered real architecture (e.g. llava-1.5-7b) with seeded random weights, no "
                        "checkpoint needed; weights are streamed to disk one tensor at a time (memory stays "
                        "far below the model size)")
    g.add_argument("--stream-weights", action="store_true",
                   help="read each weight from the checkpoint's safetensors files as it is written, never loading "
                        "the model whole (automatic when the checkpoint would not fit in half the free memory)")
    add_input_args(p)
    add_output_args(p)


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """Parse a command line; the bare form `reroute-export --model M --budget B ...` is `export`."""
    argv = list(argv)
    if argv and argv[0].startswith("--") and argv[0] not in ("--help", "--version"):
        argv = ["export", *argv]
    return build_parser().parse_args(argv)


def run(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parse(sys.argv[1:] if argv is None else argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    from .full_install import run_command
    from .progress import loading_bars

    with loading_bars(not getattr(args, "quiet", False) and getattr(args, "json", None) != "-"):
        return run_command(func, args)  # a torch-needing command on a runtime install: one line


class Terminated(KeyboardInterrupt):
    """SIGTERM (or SIGHUP) raised as an exception: it unwinds like Ctrl-C, so `finally` blocks
    and the artifact writer's cleanup run; the default action kills with neither and leaves
    `.OUT.tmp-PID-*` behind."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextmanager
def _signals_unwind() -> Iterator[None]:
    def raise_terminated(signum: int, frame: Any) -> None:
        signal.signal(signum, signal.SIG_DFL)  # a second one kills at once: a stuck cleanup stays killable
        raise Terminated(signum)

    installed: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
        for signum in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if signum is not None and signal.getsignal(signum) == signal.SIG_DFL:  # keep nohup's SIG_IGN
                installed[signum] = signal.signal(signum, raise_terminated)
    try:
        yield
    finally:
        for signum, previous in installed.items():
            signal.signal(signum, previous)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        with _signals_unwind():
            return run(argv)
    except UserError as e:
        print(f"reroute-export: error: {e}", file=sys.stderr)
        return e.exit_code
    except Terminated as e:
        print(f"reroute-export: terminated ({signal.Signals(e.signum).name})", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("reroute-export: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`... --json - | head`): stop quietly, as a SIGPIPE would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        return 128 + 13


if __name__ == "__main__":
    sys.exit(main())
