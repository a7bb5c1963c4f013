"""Process-wide CUDA math settings of a run: TensorFloat-32 for float32 matrix products and convolutions."""
from __future__ import annotations

from typing import Dict

import torch


def set_tf32(enabled: bool) -> Dict[str, str]:
    """Let cuBLAS and cuDNN run float32 matrix products and convolutions in TF32 (``enabled``, as NVIDIA's recipe
    does on Ampere and newer GPUs) or in full float32; returns the previous settings for :func:`restore_tf32`.

    Only backend flags are set: no CUDA context is created, so it is safe to call before the device is used.
    torch 2.9 and newer name the setting ``fp32_precision`` ("tf32" or "ieee"); older releases ``allow_tf32``.
    """
    precision = "tf32" if enabled else "ieee"
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(conv, "conv") and hasattr(conv.conv, "fp32_precision"):
        previous = {"matmul": matmul.fp32_precision, "conv": conv.conv.fp32_precision}
        matmul.fp32_precision = precision
        conv.conv.fp32_precision = precision
    else:  # pragma: no cover - torch before 2.9
        previous = {"matmul": "tf32" if matmul.allow_tf32 else "ieee", "conv": "tf32" if conv.allow_tf32 else "ieee"}
        matmul.allow_tf32 = enabled
        conv.allow_tf32 = enabled
    return previous


def restore_tf32(previous: Dict[str, str]) -> None:
    """Put back the settings :func:`set_tf32` returned."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(conv, "conv") and hasattr(conv.conv, "fp32_precision"):
        matmul.fp32_precision = previous["matmul"]
        conv.conv.fp32_precision = previous["conv"]
    else:  # pragma: no cover - torch before 2.9
        matmul.allow_tf32 = previous["matmul"] == "tf32"
        conv.allow_tf32 = previous["conv"] == "tf32"

