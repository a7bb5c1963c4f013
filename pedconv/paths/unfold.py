"""The ``unfold`` path: a shared-weight product on gated im2col columns, with a hand-written backward
(``unfold:conv``, ``unfold:matmul`` and ``unfold:onednn-matmul`` for groups 1; ``unfold:plain``, in plain ops, for any
groups and for export)."""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import (IntPair, autocast_off, conv_output_size, gradients_like, in_one_dtype, memory_format_of,
                     needed)


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


# How the column products run: 1x1 convolutions over channels_last views of the columns (oneDNN on the CPU, cuDNN
# on CUDA), matrix products through the BLAS (``torch.mm``), or oneDNN's matrix product (CPU only; see
# :func:`onednn_matmul_available`). Which is fastest depends on the processor and its libraries.
PRODUCTS = ("conv", "matmul", "onednn-matmul")


def onednn_matmul_available(device_type: str, dtype: torch.dtype) -> bool:
    """Whether this PyTorch has oneDNN's matrix product for CPU tensors of ``dtype`` (``torch.ops.mkldnn.
    _linear_pointwise``, an internal op that Inductor's CPU backend uses; float32, and bfloat16 where oneDNN supports
    it on this processor): some processors run it faster than the BLAS's ``torch.mm``."""
    if device_type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


# A constant while torch.compile traces (torch._dynamo.assume_constant_result, without importing torch._dynamo):
# the compiler does not trace into torch.backends.
onednn_matmul_available._dynamo_marked_constant = True


def check_products(products: str, device_type: str, dtype: torch.dtype) -> None:
    """A clear error for column products that cannot run on this device and dtype."""
    if products == "onednn-matmul" and not onednn_matmul_available(device_type, dtype):
        raise ValueError(f"PEDConv path 'unfold:onednn-matmul' needs CPU tensors of float32 (or bfloat16 where oneDNN "
                         f"supports it) and a PyTorch built with oneDNN; got {device_type} {dtype}")


def _unfold_out_size(x, weight, stride, padding, dilation):
    return conv_output_size(tuple(x.shape[-2:]), tuple(weight.shape[-2:]), stride, padding, dilation)


@torch.library.custom_op("pedconv::unfold_forward", mutates_args=())
def _unfold_forward(x: Tensor, weight: Tensor, gate_out: Tensor, gate_in: Tensor, gate_tap: Tensor,
                    stride: List[int], padding: List[int], dilation: List[int], channels_last: bool,
                    products: str) -> Tuple[Tensor, Tensor]:
    """Rank-1, groups=1 PEDConv via gated im2col and one shared-weight product: (output, raw output rows).

    Gates are (B, C). All tensors arrive in one dtype (see :func:`in_one_dtype`). The batch is processed in chunks
    of samples (see ``COLUMN_CHUNK_BYTES``), so that the gated columns never exist for the whole batch at once. The
    backward gets only the input (which the layer before keeps anyway) and the raw output (NHWC rows before the
    output gate), and gathers the columns again: one more gather pass, for memory close to a static convolution's.
    ``products``: how the column products run, one of ``PRODUCTS``.
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
                             products)
    raw_nchw = raw.view(batch, out_size[0], out_size[1], out_channels).permute(0, 3, 1, 2)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty_like(raw_nchw, memory_format=memory_format)
    torch.mul(raw_nchw, gate_out.view(batch, out_channels, 1, 1), out=out)
    return out, raw


@_unfold_forward.register_fake
def _unfold_forward_fake(x, weight, gate_out, gate_in, gate_tap, stride, padding, dilation, channels_last,
                         products):
    out_h, out_w = _unfold_out_size(x, weight, stride, padding, dilation)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty((x.shape[0], weight.shape[0], out_h, out_w), dtype=x.dtype, device=x.device,
                      memory_format=memory_format)
    return out, x.new_empty((x.shape[0] * out_h * out_w, weight.shape[0]))


@torch.library.custom_op("pedconv::unfold_backward", mutates_args=())
def _unfold_backward(grad_out: Tensor, x: Tensor, weight: Tensor, gate_out: Tensor, gate_in: Tensor,
                     gate_tap: Tensor, raw: Tensor, stride: List[int], padding: List[int], dilation: List[int],
                     products: str, needs: List[bool]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`_unfold_forward` for x, weight and the three gates; an empty tensor where ``needs`` is
    False."""
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    out_size = _unfold_out_size(x, weight, stride, padding, dilation)
    kernel, x_shape = tuple(weight.shape[-2:]), tuple(x.shape)
    windows, scale, weight_rows, chunks, buffer = _unfold_setup(
        x, weight, gate_in, gate_tap, stride, padding, dilation, out_size)
    batch, (kh, kw), in_channels = x_shape[0], kernel, x_shape[1]
    rows = out_size[0] * out_size[1]
    grad_gate_out, raw_grad_rows = _output_gate_grads(grad_out, raw, gate_out, needs[2])
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
            partial = _rows_t_times(grad_rows, columns.view(grad_rows.shape[0], -1), products)
            del columns
            if grad_weight_rows is None:
                grad_weight_rows = partial.to(torch.promote_types(partial.dtype, torch.float32))
            else:
                grad_weight_rows.add_(partial)
        if need_columns_grad:
            # The column gradient is a fresh product: the columns' buffer goes first, and the product serves
            # as the next chunk's buffer (chunks only shrink), so one chunk-sized block is live at a time.
            buffer = None
            grad_columns = _rows_times_weight(grad_rows, weight_rows, products).view(
                (stop - start,) + windows.shape[1:])
            buffer = grad_columns
            if need_x:
                # Tap gates folded into the col2im sums, channel gates applied once on the input-sized result.
                _col2im_into(grad_padded[start:stop], grad_columns, kernel, stride, dilation, gate_tap[start:stop])
            if need_in or need_tap:
                # In place: the column gradient is not needed after the col2im above.
                torch.sum(grad_columns.mul_(windows[start:stop]), (1, 2), out=grad_scale[start:stop])
    grad_x, grad_weight, grad_gate_in, grad_gate_tap = _gradients_from_sums(
        x, weight, gate_in, gate_tap, padding, grad_padded, grad_weight_rows, grad_scale, needs)
    return tuple(g if g is not None else x.new_empty(0)
                 for g in (grad_x, grad_weight, grad_gate_out, grad_gate_in, grad_gate_tap))


