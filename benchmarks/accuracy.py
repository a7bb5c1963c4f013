"""Does PEDConv pay off on your data? A paired, many-seed accuracy study: static against PEDConv, same seeds.

    python benchmarks/accuracy.py                                  # demo data, 10 seeds, the demo's recipe
    python benchmarks/accuracy.py DATA_DIR --seeds 10 --epochs 30 --arch resnet18 --wmul 1 --image-size 128 \\
        --out logs/accuracy -- --data-backend dali-gpu --amp        # flags after -- go to main.py unchanged

For every seed it trains the static model and the PEDConv model with main.py (one subprocess per run), the same
recipe, epochs and ``--seed`` (so the same data order and, with data-loading workers, the same augmentations: the
training loader's shuffle and its workers' seeds come from ``--seed`` only, not from the model's initialization;
with ``-j 0`` the augmentations draw from torch's global generator, which the two initializations leave apart),
and, with ``--equal-time`` (the default), a third run: the static model given the PEDConv run's training time,
i.e. ``round(epochs x t_PEDConv / t_static)`` epochs (times from the reports, without the process's start) with the
schedule stretched to them. Each model keeps its own initialization (the release's for
PEDConv, Kaiming for the static one), as main.py does.

The recipe is the demo's (``main.DEMO_DEFAULTS``: batch 32, SGD lr 0.1 with one warmup epoch then cosine, label
smoothing 0.1, momentum 0.9, weight decay 5e-5, crop area from 0.35, the PyTorch data backend) with this tool's
``--arch``, ``--wmul``, ``--image-size``, ``--epochs`` and ``--batch-size``; anything after ``--`` is appended to
every run's main.py command line (so it overrides the recipe, e.g. ``-- --lr 0.05 --data-backend dali-cpu``).

``--train-fraction F`` trains on a fixed subset of F of each class's training images (the same subset for every
seed and model, drawn with its own fixed seed), linked into ``OUT/data/``; validation uses the whole val/ folder.

Runs: with GPUs, ``--jobs`` (default: the number of visible GPUs) runs go at once, each on its own GPU
(``CUDA_VISIBLE_DEVICES``), or with ``--nproc-per-node K`` each run is a multiproc.py launch over K GPUs; on a CPU
machine one run at a time (default), each with ``--threads`` torch threads.

Resumable: ``OUT/accuracy.json`` records each finished run as soon as it ends (written to a temporary file, then
renamed); run the same command again and only the missing runs are trained. A study with other settings in the
same ``OUT`` is refused rather than mixed.

Writes into ``--out``: ``accuracy.json`` (settings, machine, every run's per-epoch top-1 and time, the statistics),
``accuracy.md`` (per-seed table and the paired comparison), ``paired.png`` (per seed: static and PEDConv top-1
joined by a line) and ``curves.png`` (validation top-1 per epoch, median with a min-max band over the seeds), and
each run's workspace (``<model>-seed<S>/``: main.py's report and log).

Statistics (over the seeds, on the paired difference PEDConv - static of final and of best top-1): the mean, a 95 %
percentile bootstrap confidence interval of the mean (10,000 resamples of the seeds, fixed seed), and the exact
two-sided sign test (ties dropped). With 10 seeds the sign test cannot give p below 0.002 and needs 9 of 10 the same
way for p < 0.05.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from image_classification.atomic_files import write_text  # noqa: E402
from image_classification.tools import ToolError, ToolParser, tool_main  # noqa: E402

STATIC, PEDCONV, STATIC_LONG = "static", "PEDConv", "static-equal-time"
RESULTS = "accuracy.json"
BOOTSTRAP_RESAMPLES = 10_000
# Settings that define a study: a stored study with different ones is not resumed.
# --equal-time is not one of them: it adds a third run to stored pairs (e.g. to the first few seeds, afterwards).
STUDY_KEYS = ("data", "arch", "wmul", "image_size", "batch_size", "epochs", "train_fraction", "extra", "nproc_per_node")


# --------------------------------------------------------------------------------------------- statistics

def bootstrap_ci(values: Sequence[float], level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = 0) -> Tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``values`` (resampling the values with replacement)."""
    import numpy as np

    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def sign_test(differences: Sequence[float]) -> Dict[str, float]:
    """Exact two-sided sign test of "the median difference is 0": counts and p-value; zero differences are dropped."""
    positive = sum(1 for d in differences if d > 0)
    negative = sum(1 for d in differences if d < 0)
    n = positive + negative
    if n == 0:
        return {"positive": 0, "negative": 0, "ties": len(differences), "p": 1.0}
    k = min(positive, negative)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return {"positive": positive, "negative": negative, "ties": len(differences) - n, "p": min(1.0, 2.0 * tail)}


