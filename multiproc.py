#!/usr/bin/env python3
"""Start one training process per GPU (or per requested process on a CPU machine).

    python multiproc.py --nproc_per_node 8 main.py /data/imagenet --arch resnet18 ...
    python multiproc.py --nnodes 2 --node_rank 0 --master_addr node0 --nproc_per_node 8 main.py ...

Each child runs ``python -u SCRIPT ARGS`` in its own process group with MASTER_ADDR, MASTER_PORT,
WORLD_SIZE (= nnodes x nproc_per_node), RANK (= node_rank x nproc_per_node + local rank), LOCAL_RANK and
LOCAL_WORLD_SIZE set, the variables `torchrun` sets too, so a script that calls
``torch.distributed.init_process_group(init_method="env://")`` runs the same way under either launcher.

* Local rank 0 keeps this console. Every other process writes stdout and stderr to
  ``<workspace>/rank_<RANK>.log`` (RANK is the global rank), where the workspace is the ``--workspace``
  argument given to the script; for main.py without one, the launcher picks main.py's default
  (``runs/<arch>-<date>-<time>/``) and passes it to every rank; for other scripts, the current folder. Each launch
  appends to the logs after a header line.
* On a machine without GPUs, a launch of several processes says so in its first line (they run on the CPU).
* When a child exits non-zero, the others get SIGTERM and, after 5 seconds, SIGKILL (a rank waiting in a
  collective for the failed one cannot finish a step anyway). The launcher exits with that child's status,
  naming its rank and log and printing the log's last lines. A child killed by a signal is reported by the
  signal's name (SIGABRT, SIGSEGV... as a crash), never as an exit status, and the launcher then exits with
  128 + the signal number.
* SIGINT (Ctrl-C), SIGTERM and SIGHUP are passed on to every child (main.py then finishes its step, saves a
  checkpoint and exits); a child still running after ``--grace-period`` seconds (default 30) is killed. A
  second signal kills at once. The launcher exits with 128 + the signal number.
* Each child runs in its own process group, which is killed once the child is gone, so nothing it started
  (DataLoader workers) outlives the launch; if the launcher itself dies, the kernel sends each child SIGTERM.
* On a machine with GPUs, more processes per node than visible GPUs is an error, unless the script runs on
  the CPU (``--device cpu`` among its arguments). Without GPUs any number is allowed.
* If OMP_NUM_THREADS is unset, each child gets ``cores // nproc_per_node`` (at least 1), so that CPU
  processes do not oversubscribe the cores.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Optional, Sequence

from errors import EXIT_BAD_INPUT, UserError

PROG = "multiproc.py"
POLL_SECONDS = 0.1
FAILURE_GRACE_SECONDS = 5.0
LOG_TAIL_LINES = 15
WORKSPACE_FLAG = "--workspace"
# argparse accepts unambiguous prefixes; "--work" would also match main.py's "--workers".
WORKSPACE_MIN_PREFIX = len("--works")
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
CRASH_SIGNALS = (signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL)


class LaunchError(UserError):
    """A bad launch request: reported as one line and exit status 2."""


# --- arguments -------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Start one process per GPU (DeepLearningExamples-style launcher); see the module docstring.",
    )
    parser.add_argument("--nnodes", type=int, default=1, help="number of nodes (default 1)")
    parser.add_argument("--node_rank", type=int, default=0, help="rank of this node, 0 .. nnodes-1 (default 0)")
    parser.add_argument("--nproc_per_node", type=int, default=1,
                        help="processes on this node: one per GPU (default 1)")
    parser.add_argument("--master_addr", default="127.0.0.1",
                        help="address of the node of rank 0, reachable from every node (default 127.0.0.1)")
    parser.add_argument("--master_port", type=int, default=29500, help="free port on the master node (default 29500)")
    parser.add_argument("--grace-period", type=float, default=30.0,
                        help="seconds the children get to save and exit after Ctrl-C or SIGTERM before SIGKILL "
                             "(default 30)")
    parser.add_argument("training_script", help="the script to run, e.g. ./main.py")
    parser.add_argument("training_script_args", nargs=argparse.REMAINDER, help="its arguments")
    return parser


def validate(args: argparse.Namespace) -> None:
    if args.nnodes < 1:
        raise LaunchError(f"--nnodes must be at least 1, got {args.nnodes}")
    if args.nproc_per_node < 1:
        raise LaunchError(f"--nproc_per_node must be at least 1, got {args.nproc_per_node}")
    if not 0 <= args.node_rank < args.nnodes:
        raise LaunchError(f"--node_rank must be in 0 .. {args.nnodes - 1} for --nnodes {args.nnodes}, "
                          f"got {args.node_rank}")
    if not 1 <= args.master_port <= 65535:
        raise LaunchError(f"--master_port must be in 1 .. 65535, got {args.master_port}")
    if args.grace_period < 0:
        raise LaunchError(f"--grace-period must be >= 0, got {args.grace_period}")
    if not Path(args.training_script).is_file():
        raise LaunchError(f"training script not found: {args.training_script}")


def script_option(script_args: Sequence[str], flag: str, min_prefix: int) -> Optional[str]:
    """The value of `flag` in `script_args` as argparse would read it (last one wins, prefixes allowed)."""
    value = None
    args = list(script_args)
    for i, arg in enumerate(args):
        if arg == "--":
            break
        name, has_value, inline = arg.partition("=")
        if len(name) < min_prefix or not flag.startswith(name):
            continue
        if has_value:
            value = inline
        elif i + 1 < len(args):
            value = args[i + 1]
    return value


def workspace_of(script_args: Sequence[str]) -> Path:
    """The folder for per-rank logs: the script's --workspace, else the current folder."""
    return Path(script_option(script_args, WORKSPACE_FLAG, WORKSPACE_MIN_PREFIX) or ".")


