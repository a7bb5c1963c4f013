"""ResNets, static and PEDConv, with the authors' release's names, placement, widths and initialization.

Architectures (``ARCHITECTURES``; build one by name with :func:`build_model`):

==========  ============  ================  =====================================================================
name        block         blocks per stage  stem and shortcuts
==========  ============  ================  =====================================================================
resnet18    basic         2, 2, 2, 2        torchvision's: 7x7/2 conv, 3x3/2 max pool; 1x1/2 conv shortcuts
resnet34    basic         3, 4, 6, 3        as resnet18
resnet50    bottleneck    3, 4, 6, 3        as resnet18; v1.5 (the stride is on the 3x3 conv), as torchvision
resnet101   bottleneck    3, 4, 23, 3       as resnet50
resnet152   bottleneck    3, 8, 36, 3       as resnet50
resnet50d   bottleneck    3, 4, 6, 3        the release's: deep stem (3x3 convs 3->32/2, 32->32, 32->64, named
                                            conv1/bn1, conv2/bn2, conv3/bn3), no max pool, every stage (layer1
                                            too) strides by 2; shortcuts are 2x2 average pool, 1x1 conv, BN
                                            (downsample.0/.1/.2)
resnext101  bottleneck,   3, 4, 23, 3       NVIDIA's resnext101-32x4d: as resnet50's stem and shortcuts; inner
-32x4d      3x3 in 32                       widths 128, 256, 512, 1024, block outputs 2x (256...2048)
            groups
se-resnext  as resnext    3, 4, 23, 3       NVIDIA's: as resnext101-32x4d plus their squeeze-and-excitation
101-32x4d   + SE                            (``squeeze``: Linear to 16 features, ReLU, Linear, sigmoid) scaling
                                            the residual branch before the addition
==========  ============  ================  =====================================================================

``mobilenet_v2`` is torchvision's MobileNetV2 (:mod:`image_classification.mobilenet`, which states its PEDConv
placement and width rule); ``efficientnet-b0`` and ``efficientnet-b4`` are NVIDIA's EfficientNets
(:mod:`image_classification.efficientnet`, likewise); :func:`build_model` builds them too, with the same
``config``/``zero_init_last_bn`` (the static EfficientNets default to NVIDIA's initialization, ``fanin``).

Module names are torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer2.0.downsample.0``, ``fc``...), so
static models load torchvision's ResNet weights, and ``dynamic=True`` models load the release's checkpoints
(their keys and shapes are exactly the release's: ``attn.fc_share``... come from :class:`pedconv.PEDConv2d`).
The release's resnet50d is not timm's ``resnet50d`` (timm keeps the max pool, strides layer1 by 1 and names the
stem ``conv1.0``/``conv1.1``/...); timm weights do not load into it.

``dynamic=True`` puts :class:`pedconv.PEDConv2d` exactly where the release does: every conv of every residual block
(both 3x3 convs of a basic block, the three convs of a bottleneck, 1x1 ones included); never the stem, the
shortcut convs or the classifier. ResNeXt's grouped 3x3 convs become PEDConv's grouped form; SE's Linears stay static.

``wmul`` is the release's width multiplier, with the release's two rules: for basic-block networks (resnet18/34)
every width (stem, stages, classifier input) is ``int(wmul * width)``; for bottleneck networks only the inner
widths of the blocks change, to ``min(int(wmul * width) + 1, width)`` (so ``wmul >= 1`` is the full model), the
block outputs (256...2048), the stem and the classifier input stay. Grouped (ResNeXt) inner widths are further rounded down to a multiple
of the groups, at least the groups.

Initialization (``config``, the CLI's ``-c/--model-config``; see ``MODEL_CONFIGS``):

- ``classic`` (alias ``fanout``, and ``grp-fanout``): torchvision's and DLE's default. Convs (PEDConv base kernels
  included) Kaiming normal, fan_out, ReLU gain; BatchNorm weight 1, bias 0; the classifier keeps PyTorch's Linear
  default; PEDConv gate generators keep their own init (every Linear N(0, 0.01^2), zero bias: gates start near 0.5).
- ``fanin`` (alias ``grp-fanin``): as ``classic`` with Kaiming normal fan_in (DLE's ``fanin``). The authors'
  command passes ``-c fanin`` (their code ignored it); here it selects this.
- ``release``: what the release really does whatever ``-c`` says: convs Kaiming normal fan_out ReLU; every Linear
  (gate generators, info-max decoders and the classifier) N(0, 0.01^2) with zero bias; every BatchNorm weight 0.5,
  bias 0.

The default is ``release`` for dynamic models and ``classic`` for static ones (``fanin``, NVIDIA's, for the
static EfficientNets). ``zero_init_last_bn=True`` also sets
the weight of each block's last BatchNorm (bn2 of a basic block, bn3 of a bottleneck) to 0 (DLE's
``last_bn_0_init``), under any config. ``grp-*`` are the DLE names for grouped-conv models; ResNets have no grouped
convs, so they equal ``fanin``/``classic``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn

import pedconv
from pedconv import PEDConv2d
import choices
from errors import UserError

from . import efficientnet, mobilenet
from .squeeze import SqueezeExcitation

ConvFactory = Callable[..., nn.Module]


# ----------------------------------------------------------------------------------------------------------------
# Initialization configs


@dataclass(frozen=True)
class ModelConfig:
    """How :func:`initialize` sets a model's parameters.

    conv_mode: Kaiming normal mode ("fan_out" or "fan_in", ReLU gain) of every conv and PEDConv base kernel.
    bn_weight: initial weight of every BatchNorm (bias 0).
    linear_std: None keeps PyTorch's Linear default for the classifier; a float draws every Linear of the model
        (classifier, gate generators, decoders) from N(0, linear_std^2) with zero bias.
    """

    conv_mode: str
    bn_weight: float
    linear_std: Optional[float]


MODEL_CONFIGS: Dict[str, ModelConfig] = {
    "classic": ModelConfig("fan_out", 1.0, None),
    "fanout": ModelConfig("fan_out", 1.0, None),
    "grp-fanout": ModelConfig("fan_out", 1.0, None),
    "fanin": ModelConfig("fan_in", 1.0, None),
    "grp-fanin": ModelConfig("fan_in", 1.0, None),
    "release": ModelConfig("fan_out", 0.5, 0.01),
}


def default_config(dynamic: bool, arch: Optional[str] = None) -> str:
    """The config a model gets when none is named: the release's for PEDConv models, otherwise ``classic``, except
    for NVIDIA's EfficientNets, which get theirs (``fanin``)."""
    if dynamic:
        return "release"
    return "fanin" if arch in efficientnet.VARIANTS else "classic"


