"""The engine's typed entry point: image_classification.run(RunConfig) -> RunResult, against the report it writes;
RunConfig's fields against main.py's flags; main.run_config's order of precedence."""
import dataclasses
import typing

import pytest

import image_classification
import main as cli
from image_classification import runner
from image_classification.dllog import read_report
from image_classification.engine import RunConfig, RunResult

NOT_FLAGS = {"demo", "replace_demo", "recipe"}  # set by main.py and launch.py, not by a flag


def tiny(tmp_path, name, *extra, **settings):
    """A synthetic PEDConv run of two epochs of two steps, in ``tmp_path / name``."""
    return cli.run_config(["synthetic", *extra], data_backend="synthetic", arch="resnet18", dynamic=True,
                          wmul=0.125, image_size=32, batch_size=4, epochs=2, prof=2, num_classes=4, device="cpu",
                          workers=0, seed=3, lr=0.05, print_freq=1, workspace=str(tmp_path / name),
                          raport_file="raport.json", **settings)


def report_lines(path):
    logs = [e for e in read_report(path) if e["type"] == "LOG"]
    epochs = {e["step"][0]: e["data"] for e in logs if isinstance(e["step"], list) and len(e["step"]) == 1}
    summary = [e["data"] for e in logs if e["step"] == []]
    return logs, epochs, summary


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    config = tiny(folder, "ws")
    return config, image_classification.run(config)


def test_run_returns_what_its_report_says(trained):
    config, result = trained
    assert isinstance(result, RunResult) and result.status == 0
    logs, epochs, summary = report_lines(result.report)
    assert result.report == str(config.workspace) + "/raport.json"
    assert result.epochs == epochs and sorted(epochs) == [0, 1]
    assert [result.summary] == summary
    assert result.best_top1 == max(e["val.top1"] for e in epochs.values()) == summary[0]["val.top1"]
    assert result.throughput == summary[0]["train.total_ips"] > 0
    params = [e["data"] for e in logs if e["step"] == "PARAMETER"][0]
    assert {k: params[k] for k in result.config.parameters()} == result.config.parameters()
    assert result.workspace == config.workspace
    assert sorted(p.rsplit("/", 1)[1] for p in result.checkpoints) == ["checkpoint.pth.tar", "model_best.pth.tar"]


def test_run_adjusts_a_copy_of_its_config(trained):
    config, result = trained
    assert config.interpolation is None  # the caller's config is left as given
    assert result.config.interpolation == "bilinear"  # the run's choice, also in its report
    assert dataclasses.replace(result.config, interpolation=None, workers=config.workers) == config


def test_evaluating_returns_the_measured_top1_and_no_checkpoints(trained, tmp_path):
    _, training = trained
    checkpoint = [p for p in training.checkpoints if p.endswith("/checkpoint.pth.tar")][0]
    result = image_classification.run(tiny(tmp_path, "eval", evaluate=True, pretrained_weights=checkpoint))
    _, epochs, summary = report_lines(result.report)
    assert result.status == 0 and result.checkpoints == []
    assert result.epochs == epochs and list(epochs) == [0] and [result.summary] == summary
    assert result.best_top1 == epochs[0]["val.top1"]
    assert result.throughput == summary[0]["val.total_ips"] > 0


def test_the_entry_point_and_types_are_the_engines():
    assert image_classification.run is runner.run
    assert image_classification.RunConfig is RunConfig and image_classification.RunResult is RunResult
    with pytest.raises(AttributeError):
        image_classification.no_such_name


def test_run_config_has_a_field_of_the_right_type_per_flag():
    parser = cli.build_parser()
    dests = {action.dest: action for action in parser._actions if action.dest != "help"}
    fields = {field.name: field for field in dataclasses.fields(RunConfig)}
    assert set(fields) == set(dests) | NOT_FLAGS
    hints = typing.get_type_hints(RunConfig)
    for name, action in dests.items():
        kinds = set(typing.get_args(hints[name])) or {hints[name]}
        if action.type in (int, float):
            assert action.type in kinds, name
        elif action.nargs == 0 or action.type is not None and action.type.__name__ == "_true_or_false":
            assert bool in kinds, name  # switches
        else:
            assert str in kinds, name


def test_run_config_takes_settings_over_defaults_and_flags_over_settings(tmp_path):
    config = cli.run_config(["data", "--lr", "0.5", "-b", "3"], lr=0.2, arch="resnet18", epochs=7)
    assert (config.data, config.lr, config.batch_size, config.arch, config.epochs) == ("data", 0.5, 3, "resnet18", 7)
    assert config.momentum == cli.build_parser().get_default("momentum") and not config.demo
    assert config.workspace.startswith("runs/resnet18-")  # the default workspace names the chosen architecture
    with pytest.raises(TypeError, match="batchsize"):
        cli.run_config(["data"], batchsize=3)
