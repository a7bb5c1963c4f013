"""The info-max regularizer: the sum of the PEDConv layers' decoder losses of the last training forward."""
from __future__ import annotations

import torch
import torch.nn as nn

from .conv import PEDConv2d


def info_max_loss(module: nn.Module) -> torch.Tensor:
    """Sum of the info-max losses of every PEDConv2d in ``module`` (a model or one layer), as a 0-dim tensor.

    Read it after a training-mode forward and add ``weight * info_max_loss(model)`` to the task loss (the
    release uses 0.001). Layers in eval mode contribute nothing, so the result is zero in eval mode and for a
    model without PEDConv layers. Layers are found by type through ``module.modules()``, which also walks into
    DistributedDataParallel and torch.compile wrappers.
    """
    losses = [
        layer._info_max_loss
        for layer in module.modules()
        if isinstance(layer, PEDConv2d) and layer.training and layer._info_max_loss is not None
    ]
    if losses:
        return torch.stack([loss.float() for loss in losses]).sum()
    reference = next(module.parameters(), None)
    return torch.zeros((), device=reference.device if reference is not None else None)
