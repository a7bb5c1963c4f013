"""The ``grouped`` path: per-sample kernels W0 * A_b in batch-folded grouped convolutions, over the whole batch
(``grouped``) or a few samples at a time (``grouped:chunks``), with a hand-written backward."""
from __future__ import annotations

import functools
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import conv_output_size, needed
from .reference import grouped_conv, modulation

# Samples per chunk of the grouped path's ``grouped:chunks`` variant: the per-sample kernels of a few samples at a
# time stay in the cache on some processors, while the whole batch's in one convolution runs better on others.
GROUPED_CHUNK_SAMPLES = 4


def _per_sample_kernels(weight: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
    """W0 * A_b for every sample, (B, Cout, Cin/G, kh, kw), written over ``mod`` (B, Cout, Cin/G, kh*kw)."""
    return mod.view(mod.shape[0], *weight.shape).mul_(weight)


def _chunks_of(batch: int, chunk: int):
    """(start, stop) ranges of ``chunk`` samples (the whole batch for 0)."""
    size = batch if chunk <= 0 else min(chunk, batch)
    return [(start, min(start + size, batch)) for start in range(0, batch, size)]


@torch.library.custom_op("pedconv::grouped_forward", mutates_args=())
def grouped_forward(x: Tensor, weight: Tensor, gate_out: Tensor, gate_in: Tensor, gate_tap: Tensor,
                     stride: List[int], padding: List[int], dilation: List[int], groups: int, chunk: int,
                     input_grad_per_sample: bool) -> Tensor:
    """Per-sample kernels W0 * A_b in batch-folded grouped convolutions, over the whole batch (``chunk`` 0) or
    ``chunk`` samples at a time; x contiguous, all in one dtype.

    Autograd through the plain ops would keep the modulation and the kernels (each B times the weight) for the
    backward; the backward here gets only the input (kept by the layer before anyway), W0 and the gates, and builds
    the kernels again (cheap where this path wins: small kernels, large maps).
    """
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    ranges = _chunks_of(x.shape[0], chunk)
    if len(ranges) == 1:
        kernels = _per_sample_kernels(weight, modulation(gate_out, gate_in, gate_tap))
        return grouped_conv(x, kernels, stride, padding, dilation, groups)
    out = None
    for start, stop in ranges:
        kernels = _per_sample_kernels(weight, modulation(gate_out[start:stop], gate_in[start:stop],
                                                         gate_tap[start:stop]))
        part = grouped_conv(x[start:stop], kernels, stride, padding, dilation, groups)
        if out is None:
            out = x.new_empty((x.shape[0],) + tuple(part.shape[1:]))
        out[start:stop] = part
    return out


@grouped_forward.register_fake
def _grouped_forward_fake(x, weight, gate_out, gate_in, gate_tap, stride, padding, dilation, groups, chunk,
                          input_grad_per_sample):
    out_h, out_w = conv_output_size(tuple(x.shape[-2:]), tuple(weight.shape[-2:]), stride, padding, dilation)
    return x.new_empty((x.shape[0], weight.shape[0], out_h, out_w))


@torch.library.custom_op("pedconv::grouped_backward", mutates_args=())
def _grouped_backward(grad_out: Tensor, x: Tensor, weight: Tensor, gate_out: Tensor, gate_in: Tensor,
                      gate_tap: Tensor, stride: List[int], padding: List[int], dilation: List[int], groups: int,
                      chunk: int, input_grad_per_sample: bool,
                      needs: List[bool]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`grouped_forward` for x, weight and the three gates (empty where not needed)."""
    ranges = _chunks_of(x.shape[0], chunk)
    grad_out = grad_out.contiguous()
    conv = (stride, padding, dilation, groups, input_grad_per_sample)
    if len(ranges) == 1:
        grads = _grouped_backward_chunk(grad_out, x, weight, gate_out, gate_in, gate_tap, *conv, needs)
    else:
        parts = [_grouped_backward_chunk(grad_out[start:stop], x[start:stop], weight, gate_out[start:stop],
                                         gate_in[start:stop], gate_tap[start:stop], *conv, needs)
                 for start, stop in ranges]
        grads = [torch.cat([p[i] for p in parts]) if needs[i] and i != 1 else None for i in range(5)]
        if needs[1]:
            grads[1] = functools.reduce(torch.add, [p[1] for p in parts])
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


def _grouped_backward_chunk(grad_out, x, weight, gate_out, gate_in, gate_tap, stride, padding, dilation, groups,
                            input_grad_per_sample, needs):
    """The grouped path's gradients for one chunk of samples: (x, weight, gate_out, gate_in, gate_tap), None where
    not needed. ``input_grad_per_sample``: the input gradient as one transposed convolution per sample (see
    :func:`_input_grad_per_sample`) instead of in the batch-folded convolution's backward."""
    batch, in_channels, height, width = x.shape
    out_channels, in_per_group = weight.shape[:2]
    mod = modulation(gate_out, gate_in, gate_tap).view(batch, *weight.shape)
    kernels = torch.mul(mod, weight, out=torch.empty_like(mod))  # W0 * A_b, mod kept for grad_weight
    need_gates = any(needs[2:5])
    grad_x, grad_kernels, _ = torch.ops.aten.convolution_backward(
        grad_out.reshape(1, -1, *grad_out.shape[-2:]),
        x.reshape(1, batch * in_channels, height, width),
        kernels.view(-1, *weight.shape[1:]),
        None, list(stride), list(padding), list(dilation), False, [0, 0], groups * batch,
        [needs[0] and not input_grad_per_sample, needs[1] or need_gates, False],
    )
    grad_weight = grad_gate_out = grad_gate_in = grad_gate_tap = None
    if needs[0] and input_grad_per_sample:  # before the kernels' buffer is reused below
        grad_x = _input_grad_per_sample(grad_out, kernels, x.shape, stride, padding, dilation, groups)
    elif grad_x is not None:
        # Not a view: autograd adds the gate generator's pooling gradient into it in place only if it holds the
        # sole reference to the storage (a view keeps its base; the add was an input-sized copy per layer).
        grad_x = torch.ops.aten._unsafe_view(grad_x, x.shape)
    if grad_kernels is not None:
        # B-times-the-weight tensors are reused in place (fresh large buffers cost page faults on the CPU).
        grad_kernels = grad_kernels.view(batch, *weight.shape)
        if need_gates:
            # d/dA_b (in the kernels' buffer), then the three CP factors' gradients as batched matrix products
            # over its dense rows (einsum would first copy it into each contraction's layout).
            grad_mod = torch.mul(grad_kernels, weight, out=kernels).view(batch, out_channels * in_per_group, -1)
            rank = gate_out.shape[1]
            out_in = (gate_out.unsqueeze(3) * gate_in.unsqueeze(2)).view(batch, rank, -1)
            grad_gate_tap = torch.bmm(out_in, grad_mod)
            by_channel = torch.bmm(grad_mod, gate_tap.transpose(1, 2)).view(batch, out_channels, in_per_group, rank)
            grad_gate_out = torch.einsum("boir,bri->bro", by_channel, gate_in)
            grad_gate_in = torch.einsum("boir,bro->bri", by_channel, gate_out)
        if needs[1]:
            grad_weight = grad_kernels.mul_(mod).sum(0)
    return grad_x, grad_weight, grad_gate_out, grad_gate_in, grad_gate_tap


def _input_grad_per_sample(grad_out, kernels, x_shape, stride, padding, dilation, groups):
    """The input gradient as one transposed convolution per sample, each with its own kernel (B, Cout, Cin/G, kh,
    kw): on some processors oneDNN's batch-folded input gradient of a strided layer converts its result's layout in
    a pass as long as the computation itself (a measured candidate, ``grouped:per-sample-input-grad``)."""
    output_padding = [x_shape[2 + d] - ((grad_out.shape[2 + d] - 1) * stride[d] - 2 * padding[d]
                                        + dilation[d] * (kernels.shape[3 + d] - 1) + 1) for d in range(2)]
    grad_x = grad_out.new_empty(x_shape)
    for sample in range(x_shape[0]):
        grad_x[sample] = F.conv_transpose2d(grad_out[sample : sample + 1], kernels[sample], None, stride, padding,
                                            output_padding, groups, dilation)[0]
    return grad_x


@_grouped_backward.register_fake
def _grouped_backward_fake(grad_out, x, weight, gate_out, gate_in, gate_tap, stride, padding, dilation, groups,
                           chunk, input_grad_per_sample, needs):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) if need else t.new_empty(0)
                 for need, t in zip(needs, (x, weight, gate_out, gate_in, gate_tap)))


def _grouped_setup_context(ctx, inputs, output):
    x, weight, gate_out, gate_in, gate_tap, stride, padding, dilation, groups, chunk, input_grad_per_sample = inputs
    ctx.save_for_backward(x, weight, gate_out, gate_in, gate_tap)
    ctx.conv = (stride, padding, dilation, groups, chunk, input_grad_per_sample)


def _grouped_autograd(ctx, grad_out):
    needs = list(ctx.needs_input_grad[:5])
    grads = _grouped_backward(grad_out, *ctx.saved_tensors, *ctx.conv, needs)
    return needed(grads, needs) + (None,) * 6


grouped_forward.register_autograd(_grouped_autograd, setup_context=_grouped_setup_context)
