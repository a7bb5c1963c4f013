"""EfficientNet-B0 and -B4 as NVIDIA DLE's ConvNets code builds them, static and PEDConv.

Written from their ``image_classification/models/efficientnet.py`` and ``common.py`` (the ``efficientnet-b0`` and
``efficientnet-b4`` entries; not their WideSE or quantized variants):

- B0's stages (kernel, stride, blocks, expansion, output channels): (3, 1, 1, 1, 16), (3, 2, 2, 6, 24),
  (5, 2, 2, 6, 40), (3, 2, 3, 6, 80), (5, 1, 3, 6, 112), (5, 2, 4, 6, 192), (3, 1, 1, 6, 320); stem 3x3/2 to 32,
  head 1x1 to 1280. B4 scales widths by 1.4 (rounded to a multiple of 8, never below 90%: their ``_scale_width``,
  the rule of :func:`mobilenet.make_divisible`) and blocks per stage by 1.8 (rounded up).
- MBConv block: expansion 1x1 (absent when the expansion is 1), depthwise kxk (the stage's stride), NVIDIA's
  squeeze-and-excitation on the expanded features (Linear to ``int(0.25 * block input channels)``, SiLU, Linear,
  sigmoid), projection 1x1 + BN without activation; the input is added back at stride 1 with equal channels.
  Every activation is SiLU; BatchNorm momentum 0.01, eps 1e-3; classifier: average pool, dropout (B0 0.2,
  B4 0.4), Linear.
- Stochastic depth (B4 only: their ``survival_prob=0.8``; B0's is 1): block ``i`` of ``n`` (counted over the
  whole network from 0) keeps its residual branch with probability ``1 - (1 - 0.8) * i / n``; as their
  ``StochasticDepthResidual``, one draw per step for the whole batch, the kept branch scaled by 1 / probability;
  identity in eval mode. Blocks without an addition never drop.
- Initialization: theirs is this project's ``fanin`` config (Kaiming normal fan_in with ReLU gain for every conv,
  BatchNorm weight 1 and bias 0, PyTorch's Linear default), the default for the static models.

Names: NVIDIA's modules (``stem.conv``, ``<stage>.block<j>.expand.conv``, ``.depsep.conv``, ``.se.squeeze``,
``.proj.bn``, ``features.conv``, ``classifier.fc``), with the stages as ``layer1`` ... ``layer7``, as the ResNets
here (and NVIDIA's NGC EfficientNet checkpoints) name them; their code's ``layers.0`` ... ``layers.6`` are renamed on
load (:func:`image_classification.checkpoints.from_nvidia_names`), so their state_dicts load strictly.

PEDConv placement (``dynamic=True``), applied by :func:`pedconv.convert` with :func:`in_block`: every conv inside an
MBConv block (expansion 1x1, depthwise kxk in PEDConv's grouped form, whose input gate is one scalar per sample,
projection 1x1); never the stem, the head 1x1 (``features.conv``) or the classifier; the SE layers are Linears and
stay static. The paper's ResNet rule carried over, as for MobileNetV2.

``wmul`` multiplies the variant's width coefficient (B0 1.0, B4 1.4) before the rounding; 1.0 is NVIDIA's model.
"""
from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import pedconv
from errors import UserError

from .mobilenet import make_divisible
from .squeeze import SqueezeExcitation


class Stage(NamedTuple):
    kernel: int
    stride: int
    blocks: int
    expansion: int
    channels: int


B0_STAGES = (Stage(3, 1, 1, 1, 16), Stage(3, 2, 2, 6, 24), Stage(5, 2, 2, 6, 40), Stage(3, 2, 3, 6, 80),
             Stage(5, 1, 3, 6, 112), Stage(5, 2, 4, 6, 192), Stage(3, 1, 1, 6, 320))
STEM_WIDTH = 32
HEAD_WIDTH = 1280
SE_RATIO = 0.25  # of the block's input channels (their squeeze_hidden=False)
BN_MOMENTUM = 0.01
BN_EPS = 1e-3
BLOCK_NAME = re.compile(r"layer\d+\.block\d+\.")


@dataclass(frozen=True)
class Variant:
    """One of NVIDIA's EfficientNets: width and depth coefficients over B0, their default image size, dropout
    before the classifier and the survival probability of the last block (1: no stochastic depth)."""

    width: float
    depth: float
    image_size: int
    dropout: float
    survival_prob: float


VARIANTS: Dict[str, Variant] = {
    "efficientnet-b0": Variant(1.0, 1.0, 224, 0.2, 1.0),
    "efficientnet-b4": Variant(1.4, 1.8, 380, 0.4, 0.8),
}


def variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise UserError(f"unknown EfficientNet {name!r}; valid: {', '.join(VARIANTS)}")
    return VARIANTS[name]


def stages(name: str, wmul: float = 1.0) -> List[Stage]:
    """The stages of variant ``name`` with width multiplier ``wmul``: their ``EffNetArch.scale``."""
    if wmul <= 0:
        raise UserError(f"wmul must be positive, got {wmul}")
    spec = variant(name)
    return [stage._replace(blocks=int(math.ceil(stage.blocks * spec.depth)),
                           channels=make_divisible(stage.channels * spec.width * wmul)) for stage in B0_STAGES]


def widths(name: str, wmul: float = 1.0) -> List[int]:
    """Output channels of the stem, of each stage and of the head."""
    coefficient = variant(name).width * wmul
    return ([make_divisible(STEM_WIDTH * coefficient)] + [stage.channels for stage in stages(name, wmul)]
            + [make_divisible(HEAD_WIDTH * coefficient)])


