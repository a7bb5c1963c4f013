"""The reference path: what the authors' release computes. One kernel per sample, (B, Cout, Cin/G, kh, kw),
and one convolution with the batch folded into the groups: simple, exact, and B times the weight in memory."""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from .common import IntPair, finish, memory_format_of, pair


def modulation(gate_out: torch.Tensor, gate_in: torch.Tensor, gate_tap: torch.Tensor) -> torch.Tensor:
    """A_b = sum_r a_out (x) a_in (x) a_k, shape (B, Cout, Cin/G, kh*kw)."""
    return torch.einsum("bro,bri,brp->boip", gate_out, gate_in, gate_tap)


def grouped_conv(x, kernels, stride, padding, dilation, groups):
    """Convolve each sample with its own kernel: batch folded into the groups. kernels: (B, Cout, Cin/G, kh, kw)."""
    batch, in_channels, height, width = x.shape
    out_channels = kernels.shape[1]
    folded = F.conv2d(
        x.reshape(1, batch * in_channels, height, width),
        kernels.reshape(batch * out_channels, *kernels.shape[2:]),
        None,
        stride,
        padding,
        dilation,
        groups * batch,
    )
    return folded.view(batch, out_channels, folded.shape[-2], folded.shape[-1])


def pedconv2d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    gate_out: torch.Tensor,
    gate_in: torch.Tensor,
    gate_tap: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: Union[int, IntPair] = 1,
    padding: Union[int, IntPair] = 0,
    dilation: Union[int, IntPair] = 1,
    groups: int = 1,
) -> torch.Tensor:
    """PEDConv as the release computes it: full per-sample kernels and a batch-folded grouped convolution."""
    batch = x.shape[0]
    kernels = weight.unsqueeze(0) * modulation(gate_out, gate_in, gate_tap).view(batch, *weight.shape)
    out = grouped_conv(x.contiguous(), kernels, pair(stride), pair(padding), pair(dilation), groups)
    return finish(out, bias, memory_format_of(x) == torch.channels_last)
