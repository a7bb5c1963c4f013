"""The PEDConv operator as functions of tensors.

Notation (one layer, batch B, rank R, G groups):

    weight     W0        (Cout, Cin/G, kh, kw)   the shared base kernel
    gate_out   a_out     (B, R, Cout)            output-filter gates
    gate_in    a_in      (B, R, Cin/G)           input-channel gates (shared by the groups, as in the release)
    gate_tap   a_k       (B, R, kh*kw)           spatial-tap gates

    A_b = sum_r a_out[b,r] (x) a_in[b,r] (x) a_k[b,r]      (a rank-R CP tensor, shape of W0)
    y_b = conv2d(x_b, W0 * A_b)

Several ways to compute it, all equal up to rounding:

- :func:`pedconv2d_reference`: what the authors' release does. One kernel per sample, (B, Cout, Cin/G, kh, kw),
  and one convolution with the batch folded into the groups. Simple and slow: the kernels cost B times the weight.
- ``grouped`` (in :func:`pedconv2d`): the same batch-folded convolution, for large spatial maps and few channels
  (the kernels are small and oneDNN/cuDNN run a direct convolution), over the whole batch or in chunks of samples.
  The gates are folded into the kernel: it is materialized anyway for the tap gate, and folding the channel gates
  too saves two passes over the activations.
- ``unfold``: no per-sample kernel at all. The input is unfolded (im2col, in NHWC order), each column scaled by
  a_in[b, i] * a_k[b, p] in the same pass, and multiplied by the *shared* W0; the output is then scaled by a_out.
  For small spatial maps and many channels, where per-sample kernels would be bandwidth-bound. The column products
  run either as 1x1 convolutions over channels_last views of the columns (``unfold:conv``: oneDNN on the CPU, cuDNN
  on CUDA) or as matrix products (``unfold:matmul``: the BLAS); which is faster depends on the processor. The batch
  goes through in chunks of samples (``COLUMN_CHUNK_BYTES`` of columns on the CPU), so the columns of a chunk are
  still cached when the product reads them and never exist for the whole batch. Its backward is written by hand so
  that the weight gradient is one product (accumulated over the chunks) too: autograd through a broadcast matmul
  would build B weight-sized partial gradients.
- ``taps``: per-tap accumulation of kh*kw shifted 1x1 convolutions (plain autograd ops).
- ``triton`` (CUDA, groups=1): fused Triton kernels, the gates applied inside an implicit-GEMM convolution and its
  backward (see :mod:`pedconv.triton`, imported on first use). GPU speed unmeasured.

For a 1x1 layer the tap gate is one scalar per sample and the layer is either a static convolution between two
channel scalings, y = (a_out * a_k) * conv(a_in * x, W0) (``pointwise:shared``), or one batched matmul with
per-sample (Cout, Cin) matrices (``pointwise:per-sample``).

Much of these paths' cost over a static convolution is memory traffic, so which one is fastest depends on the
processor, its caches and its libraries: :func:`pedconv2d` with ``method="auto"`` measures them where it runs
(:mod:`pedconv.autotune`), falling back to the fixed rule :func:`choose_method`. The hand-written forward and
backward are ``torch.library`` custom ops (with fake implementations), so ``torch.compile`` keeps them whole. While
exporting or tracing only batch-independent operations are used, so an exported graph keeps a dynamic batch axis.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import autotune

METHODS = ("auto", "grouped", "unfold", "taps", "reference", "triton")
# The concrete paths that a method runs on (``method`` also takes these names, e.g. ``method="unfold:matmul"``):
# the candidates that ``auto`` measures, and what the fixed rule picks among.
PATHS = ("grouped", "grouped:chunks", "unfold:conv", "unfold:matmul", "unfold:plain", "taps",
         "pointwise:per-sample", "pointwise:shared")

IntPair = Tuple[int, int]


def _pair(value: Union[int, Sequence[int]]) -> IntPair:
    if isinstance(value, int):
        return (value, value)
    value = tuple(value)
    if len(value) != 2:
        raise ValueError(f"expected an int or a pair of ints, got {value!r}")
    return (int(value[0]), int(value[1]))


def conv_output_size(size: IntPair, kernel: IntPair, stride: IntPair, padding: IntPair, dilation: IntPair) -> IntPair:
    """Output height and width of a convolution, as torch.nn.Conv2d computes them."""
    return tuple(
        (size[d] + 2 * padding[d] - dilation[d] * (kernel[d] - 1) - 1) // stride[d] + 1 for d in range(2)
    )


def _plain_ops_only() -> bool:
    """True under torch.func transforms (grad, vmap...): the hand-written custom ops give way to plain
    differentiable ops there. (Under torch.compile the custom ops stay: their fake implementations trace.)"""
    return torch._C._are_functorch_transforms_active()


def _is_exporting() -> bool:
    """True while ONNX export, torch.export or a TorchScript trace records the graph."""
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    if torch.onnx.is_in_onnx_export():
        return True
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_exporting") and compiler.is_exporting())


def choose_method(
    batch: int, in_channels: int, out_channels: int, kernel: IntPair, groups: int, out_size: IntPair,
    *, device_type: str = "cpu", channels_last: bool = False,
) -> str:
    """The fixed rule: ``auto``'s choice when measuring is off (and its fallback).

    On CUDA with channels_last activations, k x k layers (groups 1) take the ``unfold`` path, which works in NHWC
    throughout: the ``grouped`` path folds the batch into the channels, which needs NCHW, and would convert the
    input and the output of every layer (``benchmarks/gpu_check.py`` times both paths on the GPU).

    Per-sample kernels (``grouped``; for 1x1 a batched matmul) are cheap while a kernel is small next to one sample's
    output map (large maps, few channels); the shared weight (``unfold``; for 1x1 a static conv between channel
    scalings) wins once the kernel outweighs the map (3x3: twice the map; 1x1: the map, since its shared path costs
    only two scaling passes). Grouped convolutions (depthwise included) always take per-sample kernels: they are
    tiny. The thresholds come from ``benchmarks/pedconv_layer.py`` on one CPU (see ``benchmarks/results/``); the
    measured choice replaces them where the layers run.
    """
    if groups > 1:
        return "grouped"
    taps = kernel[0] * kernel[1]
    if device_type == "cuda" and channels_last and taps > 1:
        return "unfold"
    kernel_elems = out_channels * in_channels * taps
    out_elems = out_channels * out_size[0] * out_size[1]
    return "grouped" if kernel_elems <= (2 if taps > 1 else 1) * out_elems else "unfold"


def method_path(method: str, device_type: str, kernel: IntPair, groups: int, padding: IntPair) -> str:
    """The path that a method (``grouped``, ``unfold``, ``taps``) or a path name runs for one layer: 1x1 layers run
    a ``pointwise`` path (per-sample matrices for ``grouped``, where groups 1 and no padding allow), k x k layers any
    other; ``unfold`` runs its products as convolutions on the CPU and as matrix products elsewhere."""
    family = method.split(":")[0]
    if method == "triton":
        return method  # the fused kernels take 1x1 and k x k layers alike
    if kernel == (1, 1):
        per_sample = family in ("grouped", "pointwise") and groups == 1 and padding == (0, 0)
        if method == "pointwise:shared":
            per_sample = False
        return "pointwise:per-sample" if per_sample else "pointwise:shared"
    if family == "unfold" and groups > 1:
        return "unfold:plain"
    if method == "unfold" or method == "pointwise:shared":
        return "unfold:conv" if device_type == "cpu" else "unfold:matmul"
    if family == "pointwise":
        return "grouped"
    return method  # grouped, grouped:chunks, unfold:*, taps


def candidate_paths(device_type: str, batch: int, kernel: IntPair, groups: int, padding: IntPair,
                    training: bool) -> List[str]:
    """The paths ``auto`` measures for one layer shape: every exact fast path whose speed depends on the processor.

    1x1: per-sample matrices (groups 1, no padding) and the shared weight. k x k: per-sample kernels over the whole
    batch and in chunks of ``GROUPED_CHUNK_SAMPLES`` (when the batch is larger), the shared-weight columns with the
    products as convolutions and as matrix products (groups 1), and, for evaluation only, the per-tap path (its
    autograd keeps kh*kw output-sized tensors for the backward: too much memory for training). The fused ``triton``
    kernels on CUDA (groups 1).
    """
    if kernel == (1, 1):
        paths = ["pointwise:per-sample"] if groups == 1 and padding == (0, 0) else []
        paths.append("pointwise:shared")
    else:
        paths = ["grouped"]
        if batch > GROUPED_CHUNK_SAMPLES:
            paths.append("grouped:chunks")
        if groups == 1:
            paths += ["unfold:conv", "unfold:matmul"]
        if not training:
            paths.append("taps")
    if device_type == "cuda" and groups == 1:
        paths.append("triton")
    return paths


# ----------------------------------------------------------------------------------------------------------------
# Reference path: the release's computation.


def modulation(gate_out: torch.Tensor, gate_in: torch.Tensor, gate_tap: torch.Tensor) -> torch.Tensor:
    """A_b = sum_r a_out (x) a_in (x) a_k, shape (B, Cout, Cin/G, kh*kw)."""
    return torch.einsum("bro,bri,brp->boip", gate_out, gate_in, gate_tap)


def _grouped_conv(x, kernels, stride, padding, dilation, groups):
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
    out = _grouped_conv(x.contiguous(), kernels, _pair(stride), _pair(padding), _pair(dilation), groups)
    return _finish(out, bias, _memory_format_of(x) == torch.channels_last)


# ----------------------------------------------------------------------------------------------------------------
# Unfold path: shared-weight GEMM on gated columns, hand-written backward.


def _padded_nhwc(x: torch.Tensor, padding: IntPair) -> torch.Tensor:
    """The zero-padded input as a contiguous (B, H + 2ph, W + 2pw, C) tensor: one pass, then windows read densely."""
    nhwc = x.permute(0, 2, 3, 1)
    if padding == (0, 0):
        return nhwc.contiguous()
    padded = x.new_zeros(_padded_shape(x.shape, padding))
    _interior(padded, padding, x.shape[-2:]).copy_(nhwc)
    return padded


def _padded_shape(x_shape, padding: IntPair):
    """(B, H + 2ph, W + 2pw, C): the NHWC padded input's shape."""
    batch, channels, height, width = x_shape
    return (batch, height + 2 * padding[0], width + 2 * padding[1], channels)


