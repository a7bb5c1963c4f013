"""NVIDIA DLE's ResNet-50 as its checkpoints hold it, written from their image_classification/models/resnet.py, and
an independent forward pass over those keys (plain functional ops), for the checkpoint-compatibility tests; the
same for their EfficientNet-B0/B4 (models/efficientnet.py, common.py), at the end.

Their layout: ``conv1``/``bn1`` stem (7x7/2 conv, 3x3/2 max pool), the four stages in one ``nn.Sequential`` called
``layers`` (``layers.0`` ... ``layers.3``), each block ``conv1`` 1x1, ``bn1``, ``conv2`` 3x3 (the stage's stride:
v1.5), ``bn2``, ``conv3`` 1x1 to 4x the width, ``bn3``, and in each stage's first block ``downsample.0`` (1x1 conv,
the stride) and ``downsample.1`` (BatchNorm); ``fc``. Convs have no bias. Their optimizer: SGD with two groups,
the parameters whose name contains "bn" (no weight decay), then the others.
"""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

BLOCKS = (3, 4, 6, 3)
WIDTHS = (64, 128, 256, 512)
EXPANSION = 4
BN_ENTRIES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def nvidia_resnet50_shapes(num_classes: int = 1000) -> List[Tuple[str, Tuple[int, ...]]]:
    """(key, shape) of their ResNet-50's state_dict, in their module order."""
    return nvidia_resnet_shapes(BLOCKS, WIDTHS, EXPANSION, 1, False, num_classes)


# Their resnext101-32x4d / se-resnext101-32x4d (models/resnet.py's resnet_configs): layers 3, 4, 23, 3, widths
# 128..1024, expansion 2, cardinality 32 (the 3x3 convs' groups); SEBottleneck adds ``squeeze`` =
# SqueezeAndExcitation(planes * expansion, 16): Linears ``squeeze.squeeze`` (to 16 features) and ``squeeze.expand``.
RESNEXT101 = dict(blocks=(3, 4, 23, 3), widths=(128, 256, 512, 1024), expansion=2, groups=32)


