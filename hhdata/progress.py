"""Progress of a long command, one bar per stage, on stderr when it is a terminal.

    with stage("reading", total=size, unit="B") as advance:
        for block in blocks:
            advance(len(block))

A bar is drawn (tqdm) only when stderr is a terminal and no CI variable is set, so piped
output and logs stay clean; ``shown`` says which, and ``show=`` overrides it. ``advance`` may
be called from several threads. This module imports nothing heavy until a bar is drawn.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def shown(show: bool | None = None) -> bool:
    """Whether stage() draws a bar: show when given, else True on a terminal outside CI.

    >>> shown(False), shown(True)
    (False, True)
    """
    if show is not None:
        return show
    if os.environ.get("CI") or os.environ.get("HHDATA_NO_PROGRESS"):
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stderr
        return False


def _size() -> tuple[int, int]:
    """The terminal's (columns, rows); 80 x 24 where it reports none: a fresh
    pseudo-terminal says 0 x 0, and tqdm draws nothing on a terminal of 0 rows."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):
        return 80, 24
    return size.columns or 80, size.lines or 24


def _ignore(_: int) -> None:
    """advance() when no bar is drawn."""


@contextmanager
def stage(
    label: str, total: int | None = None, unit: str = "B", show: bool | None = None
) -> Iterator[Callable[[int], None]]:
    """A bar for one stage of a command, closed when the block ends; yields advance(n).

    total is in units of ``unit`` ("B": bytes, scaled to kB/MB; anything else is counted
    as is, e.g. "pairs"); None draws a counter without an end.
    """
    if not shown(show):
        yield _ignore
        return
    from tqdm import tqdm

    columns, rows = _size()
    bar = tqdm(
        total=total,
        desc=label,
        unit=unit,
        unit_scale=unit == "B",
        file=sys.stderr,
        leave=True,
        ncols=columns,
        nrows=rows,
        # stages counted in steps or pairs often finish in one update, where a rate means
        # nothing: show the count and the time taken; bytes keep tqdm's rate and estimate
        bar_format=None if unit == "B" else "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}]",
    )
    try:
        yield bar.update
    finally:
        bar.close()
