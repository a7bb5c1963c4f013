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
  on CUDA) or as matrix products (``unfold:matmul``: the BLAS; ``unfold:onednn-matmul``: oneDNN's, CPU only); which
  is fastest depends on the processor. The batch
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

import functools
import os
from typing import List, Optional, Tuple, Union

import torch

from . import autotune
from .paths.common import (IntPair, autocast_off, compute_dtype, conv_output_size, finish, in_one_dtype, is_exporting,
                           memory_format_of, pair, plain_ops_only)
from .paths.grouped import GROUPED_CHUNK_SAMPLES, grouped_forward
from .paths.pointwise import pointwise_per_sample, pointwise_shared
from .paths.reference import pedconv2d_reference
from .paths.taps import taps_composed
from .paths.unfold import PRODUCTS, onednn_matmul_available, unfold_composed, unfold_gemm

METHODS = ("auto", "grouped", "unfold", "taps", "reference", "triton")
# The concrete paths that a method runs on (``method`` also takes these names, e.g. ``method="unfold:matmul"``):
# the candidates that ``auto`` measures, and what the fixed rule picks among.
PATHS = ("grouped", "grouped:chunks", "grouped:per-sample-input-grad", "unfold:conv", "unfold:matmul",
         "unfold:onednn-matmul", "unfold:plain", "taps", "pointwise:per-sample", "pointwise:shared")
# The unfold paths with hand-written products (groups 1), and how each runs its column products.
_UNFOLD_PRODUCTS = {f"unfold:{products}": products for products in PRODUCTS}


def choose_method(in_channels: int, out_channels: int, kernel: IntPair, groups: int, out_size: IntPair, *,
                  device_type: str = "cpu", channels_last: bool = False) -> str:
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
                    training: bool, in_channels: Optional[int] = None, out_pixels: Optional[int] = None,
                    dtype: torch.dtype = torch.float32) -> List[str]:
    """The paths ``auto`` measures for one layer shape: every exact fast path whose speed depends on the processor.

    1x1: per-sample matrices (groups 1, no padding; in training only where a sample's (Cout, Cin) matrix is no
    larger than its (Cout, ``out_pixels``) output, ``in_channels`` <= ``out_pixels``: the backward keeps the
    matrices, and bigger ones would take the model well past the memory of a static one: ResNet-50 with them on its
    14x14 and 7x7 1x1 layers, measured in ``benchmarks/results/pedconv_paths.md``) and the shared weight. k x k:
    per-sample kernels over the whole batch and in chunks of ``GROUPED_CHUNK_SAMPLES`` (when the batch is larger),
    for training also with the input gradient as one transposed convolution per sample
    (``grouped:per-sample-input-grad``), the shared-weight columns with the products as convolutions and as matrix
    products (groups 1: the BLAS's, and on the CPU oneDNN's where it takes ``dtype``), and, for evaluation only, the
    per-tap path (its autograd keeps kh*kw output-sized tensors for the backward: too much memory for training). The
    fused ``triton`` kernels on CUDA (groups 1).
    """
    if kernel == (1, 1):
        small_matrices = not training or in_channels is None or out_pixels is None or in_channels <= out_pixels
        paths = ["pointwise:per-sample"] if groups == 1 and padding == (0, 0) and small_matrices else []
        paths.append("pointwise:shared")
    else:
        paths = ["grouped"]
        if batch > GROUPED_CHUNK_SAMPLES:
            paths.append("grouped:chunks")
        if training:
            paths.append("grouped:per-sample-input-grad")
        if groups == 1:
            paths += ["unfold:conv", "unfold:matmul"]
            if onednn_matmul_available(device_type, dtype):
                paths.append("unfold:onednn-matmul")
        if not training:
            paths.append("taps")
    if device_type == "cuda" and groups == 1:
        paths.append("triton")
    return paths

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
    stride, padding, dilation = pair(stride), pair(padding), pair(dilation)
    channels_last = memory_format_of(x) == torch.channels_last
    if method == "triton":
        check_triton_groups(groups)
        if is_exporting() or torch._C._are_functorch_transforms_active():
            method = "unfold"  # a graph being exported or a torch.func transform gets the shared-weight path's ops
    if method == "reference":
        return pedconv2d_reference(x, weight, gate_out, gate_in, gate_tap, bias, stride, padding, dilation, groups)
    kernel = tuple(weight.shape[-2:])
    if kernel != (1, 1) and is_exporting():
        out = unfold_composed(x, weight, gate_out, gate_in, gate_tap, stride, padding, dilation, groups)
        return finish(out, bias, channels_last)
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
    channels_last = memory_format_of(x) == torch.channels_last
    if path.startswith("pointwise:"):
        # 1x1: the tap gate is one scalar per sample, folded into the output gate.
        out_scale = gate_out * gate_tap
        if path == "pointwise:per-sample":
            out = pointwise_per_sample(x, weight, out_scale, gate_in, stride)
        else:
            out = pointwise_shared(x, weight, out_scale, gate_in, stride, padding, dilation, groups)
    elif path in _UNFOLD_PRODUCTS and groups == 1 and not plain_ops_only():
        out = unfold_gemm(x, weight, gate_out, gate_in, gate_tap, stride, padding, dilation, _UNFOLD_PRODUCTS[path])
    elif path.startswith("unfold"):
        out = unfold_composed(x, weight, gate_out, gate_in, gate_tap, stride, padding, dilation, groups)
    elif path == "triton":
        fused = triton_path(x.device).pedconv2d_triton
        out = fused(x, weight, gate_out, gate_in, gate_tap, stride, padding, dilation)
    elif path == "taps":
        out = taps_composed(x, weight, gate_out, gate_in, gate_tap, stride, padding, dilation, groups)
    elif path.startswith("grouped"):
        # Per-sample kernels, all gates folded in (the kernel is built anyway for the tap gate). In plain ops that
        # is exactly the release's computation.
        if plain_ops_only():
            return pedconv2d_reference(x, weight, gate_out, gate_in, gate_tap, bias, stride, padding, dilation, groups)
        tensors = in_one_dtype(x.contiguous(), weight, gate_out, gate_in, gate_tap)
        chunk = GROUPED_CHUNK_SAMPLES if path == "grouped:chunks" else 0
        with autocast_off(x.device.type):
            out = grouped_forward(*tensors, list(stride), list(padding), list(dilation), groups, chunk,
                                  path == "grouped:per-sample-input-grad")
    else:
        raise ValueError(f"unknown PEDConv path {path!r}; expected one of {', '.join(PATHS)}")
    return finish(out, bias, channels_last)


