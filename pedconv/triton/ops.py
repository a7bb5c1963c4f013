"""The fused PEDConv as ``torch.library`` custom ops: ``pedconv::triton_conv2d`` and its backward.

Both ops have fake (meta) implementations, so ``torch.compile`` traces them as single ops, and the forward's
autograd formula is registered with ``torch.library.register_autograd``. The ops take rank-1 float32 gates of
shape (B, O), (B, C), (B, KH*KW); :func:`pedconv.triton.pedconv2d_triton` splits rank R into R calls and handles
autocast and dtypes.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import triton

from . import kernels

_GATE_DTYPE = torch.float32


def _output_size(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation) -> Tuple[int, int]:
    return tuple(
        (x.shape[2 + d] + 2 * padding[d] - dilation[d] * (weight.shape[2 + d] - 1) - 1) // stride[d] + 1
        for d in range(2)
    )


def _nhwc_output(x: torch.Tensor, channels: int, size: Tuple[int, int]) -> torch.Tensor:
    """An uninitialized (B, channels, *size) tensor in channels_last memory (NHWC, as the kernels write it)."""
    return x.new_empty((x.shape[0], size[0], size[1], channels)).permute(0, 3, 1, 2)


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    """t as a channels_last (dense NHWC) tensor: itself when it already is, else a copy."""
    return t.contiguous(memory_format=torch.channels_last)


def _interpreting(t: torch.Tensor) -> bool:
    """Whether the kernels run under Triton's interpreter: TRITON_INTERPRET=1, or a CPU tensor (where only the
    interpreter can run them; :func:`pedconv.functional.pedconv2d` lets CPU tensors through only when it is on)."""
    return t.device.type == "cpu" or bool(triton.knobs.runtime.interpret)


def _dot_dtype(dtype: torch.dtype, interpret: bool):
    """The tensor-core operand type: the input's, except bfloat16 under the interpreter, whose dot products are
    unreliable there (float32 instead)."""
    tl = triton.language
    if dtype == torch.bfloat16:
        return tl.float32 if interpret else tl.bfloat16
    return {torch.float16: tl.float16, torch.float32: tl.float32}[dtype]


def _input_precision(dtype: torch.dtype) -> str:
    """float32 products on tensor cores (TF32) exactly when cuDNN's convolutions may use them."""
    return "tf32" if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 else "ieee"


def _check(x, weight, gate_out, gate_in, gate_tap):
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"triton_conv2d expects 4-D input and weight, got {tuple(x.shape)} and {tuple(weight.shape)}")
    batch, channels = x.shape[:2]
    if weight.shape[1] != channels:
        raise ValueError(f"triton_conv2d supports groups=1 only: weight {tuple(weight.shape)} for {channels} "
                         f"input channels")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or weight.dtype != x.dtype:
        raise ValueError(f"triton_conv2d needs input and weight of one dtype among float16, bfloat16, float32, "
                         f"got {x.dtype} and {weight.dtype}")
    expected = {"gate_out": (batch, weight.shape[0]), "gate_in": (batch, channels),
                "gate_tap": (batch, weight.shape[2] * weight.shape[3])}
    for name, gate in zip(expected, (gate_out, gate_in, gate_tap)):
        if tuple(gate.shape) != expected[name] or gate.dtype != _GATE_DTYPE:
            raise ValueError(f"triton_conv2d: {name} must be float32 of shape {expected[name]}, "
                             f"got {gate.dtype} {tuple(gate.shape)}")


def _conv_args(x, weight, stride, padding, dilation, out_size):
    """The shape and convolution arguments every kernel takes, in the kernels' order."""
    batch, channels, height, width = x.shape
    return dict(B=batch, C=channels, H=height, W=width, O=weight.shape[0], HO=out_size[0], WO=out_size[1],
                SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1], DH=dilation[0], DW=dilation[1],
                KH=weight.shape[2], KW=weight.shape[3])


def _strides(prefix: str, t: torch.Tensor) -> dict:
    """A 4-D tensor's strides as the kernels name them, in NCHW order (e.g. sxb, sxc, sxh, sxw)."""
    return {f"{prefix}{axis}": stride for axis, stride in zip("bchw", t.stride())}


def _weight_strides(weight: torch.Tensor) -> dict:
    return {f"sw{axis}": stride for axis, stride in zip("ochw", weight.stride())}


def _weight_along(weight: torch.Tensor, axis: int) -> torch.Tensor:
    """W0 (O, C, KH, KW) with memory dense along ``axis`` (0: output channels, 1: input channels), the axis that a
    kernel's weight tile runs along, so that the tile's loads are contiguous. A weight-sized copy at most."""
    other = 1 - axis
    return weight.permute(2, 3, other, axis).contiguous().permute(2 + (axis == 0), 2 + (axis == 1), 0, 1)


