"""Architectures beyond ResNet (issue 18): MobileNetV2 against torchvision's, PEDConv placement by each family's
rule, NVIDIA's ResNeXt/SE-ResNeXt key layouts, training steps, checkpoints and a one-epoch run."""
import re

import pytest
import torch
import torchvision

import main as cli
from image_classification import checkpoints, mobilenet
from image_classification.models import build_model, dynamic_layers, last_batchnorms
from image_classification.model_summary import summarize
from pedconv import PEDConv2d
from tests.data_utils import make_dataset
from tests.model_utils import calibrate_batchnorms, meta_model
from tests.nvidia_layout import (RESNEXT101, nvidia_optimizer_state, nvidia_parameter_names, nvidia_resnet_shapes,
                                 random_state)

NEW_ARCHS = ("mobilenet_v2", "resnext101-32x4d", "se-resnext101-32x4d")
TINY = {"mobilenet_v2": 0.25, "resnext101-32x4d": 0.05, "se-resnext101-32x4d": 0.05,  # wmul of the tiny models
        "efficientnet-b0": 0.25, "efficientnet-b4": 0.25}
EFFICIENTNETS = ("efficientnet-b0", "efficientnet-b4")  # more in tests/test_efficientnet.py


@pytest.mark.parametrize("wmul", [1.0, 0.35, 1.4])
def test_static_mobilenet_v2_loads_torchvisions_weights_strictly_and_gives_its_outputs(wmul):
    torch.manual_seed(0)
    reference = torchvision.models.mobilenet_v2(width_mult=wmul, num_classes=10).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a misplaced BN would show
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
    model = build_model("mobilenet_v2", num_classes=10, wmul=wmul).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


def test_mobilenet_v2_pedconv_placement_is_every_block_conv_and_nothing_else():
    model = meta_model("mobilenet_v2", dynamic=True)
    converted = {name for name, m in model.named_modules() if isinstance(m, PEDConv2d)}
    static = {name for name, m in model.named_modules() if type(m) is torch.nn.Conv2d}
    # 17 blocks: the first (t = 1) has depthwise + projection, the 16 others expansion + depthwise + projection
    assert len(converted) == 2 + 16 * 3 == 50
    assert static == {"features.0.0", "features.18.0"}  # the stem and the last 1x1 conv
    assert all(re.fullmatch(r"features\.([1-9]|1[0-7])\.conv\.\d(\.0)?", name) for name in converted)
    depthwise = [m for m in dynamic_layers(model) if m.groups > 1]
    assert len(depthwise) == 17 and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    assert all(m.attn.fc_inp.out_features == 1 for m in depthwise)  # one input gate per sample
    assert isinstance(model.classifier[1], torch.nn.Linear)


@pytest.mark.parametrize("arch", ["resnext101-32x4d", "se-resnext101-32x4d"])
def test_resnext_pedconv_placement_is_every_block_conv_with_grouped_3x3(arch):
    model = meta_model(arch, dynamic=True)
    layers = dict((name, m) for name, m in model.named_modules() if isinstance(m, PEDConv2d))
    assert len(layers) == (3 + 4 + 23 + 3) * 3
    assert {name.rsplit(".", 1)[1] for name in layers} == {"conv1", "conv2", "conv3"}
    assert all(m.groups == 32 for name, m in layers.items() if name.endswith("conv2"))
    assert type(model.conv1) is torch.nn.Conv2d and type(model.layer2[0].downsample[0]) is torch.nn.Conv2d
    has_se = arch.startswith("se-")
    assert (model.layer1[0].squeeze is not None) == has_se
    if has_se:  # NVIDIA's SE: Linear layers to 16 features and back, static
        assert model.layer3[5].squeeze.squeeze.out_features == 16


@pytest.mark.parametrize("arch", ["resnext101-32x4d", "se-resnext101-32x4d"])
def test_nvidia_resnext_keys_are_recognized_and_fit_after_their_names_are_converted(arch):
    state = {f"module.{key}": torch.empty(shape, device="meta")
             for key, shape in nvidia_resnet_shapes(**RESNEXT101, se=arch.startswith("se-"))}
    state = checkpoints.from_nvidia_names(checkpoints.strip_prefixes(state))
    assert checkpoints.infer_arch(state) == {"name": arch, "dynamic": False, "wmul": 1.0, "num_classes": 1000}
    assert checkpoints.mismatch_message(meta_model(arch), state) is None
    assert checkpoints.infer_arch(meta_model("resnet101").state_dict())["name"] == "resnet101"


