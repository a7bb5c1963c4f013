"""Training reports as pictures and a table: one or several DLLogger reports (main.py's ``--raport-file``) overlaid.

    python -m image_classification.report runs/static/raport.json runs/pedconv/raport.json --out plots \\
        --labels static PEDConv [--run -1]

Writes into ``--out`` (created if needed; every file written atomically):

- ``train_loss.png``: training loss per iteration (thin: every iteration; thick: a moving average).
- ``learning_rate.png``: the learning rate per iteration.
- ``val_accuracy.png``: validation top-1 and top-5 per epoch (dashed: the EMA weights', when validated).
- ``throughput.png``: training images/s per iteration (moving average) and validation images/s per epoch.
- ``summary.md``: one row per run (model, epochs, best and final top-1, top-5, losses, images/s, latency), and when
  several runs share a label (seeds of one setup), one row per label with the mean and spread of their top-1.

Runs are never spliced. A report holds one run per process that wrote into it (its PARAMETER line, with
``run.start``), except that a ``--resume``d process continues the run it resumed (``run.continues``; in reports
written before these keys, a process started with ``--resume`` continues the run before it), its repeated steps
taken from the later attempt. Every run is drawn apart (``--run N``: only the N-th of each report) and the tool
prints which runs it drew. Runs are labelled by ``--labels`` (one per report), else by their model (``resnet18
PEDConv x0.25``), with ``#N`` added when a report holds several; runs with the same label share a colour. The
per-iteration plots count the run's training iterations (epoch lengths from the validation steps' last training
iteration, else the last one reported). A plot that no run has data for (an evaluation-only report has no training
iterations) is not written.
"""
from __future__ import annotations

import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from .atomic_files import atomic_output, write_text
from .dllog import read_report
from .tools import ToolError, ToolParser, tool_main

PLOTS = ("train_loss.png", "learning_rate.png", "val_accuracy.png", "throughput.png")


@dataclass
class Run:
    """What one run of a report holds, by kind of step."""

    path: str
    label: str = ""
    params: dict = field(default_factory=dict)
    iterations: List[dict] = field(default_factory=list)  # training lines, in (epoch, iteration) order
    steps: List[int] = field(default_factory=list)  # the training iteration of each of them, counted over the run
    epochs: Dict[int, dict] = field(default_factory=dict)  # epoch (as the report numbers it) -> its aggregates
    summary: dict = field(default_factory=dict)
    index: int = 1  # this run's number among the report's runs, from 1
    count: int = 1  # how many runs the report holds

    @property
    def model(self) -> str:
        p = self.params
        if not p.get("arch"):
            return "?"
        return f"{p['arch']} {'PEDConv' if p.get('dynamic') else 'static'} x{float(p.get('wmul', 1.0)):g}"

    @property
    def start(self) -> str:
        """When the run started (``run.start`` of its PARAMETER line; reports written before it: the line's time)."""
        return str(self.params.get("run.start") or self.params.get("_datetime") or "?")[:19]

    def describe(self) -> str:
        epochs = f"epochs {min(self.epochs)}-{max(self.epochs)}" if self.epochs else "no epoch"
        return f"{self.path}: run {self.index} of {self.count}, started {self.start}, {epochs}"

    def series(self, metric: str) -> List[float]:
        """The metric over the training lines (NaN where a line lacks it)."""
        return [float(entry.get(metric) if entry.get(metric) is not None else math.nan) for entry in self.iterations]

    def per_epoch(self, metric: str) -> Tuple[List[int], List[float]]:
        """(epochs, values) of the epochs whose aggregates hold ``metric``."""
        pairs = [(epoch, data[metric]) for epoch, data in sorted(self.epochs.items()) if data.get(metric) is not None]
        return [e for e, _ in pairs], [float(v) for _, v in pairs]


@dataclass
class _Segment:
    """The lines one process wrote: from its PARAMETER line to the next one."""

    params: dict
    training: Dict[Tuple[int, int], dict] = field(default_factory=dict)
    last_iteration: Dict[int, int] = field(default_factory=dict)  # epoch -> its last training iteration
    epochs: Dict[int, dict] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)

    def absorb(self, later: "_Segment") -> None:
        """Continue this run with a resumed process's lines (repeated steps: the later attempt's)."""
        self.training.update(later.training)
        for epoch, last in later.last_iteration.items():
            self.last_iteration[epoch] = max(last, self.last_iteration.get(epoch, 0))
        for epoch, data in later.epochs.items():
            self.epochs[epoch] = data
        self.summary = later.summary or self.summary


