"""What the command-line tools share (classify.py, checkpoint2model.py, export_onnx.py, the report and the
benchmarks): their parser, one-line errors and exit status, quiet logging. Their other helpers live with their job:
atomic output files in :mod:`.atomic_files`, models from checkpoints (and the class names and preprocessing a
checkpoint records) in :mod:`.checkpoints`, mixed precision in :class:`.training.Precision`.

Every tool's ``main(argv)`` is wrapped by :func:`tool_main`: bad input (a missing or unreadable file, a checkpoint
that is not one, an unknown architecture...) raised as :class:`ToolError`, ``CheckpointError`` or ``DataError``
becomes one ``error: ...`` line on stderr and exit status 2, without a traceback; any other exception is a bug and
keeps its traceback.
"""
from __future__ import annotations

import argparse
import functools
import logging
import sys
from typing import Callable, Optional, Sequence

from errors import EXIT_BAD_INPUT, UserError


class ToolError(UserError):
    """Bad input to a tool; the message (one line) is printed as ``error: <message>``."""


class ToolParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one ``error: ...`` line (and exit status 2), like the tools' own."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see {self.prog} --help)\n")


def one_line(message: str) -> str:
    """A multi-line message (a checkpoint mismatch lists keys on several lines) joined into one line."""
    return "; ".join(part.strip() for part in str(message).splitlines() if part.strip()).replace(":;", ":")


def tool_main(function: Callable[[Optional[Sequence[str]]], int]) -> Callable[[Optional[Sequence[str]]], int]:
    """Decorate a tool's ``main(argv) -> exit status``: bad input becomes one ``error:`` line and exit status 2."""
    @functools.wraps(function)
    def wrapper(argv: Optional[Sequence[str]] = None) -> int:
        try:
            return function(argv)
        except UserError as error:  # ToolError, CheckpointError, DataError...
            print(f"error: {one_line(error)}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except OSError as error:  # a file that cannot be read or written
            where = f"{error.filename}: " if error.filename else ""
            print(f"error: {where}{error.strerror or error}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            return 130

    return wrapper


def quiet_logging(level: int = logging.WARNING) -> None:
    """Route log records at ``level`` and above to stderr, so a tool's own output on stdout stays clean."""
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