def paired_summary(first: Sequence[float], second: Sequence[float]) -> dict:
    """Paired comparison of ``second - first``: per-pair differences, mean, 95 % bootstrap CI, sign test."""
    differences = [b - a for a, b in zip(first, second)]
    low, high = bootstrap_ci(differences)
    return {"differences": differences, "mean": statistics.fmean(differences), "ci95": [low, high],
            "sign_test": sign_test(differences)}


def spread(values: Sequence[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "median": statistics.median(values), "min": min(values), "max": max(values)}


# --------------------------------------------------------------------------------------------- runs

def recipe_argv(settings: dict, model: str, seed: int, epochs: int, workspace: str) -> List[str]:
    """main.py's arguments for one run: the demo's recipe with the study's settings, model, seed and epochs."""
    import main as engine

    values = dict(engine.DEMO_DEFAULTS, arch=settings["arch"], wmul=settings["wmul"],
                  image_size=settings["image_size"], batch_size=settings["batch_size"], epochs=epochs,
                  workspace=workspace, raport_file="raport.json", print_freq=10 ** 9, workers=settings["workers"],
                  device=settings["device"])
    values.pop("dynamic")
    argv = [settings["run_data"]]
    for key, value in values.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    argv += ["--seed", str(seed), "--no-checkpoints"] + (["--dynamic"] if model == PEDCONV else [])
    return argv + list(settings["extra"])


def run_main(settings: dict, model: str, seed: int, epochs: int, out: str, slot: int) -> dict:
    """Train one run in a main.py subprocess (``in_process``: through the engine, ``image_classification.run``, in
    this process, on the same command line); its record (per-epoch top-1, seconds). ``model``: STATIC, PEDCONV or
    STATIC_LONG (the static model, own workspace); ``slot``: which group of GPUs it may use."""
    workspace = os.path.join(out, f"{model}-seed{seed}")
    if os.path.isdir(workspace):  # an unfinished earlier attempt: start afresh (the engine appends to reports)
        shutil.rmtree(workspace)
    os.makedirs(workspace)
    argv = recipe_argv(settings, model, seed, epochs, workspace)
    nproc = settings["nproc_per_node"]
    log = os.path.join(workspace, "main.log")
    start = time.perf_counter()
    if settings.get("in_process"):
        import image_classification
        import main as training

        status = image_classification.run(training.run_config(argv)).status
        seconds = time.perf_counter() - start
        with open(log, "w") as stream:
            stream.write(f"trained in this process (--in-process): exit status {status}\n")
        return _record(model, seed, epochs, seconds, workspace, status, log)
    if nproc > 1:
        command = [sys.executable, os.path.join(ROOT, "multiproc.py"), "--nproc_per_node", str(nproc),
                   os.path.join(ROOT, "main.py")] + argv
    else:
        command = [sys.executable, os.path.join(ROOT, "main.py")] + argv
    env = dict(os.environ)
    if settings["gpus"]:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(settings["gpus"][slot * nproc:(slot + 1) * nproc])
    elif settings["threads"]:
        env["OMP_NUM_THREADS"] = str(settings["threads"])
    with open(log, "w") as stream:
        status = subprocess.call(command, stdout=stream, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    return _record(model, seed, epochs, time.perf_counter() - start, workspace, status, log)


def _record(model: str, seed: int, epochs: int, seconds: float, workspace: str, status: int, log: str) -> dict:
    from image_classification.report import finished, load_run

    report = os.path.join(workspace, "raport.json")
    if status != 0 or not finished(report):
        with open(log, errors="replace") as stream:
            tail = stream.read().strip().splitlines()[-1:] or ["(no output)"]
        raise ToolError(f"the {model} run with seed {seed} failed (exit status {status}; {log}: {tail[0]})")
    run_epochs, top1 = load_run(report).per_epoch("val.top1")
    return {"model": model, "seed": seed, "epochs": epochs, "seconds": seconds, "train_seconds": train_seconds(report),
            "top1": top1,
            "final_top1": top1[-1], "best_top1": max(top1), "best_epoch": run_epochs[top1.index(max(top1))]}


def train_seconds(report: str) -> float:
    """Seconds from the run's PARAMETER line to its last epoch line: its training and validation, without the
    interpreter's start, imports and first-use tuning that the wall time of the process also holds."""
    from image_classification.dllog import read_report

    entries = [e for e in read_report(report) if e.get("type") == "LOG"]
    start = [float(e["elapsedtime"]) for e in entries if e.get("step") == "PARAMETER"][-1]
    end = [float(e["elapsedtime"]) for e in entries if isinstance(e.get("step"), list) and len(e["step"]) == 1][-1]
    return end - start


RunFunction = Callable[[dict, str, int, int, str, int], dict]


def _save(path: str, study: dict) -> None:
    write_text(path, json.dumps(study, indent=1) + "\n")


def _key(model: str, seed: int) -> str:
    return f"{model}-seed{seed}"


def load_study(path: str, settings: dict) -> dict:
    """The stored study to continue, or a new one; refuses a stored study with other settings."""
    fresh = {"settings": {k: settings[k] for k in STUDY_KEYS}, "runs": {}}
    if not os.path.exists(path):
        return fresh
    try:
        with open(path) as stream:
            study = json.load(stream)
    except (OSError, ValueError) as error:
        raise ToolError(f"{path}: not a study's results ({error}); move it away or pick another --out")
    differing = [k for k in STUDY_KEYS if study.get("settings", {}).get(k) != fresh["settings"][k]]
    if differing:
        raise ToolError(f"{path} holds a study with other settings ({', '.join(differing)}); "
                        "pick another --out to start a new one")
    return study


def run_study(settings: dict, out: str, seeds: Sequence[int], run: RunFunction = run_main,
              jobs: int = 1, progress: Callable[[str], None] = lambda line: None) -> dict:
    """Train every run missing from ``OUT/accuracy.json`` (static and PEDConv per seed, then the equal-time static
    run, whose epochs follow from that seed's pair), saving the file after each run; returns the study."""
    path = os.path.join(out, RESULTS)
    study = load_study(path, settings)
    runs = study["runs"]
    epochs = settings["epochs"]

    def missing_pairs() -> List[Tuple[str, int, int]]:
        todo = [(model, seed, epochs) for seed in seeds for model in (STATIC, PEDCONV) if _key(model, seed) not in runs]
        if settings["equal_time"]:
            for seed in seeds:
                static, dynamic = runs.get(_key(STATIC, seed)), runs.get(_key(PEDCONV, seed))
                if static and dynamic and _key(STATIC_LONG, seed) not in runs:
                    todo.append((STATIC_LONG, seed, equal_time_epochs(epochs, static["train_seconds"],
                                                                      dynamic["train_seconds"])))
        return todo

    def record(result: dict) -> None:
        runs[_key(result["model"], result["seed"])] = result
        _save(path, study)
        progress(f"{result['model']} seed {result['seed']}: final top-1 {result['final_top1']:.2f} %, best "
                 f"{result['best_top1']:.2f} %, {result['epochs']} epochs, {result['seconds']:.0f} s")

    while True:
        todo = missing_pairs()
        if not todo:
            break
        if jobs <= 1:
            for model, seed, n in todo:
                record(run(settings, model, seed, n, out, 0))
        else:
            from concurrent.futures import ThreadPoolExecutor, as_completed

            slots = list(range(jobs))
            with ThreadPoolExecutor(jobs) as pool:
                futures = [pool.submit(_in_slot, run, settings, model, seed, n, out, slots) for model, seed, n in todo]
                for future in as_completed(futures):
                    record(future.result())
    return study


def _in_slot(run: RunFunction, settings: dict, model: str, seed: int, epochs: int, out: str, slots: list) -> dict:
    slot = slots.pop()  # list.pop/append are atomic: each thread holds one GPU group at a time
    try:
        return run(settings, model, seed, epochs, out, slot)
    finally:
        slots.append(slot)


def equal_time_epochs(epochs: int, static_seconds: float, pedconv_seconds: float) -> int:
    """Epochs of the static model that take the PEDConv run's training time (at least the study's epochs)."""
    return max(epochs, round(epochs * pedconv_seconds / static_seconds))


# --------------------------------------------------------------------------------------------- results

def analyse(study: dict) -> dict:
    """Statistics over every seed of the study whose pair has finished (and, for equal time, whose third run has)."""
    runs = study["runs"]
    seeds = sorted({r["seed"] for r in runs.values()})
    paired = [s for s in seeds if _key(STATIC, s) in runs and _key(PEDCONV, s) in runs]
    result: dict = {"seeds": paired}
    if not paired:
        return result
    for model in (STATIC, PEDCONV):
        chosen = [runs[_key(model, s)] for s in paired]
        result[model] = {metric: spread([r[metric] for r in chosen])
                         for metric in ("final_top1", "best_top1", "seconds", "train_seconds")}
    for metric in ("final_top1", "best_top1"):
        result[f"{PEDCONV} - {STATIC}: {metric}"] = paired_summary(
            [runs[_key(STATIC, s)][metric] for s in paired], [runs[_key(PEDCONV, s)][metric] for s in paired])
    ratios = [runs[_key(PEDCONV, s)]["train_seconds"] / runs[_key(STATIC, s)]["train_seconds"] for s in paired]
    result["time_ratio"] = spread(ratios)
    long = [s for s in paired if _key(STATIC_LONG, s) in runs]
    if long:
        result[STATIC_LONG] = {metric: spread([runs[_key(STATIC_LONG, s)][metric] for s in long])
                               for metric in ("final_top1", "best_top1", "seconds", "train_seconds", "epochs")}
        result[f"{PEDCONV} - {STATIC_LONG}: final_top1"] = paired_summary(
            [runs[_key(STATIC_LONG, s)]["final_top1"] for s in long],
            [runs[_key(PEDCONV, s)]["final_top1"] for s in long]) | {"seeds": long}
    return result


def _ms(values: dict) -> str:
    return f"{values['mean']:.2f} ± {values['std']:.2f} [{values['min']:.2f}, {values['max']:.2f}]"


def _comparison(name: str, summary: dict) -> str:
    sign = summary["sign_test"]
    return (f"| {name} | {summary['mean']:+.2f} | [{summary['ci95'][0]:+.2f}, {summary['ci95'][1]:+.2f}] | "
            f"{sign['positive']} / {sign['negative']} / {sign['ties']} | {sign['p']:.3g} |")


def markdown(study: dict, stats: dict, command: str) -> str:
    settings, runs, machine = study["settings"], study["runs"], study.get("machine", {})
    lines = ["# Paired accuracy study: static against PEDConv", "",
             f"`{command}`", "",
             f"{settings['arch']} x{settings['wmul']:g}, {settings['image_size']} px, batch {settings['batch_size']}, "
             f"{settings['epochs']} epochs, train fraction {settings['train_fraction']:g}, data {settings['data']}; "
             f"extra main.py flags: {' '.join(settings['extra']) or 'none'}.", "",
             f"Machine: {machine.get('processor', '?')}, {machine.get('accelerator', 'no GPU')}; torch "
             f"{machine.get('torch', '?')}; finished {study.get('finished', '?')}.", ""]
    if not stats.get("seeds"):
        return "\n".join(lines + ["No pair has finished yet.", ""])
    lines += ["## Per seed", "",
              "| seed | static final / best | PEDConv final / best | difference final / best | static train s | "
              "PEDConv train s | equal-time static: epochs, final | ",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for seed in stats["seeds"]:
        a, b = runs[_key(STATIC, seed)], runs[_key(PEDCONV, seed)]
        c = runs.get(_key(STATIC_LONG, seed))
        lines.append(f"| {seed} | {a['final_top1']:.2f} / {a['best_top1']:.2f} | {b['final_top1']:.2f} / "
                     f"{b['best_top1']:.2f} | {b['final_top1'] - a['final_top1']:+.2f} / "
                     f"{b['best_top1'] - a['best_top1']:+.2f} | {a['train_seconds']:.0f} | {b['train_seconds']:.0f} | "
                     + (f"{c['epochs']}, {c['final_top1']:.2f} |" if c else "- |"))
    lines += ["", "## Over the seeds", "",
              "| model | final top-1 (%) | best top-1 (%) | training seconds per run | process seconds per run |",
              "|---|---|---|---|---|"]
    for model in (STATIC, PEDCONV, STATIC_LONG):
        if model in stats:
            lines.append(f"| {model} | {_ms(stats[model]['final_top1'])} | {_ms(stats[model]['best_top1'])} | "
                         f"{_ms(stats[model]['train_seconds'])} | {_ms(stats[model]['seconds'])} |")
    lines += ["", "(mean ± sample standard deviation [min, max] over the seeds.) PEDConv's training time per run "
              "(epochs and validation, without the process's start) is "
              f"{stats['time_ratio']['median']:.2f}x the static model's (median; range "
              f"{stats['time_ratio']['min']:.2f}-{stats['time_ratio']['max']:.2f}).", "",
              "| paired difference (top-1 points) | mean | 95 % bootstrap CI | sign test + / - / ties | p |",
              "|---|---:|---|---|---:|",
              _comparison("PEDConv - static, final", stats[f"{PEDCONV} - {STATIC}: final_top1"]),
              _comparison("PEDConv - static, best", stats[f"{PEDCONV} - {STATIC}: best_top1"])]
    key = f"{PEDCONV} - {STATIC_LONG}: final_top1"
    if key in stats:
        lines.append(_comparison(f"PEDConv - static at equal wall time, final ({len(stats[key]['seeds'])} seeds)",
                                 stats[key]))
    lines += ["", "![per seed](paired.png)", "![validation top-1 per epoch](curves.png)", ""]
    return "\n".join(lines)


def plot(study: dict, stats: dict, out: str) -> List[str]:
    """paired.png (per seed, final top-1 of each model joined) and curves.png (median top-1 per epoch, min-max band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, seeds = study["runs"], stats.get("seeds", [])
    if not seeds:
        return []
    colours = {STATIC: "tab:blue", PEDCONV: "tab:orange", STATIC_LONG: "tab:green"}
    written = []
    figure, axes = plt.subplots(1, 2, figsize=(8, 3.4), dpi=80)
    for axis, metric in zip(axes, ("final_top1", "best_top1")):
        for index, seed in enumerate(seeds):
            values = [runs[_key(STATIC, seed)][metric], runs[_key(PEDCONV, seed)][metric]]
            axis.plot([0, 1], values, color="grey", linewidth=0.8)
            axis.scatter([0, 1], values, c=[colours[STATIC], colours[PEDCONV]], s=18, zorder=3)
        axis.set_xticks([0, 1], [STATIC, PEDCONV])
        axis.set_xlim(-0.4, 1.4)
        axis.set_title(f"{metric.replace('_', ' ')} per seed")
        axis.set_ylabel("top-1 (%)")
    figure.tight_layout()
    written.append(os.path.join(out, "paired.png"))
    figure.savefig(written[-1])
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(6, 3.6), dpi=80)
    for model in (STATIC, PEDCONV, STATIC_LONG):
        curves = [runs[_key(model, s)]["top1"] for s in seeds if _key(model, s) in runs]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        columns = [[c[e] for c in curves] for e in range(length)]
        epochs = list(range(1, length + 1))
        axis.plot(epochs, [statistics.median(c) for c in columns], color=colours[model],
                  label=f"{model} (median of {len(curves)})")
        axis.fill_between(epochs, [min(c) for c in columns], [max(c) for c in columns], color=colours[model],
                          alpha=0.2)
    axis.set_xlabel("epoch")
    axis.set_ylabel("validation top-1 (%)")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    written.append(os.path.join(out, "curves.png"))
    figure.savefig(written[-1])
    plt.close(figure)
    return written


def machine() -> dict:
    import torch

    processor = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as stream:
            names = [line.split(":", 1)[1].strip() for line in stream if line.startswith("model name")]
        processor = f"{names[0]} ({len(names)} logical CPUs)" if names else processor
    except OSError:
        pass
    accelerator = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "no GPU"
    return {"processor": processor, "accelerator": accelerator, "torch": torch.__version__,
            "python": platform.python_version()}


# --------------------------------------------------------------------------------------------- data

def subset_folder(data: str, fraction: float, out: str) -> str:
    """A folder with val/ and a fixed ``fraction`` of each class's training images (symbolic links), made once."""
    target = os.path.join(out, f"data-{fraction:g}")
    if os.path.isfile(os.path.join(target, "COMPLETE")):
        return target
    staging = target + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    train = os.path.join(data, "train")
    for name in sorted(os.listdir(train)):
        folder = os.path.join(train, name)
        if not os.path.isdir(folder):
            continue
        files = sorted(f for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f)))
        random.Random(f"subset-{name}").shuffle(files)  # fixed: every seed and model gets this subset
        os.makedirs(os.path.join(staging, "train", name))
        for file in files[:max(1, round(len(files) * fraction))]:
            os.symlink(os.path.abspath(os.path.join(folder, file)), os.path.join(staging, "train", name, file))
    os.symlink(os.path.abspath(os.path.join(data, "val")), os.path.join(staging, "val"))
    open(os.path.join(staging, "COMPLETE"), "w").close()
    shutil.rmtree(target, ignore_errors=True)
    os.rename(staging, target)
    return target


# --------------------------------------------------------------------------------------------- command line

def build_parser() -> ToolParser:
    parser = ToolParser(prog="python benchmarks/accuracy.py",
                        description="paired many-seed accuracy study, static against PEDConv; flags after -- go to "
                                    "main.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("data", nargs="?", default=None, metavar="DATA_DIR",
                        help="folder with train/ and val/ (default: the demo data set, built on first use)")
    parser.add_argument("--seeds", type=int, default=10, help="number of seeds (pairs)")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed ... first-seed + seeds - 1")
    parser.add_argument("--epochs", type=int, default=8, help="epochs of every static and PEDConv run")
    parser.add_argument("-a", "--arch", default="resnet18")
    parser.add_argument("--wmul", type=float, default=0.25, help="width multiplier")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("-b", "--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--train-fraction", type=float, default=1.0,
                        help="fraction of each class's training images used (a fixed subset)")
    parser.add_argument("--equal-time", action=argparse.BooleanOptionalAction, default=True,
                        help="also train the static model for the PEDConv run's wall time")
    parser.add_argument("--out", default=os.path.join("logs", "accuracy"), metavar="DIR")
    parser.add_argument("--jobs", type=int, default=None,
                        help="runs at once (default: visible GPUs // nproc-per-node, 1 without GPUs)")
    parser.add_argument("--nproc-per-node", type=int, default=1, help="GPUs per run (a multiproc.py launch)")
    parser.add_argument("-j", "--workers", type=int, default=2,
                        help="data-loading workers per run; with 0 the pairs share the data order but not the "
                             "augmentations (then drawn from torch's global generator, which each model's "
                             "initialization advances differently)")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS of each run on the CPU (default: the environment's)")
    parser.add_argument("--in-process", action="store_true",
                        help="CPU, one run at a time: train in this process through image_classification.run (saves "
                             "each run the interpreter's start and imports, some 10-30 s on a small or busy machine)")
    return parser


def parse(argv: Optional[Sequence[str]]) -> Tuple[argparse.Namespace, List[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: List[str] = []
    if "--" in argv:
        index = argv.index("--")
        argv, extra = argv[:index], argv[index + 1:]
    args = build_parser().parse_args(argv)
    return args, extra


def _check(args) -> None:
    if args.seeds < 1:
        raise ToolError("--seeds must be at least 1")
    if args.epochs < 1:
        raise ToolError("--epochs must be positive")
    if not 0.0 < args.train_fraction <= 1.0:
        raise ToolError("--train-fraction must be in (0, 1]")
    if args.nproc_per_node < 1:
        raise ToolError("--nproc-per-node must be at least 1")


def _data(args) -> str:
    """The study's data folder: the one given (with train/ and val/), else the demo's, made on first use."""
    if args.data is None:
        from image_classification.demo import prepare_digits

        return prepare_digits()
    if os.path.isdir(os.path.join(args.data, "train")) and os.path.isdir(os.path.join(args.data, "val")):
        return os.path.abspath(args.data)
    raise ToolError(f"{args.data}: not a folder with train/ and val/")


def _jobs(args, gpus: List[str]) -> int:
    """Runs at once: --jobs, else as many as the visible GPUs hold (one on a CPU machine)."""
    if gpus and args.nproc_per_node > len(gpus):
        raise ToolError(f"--nproc-per-node {args.nproc_per_node}: only {len(gpus)} GPU(s) visible")
    jobs = args.jobs or (len(gpus) // args.nproc_per_node if gpus else 1)
    if gpus and jobs * args.nproc_per_node > len(gpus):
        raise ToolError(f"--jobs {jobs} x --nproc-per-node {args.nproc_per_node} needs more than {len(gpus)} GPUs")
    return jobs


def _in_process(args, gpus: List[str], jobs: int) -> None:
    """--in-process: one CPU run at a time in this process, with --threads torch threads and quiet logging."""
    import torch

    if gpus or jobs > 1 or args.nproc_per_node > 1:
        raise ToolError("--in-process is for one CPU run at a time (no GPUs, --jobs 1, --nproc-per-node 1)")
    if args.threads:
        torch.set_num_threads(args.threads)
    from image_classification.tools import quiet_logging

    quiet_logging()


def _finish(study: dict, out: str, command: str) -> str:
    """Statistics, machine and time into the study; accuracy.json, accuracy.md and the plots written; the text."""
    study["machine"] = machine()
    study["finished"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    study["command"] = command
    study["statistics"] = analyse(study)
    _save(os.path.join(out, RESULTS), study)
    text = markdown(study, study["statistics"], command)
    write_text(os.path.join(out, "accuracy.md"), text)
    plot(study, study["statistics"], out)
    return text


@tool_main
def main(argv: Optional[Sequence[str]] = None) -> int:
    import torch

    args, extra = parse(argv)
    _check(args)
    data = _data(args)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    gpus = [str(i) for i in range(torch.cuda.device_count())]
    jobs = _jobs(args, gpus)
    settings = {"data": data, "arch": args.arch, "wmul": args.wmul, "image_size": args.image_size,
                "batch_size": args.batch_size, "epochs": args.epochs, "train_fraction": args.train_fraction,
                "equal_time": args.equal_time, "extra": extra, "nproc_per_node": args.nproc_per_node,
                "workers": args.workers, "threads": args.threads, "gpus": gpus,
                "device": "cuda" if gpus else "cpu"}
    if args.in_process:
        _in_process(args, gpus, jobs)
    if args.workers == 0:
        print("warning: -j 0: each pair shares its data order but not its augmentations", file=sys.stderr)
    settings["in_process"] = args.in_process
    settings["run_data"] = data if args.train_fraction == 1.0 else subset_folder(data, args.train_fraction, out)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    command = "python benchmarks/accuracy.py " + " ".join(sys.argv[1:] if argv is None else argv)

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    load_study(os.path.join(out, RESULTS), settings)  # refuse other settings before any training
    study = run_study(settings, out, seeds, jobs=jobs, progress=progress)
    print(_finish(study, out, command), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
