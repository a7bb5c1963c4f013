"""A drop-in for NVIDIA DLE ConvNets users: launch.py's recipes in every mode on the CPU, their ResNet-50 checkpoints
(keys from their models/resnet.py, checked against an independent forward pass and against torchvision), torchvision
weights, a PEDConv model started from a static one, and each of their flags that main.py had lacked."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision

import checkpoint2model
import classify
import export_onnx
import launch
import main as cli
from image_classification import affinity, checkpoints, runner
from image_classification.dllog import read_report
from image_classification.models import last_batchnorms
from image_classification.optim import build_optimizer
from tests.data_utils import make_dataset
from tests.nvidia_layout import (nvidia_optimizer_state, nvidia_parameter_names, nvidia_resnet50_forward,
                                 random_nvidia_resnet50)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), {"a": 8, "b": 8}, {"a": 3, "b": 3}, size_range=(36, 48))


@pytest.fixture(scope="module")
def nvidia(tmp_path_factory):
    """Their ResNet-50 checkpoint as their training writes it (DDP's module. prefix, optimizer, epoch, best_prec1),
    the same without optimizer, and their checkpoint2model.py's output (bare, unprefixed, their names)."""
    folder = tmp_path_factory.mktemp("nvidia")
    state = random_nvidia_resnet50()
    optimizer, buffers = nvidia_optimizer_state(state)
    prefixed = {"module." + key: value for key, value in state.items()}
    files = {"full": folder / "checkpoint_0002.pth.tar", "weights_only": folder / "no_optimizer.pth.tar",
             "bare": folder / "nvidia_resnet50.pth"}
    torch.save({"epoch": 3, "best_prec1": 12.5, "state_dict": prefixed, "optimizer": optimizer}, files["full"])
    torch.save({"epoch": 3, "best_prec1": 12.5, "state_dict": prefixed}, files["weights_only"])
    torch.save(state, files["bare"])
    return {"state": state, "buffers": buffers, **files}


def run_main(argv):
    torch.manual_seed(0)
    return cli.main([str(a) for a in argv])


def tiny(data_root, workspace, *extra):
    return [data_root, "--data-backend", "pytorch", "--arch", "resnet18", "--wmul", "0.125", "--image-size", "32",
            "-b", "4", "--device", "cpu", "-j", "0", "--seed", "3", "-p", "1", "--workspace", workspace, "--raport-file",
            "raport.json", *extra]


def report_lines(path):
    logs = [entry for entry in read_report(path) if entry["type"] == "LOG"]
    params = [entry["data"] for entry in logs if entry["step"] == "PARAMETER"]
    steps = [entry for entry in logs if isinstance(entry["step"], list)]
    return params, [e for e in steps if len(e["step"]) == 2], [e for e in steps if len(e["step"]) == 3], \
        [e for e in steps if len(e["step"]) == 1]


# ----------------------------------------------------------------------------------------------------------------
# NVIDIA's checkpoints and torchvision's weights


def test_nvidia_resnet50_checkpoints_load_and_give_their_logits(nvidia):
    images = torch.randn(2, 3, 64, 64)
    expected = nvidia_resnet50_forward(nvidia["state"], images)
    for kind in ("full", "weights_only", "bare"):
        checkpoint = checkpoints.load_checkpoint(nvidia[kind])
        assert checkpoint.arch == {"name": "resnet50", "dynamic": False, "wmul": 1.0, "num_classes": 1000}, kind
        assert not [key for key in checkpoint.state_dict if key.startswith("layers.")]
        if kind == "full":
            model = checkpoints.model_from_checkpoint(checkpoint).eval()
            with torch.no_grad():
                torch.testing.assert_close(model(images), expected, rtol=1e-4, atol=1e-4)
        else:
            assert checkpoint.state_dict.keys() == model.state_dict().keys()


def test_checkpoint2model_writes_torchvision_names_that_torchvision_loads(nvidia, tmp_path, capsys):
    out = tmp_path / "weights.pth"
    assert checkpoint2model.main(["--checkpoint-path", str(nvidia["full"]), "--weight-path", str(out)]) == 0
    state = torch.load(out, weights_only=True)
    assert "layer4.2.bn3.running_var" in state and not any(key.startswith("layers.") for key in state)
    reference = torchvision.models.resnet50()
    reference.load_state_dict(state)  # strict: torchvision's own names and shapes
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference.eval()(images)
        torch.testing.assert_close(expected, nvidia_resnet50_forward(nvidia["state"], images), rtol=1e-4, atol=1e-4)
        # and torchvision's ResNet-50 weights (this file is one) load here with torchvision's logits
        ours = checkpoints.model_from_checkpoint(checkpoints.load_checkpoint(out)).eval()
        torch.testing.assert_close(ours(images), expected, rtol=1e-5, atol=1e-5)


def test_their_optimizer_state_lands_on_the_same_parameters(nvidia):
    checkpoint = checkpoints.load_checkpoint(nvidia["full"])
    model = checkpoints.model_from_checkpoint(checkpoint)
    optimizer = build_optimizer(model, "sgd", 0.1, 0.875, 3e-5)
    assert checkpoints.load_foreign_optimizer_state(optimizer, model, checkpoint) == 161  # every parameter
    by_our_name = checkpoints.from_nvidia_names(nvidia["buffers"])
    for name, param in model.named_parameters():
        assert torch.equal(optimizer.state[param]["momentum_buffer"], by_our_name[name]), name
    assert [group["weight_decay"] for group in optimizer.param_groups] == [3e-5, 0.0]  # our groups stay ours
    rmsprop = build_optimizer(model, "rmsprop", 0.1, 0.9, 3e-5)
    assert checkpoints.load_foreign_optimizer_state(rmsprop, model, checkpoint) == 0  # SGD state means nothing there
    assert len(nvidia_parameter_names(nvidia["state"])) == 161


def test_main_resumes_and_starts_from_nvidia_checkpoints(nvidia, data_root, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    common = ["--arch", "resnet50", "-b", "2", "--prof", "1", "--training-only", "--epochs", "4"]
    workspace = tmp_path / "resumed"
    assert run_main(tiny(data_root, workspace, *common, "--resume", nvidia["full"])) == 0
    assert "optimizer state of 161 of 161 parameters kept" in caplog.text
    resumed = checkpoints.load_checkpoint(workspace / "checkpoint.pth.tar")
    assert resumed.epoch == 4 and resumed.arch["name"] == "resnet50" and resumed.arch["num_classes"] == 1000
    caplog.clear()
    assert run_main(tiny(data_root, tmp_path / "no_optimizer", *common, "--resume", nvidia["weights_only"])) == 0
    assert "holds no optimizer state: the optimizer starts afresh" in caplog.text
    assert checkpoints.load_checkpoint(tmp_path / "no_optimizer" / "checkpoint.pth.tar").epoch == 4
    evaluated = tmp_path / "evaluated"
    assert run_main(tiny(data_root, evaluated, "--arch", "resnet50", "-b", "3", "--evaluate",
                         "--pretrained-from-file", nvidia["bare"])) == 0
    _, _, val_steps, epochs = report_lines(evaluated / "raport.json")
    assert val_steps and epochs[-1]["data"]["val.images"] == 6
    # their README's evaluation of a checkpoint: --evaluate --epochs 1 --resume (their code refuses it: epoch 3 >= 1)
    assert run_main(tiny(data_root, tmp_path / "resume_evaluated", "--arch", "resnet50", "-b", "3", "--evaluate",
                         "--epochs", "1", "--resume", nvidia["full"])) == 0
    assert not list((tmp_path / "resume_evaluated").glob("*.pth.tar"))


def test_classify_and_export_onnx_read_an_nvidia_checkpoint(nvidia, tmp_path, capsys):
    make_dataset(tmp_path / "one", {"a": 1}, {"a": 1})
    image = next((tmp_path / "one" / "val" / "a").glob("*.jpg"))
    # NVIDIA's README command line (plus --image-size and --json)
    assert classify.main(["--arch", "resnet50", "--pretrained-from-file", str(nvidia["full"]), "--precision", "FP32",
                          "--image", str(image), "--cpu", "--image-size", "32", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with torch.no_grad():
        logits = nvidia_resnet50_forward(nvidia["state"], classify.load_images([str(image)], 32, "bilinear"))
    assert [entry["class"] for entry in result["top"]] == logits.topk(5).indices[0].tolist()
    onnx_file = tmp_path / "nvidia.onnx"
    assert export_onnx.main(["--pretrained-from-file", str(nvidia["bare"]), "--image-size", "32", "-o",
                             str(onnx_file), "--check", "--check-batches", "2"]) == 0
    assert onnx_file.stat().st_size > 90e6  # the full ResNet-50's weights


@pytest.fixture(scope="module")
def torchvision_resnet18(tmp_path_factory):
    torch.manual_seed(5)
    model = torchvision.models.resnet18()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("torchvision") / "resnet18.pth"
    torch.save(model.state_dict(), path)
    return model.eval(), path


def test_torchvision_weights_load_with_their_logits(torchvision_resnet18):
    reference, path = torchvision_resnet18
    checkpoint = checkpoints.load_checkpoint(path)
    assert checkpoint.arch == {"name": "resnet18", "dynamic": False, "wmul": 1.0, "num_classes": 1000}
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(checkpoints.model_from_checkpoint(checkpoint).eval()(images), reference(images), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Static -> PEDConv


def test_a_static_checkpoint_starts_a_pedconv_model(torchvision_resnet18, data_root, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    _, path = torchvision_resnet18
    args = cli.parse_args([str(data_root), "--arch", "resnet18", "--dynamic", "--pretrained-from-file", str(path)])
    checkpoint = runner._initial_weights(args)
    model = runner._build_model(args, 1000, checkpoint)
    static = torch.load(path, weights_only=True)
    own = model.state_dict()
    for key, value in static.items():  # every W0, BatchNorm (statistics too), stem, shortcut, classifier
        assert torch.equal(own[key], value), key
    gates = checkpoints.gate_generator_keys(model)
    assert len(gates) == 16 * 12 and set(own) == set(static) | set(gates)
    for key in gates:  # the release's initialization: N(0, 0.01^2), zero bias
        if key.endswith("bias"):
            assert not own[key].any(), key
        else:
            assert 0.003 < own[key].std().item() < 0.03, key
    lines = [record.getMessage() for record in caplog.records if "is a static model" in record.getMessage()]
    assert len(lines) == 1 and "W0" in lines[0] and "192 tensors" in lines[0]
    # the same through main.py (evaluation: no training to move the weights)
    caplog.clear()
    workspace = tmp_path / "eval"
    assert run_main([data_root, "--arch", "resnet18", "--dynamic", "--pretrained-from-file", path, "--evaluate",
                     "-b", "3", "--image-size", "32", "--device", "cpu", "-j", "0", "--workspace", workspace]) == 0
    assert "is a static model" in caplog.text


# ----------------------------------------------------------------------------------------------------------------
# launch.py


def launch_run(data_root, workspace, mode, *extra):
    argv = ["--model", "pedconv-resnet18", "--precision", "FP32", "--mode", mode, "--platform", "CPU", data_root,
            "--epochs", "1", "--prof", "2", "-b", "4", "--image-size", "32", "--wmul", "0.125", "-j", "0",
            "--workspace", workspace, "--raport-file", "raport.json", *extra]
    torch.manual_seed(0)
    return launch.main([str(a) for a in argv])


@pytest.mark.parametrize("mode", ["convergence", "benchmark_training", "benchmark_training_short",
                                  "benchmark_inference", "evaluate"])
def test_launch_every_mode_on_the_cpu(data_root, tmp_path, mode):
    workspace = tmp_path / mode
    assert launch_run(data_root, workspace, mode) == 0
    params, train_steps, val_steps, epochs = report_lines(workspace / "raport.json")
    recipe = params[0]
    # the authors' recipe under the command line's flags
    expected = dict(arch="resnet18", dynamic=True, lr=0.512, optimizer_batch_size=512, mixup=0.2, label_smoothing=0.1,
                    lr_schedule="cosine", warmup=8, momentum=0.875, weight_decay=3.0517578125e-05,
                    augmentation="autoaugment", device="cpu", epochs=1, batch_size=4, wmul=0.125)
    assert {key: recipe[key] for key in expected} == expected
    assert recipe["recipe"].startswith(f"pedconv-resnet18/CPU/FP32/{mode}")
    training = mode in ("convergence", "benchmark_training", "benchmark_training_short")
    validating = mode in ("convergence", "benchmark_inference", "evaluate")
    # iteration lines come every --print-freq iterations, as NVIDIA's: at 20, this 2-iteration run writes none
    lines_per_iteration = recipe["print_freq"] == 1
    assert len(train_steps) == (2 if training and lines_per_iteration else 0)
    assert bool(val_steps) == (validating and lines_per_iteration) and len(epochs) == 1
    assert (epochs[0]["data"]["val.top1"] is not None) == validating
    assert recipe["data_backend"] == ("synthetic" if mode == "benchmark_training_short" else "pytorch")
    assert recipe["print_freq"] == (20 if mode in ("convergence", "evaluate") else 1)
    assert bool(list(workspace.glob("*.pth.tar"))) == (mode == "convergence")


def test_nvidia_readme_command_line_runs_unchanged_given_a_data_path(data_root, tmp_path):
    command = ["--model", "resnet50", "--precision", "AMP", "--mode", "convergence", "--platform", "DGXA100",
               str(data_root), "--workspace", str(tmp_path), "--raport-file", "raport.json"]
    args = launch.build_args(command)
    expected = dict(arch="resnet50", dynamic=False, batch_size=256, optimizer_batch_size=2048, lr=2.048, amp=True,
                    static_loss_scale=128, memory_format="nhwc", workers=10, prefetch=4, epochs=250, print_freq=20,
                    gpu_affinity="socket_unique_contiguous", num_classes=1000, save_checkpoints=True, evaluate=False,
                    training_only=False, mixup=0.2, data_backend="pytorch",
                    conv_init="fan_in", model_config=None)  # their ResNet's default init
    assert {key: getattr(args, key) for key in expected} == expected
    # and it runs (narrowed to one step of each phase on small images); AMP is bfloat16 on this CPU
    env = dict(os.environ, OMP_NUM_THREADS="1")
    narrowed = ["--epochs", "1", "--prof", "1", "-b", "2", "--image-size", "32", "-j", "1"]
    result = subprocess.run([sys.executable, str(ROOT / "launch.py"), *command, *narrowed], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--gpu-affinity socket_unique_contiguous: " in result.stdout
    assert checkpoints.load_checkpoint(tmp_path / "checkpoint.pth.tar").state_dict["fc.weight"].shape == (1000, 2048)


@pytest.mark.parametrize("argv, message", [
    (["--model", "resnet50", "--precision", "TF32", "--mode", "convergence", "--platform", "CPU", "DATA"],
     "--model resnet50 has no TF32 recipe on CPU; its precisions there: AMP, FP32"),
    (["--model", "resnet18", "--precision", "AMP", "--mode", "convergence", "--platform", "CPU", "DATA"],
     "unknown --model 'resnet18'; valid: resnet50, pedconv-resnet18, pedconv-resnet50, resnext101-32x4d, "
     "se-resnext101-32x4d"),
    (["--model", "resnet50", "--precision", "AMP", "--mode", "train", "--platform", "CPU", "DATA"],
     "unknown --mode 'train'"),
    (["--model", "resnet50", "--precision", "AMP", "--mode", "convergence", "--platform", "CPU", "DATA",
      "--bogus", "1"], "unrecognized arguments: --bogus 1"),
    (["--model", "resnet50", "--precision", "AMP", "--mode", "convergence", "DATA"], "--platform required"),
])
def test_launch_bad_choices_are_one_line_errors(argv, message, data_root, capsys):
    assert launch.main([str(data_root) if a == "DATA" else a for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_cpu_platform_workers_come_from_the_core_count(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert launch.auto_workers() == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert launch.auto_workers() == 1


def test_every_config_recipe_names_only_main_options():
    config = launch.read_config(launch.default_config_path())
    known = {action.dest for action in cli.build_parser()._actions}
    for model, platforms in config["models"].items():
        for platform, precisions in platforms.items():
            for precision in precisions:
                for mode in config["mode"]:
                    settings = launch.recipe(config, model, platform, precision, mode)
                    assert set(settings) <= known, (model, platform, precision, mode)
                    if model.startswith("pedconv"):
                        assert settings["lr"] == pytest.approx(settings["optimizer_batch_size"] / 1000)


# ----------------------------------------------------------------------------------------------------------------
# NVIDIA's flags


def test_every_nvidia_flag_parses():
    args = cli.parse_args(
        "/d --data-backend dali-cpu --interpolation bicubic -a resnet50 -j 3 --prefetch 4 --epochs 9 --run-epochs 2 "
        "--early-stopping-patience 4 --image-size 160 -b 32 --optimizer-batch-size 256 --learning-rate 0.3 "
        "--lr-schedule linear --end-lr 0.001 --warmup 2 --label-smoothing 0.1 --mixup 0.2 --optimizer rmsprop "
        "--momentum 0.8 --weight-decay 1e-5 --bn-weight-decay --rmsprop-alpha 0.8 --rmsprop-eps 0.01 --nesterov "
        "--print-freq 7 --resume r.pth --static-loss-scale 64 --prof 5 --amp --seed 1 --gather-checkpoints 2 "
        "--raport-file r.json --evaluate --training-only --no-checkpoints --jit script --checkpoint-filename c.pth "
        "--workspace ws --memory-format nhwc --use-ema 0.999 --augmentation autoaugment "
        "--gpu-affinity socket_unique_interleaved --topk 3 --num_classes 10 --last_bn_0_init True --conv_init fan_in "
        "--pretrained-from-file w.pth --pretrained --trt False --fused_se True".split())
    expected = dict(data_backend="dali-cpu", interpolation="bicubic", arch="resnet50", workers=3, prefetch=4, epochs=9,
                    run_epochs=2, early_stopping_patience=4, image_size=160, batch_size=32, optimizer_batch_size=256,
                    lr=0.3, lr_schedule="linear", end_lr=0.001, warmup=2, label_smoothing=0.1, mixup=0.2,
                    optimizer="rmsprop", momentum=0.8, weight_decay=1e-5, bn_weight_decay=True, rmsprop_alpha=0.8,
                    rmsprop_eps=0.01, nesterov=True, print_freq=7, resume="r.pth", static_loss_scale=64, prof=5,
                    amp=True, seed=1, gather_checkpoints=2, raport_file="r.json", evaluate=True, training_only=True,
                    save_checkpoints=False, jit="script", checkpoint_filename="c.pth", workspace="ws",
                    memory_format="nhwc", use_ema=0.999, augmentation="autoaugment",
                    gpu_affinity="socket_unique_interleaved", topk=3, num_classes=10, zero_init_last_bn=True,
                    conv_init="fan_in", pretrained_weights="w.pth", pretrained=True, trt="False", fused_se="True")
    assert {key: getattr(args, key) for key in expected} == expected
    assert cli.parse_args(["/d", "--last_bn_0_init", "False"]).zero_init_last_bn is False  # their type=bool said True
    assert cli.parse_args(["/d"]).zero_init_last_bn is False
    assert cli.parse_args(["/d", "--zero-init-last-bn"]).zero_init_last_bn


@pytest.mark.parametrize("extra, message", [
    (["--pretrained"], "--pretrained downloads NVIDIA's weights from NGC"),
    (["--trt", "True"], "--trt: not applicable to these models"),
    (["--fused_se", "False"], "--fused_se: not applicable to these models"),
    (["--dynamic", "--jit", "script"], "--jit script: PEDConv layers do not compile with TorchScript"),
    (["--jit", "script", "--compile"], "--jit script and --compile exclude each other"),
    (["--early-stopping-patience", "2", "--training-only"], "--early-stopping-patience needs validation"),
    (["-c", "fanin", "--conv_init", "fan_out"], "-c fanin initializes convs fan_in, --conv_init says fan_out"),
])
def test_flags_that_cannot_apply_are_one_line_errors(data_root, tmp_path, capsys, extra, message):
    assert run_main(tiny(data_root, tmp_path / "ws", "--epochs", "1", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    if extra == ["--pretrained"]:
        assert "--pretrained-from-file" in err[0]
    assert not list((tmp_path / "ws").glob("*.pth.tar"))


def test_conv_init_and_last_bn_0_init_set_the_initialization(data_root):
    def built(*extra):
        args = cli.parse_args([str(data_root), "--arch", "resnet18", *extra])
        return runner._build_model(args, 10, None)

    fan_in, fan_out = built("--conv_init", "fan_in"), built("--conv_init", "fan_out")
    # the stem: fan_in 3 x 7 x 7 = 147, fan_out 64 x 7 x 7 = 3136; Kaiming normal std = sqrt(2 / fan)
    assert fan_in.conv1.weight.std().item() == pytest.approx((2 / 147) ** 0.5, rel=0.1)
    assert fan_out.conv1.weight.std().item() == pytest.approx((2 / 3136) ** 0.5, rel=0.1)
    dynamic = built("--dynamic", "--conv_init", "fan_in")  # the release's config, its convs fan_in
    assert dynamic.conv1.weight.std().item() == pytest.approx((2 / 147) ** 0.5, rel=0.1)
    assert torch.all(dynamic.bn1.weight == 0.5)
    assert all(not bn.weight.any() for bn in last_batchnorms(built("--last_bn_0_init", "True")))
    assert all(torch.all(bn.weight == 1) for bn in last_batchnorms(built("--last_bn_0_init", "False")))


def test_early_stopping_patience_stops_after_n_epochs_without_a_better_top1(data_root, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    validate = runner.Trainer.validate

    def flat_top1(self, *args, **kwargs):
        results = validate(self, *args, **kwargs)
        results["val.top1"] = 50.0
        return results

    monkeypatch.setattr(runner.Trainer, "validate", flat_top1)
    workspace = tmp_path / "ws"
    assert run_main(tiny(data_root, workspace, "--epochs", "6", "--prof", "1", "--early-stopping-patience", "2")) == 0
    _, _, _, epochs = report_lines(workspace / "raport.json")
    assert len(epochs) == 3  # the first epoch is the best; two more without a better top-1
    assert "early stopping after epoch 3" in caplog.text
    assert checkpoints.load_checkpoint(workspace / "checkpoint.pth.tar").epoch == 3


def fake_numa(root: Path, nodes, siblings=8):
    """A /sys tree: NUMA nodes with the given cpulists, hyperthread siblings (cpu, cpu + ``siblings``)."""
    for index, cpulist in enumerate(nodes):
        (root / f"devices/system/node/node{index}").mkdir(parents=True)
        (root / f"devices/system/node/node{index}/cpulist").write_text(cpulist + "\n")
    for cpu in range(2 * siblings if siblings else 0):
        topology = root / f"devices/system/cpu/cpu{cpu}/topology"
        topology.mkdir(parents=True)
        first = cpu % siblings
        topology.joinpath("thread_siblings_list").write_text(f"{first},{first + siblings}\n")
    return root


def test_gpu_affinity_modes_split_the_numa_layout_as_nvidia_does(tmp_path):
    sysfs = str(fake_numa(tmp_path, ["0-3,8-11", "4-7,12-15"]))
    sockets = affinity.device_sockets(torch.device("cpu"), 4, sysfs)
    assert sockets == [[0, 1, 2, 3, 8, 9, 10, 11]] * 2 + [[4, 5, 6, 7, 12, 13, 14, 15]] * 2
    siblings, every_cpu = affinity.sibling_groups(sysfs), set(range(16))

    def plan(mode, available=every_cpu):
        return affinity.plan(mode, sockets, siblings, available)

    assert plan("socket")[1] == [0, 1, 2, 3, 8, 9, 10, 11]
    assert plan("socket_single") == [[0, 8], [0, 8], [4, 12], [4, 12]]
    assert plan("socket_single_unique") == [[0, 8], [1, 9], [4, 12], [5, 13]]
    assert plan("socket_unique_contiguous") == [[0, 1, 8, 9], [2, 3, 10, 11], [4, 5, 12, 13], [6, 7, 14, 15]]
    assert plan("socket_unique_interleaved") == [[0, 2, 8, 10], [1, 3, 9, 11], [4, 6, 12, 14], [5, 7, 13, 15]]
    assert plan("socket_unique_contiguous", set(range(8))) == [[0, 1], [2, 3], [4, 5], [6, 7]]  # no hyperthreads
    # a GPU's CPUs: its PCI device's local_cpulist, else its NUMA node's
    device = tmp_path / "bus/pci/devices/0000:3b:00.0"
    device.mkdir(parents=True)
    (device / "numa_node").write_text("1\n")
    assert affinity.gpu_cpus("0000:3B:00.0", sysfs) == [4, 5, 6, 7, 12, 13, 14, 15]
    (device / "local_cpulist").write_text("0-1\n")
    assert affinity.gpu_cpus("0000:3b:00.0", sysfs) == [0, 1]


def test_gpu_affinity_pins_this_process_or_says_it_cannot(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    before = os.sched_getaffinity(0)
    cpus = sorted(before)
    sysfs = fake_numa(tmp_path / "sys", [affinity.format_cpulist(cpus)], siblings=0)
    try:
        assert affinity.set_affinity("socket_single", 0, 1, torch.device("cpu"), str(sysfs)) == {cpus[0]}
        assert os.sched_getaffinity(0) == {cpus[0]}
        assert f"--gpu-affinity socket_single: process 0 of 1 on CPUs {cpus[0]}" in caplog.text
    finally:
        os.sched_setaffinity(0, before)
    caplog.clear()
    assert affinity.set_affinity("socket", 0, 1, torch.device("cpu"), str(tmp_path / "empty")) is None
    assert os.sched_getaffinity(0) == before
    assert caplog.text.count("no NUMA layout") == 1


def test_jit_script_num_classes_and_gpu_affinity_act_in_a_run(data_root, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    before = os.sched_getaffinity(0)
    monkeypatch.setattr(affinity, "SYSFS", str(fake_numa(tmp_path / "sys", [affinity.format_cpulist(sorted(before))],
                                                         siblings=0)))
    scripted = []
    script = torch.jit.script

    def spy(module, *args, **kwargs):
        result = script(module, *args, **kwargs)
        if isinstance(module, nn.Module) and hasattr(module, "arch"):  # not TorchScript's recursive calls
            scripted.append((module, module.conv1.weight.detach().clone(), result))
        return result

    monkeypatch.setattr(torch.jit, "script", spy)
    workspace = tmp_path / "ws"
    try:
        assert run_main(tiny(data_root, workspace, "--epochs", "1", "--prof", "2", "--jit", "script", "--num_classes",
                             "5", "--gpu-affinity", "socket_unique_contiguous", "--lr", "0.5")) == 0
    finally:
        os.sched_setaffinity(0, before)
    assert len(scripted) == 1 and isinstance(scripted[0][2], torch.jit.ScriptModule)
    module, initial, script_module = scripted[0]
    assert script_module.conv1.weight.data_ptr() == module.conv1.weight.data_ptr()  # one set of weights
    saved = checkpoints.load_checkpoint(workspace / "checkpoint.pth.tar")
    assert saved.state_dict["fc.weight"].shape[0] == 5
    assert torch.equal(saved.state_dict["conv1.weight"], module.conv1.weight.detach())
    assert not torch.equal(saved.state_dict["conv1.weight"], initial)  # the scripted forward trained it
    assert "--gpu-affinity socket_unique_contiguous: process 0 of 1 on CPUs" in caplog.text


def test_compile_wraps_the_training_model(data_root, tmp_path, monkeypatch):
    calls = []

    class Compiled(nn.Module):  # stands in for torch.compile's OptimizedModule (whose CPU compile takes minutes here)
        def __init__(self, module):
            super().__init__()
            self._orig_mod = module
            self.forwards = 0

        def forward(self, x):
            self.forwards += 1
            return self._orig_mod(x)

    def fake_compile(module, **kwargs):
        calls.append(Compiled(module))
        calls[-1].options = kwargs.get("options")
        return calls[-1]

    monkeypatch.setattr(torch, "compile", fake_compile)
    workspace = tmp_path / "ws"
    assert run_main(tiny(data_root, workspace, "--dynamic", "--epochs", "1", "--prof", "2", "--compile")) == 0
    assert len(calls) == 1 and calls[0].forwards >= 3  # two training steps and the validation
    assert calls[0].options == {"layout_optimization": False}  # pedconv.inductor_options of a PEDConv model
    _, train_steps, _, _ = report_lines(workspace / "raport.json")
    assert train_steps[0]["data"]["train.infomax_loss"] > 0  # the PEDConv layers are found through the wrapper
    assert checkpoints.load_checkpoint(workspace / "checkpoint.pth.tar").arch["dynamic"]
