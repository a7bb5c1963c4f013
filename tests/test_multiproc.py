"""multiproc.py on CPU: per-rank environment and logs, failure and signal handling, argument checks.

The launcher is exercised with small stand-in scripts (below); the end-to-end runs of main.py are in the
last section. Every check that processes are gone looks at recorded PIDs (a zombie counts as gone).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import multiproc
from dataloading.dali import dali_available

REPO_ROOT = Path(__file__).resolve().parents[1]
MULTIPROC = REPO_ROOT / "multiproc.py"
# Safety net for runs that import torch: a few seconds normally, minutes on a loaded 2-core machine.
TORCH_TIMEOUT = 600

# Children record themselves as pid_<rank>.json once ready. Modes:
#   env       write env_<rank>.json, print a line to stdout and stderr, exit 0
#   fail R    rank R exits 3 once every rank is ready; the others start a grandchild and sleep
#   catch     handle SIGINT/SIGTERM by writing got_<rank> and exiting 0; sleep
#   stubborn  ignore SIGINT/SIGTERM; sleep
#   abort     rank 1 aborts (SIGABRT) once every rank is ready; the others sleep
STANDIN = textwrap.dedent("""
    import json, os, signal, subprocess, sys, time
    from pathlib import Path

    out, mode = Path(sys.argv[1]), sys.argv[2]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])

    def write(name, data):
        tmp = out / (name + ".tmp")
        tmp.write_text(json.dumps(data))
        tmp.rename(out / name)

    def ready(**extra):
        write(f"pid_{rank}.json", dict(pid=os.getpid(), pgid=os.getpgid(0), **extra))

    if mode == "env":
        keys = ["MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                "OMP_NUM_THREADS"]
        write(f"env_{rank}.json", {key: os.environ.get(key) for key in keys})
        print(f"stdout of rank {rank}", flush=True)
        print(f"stderr of rank {rank}", file=sys.stderr, flush=True)
    elif mode == "fail":
        if rank == int(sys.argv[3]):
            ready()
            while len(list(out.glob("pid_*.json"))) < world:
                time.sleep(0.02)
            print(f"rank {rank} gives up", flush=True)
            sys.exit(3)
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        ready(grandchild=grandchild.pid)
        time.sleep(300)
    elif mode == "abort":
        ready()
        while len(list(out.glob("pid_*.json"))) < world:
            time.sleep(0.02)
        if rank == 1:
            os.abort()  # as a C++ std::terminate does
        time.sleep(300)
    elif mode in ("catch", "stubborn"):
        def caught(signum, frame):
            (out / f"got_{rank}").write_text(signal.Signals(signum).name)
            sys.exit(0)
        handler = caught if mode == "catch" else signal.SIG_IGN
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
        ready()
        time.sleep(300)
""")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def recorded_pids(out: Path) -> list[int]:
    pids = []
    for path in out.glob("pid_*.json"):
        record = json.loads(path.read_text())
        pids.append(record["pid"])
        if "grandchild" in record:
            pids.append(record["grandchild"])
    return pids


@pytest.fixture
def standin(tmp_path):
    script = tmp_path / "standin.py"
    script.write_text(STANDIN)
    out = tmp_path / "out"
    out.mkdir()
    return script, out


def child_env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    env.update(extra)
    return env


def launch(args, cwd, **popen):
    """Start multiproc.py in its own session, so that signals sent to it reach it alone."""
    return subprocess.Popen([sys.executable, str(MULTIPROC), *map(str, args)], cwd=cwd, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **popen)


def finish(process, timeout=60):
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return process.returncode, stdout, stderr


# --- environment and logs --------------------------------------------------------------------------

def test_each_child_gets_its_rank_env_and_only_local_rank_0_keeps_the_console(standin, tmp_path):
    script, out = standin
    port = free_port()
    workspace = tmp_path / "ws"
    # This node is node 1 of 2: its ranks are 3, 4 and 5 of 6.
    process = launch(["--nnodes", 2, "--node_rank", 1, "--nproc_per_node", 3, "--master_addr", "10.0.0.7",
                      "--master_port", port, script, out, "env", "--workspace", workspace], cwd=tmp_path)
    status, stdout, stderr = finish(process)
    assert status == 0, stderr
    for local_rank in range(3):
        rank = 3 + local_rank
        env = json.loads((out / f"env_{rank}.json").read_text())
        assert env == {"MASTER_ADDR": "10.0.0.7", "MASTER_PORT": str(port), "WORLD_SIZE": "6",
                       "RANK": str(rank), "LOCAL_RANK": str(local_rank), "LOCAL_WORLD_SIZE": "3",
                       "OMP_NUM_THREADS": "1"}
    assert "stdout of rank 3" in stdout and "stderr of rank 3" in stderr
    assert "of rank 4" not in stdout + stderr and "of rank 5" not in stdout + stderr
    assert not (workspace / "rank_3.log").exists()
    for rank in (4, 5):
        log = (workspace / f"rank_{rank}.log").read_text()
        assert f"stdout of rank {rank}" in log and f"stderr of rank {rank}" in log
        assert log.startswith("=== multiproc.py")


def test_logs_append_across_launches_and_default_to_the_current_folder(standin, tmp_path):
    script, out = standin
    for _ in range(2):
        for path in out.iterdir():
            path.unlink()
        status, _, stderr = finish(launch(["--nproc_per_node", 2, "--master_port", free_port(),
                                           script, out, "env"], cwd=tmp_path))
        assert status == 0, stderr
    log = (tmp_path / "rank_1.log").read_text()
    assert log.count("=== multiproc.py") == 2 and log.count("stdout of rank 1") == 2


@pytest.mark.parametrize("args, expected", [
    ([], "."),
    (["--workspace", "a"], "a"),
    (["--workspace=b"], "b"),
    (["--works", "c", "-b", "4"], "c"),              # argparse prefix, as main.py reads it
    (["--workers", "5", "--wd", "1e-4"], "."),      # other flags starting with --w
    (["--workspace", "a", "--workspace", "d"], "d"),  # the last one wins
    (["--", "--workspace", "e"], "."),
])
def test_workspace_is_read_from_the_script_arguments(args, expected):
    assert multiproc.workspace_of(args) == Path(expected)


def test_omp_threads_split_the_cores_unless_set(monkeypatch):
    args = multiproc.build_parser().parse_args(["--nproc_per_node", "2", "x.py"])
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert multiproc.child_env(args, 1, base={})["OMP_NUM_THREADS"] == "8"
    assert multiproc.child_env(args, 1, base={"OMP_NUM_THREADS": "3"})["OMP_NUM_THREADS"] == "3"


# --- failures ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("failing_rank", [0, 1])
def test_a_failing_rank_stops_the_launch_quickly_and_leaves_no_process(standin, tmp_path, failing_rank):
    script, out = standin
    start = time.monotonic()
    process = launch(["--nproc_per_node", 3, "--master_port", free_port(), script, out, "fail", failing_rank,
                      "--workspace", tmp_path / "ws"], cwd=tmp_path)
    status, stdout, stderr = finish(process)
    elapsed = time.monotonic() - start
    assert status == 3, stderr
    assert elapsed < 15, elapsed  # the others sleep 300 s
    assert f"rank {failing_rank} (local rank {failing_rank}) exited with status 3" in stderr
    if failing_rank:
        log = tmp_path / "ws" / f"rank_{failing_rank}.log"
        assert f"see {log}" in stderr and f"rank {failing_rank} gives up" in stderr  # the log's tail
    else:
        assert "see the console output above" in stderr
    pids = recorded_pids(out)
    assert len(pids) == 3 + 2  # three ranks, two grandchildren
    wait_for(lambda: not any(alive(pid) for pid in pids), 5, "the children and grandchildren to be gone")


def test_a_child_killed_by_a_signal_is_a_failure(standin, tmp_path):
    script, out = standin
    process = launch(["--nproc_per_node", 2, "--master_port", free_port(), script, out, "stubborn",
                      "--workspace", tmp_path], cwd=tmp_path)
    wait_for(lambda: len(list(out.glob("pid_*.json"))) == 2, 30, "the children to start")
    victim = json.loads((out / "pid_1.json").read_text())["pid"]
    os.kill(victim, signal.SIGKILL)
    status, _, stderr = finish(process)
    assert status == 128 + signal.SIGKILL
    assert "rank 1 (local rank 1) was killed by signal 9 (SIGKILL)" in stderr
    assert not any(alive(pid) for pid in recorded_pids(out))


def test_a_crashed_child_is_reported_by_its_signal_not_as_an_exit_status(standin, tmp_path):
    script, out = standin
    process = launch(["--nproc_per_node", 2, "--master_port", free_port(), script, out, "abort",
                      "--workspace", tmp_path], cwd=tmp_path)
    status, _, stderr = finish(process)
    assert status == 128 + signal.SIGABRT
    assert "rank 1 (local rank 1) was killed by signal 6 (SIGABRT: it crashed)" in stderr
    assert "exited with status" not in stderr
    assert not any(alive(pid) for pid in recorded_pids(out))


# --- signals ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_reaches_every_child(standin, tmp_path, sig):
    script, out = standin
    process = launch(["--nproc_per_node", 3, "--master_port", free_port(), script, out, "catch",
                      "--workspace", tmp_path], cwd=tmp_path)
    wait_for(lambda: len(list(out.glob("pid_*.json"))) == 3, 30, "the children to start")
    os.kill(process.pid, sig)  # what Ctrl-C does: the children are in their own process groups
    status, _, stderr = finish(process, timeout=20)
    assert status == 128 + sig, stderr
    for rank in range(3):
        assert (out / f"got_{rank}").read_text() == sig.name
    assert not any(alive(pid) for pid in recorded_pids(out))


def test_children_ignoring_the_signal_are_killed_after_the_grace_period(standin, tmp_path):
    script, out = standin
    process = launch(["--nproc_per_node", 2, "--grace-period", 1, "--master_port", free_port(), script, out,
                      "stubborn", "--workspace", tmp_path], cwd=tmp_path)
    wait_for(lambda: len(list(out.glob("pid_*.json"))) == 2, 30, "the children to start")
    start = time.monotonic()
    os.kill(process.pid, signal.SIGTERM)
    status, _, _ = finish(process, timeout=20)
    assert status == 128 + signal.SIGTERM
    assert time.monotonic() - start < 8
    assert not any(alive(pid) for pid in recorded_pids(out))


def test_children_die_with_a_killed_launcher(standin, tmp_path):
    script, out = standin
    process = launch(["--nproc_per_node", 2, "--master_port", free_port(), script, out, "catch",
                      "--workspace", tmp_path], cwd=tmp_path)
    wait_for(lambda: len(list(out.glob("pid_*.json"))) == 2, 30, "the children to start")
    os.kill(process.pid, signal.SIGKILL)  # no chance to forward anything: the kernel's death signal does it
    finish(process)
    pids = recorded_pids(out)
    wait_for(lambda: not any(alive(pid) for pid in pids), 10, "the orphaned children to exit")
    assert sorted(path.read_text() for path in out.glob("got_*")) == ["SIGTERM", "SIGTERM"]


# --- argument checks --------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--nproc_per_node", "0", "{script}"], "--nproc_per_node must be at least 1"),
    (["--nnodes", "2", "--node_rank", "2", "{script}"], "--node_rank must be in 0 .. 1"),
    (["--master_port", "70000", "{script}"], "--master_port must be in 1 .. 65535"),
    (["missing.py"], "training script not found: missing.py"),
    (["{script}", "--workspace", "{script}"], "cannot create the workspace"),
])
def test_bad_requests_are_one_line_errors(tmp_path, monkeypatch, capsys, args, message):
    script = tmp_path / "s.py"
    script.write_text("")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        multiproc.main([arg.format(script=script) for arg in args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_more_processes_than_gpus_is_an_error_on_a_gpu_machine(tmp_path, monkeypatch, capsys):
    script = tmp_path / "s.py"
    script.write_text("")
    monkeypatch.setattr(multiproc, "gpu_count", lambda: 2)
    with pytest.raises(SystemExit) as exit_info:
        multiproc.main(["--nproc_per_node", "4", str(script), "--arch", "resnet18"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--nproc_per_node 4 asks for more processes than the 2 GPU(s)" in err


@pytest.mark.parametrize("gpus, script_args", [(0, []), (2, ["--device", "cpu"]), (2, ["--device=cpu"]), (4, [])])
def test_gpu_check_allows_cpu_machines_cpu_runs_and_enough_gpus(monkeypatch, gpus, script_args):
    monkeypatch.setattr(multiproc, "gpu_count", lambda: gpus)
    multiproc.check_gpu_count(4, script_args)


@pytest.mark.parametrize("visible, count", [("0,1,2", 3), ("", 0), ("1,-1,2", 1), ("GPU-abc,GPU-def", 2)])
def test_cuda_visible_devices_caps_the_gpu_count(monkeypatch, visible, count):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert multiproc._visible_device_limit() == count


# --- torchrun --------------------------------------------------------------------------------

def test_torchrun_sets_the_same_variables(standin, tmp_path):
    script, out = standin
    port = free_port()
    torchrun = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(port), str(script), str(out), "env"],
        cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=TORCH_TIMEOUT)
    assert torchrun.returncode == 0, torchrun.stderr
    by_torchrun = [json.loads((out / f"env_{rank}.json").read_text()) for rank in range(2)]
    for path in out.iterdir():
        path.unlink()
    status, _, stderr = finish(launch(["--nproc_per_node", 2, "--master_port", port, script, out, "env"],
                                      cwd=tmp_path))
    assert status == 0, stderr
    by_multiproc = [json.loads((out / f"env_{rank}.json").read_text()) for rank in range(2)]
    assert by_multiproc == by_torchrun


# --- main.py end to end: 2 processes, gloo, a tiny JPEG folder ---------------------------------------

VAL_IMAGES = 13  # odd, so that the two ranks' validation shards (7 and 6 images) end in partial batches


@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory):
    from tests.data_utils import make_dataset

    root = tmp_path_factory.mktemp("jpegs")
    return make_dataset(root, {"a": 8, "b": 8, "c": 8}, {"a": 5, "b": 4, "c": 4}, size_range=(36, 48))


def main_args(data_root, workspace, backend="pytorch", *extra):
    return ["main.py", data_root, "--data-backend", backend, "--arch", "resnet18", "--dynamic", "--wmul", "0.125",
            "--image-size", 32, "-b", 4, "--epochs", 1, "--device", "cpu", "-j", 0, "--seed", 3, "--lr", 0.05,
            "--workspace", workspace, "--raport-file", "raport.json", *extra]


def run_launcher(args, cwd):
    status, stdout, stderr = finish(launch(args, cwd=cwd), timeout=TORCH_TIMEOUT)
    assert status == 0, stdout[-3000:] + stderr[-3000:]
    return stdout + stderr


def report_entries(path: Path) -> list:
    lines = path.read_text().splitlines()
    assert lines and all(line.startswith("DLLL ") for line in lines)
    return [json.loads(line[len("DLLL "):]) for line in lines]


def epoch_results(path: Path) -> dict:
    epochs = [e for e in report_entries(path)
              if e["type"] == "LOG" and isinstance(e["step"], list) and len(e["step"]) == 1]
    assert len(epochs) == 1
    return epochs[0]["data"]


def two_process_training(data_root, workspace, backend, *extra):
    run_launcher(["--nproc_per_node", 2, "--master_port", free_port(),
                  *main_args(data_root, workspace, backend, *extra)], cwd=REPO_ROOT)
    return workspace


@pytest.fixture(scope="module")
def pytorch_run(jpeg_root, tmp_path_factory):
    return two_process_training(jpeg_root, tmp_path_factory.mktemp("run-pytorch"), "pytorch")


def check_two_process_run(workspace: Path):
    results = epoch_results(workspace / "raport.json")
    assert results["val.images"] == VAL_IMAGES  # every validation image once, over both ranks
    # top-1/top-5 are counts over all 13 images (not a mean of the ranks' percentages over 7 and 6 images)
    for metric in ("val.top1", "val.top5"):
        hits = results[metric] * VAL_IMAGES / 100.0
        assert hits == pytest.approx(round(hits), abs=1e-6), (metric, results[metric])
    assert results["val.top1"] <= results["val.top5"]
    # Only rank 0 writes the report: one set of parameters; rank 1 talks to its log.
    parameters = [e for e in report_entries(workspace / "raport.json") if e.get("step") == "PARAMETER"]
    assert len(parameters) == 1
    assert (workspace / "rank_1.log").read_text().count("\n") > 1
    assert not (workspace / "rank_0.log").exists()


def test_two_process_training_with_pytorch_loading(pytorch_run):
    check_two_process_run(pytorch_run)
    assert (pytorch_run / "checkpoint.pth.tar").exists()


@pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI not installed (pip install nvidia-dali-cuda120)")
def test_two_process_training_with_dali_cpu_loading(jpeg_root, tmp_path):
    workspace = two_process_training(jpeg_root, tmp_path / "ws", "dali-cpu", "--no-checkpoints")
    check_two_process_run(workspace)
    assert not (workspace / "checkpoint.pth.tar").exists()


def test_two_process_evaluation_equals_one_process_evaluation(jpeg_root, pytorch_run, tmp_path):
    weights = ["--evaluate", "--pretrained-weights", pytorch_run / "checkpoint.pth.tar"]
    run_launcher(["--nproc_per_node", 2, "--master_port", free_port(),
                  *main_args(jpeg_root, tmp_path / "two", "pytorch", *weights)], cwd=REPO_ROOT)
    one = subprocess.run([sys.executable, *map(str, main_args(jpeg_root, tmp_path / "one", "pytorch", *weights))],
                         cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True, timeout=TORCH_TIMEOUT)
    assert one.returncode == 0, one.stderr[-3000:]
    two, one = epoch_results(tmp_path / "two" / "raport.json"), epoch_results(tmp_path / "one" / "raport.json")
    assert two["val.images"] == one["val.images"] == VAL_IMAGES
    assert two["val.top1"] == one["val.top1"] and two["val.top5"] == one["val.top5"]
    assert two["val.loss"] == pytest.approx(one["val.loss"], rel=1e-5)
    # the training run validated the weights it saved: its (two-process) figures are the same
    trained = epoch_results(pytorch_run / "raport.json")
    assert trained["val.top1"] == one["val.top1"] and trained["val.top5"] == one["val.top5"]
    assert trained["val.loss"] == pytest.approx(one["val.loss"], rel=1e-5)