def _output_gate_grads(grad_out, raw, gate_out, need_gate_out: bool):
    """The output gate's gradient (None unless needed) and the raw output's, as NHWC rows (B*Ho*Wo, Cout)."""
    batch, out_channels = grad_out.shape[:2]
    # NHWC rows of the incoming gradient; a copy only when the caller's layout is NCHW.
    grad_out_rows = grad_out.to(raw.dtype).permute(0, 2, 3, 1).reshape(batch, -1, out_channels)
    grad_gate_out = None
    if need_gate_out:
        grad_gate_out = (grad_out_rows * raw.view(batch, -1, out_channels)).sum(1)
    return grad_gate_out, (grad_out_rows * gate_out.view(batch, 1, out_channels)).reshape(-1, out_channels)


def _gradients_from_sums(x, weight, gate_in, gate_tap, padding, grad_padded, grad_weight_rows, grad_scale, needs):
    """The gradients of x, the weight, the input and the tap gates (None where not needed) from what the chunks
    summed: the padded NHWC input gradient before the input gate, the weight gradient's (Cout, kh*kw*Cin) rows, and
    the columns' gate-scale gradient (B, kh, kw, Cin)."""
    batch = x.shape[0]
    out_channels, in_channels, kh, kw = weight.shape
    grad_x = grad_weight = grad_gate_in = grad_gate_tap = None
    if needs[1]:
        grad_weight = grad_weight_rows.to(weight.dtype).view(out_channels, kh, kw, in_channels)
        grad_weight = grad_weight.permute(0, 3, 1, 2)
        grad_weight = grad_weight.contiguous(memory_format=memory_format_of(weight))
    if needs[0]:
        interior = _interior(grad_padded, padding, x.shape[-2:])
        grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))
        torch.mul(interior.permute(0, 3, 1, 2), gate_in.view(batch, -1, 1, 1), out=grad_x)
    if needs[3]:
        grad_gate_in = (grad_scale * gate_tap.view(batch, kh, kw, 1)).sum((1, 2))
    if needs[4]:
        grad_gate_tap = (grad_scale * gate_in.view(batch, 1, 1, -1)).sum(3).view(batch, -1)
    return grad_x, grad_weight, grad_gate_in, grad_gate_tap


@_unfold_backward.register_fake
def _unfold_backward_fake(grad_out, x, weight, gate_out, gate_in, gate_tap, raw, stride, padding, dilation,
                          products, needs):
    return gradients_like(needs, x, weight, gate_out, gate_in, gate_tap)


def _unfold_setup_context(ctx, inputs, output):
    x, weight, gate_out, gate_in, gate_tap, stride, padding, dilation, _, products = inputs
    ctx.save_for_backward(x, weight, gate_out, gate_in, gate_tap, output[1])
    ctx.conv = (stride, padding, dilation, products)


