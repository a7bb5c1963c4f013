"""Helpers shared by the model tests."""
import contextlib

import torch
import torch.nn as nn

from image_classification.models import build_model

INIT_FUNCTIONS = ("normal_", "uniform_", "kaiming_normal_", "kaiming_uniform_", "constant_", "zeros_", "ones_")


@contextlib.contextmanager
def shapes_only():
    """Build modules on the meta device without drawing initial values (which is slow there): keys and shapes."""
    saved = {name: getattr(nn.init, name) for name in INIT_FUNCTIONS}
    for name in INIT_FUNCTIONS:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        with torch.device("meta"):
            yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)


def meta_model(arch, **kwargs):
    """``build_model(arch, **kwargs)`` on the meta device, parameters uninitialized."""
    with shapes_only():
        return build_model(arch, **kwargs)


def calibrate_batchnorms(model: nn.Module, size: int, seed: int = 0) -> nn.Module:
    """Set every BatchNorm's statistics to those of a batch of random images, then eval mode: with made-up statistics
    the signal of a deep network fades (in an EfficientNet with the release's BatchNorm weights of 0.5, to logits
    of 1e-11) and every image gets the same logits."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # the plain average of what it sees
    with torch.no_grad():
        model.train()(torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(seed)))
    return model.eval()