def get_config(name: str) -> ModelConfig:
    if name not in MODEL_CONFIGS:
        raise UserError(f"unknown model config {name!r}; valid: {', '.join(MODEL_CONFIGS)}")
    return MODEL_CONFIGS[name]


def last_batchnorms(model: nn.Module) -> List[nn.BatchNorm2d]:
    """The last BatchNorm of every residual block (the one before the addition; MobileNetV2's and EfficientNet's
    blocks without an addition have none)."""
    blocks = (BasicBlock, Bottleneck, mobilenet.InvertedResidual, efficientnet.MBConv)
    return [block.last_bn for block in model.modules() if isinstance(block, blocks) and block.last_bn is not None]


def initialize(model: nn.Module, config: Union[str, ModelConfig], zero_init_last_bn: bool = False) -> nn.Module:
    """Set every parameter of ``model`` (in place) as ``config`` says; see the module docstring. Returns it."""
    cfg = get_config(config) if isinstance(config, str) else config
    gate_linears = set()
    for module in model.modules():
        if isinstance(module, PEDConv2d):
            module.attn.reset_parameters()  # the gate generator's own init, N(0, 0.01^2)
            gate_linears.update(id(m) for m in module.attn.modules())
        if isinstance(module, (nn.Conv2d, PEDConv2d)):
            nn.init.kaiming_normal_(module.weight, mode=cfg.conv_mode, nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            nn.init.constant_(module.weight, cfg.bn_weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and cfg.linear_std is not None:
            nn.init.normal_(module.weight, 0.0, cfg.linear_std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and id(module) not in gate_linears:
            module.reset_parameters()
    if zero_init_last_bn:
        for bn in last_batchnorms(model):
            nn.init.zeros_(bn.weight)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Blocks


def _shortcut(in_channels: int, out_channels: int, stride: int, avg_down: bool) -> Optional[nn.Sequential]:
    if stride == 1 and in_channels == out_channels:
        return None
    if not avg_down:  # torchvision: downsample.0 conv (strided), downsample.1 BN
        return nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
        )
    # ResNet-D: downsample.0 average pool (identity at stride 1), downsample.1 conv, downsample.2 BN
    pool = nn.AvgPool2d(stride, stride) if stride > 1 else nn.Identity()
    return nn.Sequential(pool, nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))


class BasicBlock(nn.Module):
    """Two 3x3 convs (the first strided) and a shortcut; torchvision's names."""

    expansion = 1
    __jit_unused_properties__ = ["last_bn"]  # Python-side only; lets torch.jit.script compile the block (--jit script)

    def __init__(self, in_channels: int, width: int, out_channels: int, stride: int, conv: ConvFactory,
                 avg_down: bool = False) -> None:
        super().__init__()
        self.conv1 = conv(in_channels, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv(width, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = _shortcut(in_channels, out_channels, stride, avg_down)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1, 3x3 (strided: ResNet v1.5; grouped for ResNeXt), 1x1 convs and a shortcut; torchvision's names.
    With ``se``, NVIDIA's SE-ResNeXt block: the residual branch is scaled by :class:`SqueezeExcitation`
    (``squeeze``) before the addition."""

    expansion = 4
    __jit_unused_properties__ = ["last_bn"]

    def __init__(self, in_channels: int, width: int, out_channels: int, stride: int, conv: ConvFactory,
                 avg_down: bool = False, groups: int = 1, se: bool = False) -> None:
        super().__init__()
        self.conv1 = conv(in_channels, width, 1, 1, 0, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv(width, out_channels, 1, 1, 0, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, out_channels, stride, avg_down)
        self.squeeze = SqueezeExcitation(out_channels) if se else None

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.squeeze is not None:
            out = out * self.squeeze(out)
        out += identity
        return self.relu(out)


# ----------------------------------------------------------------------------------------------------------------
# The network

STAGE_WIDTHS = (64, 128, 256, 512)
RESNEXT_WIDTHS = (128, 256, 512, 1024)  # NVIDIA's resnext101-32x4d: inner widths, block output = 2x


def stage_widths(block: Type[nn.Module], wmul: float, base: Sequence[int] = STAGE_WIDTHS,
                 expansion: Optional[int] = None, groups: int = 1) -> List[tuple]:
    """(inner width, output width) of each stage under the release's width multiplier rules; for grouped blocks
    the inner width is further rounded down to a multiple of ``groups`` (at least ``groups``)."""
    if wmul <= 0:
        raise UserError(f"wmul must be positive, got {wmul}")
    if block is BasicBlock:
        return [(int(wmul * w), int(wmul * w)) for w in base]
    expansion = expansion or block.expansion
    return [(max(groups, min(int(wmul * w) + 1, w) // groups * groups), w * expansion) for w in base]


class ResNet(nn.Module):
    """A ResNet with torchvision's module names; see the module docstring for the variants.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: blocks per stage (four stages).
        num_classes: classifier outputs.
        wmul: the release's width multiplier (see the module docstring).
        dynamic: PEDConv in every block conv (the release's placement), else ``nn.Conv2d``.
        deep_stem: the release's ResNet-D: deep stem, no max pool, layer1 strided, average-pool shortcuts.
        config, zero_init_last_bn: initialization, see :func:`initialize` (config None: :func:`default_config`).
        name: the architecture name recorded in :attr:`arch` (checkpoints store it).
        base_widths, expansion, groups, se: the stages' inner widths, block output / inner width (None: the
            block's), the 3x3 convs' groups (ResNeXt's cardinality) and NVIDIA's SE (bottlenecks only).
        pedconv_kwargs: passed to every :class:`pedconv.PEDConv2d` (``reduction``, ``rank``, ``noise_std``,
            ``info_max``, ``method``).
    """

    __constants__ = ["deep_stem"]  # lets torch.jit.script drop the branch of the stem this model lacks

    def __init__(
        self,
        block: Type[nn.Module],
        layers: Sequence[int],
        num_classes: int = 1000,
        wmul: float = 1.0,
        dynamic: bool = False,
        deep_stem: bool = False,
        config: Optional[str] = None,
        zero_init_last_bn: bool = False,
        name: Optional[str] = None,
        base_widths: Sequence[int] = STAGE_WIDTHS,
        expansion: Optional[int] = None,
        groups: int = 1,
        se: bool = False,
        **pedconv_kwargs,
    ) -> None:
        super().__init__()
        if len(layers) != 4:
            raise UserError(f"a ResNet has four stages, got layers={list(layers)}")
        if pedconv_kwargs and not dynamic:
            raise UserError(f"PEDConv options {sorted(pedconv_kwargs)} need dynamic=True")
        self.arch = {"name": name, "dynamic": bool(dynamic), "wmul": float(wmul), "num_classes": int(num_classes)}
        conv: ConvFactory = functools.partial(PEDConv2d, **pedconv_kwargs) if dynamic else nn.Conv2d
        widths = stage_widths(block, wmul, base_widths, expansion, groups)
        grouping = {"groups": groups, "se": se} if block is Bottleneck else {}
        stem_width = int(wmul * 64) if block is BasicBlock else 64
        if deep_stem:
            self.conv1 = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(32)
            self.conv2 = nn.Conv2d(32, 32, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(32)
            self.conv3 = nn.Conv2d(32, stem_width, 3, 1, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(stem_width)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, stem_width, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(stem_width)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.deep_stem = deep_stem
        self.relu = nn.ReLU(inplace=True)
        channels = stem_width
        for index, ((width, out_channels), count) in enumerate(zip(widths, layers)):
            stride = 2 if index > 0 or deep_stem else 1
            blocks = []
            for i in range(count):
                blocks.append(block(channels, width, out_channels, stride if i == 0 else 1, conv, deep_stem,
                                    **grouping))
                channels = out_channels
            setattr(self, f"layer{index + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        initialize(self, config or default_config(dynamic), zero_init_last_bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        if self.deep_stem:
            x = self.relu(self.bn2(self.conv2(x)))
            x = self.relu(self.bn3(self.conv3(x)))
        x = self.maxpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class Layout(NamedTuple):
    """A ResNet-family architecture: block, blocks per stage, deep stem, inner widths, block output / inner width
    (None: the block's), groups of the 3x3 convs, NVIDIA's SE."""

    block: Type[nn.Module]
    layers: Tuple[int, ...]
    deep_stem: bool = False
    base_widths: Tuple[int, ...] = STAGE_WIDTHS
    expansion: Optional[int] = None
    groups: int = 1
    se: bool = False


# One entry per ResNet-family name of choices.ARCHITECTURES; the others are in _OTHER_FAMILIES
# (tests/test_choices.py checks that together they are the list).
_LAYOUTS = {
    "resnet18": Layout(BasicBlock, (2, 2, 2, 2)),
    "resnet34": Layout(BasicBlock, (3, 4, 6, 3)),
    "resnet50": Layout(Bottleneck, (3, 4, 6, 3)),
    "resnet101": Layout(Bottleneck, (3, 4, 23, 3)),
    "resnet152": Layout(Bottleneck, (3, 8, 36, 3)),
    "resnet50d": Layout(Bottleneck, (3, 4, 6, 3), True),
    "resnext101-32x4d": Layout(Bottleneck, (3, 4, 23, 3), False, RESNEXT_WIDTHS, 2, 32),
    "se-resnext101-32x4d": Layout(Bottleneck, (3, 4, 23, 3), False, RESNEXT_WIDTHS, 2, 32, True),
}
# The families built as a static model first, then converted by their placement rule: name -> (static model from
# (name, num_classes, wmul), the family's pedconv.convert call).
_CONVERTED_FAMILIES = {
    "mobilenet_v2": (lambda name, num_classes, wmul: mobilenet.MobileNetV2(num_classes, wmul), mobilenet.to_pedconv),
    **{name: (efficientnet.EfficientNet, efficientnet.to_pedconv) for name in efficientnet.VARIANTS},
}
_OTHER_FAMILIES = tuple(_CONVERTED_FAMILIES)
ARCHITECTURES = choices.ARCHITECTURES


def default_image_size(arch: Optional[str]) -> int:
    """The crop size a run uses when none is given, as NVIDIA's main.py takes it from the architecture: 224, and
    an EfficientNet's own (efficientnet-b4: 380)."""
    if arch in efficientnet.VARIANTS:
        return efficientnet.VARIANTS[arch].image_size
    return 224


def check_arch(name: str) -> str:
    """``name`` if it is one of :data:`ARCHITECTURES`, else a UserError naming the valid ones."""
    if name not in ARCHITECTURES:
        raise UserError(f"unknown architecture {name!r}; valid: {', '.join(ARCHITECTURES)}")
    return name


def layout(name: str) -> Layout:
    """The :class:`Layout` of a ResNet-family architecture name; UserError naming the valid ones."""
    if name not in _LAYOUTS:
        if check_arch(name) in _OTHER_FAMILIES:
            raise UserError(f"{name} is not a ResNet: it has no ResNet layout")
    return _LAYOUTS[name]


def build_converted(name: str, dynamic: bool = False, num_classes: int = 1000, wmul: float = 1.0,
                    config: Optional[str] = None, zero_init_last_bn: bool = False, **pedconv_kwargs) -> nn.Module:
    """torchvision's MobileNetV2 or one of NVIDIA's EfficientNets; with ``dynamic`` its block convs become PEDConv
    (the rule of :mod:`image_classification.mobilenet` / :mod:`image_classification.efficientnet`), then every
    parameter is set by ``config`` (:func:`initialize`; None: :func:`default_config`)."""
    if pedconv_kwargs and not dynamic:
        raise UserError(f"PEDConv options {sorted(pedconv_kwargs)} need dynamic=True")
    static, to_pedconv = _CONVERTED_FAMILIES[name]
    model = static(name, num_classes, wmul)
    if dynamic:
        to_pedconv(model, **pedconv_kwargs)
    model.arch = {"name": name, "dynamic": bool(dynamic), "wmul": float(wmul), "num_classes": int(num_classes)}
    return initialize(model, config or default_config(dynamic, name), zero_init_last_bn)


def build_model(arch: str, dynamic: bool = False, num_classes: int = 1000, wmul: float = 1.0,
                **kwargs) -> nn.Module:
    """The architecture ``arch`` (one of ``ARCHITECTURES``); ``kwargs`` as :class:`ResNet`'s (``config``,
    ``zero_init_last_bn`` and PEDConv's options for every family)."""
    if arch in _CONVERTED_FAMILIES:
        return build_converted(arch, dynamic, num_classes, wmul, **kwargs)
    spec = layout(arch)
    return ResNet(spec.block, spec.layers, num_classes, wmul, dynamic, spec.deep_stem, name=arch,
                  base_widths=spec.base_widths, expansion=spec.expansion, groups=spec.groups, se=spec.se, **kwargs)


def _builder(arch: str):
    def build(dynamic: bool = False, num_classes: int = 1000, wmul: float = 1.0, **kwargs) -> nn.Module:
        return build_model(arch, dynamic, num_classes, wmul, **kwargs)

    build.__name__ = build.__qualname__ = arch.replace("-", "_")
    build.__doc__ = (
        f"{arch}(dynamic=False, num_classes=1000, wmul=1.0, *, config=None, zero_init_last_bn=False, "
        "**pedconv_kwargs): see :class:`ResNet` and the module docstring."
    )
    return build


resnet18 = _builder("resnet18")
resnet34 = _builder("resnet34")
resnet50 = _builder("resnet50")
resnet101 = _builder("resnet101")
resnet152 = _builder("resnet152")
resnet50d = _builder("resnet50d")
resnext101_32x4d = _builder("resnext101-32x4d")
se_resnext101_32x4d = _builder("se-resnext101-32x4d")
mobilenet_v2 = _builder("mobilenet_v2")
efficientnet_b0 = _builder("efficientnet-b0")
efficientnet_b4 = _builder("efficientnet-b4")


def dynamic_layers(model: nn.Module) -> List[PEDConv2d]:
    return [m for m in model.modules() if isinstance(m, PEDConv2d)]


def set_pedconv_method(model: nn.Module, method: str) -> nn.Module:
    """Set the forward path (``auto``, ``grouped``, ``unfold``, ``reference``) of every PEDConv layer."""
    if method not in pedconv.METHODS + pedconv.PATHS:
        raise UserError(f"unknown PEDConv method {method!r}; valid: {', '.join(pedconv.METHODS + pedconv.PATHS)}")
    for layer in dynamic_layers(model):
        layer.method = method
    return model


def disable_info_max(model: nn.Module) -> nn.Module:
    """Take the info-max branch out of training (``--infomax-weight 0``): no decoder runs in the forward, and the
    decoders' parameters stop requiring gradients, so DDP (which expects a gradient for every parameter that
    requires one) needs no ``find_unused_parameters``. The decoders stay in the state_dict, unchanged."""
    for layer in dynamic_layers(model):
        layer.info_max = False
        layer.attn.decoder.requires_grad_(False)
    return model