def _continues(params: dict, earlier: List[_Segment]) -> Optional[_Segment]:
    """The run that a process continues: the one whose start its ``run.continues`` names; in reports written before
    runs were recorded, a ``--resume``d process continues the one before it."""
    if "run.start" in params:
        wanted = params.get("run.continues")
        return next((seg for seg in reversed(earlier) if seg.params.get("run.start") == wanted), None) if wanted else None
    return earlier[-1] if params.get("resume") and earlier else None


def _segments(path: str) -> List[_Segment]:
    segments: List[_Segment] = []
    logs = 0
    try:
        for entry in read_report(path):
            if not isinstance(entry, dict) or entry.get("type") != "LOG":
                continue
            logs += 1
            step, data = entry.get("step"), entry.get("data") or {}
            if step == "PARAMETER":
                if segments and not segments[-1].training and not segments[-1].epochs and \
                        segments[-1].params.get("run.start") == data.get("run.start") and "run.start" not in data:
                    segments[-1].params.update(data)  # NVIDIA writes two PARAMETER lines (arguments, model.*)
                else:
                    segments.append(_Segment({"_datetime": entry.get("datetime"), **data}))
                continue
            if not segments:
                segments.append(_Segment({}))
            segment = segments[-1]
            if isinstance(step, list) and len(step) == 2:
                segment.training[(int(step[0]), int(step[1]))] = data
                segment.last_iteration[int(step[0])] = max(int(step[1]), segment.last_iteration.get(int(step[0]), 0))
            elif isinstance(step, list) and len(step) == 3:
                segment.last_iteration[int(step[0])] = max(int(step[1]), segment.last_iteration.get(int(step[0]), 0))
            elif isinstance(step, list) and len(step) == 1:
                segment.epochs.setdefault(int(step[0]), {}).update(data)
            elif step == []:
                segment.summary = data
    except ValueError as error:  # json.JSONDecodeError, or a step that is not numbers
        raise ToolError(f"{path}: not a DLLogger report ({str(error).splitlines()[0]})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ToolError(f"{path}: cannot read: {error}") from None
    if not logs:
        raise ToolError(f"{path}: not a DLLogger report (no 'DLLL {{...}}' LOG lines)")
    runs: List[_Segment] = []
    for segment in segments:
        continued = _continues(segment.params, runs)
        if continued is not None:
            continued.absorb(segment)
        else:
            runs.append(segment)
    return runs


def load_runs(path: str, label: Optional[str] = None) -> List[Run]:
    """Every run in one DLLogger report, in order, never spliced: each process's lines belong to the run it started
    or (``--resume``) continued. A ToolError (one line) when the file is missing or not a report."""
    if not os.path.isfile(path):
        raise ToolError(f"{path}: no such report file")
    segments = _segments(path)
    runs = []
    for index, segment in enumerate(segments, start=1):
        run = Run(path, params=segment.params, epochs=segment.epochs, summary=segment.summary, index=index,
                  count=len(segments))
        offset, offsets = 0, {}
        for epoch in sorted(segment.last_iteration):
            offsets[epoch] = offset
            offset += segment.last_iteration[epoch]
        for key in sorted(segment.training):
            run.iterations.append(segment.training[key])
            run.steps.append(offsets[key[0]] + key[1])
        name = label or run.model
        run.label = name if len(segments) == 1 else f"{name} #{index}"
        runs.append(run)
    return runs


def load_run(path: str, label: Optional[str] = None, which: int = -1) -> Run:
    """One run of a report: the last by default, else number ``which`` (from 1; negative: from the last)."""
    runs = load_runs(path, label)
    return runs[pick_run(which, len(runs), path)]


def pick_run(which: int, count: int, path: str) -> int:
    """The list index of run ``which`` (from 1; negative from the last) of ``count``; a ToolError when out of range."""
    if which == 0 or not -count <= which <= count:
        raise ToolError(f"{path} holds {count} run(s): --run {which} is none of them (1..{count}, or -1 for the last)")
    return which - 1 if which > 0 else count + which


def finished(path: str) -> bool:
    """True if the report ends a run: it holds the run summary (step ``[]``), which main.py writes only after the
    last epoch (a run stopped by SIGTERM or Ctrl-C returns without it)."""
    return os.path.isfile(path) and any(e.get("type") == "LOG" and e.get("step") == [] for e in read_report(path))


def moving_average(values: Sequence[float], window: int) -> List[float]:
    """Trailing mean over up to ``window`` values (NaNs skipped), same length as ``values``."""
    out, total, count, queue = [], 0.0, 0, []
    for value in values:
        queue.append(value)
        if not math.isnan(value):
            total, count = total + value, count + 1
        if len(queue) > window:
            old = queue.pop(0)
            if not math.isnan(old):
                total, count = total - old, count - 1
        out.append(total / count if count else math.nan)
    return out


def _colours(runs: Sequence[Run]) -> Dict[str, str]:
    labels = list(dict.fromkeys(run.label for run in runs))
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
               "tab:olive", "tab:cyan"]
    return {label: palette[i % len(palette)] for i, label in enumerate(labels)}