def _interior(padded: torch.Tensor, padding: IntPair, size: IntPair) -> torch.Tensor:
    """The (B, H, W, C) view of a padded NHWC tensor without its border."""
    return padded[:, padding[0] : padding[0] + size[0], padding[1] : padding[1] + size[1]]


def _windows(padded: torch.Tensor, kernel: IntPair, stride: IntPair, dilation: IntPair, out_size: IntPair):
    """A (B, Ho, Wo, kh, kw, C) strided view of the padded NHWC input: the im2col columns in NHWC order."""
    batch_stride, row_stride, col_stride, channel_stride = padded.stride()
    return padded.as_strided(
        (padded.shape[0], out_size[0], out_size[1], kernel[0], kernel[1], padded.shape[3]),
        (
            batch_stride,
            row_stride * stride[0],
            col_stride * stride[1],
            row_stride * dilation[0],
            col_stride * dilation[1],
            channel_stride,
        ),
    )


def _column_scale(gate_in: torch.Tensor, gate_tap: torch.Tensor, kernel: IntPair) -> torch.Tensor:
    """a_k[b, p] * a_in[b, i], shaped (B, 1, 1, kh, kw, Cin) to broadcast over the windows."""
    batch = gate_in.shape[0]
    return (gate_tap.view(batch, kernel[0], kernel[1], 1) * gate_in.view(batch, 1, 1, -1)).unsqueeze(1).unsqueeze(1)


