"""NVIDIA's EfficientNet-B0/B4 (issue 18): their published sizes, their checkpoints' keys and outputs, the PEDConv
placement, stochastic depth, initialization, training steps, ONNX export and their recipe in configs.yml."""
import re

import pytest
import torch

import checkpoint2model
import launch
import main as cli
from image_classification import checkpoints, efficientnet
from image_classification.models import build_model, dynamic_layers, last_batchnorms
from image_classification.optim import build_optimizer
from image_classification.model_summary import summarize
from pedconv import PEDConv2d
from tests.data_utils import make_dataset
from tests.model_utils import calibrate_batchnorms, meta_model
from tests.nvidia_layout import (nvidia_efficientnet_forward, nvidia_efficientnet_shapes, random_state)

EFFNETS = ("efficientnet-b0", "efficientnet-b4")
TINY_WMUL = 0.25


@pytest.mark.parametrize("arch, params, macs, size", [
    ("efficientnet-b0", 5_288_548, 386, 224),  # torchvision's and TF's published figures: 5.3 M, 0.39 G
    ("efficientnet-b4", 19_341_616, 4394, 380),  # 19.3 M, 4.39 G at 380
])
def test_static_sizes_are_the_published_ones_and_nvidias(arch, params, macs, size):
    summary = summarize(build_model(arch), size)
    assert summary.params == params and summary.dynamic_layers == 0
    assert round(summary.macs / 1e6) == macs
    nvidia = sum(torch.Size(shape).numel() for key, shape in nvidia_efficientnet_shapes(arch)
                 if not key.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert nvidia == params


@pytest.mark.parametrize("arch", EFFNETS)
def test_nvidia_keys_fit_after_their_stage_names_are_converted(arch):
    shapes = nvidia_efficientnet_shapes(arch, num_classes=10)
    state = {f"module.{key}": torch.empty(shape, device="meta") for key, shape in shapes}
    state = checkpoints.from_nvidia_names(checkpoints.strip_prefixes(state))
    assert checkpoints.infer_arch(state) == {"name": arch, "dynamic": False, "wmul": 1.0, "num_classes": 10}
    model = meta_model(arch, num_classes=10)
    assert checkpoints.mismatch_message(model, state) is None
    assert list(model.state_dict()) == list(state)  # their module order too


def _calibrated_nvidia_state(arch: str, num_classes: int, seed: int) -> dict:
    """Random weights in their names, with BatchNorm statistics of random images (our model only measures them)."""
    state = random_state(nvidia_efficientnet_shapes(arch, num_classes=num_classes), seed=seed)
    model = build_model(arch, num_classes=num_classes)
    model.load_state_dict(checkpoints.from_nvidia_names(state))
    measured = calibrate_batchnorms(model, 64, seed).state_dict()
    return {key: measured[re.sub(r"^layers\.(\d)\.", lambda m: f"layer{int(m.group(1)) + 1}.", key)] for key in state}


def test_nvidia_b0_checkpoint_converts_loads_strictly_and_gives_their_outputs(tmp_path, capsys):
    arch = "efficientnet-b0"
    state = _calibrated_nvidia_state(arch, num_classes=10, seed=3)
    source, weights = tmp_path / "nvidia.pth.tar", tmp_path / "weights.pth"
    torch.save({"epoch": 5, "arch": arch, "state_dict": {f"module.{k}": v for k, v in state.items()},
                "best_prec1": 10.0, "optimizer": None}, source)
    assert checkpoint2model.main(["--checkpoint-path", str(source), "--weight-path", str(weights)]) == 0
    assert "weights of efficientnet-b0" in capsys.readouterr().out
    loaded = checkpoints.load_checkpoint(weights)
    assert loaded.arch == {"name": arch, "dynamic": False, "wmul": 1.0, "num_classes": 10}
    model = build_model(arch, num_classes=10).eval()
    model.load_state_dict(loaded.state_dict, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours, theirs = model(x), nvidia_efficientnet_forward(arch, state, x)
    assert theirs.std(0).max() > 1e-2 * theirs.abs().max()  # logits that differ per image
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())
    # their static weights also start a PEDConv model: the block convs' kernels become W0
    dynamic = build_model(arch, dynamic=True, num_classes=10)
    assert checkpoints.load_static_into_pedconv(dynamic, loaded.state_dict)
    assert torch.equal(dynamic.layer6.block3.depsep.conv.weight, state["layers.5.block3.depsep.conv.weight"])


@pytest.mark.parametrize("arch, blocks", [("efficientnet-b0", 16), ("efficientnet-b4", 32)])
def test_pedconv_placement_is_every_mbconv_conv_and_nothing_else(arch, blocks):
    model = meta_model(arch, dynamic=True)
    converted = {name for name, m in model.named_modules() if isinstance(m, PEDConv2d)}
    static = {name for name, m in model.named_modules() if type(m) is torch.nn.Conv2d}
    first_stage = len(model.layer1)  # expansion 1: no expansion conv
    assert len(converted) == 3 * blocks - first_stage
    assert static == {"stem.conv", "features.conv"}
    assert all(re.fullmatch(r"layer[1-7]\.block\d+\.(expand|depsep|proj)\.conv", name) for name in converted)
    depthwise = [m for m in dynamic_layers(model) if m.groups > 1]
    assert len(depthwise) == blocks and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    assert {m.kernel_size for m in depthwise} == {(3, 3), (5, 5)}
    assert all(m.attn.fc_inp.out_features == 1 for m in depthwise)  # one input gate per sample
    assert all(type(block.se.squeeze) is torch.nn.Linear for stage in (model.layer1, model.layer7) for block in stage)
    assert type(model.classifier.fc) is torch.nn.Linear


def test_stochastic_depth_follows_nvidias_schedule_and_drops_the_whole_batch():
    assert efficientnet.survival_probs("efficientnet-b0") == [1.0] * 16
    probs = efficientnet.survival_probs("efficientnet-b4")
    assert probs[0] == 1.0 and probs[-1] == pytest.approx(1 - 0.2 * 31 / 32) and probs[16] == pytest.approx(0.9)
    model = build_model("efficientnet-b4", wmul=TINY_WMUL)
    kept = [block.survival_prob for stage in range(1, 8) for block in getattr(model, f"layer{stage}")]
    residual = [block.residual for stage in range(1, 8) for block in getattr(model, f"layer{stage}")]
    assert kept == [p if r else 1.0 for p, r in zip(probs, residual)]
    torch.manual_seed(0)
    block = efficientnet.MBConv(16, 16, 3, 1, 6, survival_prob=0.5)
    x = torch.randn(2, 16, 8, 8)
    block.eval()
    with torch.no_grad():
        branch = block(x) - x
        block.train()
        for bn in block.modules():  # the branch as in eval mode, only the drop is random
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.eval()
        outputs = [block(x) for _ in range(40)]
    dropped = [torch.equal(out, x) for out in outputs]
    assert 0 < sum(dropped) < 40  # both happen; all samples together
    for out, was_dropped in zip(outputs, dropped):
        if not was_dropped:
            torch.testing.assert_close(out, x + 2 * branch)  # kept: scaled by 1 / 0.5


def test_static_default_is_nvidias_initialization_fan_in():
    model = build_model("efficientnet-b0")
    head = model.features.conv.weight  # 1280 x 320: fan_in 320, fan_out 1280
    assert head.std().item() == pytest.approx((2 / 320) ** 0.5, rel=0.05)
    assert torch.all(model.stem.bn.weight == 1) and model.stem.bn.eps == 1e-3 and model.stem.bn.momentum == 0.01
    fan_out = build_model("efficientnet-b0", config="classic").features.conv.weight
    assert fan_out.std().item() == pytest.approx((2 / 1280) ** 0.5, rel=0.05)
    assert torch.all(build_model("efficientnet-b0", dynamic=True, wmul=TINY_WMUL).stem.bn.weight == 0.5)  # release
    zeroed = build_model("efficientnet-b0", zero_init_last_bn=True)
    residual = [block for block in zeroed.modules() if isinstance(block, efficientnet.MBConv) and block.residual]
    assert len(last_batchnorms(zeroed)) == len(residual) == 9
    assert all(bn.weight.abs().sum() == 0 for bn in last_batchnorms(zeroed))
    assert zeroed.layer1.block0.proj.bn.weight.abs().sum() > 0  # no addition: kept


@pytest.mark.parametrize("arch", EFFNETS)
@pytest.mark.parametrize("dynamic", [False, True])
def test_tiny_models_train_match_the_reference_path_and_export_to_onnx_with_a_dynamic_batch(arch, dynamic, tmp_path,
                                                                                             capsys):
    import onnx

    import export_onnx

    torch.manual_seed(0)
    model = build_model(arch, dynamic=dynamic, num_classes=5, wmul=TINY_WMUL)
    x = torch.randn(2, 3, 32, 32)
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([1, 3]))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for name, p in model.named_parameters() if ".attn.decoder." not in name)
    with torch.no_grad():
        for name, module in model.named_modules():  # gates away from 0.5, real logits
            if isinstance(module, torch.nn.Linear) and ".attn." in f".{name}":
                module.weight.normal_(0, 0.1)
        model.classifier.fc.weight.normal_(0, 1.0)
        logits = calibrate_batchnorms(model, 32)(x)
        for layer in dynamic_layers(model):  # the fast paths against the release's per-sample kernels
            layer.method = "reference"
        torch.testing.assert_close(model(x), logits, rtol=1e-4, atol=1e-5 * logits.abs().max().item())
        for layer in dynamic_layers(model):
            layer.method = "auto"
    assert logits.std(0).max() > 1e-2 * logits.abs().max()  # logits that differ per image
    out = tmp_path / "model.onnx"
    export_onnx.export(model, str(out), 32)
    capsys.readouterr()
    assert onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    differences = export_onnx.compare(model, str(out), 32, (1, 3))
    assert max(differences.values()) < 1e-4 * logits.abs().max(), (differences, logits.abs().max())


