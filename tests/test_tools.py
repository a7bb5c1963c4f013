"""The tools around the engine: classify.py, checkpoint2model.py, export_onnx.py, the report plots and the benchmark
mode; all on the CPU with narrow (wmul 0.125) ResNet-18s at 32x32."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import checkpoint2model
import classify
import export_onnx
import main as cli
from benchmarks import throughput
from image_classification import report
from image_classification.atomic_files import current_umask
from image_classification.checkpoints import load_checkpoint, model_from_checkpoint
from image_classification.models import build_model
from tests.data_utils import make_dataset

ROOT = Path(__file__).resolve().parents[1]
CLASSES = "abcdef"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A PEDConv ResNet-18 (wmul 0.125) trained 2 epochs with an EMA on 6 tiny classes: (data root, workspace)."""
    root = make_dataset(tmp_path_factory.mktemp("data"), {c: 4 for c in CLASSES}, {c: 2 for c in CLASSES},
                        size_range=(36, 48))
    workspace = tmp_path_factory.mktemp("ws")
    torch.manual_seed(0)
    argv = [str(root), "--data-backend", "pytorch", "--arch", "resnet18", "--dynamic", "--wmul", "0.125",
            "--image-size", "32", "-b", "6", "--epochs", "2", "--lr", "0.05", "--use-ema", "0.9", "--device", "cpu",
            "-j", "0", "--seed", "3", "--workspace", str(workspace), "--raport-file", "raport.json", "-p", "1"]
    assert cli.main(argv) == 0
    return root, workspace


def run_tool(tool, argv, capsys):
    """(exit status, stdout, stderr) of a tool's main in this process."""
    try:
        status = tool.main([str(a) for a in argv])
    except SystemExit as stop:  # argparse
        status = stop.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def classify_json(argv, capsys):
    status, out, err = run_tool(classify, [*argv, "--json"], capsys)
    assert status == 0, err
    return [json.loads(line) for line in out.splitlines()]


def val_batch(root):
    from dataloading import LoaderOptions, get_loaders

    loaders = get_loaders(LoaderOptions("pytorch", str(root), 12, workers=0, image_size=32, device="cpu",
                                        train=False))
    return next(iter(loaders.val))[0]


def test_classify_top5_from_our_checkpoint_matches_the_model(trained, capsys):
    root, workspace = trained
    checkpoint = workspace / "checkpoint.pth.tar"
    images = [root / "val" / "a" / "a_0000.jpg", root / "val" / "f" / "f_0001.jpg"]
    results = classify_json(["--pretrained-from-file", checkpoint, "--image-size", 32, "-b", 1, *images], capsys)
    assert [r["image"] for r in results] == [str(p) for p in images]
    for result in results:
        top = result["top"]
        probabilities = [t["probability"] for t in top]
        assert len(top) == 5 and probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1 + 1e-6
        assert all(t["name"] == CLASSES[t["class"]] for t in top)  # names from the checkpoint's classes entry
    # same preprocessing as the validation loader: the first val image is a_0000, the last f_0001
    model = model_from_checkpoint(load_checkpoint(checkpoint)).eval()
    with torch.no_grad():
        expected = torch.softmax(model(val_batch(root)), dim=1)
    for result, row in zip(results, (expected[0], expected[-1])):
        values, indices = row.topk(5)
        assert [t["class"] for t in result["top"]] == indices.tolist()
        assert [t["probability"] for t in result["top"]] == pytest.approx(values.tolist(), abs=1e-5)


def test_classify_a_release_format_checkpoint_with_a_class_names_file_and_amp(trained, tmp_path, capsys):
    root, workspace = trained
    ours = load_checkpoint(workspace / "checkpoint.pth.tar")
    release = {"epoch": 250, "arch": "resnet18", "best_prec1": torch.tensor(50.0), "optimizer": {"state": {}},
               "state_dict": {"module." + k: v for k, v in ours.state_dict.items()}}
    path = tmp_path / "model_best.pth.tar"
    torch.save(release, path)
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"class {c}" for c in CLASSES) + "\n")
    image = root / "val" / "c" / "c_0000.jpg"
    # NVIDIA's flags: --arch, --image, --precision AMP (bfloat16 autocast on the CPU)
    common = ["--pretrained-from-file", path, "--arch", "resnet18", "--image", image, "--image-size", 32,
              "--class-names", names]
    (fp32,) = classify_json(common, capsys)
    (amp,) = classify_json([*common, "--precision", "AMP"], capsys)
    (reference,) = classify_json(["--pretrained-from-file", workspace / "checkpoint.pth.tar", "--image-size", 32,
                                  image], capsys)
    assert [t["probability"] for t in fp32["top"]] == pytest.approx([t["probability"] for t in reference["top"]])
    assert [t["name"] for t in fp32["top"]] == [f"class {CLASSES[t['class']]}" for t in fp32["top"]]
    assert len(amp["top"]) == 5
    assert [t["probability"] for t in amp["top"]] == pytest.approx([t["probability"] for t in fp32["top"]], abs=0.03)
    # a JSON object keyed by the checkpoint's folder names maps them
    mapping = tmp_path / "names.json"
    mapping.write_text(json.dumps({c: c.upper() for c in CLASSES}))
    (named,) = classify_json(["--pretrained-from-file", workspace / "checkpoint.pth.tar", "--image-size", 32,
                              "--class-names", mapping, image], capsys)
    assert {t["name"] for t in named["top"]} <= set(CLASSES.upper())
    # the table form names the image and five ranked classes
    status, out, _ = run_tool(classify, ["--pretrained-from-file", path, "--image-size", 32, image], capsys)
    assert status == 0 and out.splitlines()[0] == str(image) and out.splitlines()[5].lstrip().startswith("5. ")


