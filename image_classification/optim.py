"""Optimizers and learning-rate schedules of NVIDIA's recipe."""
from __future__ import annotations

import math
from typing import Callable, List

import torch
import torch.nn as nn

import choices
from errors import UserError

SCHEDULES = choices.LR_SCHEDULES


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
                    rmsprop_eps: float = 1e-3, *, device_type: str = "cpu",
                    implementation: str = "torch") -> torch.optim.Optimizer:
    """SGD or RMSprop over :func:`parameter_groups`.

    On CUDA the update runs in few kernels: torch's fused SGD (one kernel for all parameters of a group, which also
    takes the GradScaler's overflow check, so that ``scaler.step`` needs no host synchronization) and the foreach
    RMSprop (torch has no fused one). ``implementation="apex"`` takes NVIDIA apex's FusedSGD instead (CUDA, SGD only;
    apex is imported only then); the GradScaler then reads its overflow flag on the host at every optimizer step.
    """
    groups = parameter_groups(model, weight_decay, bn_weight_decay)
    on_cuda = device_type == "cuda"
    if implementation not in ("torch", "apex"):
        raise UserError(f"unknown optimizer implementation {implementation!r}; valid: torch, apex")
    if implementation == "apex":
        if not on_cuda or name != "sgd":
            raise UserError("--optimizer-impl apex is for SGD on CUDA only (apex has no CPU or RMSprop optimizer)")
        return _apex_sgd(groups, lr, momentum, nesterov)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, fused=True if on_cuda else None)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, alpha=rmsprop_alpha, momentum=momentum, eps=rmsprop_eps,
                                   foreach=True if on_cuda else None)
    raise UserError(f"unknown optimizer {name!r}; valid: sgd, rmsprop")


def _apex_sgd(groups: List[dict], lr: float, momentum: float, nesterov: bool) -> torch.optim.Optimizer:
    try:
        from apex.optimizers import FusedSGD  # NVIDIA apex: only behind this guard
    except ImportError as error:
        raise UserError("--optimizer-impl apex needs NVIDIA apex (built with its CUDA extensions; "
                         f"some NGC PyTorch images ship it): {error}") from None
    return FusedSGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)


def lr_schedule(name: str, base_lr: float, warmup: int, epochs: int, end_lr: float = 0.0) -> Callable[[int], float]:
    """Learning rate of an epoch (NVIDIA's per-epoch policies): linear warmup base x (e + 1) / warmup, then

    step (x0.1 at epochs 30, 60 and 80), linear (to end_lr at the last epoch) or cosine
    end_lr + (base - end_lr)(1 + cos(pi (e - w) / (E - w))) / 2.
    """
    if name not in SCHEDULES:
        raise UserError(f"unknown lr schedule {name!r}; valid: {', '.join(SCHEDULES)}")

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
