"""Live progress bars (tqdm) for a person at a terminal; nothing when the output goes to a file or a pipe.

A bar draws itself with carriage returns and escape codes, which make a log file unreadable, so bars are made only
when standard output is a terminal; callers then print plain lines instead (see ``dllog.Report``).
"""
from __future__ import annotations

import sys
from typing import Iterable, Optional


def on_terminal(stream=None) -> bool:
    """Whether ``stream`` (default: standard output) is an interactive terminal."""
    stream = sys.stdout if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def progress_bar(total: Optional[int], desc: str, unit: str = "it", *, leave: bool = False):
    """A tqdm bar on standard output, or None when standard output is not a terminal."""
    if not on_terminal():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=leave, file=sys.stdout, dynamic_ncols=True,
                mininterval=0.5)


def progress(iterable: Iterable, total: Optional[int], desc: str, unit: str = "it") -> Iterable:
    """``iterable``, with a bar while it is consumed when standard output is a terminal."""
    bar = progress_bar(total, desc, unit)
    if bar is None:
        return iterable
    return _counted(iterable, bar)


def _counted(iterable: Iterable, bar):
    try:
        for item in iterable:
            yield item
            bar.update(1)
    finally:
        bar.close()