@pytest.mark.parametrize("arch", NEW_ARCHS)
@pytest.mark.parametrize("dynamic", [False, True])
def test_tiny_models_train_one_step_and_pedconv_matches_the_reference_path(arch, dynamic):
    torch.manual_seed(0)
    model = build_model(arch, dynamic=dynamic, num_classes=5, wmul=TINY[arch])
    x = torch.randn(2, 3, 32, 32)
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([1, 3]))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for name, p in model.named_parameters() if ".attn.decoder." not in name)
    if dynamic:
        model.eval()
        with torch.no_grad():
            fast = model(x)
            for layer in dynamic_layers(model):
                layer.method = "reference"
            torch.testing.assert_close(model(x), fast, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", NEW_ARCHS + EFFICIENTNETS)
def test_checkpoint_round_trip_infers_the_architecture(arch, tmp_path):
    torch.manual_seed(0)
    model = build_model(arch, dynamic=True, num_classes=5, wmul=TINY[arch]).eval()
    path = tmp_path / "checkpoint.pth.tar"
    checkpoints.save_checkpoint(checkpoints.make_checkpoint(model, epoch=1), str(path))
    bare = tmp_path / "bare.pth"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, bare)
    x = torch.randn(2, 3, 32, 32)
    for file in (path, bare):  # ours (arch recorded) and a bare state_dict (arch from the keys alone)
        loaded = checkpoints.load_checkpoint(file)
        assert loaded.arch["name"] == arch and loaded.arch["dynamic"] and loaded.arch["num_classes"] == 5
        rebuilt = checkpoints.model_from_checkpoint(loaded).eval()
        with torch.no_grad():
            torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)


def test_mobilenet_v2_width_multiplier_is_inferred_from_the_widths():
    for wmul in (1.0, 0.5, 0.75, 1.4):
        state = meta_model("mobilenet_v2", wmul=wmul).state_dict()
        inferred = checkpoints.infer_arch(state)["wmul"]
        assert mobilenet.widths(inferred) == mobilenet.widths(wmul)
    assert checkpoints.infer_arch(meta_model("mobilenet_v2").state_dict())["wmul"] == 1.0


def test_zero_init_last_bn_zeroes_only_blocks_with_an_addition():
    model = build_model("mobilenet_v2", zero_init_last_bn=True)
    residual = [m for m in model.modules() if isinstance(m, mobilenet.InvertedResidual) and m.use_res_connect]
    assert len(last_batchnorms(model)) == len(residual) == 10
    assert all(bn.weight.abs().sum() == 0 for bn in last_batchnorms(model))
    assert model.features[1].conv[-1].weight.abs().sum() > 0  # no addition: kept
    se = build_model("se-resnext101-32x4d", wmul=0.05, zero_init_last_bn=True)
    assert all(block.bn3.weight.abs().sum() == 0 for stage in (se.layer1, se.layer4) for block in stage)


def test_summary_figures_of_static_mobilenet_v2_are_torchvisions():
    summary = summarize(build_model("mobilenet_v2"), 224)
    assert summary.params == 3_504_872  # torchvision's documented figure
    assert round(summary.macs / 1e6) == 301  # torchvision's 0.30 GFLOPS (multiply-adds), the paper's 300M


def test_one_epoch_of_pedconv_mobilenet_v2_through_main(tmp_path):
    data = make_dataset(tmp_path / "data", {"a": 6, "b": 6}, {"a": 2, "b": 2}, size_range=(36, 44))
    argv = [str(data), "--data-backend", "pytorch", "--arch", "mobilenet_v2", "--dynamic", "--wmul", "0.25",
            "--image-size", "32", "-b", "4", "--epochs", "1", "--lr", "0.05", "--device", "cpu", "-j", "0",
            "--seed", "1", "--workspace", str(tmp_path / "run")]
    assert cli.main(argv) == 0
    loaded = checkpoints.load_checkpoint(tmp_path / "run" / "checkpoint.pth.tar")
    assert loaded.arch == {"name": "mobilenet_v2", "dynamic": True, "wmul": 0.25, "num_classes": 2}
    assert checkpoints.model_from_checkpoint(loaded).features[2].conv[1][0].groups > 1
    # resumed for a second epoch; and torchvision's static weights starting a PEDConv model (their convs become W0)
    resumed = argv[:-1] + [str(tmp_path / "resumed"), "--resume", str(tmp_path / "run" / "checkpoint.pth.tar"),
                           "--epochs", "2"]
    assert cli.main(resumed) == 0
    assert checkpoints.load_checkpoint(tmp_path / "resumed" / "checkpoint.pth.tar").epoch == 2
    torch.save(torchvision.models.mobilenet_v2(width_mult=0.25, num_classes=2).state_dict(), tmp_path / "tv.pth")
    finetuned = argv[:-1] + [str(tmp_path / "finetuned"), "--pretrained-from-file", str(tmp_path / "tv.pth")]
    assert cli.main(finetuned) == 0
    assert checkpoints.load_checkpoint(tmp_path / "finetuned" / "checkpoint.pth.tar").arch["dynamic"]


