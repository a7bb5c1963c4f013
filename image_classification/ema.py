"""Exponential moving average of a model's weights (NVIDIA's ``--use-ema``)."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


class EMA:
    """Keeps ``module``, a frozen copy of the model whose parameters and buffers follow the trained ones with
    decay min(decay, (1 + step) / (10 + step)), so that early steps are not dominated by the initial weights."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.step = 0
        self.module = copy.deepcopy(model).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = min(self.decay, (1.0 + self.step) / (10.0 + self.step))
        self.step += 1
        current = model.state_dict()
        for name, average in self.module.state_dict().items():
            value = current[name]
            if average.dtype.is_floating_point:
                average.mul_(decay).add_(value.detach(), alpha=1.0 - decay)
            else:
                average.copy_(value)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "step": self.step, "state_dict": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.step = state["step"]
        self.module.load_state_dict(state["state_dict"])