@pytest.mark.parametrize("arch, lr, weight_decay, size, batch", [
    ("efficientnet-b0", 0.08, 1e-5, 224, 256), ("efficientnet-b4", 0.16, 5e-6, 380, 128)])
def test_nvidias_recipe_reaches_main(arch, lr, weight_decay, size, batch):
    args = launch.build_args(["--model", arch, "--precision", "AMP", "--mode", "convergence", "--platform", "DGXA100",
                              "DATA"])
    expected = dict(arch=arch, dynamic=False, optimizer="rmsprop", rmsprop_alpha=0.9, rmsprop_eps=0.01, momentum=0.9,
                    lr=lr, weight_decay=weight_decay, optimizer_batch_size=4096, image_size=size, batch_size=batch,
                    interpolation="bicubic", augmentation="autoaugment", label_smoothing=0.1, mixup=0.2, warmup=16,
                    epochs=400, lr_schedule="cosine", memory_format="nhwc", amp=True, model_config=None)
    assert {key: getattr(args, key) for key in expected} == expected


def test_cpu_recipe_trains_an_epoch_and_its_weights_start_a_pedconv_run(tmp_path):
    data = make_dataset(tmp_path / "data", {"a": 6, "b": 6}, {"a": 2, "b": 2}, size_range=(36, 44))
    narrowed = ["--epochs", "1", "-b", "4", "--image-size", "32", "--wmul", "0.25", "-j", "0", "--seed", "1"]
    recipe = ["--model", "efficientnet-b0", "--precision", "FP32", "--mode", "convergence", "--platform", "CPU",
              str(data), "--workspace", str(tmp_path / "static"), "--num-classes", "2", *narrowed]
    assert launch.main(recipe) == 0  # RMSprop, mixup, label smoothing, AutoAugment, bicubic, NVIDIA's init
    static = checkpoints.load_checkpoint(tmp_path / "static" / "checkpoint.pth.tar")
    assert static.arch == {"name": "efficientnet-b0", "dynamic": False, "wmul": 0.25, "num_classes": 2}
    assert "square_avg" in next(iter(static.optimizer["state"].values()))  # RMSprop's state
    finetuned = [str(data), "--data-backend", "pytorch", "--arch", "efficientnet-b0", "--dynamic", *narrowed,
                 "--device", "cpu", "--workspace", str(tmp_path / "dynamic"),
                 "--pretrained-from-file", str(tmp_path / "static" / "checkpoint.pth.tar")]
    assert cli.main(finetuned) == 0
    dynamic = checkpoints.load_checkpoint(tmp_path / "dynamic" / "checkpoint.pth.tar")
    assert dynamic.arch["dynamic"] and isinstance(checkpoints.model_from_checkpoint(dynamic).layer2.block0.depsep.conv, PEDConv2d)