class _Plot:
    """A figure of one or more axes, one legend entry per label, saved atomically as PNG."""

    def __init__(self, runs: Sequence[Run], title: str, panels: Sequence[Tuple[str, str]]):
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure

        self.colours = _colours(runs)
        self.figure = Figure(figsize=(6.4 * len(panels), 4.2), layout="constrained")
        self.axes = self.figure.subplots(1, len(panels), squeeze=False)[0]
        from matplotlib.ticker import MaxNLocator

        for axes, (xlabel, ylabel) in zip(self.axes, panels):
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
            axes.set_xlabel(xlabel)
            axes.set_ylabel(ylabel)
            axes.grid(True, alpha=0.3)
        self.figure.suptitle(title)
        self.labelled = set()
        self.drawn = False

    def line(self, panel: int, run: Run, xs, ys, *, style: str = "-", width: float = 1.5, alpha: float = 1.0,
             suffix: str = "", marker: Optional[str] = None) -> None:
        if not len(xs) or all(math.isnan(y) for y in ys):
            return
        name = run.label + suffix
        label = None
        if width >= 1 and (panel, name) not in self.labelled:  # thin lines (raw values) get no legend entry
            label = name
            self.labelled.add((panel, name))
        self.axes[panel].plot(xs, ys, style, color=self.colours[run.label], linewidth=width, alpha=alpha,
                              label=label, marker=marker, markersize=4)
        self.drawn = True

    def save(self, path: str) -> Optional[str]:
        if not self.drawn:
            return None
        for axes in self.axes:
            if axes.get_legend_handles_labels()[0]:
                axes.legend(fontsize="small")
        with atomic_output(path) as temporary:
            self.figure.savefig(temporary, format="png", dpi=100)
        return path


def _per_iteration(plot: _Plot, panel: int, run: Run, metric: str, raw: bool) -> None:
    values = run.series(metric)
    xs = run.steps
    window = max(1, len(values) // 50)
    if raw:
        plot.line(panel, run, xs, values, width=0.6, alpha=0.3)
    plot.line(panel, run, xs, moving_average(values, window) if raw or window > 1 else values)


def plot_runs(runs: Sequence[Run], out_dir: str) -> List[str]:
    """Write the four plots for ``runs`` into ``out_dir``; returns the paths written."""
    written = []
    loss = _Plot(runs, "training loss", [("iteration", "loss")])
    lr = _Plot(runs, "learning rate", [("iteration", "learning rate")])
    accuracy = _Plot(runs, "validation accuracy", [("epoch", "top-1 (%)"), ("epoch", "top-5 (%)")])
    speed = _Plot(runs, "throughput", [("iteration", "training images/s"), ("epoch", "validation images/s")])
    for run in runs:
        _per_iteration(loss, 0, run, "train.loss", raw=True)
        lr.line(0, run, run.steps, run.series("train.lr"))
        for panel, metric in enumerate(("top1", "top5")):
            accuracy.line(panel, run, *run.per_epoch(f"val.{metric}"), marker="o")
            accuracy.line(panel, run, *run.per_epoch(f"val_ema.{metric}"), style="--", suffix=" (EMA)", marker=".")
        _per_iteration(speed, 0, run, "train.total_ips", raw=False)
        speed.line(1, run, *run.per_epoch("val.total_ips"), marker="o")
    for plot, name in zip((loss, lr, accuracy, speed), PLOTS):
        path = plot.save(os.path.join(out_dir, name))
        if path:
            written.append(path)
    return written


def _value(value: Optional[float], fmt: str = ".2f") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def run_row(run: Run) -> Dict[str, Optional[float]]:
    """The numbers of one run that the summary table shows."""
    epochs, top1 = run.per_epoch("val.top1")
    _, top5 = run.per_epoch("val.top5")
    _, train_loss = run.per_epoch("train.loss")
    _, train_ips = run.per_epoch("train.total_ips")
    _, val_ips = run.per_epoch("val.total_ips")
    _, latency = run.per_epoch("val.compute_latency_at99")
    best = max(range(len(top1)), key=top1.__getitem__) if top1 else None
    return {
        "epochs": len(run.epochs) if run.epochs else None,
        "best_top1": top1[best] if best is not None else None,
        "best_top5": top5[best] if best is not None and best < len(top5) else None,
        "best_epoch": epochs[best] if best is not None else None,
        "final_top1": top1[-1] if top1 else None,
        "final_train_loss": train_loss[-1] if train_loss else None,
        "train_ips": statistics.fmean(train_ips) if train_ips else None,
        "val_ips": statistics.fmean(val_ips) if val_ips else None,
        "val_latency_p99_ms": 1000.0 * latency[-1] if latency else None,
    }


def mean_spread(values: Sequence[float]) -> str:
    """``mean ± sample standard deviation [min, max]`` (just the value for one)."""
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return (f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f} "
            f"[{min(values):.2f}, {max(values):.2f}]")


