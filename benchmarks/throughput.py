"""Benchmark mode, NVIDIA DLE's protocol: images/s and latency percentiles of static and PEDConv models.

Each configuration (model x mode x precision x batch size) is one run of the engine (``image_classification.run``),
in this process, as NVIDIA's benchmark commands run it: ``--epochs 1 --prof N`` with ``--training-only`` (training)
or ``--evaluate`` (inference), on synthetic data (one fixed batch on the device: the compute ceiling) or on a real
data folder. The engine's DLLogger report gives every iteration's compute and data time; the first
``--warmup-iters`` iterations of each run are left out, then:

- images/s = images / (compute + data time) over the measured iterations;
- latency = one iteration's compute time (a training step: forward, backward and optimizer step; inference: one
  batch's forward): mean and the 90th, 95th and 99th percentiles (nearest rank);
- "vs static" = the PEDConv row's images/s over the static row's of the same mode, precision and batch size.

    python benchmarks/throughput.py --arch resnet50 --batch-sizes 64 128 256 --prof 100 --precision fp32 amp
    python benchmarks/throughput.py --arch resnet18 --wmul 0.25 --image-size 32 --batch-sizes 16 64 --prof 30 \\
        --device cpu --output benchmark.md
    python benchmarks/throughput.py /data/imagenet --data-backend dali-gpu --arch resnet50 --mode training

AMP is float16 autocast with a GradScaler on CUDA and bfloat16 autocast on the CPU (as ``main.py --amp``). A
configuration that runs out of GPU memory is listed as OOM and the others go on. The table (Markdown) is printed
and, with ``--output``, written atomically; the per-run reports are kept under ``--workspace`` when given.
"""
from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import tempfile
from dataclasses import dataclass
from typing import List, Optional, Sequence

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch  # noqa: E402

import choices  # noqa: E402

from image_classification.dllog import read_report  # noqa: E402
from image_classification.atomic_files import write_text  # noqa: E402
from image_classification.models import check_arch  # noqa: E402
from image_classification.tools import ToolError, ToolParser, quiet_logging, tool_main  # noqa: E402

MODES = {"training": "training_only", "evaluation": "evaluate"}  # the engine setting of each mode
MODELS = ("static", "pedconv")
PRECISIONS = ("fp32", "amp")


@dataclass
class Result:
    model: str
    mode: str
    precision: str
    batch: int
    images_per_second: float = math.nan
    latencies: Optional[List[float]] = None  # seconds, measured iterations only
    failure: str = ""  # "OOM" or another short reason

    def latency_ms(self, percent: Optional[float] = None) -> float:
        if not self.latencies:
            return math.nan
        if percent is None:
            return 1000.0 * statistics.fmean(self.latencies)
        return 1000.0 * percentile(self.latencies, percent)


def percentile(values: Sequence[float], percent: float) -> float:
    """Nearest-rank percentile (the engine's validation latency rule): the smallest value with at least
    ``percent`` % of the values at or below it."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(percent / 100.0 * len(ordered)) - 1))
    return ordered[index]


def engine_config(args, model: str, mode: str, precision: str, batch: int, workspace: str):
    """The engine's settings for one configuration (NVIDIA's benchmark flags), over main.py's defaults."""
    import main as training

    return training.run_config(
        [args.data or "synthetic"], data_backend=args.data_backend, arch=args.arch, wmul=args.wmul,
        image_size=args.image_size, batch_size=batch, epochs=1, prof=args.prof, save_checkpoints=False,
        workspace=workspace, raport_file="raport.json", print_freq=1, device=args.device, seed=0,
        memory_format=args.memory_format, workers=args.workers, lr=0.01, num_classes=args.num_classes or None,
        dynamic=model == "pedconv", amp=precision == "amp", **{MODES[mode]: True})


def measured(report_path: str, mode: str, warmup: int):
    """(per-iteration compute times, per-iteration total times, images per iteration) after ``warmup`` iterations."""
    prefix, length = ("train", 2) if mode == "training" else ("val", 3)
    compute_key = "train.compute_time" if mode == "training" else "val.compute_latency"
    rows = []
    for entry in read_report(report_path):
        step = entry.get("step")
        if entry.get("type") == "LOG" and isinstance(step, list) and len(step) == length:
            data = entry["data"]
            rows.append((data[compute_key], data[compute_key] + data[f"{prefix}.data_time"],
                         data[f"{prefix}.total_ips"] * (data[compute_key] + data[f"{prefix}.data_time"])))
    rows = rows[warmup:]
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


def run_one(args, model: str, mode: str, precision: str, batch: int, workspace: str) -> Result:
    """One configuration through the engine (``image_classification.run``), in this process; its report read back
    (it holds every iteration's times)."""
    import image_classification

    result = Result(model, mode, precision, batch)
    folder = os.path.join(workspace, f"{args.arch}-{model}-{mode}-{precision}-b{batch}")
    os.makedirs(folder, exist_ok=True)
    report = os.path.join(folder, "raport.json")
    if os.path.exists(report):  # the engine appends: start each configuration's report afresh
        os.remove(report)
    try:
        status = image_classification.run(engine_config(args, model, mode, precision, batch, folder)).status
    except torch.OutOfMemoryError:
        result.failure = "OOM"
        return result
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if status != 0:
        raise ToolError(f"the {model} {mode} run at batch {batch} ({precision}) was stopped (exit status {status})")
    compute, total, images = measured(report, mode, args.warmup_iters)
    if not compute:
        result.failure = "no measured iteration"
        return result
    result.images_per_second = sum(images) / sum(total)
    result.latencies = compute
    return result


