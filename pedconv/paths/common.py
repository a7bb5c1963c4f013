"""What the PEDConv paths share: argument normalization, the output size, the memory format, the dtype the
fast paths compute in, and the tests for export, tracing and ``torch.func`` transforms."""
from __future__ import annotations

import contextlib
import functools
from typing import Sequence, Tuple, Union

import torch

IntPair = Tuple[int, int]


def pair(value: Union[int, Sequence[int]]) -> IntPair:
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


def plain_ops_only() -> bool:
    """True under torch.func transforms (grad, vmap...): the hand-written custom ops give way to plain
    differentiable ops there. (Under torch.compile the custom ops stay: their fake implementations trace.)"""
    return torch._C._are_functorch_transforms_active()


def is_exporting() -> bool:
    """True while ONNX export, torch.export or a TorchScript trace records the graph."""
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    if torch.onnx.is_in_onnx_export():
        return True
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_exporting") and compiler.is_exporting())


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def in_one_dtype(*tensors):
    """The tensors cast to autocast's dtype when it is on for their device, else to their common dtype.

    The hand-written custom ops run with autocast off, on these: their backward then sees one dtype.
    """
    dtype = compute_dtype(*tensors)
    return [t.to(dtype) for t in tensors]


def autocast_off(device_type: str):
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def compute_dtype(*tensors) -> torch.dtype:
    """The dtype the fast paths compute in (see :func:`in_one_dtype`)."""
    device_type = tensors[0].device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return functools.reduce(torch.promote_types, [t.dtype for t in tensors])


def gradients_like(needs, *inputs):
    """Fake gradients: the inputs' shapes (and memory formats), or empty where not needed."""
    return tuple(torch.empty_like(t, memory_format=memory_format_of(t)) if need else t.new_empty(0)
                 for need, t in zip(needs, inputs))


def needed(grads, needs):
    return tuple(g if need else None for g, need in zip(grads, needs))


def finish(out, bias, channels_last):
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    if channels_last:
        return out.contiguous(memory_format=torch.channels_last)
    return out.contiguous()