def test_checkpoint2model_with_and_without_ema(trained, tmp_path, capsys):
    _, workspace = trained
    checkpoint = load_checkpoint(workspace / "checkpoint.pth.tar")
    plain, ema = tmp_path / "weights.pth", tmp_path / "ema.pth"
    for out, extra in ((plain, []), (ema, ["--ema"])):
        status, _, err = run_tool(checkpoint2model, ["--checkpoint-path", workspace / "checkpoint.pth.tar",
                                                     "--weight-path", out, *extra], capsys)
        assert status == 0, err
    plain_state = torch.load(plain, weights_only=True)
    ema_state = torch.load(ema, weights_only=True)
    for exported, expected in ((plain_state, checkpoint.state_dict), (ema_state, checkpoint.state_dict_ema)):
        assert set(exported) == set(expected)
        assert all(torch.equal(exported[k], expected[k]) for k in expected)
        model = build_model("resnet18", dynamic=True, num_classes=6, wmul=0.125)
        model.load_state_dict(exported)  # strict: a bare state_dict of the model
    assert not torch.equal(plain_state["fc.weight"], ema_state["fc.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema.pth", "weights.pth"]  # no temporary files left
    assert plain.stat().st_mode & 0o777 == 0o666 & ~current_umask()  # not the temporary file's private mode
    # the bare state_dict has no EMA to export
    status, _, err = run_tool(checkpoint2model, ["--checkpoint-path", plain, "--weight-path", tmp_path / "x.pth",
                                                 "--ema"], capsys)
    assert status == 2 and err.startswith("error: ") and "no EMA weights" in err and len(err.splitlines()) == 1


def _checkpoint_far_from_init(path, dynamic):
    """A ResNet-18 (wmul 0.125) whose BatchNorm statistics, classifier and PEDConv gate biases are far from their
    initial values, saved as a bare state_dict: logits of order 1 and gates away from 0.5 that differ per sample."""
    torch.manual_seed(1)
    model = build_model("resnet18", dynamic=dynamic, num_classes=10, wmul=0.125)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
            elif isinstance(module, nn.Linear) and ".attn." in f".{name}":
                module.weight.normal_(0, 0.5)
                module.bias.normal_(0, 1.0)
        model.fc.weight.normal_(0, 0.3)
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.parametrize("kind", ["static", "pedconv"])
def test_onnx_export_keeps_a_dynamic_batch_and_matches_pytorch_at_batch_1_and_7(kind, tmp_path, capsys):
    source = _checkpoint_far_from_init(tmp_path / f"{kind}.pth", dynamic=kind == "pedconv")
    out = tmp_path / f"{kind}.onnx"
    status, stdout, err = run_tool(export_onnx, ["--pretrained-from-file", source, "--image-size", 32, "-o", out,
                                                 "--check"], capsys)
    assert status == 0, err
    assert "batch 1: max" in stdout and "batch 7: max" in stdout
    import onnx

    graph = onnx.load(str(out)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    model = model_from_checkpoint(load_checkpoint(source)).eval()
    assert model.arch["dynamic"] == (kind == "pedconv")
    differences = export_onnx.compare(model, str(out), 32, (1, 7))
    with torch.no_grad():
        scale = model(torch.randn(7, 3, 32, 32)).abs().max().item()
    assert scale > 0.3  # real logits, not near-zero ones
    assert max(differences.values()) < 1e-4, differences
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".onnx") == [out.name]


def test_report_plots_and_summary_from_a_small_real_report(trained, tmp_path, capsys):
    _, workspace = trained
    raport = workspace / "raport.json"
    run = report.load_run(str(raport))
    assert run.model == "resnet18 PEDConv x0.125" and len(run.iterations) == 2 * (24 // 6) and sorted(run.epochs) == [0, 1]
    out = tmp_path / "plots"
    status, stdout, err = run_tool(report, [raport, raport, "--out", out, "--labels", "PEDConv", "again"], capsys)
    assert status == 0, err
    from PIL import Image

    for name in report.PLOTS:
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size[0] >= 600
    summary = (out / "summary.md").read_text()
    assert "| PEDConv | resnet18 PEDConv x0.125 | 2 |" in summary and "| again |" in summary
    assert all(f"({name})" in summary for name in report.PLOTS)
    assert sorted(p.name for p in out.iterdir()) == sorted([*report.PLOTS, "summary.md"])
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~current_umask() for p in out.iterdir())
    # repeated labels get a mean-and-spread row
    status, _, err = run_tool(report, [raport, raport, "--out", out, "--labels", "same", "same"], capsys)
    assert status == 0 and "| same | 2 |" in (out / "summary.md").read_text()


def test_benchmark_mode_on_synthetic_data_with_tiny_sizes(tmp_path, capsys):
    table = tmp_path / "benchmark.md"
    argv = ["--arch", "resnet18", "--wmul", "0.125", "--image-size", 32, "--num-classes", 10, "-b", 2, 3,
            "--prof", 3, "--warmup-iters", 1, "--device", "cpu", "--precision", "fp32", "amp",
            "--workspace", tmp_path / "runs", "--output", table]
    status, stdout, err = run_tool(throughput, argv, capsys)
    assert status == 0, err
    rows = [line.split("|")[1:-1] for line in table.read_text().splitlines() if line.startswith("| static")
            or line.startswith("| pedconv")]
    assert len(rows) == 2 * 2 * 2 * 2  # models x modes x precisions x batch sizes
    for model, mode, precision, batch, ips, ratio, *latencies in (map(str.strip, row) for row in rows):
        assert float(ips) > 0 and all(float(value) > 0 for value in latencies)
        assert (ratio.endswith("x") and float(ratio[:-1]) > 0) if model == "pedconv" else ratio == ""
    assert table.read_text() in stdout
    # NVIDIA's protocol: each run is the engine with --prof and --training-only or --evaluate; 2 measured steps each
    compute, _, images = throughput.measured(str(tmp_path / "runs" / "resnet18-pedconv-evaluation-amp-b3" /
                                                 "raport.json"), "evaluation", 1)
    assert len(compute) == 2 and images == pytest.approx([3, 3])
    assert throughput.percentile([4, 1, 3, 2], 50) == 2 and throughput.percentile([4, 1, 3, 2], 99) == 4


@pytest.mark.parametrize("tool, argv, message", [
    (classify, ["--pretrained-from-file", "MISSING", "img.jpg"], "no such"),
    (classify, ["--pretrained-from-file", "GARBAGE", "GARBAGE"], "not a PyTorch checkpoint"),
    (classify, ["--pretrained-from-file", "GARBAGE"], "no image given"),
    (checkpoint2model, ["--checkpoint-path", "MISSING", "--weight-path", "out.pth"], "no such checkpoint"),
    (checkpoint2model, ["--weight-path", "out.pth"], "--checkpoint-path"),
    (export_onnx, ["--arch", "resnet19", "-o", "m.onnx"], "unknown architecture 'resnet19'"),
    (export_onnx, ["--pretrained-from-file", "GARBAGE", "-o", "m.onnx"], "not a PyTorch checkpoint"),
    (report, ["MISSING", "--out", "plots"], "no such report"),
    (report, ["GARBAGE", "--out", "plots"], "not a DLLogger report"),
    (throughput, ["--arch", "resnet19"], "unknown architecture"),
])
def test_bad_input_is_one_error_line_and_a_nonzero_exit(tool, argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "GARBAGE").write_bytes(b"this is not a checkpoint, an image or a report")
    status, _, err = run_tool(tool, argv, capsys)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["GARBAGE"]  # nothing written, no temporary file left


def test_a_tool_run_as_a_script_fails_without_a_traceback(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(ROOT / "export_onnx.py"), "--arch", "resnet19", "-o",
                             str(tmp_path / "m.onnx")], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: unknown architecture 'resnet19'; valid: resnet18, resnet34, resnet50, resnet101, resnet152, resnet50d, "
        "resnext101-32x4d, se-resnext101-32x4d, mobilenet_v2, efficientnet-b0, efficientnet-b4"]
