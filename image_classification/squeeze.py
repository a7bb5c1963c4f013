"""NVIDIA DLE's squeeze-and-excitation (their ``models/common.py`` ``SqueezeAndExcitation``), shared by
SE-ResNeXt (ReLU) and EfficientNet (SiLU)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn


class SqueezeExcitation(nn.Module):
    """NVIDIA's squeeze-and-excitation: global mean, Linear to ``squeeze`` features, ``activation`` (ReLU unless
    given), Linear back, sigmoid; their names (``squeeze``, ``expand``). The squeeze width is a number of features
    (SE-ResNeXt's ``se_squeeze=16``; EfficientNet's a quarter of the block's input channels), not a ratio."""

    def __init__(self, channels: int, squeeze: int = 16, activation: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.squeeze = nn.Linear(channels, squeeze)
        self.expand = nn.Linear(squeeze, channels)
        self.activation = activation if activation is not None else nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The (B, C, 1, 1) channel weights of ``x``."""
        weights = torch.sigmoid(self.expand(self.activation(self.squeeze(x.mean((2, 3))))))
        return weights[:, :, None, None]
