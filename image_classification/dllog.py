"""Run reports in NVIDIA DLLogger's JSON-lines format, laid out as NVIDIA's ConvNets code writes them, plus a
console a person can read.

Each report line is ``DLLL `` followed by one JSON object, as DLLogger 1.0 writes them:

    DLLL {"timestamp": "1732790000.123", "datetime": "2026-11-28 09:50:00.123456", "elapsedtime": "12.3",
          "type": "LOG", "step": [0, 20], "data": {"train.loss": 2.31, ...}}
    DLLL {"timestamp": ..., "type": "METADATA", "metric": "train.loss", "metadata": {"unit": null, "format": ":.5f"}}

Steps, as NVIDIA's ``image_classification/logger.py`` numbers them: ``"PARAMETER"`` (every argument, plus
``run.start`` and, for a ``--resume``d run, ``run.continues``: the start of the run it continues), ``[epoch,
iteration]`` (training; epochs from 0, iterations from 1, one line every ``print_freq`` iterations holding the
means since the previous line, the learning rate as last set), ``[epoch, last_training_iteration,
val_iteration]`` (validation, likewise), ``[epoch]`` (the epoch's aggregates: every metric of the run, ``null``
where the run has no value, e.g. the validation metrics of a ``--training-only`` run) and ``[]`` (the run summary,
with the same keys).

One report file per run: an existing report of that name is first renamed after its own start time
(``raport.json`` -> ``raport-20261128-095000.json``), never appended to, except by a ``--resume``d run, which
continues the report it finds. The report is written by rank 0 only. Each line goes to the file in one ``write`` as
it is logged, whole or not at all: a write that fails (a full disk) is cut back off the file, a warning says lines
are being dropped, and the run goes on. A broken last line left by a killed process is removed when the report is
opened again. :func:`read_report` skips a broken last line with one warning.

Console: on a terminal, a live progress bar per training and validation pass (steps, images/s, loss, ETA) and one
short line per epoch; otherwise plain lines every ``print_freq`` iterations and the same epoch lines.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import math
import os
import time
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Union

from dataloading.progress import progress_bar

Step = Union[str, Sequence[int]]

logger = logging.getLogger(__name__)

# The metrics of a validation pass (prefix "val" or "val_ema"), as NVIDIA's ValidationMetrics registers them, then
# this engine's additions (the plain cross-entropy beside the training criterion's loss, the images counted).
VAL_METRICS = ("top1", "top5", "loss", "compute_ips", "total_ips", "data_time", "compute_latency",
               "compute_latency_at100", "compute_latency_at99", "compute_latency_at95", "cross_entropy", "images")
# NVIDIA's TrainingMetrics, then this engine's info-max loss of PEDConv models.
TRAIN_METRICS = ("train.loss", "train.compute_ips", "train.total_ips", "train.data_time", "train.compute_time",
                 "train.lr", "train.grad_scale", "train.infomax_loss")

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
        f"{_prefix}.cross_entropy": (None, ":.5f"),
        f"{_prefix}.images": (None, ":d"),
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


def metric_names(val_prefixes: Sequence[str] = ("val",)) -> List[str]:
    """Every key of an epoch line and of the run summary, for a run validating under ``val_prefixes``."""
    return list(TRAIN_METRICS) + [f"{prefix}.{name}" for prefix in val_prefixes for name in VAL_METRICS]


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN or infinity; DLLogger readers fail on them
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):
        return _jsonable(value.item())
    return str(value)


def _stamp(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S.%f")


def _first_entry_time(path: str) -> Optional[float]:
    """The timestamp of a report's first line (when its run started), None when unreadable."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            line = handle.readline()
        return float(json.loads(line[5:])["timestamp"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def set_aside(path: str) -> str:
    """Rename the report at ``path`` after its start time (``raport-20261128-095000.json``); returns the new path."""
    started = _first_entry_time(path)
    if started is None:
        started = os.path.getmtime(path)
    stem, extension = os.path.splitext(path)
    base = f"{stem}-{datetime.datetime.fromtimestamp(started).strftime('%Y%m%d-%H%M%S')}"
    target, number = base + extension, 1
    while os.path.exists(target):
        number += 1
        target = f"{base}-{number}{extension}"
    os.replace(path, target)
    return target


def _last_run_start(path: str) -> Optional[str]:
    """``run.start`` of the last run in an existing report (the run a resumed run continues)."""
    start = None
    try:
        for entry in read_report(path):
            if entry.get("type") == "LOG" and entry.get("step") == "PARAMETER":
                data = entry.get("data") or {}
                start = data.get("run.continues") or data.get("run.start") or start
    except (OSError, ValueError):
        return None
    return start


class _Interval:
    """The metrics of the iterations since the last report line: means, the learning rate as last set."""

    def __init__(self):
        self.sums: Dict[str, float] = {}
        self.counts: Dict[str, int] = {}
        self.last: Dict[str, float] = {}

    def add(self, data: Dict[str, float]) -> None:
        for name, value in data.items():
            if name.endswith(".lr") or not isinstance(value, (int, float)) or value is None:
                self.last[name] = value
            else:
                self.sums[name] = self.sums.get(name, 0.0) + float(value)
                self.counts[name] = self.counts.get(name, 0) + 1

    def take(self) -> Dict[str, float]:
        data = {name: self.sums[name] / self.counts[name] for name in self.sums}
        data.update(self.last)
        self.__init__()
        return data


class Tracked:
    """A loader seen through a progress bar: iterates and measures as the loader; ``len`` is the loader's."""

    def __init__(self, loader, report: "Report", total: int, desc: str):
        self.loader, self.report, self.total, self.desc = loader, report, total, desc

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator:
        bar = self.report.open_bar(self.total, self.desc)
        try:
            for item in self.loader:
                yield item
                if bar is not None:
                    bar.update(1)
        finally:
            self.report.close_bar()


class Report:
    """Writes DLLogger JSON lines to ``path`` (None: nowhere) and readable lines to the Python logger.

    ``resume``: continue the report found at ``path`` (a ``--resume``d run); otherwise an existing one is renamed
    after its start time first. ``bars``: progress bars on a terminal (rank 0's console only)."""

    def __init__(self, path: Optional[str], print_freq: int = 10, *, resume: bool = False, bars: bool = True):
        self.path = path
        self.bars = bars
        self.print_freq = max(int(print_freq), 1)
        self.start = time.time()
        self.previous: Optional[str] = None  # where the report found at ``path`` went (None: nowhere, or continued)
        self.continues: Optional[str] = None  # run.start of the run this one continues
        self.epochs: Dict[int, dict] = {}  # this run's epoch lines as written (the console summary, RunResult)
        self.summary: dict = {}  # the run summary as written (step [])
        self._fd: Optional[int] = None
        self._dropped = 0
        self._intervals: Dict[int, _Interval] = {}
        self._bar = None
        self._phase_start = None
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            if os.path.exists(path):
                if resume:
                    self.continues = _last_run_start(path)
                else:
                    self.previous = set_aside(path)
                    logger.info("previous report %s kept as %s", path, self.previous)
            self._fd = _open_for_append(path)
            for name, (unit, fmt) in METRICS.items():
                self._write({"type": "METADATA", "metric": name, "metadata": {"unit": unit, "format": fmt}})

    def _write(self, entry: dict) -> None:
        if self._fd is None:
            return
        now = time.time()
        line = {
            "timestamp": str(now),
            "datetime": _stamp(now),
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
        """The PARAMETER line: ``params`` plus ``run.start`` (and ``run.continues`` for a resumed run)."""
        data = {k: _jsonable(v) for k, v in params.items()}
        data["run.start"] = _stamp(self.start)
        data["run.continues"] = self.continues
        self._write({"type": "LOG", "step": "PARAMETER", "data": data})

    def log(self, step: Step, data: Dict[str, float], verbose: bool = True) -> None:
        """One LOG line (iteration steps: one every ``print_freq`` iterations, holding the means since the last);
        console lines when ``verbose``."""
        data = {k: _jsonable(v) for k, v in data.items()}
        if isinstance(step, str) or len(step) < 2:
            self._write({"type": "LOG", "step": step if isinstance(step, str) else list(step), "data": data})
            if isinstance(step, str):
                return
            if len(step) == 1:
                self.epochs[int(step[0])] = data
            else:
                self.summary = data
            if verbose and len(step) == 1:
                logger.info("%s", epoch_line(int(step[0]), data, time.time() - (self._phase_start or self.start)))
            elif verbose:
                for line in summary_lines(self.epochs, data):
                    logger.info("%s", line)
            return
        interval = self._intervals.setdefault(len(step), _Interval())
        interval.add(data)
        if self._bar is not None:
            self._bar.set_postfix_str(_postfix(data), refresh=False)
        if step[-1] % self.print_freq:
            return
        data = interval.take()
        self._write({"type": "LOG", "step": list(step), "data": data})
        if verbose and self._bar is None:
            logger.info("%s", iteration_line(step, data))

    def track(self, loader, total: int, desc: str):
        """``loader`` with a progress bar of ``total`` steps while it is iterated, when the console is a terminal
        and ``bars``; otherwise ``loader`` itself."""
        if not self.bars:
            return loader
        self._phase_start = self._phase_start if desc.startswith("val") else time.time()
        return Tracked(loader, self, total, desc)

    def open_bar(self, total: int, desc: str):
        self.close_bar()
        self._intervals.clear()
        self._bar = progress_bar(total, desc, "step")
        return self._bar

    def close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        self.close_bar()
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


def _number(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _postfix(data: Dict[str, float]) -> str:
    parts = []
    for name, label, fmt in (("train.loss", "loss", ".4f"), ("train.total_ips", "img/s", ".1f"),
                             ("val.top1", "top-1", ".2f"), ("val.total_ips", "img/s", ".1f")):
        if data.get(name) is not None:
            parts.append(f"{label} {format(data[name], fmt)}")
    return ", ".join(parts)


def iteration_line(step: Sequence[int], data: Dict[str, float]) -> str:
    """A plain console line for one report line of iterations."""
    if len(step) == 2:
        where = f"train epoch {step[0]} step {step[1]}"
        keys = (("train.loss", "loss", ".4f"), ("train.total_ips", "img/s", ".1f"), ("train.lr", "lr", ".3e"))
    else:
        prefix = "val_ema" if "val_ema.top1" in data else "val"
        where = f"{prefix} epoch {step[0]} step {step[2]}"
        keys = ((f"{prefix}.top1", "top-1", ".2f"), (f"{prefix}.loss", "loss", ".4f"),
                (f"{prefix}.total_ips", "img/s", ".1f"))
    values = [f"{label} {format(data[name], fmt)}" for name, label, fmt in keys if data.get(name) is not None]
    return f"{where}: " + ", ".join(values)


def epoch_line(epoch: int, data: Dict[str, float], seconds: float) -> str:
    """The console line of one epoch: epoch, top-1, top-5 and loss first; under 160 characters."""
    line = (f"epoch {epoch}: top-1 {_number(data.get('val.top1'), '.2f')} %, top-5 {_number(data.get('val.top5'), '.2f')}"
            f" %, loss {_number(data.get('train.loss'), '.4f')} (val {_number(data.get('val.loss'), '.4f')})")
    if data.get("val_ema.top1") is not None:
        line += f", EMA top-1 {data['val_ema.top1']:.2f} %"
    if data.get("train.total_ips") is not None:
        line += f" | {data['train.total_ips']:.1f} img/s"
    if data.get("train.lr") is not None:
        line += f" | lr {data['train.lr']:.3e}"
    return line + f" | {seconds:.0f} s"


def summary_lines(epochs: Dict[int, dict], summary: Dict[str, float]) -> List[str]:
    """The run summary for the console: the best epoch's top-1 with that epoch's losses, the lowest loss labelled
    as such, the mean throughput."""
    validated = {e: d for e, d in epochs.items() if d.get("val.top1") is not None}
    lines = []
    if validated:
        best = max(validated, key=lambda e: validated[e]["val.top1"])
        data = validated[best]
        losses = f"validation loss {_number(data.get('val.loss'), '.4f')}"
        if data.get("train.loss") is not None:
            losses = f"training loss {data['train.loss']:.4f} and {losses}"
        lines.append(f"best top-1 {data['val.top1']:.2f} % (top-5 {_number(data.get('val.top5'), '.2f')} %) at epoch "
                     f"{best}, with {losses}")
        if len(validated) > 1:
            lowest = min(validated, key=lambda e: validated[e]["val.loss"] if validated[e].get("val.loss") is not None
                         else math.inf)
            lines.append(f"lowest validation loss {_number(validated[lowest].get('val.loss'), '.4f')} at epoch {lowest}")
    elif summary.get("val.top1") is not None:
        lines.append(f"top-1 {summary['val.top1']:.2f} %, top-5 {_number(summary.get('val.top5'), '.2f')} %, "
                     f"validation loss {_number(summary.get('val.loss'), '.4f')}")
    trained = [d.get("train.loss") for d in epochs.values() if d.get("train.loss") is not None]
    if trained:
        lines.append(f"lowest training loss {min(trained):.4f}; mean training throughput "
                     f"{_number(summary.get('train.total_ips'), '.1f')} img/s")
    return lines


def run_summary(epochs: List[dict], keys: List[str]) -> dict:
    """The run summary (step ``[]``) over this run's epoch lines, every key of ``keys`` (null without data), as
    NVIDIA's run aggregators: best top-1 and top-5, lowest losses (NVIDIA's code keeps the highest: a bug), mean
    throughput, times and latency, the last learning rate; the latency percentiles are the highest of the epochs'
    (exact for one validation pass)."""
    summary = {}
    for key in keys:
        values = [e[key] for e in epochs if e.get(key) is not None]
        name = key.split(".", 1)[1]
        if not values:
            summary[key] = None
        elif name in ("top1", "top5"):
            summary[key] = max(values)
        elif name.endswith("loss") or name == "cross_entropy":
            summary[key] = min(values)
        elif name == "lr" or name == "images":
            summary[key] = values[-1]
        elif name.startswith("compute_latency_at"):
            summary[key] = max(values)
        else:
            summary[key] = sum(values) / len(values)
    return summary


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
