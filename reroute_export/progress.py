"""Progress display for long work; silent with --quiet or --json -, plain lines off a TTY."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator


class Steps:
    """Named steps of a long job: `with steps.step("prefill graph"): ...`."""

    def __init__(self, total: int, quiet: bool = False, title: str = "") -> None:
        self.total, self.quiet, self.done = total, quiet, 0
        self._bar = None
        if not quiet and sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                                 transient=True)
            self._bar.start()
            self._task = self._bar.add_task(title, total=total)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        if self._bar is not None:
            self._bar.update(self._task, description=name)
        try:
            yield
        finally:
            self.done += 1
            if self._bar is not None:
                self._bar.update(self._task, advance=1)
            elif not self.quiet:
                print(f"[{self.done}/{self.total}] {name} ({time.perf_counter() - start:.1f}s)", file=sys.stderr)

    def note(self, text: str) -> None:
        """Progress inside the current step (e.g. bytes written so far)."""
        if self._bar is not None:
            self._bar.update(self._task, description=text)
        elif not self.quiet:
            print(f"      {text}", file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


_LOADING_BARS: ContextVar[bool] = ContextVar("loading_bars", default=False)


@contextmanager
def loading_bars(show: bool) -> Iterator[None]:
    """Whether, inside the block, transformers' own "Loading weights" bar shows while a
    checkpoint loads: the CLI shows it unless --quiet (a 7B checkpoint loads for minutes), the
    library only with progress=True (it prints nothing unless asked)."""
    token = _LOADING_BARS.set(show)
    try:
        yield
    finally:
        _LOADING_BARS.reset(token)


def loading_bars_shown() -> bool:
    return _LOADING_BARS.get()
