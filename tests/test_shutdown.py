"""The end of a run: the loaders' workers stop, the ranks meet, the process group goes, and a distributed
process leaves without the interpreter's shutdown (issue 23: an abort at exit in 2-process gloo runs)."""
import multiprocessing
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import main as cli
from dataloading import LoaderOptions, get_loaders
from dataloading.factory import Loaders
from image_classification import distributed, runner

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def two_rank_calls(monkeypatch):
    """run() on a pretend rank 0 of 2: records closing, barrier and group teardown in order."""
    calls = []
    context = distributed.Context(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    monkeypatch.setattr(distributed, "init_from_environment", lambda device: context)
    monkeypatch.setattr(runner, "_banner", lambda *args: None)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "barrier", lambda device_ids=None: calls.append("barrier"))
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: calls.append("destroy"))
    return calls


def test_a_finished_run_closes_its_loaders_then_meets_the_other_ranks_then_leaves_the_group(
        two_rank_calls, monkeypatch):
    def finished(args, context, closing):
        closing.callback(two_rank_calls.append, "close loaders")
        two_rank_calls.append("trained")
        return 0

    monkeypatch.setattr(runner, "_run", finished)
    assert runner.run(cli.run_config(["unused", "--device", "cpu"])) == 0
    assert two_rank_calls == ["trained", "close loaders", "barrier", "destroy"]


def test_a_failed_run_closes_its_loaders_and_leaves_without_waiting_for_the_others(two_rank_calls, monkeypatch):
    def failing(args, context, closing):
        closing.callback(two_rank_calls.append, "close loaders")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(runner, "_run", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        runner.run(cli.run_config(["unused", "--device", "cpu"]))
    # no barrier: a rank that failed would leave the others waiting in it
    assert two_rank_calls == ["close loaders", "destroy"]


def test_a_training_run_closes_the_loaders_it_built(monkeypatch, tmp_path):
    closed = []
    monkeypatch.setattr(Loaders, "close", lambda self: closed.append(self.backend))
    status = cli.main(["--data-backend", "synthetic", str(tmp_path / "unused"), "--arch", "resnet18", "--wmul",
                       "0.125", "--image-size", "32", "-b", "2", "--epochs", "1", "--prof", "2", "--device", "cpu",
                       "--num-classes", "4", "--workspace", str(tmp_path / "ws"), "--no-checkpoints"])
    assert status == 0
    assert closed == ["synthetic"]


def test_closing_a_pytorch_loader_stops_the_workers_of_an_unfinished_pass(colour_data):
    loaders = get_loaders(LoaderOptions("pytorch", colour_data, 2, workers=1, image_size=32, device="cpu", val=False))
    batches = iter(loaders.train)
    next(batches)  # a pass left unfinished, as --prof leaves it
    assert multiprocessing.active_children(), "the pass should run a worker process"
    loaders.close()
    assert multiprocessing.active_children() == []
    with pytest.raises(StopIteration):
        next(batches)
    assert len(list(loaders.train)) == len(loaders.train)  # the loader still works for the next pass


def test_exit_process_flushes_what_was_written_and_keeps_the_status():
    script = textwrap.dedent("""
        import logging, sys
        from image_classification.distributed import exit_process
        logging.basicConfig(stream=sys.stdout, format="%(message)s", level=logging.INFO)
        sys.stdout.write("buffered line\\n")
        logging.getLogger("run").info("last log line")
        sys.stderr.write("to stderr\\n")
        exit_process(3)
        print("never reached")
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3
    assert done.stdout.splitlines() == ["buffered line", "last log line"]
    assert done.stderr == "to stderr\n"
