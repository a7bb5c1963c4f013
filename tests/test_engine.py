"""The training engine through main.py: a short run and its report, exact resume, evaluation, the authors' commands,
bad input; and the recipe's pieces (schedules, weight-decay groups, label smoothing, mixup, accumulation)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import main as cli
from image_classification import checkpoints
from image_classification.dllog import read_report
from image_classification.losses import Mixup, SoftTargetCrossEntropy
from image_classification.models import build_model
from image_classification.optim import lr_schedule, parameter_groups
from tests.data_utils import make_dataset

ROOT = Path(__file__).resolve().parents[1]

TRAIN_METRICS = ["train.loss", "train.compute_ips", "train.total_ips", "train.lr", "train.data_time",
                 "train.compute_time", "train.grad_scale"]
VAL_METRICS = ["top1", "top5", "loss", "compute_ips", "total_ips", "compute_latency"]
LATENCY_PERCENTILES = ["compute_latency_at100", "compute_latency_at99", "compute_latency_at95"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return make_dataset(root, {"a": 12, "b": 12, "c": 12}, {"a": 5, "b": 5, "c": 5}, size_range=(36, 48))


def tiny_run(data_root, workspace, *extra):
    return [str(data_root), "--data-backend", "pytorch", "--arch", "resnet18", "--dynamic", "--wmul", "0.125",
            "--image-size", "32", "-b", "6", "--lr", "0.05", "--wd", "1e-4", "--mom", "0.9", "--device", "cpu",
            "-j", "0", "--seed", "7", "--workspace", str(workspace), "--raport-file", "raport.json", "-p", "1",
            *extra]


def run_main(argv):
    torch.manual_seed(0)
    return cli.main(argv)


def test_short_run_lowers_the_loss_and_writes_a_complete_report(data_root, tmp_path):
    workspace = tmp_path / "ws"
    argv = tiny_run(data_root, workspace, "--epochs", "4", "--warmup", "2", "--lr-schedule", "cosine",
                    "--label-smoothing", "0.1", "--use-ema", "0.9", "--lr", "0.02")
    assert run_main(argv) == 0
    entries = list(read_report(workspace / "raport.json"))
    assert {e["type"] for e in entries} == {"LOG", "METADATA"}
    for entry in entries:
        assert {"timestamp", "datetime", "elapsedtime", "type"} <= set(entry)
        float(entry["timestamp"]), float(entry["elapsedtime"])
    logs = [e for e in entries if e["type"] == "LOG"]
    params = [e for e in logs if e["step"] == "PARAMETER"]
    assert len(params) == 1 and params[0]["data"]["arch"] == "resnet18" and params[0]["data"]["dynamic"] is True
    assert params[0]["data"]["model.pedconv_layers"] == 16
    assert params[0]["data"]["model.params"] > params[0]["data"]["model.params_without_decoders"] > 0
    assert params[0]["data"]["model.macs"] > 0
    train_steps = [e for e in logs if isinstance(e["step"], list) and len(e["step"]) == 2]
    val_steps = [e for e in logs if isinstance(e["step"], list) and len(e["step"]) == 3]
    epochs = [e for e in logs if isinstance(e["step"], list) and len(e["step"]) == 1]
    summary = [e for e in logs if e["step"] == []]
    assert train_steps[0]["step"] == [0, 1] and len(train_steps) == 4 * (36 // 6)
    for metric in TRAIN_METRICS:
        assert metric in train_steps[0]["data"], metric
    assert {f"val.{m}" for m in VAL_METRICS} <= set(val_steps[0]["data"])
    assert len(epochs) == 4 and len(summary) == 1
    for prefix in ("val", "val_ema"):
        for metric in VAL_METRICS + LATENCY_PERCENTILES:
            assert f"{prefix}.{metric}" in epochs[-1]["data"], f"{prefix}.{metric}"
    assert epochs[-1]["data"]["val.images"] == 15  # every validation image once
    assert epochs[-1]["data"]["train.loss"] < epochs[0]["data"]["train.loss"]
    best = max(e["data"]["val.top1"] for e in epochs)
    assert summary[0]["data"]["val.top1"] == best
    assert summary[0]["data"]["train.loss"] == min(e["data"]["train.loss"] for e in epochs)
    assert "train.compute_ips" in summary[0]["data"]
    lrs = [e["data"]["train.lr"] for e in epochs]
    # two warmup epochs (0.02 x 1/2, x 2/2), then cosine over the remaining two: 0.02 x (1 + cos(pi e / 2)) / 2
    assert lrs == pytest.approx([0.01, 0.02, 0.02, 0.01], rel=1e-9)
    saved = checkpoints.load_checkpoint(workspace / "checkpoint.pth.tar")
    assert saved.format == "pedconv" and saved.epoch == 4 and saved.arch["dynamic"] is True
    assert saved.state_dict_ema is not None and saved.rng is not None
    assert (workspace / "model_best.pth.tar").exists()


def test_resume_after_one_epoch_ends_with_the_same_weights(data_root, tmp_path):
    common = ["--epochs", "2", "--mixup", "0.2", "--label-smoothing", "0.1", "--use-ema", "0.9", "--deterministic",
              "--training-only", "-j", "1"]  # a loader worker process: its augmentation must resume too
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_main(tiny_run(data_root, straight, *common)) == 0
    assert run_main(tiny_run(data_root, split, *common, "--run-epochs", "1")) == 0
    assert checkpoints.load_checkpoint(split / "checkpoint.pth.tar").epoch == 1
    torch.manual_seed(123)  # a resumed run must not depend on the state the process starts in
    assert cli.main(tiny_run(data_root, split, *common, "--resume", str(split / "checkpoint.pth.tar"))) == 0
    expected = checkpoints.load_checkpoint(straight / "checkpoint.pth.tar")
    resumed = checkpoints.load_checkpoint(split / "checkpoint.pth.tar")
    assert resumed.epoch == expected.epoch == 2
    for name, tensor in expected.state_dict.items():
        assert torch.equal(resumed.state_dict[name], tensor), name
    for name, tensor in expected.state_dict_ema.items():
        assert torch.equal(resumed.state_dict_ema[name], tensor), name


def test_resume_accepts_a_module_prefixed_checkpoint(data_root, tmp_path):
    """Also runs bfloat16 autocast, channels_last and gradient accumulation end to end on the CPU."""
    workspace = tmp_path / "ws"
    amp = ["--amp", "--memory-format", "nhwc", "--optimizer-batch-size", "12"]
    assert run_main(tiny_run(data_root, workspace, "--epochs", "2", "--run-epochs", "1", "--training-only", *amp)) == 0
    first = [e for e in read_report(workspace / "raport.json") if e["type"] == "LOG" and e["step"] == [0]][0]
    assert math.isfinite(first["data"]["train.loss"])
    state = torch.load(workspace / "checkpoint.pth.tar", weights_only=True)
    state["state_dict"] = {"module." + k: v for k, v in state["state_dict"].items()}
    prefixed = tmp_path / "prefixed.pth.tar"
    torch.save(state, prefixed)
    assert run_main(tiny_run(data_root, workspace, "--epochs", "2", "--training-only", "--resume", str(prefixed),
                             *amp)) == 0
    assert checkpoints.load_checkpoint(workspace / "checkpoint.pth.tar").epoch == 2


def test_evaluate_a_release_format_checkpoint_without_dynamic(data_root, tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet18", dynamic=True, num_classes=3, wmul=0.125)
    with torch.no_grad():  # away from the release's initialization (near-uniform outputs whatever the weights)
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and "running_var" not in name:
                tensor.add_(torch.randn_like(tensor) * 0.5)
    release = {"epoch": 250, "arch": "resnet18", "best_prec1": torch.tensor(74.1),
               "state_dict": {"module." + k: v for k, v in model.state_dict().items()}, "optimizer": {"state": {}}}
    path = tmp_path / "model_best.pth.tar"
    torch.save(release, path)
    workspace = tmp_path / "eval"
    # the authors' evaluation command, narrowed: no --dynamic, no --wmul (the checkpoint tells both)
    argv = [str(data_root), "--data-backend", "pytorch", "--arch", "resnet18", "--evaluate", "--epochs", "1",
            "--pretrained-weights", str(path), "-b", "4", "--image-size", "32", "--device", "cpu", "-j", "0",
            "--workspace", str(workspace), "--raport-file", "eval.json"]
    assert run_main(argv) == 0
    epochs = [e for e in read_report(workspace / "eval.json") if e["type"] == "LOG" and isinstance(e["step"], list)
              and len(e["step"]) == 1]
    assert epochs and epochs[0]["data"]["val.images"] == 15
    assert not list(workspace.glob("*.pth.tar"))  # --evaluate never writes a checkpoint
    # the same weights evaluated directly, on the validation loader's images, give the same top-1, top-5 and loss
    from dataloading import LoaderOptions, get_loaders

    loaders = get_loaders(LoaderOptions("pytorch", str(data_root), 4, workers=0, image_size=32, device="cpu",
                                        train=False))
    model.eval()
    logits, labels = [], []
    with torch.no_grad():
        for images, batch_labels in loaders.val:
            logits.append(model(images))
            labels.append(batch_labels)
    logits, labels = torch.cat(logits), torch.cat(labels)
    assert len(labels) == 15
    ranked = logits.argsort(dim=1, descending=True)
    top1 = 100.0 * (ranked[:, 0] == labels).float().mean().item()
    loss = nn.functional.cross_entropy(logits, labels).item()
    assert epochs[0]["data"]["val.top1"] == pytest.approx(top1)
    assert epochs[0]["data"]["val.top5"] == pytest.approx(100.0)  # 3 classes
    assert epochs[0]["data"]["val.loss"] == pytest.approx(loss, rel=1e-5)
    assert abs(loss - math.log(3)) > 0.05  # the loss tells these weights from uniform outputs


def test_the_authors_commands_parse_unchanged():
    train = cli.parse_args(
        "/data/imagenet --data-backend pytorch --raport-file raport.json -j8 -p 100 --lr 0.512 "
        "--optimizer-batch-size 512 --warmup 8 --arch resnet18 --dynamic -c fanin --label-smoothing 0.1 "
        "--lr-schedule cosine --mom 0.875 --wd 3.0517578125e-05 -b 64 --epochs 250 --mixup 0.2".split())
    assert (train.data, train.workers, train.print_freq, train.lr, train.optimizer_batch_size) == (
        "/data/imagenet", 8, 100, 0.512, 512)
    assert (train.warmup, train.arch, train.dynamic, train.model_config) == (8, "resnet18", True, "fanin")
    assert (train.momentum, train.weight_decay, train.batch_size, train.epochs, train.mixup) == (
        0.875, 3.0517578125e-05, 64, 250, 0.2)
    assert (train.label_smoothing, train.lr_schedule, train.raport_file) == (0.1, "cosine", "raport.json")
    evaluate = cli.parse_args(
        "/data/imagenet --data-backend pytorch --arch resnet18 --evaluate --epochs 1 "
        "--pretrained-weights ./logs/model_best.pth.tar -b 100".split())
    assert evaluate.evaluate and evaluate.pretrained_weights == "./logs/model_best.pth.tar"
    assert evaluate.batch_size == 100 and not evaluate.dynamic
    nvidia = cli.parse_args("/d --amp --static-loss-scale 128 --memory-format nhwc --use-ema 0.99 --nesterov "
                            "--pretrained-from-file w.pth --gather-checkpoints 3 --prof 10 --topk 3".split())
    assert nvidia.amp and nvidia.static_loss_scale == 128 and nvidia.memory_format == "nhwc"
    assert nvidia.pretrained_weights == "w.pth" and nvidia.gather_checkpoints == 3 and nvidia.topk == 3


@pytest.mark.parametrize(
    "extra, message",
    [(["--arch", "resnet19"], "unknown architecture 'resnet19'"),
     (["--optimizer-batch-size", "10"], "--optimizer-batch-size 10 is not a multiple of world size x batch size"),
     (["--evaluate", "--pretrained-weights", "MISSING"], "MISSING"),
     (["--resume", "GARBAGE"], "GARBAGE")],
)
def test_bad_input_is_one_line_on_stderr_and_a_nonzero_exit(data_root, tmp_path, capsys, extra, message):
    (tmp_path / "GARBAGE").write_bytes(b"this is not a checkpoint")
    extra = [str(tmp_path / e) if e in ("MISSING", "GARBAGE") else e for e in extra]
    code = run_main(tiny_run(data_root, tmp_path / "ws", "--epochs", "1", *extra))
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not list((tmp_path / "ws").glob("*.pth.tar"))


def test_missing_data_exits_nonzero_without_a_traceback(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for args in ([str(tmp_path / "nowhere"), "--arch", "resnet18"], [str(tmp_path), "--arch", "resnet18"]):
        result = subprocess.run([sys.executable, str(ROOT / "main.py"), *args, "--device", "cpu", "-j", "0",
                                 "--workspace", str(tmp_path / "ws")], capture_output=True, text=True, env=env,
                                timeout=120)
        assert result.returncode != 0
        assert "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr


def test_lr_schedules():
    cosine = lr_schedule("cosine", 0.4, warmup=2, epochs=10, end_lr=0.0)
    assert [cosine(0), cosine(1)] == pytest.approx([0.2, 0.4])
    assert cosine(2) == pytest.approx(0.4) and cosine(6) == pytest.approx(0.2)
    assert cosine(9) == pytest.approx(0.4 * (1 + math.cos(math.pi * 7 / 8)) / 2)
    step = lr_schedule("step", 1.0, warmup=0, epochs=90)
    assert [step(29), step(30), step(60), step(85)] == pytest.approx([1.0, 0.1, 0.01, 0.001])
    linear = lr_schedule("linear", 1.0, warmup=0, epochs=10, end_lr=0.1)
    assert [linear(0), linear(5)] == pytest.approx([1.0, 0.55])
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_schedule("exponential", 1.0, 0, 10)


def test_no_weight_decay_on_batchnorm_and_biases_including_shortcuts():
    model = build_model("resnet18", dynamic=True, num_classes=10, wmul=0.125)
    decay, no_decay = parameter_groups(model, 1e-4)
    no_decay_ids = {id(p) for p in no_decay["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in no_decay_ids}
    assert "layer2.0.downsample.1.weight" in names and "fc.bias" in names
    assert "layer1.0.conv1.attn.fc_share.bias" in names and "bn1.weight" in names
    assert not any(name.endswith("conv1.weight") or name == "fc.weight" for name in names)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    everything = parameter_groups(model, 1e-4, bn_weight_decay=True)
    assert not everything[1]["params"]


def test_label_smoothing_and_mixup_targets():
    logits = torch.randn(4, 5)
    labels = torch.tensor([0, 3, 1, 4])
    smoothed = SoftTargetCrossEntropy(0.1)(logits, labels)
    log_probs = logits.log_softmax(-1)
    expected = (0.9 * -log_probs[torch.arange(4), labels] - 0.1 * log_probs.mean(-1)).mean()
    assert torch.allclose(smoothed, expected)
    torch.manual_seed(0)
    images = torch.randn(4, 3, 8, 8)
    mixed, target = Mixup(0.2, 5, 0.1)(images, labels)
    assert mixed.shape == images.shape and target.shape == (4, 5)
    assert torch.allclose(target.sum(1), torch.ones(4))
    assert torch.allclose(SoftTargetCrossEntropy()(logits, nn.functional.one_hot(labels, 5).float()),
                          nn.functional.cross_entropy(logits, labels))


def test_gradient_accumulation_equals_one_large_batch():
    """Two accumulated half batches step the weights as one full batch (a model without BatchNorm)."""
    from image_classification.distributed import Context
    from image_classification.dllog import Report
    from image_classification.training import Precision, Trainer

    torch.manual_seed(0)
    images, labels = torch.randn(8, 3, 4, 4), torch.randint(0, 3, (8,))
    results = []
    for accumulation, batch in ((1, 8), (2, 4)):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        context = Context(0, 1, 0, torch.device("cpu"))
        trainer = Trainer(model, SoftTargetCrossEntropy(), optimizer, Precision.create(False, context.device),
                          context, Report(None), accumulation=accumulation)
        loader = [(images[i : i + batch], labels[i : i + batch]) for i in range(0, 8, batch)]
        trainer.train_epoch(_Sized(loader), 0, 0.5)
        results.append(model[1].weight.detach().clone())
    assert torch.allclose(results[0], results[1], atol=1e-6)


class _Sized(list):
    pass


def test_precision_is_bfloat16_without_scaling_on_cpu():
    from image_classification.training import Precision

    precision = Precision.create(True, torch.device("cpu"), static_loss_scale=128.0)
    assert precision.dtype == torch.bfloat16 and not precision.scaler.is_enabled()
    with precision.autocast():
        assert torch.mm(torch.randn(2, 2), torch.randn(2, 2)).dtype == torch.bfloat16
    assert not Precision.create(False, torch.device("cpu")).enabled


def test_report_lines_are_dllogger_json(tmp_path):
    from image_classification.dllog import Report

    report = Report(str(tmp_path / "r.json"))
    report.parameters({"lr": 0.1})
    report.log((1, 1), {"train.loss": 1.5})
    report.log([], {"val.top1": 50.0})
    report.close()
    lines = (tmp_path / "r.json").read_text().splitlines()
    assert all(line.startswith("DLLL {") for line in lines)
    last = json.loads(lines[-1][5:])
    assert last["type"] == "LOG" and last["step"] == [] and last["data"] == {"val.top1": 50.0}
    metadata = [json.loads(line[5:]) for line in lines if '"METADATA"' in line]
    assert {"metric", "metadata"} <= set(metadata[0]) and "unit" in metadata[0]["metadata"]


@pytest.mark.parametrize("signal_name, status", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_finishes_the_step_saves_and_exits_with_128_plus_it(data_root, tmp_path, signal_name, status):
    """Also: output that is not a terminal has no progress-bar control characters."""
    import signal
    import time

    workspace = tmp_path / "ws"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    argv = [sys.executable, str(ROOT / "main.py"), *tiny_run(data_root, workspace, "--epochs", "50", "--training-only")]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    report = workspace / "raport.json"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if report.exists() and '"step": [0, 2]' in report.read_text():
            break
        time.sleep(0.2)
    process.send_signal(getattr(signal, signal_name))
    out, err = process.communicate(timeout=120)
    assert process.returncode == status, err
    assert "\r" not in out + err and "\x1b" not in out + err
    assert "Traceback" not in err
    saved = checkpoints.load_checkpoint(workspace / "checkpoint.pth.tar")
    assert saved.epoch < 50  # the epoch in progress is repeated on resume
    for line in report.read_text().splitlines():
        json.loads(line[5:])  # every line whole
    assert "resume with --resume" in out + err
