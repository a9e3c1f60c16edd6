"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""

from __future__ import annotations


class UserError(Exception):
    """An expected mistake in the user's input: shown as one line, exit code 2."""

    exit_code = 2


class MissingCheckpoint(UserError):
    """A real checkpoint is not in a local folder or the HF cache."""


class GraphRunError(UserError):
    """An artifact's graph failed inside the runtime (inconsistent shapes, a tampered or
    corrupt graph): names the graph and the node. `parity` reports it as a failed check."""