def test_their_rmsprop_state_resumes_into_ours(tmp_path):
    arch = "efficientnet-b0"
    state = random_state(nvidia_efficientnet_shapes(arch, num_classes=10), seed=4)
    names = [key for key in state if not key.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    params = {name: state[name].clone().requires_grad_(True) for name in names}
    # their get_rmsprop_optimizer: names with "bn" (no weight decay), then the others
    theirs = torch.optim.RMSprop([{"params": [params[n] for n in names if "bn" in n], "weight_decay": 0},
                                  {"params": [params[n] for n in names if "bn" not in n]}],
                                 lr=0.08, alpha=0.9, eps=0.01, momentum=0.9, weight_decay=1e-5)
    for param in params.values():
        param.grad = torch.randn_like(param)
    theirs.step()
    path = tmp_path / "nvidia.pth.tar"
    torch.save({"epoch": 2, "arch": arch, "state_dict": {f"module.{k}": v for k, v in state.items()},
                "best_prec1": 1.0, "optimizer": theirs.state_dict()}, path)
    checkpoint = checkpoints.load_checkpoint(path)
    model = checkpoints.model_from_checkpoint(checkpoint)
    ours = build_optimizer(model, "rmsprop", 0.08, 0.9, 1e-5, rmsprop_alpha=0.9, rmsprop_eps=0.01)
    assert checkpoints.load_foreign_optimizer_state(ours, model, checkpoint) == len(names)
    square_avg = ours.state[model.layer6.block3.se.expand.weight]["square_avg"]
    assert torch.equal(square_avg, theirs.state[params["layers.5.block3.se.expand.weight"]]["square_avg"])


@pytest.mark.parametrize("arch, size", [("efficientnet-b4", 380), ("efficientnet-b0", 224), ("resnet50", 224)])
def test_default_image_size_is_the_architectures_as_nvidias_main(arch, size, tmp_path):
    """NVIDIA's main.py takes the crop size from the architecture when --image-size is not given (b4: 380): so do a
    run here and a checkpoint that records no preprocessing (theirs); a given size still wins."""
    from image_classification.runner import _choose_preprocessing

    args = cli.build_parser().parse_args([str(tmp_path), "--arch", arch])
    _choose_preprocessing(args, None)
    assert (args.image_size, args.interpolation) == (size, "bilinear")
    args = cli.build_parser().parse_args([str(tmp_path), "--arch", arch, "--image-size", "96"])
    _choose_preprocessing(args, None)
    assert args.image_size == 96
    theirs = checkpoints.Checkpoint(path="theirs.pth.tar", format="nvidia", state_dict={},
                                    arch={"name": arch, "dynamic": False, "wmul": 1.0, "num_classes": 1000})
    assert checkpoints.checkpoint_preprocessing(theirs)["image_size"] == size