@torch.library.custom_op("pedconv::triton_conv2d", mutates_args=())
def triton_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    gate_out: torch.Tensor,
    gate_in: torch.Tensor,
    gate_tap: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    keep_raw: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rank-1 PEDConv: (y, raw) with raw = conv(x, W0 * a_in (x) a_k) and y = a_out * raw, both channels_last.

    ``raw`` (the unscaled output, for the output gate's gradient) is written only when ``keep_raw``; otherwise
    an empty tensor is returned in its place.
    """
    _check(x, weight, gate_out, gate_in, gate_tap)
    out_size = _output_size(x, weight, stride, padding, dilation)
    out = _nhwc_output(x, weight.shape[0], out_size)
    raw = _nhwc_output(x, weight.shape[0], out_size) if keep_raw else x.new_empty(0)
    if out.numel() == 0:
        return out, raw
    interpret = _interpreting(x)
    built = kernels.build(interpret)
    x, gate_out, gate_in, gate_tap = _nhwc(x), gate_out.contiguous(), gate_in.contiguous(), gate_tap.contiguous()
    args = _conv_args(x, weight, stride, padding, dilation, out_size)

    def grid(meta):
        return (triton.cdiv(out_size[0] * out_size[1], meta["BLOCK_M"]),
                triton.cdiv(args["O"], meta["BLOCK_N"]), args["B"])

    weight = _weight_along(weight, 0)  # the B operand's tile: input channels x output channels
    built.forward[grid](
        x, weight, gate_out, gate_in, gate_tap, out, raw if keep_raw else out,
        **args, **_strides("sx", x), **_weight_strides(weight), WRITE_RAW=keep_raw,
        DOT_DTYPE=_dot_dtype(x.dtype, interpret), INPUT_PRECISION=_input_precision(x.dtype), **built.conv_config,
    )
    return out, raw


@triton_conv2d.register_fake
def _triton_conv2d_fake(x, weight, gate_out, gate_in, gate_tap, stride, padding, dilation, keep_raw):
    _check(x, weight, gate_out, gate_in, gate_tap)
    out_size = _output_size(x, weight, stride, padding, dilation)
    out = _nhwc_output(x, weight.shape[0], out_size)
    return out, (_nhwc_output(x, weight.shape[0], out_size) if keep_raw else x.new_empty(0))


@torch.library.custom_op("pedconv::triton_conv2d_backward", mutates_args=())
def triton_conv2d_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    gate_out: torch.Tensor,
    gate_in: torch.Tensor,
    gate_tap: torch.Tensor,
    raw: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    output_mask: Sequence[bool],
) -> List[torch.Tensor]:
    """Gradients of :func:`triton_conv2d`'s y with respect to (x, weight, gate_out, gate_in, gate_tap).

    ``output_mask`` says which to compute; the others come back as empty tensors. The input gradient is one
    kernel; the weight and the three gate gradients come from one more (see :mod:`pedconv.triton.kernels`).
    """
    need_x, need_weight, need_out, need_in, need_tap = output_mask
    if need_out and raw.numel() == 0 and grad.numel() > 0:
        raise RuntimeError("triton_conv2d_backward: the output gate's gradient needs the unscaled output "
                           "(the forward ran with keep_raw=False)")
    grads = _backward_buffers(x, weight, gate_out, gate_in, gate_tap, output_mask)
    if grad.numel() == 0:
        return [g.zero_() for g in grads]
    interpret = _interpreting(x)
    built = kernels.build(interpret)
    x, grad = _nhwc(x), _nhwc(grad)
    gate_out, gate_in, gate_tap = gate_out.contiguous(), gate_in.contiguous(), gate_tap.contiguous()
    raw = _nhwc(raw) if raw.dim() == 4 else raw  # empty when the output gate's gradient is not asked for
    out_size = tuple(grad.shape[-2:])
    args = _conv_args(x, weight, stride, padding, dilation, out_size)
    dot_dtype, precision = _dot_dtype(x.dtype, interpret), _input_precision(x.dtype)
    launch = dict(built=built, args=args, dot_dtype=dot_dtype, precision=precision)
    if need_x:
        _launch_input_grad(grad, weight, gate_out, gate_in, gate_tap, grads[0], stride, tuple(x.shape), **launch)
    if need_weight or need_out or need_in or need_tap:
        _launch_weight_grad(grad, x, raw, weight, gate_out, gate_in, gate_tap, grads, output_mask, **launch)
    if need_weight:
        grads[1] = grads[1].to(weight.dtype)
    return grads


def _launch_input_grad(grad, weight, gate_out, gate_in, gate_tap, grad_x, stride, x_shape, *, built, args, dot_dtype,
                       precision) -> None:
    """The input-gradient kernel, into ``grad_x``: one program per tile of one stride class of one sample."""
    stride_classes = stride[0] * stride[1]
    # Pixels per stride class: the class (0, 0) is the largest.
    class_pixels = -(-x_shape[2] // stride[0]) * -(-x_shape[3] // stride[1])

    def grid(meta):
        return (triton.cdiv(class_pixels, meta["BLOCK_M"]),
                triton.cdiv(args["C"], meta["BLOCK_N"]), args["B"] * stride_classes)

    weight_by_input = _weight_along(weight, 1)  # the B operand's tile: output channels x input channels
    built.input_grad[grid](
        grad, weight_by_input, gate_out, gate_in, gate_tap, grad_x,
        **args, **_strides("sg", grad), **_weight_strides(weight_by_input),
        DOT_DTYPE=dot_dtype, INPUT_PRECISION=precision, **built.conv_config,
    )


def _launch_weight_grad(grad, x, raw, weight, gate_out, gate_in, gate_tap, grads, output_mask, *, built, args,
                        dot_dtype, precision) -> None:
    """The kernel that sums the per-sample partial weight gradients into the weight's and the gates' gradients
    (``grads[1:]``, those that ``output_mask`` asks for)."""
    _, need_weight, need_out, need_in, need_tap = output_mask
    weight_grad = grads[1] if need_weight else _fp32_weight_grad_placeholder(weight)

    def grid(meta):
        return (triton.cdiv(args["O"], meta["BLOCK_O"]) * triton.cdiv(args["C"], meta["BLOCK_C"]),
                args["KH"] * args["KW"], triton.cdiv(args["B"], meta["SAMPLES"]))

    built.weight_grad[grid](
        grad, x, raw if need_out else grad, weight, gate_out, gate_in, gate_tap,
        weight_grad, grads[2], grads[3], grads[4],
        **args, **_strides("sg", grad), **_strides("sx", x), **_weight_strides(weight),
        NEED_WEIGHT=need_weight, NEED_OUT=need_out, NEED_IN=need_in, NEED_TAP=need_tap,
        DOT_DTYPE=dot_dtype, INPUT_PRECISION=precision, **built.weight_config,
    )


def _backward_buffers(x, weight, gate_out, gate_in, gate_tap, output_mask) -> List[torch.Tensor]:
    """The five gradients' buffers (empty where not asked for): the input gradient in channels_last memory and
    the input's dtype; the weight gradient as float32 in the weight's memory format (the kernel sums into it);
    the gate gradients float32 and zeroed (summed into)."""
    need_x, need_weight, need_out, need_in, need_tap = output_mask
    return [
        _nhwc_output(x, x.shape[1], tuple(x.shape[-2:])) if need_x else x.new_empty(0),
        torch.zeros_like(weight, dtype=torch.float32) if need_weight else x.new_empty(0),
        torch.zeros_like(gate_out) if need_out else x.new_empty(0),
        torch.zeros_like(gate_in) if need_in else x.new_empty(0),
        torch.zeros_like(gate_tap) if need_tap else x.new_empty(0),
    ]


def _fp32_weight_grad_placeholder(weight):
    """A one-element float32 tensor for the kernel's weight-gradient pointer when that gradient is not asked for
    (the kernel never touches it then)."""
    return weight.new_empty(1, dtype=torch.float32)


@triton_conv2d_backward.register_fake
def _triton_conv2d_backward_fake(grad, x, weight, gate_out, gate_in, gate_tap, raw, stride, padding, dilation,
                                 output_mask):
    grads = _backward_buffers(x, weight, gate_out, gate_in, gate_tap, output_mask)
    if output_mask[1]:
        grads[1] = torch.empty_like(weight)
    return grads


def _setup_context(ctx, inputs, output):
    x, weight, gate_out, gate_in, gate_tap, stride, padding, dilation, _ = inputs
    _, raw = output
    ctx.save_for_backward(x, weight, gate_out, gate_in, gate_tap, raw)
    ctx.conv = (stride, padding, dilation)
    ctx.mark_non_differentiable(raw)


def _backward(ctx, grad_out, _grad_raw):
    x, weight, gate_out, gate_in, gate_tap, raw = ctx.saved_tensors
    stride, padding, dilation = ctx.conv
    output_mask = list(ctx.needs_input_grad[:5])
    grads = triton_conv2d_backward(grad_out, x, weight, gate_out, gate_in, gate_tap, raw, stride, padding, dilation,
                                   output_mask)
    grads = [g if needed else None for g, needed in zip(grads, output_mask)]
    return (*grads, None, None, None, None)


triton_conv2d.register_autograd(_backward, setup_context=_setup_context)