def summary_table(runs: Sequence[Run]) -> str:
    """Markdown: one row per run, then (when a label repeats) one row per label with mean ± std [min, max]."""
    lines = ["| run | model | epochs | best top-1 (%) | top-5 at best (%) | final top-1 (%) | final train loss | "
             "train img/s | val img/s | val latency p99 (ms) | report |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    rows = [run_row(run) for run in runs]
    for run, row in zip(runs, rows):
        lines.append(
            f"| {run.label} | {run.model} | {_value(row['epochs'], 'd')} | {_value(row['best_top1'])} | "
            f"{_value(row['best_top5'])} | {_value(row['final_top1'])} | {_value(row['final_train_loss'], '.4f')} | "
            f"{_value(row['train_ips'], '.1f')} | {_value(row['val_ips'], '.1f')} | "
            f"{_value(row['val_latency_p99_ms'], '.2f')} | `{run.path}` |")
    groups: Dict[str, List[dict]] = {}
    for run, row in zip(runs, rows):
        groups.setdefault(run.label, []).append(row)
    if any(len(group) > 1 for group in groups.values()):
        lines += ["", "| label | runs | final top-1 (%): mean ± std [min, max] | best top-1 (%): mean ± std "
                  "[min, max] | final train loss: mean |", "|---|---:|---|---|---:|"]
        for label, group in groups.items():
            final = [r["final_top1"] for r in group if r["final_top1"] is not None]
            best = [r["best_top1"] for r in group if r["best_top1"] is not None]
            losses = [r["final_train_loss"] for r in group if r["final_train_loss"] is not None]
            lines.append(f"| {label} | {len(group)} | {mean_spread(final)} | {mean_spread(best)} | "
                         f"{_value(statistics.fmean(losses) if losses else None, '.4f')} |")
    return "\n".join(lines) + "\n"


def write_report(runs: Sequence[Run], out_dir: str, title: str = "Runs") -> List[str]:
    """The plots and ``summary.md`` for ``runs`` in ``out_dir`` (created); returns the paths written."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as error:
        raise ToolError(f"{out_dir}: cannot create the output folder: {error.strerror or error}") from None
    written = plot_runs(runs, out_dir)
    figures = "".join(f"![{os.path.splitext(os.path.basename(p))[0]}]({os.path.basename(p)})\n" for p in written)
    summary = os.path.join(out_dir, "summary.md")
    write_text(summary, f"# {title}\n\n{summary_table(runs)}\n{figures}")
    return written + [summary]


def build_parser() -> ToolParser:
    parser = ToolParser(prog="python -m image_classification.report",
                        description="PNG plots and a Markdown summary of one or more DLLogger reports, overlaid")
    parser.add_argument("reports", nargs="+", metavar="RUN.json", help="main.py's --raport-file outputs")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the plots and summary.md")
    parser.add_argument("--labels", nargs="+", default=None, help="one label per report (same label: same colour)")
    parser.add_argument("--title", default="Runs", help="heading of summary.md")
    parser.add_argument("--run", type=int, default=None, metavar="N",
                        help="draw only run N of each report (from 1; -1: the last); default: every run, apart")
    return parser


@tool_main
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.reports):
        raise ToolError(f"{len(args.labels)} labels for {len(args.reports)} reports")
    labels = args.labels or [None] * len(args.reports)
    runs = []
    for path, label in zip(args.reports, labels):
        found = load_runs(path, label)
        runs += found if args.run is None else [found[pick_run(args.run, len(found), path)]]
    for run in runs:
        print(f"drawing {run.describe()} as {run.label!r}")
    for path in write_report(runs, args.out, args.title):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