# Bytes of unfolded columns gathered at a time on the CPU: the unfold path takes the batch in chunks of samples, so
# the gated columns never exist for the whole batch at once and a chunk is still in the cache when the product reads
# it; chunks much smaller make the products too small to run well (see benchmarks/results/ for the measurements).
COLUMN_CHUNK_BYTES = 16 << 20
# On other devices (CUDA) products of a few MiB would be launch-bound: one chunk, up to this size.
ACCELERATOR_COLUMN_CHUNK_BYTES = 1 << 30
# Samples per chunk of the grouped path's ``grouped:chunks`` variant: the per-sample kernels of a few samples at a
# time stay in the cache on some processors, while the whole batch's in one convolution runs better on others.
GROUPED_CHUNK_SAMPLES = 4


def _sample_chunks(batch: int, bytes_per_sample: int, device: torch.device):
    """(start, stop) ranges of samples whose unfolded columns fit the device's chunk size (at least one sample)."""
    budget = COLUMN_CHUNK_BYTES if device.type == "cpu" else ACCELERATOR_COLUMN_CHUNK_BYTES
    size = max(1, min(batch, budget // max(bytes_per_sample, 1)))
    return [(start, min(start + size, batch)) for start in range(0, batch, size)]


def _unfold_setup(x, weight, gate_in, gate_tap, stride, padding, dilation, out_size):
    """What the unfold path's forward and backward both start from: the windows over the padded NHWC input, the
    columns' gate scale, the weight as (Cout, kh*kw*Cin) rows, the chunks of samples and one chunk's buffer."""
    kernel = tuple(weight.shape[-2:])
    windows = _windows(_padded_nhwc(x, padding), kernel, stride, dilation, out_size)
    scale = _column_scale(gate_in, gate_tap, kernel)
    weight_rows = weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
    bytes_per_sample = out_size[0] * out_size[1] * weight_rows.shape[1] * x.element_size()
    chunks = _sample_chunks(x.shape[0], bytes_per_sample, x.device)
    buffer = x.new_empty((chunks[0][1],) + windows.shape[1:])
    return windows, scale, weight_rows, chunks, buffer


def _gated_columns(windows, scale, start, stop, buffer):
    """The gated im2col columns of samples start..stop, (n, Ho, Wo, kh, kw, Cin), written into ``buffer``."""
    return torch.mul(windows[start:stop], scale[start:stop], out=buffer[: stop - start])


def _unfold_out_size(x, weight, stride, padding, dilation):
    return conv_output_size(tuple(x.shape[-2:]), tuple(weight.shape[-2:]), stride, padding, dilation)


@torch.library.custom_op("pedconv::unfold_forward", mutates_args=())
def _unfold_forward(x: Tensor, weight: Tensor, gate_out: Tensor, gate_in: Tensor, gate_tap: Tensor,
                    stride: List[int], padding: List[int], dilation: List[int], channels_last: bool,
                    matmul: bool) -> Tuple[Tensor, Tensor]:
    """Rank-1, groups=1 PEDConv via gated im2col and one shared-weight product: (output, raw output rows).

    Gates are (B, C). All tensors arrive in one dtype (see :func:`_in_one_dtype`). The batch is processed in chunks
    of samples (see ``COLUMN_CHUNK_BYTES``), so that the gated columns never exist for the whole batch at once. The
    backward gets only the input (which the layer before keeps anyway) and the raw output (NHWC rows before the
    output gate), and gathers the columns again: one more gather pass, for memory close to a static convolution's.
    ``matmul``: the column products as matrix products (BLAS) instead of 1x1 convolutions.
    """
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    out_size = _unfold_out_size(x, weight, stride, padding, dilation)
    batch = x.shape[0]
    out_channels = weight.shape[0]
    windows, scale, weight_rows, chunks, buffer = _unfold_setup(
        x, weight, gate_in, gate_tap, stride, padding, dilation, out_size)
    rows = out_size[0] * out_size[1]
    raw = x.new_empty((batch * rows, out_channels))  # NHWC rows of the ungated output
    for start, stop in chunks:
        columns = _gated_columns(windows, scale, start, stop, buffer)
        _rows_times_weight_t(columns.view(-1, weight_rows.shape[1]), weight_rows, raw[start * rows : stop * rows],
                             matmul)
    raw_nchw = raw.view(batch, out_size[0], out_size[1], out_channels).permute(0, 3, 1, 2)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty_like(raw_nchw, memory_format=memory_format)
    torch.mul(raw_nchw, gate_out.view(batch, out_channels, 1, 1), out=out)
    return out, raw


@_unfold_forward.register_fake
def _unfold_forward_fake(x, weight, gate_out, gate_in, gate_tap, stride, padding, dilation, channels_last, matmul):
    out_h, out_w = _unfold_out_size(x, weight, stride, padding, dilation)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty((x.shape[0], weight.shape[0], out_h, out_w), dtype=x.dtype, device=x.device,
                      memory_format=memory_format)
    return out, x.new_empty((x.shape[0] * out_h * out_w, weight.shape[0]))


@torch.library.custom_op("pedconv::unfold_backward", mutates_args=())
def _unfold_backward(grad_out: Tensor, x: Tensor, weight: Tensor, gate_out: Tensor, gate_in: Tensor,
                     gate_tap: Tensor, raw: Tensor, stride: List[int], padding: List[int], dilation: List[int],
                     matmul: bool, needs: List[bool]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`_unfold_forward` for x, weight and the three gates; an empty tensor where ``needs`` is
    False."""
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    out_size = _unfold_out_size(x, weight, stride, padding, dilation)
    kernel, x_shape, x_format = tuple(weight.shape[-2:]), tuple(x.shape), _memory_format_of(x)
    windows, scale, weight_rows, chunks, buffer = _unfold_setup(
        x, weight, gate_in, gate_tap, stride, padding, dilation, out_size)
    batch = x_shape[0]
    out_channels, in_channels, kh, kw = weight.shape
    rows = out_size[0] * out_size[1]
    # NHWC rows of the incoming gradient; a copy only when the caller's layout is NCHW.
    grad_out_rows = grad_out.to(raw.dtype).permute(0, 2, 3, 1).reshape(batch, rows, out_channels)
    grad_gate_out = grad_x = grad_weight = grad_gate_in = grad_gate_tap = None
    if needs[2]:
        grad_gate_out = (grad_out_rows * raw.view(batch, rows, out_channels)).sum(1)
    raw_grad_rows = (grad_out_rows * gate_out.view(batch, 1, out_channels)).reshape(-1, out_channels)
    del grad_out_rows
    need_weight = needs[1]
    need_x, need_in, need_tap = needs[0], needs[3], needs[4]
    need_columns_grad = need_x or need_in or need_tap
    grad_weight_rows = None  # summed over the chunks in float32 at least (bfloat16 autocast)
    grad_padded = x.new_zeros(_padded_shape(x_shape, padding)) if need_x else None
    grad_scale = x.new_empty((batch, kh, kw, in_channels)) if need_in or need_tap else None
    for start, stop in chunks:
        grad_rows = raw_grad_rows[start * rows : stop * rows]
        if need_weight:
            columns = _gated_columns(windows, scale, start, stop, buffer)
            # As (Cout, kh*kw*Cin): its rows are the weight's own rows, so that the final reordering to
            # (Cout, Cin, kh, kw) reads each output row from one place (from a (kh*kw*Cin, Cout) product it would
            # gather every element from another page: slower than the product itself for the 7x7 layers).
            partial = torch.mm(grad_rows.t(), columns.view(grad_rows.shape[0], -1))
            del columns
            if grad_weight_rows is None:
                grad_weight_rows = partial.to(torch.promote_types(partial.dtype, torch.float32))
            else:
                grad_weight_rows.add_(partial)
        if need_columns_grad:
            # The column gradient is a fresh product: the columns' buffer goes first, and the product serves
            # as the next chunk's buffer (chunks only shrink), so one chunk-sized block is live at a time.
            buffer = None
            grad_columns = _rows_times_weight(grad_rows, weight_rows, matmul).view((stop - start,) + windows.shape[1:])
            buffer = grad_columns
            if need_x:
                # Tap gates folded into the col2im sums, channel gates applied once on the input-sized result.
                _col2im_into(grad_padded[start:stop], grad_columns, kernel, stride, dilation, gate_tap[start:stop])
            if need_in or need_tap:
                # In place: the column gradient is not needed after the col2im above.
                torch.sum(grad_columns.mul_(windows[start:stop]), (1, 2), out=grad_scale[start:stop])
    if need_weight:
        grad_weight = grad_weight_rows.to(weight.dtype).view(out_channels, kh, kw, in_channels)
        grad_weight = grad_weight.permute(0, 3, 1, 2)
        grad_weight = grad_weight.contiguous(memory_format=_memory_format_of(weight))
    if need_x:
        interior = _interior(grad_padded, padding, x_shape[-2:])
        grad_x = torch.empty(x_shape, dtype=x.dtype, device=x.device, memory_format=x_format)
        torch.mul(interior.permute(0, 3, 1, 2), gate_in.view(batch, -1, 1, 1), out=grad_x)
    if need_in:
        grad_gate_in = (grad_scale * gate_tap.view(batch, kh, kw, 1)).sum((1, 2))
    if need_tap:
        grad_gate_tap = (grad_scale * gate_in.view(batch, 1, 1, -1)).sum(3).view(batch, -1)
    return tuple(g if g is not None else x.new_empty(0)
                 for g in (grad_x, grad_weight, grad_gate_out, grad_gate_in, grad_gate_tap))


@_unfold_backward.register_fake
def _unfold_backward_fake(grad_out, x, weight, gate_out, gate_in, gate_tap, raw, stride, padding, dilation, matmul,
                          needs):
    return _gradients_like(needs, x, weight, gate_out, gate_in, gate_tap)


def _gradients_like(needs, *inputs):
    """Fake gradients: the inputs' shapes (and memory formats), or empty where not needed."""
    return tuple(torch.empty_like(t, memory_format=_memory_format_of(t)) if need else t.new_empty(0)
                 for need, t in zip(needs, inputs))


def _needed(grads, needs):
    return tuple(g if need else None for g, need in zip(grads, needs))


def _unfold_setup_context(ctx, inputs, output):
    x, weight, gate_out, gate_in, gate_tap, stride, padding, dilation, _, matmul = inputs
    ctx.save_for_backward(x, weight, gate_out, gate_in, gate_tap, output[1])
    ctx.conv = (stride, padding, dilation, matmul)


def _unfold_autograd(ctx, grad_out, _grad_raw):
    needs = list(ctx.needs_input_grad[:5])
    grads = _unfold_backward(grad_out, *ctx.saved_tensors, *ctx.conv, needs)
    return _needed(grads, needs) + (None,) * 5


_unfold_forward.register_autograd(_unfold_autograd, setup_context=_unfold_setup_context)


def _rows_times_weight_t(rows: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, matmul: bool) -> torch.Tensor:
    """rows (n, K) @ weight.T for a weight (N, K), written into ``out`` (n, N): a matrix product, or a 1x1
    convolution over a channels_last view of the rows (n pixels of K channels), which the convolution libraries
    (oneDNN, cuDNN) run faster than the BLAS on some processors."""
    if matmul:
        return torch.mm(rows, weight.t(), out=out)
    return out.copy_(_rows_of(F.conv2d(_pixels_of(rows), weight.view(weight.shape[0], weight.shape[1], 1, 1))))


def _rows_times_weight(rows: torch.Tensor, weight: torch.Tensor, matmul: bool) -> torch.Tensor:
    """rows (n, N) @ weight for a weight (N, K): a fresh contiguous (n, K) product; a matrix product or a 1x1
    transposed convolution (as :func:`_rows_times_weight_t`; it takes the weight as it is, no transposed copy)."""
    if matmul:
        return torch.mm(rows, weight)
    return _rows_of(F.conv_transpose2d(_pixels_of(rows), weight.view(weight.shape[0], weight.shape[1], 1, 1)))


def _pixels_of(rows: torch.Tensor) -> torch.Tensor:
    """(n, K) rows as a (1, K, 1, n) channels_last image (a view)."""
    return rows.view(1, 1, rows.shape[0], rows.shape[1]).permute(0, 3, 1, 2)


def _rows_of(pixels: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_pixels_of` for a channels_last (1, K, 1, n) image."""
    return pixels.permute(0, 2, 3, 1).view(pixels.shape[3], pixels.shape[1])


def _memory_format_of(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _col2im_into(grad_padded, grad_columns, kernel, stride, dilation, tap_scale):
    """Add NHWC column gradients (B, Ho, Wo, kh, kw, C), each tap's scaled by ``tap_scale`` (B, kh*kw), onto the
    padded NHWC input gradient (B, Hp, Wp, C): the adjoint of im2col, the scaling fused into the sums."""
    targets = _windows(grad_padded, kernel, stride, dilation, tuple(grad_columns.shape[1:3]))
    for row in range(kernel[0]):
        for col in range(kernel[1]):  # one tap's windows do not overlap: an in-place add through the view is exact
            tap = tap_scale[:, row * kernel[1] + col].view(-1, 1, 1, 1)
            targets[:, :, :, row, col].addcmul_(grad_columns[:, :, :, row, col], tap)


def _in_one_dtype(*tensors):
    """The tensors cast to autocast's dtype when it is on for their device, else to their common dtype.

    The hand-written custom ops run with autocast off, on these: their backward then sees one dtype.
    """
    dtype = _compute_dtype(*tensors)
    return [t.to(dtype) for t in tensors]


def _autocast_off(device_type: str):
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _unfold_gemm(x, weight, gate_out, gate_in, gate_tap, stride, padding, dilation, matmul):
    """Sum of rank-1 :func:`_unfold_forward` terms, run in one dtype (autocast's, when it is on)."""
    x, weight, gate_out, gate_in, gate_tap = _in_one_dtype(x, weight, gate_out, gate_in, gate_tap)
    channels_last = _memory_format_of(x) == torch.channels_last
    out = None
    with _autocast_off(x.device.type):
        for r in range(gate_out.shape[1]):
            term, _ = _unfold_forward(x, weight, gate_out[:, r], gate_in[:, r], gate_tap[:, r], list(stride),
                                      list(padding), list(dilation), channels_last, matmul)
            out = term if out is None else out + term
    return out


def _unfold_composed(x, weight, gate_out, gate_in, gate_tap, stride, padding, dilation, groups):
    """The unfold path in plain differentiable, batch-independent ops (any rank and groups): for export."""
    batch = x.shape[0]
    out_channels, in_per_group, kh, kw = weight.shape
    rank = gate_out.shape[1]
    taps = kh * kw
    out_size = conv_output_size(tuple(x.shape[-2:]), (kh, kw), stride, padding, dilation)
    columns = F.unfold(x, (kh, kw), dilation, padding, stride)  # (B, Cin*taps, L), channel-major
    columns = columns.view(batch, 1, groups, in_per_group, taps, -1)
    scale = (gate_in.view(batch, rank, 1, in_per_group, 1) * gate_tap.view(batch, rank, 1, 1, taps)).unsqueeze(-1)
    gated = (columns * scale).view(batch, rank, groups, in_per_group * taps, -1)
    weight_groups = weight.view(groups, out_channels // groups, in_per_group * taps)
    out = torch.matmul(weight_groups, gated)  # (B, R, G, Cout/G, L)
    out = out.reshape(batch, rank, out_channels, -1) * gate_out.unsqueeze(-1)
    return out.sum(1).view(batch, out_channels, out_size[0], out_size[1])


def _taps_composed(x, weight, gate_out, gate_in, gate_tap, stride, padding, dilation, groups):
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


# ----------------------------------------------------------------------------------------------------------------
# Triton path: fused kernels in pedconv/triton/, imported on first use only.


def check_triton_groups(groups: int) -> None:
    """The Triton kernels cover groups=1 (every convolution of the ResNets): a clear error otherwise."""
    if groups != 1:
        raise ValueError(f"PEDConv method 'triton' supports groups=1 only, got groups={groups}; "
                         f"use method='auto' for grouped convolutions")


def triton_path(device: torch.device):
    """The :mod:`pedconv.triton` module, imported here on first use: on CUDA tensors, or on CPU tensors under
    Triton's interpreter (``TRITON_INTERPRET=1``, for tests). Elsewhere a RuntimeError saying what is missing."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"PEDConv method 'triton' runs on CUDA tensors (got a {device.type} tensor); "
                           f"on the CPU only under Triton's interpreter (TRITON_INTERPRET=1, slow: for tests)")
    try:
        from . import triton as triton_module
    except ImportError as error:
        raise RuntimeError(f"PEDConv method 'triton' needs the triton package ({error}); it comes with PyTorch's "
                           f"CUDA wheels on Linux, else: pip install triton") from error
    return triton_module


# ----------------------------------------------------------------------------------------------------------------


def pedconv2d(
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
    method: str = "auto",
) -> torch.Tensor:
    """PEDConv forward: y_b = conv2d(x_b, W0 * A_b) with A_b the rank-R CP product of the three gates.

    Gates have shape (B, R, C) with C = Cout, Cin/groups and kh*kw. ``method`` is one of ``auto`` (the fastest
    exact path for the layer, measured where it runs: :mod:`pedconv.autotune`), ``grouped``, ``unfold``, ``taps``,
    ``reference`` (see the module docstring), ``triton`` (fused Triton kernels, CUDA only, groups=1; see
    :mod:`pedconv.triton`), or a path name of ``PATHS``. The output keeps the input's memory
    format (channels_last in, channels_last out).
    """
    check_method(method)
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    channels_last = _memory_format_of(x) == torch.channels_last
    if method == "triton":
        check_triton_groups(groups)
        if _is_exporting() or torch._C._are_functorch_transforms_active():
            method = "unfold"  # a graph being exported or a torch.func transform gets the shared-weight path's ops
    if method == "reference":
        return pedconv2d_reference(x, weight, gate_out, gate_in, gate_tap, bias, stride, padding, dilation, groups)
    kernel = tuple(weight.shape[-2:])
    if kernel != (1, 1) and _is_exporting():
        out = _unfold_composed(x, weight, gate_out, gate_in, gate_tap, stride, padding, dilation, groups)
        return _finish(out, bias, channels_last)
    if method == "auto":
        path = _auto_path(x, weight, gate_out, gate_in, gate_tap, stride, padding, dilation, groups)
    else:
        path = method_path(method, x.device.type, kernel, groups, padding)
    return run_path(path, x, weight, gate_out, gate_in, gate_tap, bias, stride, padding, dilation, groups)


def check_method(method: str) -> None:
    if method not in METHODS and method not in PATHS:
        raise ValueError(f"unknown PEDConv method {method!r}; expected one of {', '.join(METHODS + PATHS)}")


def run_path(path: str, x, weight, gate_out, gate_in, gate_tap, bias, stride: IntPair, padding: IntPair,
             dilation: IntPair, groups: int) -> torch.Tensor:
    """Run one concrete path (a name of ``PATHS``, as :func:`method_path` or ``auto`` resolve it)."""
    channels_last = _memory_format_of(x) == torch.channels_last
    if path.startswith("pointwise:"):
        # 1x1: the tap gate is one scalar per sample, folded into the output gate.
        out_scale = gate_out * gate_tap
        if path == "pointwise:per-sample":
            out = _pointwise_per_sample(x, weight, out_scale, gate_in, stride)
        else:
            out = _pointwise_shared(x, weight, out_scale, gate_in, stride, padding, dilation, groups)
    elif path in ("unfold:conv", "unfold:matmul") and groups == 1 and not _plain_ops_only():
        out = _unfold_gemm(x, weight, gate_out, gate_in, gate_tap, stride, padding, dilation, path == "unfold:matmul")
    elif path.startswith("unfold"):
        out = _unfold_composed(x, weight, gate_out, gate_in, gate_tap, stride, padding, dilation, groups)
    elif path == "triton":
        fused = triton_path(x.device).pedconv2d_triton
        out = fused(x, weight, gate_out, gate_in, gate_tap, stride, padding, dilation)
    elif path == "taps":
        out = _taps_composed(x, weight, gate_out, gate_in, gate_tap, stride, padding, dilation, groups)
    elif path in ("grouped", "grouped:chunks"):
        # Per-sample kernels, all gates folded in (the kernel is built anyway for the tap gate). In plain ops that
        # is exactly the release's computation.
        if _plain_ops_only():
            return pedconv2d_reference(x, weight, gate_out, gate_in, gate_tap, bias, stride, padding, dilation, groups)
        tensors = _in_one_dtype(x.contiguous(), weight, gate_out, gate_in, gate_tap)
        chunk = GROUPED_CHUNK_SAMPLES if path == "grouped:chunks" else 0
        with _autocast_off(x.device.type):
            out = _grouped_forward(*tensors, list(stride), list(padding), list(dilation), groups, chunk)
    else:
        raise ValueError(f"unknown PEDConv path {path!r}; expected one of {', '.join(PATHS)}")
    return _finish(out, bias, channels_last)


def _compute_dtype(*tensors) -> torch.dtype:
    """The dtype the fast paths compute in (see :func:`_in_one_dtype`)."""
    device_type = tensors[0].device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return functools.reduce(torch.promote_types, [t.dtype for t in tensors])


def layer_spec(x_shape, device: torch.device, dtype: torch.dtype, channels_last: bool, weight_shape, rank: int,
               stride: IntPair, padding: IntPair, dilation: IntPair, groups: int,
               requires_grad: Tuple[bool, ...]) -> "autotune.LayerSpec":
    """What ``auto`` decides on for one call: its key's fields, the fixed rule's path and the candidates.
    ``requires_grad``: of (x, weight, gate_out, gate_in, gate_tap), all False for an evaluation call."""
    batch, in_channels, height, width = (int(n) for n in x_shape)
    out_channels, _, kh, kw = (int(n) for n in weight_shape)
    out_size = conv_output_size((height, width), (kh, kw), stride, padding, dilation)
    fixed = choose_method(batch, in_channels, out_channels, (kh, kw), groups, out_size,
                          device_type=device.type, channels_last=channels_last)
    training = any(requires_grad)
    return autotune.LayerSpec(
        device=str(device), dtype=str(dtype).removeprefix("torch."), channels_last=channels_last, batch=batch,
        in_channels=in_channels, out_channels=out_channels, kernel=(kh, kw), stride=tuple(stride),
        padding=tuple(padding), dilation=tuple(dilation), groups=groups, rank=int(rank), size=(height, width),
        training=training, fixed=method_path(fixed, device.type, (kh, kw), groups, tuple(padding)),
        candidates=tuple(candidate_paths(device.type, batch, (kh, kw), groups, tuple(padding), training)),
        requires_grad=tuple(requires_grad),
    )


def _auto_path(x, weight, gate_out, gate_in, gate_tap, stride, padding, dilation, groups) -> str:
    """``auto``: the path measured fastest for this layer shape (:mod:`pedconv.autotune`), else the fixed rule's."""
    tensors = (x, weight, gate_out, gate_in, gate_tap)
    training = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    layer = layer_spec(x.shape, x.device, _compute_dtype(*tensors), _memory_format_of(x) == torch.channels_last,
                       weight.shape, gate_out.shape[1], stride, padding, dilation, groups,
                       tuple(t.requires_grad for t in tensors) if training else (False,) * 5)
    if _plain_ops_only():
        return layer.fixed
    if torch.compiler.is_compiling():
        return _compiled_choice(tuple(layer))

    def run(path: str) -> None:
        leaves = [t.detach().requires_grad_(need) for t, need in zip(tensors, layer.requires_grad)]
        with torch.enable_grad() if layer.training else torch.no_grad():
            out = run_path(path, *leaves, None, stride, padding, dilation, groups)
            if layer.training:
                out.backward(torch.ones_like(out))

    return autotune.choose(layer, run)


def _compiled_choice(fields: tuple) -> str:
    """``auto`` while torch.compile traces: a constant of the graph, chosen (measured, if need be, on random inputs
    of the layer's shape: the traced inputs are fake) once per layer shape as in eager mode. ``fields``: a
    :class:`autotune.LayerSpec` as a plain tuple (the compiler passes plain constants)."""
    layer = autotune.LayerSpec(*fields)
    return autotune.choose(layer, functools.partial(_run_on_random_inputs, layer))


# What torch._dynamo.assume_constant_result does, without importing torch._dynamo (and with it Triton) when pedconv
# is imported: the compiler is only loaded by a program that compiles.
_compiled_choice._dynamo_marked_constant = True


def _run_on_random_inputs(layer: "autotune.LayerSpec", path: str) -> None:
    """One forward (and backward, for a training key) of ``path`` on random tensors of the layer's shapes."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily(), _autocast_off(layer.device.split(":")[0]):
        generator = torch.Generator().manual_seed(0)
        dtype = getattr(torch, layer.dtype)

        def make(*shape, low=0.0):
            t = torch.rand(shape, generator=generator) * (1 - low) + low
            return t.to(device=layer.device, dtype=dtype)

        groups, rank = layer.groups, layer.rank
        x = make(layer.batch, layer.in_channels, *layer.size)
        if layer.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        weight = make(layer.out_channels, layer.in_channels // groups, *layer.kernel)
        gates = [make(layer.batch, rank, n, low=0.1) for n in
                 (layer.out_channels, layer.in_channels // groups, layer.kernel[0] * layer.kernel[1])]
        tensors = [t.requires_grad_(need) for t, need in zip([x, weight] + gates, layer.requires_grad)]
        with torch.enable_grad() if layer.training else torch.no_grad():
            out = run_path(path, *tensors, None, layer.stride, layer.padding, layer.dilation, groups)
            if layer.training:
                out.backward(torch.ones_like(out))


def _per_sample_kernels(weight: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
    """W0 * A_b for every sample, (B, Cout, Cin/G, kh, kw), written over ``mod`` (B, Cout, Cin/G, kh*kw)."""
    return mod.view(mod.shape[0], *weight.shape).mul_(weight)


def _chunks_of(batch: int, chunk: int):
    """(start, stop) ranges of ``chunk`` samples (the whole batch for 0)."""
    size = batch if chunk <= 0 else min(chunk, batch)
    return [(start, min(start + size, batch)) for start in range(0, batch, size)]


@torch.library.custom_op("pedconv::grouped_forward", mutates_args=())
def _grouped_forward(x: Tensor, weight: Tensor, gate_out: Tensor, gate_in: Tensor, gate_tap: Tensor,
                     stride: List[int], padding: List[int], dilation: List[int], groups: int, chunk: int) -> Tensor:
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
        return _grouped_conv(x, kernels, stride, padding, dilation, groups)
    out = None
    for start, stop in ranges:
        kernels = _per_sample_kernels(weight, modulation(gate_out[start:stop], gate_in[start:stop],
                                                         gate_tap[start:stop]))
        part = _grouped_conv(x[start:stop], kernels, stride, padding, dilation, groups)
        if out is None:
            out = x.new_empty((x.shape[0],) + tuple(part.shape[1:]))
        out[start:stop] = part
    return out


@_grouped_forward.register_fake
def _grouped_forward_fake(x, weight, gate_out, gate_in, gate_tap, stride, padding, dilation, groups, chunk):
    out_h, out_w = conv_output_size(tuple(x.shape[-2:]), tuple(weight.shape[-2:]), stride, padding, dilation)
    return x.new_empty((x.shape[0], weight.shape[0], out_h, out_w))


@torch.library.custom_op("pedconv::grouped_backward", mutates_args=())
def _grouped_backward(grad_out: Tensor, x: Tensor, weight: Tensor, gate_out: Tensor, gate_in: Tensor,
                      gate_tap: Tensor, stride: List[int], padding: List[int], dilation: List[int], groups: int,
                      chunk: int, needs: List[bool]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`_grouped_forward` for x, weight and the three gates (empty where not needed)."""
    ranges = _chunks_of(x.shape[0], chunk)
    grad_out = grad_out.contiguous()
    if len(ranges) == 1:
        grads = _grouped_backward_chunk(grad_out, x, weight, gate_out, gate_in, gate_tap, stride, padding, dilation,
                                        groups, needs)
    else:
        parts = [_grouped_backward_chunk(grad_out[start:stop], x[start:stop], weight, gate_out[start:stop],
                                         gate_in[start:stop], gate_tap[start:stop], stride, padding, dilation,
                                         groups, needs) for start, stop in ranges]
        grads = [torch.cat([p[i] for p in parts]) if needs[i] and i != 1 else None for i in range(5)]
        if needs[1]:
            grads[1] = functools.reduce(torch.add, [p[1] for p in parts])
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


def _grouped_backward_chunk(grad_out, x, weight, gate_out, gate_in, gate_tap, stride, padding, dilation, groups,
                            needs):
    """The grouped path's gradients for one chunk of samples: (x, weight, gate_out, gate_in, gate_tap), None where
    not needed."""
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
        [needs[0], needs[1] or need_gates, False],
    )
    grad_weight = grad_gate_out = grad_gate_in = grad_gate_tap = None
    if grad_x is not None:
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


@_grouped_backward.register_fake
def _grouped_backward_fake(grad_out, x, weight, gate_out, gate_in, gate_tap, stride, padding, dilation, groups,
                           chunk, needs):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) if need else t.new_empty(0)
                 for need, t in zip(needs, (x, weight, gate_out, gate_in, gate_tap)))


def _grouped_setup_context(ctx, inputs, output):
    x, weight, gate_out, gate_in, gate_tap, stride, padding, dilation, groups, chunk = inputs
    ctx.save_for_backward(x, weight, gate_out, gate_in, gate_tap)
    ctx.conv = (stride, padding, dilation, groups, chunk)


def _grouped_autograd(ctx, grad_out):
    needs = list(ctx.needs_input_grad[:5])
    grads = _grouped_backward(grad_out, *ctx.saved_tensors, *ctx.conv, needs)
    return _needed(grads, needs) + (None,) * 5


_grouped_forward.register_autograd(_grouped_autograd, setup_context=_grouped_setup_context)


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
    return _needed(grads, needs) + (None,) * 4


_scaled_conv_forward.register_autograd(_scaled_conv_autograd, setup_context=_scaled_conv_setup_context)


def _pointwise_shared(x, weight, out_scale, in_scale, stride, padding, dilation, groups):
    """Rank-R 1x1 PEDConv with the shared weight: sum_r out_scale_r * conv1x1(in_scale_r * x, W0)."""
    function = not (_plain_ops_only() or _is_exporting())
    if function:
        x, weight, out_scale, in_scale = _in_one_dtype(x, weight, out_scale, in_scale)
    out = None
    with _autocast_off(x.device.type) if function else contextlib.nullcontext():
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


def _pointwise_per_sample(x, weight, out_scale, in_scale, stride):
    """1x1 PEDConv (groups 1, no padding) as one batched matmul with per-sample (Cout, Cin) matrices.

    The matrices are small next to the activations in all but the last stage, no scaled copy of the activations is
    made or kept for the backward, and a batched matmul keeps the batch axis dynamic for export.
    """
    if stride != (1, 1):
        x = x[:, :, :: stride[0], :: stride[1]]
    batch, in_channels, height, width = x.shape
    matrices = torch.einsum("bro,bri,oi->boi", out_scale, in_scale, weight.view(weight.shape[0], in_channels))
    if _memory_format_of(x) == torch.channels_last:
        rows = x.permute(0, 2, 3, 1).reshape(batch, height * width, in_channels)
        out = torch.bmm(rows, matrices.transpose(1, 2).to(rows.dtype))
        return out.view(batch, height, width, -1).permute(0, 3, 1, 2)
    out = torch.bmm(matrices.to(x.dtype), x.reshape(batch, in_channels, height * width))
    return out.view(batch, -1, height, width)


class _GlobalAvgPool(torch.autograd.Function):
    """x.mean((2, 3)) whose backward hands back a broadcast view instead of an input-sized tensor.

    The gradient then costs one in-place add into the convolution's input gradient, where autograd's mean would
    first write (B, C, H, W) copies of it (two input-sized passes per layer).
    """

    @staticmethod
    def forward(ctx, x):
        ctx.input_shape = x.shape
        return x.mean((2, 3))

    @staticmethod
    def backward(ctx, grad_pooled):
        height, width = ctx.input_shape[-2:]
        return (grad_pooled / (height * width))[:, :, None, None].expand(ctx.input_shape)


def global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C) spatial mean, the gate generator's input."""
    if _plain_ops_only() or _is_exporting():
        return x.mean((2, 3))
    return _GlobalAvgPool.apply(x)


def _finish(out, bias, channels_last):
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    if channels_last:
        return out.contiguous(memory_format=torch.channels_last)
    return out.contiguous()