def nvidia_resnet_shapes(blocks, widths, expansion, groups=1, se=False,
                         num_classes: int = 1000) -> List[Tuple[str, Tuple[int, ...]]]:
    """(key, shape) of one of their ResNet-family models' state_dict, in their module order."""
    entries: List[Tuple[str, Tuple[int, ...]]] = []

    def bn(name, channels):
        for entry in BN_ENTRIES:
            entries.append((f"{name}.{entry}", () if entry == "num_batches_tracked" else (channels,)))

    entries.append(("conv1.weight", (64, 3, 7, 7)))
    bn("bn1", 64)
    inplanes = 64
    for stage, (count, width) in enumerate(zip(blocks, widths)):
        for block in range(count):
            prefix = f"layers.{stage}.{block}"
            entries.append((f"{prefix}.conv1.weight", (width, inplanes, 1, 1)))
            bn(f"{prefix}.bn1", width)
            entries.append((f"{prefix}.conv2.weight", (width, width // groups, 3, 3)))
            bn(f"{prefix}.bn2", width)
            entries.append((f"{prefix}.conv3.weight", (width * expansion, width, 1, 1)))
            bn(f"{prefix}.bn3", width * expansion)
            if block == 0:
                entries.append((f"{prefix}.downsample.0.weight", (width * expansion, inplanes, 1, 1)))
                bn(f"{prefix}.downsample.1", width * expansion)
            if se:
                entries += [(f"{prefix}.squeeze.squeeze.weight", (16, width * expansion)),
                            (f"{prefix}.squeeze.squeeze.bias", (16,)),
                            (f"{prefix}.squeeze.expand.weight", (width * expansion, 16)),
                            (f"{prefix}.squeeze.expand.bias", (width * expansion,))]
            inplanes = width * expansion
    entries.append(("fc.weight", (num_classes, inplanes)))
    entries.append(("fc.bias", (num_classes,)))
    return entries


def random_nvidia_resnet50(seed: int = 0, num_classes: int = 1000) -> Dict[str, torch.Tensor]:
    """A state_dict in their names with values away from any initialization (BatchNorm statistics included)."""
    return random_state(nvidia_resnet50_shapes(num_classes), seed)


def random_state(shapes: List[Tuple[str, Tuple[int, ...]]], seed: int = 0) -> Dict[str, torch.Tensor]:
    """A state_dict of these (key, shape) entries with values away from any initialization: BatchNorm weights and
    variances in [0.5, 1.5), convs N(0, 1 / fan_in), other entries (biases, means, Linears) N(0, 0.1^2)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes:
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000)
        elif key.endswith("running_var") or (key.endswith(".weight") and len(shape) == 1):
            state[key] = 0.5 + torch.rand(shape, generator=generator)
        elif len(shape) == 4:
            fan_in = shape[1] * shape[2] * shape[3]
            state[key] = torch.randn(shape, generator=generator) * (1.0 / fan_in) ** 0.5
        else:
            state[key] = 0.1 * torch.randn(shape, generator=generator)
    return state


def nvidia_parameter_names(state: Dict[str, torch.Tensor]) -> List[str]:
    """Their named_parameters order: the state_dict's keys without the BatchNorm buffers."""
    return [key for key in state if not key.endswith(("running_mean", "running_var", "num_batches_tracked"))]


def nvidia_optimizer_state(state: Dict[str, torch.Tensor], seed: int = 1) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """Their SGD's state_dict (groups: names with "bn", then the rest) with a distinct momentum buffer per
    parameter; also the buffers by parameter name, to check what a loader made of it."""
    generator = torch.Generator().manual_seed(seed)
    names = nvidia_parameter_names(state)
    params = {name: state[name].clone().requires_grad_(True) for name in names}
    with_bn = [params[name] for name in names if "bn" in name]
    rest = [params[name] for name in names if "bn" not in name]
    optimizer = torch.optim.SGD([{"params": with_bn, "weight_decay": 0}, {"params": rest, "weight_decay": 3e-5}],
                                lr=0.256, momentum=0.875, weight_decay=3e-5)
    buffers = {}
    for name, param in params.items():
        buffers[name] = torch.randn(param.shape, generator=generator)
        optimizer.state[param]["momentum_buffer"] = buffers[name].clone()
    return optimizer.state_dict(), buffers


def _bn(x, state, name):
    return F.batch_norm(x, state[f"{name}.running_mean"], state[f"{name}.running_var"], state[f"{name}.weight"],
                        state[f"{name}.bias"], training=False, eps=1e-5)


def nvidia_resnet50_forward(state: Dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Their ResNet-50's eval-mode forward over their keys (stem, v1.5 bottlenecks, average pool, fc)."""
    x = F.relu(_bn(F.conv2d(x, state["conv1.weight"], stride=2, padding=3), state, "bn1"))
    x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    for stage, count in enumerate(BLOCKS):
        for block in range(count):
            prefix = f"layers.{stage}.{block}"
            stride = 2 if stage > 0 and block == 0 else 1
            out = F.relu(_bn(F.conv2d(x, state[f"{prefix}.conv1.weight"]), state, f"{prefix}.bn1"))
            out = F.relu(_bn(F.conv2d(out, state[f"{prefix}.conv2.weight"], stride=stride, padding=1), state,
                             f"{prefix}.bn2"))
            out = _bn(F.conv2d(out, state[f"{prefix}.conv3.weight"]), state, f"{prefix}.bn3")
            if block == 0:
                x = _bn(F.conv2d(x, state[f"{prefix}.downsample.0.weight"], stride=stride), state,
                        f"{prefix}.downsample.1")
            x = F.relu(out + x)
    return F.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1), state["fc.weight"], state["fc.bias"])


# Their EfficientNets (models/efficientnet.py): effnet_b0_layers and EffNetArch.scale(wc, dc) (B4: 1.4, 1.8), written
# out again here, independently of image_classification/efficientnet.py. Per stage: kernel, stride, repeats,
# expansion, channels. Keys: stem.conv/bn, layers.<stage>.block<j>.{expand,depsep,proj}.{conv,bn} and
# .se.{squeeze,expand} (Linears; SequentialSqueezeAndExcitation, squeeze width int(0.25 * block input)),
# features.conv/bn, classifier.fc. BatchNorm eps 1e-3; SiLU after every conv but proj.
EFFNET_B0 = dict(kernel=(3, 3, 5, 3, 5, 5, 3), stride=(1, 2, 2, 2, 1, 2, 1), repeat=(1, 2, 2, 3, 3, 4, 1),
                 expansion=(1, 6, 6, 6, 6, 6, 6), channels=(16, 24, 40, 80, 112, 192, 320))
EFFNET_COEFFICIENTS = {"efficientnet-b0": (1.0, 1.0), "efficientnet-b4": (1.4, 1.8)}  # width, depth


def _scale_width(channels: int, coefficient: float, divisor: int = 8) -> int:
    """Their EffNetArch._scale_width."""
    channels *= coefficient
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * channels else rounded


def nvidia_efficientnet_blocks(name: str):
    """(key prefix, kernel, stride, in channels, out channels, expansion) of each block, then the stem and head
    widths: ``(blocks, stem, head)``."""
    width, depth = EFFNET_COEFFICIENTS[name]
    blocks, channels = [], _scale_width(32, width)
    stem = channels
    for stage in range(7):
        out = _scale_width(EFFNET_B0["channels"][stage], width)
        for block in range(int(math.ceil(EFFNET_B0["repeat"][stage] * depth))):
            stride = EFFNET_B0["stride"][stage] if block == 0 else 1
            blocks.append((f"layers.{stage}.block{block}", EFFNET_B0["kernel"][stage], stride, channels, out,
                           EFFNET_B0["expansion"][stage]))
            channels = out
    return blocks, stem, _scale_width(1280, width)


def nvidia_efficientnet_shapes(name: str, num_classes: int = 1000) -> List[Tuple[str, Tuple[int, ...]]]:
    """(key, shape) of their EfficientNet's state_dict, in their module order."""
    entries: List[Tuple[str, Tuple[int, ...]]] = []

    def conv_bn(prefix, out_channels, in_per_group, kernel):
        entries.append((f"{prefix}.conv.weight", (out_channels, in_per_group, kernel, kernel)))
        for entry in BN_ENTRIES:
            entries.append((f"{prefix}.bn.{entry}", () if entry == "num_batches_tracked" else (out_channels,)))

    blocks, stem, head = nvidia_efficientnet_blocks(name)
    conv_bn("stem", stem, 3, 3)
    for prefix, kernel, _, in_channels, out_channels, expansion in blocks:
        hidden = in_channels * expansion
        squeeze = max(1, int(in_channels * 0.25))
        if hidden != in_channels:
            conv_bn(f"{prefix}.expand", hidden, in_channels, 1)
        conv_bn(f"{prefix}.depsep", hidden, 1, kernel)
        entries += [(f"{prefix}.se.squeeze.weight", (squeeze, hidden)), (f"{prefix}.se.squeeze.bias", (squeeze,)),
                    (f"{prefix}.se.expand.weight", (hidden, squeeze)), (f"{prefix}.se.expand.bias", (hidden,))]
        conv_bn(f"{prefix}.proj", out_channels, hidden, 1)
    conv_bn("features", head, blocks[-1][4], 1)
    entries += [("classifier.fc.weight", (num_classes, head)), ("classifier.fc.bias", (num_classes,))]
    return entries


def nvidia_efficientnet_forward(name: str, state: Dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Their EfficientNet's eval-mode forward over their keys (no dropout, no stochastic depth in eval)."""

    def conv_bn(x, prefix, stride=1, groups=1, act=True):
        weight = state[f"{prefix}.conv.weight"]
        x = F.conv2d(x, weight, stride=stride, padding=(weight.shape[-1] - 1) // 2, groups=groups)
        x = F.batch_norm(x, state[f"{prefix}.bn.running_mean"], state[f"{prefix}.bn.running_var"],
                         state[f"{prefix}.bn.weight"], state[f"{prefix}.bn.bias"], training=False, eps=1e-3)
        return F.silu(x) if act else x

    blocks, _, _ = nvidia_efficientnet_blocks(name)
    x = conv_bn(x, "stem", stride=2)
    for prefix, _, stride, in_channels, out_channels, expansion in blocks:
        out = conv_bn(x, f"{prefix}.expand") if expansion != 1 else x
        out = conv_bn(out, f"{prefix}.depsep", stride, groups=out.shape[1])
        scale = F.linear(out.mean((2, 3)), state[f"{prefix}.se.squeeze.weight"], state[f"{prefix}.se.squeeze.bias"])
        scale = torch.sigmoid(F.linear(F.silu(scale), state[f"{prefix}.se.expand.weight"],
                                       state[f"{prefix}.se.expand.bias"]))
        out = conv_bn(out * scale[:, :, None, None], f"{prefix}.proj", act=False)
        x = x + out if stride == 1 and in_channels == out_channels else out
    x = conv_bn(x, "features")
    return F.linear(x.mean((2, 3)), state["classifier.fc.weight"], state["classifier.fc.bias"])
