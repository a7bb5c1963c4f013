"""Optimizers and learning-rate schedules of NVIDIA's recipe."""
from __future__ import annotations

import math
from typing import Callable, List

import torch
import torch.nn as nn

SCHEDULES = ("step", "linear", "cosine")


def parameter_groups(model: nn.Module, weight_decay: float, bn_weight_decay: bool = False) -> List[dict]:
    """Two groups: weights that decay, and BatchNorm parameters and biases that do not (unless bn_weight_decay).

    Parameters are sorted by module type and shape, not by name, so shortcut BatchNorms and every bias are caught
    (NVIDIA's rule, a "bn" substring in the name, misses both).
    """
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            is_norm = isinstance(module, nn.modules.batchnorm._NormBase) or isinstance(module, (nn.GroupNorm, nn.LayerNorm))
            if (is_norm or name == "bias" or param.dim() <= 1) and not bn_weight_decay:
                no_decay.append(param)
            else:
                decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, name: str, lr: float, momentum: float, weight_decay: float,
                    nesterov: bool = False, bn_weight_decay: bool = False, rmsprop_alpha: float = 0.9,
                    rmsprop_eps: float = 1e-3) -> torch.optim.Optimizer:
    groups = parameter_groups(model, weight_decay, bn_weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, alpha=rmsprop_alpha, momentum=momentum, eps=rmsprop_eps)
    raise ValueError(f"unknown optimizer {name!r}; valid: sgd, rmsprop")


def lr_schedule(name: str, base_lr: float, warmup: int, epochs: int, end_lr: float = 0.0) -> Callable[[int], float]:
    """Learning rate of an epoch (NVIDIA's per-epoch policies): linear warmup base x (e + 1) / warmup, then

    step (x0.1 at epochs 30, 60 and 80), linear (to end_lr at the last epoch) or cosine
    end_lr + (base - end_lr)(1 + cos(pi (e - w) / (E - w))) / 2.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {name!r}; valid: {', '.join(SCHEDULES)}")

    def at(epoch: int) -> float:
        if epoch < warmup:
            return base_lr * (epoch + 1) / warmup
        if name == "step":
            return base_lr * 0.1 ** sum(epoch >= milestone for milestone in (30, 60, 80))
        progress = (epoch - warmup) / max(epochs - warmup, 1)
        if name == "linear":
            return end_lr + (base_lr - end_lr) * (1.0 - progress)
        return end_lr + (base_lr - end_lr) * (1.0 + math.cos(math.pi * progress)) / 2.0

    return at


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
