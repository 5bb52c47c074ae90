"""Which pass a compile is in, for a person watching it (`python -m fusion optimize --progress`).

Passes announce themselves with `stage(name)` (pipeline: each named pass; rewrites: saturate, extract;
lower: compile kernels). Nobody listens unless a display is open, so announcing costs a list check.

    with progress.display(True, "optimize bert"):   # a rich spinner on a terminal, else one line per pass
        fusion.optimize(model, inputs)
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator, TextIO

_LISTENERS: list[Callable[[str], None]] = []


def stage(name: str) -> None:
    """Announce that pass `name` starts now."""
    for fn in list(_LISTENERS):
        fn(name)


@contextmanager
def listen(fn: Callable[[str], None]) -> Iterator[None]:
    """Call `fn(stage name)` for every stage announced inside the block."""
    _LISTENERS.append(fn)
    try:
        yield
    finally:
        _LISTENERS.remove(fn)


@contextmanager
def display(enabled: bool, title: str, stream: TextIO | None = None) -> Iterator[None]:
    """Show the current stage on `stream` (stderr): a rich status spinner when it is a terminal and rich
    is installed, else a line per stage with the seconds since the start. Disabled: shows nothing."""
    stream = stream or sys.stderr
    if not enabled:
        yield
        return
    t0 = time.perf_counter()
    spinner = None
    if stream.isatty():
        try:
            from rich.console import Console

            spinner = Console(file=stream).status(f"{title}: starting")
        except ImportError:
            spinner = None
    if spinner is not None:
        def show(name: str) -> None:
            spinner.update(f"{title}: {name} ({time.perf_counter() - t0:.1f} s)")

        with spinner, listen(show):
            yield
        print(f"{title}: done in {time.perf_counter() - t0:.1f} s", file=stream)
        return

    def line(name: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f} s] {title}: {name}", file=stream, flush=True)

    with listen(line):
        yield
    line("done")
