"""The ``taps`` path: per-tap accumulation of kh*kw shifted 1x1 convolutions, in plain ops."""
from __future__ import annotations

import torch.nn.functional as F

from .common import conv_output_size


def taps_composed(x, weight, gate_out, gate_in, gate_tap, stride, padding, dilation, groups):
    """Per-tap accumulation: y = sum_r a_out_r * sum_p a_k[r, p] * conv1x1(shift_p(a_in_r * x), W0[:, :, p]).

    Batch-independent, no per-sample kernel, no unfolded copy of the input; but kh*kw small convolutions and as
    many output-sized accumulations, whose autograd keeps kh*kw output-sized tensors for the backward: a candidate
    of ``auto`` for evaluation only.
    """
    out_channels, _, kh, kw = weight.shape
    out_h, out_w = conv_output_size(tuple(x.shape[-2:]), (kh, kw), stride, padding, dilation)
    padded = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    out = None
    for r in range(gate_out.shape[1]):
        gated = padded * gate_in[:, r].repeat(1, groups)[:, :, None, None]
        tap_sum = None
        for row in range(kh):
            for col in range(kw):
                top, left = row * dilation[0], col * dilation[1]
                window = gated[:, :, top : top + stride[0] * (out_h - 1) + 1 : stride[0],
                               left : left + stride[1] * (out_w - 1) + 1 : stride[1]]
                term = F.conv2d(window, weight[:, :, row : row + 1, col : col + 1], None, 1, 0, 1, groups)
                term = term * gate_tap[:, r, row * kw + col, None, None, None]
                tap_sum = term if tap_sum is None else tap_sum + term
        term = tap_sum * gate_out[:, r, :, None, None]
        out = term if out is None else out + term
    return out
