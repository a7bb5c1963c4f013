"""`PEDConv2d`: a parameter-efficient dynamic convolution, drop-in for `torch.nn.Conv2d`."""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import autotune
from .functional import (check_method, check_triton_groups, global_avg_pool, layer_spec, method_path, pedconv2d,
                         standard_normal_like)
from .paths.common import autocast_off, in_one_dtype, is_exporting, memory_format_of, pair, plain_ops_only

IntOrPair = Union[int, Tuple[int, int]]


def gate_logits(pooled: Tensor, params: List[Tensor], noise: Optional[Tensor] = None,
                noise_std: float = 0.0) -> Tensor:
    """The gate generator's logits (B, R*(Cin/G + Cout + taps)) from the pooled input (B, Cin), plus
    ``noise_std * noise`` when ``noise`` is given. ``params``: :meth:`GateGenerator.generator_parameters`."""
    return _hidden_and_logits(pooled, params, noise, noise_std)[1]


def _hidden_and_logits(pooled, params, noise, noise_std) -> Tuple[Tensor, Tensor]:
    """:func:`gate_logits` and the hidden features they come from."""
    share_weight, share_bias, in_weight, in_bias, out_weight, out_bias, tap_weight, tap_bias = params[:8]
    hidden = F.relu(F.linear(pooled, share_weight, share_bias))
    logits = torch.cat([F.linear(hidden, in_weight, in_bias), F.linear(hidden, out_weight, out_bias),
                        F.linear(hidden, tap_weight, tap_bias)], dim=1)
    if noise is not None:
        logits = logits + noise_std * noise
    return hidden, logits


def info_max_error(pooled: Tensor, logits: Tensor, params: List[Tensor]) -> Tensor:
    """Mean squared error of the pooled input reconstructed from the (noisy) logits by the decoder; the pooled input
    is the target, not trained through this loss."""
    reconstructed = _decoded(logits, params)[1]
    return F.mse_loss(reconstructed.float(), pooled.detach().float())


def _decoded(logits, params) -> Tuple[Tensor, Tensor]:
    """The decoder's hidden features and its reconstruction of the pooled input, from the logits."""
    hidden_weight, hidden_bias, out_weight, out_bias = params[8:]
    hidden = F.relu(F.linear(logits, hidden_weight, hidden_bias))
    return hidden, F.linear(hidden, out_weight, out_bias)


