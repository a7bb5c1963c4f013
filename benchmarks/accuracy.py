"""Accuracy at small scale: static against PEDConv ResNet-18, same recipe and epochs, several seeds, on the CPU.

    python benchmarks/accuracy.py                         # 3 seeds each, the demo's recipe and 6 epochs
    python benchmarks/accuracy.py --epochs 10 --seeds 0 1 2 3 4 --out logs/accuracy

Trains each model with main.py's engine (in this process) on the demo data set (scikit-learn's digits as 32x32
JPEGs, 1,442 training and 355 validation images, 10 classes), with the demo's recipe (``main.DEMO_DEFAULTS``:
ResNet-18 at width 0.25, batch 32, SGD lr 0.1 with one warmup epoch and a cosine schedule, label smoothing 0.1,
momentum 0.9, weight decay 5e-5); only ``--dynamic`` and ``--seed`` differ between runs. Each model keeps its own
default initialization (the release's for PEDConv, Kaiming for the static one), as ``main.py`` does.

Writes into ``--out``: each run's DLLogger report (``<model>-seed<S>/raport.json``), the report plots with all runs
overlaid (``python -m image_classification.report``'s four PNGs and ``summary.md``), and ``accuracy.md``: final
and best top-1 per model, mean ± sample standard deviation [min, max] over the seeds, and the mean training time.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from typing import List, Optional, Sequence

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch  # noqa: E402

from image_classification.report import finished, load_run, mean_spread, run_row, write_report  # noqa: E402
from image_classification.tools import ToolError, ToolParser, quiet_logging, tool_main, write_text  # noqa: E402

MODELS = {"static": False, "PEDConv": True}


def recipe_argv(data: str, dynamic: bool, seed: int, epochs: int, workspace: str, workers: int) -> List[str]:
    """main.py's command line: the demo's recipe with this model, seed and epoch count."""
    import main as engine

    values = dict(engine.DEMO_DEFAULTS, epochs=epochs, workspace=workspace, raport_file="raport.json",
                  workers=workers, print_freq=10 ** 9)
    values.pop("dynamic")
    argv = [data]
    for key, value in values.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    argv += ["--seed", str(seed), "--no-checkpoints"]
    return argv + (["--dynamic"] if dynamic else [])


def train(data: str, model: str, seed: int, epochs: int, out: str, workers: int) -> tuple:
    """One run; (its report path, seconds it took)."""
    import main as engine

    workspace = os.path.join(out, f"{model}-seed{seed}")
    os.makedirs(workspace, exist_ok=True)
    report = os.path.join(workspace, "raport.json")
    if os.path.exists(report):  # the engine appends: start afresh
        os.remove(report)
    start = time.perf_counter()
    status = engine.main(recipe_argv(data, MODELS[model], seed, epochs, workspace, workers))
    if status != 0:
        raise ToolError(f"the {model} run with seed {seed} failed (main.py exit status {status})")
    if not finished(report):
        raise ToolError(f"the {model} run with seed {seed} was stopped before its end; nothing summarized")
    return report, time.perf_counter() - start


def accuracy_table(runs, seconds: Sequence[float], epochs: int) -> str:
    """Markdown: per model, final and best top-1 as mean ± std [min, max] over the seeds, and time per run."""
    lines = ["| model | seeds | epochs | final top-1 (%) | best top-1 (%) | final train loss | minutes per run |",
             "|---|---:|---:|---|---|---:|---:|"]
    for model in MODELS:
        rows = [(run_row(run), s) for run, s in zip(runs, seconds) if run.label == model]
        if not rows:
            continue
        final = [r["final_top1"] for r, _ in rows if r["final_top1"] is not None]
        best = [r["best_top1"] for r, _ in rows if r["best_top1"] is not None]
        loss = statistics.fmean(r["final_train_loss"] for r, _ in rows)
        minutes = statistics.fmean(s for _, s in rows) / 60.0
        lines.append(f"| {model} | {len(rows)} | {epochs} | {mean_spread(final)} | {mean_spread(best)} | "
                     f"{loss:.4f} | {minutes:.1f} |")
    return "\n".join(lines) + "\n"


def build_parser() -> ToolParser:
    parser = ToolParser(prog="python benchmarks/accuracy.py",
                        description="static vs PEDConv ResNet-18 on the demo data set, several seeds, on the CPU")
    parser.add_argument("--epochs", type=int, default=None, help="default: the demo's")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", default="logs/accuracy", metavar="DIR")
    parser.add_argument("--data", default=None, metavar="DIR", help="default: the demo data set (built on first use)")
    parser.add_argument("-j", "--workers", type=int, default=2, help="data-loading workers")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return parser


@tool_main
def main(argv: Optional[Sequence[str]] = None) -> int:
    import main as engine

    args = build_parser().parse_args(argv)
    epochs = args.epochs if args.epochs is not None else engine.DEMO_DEFAULTS["epochs"]
    if epochs <= 0:
        raise ToolError("--epochs must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_logging()
    if args.data is None:
        from image_classification.demo import prepare_digits

        data = prepare_digits()
    elif os.path.isdir(args.data):
        data = args.data
    else:
        raise ToolError(f"{args.data}: no such data folder")
    os.makedirs(args.out, exist_ok=True)
    runs, seconds = [], []
    for model in args.models:
        for seed in args.seeds:
            report, elapsed = train(data, model, seed, epochs, args.out, args.workers)
            run = load_run(report, model)
            runs.append(run)
            seconds.append(elapsed)
            row = run_row(run)
            print(f"{model} seed {seed}: final top-1 {row['final_top1']:.2f} %, best {row['best_top1']:.2f} %, "
                  f"{elapsed / 60:.1f} min", file=sys.stderr, flush=True)
    command = "python benchmarks/accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = (f"# Accuracy at small scale\n\n`{command.strip()}` on {data} ({torch.get_num_threads()} threads, "
            f"torch {torch.__version__})\n\n{accuracy_table(runs, seconds, epochs)}")
    write_text(os.path.join(args.out, "accuracy.md"), text)
    write_report(runs, args.out, "Accuracy at small scale: every run")
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
