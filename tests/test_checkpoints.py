"""Checkpoints: the release's format, bare state_dicts, this project's own; recognition; errors; refusal of code."""
import os
import pathlib
import random

import numpy as np
import pytest
import torch
import torchvision

from image_classification import checkpoints
from image_classification.atomic_files import current_umask
from image_classification.checkpoints import CheckpointError, load_checkpoint, load_model_state, model_from_checkpoint
from image_classification.models import ARCHITECTURES, build_model
from tests.model_utils import meta_model
from pedconv import PEDConv2d


def release_checkpoint(model, path, **extra):
    """A checkpoint as the release saves it: DDP's 'module.' on every key, in {'epoch', 'arch', ...}."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.875)
    obj = {
        "epoch": 250,
        "arch": "resnet18",
        "state_dict": {f"module.{key}": value for key, value in model.state_dict().items()},
        "best_prec1": 74.1,
        "optimizer": optimizer.state_dict(),
        **extra,
    }
    torch.save(obj, path)
    return path


def test_release_checkpoint_loads_strictly_and_builds_a_pedconv_model_unasked(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet18", dynamic=True)
    path = release_checkpoint(model, tmp_path / "model_best.pth.tar")
    checkpoint = load_checkpoint(path)
    assert checkpoint.format == "release"
    assert checkpoint.arch == {"name": "resnet18", "dynamic": True, "wmul": 1.0, "num_classes": 1000}
    assert (checkpoint.epoch, checkpoint.best_prec1) == (250, pytest.approx(74.1))
    assert checkpoint.optimizer["param_groups"][0]["momentum"] == 0.875
    fresh = build_model("resnet18", dynamic=True)
    fresh.load_state_dict(checkpoint.state_dict, strict=True)
    rebuilt = model_from_checkpoint(checkpoint)  # no dynamic flag needed: told by the keys
    assert sum(isinstance(m, PEDConv2d) for m in rebuilt.modules()) == 16
    rebuilt_state = rebuilt.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(rebuilt_state[key], value), key


def test_bare_state_dicts_torchvision_and_wrapped_prefixes(tmp_path):
    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "tv.pth")
    checkpoint = load_checkpoint(tmp_path / "tv.pth")
    assert checkpoint.format == "state_dict"
    assert checkpoint.arch == {"name": "resnet18", "dynamic": False, "wmul": 1.0, "num_classes": 1000}
    model = model_from_checkpoint(checkpoint)
    assert torch.equal(model.fc.weight, reference.fc.weight)
    compiled_ddp = {f"module._orig_mod.{key}": value for key, value in reference.state_dict().items()}
    load_model_state(build_model("resnet18"), compiled_ddp)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_architecture_is_inferred_from_keys(arch):
    for dynamic in (False, True):
        for wmul in (1.0, 0.3):
            model = meta_model(arch, dynamic=dynamic, wmul=wmul, num_classes=7)
            state = {f"module.{key}": value for key, value in model.state_dict().items()}
            assert checkpoints.is_pedconv_state(state) == dynamic
            arch_info = checkpoints.infer_arch(state)
            assert (arch_info["name"], arch_info["dynamic"], arch_info["num_classes"]) == (arch, dynamic, 7)
            rebuilt = meta_model(arch, dynamic=dynamic, wmul=arch_info["wmul"], num_classes=7)
            shapes = {key: value.shape for key, value in model.state_dict().items()}
            assert {key: value.shape for key, value in rebuilt.state_dict().items()} == shapes


def test_unknown_keys_give_no_architecture(tmp_path):
    torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "other.pth")
    checkpoint = load_checkpoint(tmp_path / "other.pth")
    assert checkpoint.arch["name"] is None
    with pytest.raises(CheckpointError, match="cannot tell the architecture"):
        model_from_checkpoint(checkpoint)


def test_mismatch_message_lists_missing_unexpected_and_shapes_in_a_few_lines():
    dynamic_state = build_model("resnet18", dynamic=True, wmul=0.25, num_classes=10).state_dict()
    with pytest.raises(CheckpointError) as static_error:
        load_model_state(build_model("resnet18", wmul=0.25, num_classes=10), dynamic_state)
    text = str(static_error.value)
    assert text.splitlines()[0] == (
        "checkpoint does not fit the model (name=resnet18, dynamic=False, wmul=0.25, num_classes=10):")
    assert "unexpected in the checkpoint (192): layer1.0.conv1.attn.fc_share.weight," in text
    assert "(+189 more)" in text
    assert "the checkpoint is a PEDConv model, the model is static" in text
    assert len(text.splitlines()) <= 5

    with pytest.raises(CheckpointError) as shape_error:
        load_model_state(build_model("resnet18", dynamic=True, wmul=0.25), dynamic_state)
    text = str(shape_error.value)
    assert "shapes differ (2): fc.weight (10, 128) in the checkpoint, (1000, 128) in the model, fc.bias" in text
    assert "missing" not in text and "unexpected" not in text

    partial = {key: value for key, value in dynamic_state.items() if "decoder" not in key}
    with pytest.raises(CheckpointError, match=r"missing in the checkpoint \(64\): layer1\.0\.conv1\.attn\.decoder"):
        load_model_state(build_model("resnet18", dynamic=True, wmul=0.25, num_classes=10), partial)
    assert issubclass(CheckpointError, ValueError)


def test_a_pickle_that_needs_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}, "extra": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(tmp_path / "evil.pth")
    assert "refused: unpickling it would call " in str(error.value)
    assert "\n" not in str(error.value)
    assert not marker.exists()


def test_numpy_scalars_and_arrays_are_data(tmp_path):
    model = build_model("resnet18", wmul=0.25)
    torch.save({"state_dict": model.state_dict(), "best_prec1": np.float64(71.5), "epoch": 3,
                "note": np.arange(3)}, tmp_path / "np.pth")
    checkpoint = load_checkpoint(tmp_path / "np.pth")
    assert checkpoint.best_prec1 == 71.5 and isinstance(checkpoint.best_prec1, float)


@pytest.mark.parametrize("case, message", [
    ("missing", "no such checkpoint file"),
    ("directory", "is a directory"),
    ("text", "not a PyTorch checkpoint"),
    ("truncated", "not a PyTorch checkpoint"),
    ("tensor", "not a checkpoint: holds a Tensor"),
    ("dict", "not a checkpoint: holds a dict with keys ['a', 'b']"),
])
def test_unreadable_files_give_one_line_errors(tmp_path, case, message):
    path = tmp_path / "file.pth"
    if case == "directory":
        path.mkdir()
    elif case == "text":
        path.write_text("not a checkpoint\n")
    elif case == "truncated":
        torch.save({"w": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:300])
    elif case == "tensor":
        torch.save(torch.zeros(3), path)
    elif case == "dict":
        torch.save({"a": 1, "b": "x"}, path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert message in str(error.value)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_own_format_round_trip_with_optimizer_scaler_ema_and_rng(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet18", dynamic=True, wmul=0.25, num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    scaler = torch.amp.GradScaler("cpu", init_scale=128.0)
    ema = build_model("resnet18", dynamic=True, wmul=0.25, num_classes=10)
    rng = checkpoints.capture_rng()
    expected_next = (torch.rand(3), random.random(), np.random.rand())
    obj = checkpoints.make_checkpoint(torch.nn.parallel.DataParallel(model), 5, optimizer, scaler, 42.0, ema, rng)
    path = tmp_path / "checkpoint.pth.tar"
    checkpoints.save_checkpoint(obj, path)
    assert os.listdir(tmp_path) == ["checkpoint.pth.tar"]  # no temporary file left

    checkpoint = load_checkpoint(path)
    assert checkpoint.format == "pedconv"
    assert checkpoint.arch == model.arch == {"name": "resnet18", "dynamic": True, "wmul": 0.25, "num_classes": 10}
    assert (checkpoint.epoch, checkpoint.best_prec1) == (5, 42.0)
    assert not any(key.startswith("module.") for key in checkpoint.state_dict)
    rebuilt = model_from_checkpoint(checkpoint)
    rebuilt_state = rebuilt.state_dict()
    assert all(torch.equal(rebuilt_state[k], v) for k, v in model.state_dict().items())
    torch.optim.SGD(rebuilt.parameters(), lr=0.1, momentum=0.9).load_state_dict(checkpoint.optimizer)
    assert checkpoint.scaler["scale"] == 128.0
    load_model_state(build_model("resnet18", dynamic=True, wmul=0.25, num_classes=10), checkpoint.state_dict_ema)
    checkpoints.restore_rng(checkpoint.rng)
    assert torch.equal(torch.rand(3), expected_next[0])
    assert (random.random(), np.random.rand()) == expected_next[1:]


def test_a_failed_save_keeps_the_previous_file(tmp_path):
    path = tmp_path / "checkpoint.pth.tar"
    checkpoints.save_checkpoint({"epoch": 1}, path)
    assert path.stat().st_mode & 0o777 == 0o666 & ~current_umask()  # not mkstemp's private mode
    with pytest.raises(Exception):
        checkpoints.save_checkpoint({"epoch": 2, "bad": lambda: None}, path)
    assert os.listdir(tmp_path) == ["checkpoint.pth.tar"]
    assert torch.load(path, weights_only=True) == {"epoch": 1}