def _nvidia_names(state):
    """Our keys in NVIDIA's layout (``layer2.0.conv1`` -> ``layers.1.0.conv1``), DDP-prefixed as their files are."""
    return {"module." + re.sub(r"^layer(\d)\.", lambda m: f"layers.{int(m.group(1)) - 1}.", key): value
            for key, value in state.items()}


# SE-ResNeXt covers ResNeXt's blocks; EfficientNet-B0 NVIDIA's layers.N names and depthwise 5x5 convs
@pytest.mark.parametrize("arch", ["mobilenet_v2", "se-resnext101-32x4d", "efficientnet-b0"])
def test_pedconv_checkpoint_converts_and_exports_to_onnx_with_a_dynamic_batch(arch, tmp_path, capsys):
    import onnx

    import checkpoint2model
    import export_onnx

    torch.manual_seed(0)
    model = build_model(arch, dynamic=True, num_classes=5, wmul=TINY[arch]).eval()  # the release's init
    with torch.no_grad():  # gates away from their 0.5 start (a gate left out of the graph would show), real logits
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".attn." in f".{name}":
                module.weight.normal_(0, 0.1)
        classifier = model.fc if hasattr(model, "fc") else model.classifier[-1]
        classifier.weight.normal_(0, 1.0)
    calibrate_batchnorms(model, 32)
    state = _nvidia_names(model.state_dict()) if arch != "mobilenet_v2" else model.state_dict()
    source, weights, out = tmp_path / "nvidia.pth.tar", tmp_path / "weights.pth", tmp_path / "model.onnx"
    torch.save({"epoch": 3, "arch": arch, "state_dict": state, "best_prec1": 1.0, "optimizer": None}, source)
    assert checkpoint2model.main(["--checkpoint-path", str(source), "--weight-path", str(weights)]) == 0
    assert export_onnx.main(["--pretrained-from-file", str(weights), "--image-size", "32", "-o", str(out)]) == 0
    capsys.readouterr()
    graph = onnx.load(str(out)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    differences = export_onnx.compare(model, str(out), 32, (1, 3))
    with torch.no_grad():
        logits = model(torch.randn(3, 3, 32, 32))
    assert logits.std(0).max() > 1e-2 * logits.abs().max()  # logits that differ per image
    assert max(differences.values()) < 1e-4 * logits.abs().max(), (differences, logits.abs().max())


@pytest.mark.parametrize("arch", ["resnext101-32x4d", "se-resnext101-32x4d"])
def test_nvidia_resnext_checkpoint_resumes_converts_evaluates_and_classifies(arch, tmp_path, caplog, capsys):
    """A checkpoint as NVIDIA's training writes it for their (SE-)ResNeXt-101 (their key list and parameter order,
    DDP prefix, their SGD's state): --resume keeps the optimizer state of every parameter, checkpoint2model.py
    converts it, and --pretrained-from-file and classify.py read the result with the checkpoint's predictions."""
    import json
    import logging

    import checkpoint2model
    import classify

    state = random_state(nvidia_resnet_shapes(**RESNEXT101, se=arch.startswith("se-")), seed=3)
    optimizer, _ = nvidia_optimizer_state(state)
    source, weights = tmp_path / "checkpoint_0001.pth.tar", tmp_path / "weights.pth"
    torch.save({"epoch": 1, "arch": arch, "best_prec1": 10.0, "optimizer": optimizer,
                "state_dict": {f"module.{key}": value for key, value in state.items()}}, source)
    data = make_dataset(tmp_path / "data", {"a": 2, "b": 2}, {"a": 1, "b": 1}, size_range=(36, 40))
    common = [str(data), "--data-backend", "pytorch", "--arch", arch, "--image-size", "32", "-b", "2", "--device",
              "cpu", "-j", "0", "--prof", "1"]
    caplog.set_level(logging.INFO)
    assert cli.main([*common, "--training-only", "--epochs", "2", "--workspace", str(tmp_path / "resumed"),
                     "--resume", str(source)]) == 0
    parameters = len(nvidia_parameter_names(state))
    assert f"optimizer state of {parameters} of {parameters} parameters kept" in caplog.text
    assert checkpoints.load_checkpoint(tmp_path / "resumed" / "checkpoint.pth.tar").epoch == 2
    assert checkpoint2model.main(["--checkpoint-path", str(source), "--weight-path", str(weights)]) == 0
    assert cli.main([*common, "--evaluate", "--workspace", str(tmp_path / "evaluated"),
                     "--pretrained-from-file", str(weights)]) == 0
    image = next((data / "val" / "a").glob("*.jpg"))
    capsys.readouterr()
    assert classify.main(["--pretrained-from-file", str(weights), "--image", str(image), "--cpu", "--image-size", "32",
                          "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model = checkpoints.model_from_checkpoint(checkpoints.load_checkpoint(source)).eval()
    with torch.no_grad():
        logits = model(classify.load_images([str(image)], 32, "bilinear"))
    assert [entry["class"] for entry in result["top"]] == logits.topk(5).indices[0].tolist()
