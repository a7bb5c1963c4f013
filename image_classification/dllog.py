"""Run reports in NVIDIA DLLogger's JSON-lines format, plus readable console progress.

Each report line is ``DLLL `` followed by one JSON object, as DLLogger 1.0 writes them:

    DLLL {"timestamp": "1732790000.123", "datetime": "2026-11-28 09:50:00.123456", "elapsedtime": "12.3",
          "type": "LOG", "step": [1, 20], "data": {"train.loss": 2.31, ...}}
    DLLL {"timestamp": ..., "type": "METADATA", "metric": "train.loss", "metadata": {"unit": null, "format": ":.5f"}}

Steps: ``"PARAMETER"`` (every argument), ``[epoch, iteration]`` (training, iterations from 1), ``[epoch, iteration,
val_iteration]`` (validation), ``[epoch]`` (epoch aggregates) and ``[]`` (the run summary).

The report is written by rank 0 only. Lines are flushed as they are written; a run that is killed leaves whole
lines. The file is opened in append mode, so a resumed run continues the same report.
"""
from __future__ import annotations

import datetime
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
        self._file = None
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._file = open(path, "a", encoding="utf-8")
            for name, (unit, fmt) in METRICS.items():
                self._write({"type": "METADATA", "metric": name, "metadata": {"unit": unit, "format": fmt}})

    def _write(self, entry: dict) -> None:
        if self._file is None:
            return
        now = time.time()
        line = {
            "timestamp": str(now),
            "datetime": datetime.datetime.fromtimestamp(now).strftime("%Y-%m-%d %H:%M:%S.%f"),
            "elapsedtime": str(now - self.start),
        }
        line.update(entry)
        self._file.write("DLLL " + json.dumps(line) + "\n")
        self._file.flush()

    def parameters(self, params: dict) -> None:
        self._write({"type": "LOG", "step": "PARAMETER", "data": {k: _jsonable(v) for k, v in params.items()}})

    def log(self, step: Step, data: Dict[str, float], verbose: bool = True) -> None:
        """One LOG line; also a console line when ``verbose`` (per-iteration lines every ``print_freq``)."""
        data = {k: _jsonable(v) for k, v in data.items()}
        self._write({"type": "LOG", "step": list(step) if not isinstance(step, str) else step, "data": data})
        if verbose and (len(step) != 2 or step[1] % self.print_freq == 0) and (len(step) != 3 or step[2] % self.print_freq == 0):
            logger.info("%s %s", _format_step(step), _format_data(data))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


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
    """The JSON objects of a DLLogger report (lines without the ``DLLL `` prefix are skipped)."""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("DLLL "):
                yield json.loads(line[5:])
