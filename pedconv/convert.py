"""Put PEDConv into an existing model."""
from __future__ import annotations

from typing import Callable, Optional

import torch.nn as nn

from .conv import PEDConv2d

SHORTCUT_NAMES = ("downsample", "shortcut", "skip")

Predicate = Callable[[str, nn.Conv2d], bool]


def default_predicate(first_conv: str) -> Predicate:
    """Convert every conv but the first one (the stem) and 1x1 shortcut (downsample) convs, as the release does."""

    def predicate(name: str, conv: nn.Conv2d) -> bool:
        if name == first_conv:
            return False
        is_pointwise = conv.kernel_size == (1, 1)
        return not (is_pointwise and any(part in SHORTCUT_NAMES for part in name.split(".")))

    return predicate


def convert(model: nn.Module, predicate: Optional[Predicate] = None, **pedconv_kwargs) -> nn.Module:
    """Replace eligible ``nn.Conv2d`` modules of ``model`` (in place) by :class:`PEDConv2d` and return it.

    Each new layer copies the static kernel (and bias) into ``weight``; its gate generator gets the release's
    initialization. ``predicate(name, conv)`` decides which convs change; by default every conv except the
    first one in ``model.named_modules()`` order and 1x1 convs inside a ``downsample``/``shortcut``/``skip``
    module. Convs with a padding mode other than zeros are left static. ``pedconv_kwargs`` go to PEDConv2d
    (``reduction``, ``rank``, ``noise_std``, ``method``...). Works on torchvision and timm models alike.
    """
    convs = [(name, m) for name, m in model.named_modules() if type(m) is nn.Conv2d]
    if predicate is None:
        predicate = default_predicate(convs[0][0] if convs else "")
    for name, conv in convs:
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str) or not predicate(name, conv):
            continue
        layer = PEDConv2d.from_conv(conv, **pedconv_kwargs)
        if conv.training is False:
            layer.eval()
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, layer)
    return model
