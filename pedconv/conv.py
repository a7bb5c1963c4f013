"""`PEDConv2d`: a parameter-efficient dynamic convolution, drop-in for `torch.nn.Conv2d`."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import autotune
from .functional import (check_method, check_triton_groups, global_avg_pool, layer_spec, method_path, pedconv2d,
                         standard_normal_like)
from .paths.common import memory_format_of, pair

IntOrPair = Union[int, Tuple[int, int]]


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
        self.decoder = nn.Sequential(nn.Linear(sum(self.split), hidden), nn.ReLU(inplace=True), nn.Linear(hidden, in_channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The release draws every Linear from N(0, 0.01^2) with zero bias: gates start near 0.5.
        for linear in self.modules():
            if isinstance(linear, nn.Linear):
                nn.init.normal_(linear.weight, 0.0, 0.01)
                nn.init.zeros_(linear.bias)

    def forward(self, pooled: torch.Tensor, noise_std: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return the gate logits (B, Cin/G*R + Cout*R + taps*R), noise added when noise_std > 0."""
        hidden = F.relu(self.fc_share(pooled))
        logits = torch.cat([self.fc_inp(hidden), self.fc_oup(hidden), self.fc_k(hidden)], dim=1)
        if noise_std > 0:
            logits = logits + noise_std * standard_normal_like(logits)
        return logits

    def gates(self, logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate_out, gate_in, gate_tap), each (B, R, C), from the logits."""
        batch = logits.shape[0]
        logit_in, logit_out, logit_tap = torch.split(torch.sigmoid(logits), self.split, dim=1)
        return (
            logit_out.reshape(batch, self.rank, -1),
            logit_in.reshape(batch, self.rank, -1),
            logit_tap.reshape(batch, self.rank, -1),
        )

    def info_max_loss(self, pooled: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Mean squared error of the pooled input reconstructed from the (noisy) logits; pooled is not trained."""
        reconstructed = self.decoder(logits)
        return F.mse_loss(reconstructed.float(), pooled.detach().float())


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
        pooled = x.mean((2, 3)) if self.method == "reference" else global_avg_pool(x)
        logits = self.attn(pooled, self.noise_std if self.training else 0.0)
        if self.training and self.info_max:
            self._info_max_loss = self.attn.info_max_loss(pooled, logits)
        else:
            self._info_max_loss = None
        gate_out, gate_in, gate_tap = self.attn.gates(logits)
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
