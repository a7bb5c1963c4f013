"""Repetition check for flaky runs: not part of the default test run (it takes tens of minutes on 2 cores).

Runs the 2-process CPU training job of issue 23 many times and the full test suite a few times in a row, and
reports every non-zero exit and every failed test with its output. Run it before resolving an issue that
touches the engine, the launcher or the loaders::

    python tests/repeat_check.py                     # 30 two-process runs, then the suite 3 times
    python tests/repeat_check.py --runs 10 --suites 0
    python tests/repeat_check.py --runs 0 --suites 3 -- -x tests/test_engine.py   # pytest arguments after --

Exit status 0 when every run and every suite passed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

TAIL_CHARACTERS = 4000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1", PYTHONPATH=str(REPO_ROOT))


def training_command(data: Path, workspace: Path, backend: str) -> list[str]:
    """The job of issue 23: two gloo processes, a PEDConv ResNet-18, one epoch of a tiny JPEG folder."""
    return [sys.executable, str(REPO_ROOT / "multiproc.py"), "--nproc_per_node", "2", "--master_port",
            str(free_port()), str(REPO_ROOT / "main.py"), str(data), "--data-backend", backend, "--arch", "resnet18",
            "--dynamic", "--wmul", "0.25", "--image-size", "64", "-b", "2", "--epochs", "1", "-j", "0",
            "--device", "cpu", "--workspace", str(workspace), "--raport-file", "raport.json"]


def report_problem(workspace: Path) -> str | None:
    """What is missing from a finished run's report, or None when it is complete."""
    path = workspace / "raport.json"
    if not path.exists():
        return "no report"
    entries = []
    for line in path.read_text().splitlines():
        if not line.startswith("DLLL "):
            return f"a report line is not DLLogger JSON: {line[:80]!r}"
        entries.append(json.loads(line[len("DLLL "):]))
    steps = [entry.get("step") for entry in entries]
    if "PARAMETER" not in steps:
        return "no PARAMETER line"
    if [] not in steps:
        return "no run summary"
    if not any(isinstance(step, list) and len(step) == 1 for step in steps):
        return "no epoch line"
    return None


def repeat_training(runs: int, backend: str, timeout: float) -> list[str]:
    from tests.data_utils import make_dataset

    failures = []
    with tempfile.TemporaryDirectory(prefix="repeat-check-") as tmp:
        data = make_dataset(Path(tmp) / "data", {"a": 8, "b": 8, "c": 8}, {"a": 5, "b": 4, "c": 4},
                            size_range=(48, 72))
        for index in range(1, runs + 1):
            workspace = Path(tmp) / f"run-{index}"
            start = time.monotonic()
            try:
                done = subprocess.run(training_command(data, workspace, backend), cwd=REPO_ROOT, env=child_env(),
                                      capture_output=True, text=True, timeout=timeout)
                status, output = done.returncode, done.stdout + done.stderr
            except subprocess.TimeoutExpired as expired:
                status, output = "timeout", f"{expired.stdout or ''}{expired.stderr or ''}"
            problem = f"exit {status}" if status != 0 else report_problem(workspace)
            if problem is None:
                # the other rank's log holds its own crash output, if any
                log = workspace / "rank_1.log"
                if log.exists() and re.search(r"terminate called|Fatal Python error|Traceback", log.read_text()):
                    problem = "rank 1's log shows a crash"
            line = f"run {index}/{runs}: {'ok' if problem is None else problem} ({time.monotonic() - start:.0f} s)"
            print(line, flush=True)
            if problem is not None:
                logs = "".join(f"\n--- {log.name} ---\n{log.read_text()[-TAIL_CHARACTERS:]}"
                               for log in sorted(workspace.glob("rank_*.log")))
                failures.append(f"{line}\n{output[-TAIL_CHARACTERS:]}{logs}")
    return failures


def repeat_suite(suites: int, pytest_args: list[str], timeout: float) -> list[str]:
    failures = []
    for index in range(1, suites + 1):
        start = time.monotonic()
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args]
        try:
            done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
            status, output = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as expired:
            status, output = "timeout", f"{expired.stdout or ''}{expired.stderr or ''}"
        last = output.strip().splitlines()[-1] if output.strip() else ""
        print(f"suite {index}/{suites}: exit {status}: {last} ({time.monotonic() - start:.0f} s)", flush=True)
        if status != 0:
            failed = [line for line in output.splitlines() if line.startswith(("FAILED", "ERROR"))]
            failures.append(f"suite {index}: exit {status}\n" + "\n".join(failed) + "\n" + output[-TAIL_CHARACTERS:])
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30, help="two-process training runs (default 30)")
    parser.add_argument("--suites", type=int, default=3, help="full test-suite runs in a row (default 3)")
    parser.add_argument("--backend", default="pytorch", help="data backend of the training runs")
    parser.add_argument("--run-timeout", type=float, default=600, help="seconds per training run")
    parser.add_argument("--suite-timeout", type=float, default=3600, help="seconds per suite run")
    parser.add_argument("pytest_args", nargs="*", help="arguments for pytest (after --)")
    args = parser.parse_args(argv)
    failures = repeat_training(args.runs, args.backend, args.run_timeout) if args.runs > 0 else []
    failures += repeat_suite(args.suites, args.pytest_args, args.suite_timeout) if args.suites > 0 else []
    for failure in failures:
        print(f"\n===== {failure}", flush=True)
    print(f"\n{args.runs} run(s), {args.suites} suite(s): {len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
