"""Classification losses of the recipe: label smoothing and mixup with soft targets."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import UserError


class SoftTargetCrossEntropy(nn.Module):
    """Cross-entropy against hard labels (int64, label-smoothed) or soft targets (float, e.g. from mixup).

    With smoothing s, a hard label y becomes the target (1 - s) one_hot(y) + s / C, so the loss is
    (1 - s) NLL + s x mean over classes of -log p, as NVIDIA's recipe computes it.
    """

    def __init__(self, smoothing: float = 0.0):
        super().__init__()
        if not 0.0 <= smoothing < 1.0:
            raise UserError(f"label smoothing must be in [0, 1), got {smoothing}")
        self.smoothing = smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_probs = F.log_softmax(logits.float(), dim=-1)
        if target.dtype == torch.int64:
            nll = -log_probs.gather(1, target.unsqueeze(1)).squeeze(1)
            if self.smoothing == 0.0:
                return nll.mean()
            return ((1.0 - self.smoothing) * nll - self.smoothing * log_probs.mean(dim=-1)).mean()
        return -(target * log_probs).sum(dim=-1).mean()

    def extra_repr(self) -> str:
        return f"smoothing={self.smoothing}"


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    target = torch.full((labels.shape[0], num_classes), smoothing / num_classes, device=labels.device)
    return target.scatter_(1, labels.unsqueeze(1), 1.0 - smoothing + smoothing / num_classes)


class Mixup:
    """Mixup (Zhang et al.): one lambda ~ Beta(alpha, alpha) per batch, mixed with a permutation of the batch.

    Returns the mixed images and soft targets (label smoothing applied before mixing). Lambda and the permutation
    are drawn on the batch's device (torch's CPU or CUDA generator, both kept by the checkpoints, so a resumed run
    draws the same ones) and stay there: the host never waits for them.
    """

    def __init__(self, alpha: float, num_classes: int, smoothing: float = 0.0):
        self.alpha = alpha
        self.num_classes = num_classes
        self.smoothing = smoothing

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        target = smooth_one_hot(labels, self.num_classes, self.smoothing)
        if self.alpha <= 0:
            return images, target
        concentration = torch.full((), float(self.alpha), device=images.device)
        # validate_args=False: checking the parameters would read them on the host
        lam = torch.distributions.Beta(concentration, concentration, validate_args=False).sample()
        perm = torch.randperm(images.shape[0], device=images.device)
        mixed = torch.lerp(images[perm], images, lam.to(images.dtype))
        return mixed, torch.lerp(target[perm], target, lam)