def arch_of(script_args: Sequence[str]) -> str:
    """main.py's architecture in `script_args` (``--arch``, ``-a NAME``, ``-aNAME``), else its default."""
    value = script_option(script_args, "--arch", len("--ar"))
    for i, arg in enumerate(script_args):
        if arg == "--":
            break
        if arg == "-a" and i + 1 < len(script_args):
            value = script_args[i + 1]
        elif arg.startswith("-a") and not arg.startswith("--") and len(arg) > 2:
            value = arg[2:].lstrip("=")
    return value or "resnet50"


def with_run_workspace(script: str, script_args: Sequence[str]) -> list[str]:
    """main.py's arguments with the run's workspace made explicit: without --workspace, main.py picks a new
    runs/<arch>-<date>-<time>/ per process, which the ranks (started a moment apart) might not agree on, and this
    launcher needs it for the rank logs."""
    args = list(script_args)
    if Path(script).name != "main.py" or script_option(args, WORKSPACE_FLAG, WORKSPACE_MIN_PREFIX) is not None:
        return args
    from image_classification.workspace import default_workspace

    return [*args, WORKSPACE_FLAG, default_workspace(arch_of(args))]


def runs_on_cpu(script_args: Sequence[str]) -> bool:
    return script_option(script_args, "--device", len("--dev")) == "cpu"


# --- GPUs ------------------------------------------------------------------------------------------

