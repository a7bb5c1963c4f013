"""Run reports in NVIDIA DLLogger's JSON-lines format, plus readable console progress.

Each report line is ``DLLL `` followed by one JSON object, as DLLogger 1.0 writes them:

    DLLL {"timestamp": "1732790000.123", "datetime": "2026-11-28 09:50:00.123456", "elapsedtime": "12.3",
          "type": "LOG", "step": [1, 20], "data": {"train.loss": 2.31, ...}}
    DLLL {"timestamp": ..., "type": "METADATA", "metric": "train.loss", "metadata": {"unit": null, "format": ":.5f"}}

Steps: ``"PARAMETER"`` (every argument), ``[epoch, iteration]`` (training, iterations from 1), ``[epoch, iteration,
val_iteration]`` (validation), ``[epoch]`` (epoch aggregates) and ``[]`` (the run summary).

The report is written by rank 0 only. Each line goes to the file in one ``write`` as it is logged, whole or not at
all: a write that fails (a full disk) is cut back off the file, a warning says lines are being dropped, and the run
goes on. A broken last line left by a killed process is removed when the report is opened again. The file is opened
in append mode, so a resumed run continues the same report. :func:`read_report` skips a broken last line with one
warning.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import time
from typing import Dict, Iterable, Optional, Sequence, Union

Step = Union[str, Sequence[int]]

logger = logging.getLogger(__name__)

# name -> (unit, format) for the metrics this engine writes; the METADATA lines come from here.
METRICS: Dict[str, tuple] = {}
for _prefix in ("val", "val_ema"):
    METRICS.update({
        f"{_prefix}.top1": ("%", ":.2f"),
        f"{_prefix}.top5": ("%", ":.2f"),
        f"{_prefix}.loss": (None, ":.5f"),
        f"{_prefix}.compute_ips": ("images/s", ":.2f"),
        f"{_prefix}.total_ips": ("images/s", ":.2f"),
        f"{_prefix}.data_time": ("s", ":.5f"),
        f"{_prefix}.compute_time": ("s", ":.5f"),
        f"{_prefix}.compute_latency": ("s", ":.5f"),
        f"{_prefix}.compute_latency_at100": ("s", ":.5f"),
        f"{_prefix}.compute_latency_at99": ("s", ":.5f"),
        f"{_prefix}.compute_latency_at95": ("s", ":.5f"),
    })
METRICS.update({
    "train.loss": (None, ":.5f"),
    "train.compute_ips": ("images/s", ":.2f"),
    "train.total_ips": ("images/s", ":.2f"),
    "train.lr": (None, ":.5e"),
    "train.grad_scale": (None, ":.1f"),
    "train.data_time": ("s", ":.5f"),
    "train.compute_time": ("s", ":.5f"),
    "train.infomax_loss": (None, ":.5f"),
})


def _jsonable(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):
        return value.item()
    return str(value)


class Report:
    """Writes DLLogger JSON lines to ``path`` (None: nowhere) and readable lines to the Python logger."""

    def __init__(self, path: Optional[str], print_freq: int = 10):
        self.path = path
        self.print_freq = max(int(print_freq), 1)
        self.start = time.time()
        self._fd: Optional[int] = None
        self._dropped = 0
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._fd = _open_for_append(path)
            for name, (unit, fmt) in METRICS.items():
                self._write({"type": "METADATA", "metric": name, "metadata": {"unit": unit, "format": fmt}})

    def _write(self, entry: dict) -> None:
        if self._fd is None:
            return
        now = time.time()
        line = {
            "timestamp": str(now),
            "datetime": datetime.datetime.fromtimestamp(now).strftime("%Y-%m-%d %H:%M:%S.%f"),
            "elapsedtime": str(now - self.start),
        }
        line.update(entry)
        self._append(("DLLL " + json.dumps(line) + "\n").encode("utf-8"))

    def _append(self, data: bytes) -> None:
        """One whole line or nothing: what a failed or short write left is truncated away."""
        size = os.fstat(self._fd).st_size
        try:
            if os.write(self._fd, data) != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as error:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, size)
            self._dropped += 1
            if self._dropped == 1:
                logger.warning("cannot write to the report %s (%s): dropping its lines until a write succeeds",
                               self.path, error.strerror or error)
            return
        if self._dropped:
            logger.warning("writing to the report %s again; %d line(s) were dropped", self.path, self._dropped)
            self._dropped = 0

    def parameters(self, params: dict) -> None:
        self._write({"type": "LOG", "step": "PARAMETER", "data": {k: _jsonable(v) for k, v in params.items()}})

    def log(self, step: Step, data: Dict[str, float], verbose: bool = True) -> None:
        """One LOG line; also a console line when ``verbose`` (per-iteration lines every ``print_freq``)."""
        data = {k: _jsonable(v) for k, v in data.items()}
        self._write({"type": "LOG", "step": list(step) if not isinstance(step, str) else step, "data": data})
        if verbose and (len(step) != 2 or step[1] % self.print_freq == 0) and (len(step) != 3 or step[2] % self.print_freq == 0):
            logger.info("%s %s", _format_step(step), _format_data(data))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _open_for_append(path: str) -> int:
    """A file descriptor appending to ``path``; a broken last line (no newline: a killed writer's) is cut off first,
    so that the next line does not continue it."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            keep, end = 0, size
            while end > 0:  # the last newline, searched backwards
                start = max(0, end - (1 << 16))
                chunk = os.pread(fd, end - start, start)
                if b"\n" in chunk:
                    keep = start + chunk.rindex(b"\n") + 1
                    break
                end = start
            os.ftruncate(fd, keep)
            logger.warning("%s ended in a broken line (an interrupted write); removed %d bytes", path, size - keep)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _format_step(step: Step) -> str:
    if isinstance(step, str):
        return step
    if len(step) == 0:
        return "Summary:"
    names = ("Epoch", "Iteration", "Validation Iteration")
    return " ".join(f"{name}: {value}" for name, value in zip(names, step))


def _format_data(data: Dict[str, float]) -> str:
    parts = []
    for name, value in data.items():
        fmt = METRICS.get(name, (None, ":.4f"))[1]
        unit = METRICS.get(name, (None,))[0]
        text = format(value, fmt[1:]) if isinstance(value, float) else str(value)
        parts.append(f"{name} : {text}" + (f" {unit}" if unit else ""))
    return " | ".join(parts)


def read_report(path: str) -> Iterable[dict]:
    """The JSON objects of a DLLogger report (lines without the ``DLLL `` prefix are skipped). A broken last line
    (a write cut short by a kill or a full disk) is skipped with one warning; a broken line before others is a
    ValueError naming its line number."""
    broken = None
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if broken is not None:
                raise ValueError(f"line {broken[0]} is broken ({broken[1]})")
            if not line.startswith("DLLL "):
                continue
            try:
                entry = json.loads(line[5:])
            except ValueError as error:
                broken = (number, error)
                continue
            yield entry
    if broken is not None:
        logger.warning("%s: skipping its broken last line %d (%s)", path, broken[0], broken[1])