def layer_spec(x_shape, device: torch.device, dtype: torch.dtype, channels_last: bool, weight_shape, rank: int,
               stride: IntPair, padding: IntPair, dilation: IntPair, groups: int,
               requires_grad: Tuple[bool, ...]) -> "autotune.LayerSpec":
    """What ``auto`` decides on for one call: its key's fields, the fixed rule's path and the candidates.
    ``requires_grad``: of (x, weight, gate_out, gate_in, gate_tap), all False for an evaluation call."""
    batch, in_channels, height, width = (int(n) for n in x_shape)
    out_channels, _, kh, kw = (int(n) for n in weight_shape)
    out_size = conv_output_size((height, width), (kh, kw), stride, padding, dilation)
    fixed = choose_method(in_channels, out_channels, (kh, kw), groups, out_size,
                          device_type=device.type, channels_last=channels_last)
    training = any(requires_grad)
    return autotune.LayerSpec(
        device=str(device), dtype=str(dtype).removeprefix("torch."), channels_last=channels_last, batch=batch,
        in_channels=in_channels, out_channels=out_channels, kernel=(kh, kw), stride=tuple(stride),
        padding=tuple(padding), dilation=tuple(dilation), groups=groups, rank=int(rank), size=(height, width),
        training=training, fixed=method_path(fixed, device.type, (kh, kw), groups, tuple(padding)),
        candidates=tuple(candidate_paths(device.type, batch, (kh, kw), groups, tuple(padding), training,
                                         in_channels, out_size[0] * out_size[1], dtype)),
        requires_grad=tuple(requires_grad),
    )


def _auto_path(x, weight, gate_out, gate_in, gate_tap, stride, padding, dilation, groups) -> str:
    """``auto``: the path measured fastest for this layer shape (:mod:`pedconv.autotune`), else the fixed rule's."""
    tensors = (x, weight, gate_out, gate_in, gate_tap)
    training = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    shape = x.shape
    if torch.compiler.is_compiling() and not is_exporting():
        # With dynamic shapes (the recompile for a batch of another size) the sizes are symbolic and the choice
        # could not be a constant of the graph (a graph break in every layer): len(range(n)) makes the compiler
        # specialize them instead.
        shape = tuple(len(range(n)) for n in shape)
    layer = layer_spec(shape, x.device, compute_dtype(*tensors), memory_format_of(x) == torch.channels_last,
                       weight.shape, gate_out.shape[1], stride, padding, dilation, groups,
                       tuple(t.requires_grad for t in tensors) if training else (False,) * 5)
    if plain_ops_only():
        return layer.fixed
    if torch.compiler.is_compiling():
        return _compiled_choice(tuple(layer))

    def run(path: str, after_forward) -> None:
        leaves = [t.detach().requires_grad_(need) for t, need in zip(tensors, layer.requires_grad)]
        with torch.enable_grad() if layer.training else torch.no_grad():
            out = run_path(path, *leaves, None, stride, padding, dilation, groups)
            if layer.training:
                after_forward()
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


def _run_on_random_inputs(layer: "autotune.LayerSpec", path: str, after_forward) -> None:
    """One forward (and backward, for a training key, after ``after_forward()``) of ``path`` on random tensors of
    the layer's shapes."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily(), autocast_off(layer.device.split(":")[0]):
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
                after_forward()
                out.backward(torch.ones_like(out))


@torch.library.custom_op("pedconv::standard_normal_like", mutates_args=())
def _standard_normal_like(like: torch.Tensor) -> torch.Tensor:
    return torch.randn_like(like)


@_standard_normal_like.register_fake
def _standard_normal_like_fake(like):
    return torch.empty_like(like)


def standard_normal_like(t: torch.Tensor) -> torch.Tensor:
    """``torch.randn_like(t)``, the gate noise. Under torch.compile an opaque call to it: Inductor would generate
    one C++ kernel per layer for its own random numbers (each with the layer's seed index as a constant), a compile
    of its own for every PEDConv layer of the model; the call draws from the same generator as eager mode."""
    if torch.compiler.is_compiling() and not is_exporting():
        return _standard_normal_like(t.detach())
    return torch.randn_like(t)


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
    if plain_ops_only() or is_exporting():
        return x.mean((2, 3))
    return _GlobalAvgPool.apply(x)