def _visible_device_limit() -> Optional[int]:
    """How many devices CUDA_VISIBLE_DEVICES lets through (None when unset)."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    count = 0
    for entry in value.split(","):
        entry = entry.strip()
        # CUDA stops at the first invalid entry; a negative index hides everything after it.
        if not entry or entry.startswith("-"):
            break
        count += 1
    return count


def gpu_count() -> int:
    """GPUs this node's children can use: nvidia-smi's list (else /proc), capped by CUDA_VISIBLE_DEVICES.

    Counted without importing torch, so that the launcher stays light and starts no CUDA context.
    """
    found = 0
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=False)
        if listing.returncode == 0:
            found = sum(1 for line in listing.stdout.splitlines() if line.startswith("GPU "))
    except (OSError, subprocess.SubprocessError):
        pass
    if not found:
        proc_gpus = Path("/proc/driver/nvidia/gpus")
        if proc_gpus.is_dir():
            found = sum(1 for _ in proc_gpus.iterdir())
    limit = _visible_device_limit()
    return found if limit is None else min(found, limit)


def check_gpu_count(nproc_per_node: int, script_args: Sequence[str]) -> None:
    if runs_on_cpu(script_args):
        return
    gpus = gpu_count()
    if gpus and nproc_per_node > gpus:
        raise LaunchError(
            f"--nproc_per_node {nproc_per_node} asks for more processes than the {gpus} GPU(s) visible on this "
            f"node (one process per GPU); use --nproc_per_node {gpus} or fewer, or pass --device cpu to the script")


# --- children --------------------------------------------------------------------------------------

@dataclass
class Child:
    rank: int
    local_rank: int
    process: subprocess.Popen
    log_path: Optional[Path]  # None: the console
    log_file: Optional[IO] = field(default=None, repr=False)

    @property
    def where(self) -> str:
        return str(self.log_path) if self.log_path else "the console output above"


def child_env(args: argparse.Namespace, local_rank: int, base: Optional[dict] = None) -> dict:
    env = dict(os.environ if base is None else base)
    env.update({
        "MASTER_ADDR": args.master_addr,
        "MASTER_PORT": str(args.master_port),
        "WORLD_SIZE": str(args.nnodes * args.nproc_per_node),
        "RANK": str(args.node_rank * args.nproc_per_node + local_rank),
        "LOCAL_RANK": str(local_rank),
        "LOCAL_WORLD_SIZE": str(args.nproc_per_node),
        "GROUP_RANK": str(args.node_rank),
    })
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.nproc_per_node))
    return env


def _prepare_child() -> None:
    """Runs in the child between fork and exec: own process group, SIGTERM if the launcher dies."""
    os.setpgid(0, 0)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the launcher's own signal handling still applies


def start_children(args: argparse.Namespace, workspace: Path, children: list[Child]) -> None:
    """Start this node's processes, appending each to `children` as it starts (so a failure can stop those)."""
    command = [sys.executable, "-u", args.training_script, *args.training_script_args]
    header = f"=== {PROG} {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(command)}\n"
    for local_rank in range(args.nproc_per_node):
        env = child_env(args, local_rank)
        rank = int(env["RANK"])
        log_path = log_file = None
        stdin = None
        if local_rank != 0:
            log_path = workspace / f"rank_{rank}.log"
            log_file = open(log_path, "a", buffering=1)
            log_file.write(header)
            stdin = subprocess.DEVNULL
        try:
            process = subprocess.Popen(command, env=env, stdin=stdin, stdout=log_file, stderr=log_file,
                                       preexec_fn=_prepare_child)
        except OSError:
            if log_file:
                log_file.close()
            raise
        children.append(Child(rank, local_rank, process, log_path, log_file))


def _signal_children(children: Sequence[Child], sig: int) -> None:
    """`sig` to each running child alone: a child such as main.py stops its own workers."""
    for child in children:
        if child.process.poll() is None:
            try:
                child.process.send_signal(sig)
            except ProcessLookupError:
                pass


