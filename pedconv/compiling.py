"""``torch.compile`` settings for models with PEDConv layers."""
from __future__ import annotations

from typing import Dict

import torch.nn as nn

from .conv import PEDConv2d


def inductor_options(model: nn.Module) -> Dict[str, object]:
    """Inductor settings for ``torch.compile(model, options=...)``: none for a model without PEDConv layers.

    With PEDConv layers, Inductor's layout optimization is turned off. It makes a graph's convolutions
    channels_last when the graph holds convolutions; a PEDConv layer is a custom op traced with the strides the
    model has (NCHW for an NCHW model), so the optimization would convert every PEDConv layer's input and output,
    and their gradients, between the two layouts: four activation-sized copies per layer and step, against the
    few static convolutions (stem, shortcuts) it could speed up. A channels_last model is traced channels_last
    and compiles the same either way. Measured in ``benchmarks/results/compile_cpu.md``.
    """
    if any(isinstance(module, PEDConv2d) for module in model.modules()):
        return {"layout_optimization": False}
    return {}
