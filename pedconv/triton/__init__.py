"""Fused Triton kernels for PEDConv (``PEDConv2d(method="triton")``): the gates applied inside an implicit-GEMM
convolution, so that no per-sample kernel, no unfolded input and no batch-times-weight gradient ever exists.

Imported by :func:`pedconv.functional.pedconv2d` only when the Triton path is asked for, on CUDA tensors or under
Triton's interpreter (``TRITON_INTERPRET=1``, CPU tensors: slow, for tests). Importing it imports ``triton`` and
registers the custom ops ``pedconv::triton_conv2d`` and ``pedconv::triton_conv2d_backward``.

Scope: groups=1, any stride, padding, dilation and kernel size, float16/bfloat16/float32 input and weight
(float32 accumulation), any rank (one fused call per rank term). Tile sizes come from Triton's autotuner, keyed by
the layer shape: the first call of each shape compiles and times several configurations (seconds per shape).
GPU speed is unmeasured: no GPU was at hand when this was written; ``benchmarks/pedconv_layer.py --device cuda
--methods triton grouped`` measures it against cuDNN's static convolution and the per-sample-kernel path.
"""
from __future__ import annotations

import contextlib
from typing import Tuple

import torch

from .ops import triton_conv2d, triton_conv2d_backward

__all__ = ["pedconv2d_triton", "triton_conv2d", "triton_conv2d_backward"]


def pedconv2d_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    gate_out: torch.Tensor,
    gate_in: torch.Tensor,
    gate_tap: torch.Tensor,
    stride: Tuple[int, int],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
) -> torch.Tensor:
    """Rank-R PEDConv (groups 1, no bias) by the fused kernels; gates (B, R, C) as in :func:`pedconv.pedconv2d`.

    Input and weight run in one dtype: autocast's when autocast is on for their device (as ``F.conv2d``), else
    their common dtype; the gates in float32 (their gradients come back in their own dtype through autograd).
    The output is channels_last, in the input's (or autocast's) dtype.
    """
    device_type = x.device.type
    autocast = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type) if autocast else torch.promote_types(x.dtype, weight.dtype)
    x, weight = x.to(dtype), weight.to(dtype)
    tensors = (x, weight, gate_out, gate_in, gate_tap)
    keep_raw = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    out = None
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        for r in range(gate_out.shape[1]):
            term, _ = triton_conv2d(
                x, weight, gate_out[:, r].float(), gate_in[:, r].float(), gate_tap[:, r].float(),
                list(stride), list(padding), list(dilation), keep_raw,
            )
            out = term if out is None else out + term
    return out
