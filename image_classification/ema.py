"""Exponential moving average of a model's weights (NVIDIA's ``--use-ema``)."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


def _tensors(model: nn.Module):
    """Parameters, then buffers, in registration order (the same order for a model and its deep copy)."""
    yield from model.parameters()
    yield from model.buffers()


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
        """One step of the average: a few foreach kernels for all floating-point tensors (not two per tensor), a
        copy for the integer buffers (BatchNorm's step counts)."""
        decay = min(self.decay, (1.0 + self.step) / (10.0 + self.step))
        self.step += 1
        averages, values, copies, sources = [], [], [], []
        for average, value in zip(_tensors(self.module), _tensors(model)):
            if average.dtype.is_floating_point:
                averages.append(average)
                values.append(value.detach())
            else:
                copies.append(average)
                sources.append(value)
        if averages:
            # average + (1 - decay) (value - average) = decay average + (1 - decay) value
            torch._foreach_lerp_(averages, values, 1.0 - decay)
        if copies:
            torch._foreach_copy_(copies, sources)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "step": self.step, "state_dict": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.step = state["step"]
        self.module.load_state_dict(state["state_dict"])