def _kill_groups(children: Sequence[Child]) -> None:
    """SIGKILL to each child's whole process group: the child and everything it started."""
    for child in children:
        try:
            os.killpg(child.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class Launcher:
    """Runs the children, watches them, and tears them all down on a failure or a signal."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.children: list[Child] = []
        self.received: list[int] = []

    def _on_signal(self, signum, frame) -> None:
        self.received.append(signum)
        if len(self.received) > 1:  # asked twice: no more waiting
            _kill_groups(self.children)

    def _wait_all(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while any(child.process.poll() is None for child in self.children):
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_SECONDS / 2)
        return True

    def shutdown(self, sig: int, grace: float) -> None:
        """Send `sig` to every running child; after `grace` seconds, kill whatever is left."""
        _signal_children(self.children, sig)
        self._wait_all(grace)
        self.reap()

    def reap(self) -> None:
        """Kill every child's process group (a no-op for groups already gone) and collect the children."""
        _kill_groups(self.children)
        for child in self.children:
            child.process.wait()

    def report_failure(self, child: Child, status: int) -> None:
        how = f"exited with status {status}"
        if status < 0:  # a signal, not an exit code: say which, and that a crash is not a clean failure
            how = f"was killed by signal {-status} ({signal.Signals(-status).name}"
            how += ": it crashed)" if -status in CRASH_SIGNALS else ")"
        print(f"{PROG}: rank {child.rank} (local rank {child.local_rank}) {how}; see {child.where}. "
              f"Stopping the other {len(self.children) - 1} process(es).", file=sys.stderr, flush=True)
        if child.log_path:
            try:
                lines = child.log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
            except OSError:
                lines = []
            if lines:
                print(f"{PROG}: last lines of {child.log_path}:", file=sys.stderr)
                for line in lines:
                    print(f"    {line}", file=sys.stderr)
                sys.stderr.flush()

    def run(self) -> int:
        if self.args.nproc_per_node > 1 and not runs_on_cpu(self.args.training_script_args) and not gpu_count():
            print(f"{PROG}: no GPU on this machine: starting {self.args.nproc_per_node} CPU processes",
                  file=sys.stderr, flush=True)
        self.args.training_script_args = with_run_workspace(self.args.training_script, self.args.training_script_args)
        workspace = workspace_of(self.args.training_script_args)
        try:
            workspace.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise LaunchError(f"cannot create the workspace {workspace}: {error.strerror}") from None
        previous = {sig: signal.signal(sig, self._on_signal) for sig in FORWARDED_SIGNALS}
        try:
            try:
                start_children(self.args, workspace, self.children)
            except OSError as error:
                self.shutdown(signal.SIGTERM, FAILURE_GRACE_SECONDS)
                raise LaunchError(f"cannot start {self.args.training_script}: {error}") from None
            world = self.args.nnodes * self.args.nproc_per_node
            first = self.children[0].rank
            logs = ", ".join(str(child.log_path) for child in self.children[1:]) or "none"
            print(f"{PROG}: started ranks {first}..{self.children[-1].rank} of {world} on this node "
                  f"(master {self.args.master_addr}:{self.args.master_port}); rank {first} on the console, "
                  f"logs of the others: {logs}", file=sys.stderr, flush=True)
            return self._watch()
        finally:
            for child in self.children:
                if child.log_file:
                    child.log_file.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _watch(self) -> int:
        while True:
            if self.received:
                sig = self.received[0]
                name = signal.Signals(sig).name
                print(f"{PROG}: got {name}; passing it to every process and waiting up to "
                      f"{self.args.grace_period:g} s (send it again to kill them now)", file=sys.stderr, flush=True)
                self.shutdown(sig, self.args.grace_period)
                return 128 + sig
            running = False
            for child in self.children:
                status = child.process.poll()
                if status is None:
                    running = True
                elif status != 0:
                    self.report_failure(child, status)
                    self.shutdown(signal.SIGTERM, FAILURE_GRACE_SECONDS)
                    return status if 0 < status < 256 else 128 + (-status)
            if not running:
                self.reap()  # anything a child left behind in its group
                return 0
            time.sleep(POLL_SECONDS)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        validate(args)
        check_gpu_count(args.nproc_per_node, args.training_script_args)
        return Launcher(args).run()
    except UserError as error:  # LaunchError
        parser.exit(EXIT_BAD_INPUT, f"{PROG}: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
