"""The 1x1 paths: a static convolution between two per-sample channel scalings (``pointwise:shared``), or one
batched matmul with per-sample (Cout, Cin) matrices (``pointwise:per-sample``)."""
from __future__ import annotations

import contextlib
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import autocast_off, in_one_dtype, is_exporting, memory_format_of, needed, plain_ops_only


@torch.library.custom_op("pedconv::scaled_conv_forward", mutates_args=())
def _scaled_conv_forward(x: Tensor, weight: Tensor, out_scale: Tensor, in_scale: Tensor, stride: List[int],
                         padding: List[int], dilation: List[int], groups: int) -> Tuple[Tensor, Tensor]:
    """out_scale * conv(in_scale * x, W0) with per-sample channel scales (B, Cout) and (B, Cin): (output, raw
    convolution output). Autograd through the three ops would keep the scaled copy of the input for the backward;
    the backward here gets only the input (kept by the layer before anyway) and the raw output, and scales the
    input again."""
    scaled = x * in_scale[:, :, None, None]
    raw = F.conv2d(scaled, weight, None, stride, padding, dilation, groups)
    del scaled
    return raw * out_scale[:, :, None, None], raw


@_scaled_conv_forward.register_fake
def _scaled_conv_forward_fake(x, weight, out_scale, in_scale, stride, padding, dilation, groups):
    raw = F.conv2d(x, weight, None, stride, padding, dilation, groups)
    return torch.empty_like(raw), raw


@torch.library.custom_op("pedconv::scaled_conv_backward", mutates_args=())
def _scaled_conv_backward(grad_out: Tensor, x: Tensor, weight: Tensor, out_scale: Tensor, in_scale: Tensor,
                          raw: Tensor, stride: List[int], padding: List[int], dilation: List[int], groups: int,
                          needs: List[bool]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`_scaled_conv_forward` for x, weight, out_scale and in_scale (empty where not needed)."""
    grad_out = grad_out.to(raw.dtype)
    grad_out_scale = (grad_out * raw).sum((2, 3)) if needs[2] else None
    grad_raw = grad_out * out_scale[:, :, None, None]
    scaled = x * in_scale[:, :, None, None]
    need_input = needs[0] or needs[3]
    grad_scaled, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad_raw, scaled, weight, None, list(stride), list(padding), list(dilation), False, [0, 0], groups,
        [need_input, needs[1], False],
    )
    grad_x = grad_in_scale = None
    if need_input:
        if needs[3]:
            grad_in_scale = (grad_scaled * x).sum((2, 3))
        if needs[0]:
            grad_x = grad_scaled * in_scale[:, :, None, None]
    return tuple(g if g is not None else x.new_empty(0) for g in (grad_x, grad_weight, grad_out_scale, grad_in_scale))


@_scaled_conv_backward.register_fake
def _scaled_conv_backward_fake(grad_out, x, weight, out_scale, in_scale, raw, stride, padding, dilation, groups,
                               needs):
    grad_x = None
    if needs[0]:
        # As the real one: the memory format convolution_backward gives the input gradient.
        grad_x = torch.ops.aten.convolution_backward(
            grad_out, x, weight, None, list(stride), list(padding), list(dilation), False, [0, 0], groups,
            [True, False, False])[0]
    return tuple(g if need else t.new_empty(0) for g, need, t in
                 zip((grad_x, torch.empty_like(weight), torch.empty_like(out_scale), torch.empty_like(in_scale)),
                     needs, (x, weight, out_scale, in_scale)))


def _scaled_conv_setup_context(ctx, inputs, output):
    x, weight, out_scale, in_scale, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(x, weight, out_scale, in_scale, output[1])
    ctx.conv = (stride, padding, dilation, groups)


def _scaled_conv_autograd(ctx, grad_out, _grad_raw):
    needs = list(ctx.needs_input_grad[:4])
    grads = _scaled_conv_backward(grad_out, *ctx.saved_tensors, *ctx.conv, needs)
    return needed(grads, needs) + (None,) * 4


_scaled_conv_forward.register_autograd(_scaled_conv_autograd, setup_context=_scaled_conv_setup_context)


def pointwise_shared(x, weight, out_scale, in_scale, stride, padding, dilation, groups):
    """Rank-R 1x1 PEDConv with the shared weight: sum_r out_scale_r * conv1x1(in_scale_r * x, W0)."""
    function = not (plain_ops_only() or is_exporting())
    if function:
        x, weight, out_scale, in_scale = in_one_dtype(x, weight, out_scale, in_scale)
    out = None
    with autocast_off(x.device.type) if function else contextlib.nullcontext():
        for r in range(out_scale.shape[1]):
            channel_scale = in_scale[:, r].repeat(1, groups)
            if not function:
                term = F.conv2d(x * channel_scale[:, :, None, None], weight, None, stride, padding, dilation, groups)
                term = term * out_scale[:, r, :, None, None]
            else:
                term, _ = _scaled_conv_forward(x, weight, out_scale[:, r], channel_scale, list(stride), list(padding),
                                               list(dilation), groups)
            out = term if out is None else out + term
    return out


def pointwise_per_sample(x, weight, out_scale, in_scale, stride):
    """1x1 PEDConv (groups 1, no padding) as one batched matmul with per-sample (Cout, Cin) matrices.

    The matrices are small next to the activations in all but the last stage, no scaled copy of the activations is
    made or kept for the backward, and a batched matmul keeps the batch axis dynamic for export.
    """
    if stride != (1, 1):
        x = x[:, :, :: stride[0], :: stride[1]]
    batch, in_channels, height, width = x.shape
    matrices = torch.einsum("bro,bri,oi->boi", out_scale, in_scale, weight.view(weight.shape[0], in_channels))
    if memory_format_of(x) == torch.channels_last:
        rows = x.permute(0, 2, 3, 1).reshape(batch, height * width, in_channels)
        out = torch.bmm(rows, matrices.transpose(1, 2).to(rows.dtype))
        return out.view(batch, height, width, -1).permute(0, 3, 1, 2)
    out = torch.bmm(matrices.to(x.dtype), x.reshape(batch, in_channels, height * width))
    return out.view(batch, -1, height, width)
