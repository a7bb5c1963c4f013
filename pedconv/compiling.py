"""``torch.compile`` settings for models with PEDConv layers."""
from __future__ import annotations

from typing import Dict

import torch.nn as nn

from .conv import PEDConv2d


def inductor_options(model: nn.Module) -> Dict[str, object]:
    """Inductor settings for ``torch.compile(model, options=...)``: none for a model without PEDConv layers.

    With PEDConv layers, Inductor's layout optimization is turned off. It makes a graph channels_last as soon as
    the graph holds a convolution (a static stem or shortcut); a PEDConv layer is a custom op traced with the
    strides the model has (NCHW for an NCHW model), so every PEDConv layer's input is converted back to that layout,
    and the few static convolutions the optimization speeds up do not pay for it on every CPU (measured in
    ``benchmarks/results/compile_cpu.md``).
    """
    if any(isinstance(module, PEDConv2d) for module in model.modules()):
        return {"layout_optimization": False}
    return {}