def _unfold_autograd(ctx, grad_out, _grad_raw):
    needs = list(ctx.needs_input_grad[:5])
    grads = _unfold_backward(grad_out, *ctx.saved_tensors, *ctx.conv, needs)
    return needed(grads, needs) + (None,) * 5


_unfold_forward.register_autograd(_unfold_autograd, setup_context=_unfold_setup_context)


def _rows_times_weight_t(rows: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, products: str) -> torch.Tensor:
    """rows (n, K) @ weight.T for a weight (N, K), written into ``out`` (n, N): a matrix product (the BLAS's or
    oneDNN's), or a 1x1 convolution over a channels_last view of the rows (n pixels of K channels), which the
    convolution libraries (oneDNN, cuDNN) run faster than the BLAS on some processors."""
    if products == "matmul":
        return torch.mm(rows, weight.t(), out=out)
    if products == "onednn-matmul":
        return out.copy_(_onednn_matmul(rows, weight))
    return out.copy_(_rows_of(F.conv2d(_pixels_of(rows), weight.view(weight.shape[0], weight.shape[1], 1, 1))))


def _rows_times_weight(rows: torch.Tensor, weight: torch.Tensor, products: str) -> torch.Tensor:
    """rows (n, N) @ weight for a weight (N, K): a fresh contiguous (n, K) product; a matrix product or a 1x1
    transposed convolution (as :func:`_rows_times_weight_t`; it takes the weight as it is, no transposed copy)."""
    if products == "matmul":
        return torch.mm(rows, weight)
    if products == "onednn-matmul":
        return _onednn_matmul(rows, weight.t())
    return _rows_of(F.conv_transpose2d(_pixels_of(rows), weight.view(weight.shape[0], weight.shape[1], 1, 1)))


def _rows_t_times(rows: torch.Tensor, columns: torch.Tensor, products: str) -> torch.Tensor:
    """rows.T @ columns for rows (n, N) and columns (n, K): the weight gradient's (N, K) rows (a matrix product in
    every mode but ``onednn-matmul``: a 1x1 convolution's weight gradient gained nothing over it)."""
    if products == "onednn-matmul":
        return _onednn_matmul(rows.t(), columns.t())
    return torch.mm(rows.t(), columns)


def _onednn_matmul(left: torch.Tensor, right_t: torch.Tensor) -> torch.Tensor:
    """left (n, K) @ right_t.T for right_t (N, K), through oneDNN's matrix product (which takes both as strided
    views: no transposed copies)."""
    return torch.ops.mkldnn._linear_pointwise(left, right_t, None, "none", [], "")


def _pixels_of(rows: torch.Tensor) -> torch.Tensor:
    """(n, K) rows as a (1, K, 1, n) channels_last image (a view)."""
    return rows.view(1, 1, rows.shape[0], rows.shape[1]).permute(0, 3, 1, 2)


def _rows_of(pixels: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_pixels_of` for a channels_last (1, K, 1, n) image."""
    return pixels.permute(0, 2, 3, 1).view(pixels.shape[3], pixels.shape[1])


def _col2im_into(grad_padded, grad_columns, kernel, stride, dilation, tap_scale):
    """Add NHWC column gradients (B, Ho, Wo, kh, kw, C), each tap's scaled by ``tap_scale`` (B, kh*kw), onto the
    padded NHWC input gradient (B, Hp, Wp, C): the adjoint of im2col, the scaling fused into the sums."""
    targets = _windows(grad_padded, kernel, stride, dilation, tuple(grad_columns.shape[1:3]))
    for row in range(kernel[0]):
        for col in range(kernel[1]):  # one tap's windows do not overlap: an in-place add through the view is exact
            tap = tap_scale[:, row * kernel[1] + col].view(-1, 1, 1, 1)
            targets[:, :, :, row, col].addcmul_(grad_columns[:, :, :, row, col], tap)


def unfold_gemm(x, weight, gate_out, gate_in, gate_tap, stride, padding, dilation, products):
    """Sum of rank-1 :func:`_unfold_forward` terms, run in one dtype (autocast's, when it is on)."""
    x, weight, gate_out, gate_in, gate_tap = in_one_dtype(x, weight, gate_out, gate_in, gate_tap)
    check_products(products, x.device.type, x.dtype)
    channels_last = memory_format_of(x) == torch.channels_last
    out = None
    with autocast_off(x.device.type):
        for r in range(gate_out.shape[1]):
            term, _ = _unfold_forward(x, weight, gate_out[:, r], gate_in[:, r], gate_tap[:, r], list(stride),
                                      list(padding), list(dilation), channels_last, products)
            out = term if out is None else out + term
    return out


def unfold_composed(x, weight, gate_out, gate_in, gate_tap, stride, padding, dilation, groups):
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
