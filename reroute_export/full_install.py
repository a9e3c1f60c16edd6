"""Commands on a runtime-only install: one line, not a traceback, for those that need more.

The runtime install (`pip install --no-deps reroute-export` plus the `[runtime]` extra's
numpy, Pillow, tokenizers and onnxruntime; README "Run an artifact without torch") runs
`generate` and `trace --artifact`. Every other command needs the full install; on a
runtime install it stops with one line naming the command.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
from typing import Any

from .errors import UserError

# Import names of the full install's dependencies that the runtime install lacks.
FULL_INSTALL_MODULES = frozenset({"torch", "transformers", "onnx", "onnxscript", "onnx_ir", "safetensors", "rich"})


def needs_full_install(e: ModuleNotFoundError) -> bool:
    """Whether `e` is a full-install dependency missing (anything else is a real bug). A missing
    submodule of an installed package (e.g. `transformers.models.x` in another version) is not:
    the full install is there, and saying "install it" would send the user the wrong way."""
    top = (e.name or "").split(".")[0]
    return top in FULL_INSTALL_MODULES and importlib.util.find_spec(top) is None


def full_install_error(command: str) -> UserError:
    return UserError(f"`{command}` needs the full install (torch, transformers): pip install reroute-export")


def register_stage(sub: Any, module: str, command: str) -> None:
    """`module`'s own subparser (its `register_cli`), or, when the module cannot even be imported
    here, a stand-in `command` that takes any arguments and says what to install."""
    try:
        register = importlib.import_module(f"{__package__}.{module}").register_cli
    except ModuleNotFoundError as e:
        if not needs_full_install(e):
            raise
        # prefix_chars no argument starts with: every argument, --help included, is accepted
        p = sub.add_parser(command, help="(needs the full install)", add_help=False, prefix_chars="\0")
        p.add_argument("ignored", nargs="*")
        p.set_defaults(func=lambda args: _refuse(command))
        return
    register(sub)


def _refuse(command: str) -> int:
    raise full_install_error(command)


def run_command(func: Any, args: argparse.Namespace) -> int:
    """`func(args)`, a missing full-install module turned into the one-line error."""
    try:
        return func(args)
    except ModuleNotFoundError as e:
        if not needs_full_install(e):
            raise
        raise full_install_error(args.command) from None
