"""Runs that never overwrite or mix each other's results: the demo's isolation, one workspace per run, refusal of a
finished workspace, a new report file per run, the report tool on a file with several runs; NVIDIA's report layout
(step numbering, summary keys, null keys); checkpoint names and recorded preprocessing; the console (--help, the
worker cap)."""
import json
import logging
import os
import re
from pathlib import Path

import pytest
import torch

import main as cli
from image_classification import report as report_tool
from image_classification.dllog import Report, read_report
from tests.data_utils import make_dataset

# Every key of NVIDIA's run summary (image_classification/logger.py: TrainingMetrics, ValidationMetrics("val"))
NVIDIA_SUMMARY_KEYS = ["train.loss", "train.compute_ips", "train.total_ips", "train.data_time", "train.compute_time",
                       "train.lr", "train.grad_scale", "val.top1", "val.top5", "val.loss", "val.compute_ips",
                       "val.total_ips", "val.data_time", "val.compute_latency", "val.compute_latency_at100",
                       "val.compute_latency_at99", "val.compute_latency_at95"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return make_dataset(root, {"a": 12, "b": 12}, {"a": 3, "b": 3}, size_range=(36, 44))


def tiny(data_root, workspace, *extra):
    """12 training steps of 2 epochs x 6 batches, 2 validation steps per epoch, a report line every 2 steps."""
    return [str(data_root), "--data-backend", "pytorch", "--arch", "resnet18", "--wmul", "0.125", "--image-size", "32",
            "-b", "4", "--epochs", "2", "--lr", "0.05", "--device", "cpu", "-j", "0", "--seed", "1", "-p", "2",
            "--workspace", str(workspace), "--raport-file", "raport.json", *extra]


def logs(path):
    return [e for e in read_report(path) if e["type"] == "LOG"]


def steps_of(entries, length):
    return [e["step"] for e in entries if isinstance(e["step"], list) and len(e["step"]) == length]


def test_report_layout_is_nvidias_line_by_line(data_root, tmp_path):
    workspace = tmp_path / "ws"
    assert cli.main(tiny(data_root, workspace, "--label-smoothing", "0.1", "--gather-checkpoints", "-1")) == 0
    entries = logs(workspace / "raport.json")
    assert entries[0]["step"] == "PARAMETER" and entries[0]["data"]["run.start"]
    assert entries[0]["data"]["run.continues"] is None
    # [epoch, iteration] from epoch 0, every --print-freq (2) of the 6 iterations
    assert steps_of(entries, 2) == [[0, 2], [0, 4], [0, 6], [1, 2], [1, 4], [1, 6]]
    # [epoch, last training iteration, validation iteration], every 2nd of the 2 validation iterations
    assert steps_of(entries, 3) == [[0, 6, 2], [1, 6, 2]]
    assert steps_of(entries, 1) == [[0], [1]]
    order = [e["step"] for e in entries]
    assert order.index([0, 6, 2]) < order.index([0]) < order.index([1, 2])  # an epoch's lines in NVIDIA's order
    summary = entries[-1]
    assert summary["step"] == []
    assert set(NVIDIA_SUMMARY_KEYS) <= set(summary["data"])
    assert all(summary["data"][key] is not None for key in NVIDIA_SUMMARY_KEYS)
    epochs = [e["data"] for e in entries if e["step"] in ([0], [1])]
    assert set(epochs[0]) == set(summary["data"])  # every key on every epoch line
    assert summary["data"]["val.top1"] == max(e["val.top1"] for e in epochs)
    assert summary["data"]["val.loss"] == min(e["val.loss"] for e in epochs)  # the lowest (NVIDIA's bug: highest)
    # val.loss is the training criterion (label smoothing 0.1 here), val.cross_entropy the plain loss
    assert all(e["val.loss"] != e["val.cross_entropy"] for e in epochs)
    # NVIDIA's checkpoint names: checkpoint_<epoch from 0>.pth.tar; -1 keeps all of them
    assert sorted(p.name for p in workspace.glob("checkpoint_*")) == ["checkpoint_0000.pth.tar",
                                                                       "checkpoint_0001.pth.tar"]
    saved = torch.load(workspace / "checkpoint_0001.pth.tar", weights_only=True)
    assert saved["epoch"] == 2 and saved["preprocessing"]["image_size"] == 32
    assert saved["preprocessing"]["interpolation"] == "bilinear" and saved["classes"] == ["a", "b"]


def test_iteration_lines_hold_the_means_since_the_previous_line(tmp_path):
    report = Report(str(tmp_path / "r.json"), print_freq=3)
    for iteration, loss in enumerate([1.0, 2.0, 6.0, 5.0], start=1):
        report.log((0, iteration), {"train.loss": loss, "train.lr": 0.1 * iteration})
    report.close()
    lines = [e for e in logs(tmp_path / "r.json") if e["step"] != "PARAMETER"]
    assert [e["step"] for e in lines] == [[0, 3]]
    assert lines[0]["data"] == {"train.loss": 3.0, "train.lr": pytest.approx(0.3)}


def test_training_only_run_writes_val_keys_as_null(data_root, tmp_path):
    workspace = tmp_path / "ws"
    assert cli.main(tiny(data_root, workspace, "--training-only", "--epochs", "1")) == 0
    entries = logs(workspace / "raport.json")
    assert steps_of(entries, 3) == []
    for data in (entries[-1]["data"], [e for e in entries if e["step"] == [0]][0]["data"]):
        for key in NVIDIA_SUMMARY_KEYS:
            assert key in data, key
            assert (data[key] is None) == key.startswith("val."), key


def test_workspace_refused_then_resumed_then_overwritten_and_reports_never_mixed(data_root, tmp_path, capsys):
    workspace = tmp_path / "ws"
    assert cli.main(tiny(data_root, workspace, "--run-epochs", "1")) == 0
    first_start = logs(workspace / "raport.json")[0]["data"]["run.start"]
    best_before = (workspace / "model_best.pth.tar").read_bytes()
    # a second run into a workspace holding a run's checkpoints: refused, one line naming both ways, nothing touched
    capsys.readouterr()
    assert cli.main(tiny(data_root, workspace)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--resume" in err and "--overwrite" in err
    assert (workspace / "model_best.pth.tar").read_bytes() == best_before
    assert [p.name for p in workspace.glob("*.json")] == ["raport.json"]
    # --resume continues the run and its report
    resume = ["--resume", str(workspace / "checkpoint.pth.tar")]
    assert cli.main(tiny(data_root, workspace, *resume)) == 0
    entries = logs(workspace / "raport.json")
    params = [e["data"] for e in entries if e["step"] == "PARAMETER"]
    assert len(params) == 2 and params[1]["run.continues"] == first_start
    assert steps_of(entries, 1) == [[0], [1]]
    (run,) = report_tool.load_runs(str(workspace / "raport.json"))  # one run, resumed
    assert sorted(run.epochs) == [0, 1]
    # --overwrite replaces it: old checkpoints removed first, old report renamed after its start time
    assert cli.main(tiny(data_root, workspace, "--overwrite", "--epochs", "1", "--training-only")) == 0
    kept = [p.name for p in workspace.glob("raport-*.json")]
    assert len(kept) == 1 and re.fullmatch(r"raport-\d{8}-\d{6}\.json", kept[0])
    assert len(logs(workspace / kept[0])) == len(entries)  # the previous report whole
    assert steps_of(logs(workspace / "raport.json"), 1) == [[0]]
    assert not (workspace / "model_best.pth.tar").exists()  # the old run's best is not passed off as this run's


def test_default_workspace_is_new_per_run_and_ignored_by_git(data_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = cli.parse_args([str(data_root)])
    assert re.fullmatch(r"runs/resnet50-\d{8}-\d{6}", args.workspace)
    assert "/runs/" in (Path(__file__).resolve().parents[1] / ".gitignore").read_text().split()
    argv = tiny(data_root, "x", "--epochs", "1", "--prof", "1", "--training-only")
    argv = argv[:argv.index("--workspace")] + argv[argv.index("--workspace") + 2:]
    assert cli.main(argv) == 0
    (folder,) = (tmp_path / "runs").iterdir()
    assert folder.name.startswith("resnet18-") and (folder / "raport.json").exists()
    assert (folder / "checkpoint.pth.tar").exists()


def test_demo_needs_no_data_flag_and_replaces_only_the_previous_demo(tmp_path, monkeypatch, capsys, caplog):
    args = cli.parse_args([])
    assert args.demo and args.workspace == os.path.join("runs", "demo") and args.data_backend == "pytorch"
    assert cli.parse_args(["--epochs", "3"]).demo  # other flags still apply to the demo
    for flags in (["--data-backend", "synthetic"], ["--image-size", "32"], ["--num-classes", "5"]):
        assert cli.main(flags) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "python main.py" in err and flags[0] in err and "data folder" in err
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    quick = ["--epochs", "1", "--prof", "1", "-b", "8", "--wmul", "0.125"]
    assert cli.main(quick) == 0
    demo = tmp_path / "runs" / "demo"
    first = (demo / "checkpoint.pth.tar").stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert cli.main(quick) == 0
    assert any("replacing the previous demo run" in r.getMessage() for r in caplog.records)
    assert (demo / "checkpoint.pth.tar").stat().st_mtime_ns != first
    assert [p.name for p in demo.glob("*.json")] == ["raport.json"]


def _write_run(path, epochs, *, resume=False, print_freq=1):
    report = Report(str(path), print_freq, resume=resume)
    report.parameters({"arch": "resnet18", "dynamic": True, "wmul": 0.25, "resume": "ck" if resume else None})
    for epoch in epochs:
        for iteration in (1, 2):
            report.log((epoch, iteration), {"train.loss": 1.0 / (epoch + iteration), "train.lr": 0.1})
        report.log([epoch], {"train.loss": 1.0, "val.top1": 10.0 * (epoch + 1), "val.top5": 50.0})
    report.close()


def test_report_tool_tells_runs_apart(tmp_path, capsys):
    # an old-style file that two runs appended to (as this project wrote before): two runs, never spliced
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    _write_run(one, range(0, 8))
    _write_run(two, range(0, 2))
    spliced = tmp_path / "spliced.json"
    spliced.write_text(one.read_text() + two.read_text())
    runs = report_tool.load_runs(str(spliced))
    assert [sorted(run.epochs) for run in runs] == [list(range(8)), [0, 1]]
    assert runs[1].per_epoch("val.top1")[1] == [10.0, 20.0]  # the new run's best is its own 20, not the old 80
    status = report_tool.main([str(spliced), "--out", str(tmp_path / "all")])
    out = capsys.readouterr().out
    assert status == 0 and "run 1 of 2" in out and "run 2 of 2" in out
    table = (tmp_path / "all" / "summary.md").read_text()
    assert "#1" in table and "#2" in table and "| 80.00 |" in table and "| 20.00 |" in table
    assert report_tool.main([str(spliced), "--out", str(tmp_path / "last"), "--run", "-1"]) == 0
    out = capsys.readouterr().out
    assert "run 2 of 2" in out and "run 1 of 2" not in out
    assert "80.00" not in (tmp_path / "last" / "summary.md").read_text()
    assert report_tool.main([str(spliced), "--out", str(tmp_path / "x"), "--run", "3"]) == 2
    # a resumed run continuing its report is one run
    resumed = tmp_path / "resumed.json"
    _write_run(resumed, [0])
    _write_run(resumed, [1], resume=True)
    (run,) = report_tool.load_runs(str(resumed))
    assert sorted(run.epochs) == [0, 1] and run.steps == [1, 2, 3, 4]


def test_classify_uses_the_checkpoints_image_size_and_warns_on_override(data_root, tmp_path, capsys, caplog):
    import classify

    workspace = tmp_path / "ws"
    assert cli.main(tiny(data_root, workspace, "--epochs", "1", "--prof", "1", "--training-only")) == 0
    image = next((data_root / "val" / "a").iterdir())
    checkpoint = str(workspace / "checkpoint.pth.tar")
    results = {}
    for size in (None, "32", "64"):
        capsys.readouterr()
        caplog.clear()
        argv = ["--pretrained-from-file", checkpoint, "--json", str(image)] + (["--image-size", size] if size else [])
        with caplog.at_level(logging.WARNING):
            assert classify.main(argv) == 0
        warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
        results[size] = (json.loads(capsys.readouterr().out), warnings)
    assert results[None][0] == results["32"][0]
    assert results[None][1] == "" and results["32"][1] == ""
    assert "--image-size 64 overrides" in results["64"][1] and "(32)" in results["64"][1]


def test_help_shows_every_flag_with_a_help_text_and_its_default():
    parser = cli.build_parser()
    text = parser.format_help()
    for action in parser._actions:
        if action.help == "==SUPPRESS==" or not action.option_strings or action.dest == "help":
            continue
        assert action.help, action.option_strings
    assert "--epochs EPOCHS       epochs of the whole schedule (default: 90)" in text
    assert "(default: dali-cpu)" in text and "(default: off)" in text and "runs/<arch>-<date>-<time>" in text
    groups = [g.title for g in parser._action_groups]
    assert groups[-4:] == ["data", "model", "optimization", "run"]


def test_workers_above_the_usable_cores_are_lowered_with_one_line(caplog):
    from image_classification.runner import _banner, _usable_cores

    args = cli.parse_args(["/data", "-j", "999", "--device", "cpu"])
    with caplog.at_level(logging.INFO):
        _banner(args, rank=0, world_size=1)
    assert args.workers == _usable_cores()
    lines = [r.getMessage() for r in caplog.records]
    assert sum("-j/--workers 999 lowered" in line for line in lines) == 1
    banner = [line for line in lines if line.startswith("run: ")][0]
    for part in ("device cpu", "precision fp32", "via dali-cpu", f"{_usable_cores()} workers", "world size 1",
                 "workspace"):
        assert part in banner, part
    caplog.clear()
    other = cli.parse_args(["/data", "-j", "999"])
    with caplog.at_level(logging.INFO):
        _banner(other, rank=1, world_size=2)  # another rank: lowered too, but silently
    assert other.workers == _usable_cores() and not [r for r in caplog.records if "lowered" in r.getMessage()]


def test_several_processes_without_a_gpu_say_so_first(caplog, monkeypatch):
    from image_classification.runner import _banner

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = cli.parse_args(["/data", "-j", "1"])
    with caplog.at_level(logging.INFO):
        _banner(args, rank=0, world_size=4)
    assert caplog.records[0].getMessage().startswith("no GPU on this machine: running 4 CPU processes")


def test_multiproc_gives_every_rank_one_default_workspace():
    import multiproc

    args = multiproc.with_run_workspace("./main.py", ["/data", "-a", "resnet18", "-j", "2"])
    assert args[:4] == ["/data", "-a", "resnet18", "-j"] and args[-2] == "--workspace"
    assert re.fullmatch(r"runs/resnet18-\d{8}-\d{6}", args[-1])
    assert multiproc.with_run_workspace("main.py", ["/d", "--arch=resnet34"])[-1].startswith("runs/resnet34-")
    assert multiproc.with_run_workspace("main.py", ["/d", "--works", "mine"]) == ["/d", "--works", "mine"]
    assert multiproc.with_run_workspace("other.py", ["/d"]) == ["/d"]


def test_console_epoch_line_and_summary():
    from image_classification.dllog import epoch_line, summary_lines

    big = {"val.top1": 100.0, "val.top5": 100.0, "train.loss": 12345.6789, "val.loss": 12345.6789,
           "val_ema.top1": 100.0, "train.total_ips": 123456.7, "train.lr": 0.1}
    line = epoch_line(249, big, 123456.0)
    assert line.startswith("epoch 249: top-1 100.00 %, top-5 100.00 %, loss 12345.6789") and len(line) < 160
    epochs = {0: {"val.top1": 50.0, "val.top5": 90.0, "train.loss": 2.0, "val.loss": 1.5},
              1: {"val.top1": 70.0, "val.top5": 95.0, "train.loss": 1.0, "val.loss": 1.7},
              2: {"val.top1": 60.0, "val.top5": 96.0, "train.loss": 0.5, "val.loss": 1.2}}
    lines = summary_lines(epochs, {"train.total_ips": 10.0})
    assert lines[0].startswith("best top-1 70.00 % (top-5 95.00 %) at epoch 1, with training loss 1.0000 and "
                               "validation loss 1.7000")
    assert lines[1] == "lowest validation loss 1.2000 at epoch 2"
    assert lines[2].startswith("lowest training loss 0.5000")


def test_progress_bar_only_on_a_terminal(tmp_path, monkeypatch):
    import io
    import sys

    from dataloading import progress

    for terminal in (False, True):
        stream = io.StringIO()
        monkeypatch.setattr(sys, "stdout", stream)
        monkeypatch.setattr(progress, "on_terminal", lambda stream=None, terminal=terminal: terminal)
        report = Report(None, print_freq=10)
        for iteration, _ in enumerate(report.track([1, 2, 3], 3, "epoch 0"), start=1):
            report.log((0, iteration), {"train.loss": 1.0, "train.total_ips": 5.0})
        report.close()
        text = stream.getvalue()
        assert ("\r" in text and "/3 [" in text) == terminal, text
