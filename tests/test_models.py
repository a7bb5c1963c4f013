"""The ResNets: the release's keys and shapes, torchvision's for static models, sizes, configs, and the model
under channels_last, bfloat16 autocast and torch.compile."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision

import pedconv
from image_classification import models
from image_classification.models import ARCHITECTURES, BasicBlock, ResNet, build_model
from image_classification.model_summary import count_params
from tests.model_utils import meta_model, shapes_only
from pedconv import PEDConv2d

SPEC = Path(__file__).resolve().parents[2] / "shared" / "spec"
TV_ARCHS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]


def release_keys(arch):
    """key -> (shape, dtype) of the release's model, from the spec's tsv."""
    path = SPEC / f"official_pedconv_{arch}_state_dict.tsv"
    if not path.exists():
        pytest.skip(f"the authors' key list {path.name} is not in {SPEC} (a folder beside the checkout on the "
                    f"maintainers' machines, not part of the repository); the key check against the release is skipped")
    entries = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape, dtype = line.split("\t")
        entries[key] = (tuple(int(n) for n in shape.strip("()").split(",") if n.strip()), dtype)
    return entries


def shapes_of(model):
    return {key: (tuple(value.shape), str(value.dtype).replace("torch.", "")) for key, value in model.state_dict().items()}


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_dynamic_model_has_exactly_the_releases_keys_and_shapes(arch):
    expected = release_keys(arch)
    got = shapes_of(meta_model(arch, dynamic=True))
    assert list(got) == list(expected)
    assert got == expected


@pytest.mark.parametrize("arch", TV_ARCHS)
def test_static_model_has_torchvisions_keys_and_shapes(arch):
    with shapes_only():
        expected = shapes_of(getattr(torchvision.models, arch)(weights=None))
    assert shapes_of(meta_model(arch)) == expected


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_weights_load_and_compute_the_same(arch):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, arch)(weights=None).eval()
    model = build_model(arch).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))


@pytest.mark.parametrize(
    "arch, dynamic, total, without_decoders",
    [
        ("resnet18", True, 12_140_744, 11_917_120),
        ("resnet50", True, 31_568_328, 28_574_096),
        ("resnet18", False, 11_689_512, 11_689_512),
        ("resnet50", False, 25_557_032, 25_557_032),
    ],
)
def test_parameter_counts_are_the_specs(arch, dynamic, total, without_decoders):
    assert count_params(meta_model(arch, dynamic=dynamic)) == (total, without_decoders)


def test_pedconv_sits_where_the_release_puts_it():
    for arch, count in [("resnet18", 16), ("resnet34", 32), ("resnet50", 48), ("resnet101", 99), ("resnet50d", 48)]:
        model = meta_model(arch, dynamic=True)
        dynamic = [name for name, m in model.named_modules() if isinstance(m, PEDConv2d)]
        assert len(dynamic) == count, arch
        assert all(name.startswith("layer") and "downsample" not in name for name in dynamic)
        assert not any(isinstance(m, PEDConv2d) for m in meta_model(arch).modules())


def test_resnet50d_is_the_releases_layout():
    model = meta_model("resnet50d", dynamic=True)
    assert [tuple(model.get_parameter(f"conv{i}.weight").shape) for i in (1, 2, 3)] == [
        (32, 3, 3, 3), (32, 32, 3, 3), (64, 32, 3, 3)]
    assert isinstance(model.maxpool, nn.Identity)
    for stage in range(1, 5):
        first = model.get_submodule(f"layer{stage}.0")
        assert first.conv2.stride == (2, 2)
        assert isinstance(first.downsample[0], nn.AvgPool2d) and first.downsample[1].stride == (1, 1)
    # 7x7 stem (9,408 + 128 BN) -> 3x3 deep stem (28,512 + 256 BN)
    assert count_params(model)[0] == 31_568_328 + 19_232
    small = build_model("resnet50d", dynamic=True, wmul=0.25, num_classes=7)
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_width_multiplier_follows_the_releases_rules():
    narrow = meta_model("resnet18", wmul=0.5)
    assert narrow.conv1.out_channels == 32 and narrow.layer4[1].conv2.out_channels == 256
    assert narrow.fc.in_features == 256
    bottleneck = meta_model("resnet50", wmul=0.5)
    assert bottleneck.conv1.out_channels == 64  # stem and block outputs stay
    assert [bottleneck.get_submodule(f"layer{i}.0.conv1").out_channels for i in range(1, 5)] == [33, 65, 129, 257]
    assert bottleneck.layer1[0].conv3.out_channels == 256 and bottleneck.fc.in_features == 2048
    assert shapes_of(meta_model("resnet50", wmul=2.0)) == shapes_of(meta_model("resnet50"))
    with pytest.raises(ValueError, match="wmul"):
        build_model("resnet18", wmul=0)


def test_lookup_by_name_and_unknown_names():
    assert set(ARCHITECTURES) == {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet50d",
                                  "resnext101-32x4d", "se-resnext101-32x4d", "mobilenet_v2", "efficientnet-b0",
                                  "efficientnet-b4"}
    for name in ARCHITECTURES:
        assert getattr(models, name.replace("-", "_")).__name__ == name.replace("-", "_")
    model = models.resnet18(dynamic=True, num_classes=10, wmul=0.25, rank=2, method="unfold")
    assert model.arch == {"name": "resnet18", "dynamic": True, "wmul": 0.25, "num_classes": 10}
    assert all(m.rank == 2 and m.method == "unfold" for m in models.dynamic_layers(model))
    with pytest.raises(ValueError, match="unknown architecture 'resnet19'; valid: resnet18, resnet34, resnet50"):
        build_model("resnet19")
    with pytest.raises(ValueError, match="valid: classic, fanout"):
        build_model("resnet18", config="kaiming")
    with pytest.raises(ValueError, match="dynamic=True"):
        build_model("resnet18", rank=2)
    with pytest.raises(ValueError, match="reference"):
        models.set_pedconv_method(model, "fastest")


# ---------------------------------------------------------------------------------------------------------------
# Initialization configs


def std(tensor):
    return tensor.float().std().item()


def conv_std(conv, mode):
    out_channels, in_per_group, kh, kw = conv.weight.shape
    fan = (in_per_group if mode == "fan_in" else out_channels) * kh * kw
    return math.sqrt(2.0 / fan)


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("config, mode", [("classic", "fan_out"), ("fanout", "fan_out"), ("fanin", "fan_in"),
                                          ("grp-fanin", "fan_in"), ("release", "fan_out")])
def test_each_config_sets_the_documented_init(config, mode, dynamic):
    torch.manual_seed(0)
    model = build_model("resnet18", dynamic=dynamic, wmul=0.5, config=config)
    conv = model.layer2[0].conv1  # 32 -> 64 channels: fan_in 288, fan_out 576
    assert isinstance(conv, PEDConv2d) == dynamic
    assert std(conv.weight) == pytest.approx(conv_std(conv, mode), rel=0.05)
    assert std(model.conv1.weight) == pytest.approx(conv_std(model.conv1, mode), rel=0.05)
    bn_weight = 0.5 if config == "release" else 1.0
    assert all(torch.all(m.weight == bn_weight) and torch.all(m.bias == 0)
               for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    bound = 1 / math.sqrt(model.fc.in_features)
    if config == "release":
        assert std(model.fc.weight) == pytest.approx(0.01, rel=0.05) and torch.all(model.fc.bias == 0)
    else:  # PyTorch's Linear default: uniform in +-1/sqrt(fan_in)
        assert model.fc.weight.abs().max() <= bound and std(model.fc.weight) > 0.5 * bound / math.sqrt(3)
        assert model.fc.bias.abs().max() > 0
    gate_linears = [m for layer in models.dynamic_layers(model) for m in layer.attn.modules() if isinstance(m, nn.Linear)]
    assert len(gate_linears) == (6 * 16 if dynamic else 0)
    if dynamic:  # gate generators and decoders: N(0, 0.01^2), zero bias (gates start near 0.5) under every config
        assert std(torch.cat([m.weight.flatten() for m in gate_linears])) == pytest.approx(0.01, rel=0.05)
        assert all(torch.all(m.bias == 0) for m in gate_linears)


def test_default_config_is_the_releases_for_dynamic_models_and_classic_for_static():
    assert torch.all(models.resnet18(dynamic=True, wmul=0.25).bn1.weight == 0.5)
    assert torch.all(models.resnet18(wmul=0.25).bn1.weight == 1.0)
    assert models.MODEL_CONFIGS["fanout"] == models.MODEL_CONFIGS["classic"]


@pytest.mark.parametrize("arch, last", [("resnet18", "bn2"), ("resnet50", "bn3")])
def test_zero_init_last_bn(arch, last):
    model = build_model(arch, wmul=0.25, config="fanin", zero_init_last_bn=True)
    blocks = [m for m in model.modules() if isinstance(m, (models.BasicBlock, models.Bottleneck))]
    assert blocks and all(torch.all(getattr(b, last).weight == 0) for b in blocks)
    assert all(torch.all(b.bn1.weight == 1) for b in blocks)
    assert torch.all(model.bn1.weight == 1)


# ---------------------------------------------------------------------------------------------------------------
# Memory formats, autocast, torch.compile (narrow models, small images)


def narrow(depth=(2, 2, 2, 2)):
    torch.manual_seed(0)
    model = ResNet(BasicBlock, depth, num_classes=10, wmul=0.25, dynamic=True, noise_std=0.0)
    with torch.no_grad():  # spread the gates so that a wrong gate would show
        for layer in models.dynamic_layers(model):
            for linear in layer.attn.modules():
                if isinstance(linear, nn.Linear):
                    linear.weight.normal_(0, 0.3)
    return model


def step(model, x, labels, run=None):
    """Output and every parameter's gradient of one training forward + backward (task + info-max loss), calling
    ``run`` (a wrapper of ``model``, e.g. compiled) if given."""
    model.zero_grad(set_to_none=True)
    run = model if run is None else run
    out = run(x)
    loss = nn.functional.cross_entropy(out.float(), labels) + 1e-3 * pedconv.info_max_loss(run)
    loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_grads_close(got, expected, rel=1e-4):
    """Every gradient equal up to float32 rounding, relative to the largest entry of that gradient."""
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=rel, atol=rel * grad.abs().max().item() + 1e-12, msg=name)


def batch(size=32, n=4):
    torch.manual_seed(1)
    return torch.randn(n, 3, size, size), torch.randint(0, 10, (n,))


@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-9), (torch.float32, 1e-2)])
def test_channels_last_model_matches_nchw(dtype, rel):
    """float64 shows any layout mistake exactly; float32 runs oneDNN's channels_last kernels (whose rounding,
    through BatchNorm on 1x1 maps, reaches 1e-3 of the largest entry of some gate gradients)."""
    x, labels = batch()
    x = x.to(dtype)
    out, grads = step(narrow().to(dtype), x, labels)
    model_cl = narrow().to(dtype=dtype, memory_format=torch.channels_last)
    out_cl, grads_cl = step(model_cl, x.contiguous(memory_format=torch.channels_last), labels)
    torch.testing.assert_close(out_cl, out, rtol=rel, atol=rel * out.abs().max().item())
    assert_grads_close(grads_cl, grads, rel=rel)


def test_bfloat16_autocast_on_cpu():
    x, labels = batch()
    model = narrow()
    reference, _ = step(model, x, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = step(model, x.contiguous(memory_format=torch.channels_last), labels)
    assert out.dtype == torch.bfloat16
    assert all(torch.isfinite(g).all() and g.dtype == torch.float32 for g in grads.values())
    assert any(g.abs().sum() > 0 for name, g in grads.items() if "attn.fc_k" in name)
    torch.testing.assert_close(out.float(), reference, rtol=0.1, atol=0.1)


def test_torch_compile_forward_and_backward_match_eager():
    """The whole model in one graph (fullgraph: no graph break), forward and backward through AOTAutograd.

    The aot_eager backend traces exactly what inductor gets; inductor's code generation for the PEDConv ops is
    tested on a layer in test_pedconv.py (a cold inductor build of this model takes minutes on a 2-core CPU).
    """
    x, labels = batch(n=2)
    eager = narrow(depth=(1, 1, 1, 1))
    out, grads = step(eager, x, labels)
    compiled_model = narrow(depth=(1, 1, 1, 1))
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    out_compiled, grads_compiled = step(compiled_model, x, labels, run=compiled)
    torch.testing.assert_close(out_compiled, out, rtol=1e-4, atol=1e-5)
    assert_grads_close(grads_compiled, grads, rel=1e-3)
    assert pedconv.info_max_loss(compiled) > 0