def survival_probs(name: str) -> List[float]:
    """Each block's survival probability, in network order (their ``_get_survival_prob``)."""
    count = sum(stage.blocks for stage in stages(name))
    drop = 1.0 - variant(name).survival_prob
    return [1.0 - drop * index / count for index in range(count)]


def conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1,
            activation: bool = True, activation_name: str = "act") -> nn.Sequential:
    """Their ``LayerBuilder.conv`` with bn (and act): ``conv`` (no bias, padding (k - 1) / 2), ``bn``, SiLU."""
    layers = [("conv", nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2,
                                 groups=groups, bias=False)),
              ("bn", nn.BatchNorm2d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM))]
    if activation:
        layers.append((activation_name, nn.SiLU(inplace=True)))
    return nn.Sequential(OrderedDict(layers))


class MBConv(nn.Module):
    """Their ``MBConvBlock``: ``expand`` (None at expansion 1), ``depsep``, ``se``, ``proj``, and the addition with
    stochastic depth (see the module docstring)."""

    __jit_unused_properties__ = ["last_bn"]

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, expansion: int,
                 survival_prob: float = 1.0) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.residual = stride == 1 and in_channels == out_channels
        self.survival_prob = survival_prob if self.residual else 1.0
        self.expand = None if hidden == in_channels else conv_bn(in_channels, hidden, 1)
        self.depsep = conv_bn(hidden, hidden, kernel_size, stride, groups=hidden)
        self.se = SqueezeExcitation(hidden, max(1, int(in_channels * SE_RATIO)), nn.SiLU(inplace=True))
        self.proj = conv_bn(hidden, out_channels, 1, activation=False)

    @property
    def last_bn(self) -> Optional[nn.BatchNorm2d]:
        """The BatchNorm before the addition (None without one)."""
        return self.proj.bn if self.residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.depsep(x if self.expand is None else self.expand(x))
        out = self.proj(out * self.se(out))
        if not self.residual:
            return out
        if self.training and self.survival_prob < 1.0:
            # their StochasticDepthResidual: one draw for the whole batch, 0 or 1 / survival_prob
            keep = F.dropout(torch.ones((), device=out.device, dtype=out.dtype), 1.0 - self.survival_prob, True)
            return x + keep * out
        return x + out


class EfficientNet(nn.Module):
    """NVIDIA's EfficientNet ``name`` (``efficientnet-b0``, ``efficientnet-b4``): ``stem``, ``layer1`` ...
    ``layer7``, ``features``, ``classifier``. Static only: :func:`image_classification.models.build_model` converts
    the block convs to PEDConv (:func:`in_block`) and initializes the model."""

    def __init__(self, name: str = "efficientnet-b0", num_classes: int = 1000, wmul: float = 1.0) -> None:
        super().__init__()
        spec = variant(name)
        channels = widths(name, wmul)
        self.stem = conv_bn(3, channels[0], 3, 2, activation_name="activation")
        probs = iter(survival_probs(name))
        in_channels = channels[0]
        for index, stage in enumerate(stages(name, wmul)):
            blocks = []
            for j in range(stage.blocks):
                blocks.append((f"block{j}", MBConv(in_channels, stage.channels, stage.kernel,
                                                   stage.stride if j == 0 else 1, stage.expansion, next(probs))))
                in_channels = stage.channels
            setattr(self, f"layer{index + 1}", nn.Sequential(OrderedDict(blocks)))
        self.features = conv_bn(in_channels, channels[-1], 1, activation_name="activation")
        self.classifier = nn.Sequential(OrderedDict([
            ("pooling", nn.AdaptiveAvgPool2d(1)), ("squeeze", nn.Flatten()), ("dropout", nn.Dropout(spec.dropout)),
            ("fc", nn.Linear(channels[-1], num_classes))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        x = self.layer7(self.layer6(self.layer5(self.layer4(x))))
        return self.classifier(self.features(x))


def in_block(name: str, conv: nn.Conv2d) -> bool:
    """The placement rule (a :func:`pedconv.convert` predicate): convs inside an MBConv block."""
    return BLOCK_NAME.match(name) is not None


def to_pedconv(model: EfficientNet, **pedconv_kwargs) -> EfficientNet:
    """``model`` with every conv of its blocks a :class:`pedconv.PEDConv2d` (in place)."""
    return pedconv.convert(model, in_block, **pedconv_kwargs)


def infer_variant(state_dict) -> Optional[Tuple[str, Optional[float]]]:
    """(name, width multiplier) of an EfficientNet state_dict in this module's names, from its blocks per stage
    and widths; None if it is not one of :data:`VARIANTS` (the multiplier None if no multiple of 0.01 up to 4 fits)."""
    if "stem.conv.weight" not in state_dict or "classifier.fc.weight" not in state_dict:
        return None
    blocks: Dict[int, int] = {}
    for key in state_dict:
        match = re.match(r"layer(\d+)\.block(\d+)\.", key)
        if match:
            stage = int(match.group(1))
            blocks[stage] = max(blocks.get(stage, 0), int(match.group(2)) + 1)
    found = [blocks.get(index, 0) for index in range(1, max(blocks, default=0) + 1)]
    name = next((name for name in VARIANTS if [stage.blocks for stage in stages(name)] == found), None)
    if name is None:
        return None
    try:
        measured = ([state_dict["stem.conv.weight"].shape[0]]
                    + [state_dict[f"layer{i}.block0.proj.conv.weight"].shape[0] for i in range(1, len(found) + 1)]
                    + [state_dict["features.conv.weight"].shape[0]])
    except KeyError:
        return name, None
    for candidate in [1.0] + [k / 100 for k in range(1, 401)]:
        if widths(name, candidate) == measured:
            return name, candidate
    return name, None
