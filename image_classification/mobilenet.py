"""MobileNetV2 (Sandler et al. 2018) with torchvision's structure and module names, static and PEDConv.

The static model's state_dict is torchvision's ``mobilenet_v2(width_mult=wmul)``'s key for key and shape for shape
(``features.0.0.weight``, ``features.3.conv.1.0.weight``, ``classifier.1.weight``...), so torchvision's weights
load strictly and give the same outputs. Widths follow torchvision's rule: every width is ``c * wmul`` rounded to a
multiple of 8 (never below 90% of it), the last 1x1 conv has ``1280 * max(1, wmul)`` channels, an expansion layer
has ``round(t * in_channels)``.

PEDConv placement (``dynamic=True``), one rule, applied by :func:`pedconv.convert` with :func:`in_block`: every conv
inside an inverted-residual block (``features.1`` ... ``features.17``): the expansion 1x1, the depthwise 3x3
(PEDConv's grouped form with groups = channels: its input gate is one scalar per sample) and the projection 1x1;
never the stem (``features.0``), the last 1x1 conv (``features.18``) or the classifier. It is the paper's rule for
ResNets (every conv of every residual block, no stem, no shortcut, no classifier) carried over to the blocks of
MobileNetV2; the paper's MobileNetV2 table does not list its placement, so this is our choice, stated here.
"""
from __future__ import annotations

import re
from typing import List, Optional

import torch
import torch.nn as nn

import pedconv
from errors import UserError

# (expansion t, output channels c, blocks n, first stride s) of each stage: the paper's Table 2, torchvision's list.
INVERTED_RESIDUAL_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                             (6, 160, 3, 2), (6, 320, 1, 1))
STEM_WIDTH = 32
LAST_WIDTH = 1280
ROUND_TO = 8
DROPOUT = 0.2
BLOCK_NAME = re.compile(r"features\.(\d+)\.conv\.")


def make_divisible(value: float, divisor: int = ROUND_TO) -> int:
    """``value`` rounded to the nearest multiple of ``divisor``, never below 90% of it (torchvision's rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def widths(wmul: float) -> List[int]:
    """Output channels of every layer of ``features`` (stem, each block, last conv) under width multiplier wmul."""
    if wmul <= 0:
        raise UserError(f"wmul must be positive, got {wmul}")
    out = [make_divisible(STEM_WIDTH * wmul)]
    for _, channels, count, _ in INVERTED_RESIDUAL_SETTING:
        out += [make_divisible(channels * wmul)] * count
    return out + [make_divisible(LAST_WIDTH * max(1.0, wmul))]


class ConvBNReLU6(nn.Sequential):
    """conv (no bias), BatchNorm, ReLU6, named 0, 1, 2 as torchvision's ``Conv2dNormActivation``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2, groups=groups,
                      bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expansion 1x1 (absent when t = 1), depthwise 3x3 (strided), linear projection 1x1 + BN; the input is added
    back when the shape allows (stride 1, same channels). torchvision's names: ``conv.0``, ``conv.1``..."""

    __jit_unused_properties__ = ["last_bn"]

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = int(round(in_channels * expansion))
        self.use_res_connect = stride == 1 and in_channels == out_channels
        layers: List[nn.Module] = [ConvBNReLU6(in_channels, hidden, 1)] if expansion != 1 else []
        layers += [ConvBNReLU6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, out_channels, 1, bias=False),
                   nn.BatchNorm2d(out_channels)]
        self.conv = nn.Sequential(*layers)

    @property
    def last_bn(self) -> Optional[nn.BatchNorm2d]:
        """The BatchNorm before the addition (None without one: zeroing it would cut the block off)."""
        return self.conv[-1] if self.use_res_connect else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2 (``features``, ``classifier``), width multiplier ``wmul``.

    Static only: :func:`image_classification.models.build_model` converts the block convs to PEDConv
    (:func:`in_block`) and initializes the model.
    """

    def __init__(self, num_classes: int = 1000, wmul: float = 1.0, dropout: float = DROPOUT) -> None:
        super().__init__()
        channels = widths(wmul)
        layers: List[nn.Module] = [ConvBNReLU6(3, channels[0], 3, 2)]
        index = 1
        for expansion, _, count, stride in INVERTED_RESIDUAL_SETTING:
            for i in range(count):
                layers.append(InvertedResidual(channels[index - 1], channels[index], stride if i == 0 else 1,
                                               expansion))
                index += 1
        layers.append(ConvBNReLU6(channels[-2], channels[-1], 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(channels[-1], num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def in_block(name: str, conv: nn.Conv2d) -> bool:
    """The placement rule (a :func:`pedconv.convert` predicate): convs inside an inverted-residual block."""
    return BLOCK_NAME.match(name) is not None


def to_pedconv(model: MobileNetV2, **pedconv_kwargs) -> MobileNetV2:
    """``model`` with every conv of its blocks a :class:`pedconv.PEDConv2d` (in place)."""
    return pedconv.convert(model, in_block, **pedconv_kwargs)


def infer_wmul(state_dict) -> Optional[float]:
    """The width multiplier of a MobileNetV2 state_dict: 1.0 if it fits, else the smallest multiple of 0.01 whose
    widths are the checkpoint's; None if none up to 4 does."""
    try:
        found = [state_dict[f"features.{i}.0.weight"].shape[0] for i in (0, len(widths(1.0)) - 1)]
        found[1:1] = [state_dict[f"features.{i}.conv.{last}.weight"].shape[0] for i, last in _projection_bns()]
    except KeyError:
        return None
    for candidate in [1.0] + [k / 100 for k in range(1, 401)]:
        if widths(candidate) == found:
            return candidate
    return None


def _projection_bns():
    """(index in ``features``, index in ``conv``) of every block's last BatchNorm, whose size is the block's output."""
    index = 1
    for expansion, _, count, _ in INVERTED_RESIDUAL_SETTING:
        for _ in range(count):
            yield index, 3 if expansion != 1 else 2
            index += 1