def _number(value: float, fmt: str) -> str:
    return "n/a" if value is None or math.isnan(value) else format(value, fmt)


def table(results: Sequence[Result]) -> str:
    """The Markdown table of results; "vs static" pairs each PEDConv row with its static twin."""
    static = {(r.mode, r.precision, r.batch): r.images_per_second for r in results if r.model == "static"}
    lines = ["| model | mode | precision | batch | images/s | vs static | latency mean (ms) | p90 (ms) | p95 (ms) | "
             "p99 (ms) |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if r.failure:
            lines.append(f"| {r.model} | {r.mode} | {r.precision} | {r.batch} | {r.failure} | | | | | |")
            continue
        base = static.get((r.mode, r.precision, r.batch))
        ratio = f"{r.images_per_second / base:.2f}x" if r.model != "static" and base and not math.isnan(base) else ""
        lines.append(f"| {r.model} | {r.mode} | {r.precision} | {r.batch} | {_number(r.images_per_second, '.1f')} | "
                     f"{ratio} | {_number(r.latency_ms(), '.2f')} | {_number(r.latency_ms(90), '.2f')} | "
                     f"{_number(r.latency_ms(95), '.2f')} | {_number(r.latency_ms(99), '.2f')} |")
    return "\n".join(lines) + "\n"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as stream:
            for line in stream:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(args) -> str:
    """The setting the table was measured in, for the lines above it."""
    on_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.cuda.get_device_name() if on_cuda else f"CPU ({cpu_name()}, {torch.get_num_threads()} threads)"
    amp = "float16 autocast + GradScaler" if on_cuda else "bfloat16 autocast"
    data = f"{args.data_backend} data at {args.data}" if args.data else "synthetic data"
    return (f"{args.arch} x{args.wmul:g}, {args.image_size}x{args.image_size}, {data}, {args.memory_format}; "
            f"{device}; torch {torch.__version__}; --prof {args.prof}, first {args.warmup_iters} iterations left out; "
            f"amp = {amp}")


def build_parser() -> ToolParser:
    parser = ToolParser(prog="python benchmarks/throughput.py",
                        description="NVIDIA DLE's benchmark protocol for static and PEDConv models")
    parser.add_argument("data", nargs="?", default=None, metavar="DIR",
                        help="a data folder (train/, val/); omit it for synthetic data")
    parser.add_argument("--data-backend", default=None,
                        help="pytorch, dali-cpu, dali-gpu, synthetic (default: synthetic without DIR, else pytorch)")
    parser.add_argument("-a", "--arch", default="resnet50")
    parser.add_argument("--wmul", type=float, default=1.0)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--num-classes", type=int, default=None, help="default: the data's (1000 synthetic)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--mode", nargs="+", default=list(MODES), choices=list(MODES),
                        help="training (--training-only) and/or evaluation (--evaluate)")
    parser.add_argument("--precision", nargs="+", default=list(PRECISIONS), choices=PRECISIONS,
                        help="fp32 and/or amp (main.py --amp)")
    parser.add_argument("-b", "--batch-sizes", type=int, nargs="+", default=[64])
    parser.add_argument("--prof", type=int, default=100, help="iterations per run (NVIDIA's --prof)")
    parser.add_argument("--warmup-iters", type=int, default=10, help="first iterations of each run left out")
    parser.add_argument("--memory-format", default="nchw", choices=choices.MEMORY_FORMATS)
    parser.add_argument("--device", default="auto", choices=choices.DEVICES)
    parser.add_argument("-j", "--workers", type=int, default=5, help="data workers (real data only)")
    parser.add_argument("--workspace", default=None, metavar="DIR", help="keep the per-run reports here")
    parser.add_argument("--output", default=None, metavar="FILE.md", help="also write the table here")
    return parser


def check(args) -> None:
    check_arch(args.arch)
    if args.data_backend is None:
        args.data_backend = "pytorch" if args.data else "synthetic"
    if args.data_backend not in choices.SYNTHETIC_BACKENDS and not (args.data and os.path.isdir(args.data)):
        raise ToolError(f"--data-backend {args.data_backend} needs a data folder; {args.data} is not one")
    if min(args.batch_sizes) <= 0 or args.image_size <= 0 or args.wmul <= 0:
        raise ToolError("batch sizes, --image-size and --wmul must be positive")
    if args.prof <= args.warmup_iters or args.warmup_iters < 0:
        raise ToolError(f"--prof ({args.prof}) must exceed --warmup-iters ({args.warmup_iters}), which is >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ToolError("--device cuda asked, but no CUDA device is available")


def benchmark(args) -> List[Result]:
    results = []
    with tempfile.TemporaryDirectory(prefix="pedconv-benchmark-") as scratch:
        workspace = args.workspace or scratch
        for mode in args.mode:
            for precision in args.precision:
                for batch in args.batch_sizes:
                    for model in args.models:
                        result = run_one(args, model, mode, precision, batch, workspace)
                        print(f"{model:8} {mode:10} {precision:5} batch {batch:4}: "
                              f"{result.failure or _number(result.images_per_second, '.1f') + ' images/s'}",
                              file=sys.stderr, flush=True)
                        results.append(result)
    return results


@tool_main
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    check(args)
    quiet_logging()
    results = benchmark(args)
    text = f"{describe(args)}\n\n{table(results)}"
    print(text, end="")
    if args.output:
        write_text(args.output, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