class GateGenerator(nn.Module):
    """Per-sample gates of one PEDConv layer, from its globally pooled input (the release's ``attn``).

    pooled (B, Cin) -> u = ReLU(fc_share(pooled)) -> logits of the input, output and tap gates (+ training noise)
    -> sigmoid. The decoder reconstructs the pooled input from the noisy logits: its error is the layer's info-max
    loss (a variational lower bound on the mutual information between input and gates).
    """

    def __init__(
        self, in_channels: int, out_channels: int, taps: int, groups: int = 1, reduction: int = 16, rank: int = 1
    ) -> None:
        super().__init__()
        hidden = max(in_channels // reduction, 1)
        in_per_group = in_channels // groups
        self.rank = rank
        self.split = (rank * in_per_group, rank * out_channels, rank * taps)
        self.fc_share = nn.Linear(in_channels, hidden)
        self.fc_inp = nn.Linear(hidden, rank * in_per_group)
        self.fc_oup = nn.Linear(hidden, rank * out_channels)
        self.fc_k = nn.Linear(hidden, rank * taps)
        self.decoder = nn.Sequential(nn.Linear(sum(self.split), hidden), nn.ReLU(inplace=True),
                                     nn.Linear(hidden, in_channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The release draws every Linear from N(0, 0.01^2) with zero bias: gates start near 0.5.
        for linear in self.modules():
            if isinstance(linear, nn.Linear):
                nn.init.normal_(linear.weight, 0.0, 0.01)
                nn.init.zeros_(linear.bias)

    def generator_parameters(self) -> List[Tensor]:
        """Weight and bias of fc_share, fc_inp, fc_oup, fc_k, decoder.0 and decoder.2, in this order."""
        linears = (self.fc_share, self.fc_inp, self.fc_oup, self.fc_k, self.decoder[0], self.decoder[2])
        return [tensor for linear in linears for tensor in (linear.weight, linear.bias)]

    def forward(self, pooled: Tensor, noise_std: float = 0.0) -> Tensor:
        """Return the gate logits (B, Cin/G*R + Cout*R + taps*R), noise added when noise_std > 0."""
        logits = gate_logits(pooled, self.generator_parameters())
        if noise_std > 0:
            logits = logits + noise_std * standard_normal_like(logits)
        return logits

    def gates(self, logits: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """(gate_out, gate_in, gate_tap), each (B, R, C), from the logits."""
        return self.gates_of(torch.sigmoid(logits))

    def gates_of(self, sigmoids: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """(gate_out, gate_in, gate_tap), each (B, R, C), as views of the logits' sigmoids."""
        batch = sigmoids.shape[0]
        logit_in, logit_out, logit_tap = torch.split(sigmoids, self.split, dim=1)
        return (
            logit_out.reshape(batch, self.rank, -1),
            logit_in.reshape(batch, self.rank, -1),
            logit_tap.reshape(batch, self.rank, -1),
        )

    def info_max_loss(self, pooled: Tensor, logits: Tensor) -> Tensor:
        """Mean squared error of the pooled input reconstructed from the (noisy) logits; pooled is not trained."""
        return info_max_error(pooled, logits, self.generator_parameters())

    def gates_and_loss(self, x: Tensor, noise_std: float, info_max: bool, plain_pool: bool = False
                       ) -> Tuple[Tuple[Tensor, Tensor, Tensor], Optional[Tensor]]:
        """The gates (:meth:`gates`) of the logits (:meth:`forward`) of x's global average, and, when ``info_max``,
        the info-max loss (:meth:`info_max_loss`; else None). ``plain_pool``: plain autograd ops throughout.

        Under torch.compile the pooling, the generator and the loss are one opaque call (``pedconv::gate_generator``,
        its backward another): Inductor would otherwise generate and compile C++ kernels for these small products
        in every layer shape, which made a PEDConv model's first compiled step several times the static model's,
        for no speed-up.
        """
        if plain_pool or not torch.compiler.is_compiling() or is_exporting() or plain_ops_only():
            pooled = x.mean((2, 3)) if plain_pool else global_avg_pool(x)
            logits = self(pooled, noise_std)
            return self.gates(logits), (self.info_max_loss(pooled, logits) if info_max else None)
        params = in_one_dtype(*self.generator_parameters())  # autocast's dtype, as the Linear layers would use
        noise = None
        if noise_std > 0:  # eager mode's draw: same generator, shape and dtype
            noise = standard_normal_like(x.new_empty((x.shape[0], sum(self.split)), dtype=params[0].dtype))
        gates, loss, _ = _gate_generator(x, noise, params, float(noise_std), info_max)
        return self.gates_of(gates), (loss if info_max else None)


@torch.library.custom_op("pedconv::gate_generator", mutates_args=())
def _gate_generator(x: Tensor, noise: Optional[Tensor], params: List[Tensor], noise_std: float,
                    info_max: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """The sigmoids of :func:`gate_logits` of x's global average, the info-max loss of :func:`info_max_error` (0
    unless ``info_max``) and the average itself (for the backward)."""
    pooled = x.mean((2, 3))
    with autocast_off(x.device.type):
        logits = gate_logits(pooled.to(params[0].dtype), params, noise, noise_std)
        loss = info_max_error(pooled, logits, params) if info_max else x.new_zeros((), dtype=torch.float32)
    return torch.sigmoid(logits), loss, pooled


@_gate_generator.register_fake
def _gate_generator_fake(x, noise, params, noise_std, info_max):
    logits_width = params[2].shape[0] + params[4].shape[0] + params[6].shape[0]
    return (x.new_empty((x.shape[0], logits_width), dtype=params[0].dtype), x.new_empty((), dtype=torch.float32),
            x.new_empty(x.shape[:2]))


@torch.library.custom_op("pedconv::gate_generator_backward", mutates_args=())
def _gate_generator_backward(grad_gates: Tensor, grad_loss: Tensor, pooled: Tensor, noise: Optional[Tensor],
                             params: List[Tensor], noise_std: float, info_max: bool) -> List[Tensor]:
    """Gradients of :func:`_gate_generator` for the average and each parameter, written out (autograd does not
    record inside a custom op); the few small products of the forward run again instead of being kept."""
    share_weight, share_bias = params[:2]
    head_weights = params[2:8:2]
    with autocast_off(pooled.device.type):
        pooled_in = pooled.to(share_weight.dtype)
        hidden, logits = _hidden_and_logits(pooled_in, params, noise, noise_std)
        sigmoids = torch.sigmoid(logits)
        grad_logits = grad_gates * sigmoids * (1 - sigmoids)
        grads: List[Optional[Tensor]] = [None] * 12
        if info_max:
            # The decoder: loss = mean((D2 relu(D0 logits + d0) + d2 - pooled)^2), pooled a constant.
            dec_weight, rec_weight = params[8], params[10]
            dec_hidden, reconstructed = _decoded(logits, params)
            grad_rec = (grad_loss * 2 / reconstructed.numel()) * (reconstructed.float() - pooled.float())
            grad_rec = grad_rec.to(reconstructed.dtype)
            grads[10], grads[11] = grad_rec.t() @ dec_hidden, grad_rec.sum(0)
            grad_dec = (grad_rec @ rec_weight) * (dec_hidden > 0)
            grads[8], grads[9] = grad_dec.t() @ logits, grad_dec.sum(0)
            grad_logits = grad_logits + grad_dec @ dec_weight
        grad_hidden = torch.zeros_like(hidden)
        for index, (grad_head, weight) in enumerate(zip(grad_logits.split([w.shape[0] for w in head_weights], 1),
                                                        head_weights)):
            grads[2 + 2 * index], grads[3 + 2 * index] = grad_head.t() @ hidden, grad_head.sum(0)
            grad_hidden += grad_head @ weight
        grad_hidden *= hidden > 0
        grads[0], grads[1] = grad_hidden.t() @ pooled_in, grad_hidden.sum(0)
        grad_pooled = (grad_hidden @ share_weight).to(pooled.dtype)
    return [grad_pooled] + [grad if grad is not None else torch.zeros_like(param) for grad, param in zip(grads, params)]


@_gate_generator_backward.register_fake
def _gate_generator_backward_fake(grad_gates, grad_loss, pooled, noise, params, noise_std, info_max):
    return [torch.empty_like(t) for t in [pooled] + list(params)]


def _gate_generator_setup_context(ctx, inputs, output):
    x, noise, params, noise_std, info_max = inputs
    ctx.has_noise = noise is not None
    ctx.save_for_backward(output[2], *([noise] if noise is not None else []), *params)
    ctx.settings = (noise_std, info_max)
    ctx.shapes = (x.shape, output[0].shape)


def _gate_generator_autograd(ctx, grad_gates, grad_loss, _grad_pooled):
    pooled, *rest = ctx.saved_tensors
    noise = rest.pop(0) if ctx.has_noise else None
    x_shape, gates_shape = ctx.shapes
    if grad_gates is None:
        grad_gates = rest[0].new_zeros(gates_shape)
    if grad_loss is None:
        grad_loss = pooled.new_zeros((), dtype=torch.float32)
    grads = _gate_generator_backward(grad_gates, grad_loss, pooled, noise, rest, *ctx.settings)
    # The average's gradient as a broadcast view, as global_avg_pool's: one in-place add into the input gradient.
    grad_x = (grads[0] / (x_shape[2] * x_shape[3]))[:, :, None, None].expand(x_shape)
    return grad_x, None, list(grads[1:]), None, None


_gate_generator.register_autograd(_gate_generator_autograd, setup_context=_gate_generator_setup_context)


class PEDConv2d(nn.Module):
    """Parameter-efficient dynamic 2-D convolution (Hou & Kung, BMVC 2021), a drop-in for ``nn.Conv2d``.

    Each sample b is convolved with ``weight * A_b``, where A_b is a rank-``rank`` CP product of three sigmoid gates
    computed from the globally pooled input: one per output filter, one per input channel, one per spatial tap.
    Parameter names and shapes are the authors' release's, so its checkpoints load with ``load_state_dict``.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as ``nn.Conv2d``
            (``padding`` may be ``"valid"``, or ``"same"`` for odd kernels at stride 1; only zero padding).
        reduction: the gate generator's hidden width is ``max(in_channels // reduction, 1)``.
        rank: CP rank of the modulation; 1 is the release's (and the default), > 1 the paper's general form.
        noise_std: std of the Gaussian noise added to the gate logits in training mode; a plain attribute,
            set it to 0 to turn the noise off.
        info_max: compute the info-max loss in training mode (read it with :func:`pedconv.info_max_loss`).
        method: forward path, ``auto`` (default: the fastest exact path for the layer's shape, measured where it
            runs, see :mod:`pedconv.autotune`), ``grouped``, ``unfold``, ``taps``, ``reference`` (the release's
            per-sample kernels), ``triton`` (fused Triton kernels on CUDA, groups=1 only; ``auto`` measures it on
            CUDA only) or one of ``pedconv.PATHS``; see :mod:`pedconv.functional`.

    Initialization is the release's: ``weight`` Kaiming normal (fan_out, ReLU), every Linear N(0, 0.01^2) with
    zero bias, ``bias`` (when asked) zero.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        stride: IntOrPair = 1,
        padding: Union[IntOrPair, str] = 0,
        dilation: IntOrPair = 1,
        groups: int = 1,
        bias: bool = False,
        *,
        reduction: int = 16,
        rank: int = 1,
        noise_std: float = 0.1,
        info_max: bool = True,
        method: str = "auto",
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must divide by groups ({groups})")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        check_method(method)
        if method == "triton":
            check_triton_groups(groups)
        if padding_mode != "zeros":
            raise ValueError(f"PEDConv2d supports padding_mode='zeros' only, got {padding_mode!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = pair(kernel_size)
        self.stride = pair(stride)
        self.dilation = pair(dilation)
        self.padding = self._resolve_padding(padding)
        self.groups = groups
        self.reduction = reduction
        self.rank = rank
        self.noise_std = noise_std
        self.info_max = info_max
        self.method = method
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        taps = self.kernel_size[0] * self.kernel_size[1]
        self.attn = GateGenerator(in_channels, out_channels, taps, groups, reduction, rank).to(**factory)
        self._info_max_loss: Optional[torch.Tensor] = None
        self.reset_parameters()

    def _resolve_padding(self, padding) -> Tuple[int, int]:
        if padding == "valid":
            return (0, 0)
        if padding == "same":
            if self.stride != (1, 1):
                raise ValueError("padding='same' needs stride 1")
            spans = [self.dilation[d] * (self.kernel_size[d] - 1) for d in range(2)]
            if any(span % 2 for span in spans):
                raise ValueError("padding='same' needs an odd effective kernel size in PEDConv2d")
            return (spans[0] // 2, spans[1] // 2)
        if isinstance(padding, str):
            raise ValueError(f"padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
        return pair(padding)

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self.attn.reset_parameters()

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, **kwargs) -> "PEDConv2d":
        """A PEDConv2d with the shape of ``conv`` whose base kernel (and bias) are copies of ``conv``'s."""
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            padding_mode=conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
            **kwargs,
        )
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"PEDConv2d expected input of shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        # The reference path stays in plain autograd ops end to end (the tests' yardstick).
        (gate_out, gate_in, gate_tap), self._info_max_loss = self.attn.gates_and_loss(
            x, self.noise_std if self.training else 0.0, self.training and self.info_max, self.method == "reference")
        return pedconv2d(
            x, self.weight, gate_out, gate_in, gate_tap, self.bias,
            self.stride, self.padding, self.dilation, self.groups, self.method,
        )

    def path_for(self, x: torch.Tensor, training: Optional[bool] = None) -> str:
        """The path this layer runs for an input like ``x`` (a tensor or a meta tensor of its shape) in training
        (default: ``self.training``) or evaluation: for ``auto`` the one chosen so far for its key, else the fixed
        rule's (the first call with a new key may still measure)."""
        if self.method == "reference":
            return "reference"
        training = self.training if training is None else training
        if self.method != "auto":
            return method_path(self.method, x.device.type, self.kernel_size, self.groups, self.padding)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        layer = layer_spec(x.shape, x.device, dtype, memory_format_of(x) == torch.channels_last, self.weight.shape,
                           self.rank, self.stride, self.padding, self.dilation, self.groups, (training,) * 5)
        decision = autotune.lookup(layer)
        if decision is None or not autotune.is_autotune_enabled() or torch.are_deterministic_algorithms_enabled():
            return layer.fixed
        return decision.path

    def extra_repr(self) -> str:
        text = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            text += f", padding={self.padding}"
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        if self.bias is None:
            text += ", bias=False"
        return text + f", reduction={self.reduction}, rank={self.rank}, noise_std={self.noise_std}, method={self.method}"

    def __getstate__(self):
        # The last info-max loss is part of an autograd graph: neither picklable nor worth copying.
        state = self.__dict__.copy()
        state["_info_max_loss"] = None
        return state
