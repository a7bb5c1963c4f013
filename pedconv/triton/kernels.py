"""Triton kernels of the fused PEDConv (rank 1, groups 1): forward, input gradient, and weight + gate gradients.

Notation as in :mod:`pedconv.functional`: input x (B, C, H, W) read in NHWC order, base kernel W0 (O, C, KH, KW),
gates a_out (B, O), a_in (B, C), a_k (B, KH*KW), all gates float32. For one sample b

    raw[m, o] = sum_{c, t} X[m, c, t] * a_in[c] * a_k[t] * W0[o, c, t]      (X: the im2col of x_b, never built)
    y[m, o]   = a_out[o] * raw[m, o]

- forward: implicit GEMM, M = output pixels of one sample, N = O, K = C x taps. The gates a_in * a_k scale the A
  operand as it is loaded, a_out scales the accumulator in the epilogue; the epilogue can also write ``raw`` (the
  unscaled output), which the backward needs for the output gate's gradient.
- input gradient: implicit GEMM of the transposed convolution, M = input pixels, N = C, K = O x taps; the incoming
  gradient is scaled by a_out * a_k on load (so dRaw = g * a_out never exists) and the result by a_in. With stride
  s the input pixels are taken in the s*s classes of equal (h mod s, w mod s): within a class a tap either reaches
  every pixel or none, so a tap that cannot reach the class is skipped instead of computed on masked zeros.
- weight and gate gradients: one kernel. A program owns one (O-tile, C-tile, tap) tile of the weight and a run of
  samples; per sample it forms the partial weight gradient P_b = g_b^T X_b of its tile (never stored), then
      dW0       += a_out * a_in * a_k * P_b                         (kept in registers over the samples)
      d a_in[b] += a_k * sum_o a_out * W0 * P_b                     (atomic add over O-tiles and taps)
      d a_k[b]  += sum_{o, c} a_out * a_in * W0 * P_b               (atomic add over O- and C-tiles)
  so no (B, O, C, KH, KW) tensor ever exists. The output gate's gradient, sum_m g * raw, is summed from the
  unscaled output by the programs of the first C-tile and first tap, which read g's tile anyway.
  dW0 is added atomically when several programs share a weight tile (runs of samples); float32 atomic adds make
  the sums' order, and so the last bits of the weight and gate gradients, vary from run to run.

The functions here are plain Python: :func:`build` decorates them with ``triton.jit`` (and Triton's autotuner)
for one mode, compiled or interpreted (``TRITON_INTERPRET=1``, CPU tensors), because Triton fixes the mode when a
function is decorated. Speed on GPUs is unmeasured (no GPU was at hand when this was written).
"""
from __future__ import annotations

import functools
import types

import triton
import triton.language as tl


def sum_combine(a, b):
    """The combiner of the kernels' sums, ``tl.reduce(values, axis, SUM_COMBINE)``; see :func:`build`.

    Not ``tl.sum``: it and every other @jit function of Triton's standard library (``tl.zeros``, ``tl.cdiv``...)
    take the mode, compiled or interpreted, that was set when Triton was imported, and fail in the other mode;
    the kernels call builtins only, and this. Under the interpreter they get Triton's own ``_sum_combine``
    instead, which the interpreter recognizes and sums with numpy (it calls any other combiner per element)."""
    return a + b


# Bound per mode by :func:`build`; a kernel read outside of it finds no combiner.
SUM_COMBINE = None


def forward_kernel(
    x_ptr, w_ptr, gate_out_ptr, gate_in_ptr, gate_tap_ptr, out_ptr, raw_ptr,
    B, C, H, W, O, HO, WO,
    sxb, sxc, sxh, sxw,
    swo, swc, swh, sww,
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr, WRITE_RAW: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < HO * WO
    n_ok = offs_n < O
    ho = offs_m // WO
    wo = offs_m % WO
    x_b = x_ptr + b * sxb
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for r in tl.static_range(KH):
        hi = ho * SH - PH + r * DH
        h_ok = m_ok & (hi >= 0) & (hi < H)
        for q in tl.static_range(KW):
            wi = wo * SW - PW + q * DW
            row_ok = h_ok & (wi >= 0) & (wi < W)
            rows = x_b + hi.to(tl.int64) * sxh + wi.to(tl.int64) * sxw
            tap_gate = tl.load(gate_tap_ptr + b * (KH * KW) + r * KW + q)
            for c0 in range(0, C, BLOCK_K):
                cs = c0 + offs_k
                c_ok = cs < C
                a = tl.load(rows[:, None] + cs[None, :] * sxc, mask=row_ok[:, None] & c_ok[None, :], other=0.0)
                # The input and tap gates, applied where the data already sits in registers.
                scale = tl.load(gate_in_ptr + b * C + cs, mask=c_ok, other=0.0) * tap_gate
                a = (a.to(tl.float32) * scale[None, :]).to(DOT_DTYPE)
                w = tl.load(w_ptr + offs_n[None, :] * swo + cs[:, None] * swc + r * swh + q * sww,
                            mask=c_ok[:, None] & n_ok[None, :], other=0.0).to(DOT_DTYPE)
                acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
    out_offsets = (b * HO * WO + offs_m[:, None]) * O + offs_n[None, :]
    out_ok = m_ok[:, None] & n_ok[None, :]
    if WRITE_RAW:
        tl.store(raw_ptr + out_offsets, acc.to(raw_ptr.dtype.element_ty), mask=out_ok)
    gate_out = tl.load(gate_out_ptr + b * O + offs_n, mask=n_ok, other=0.0)
    tl.store(out_ptr + out_offsets, (acc * gate_out[None, :]).to(out_ptr.dtype.element_ty), mask=out_ok)


def input_grad_kernel(
    g_ptr, w_ptr, gate_out_ptr, gate_in_ptr, gate_tap_ptr, dx_ptr,
    B, C, H, W, O, HO, WO,
    sgb, sgc, sgh, sgw,
    swo, swc, swh, sww,
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_bc = tl.program_id(2)
    b = (pid_bc // (SH * SW)).to(tl.int64)
    residue = pid_bc % (SH * SW)
    rho_h = residue // SW
    rho_w = residue % SW
    # This program's pixels: h = rho_h + SH * i, w = rho_w + SW * j.
    rows_in_class = (H - rho_h + SH - 1) // SH
    cols_in_class = tl.maximum((W - rho_w + SW - 1) // SW, 1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    i = offs_m // cols_in_class
    j = offs_m % cols_in_class
    m_ok = (i < rows_in_class) & (rho_w + SW * j < W)
    n_ok = offs_n < C
    g_b = g_ptr + b * sgb
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for r in tl.static_range(KH):
        # Output row ho reaches input row h through tap r when ho * SH = h + PH - r * DH.
        shift_h = rho_h + PH - r * DH
        for q in tl.static_range(KW):
            shift_w = rho_w + PW - q * DW
            if (shift_h % SH == 0) & (shift_w % SW == 0):
                ho = i + shift_h // SH
                wo = j + shift_w // SW
                row_ok = m_ok & (ho >= 0) & (ho < HO) & (wo >= 0) & (wo < WO)
                rows = g_b + ho.to(tl.int64) * sgh + wo.to(tl.int64) * sgw
                tap_gate = tl.load(gate_tap_ptr + b * (KH * KW) + r * KW + q)
                for o0 in range(0, O, BLOCK_K):
                    outs = o0 + offs_k
                    o_ok = outs < O
                    a = tl.load(rows[:, None] + outs[None, :] * sgc, mask=row_ok[:, None] & o_ok[None, :], other=0.0)
                    # The output and tap gates on load: the gradient of the unscaled output is never stored.
                    scale = tl.load(gate_out_ptr + b * O + outs, mask=o_ok, other=0.0) * tap_gate
                    a = (a.to(tl.float32) * scale[None, :]).to(DOT_DTYPE)
                    w = tl.load(w_ptr + outs[:, None] * swo + offs_n[None, :] * swc + r * swh + q * sww,
                                mask=o_ok[:, None] & n_ok[None, :], other=0.0).to(DOT_DTYPE)
                    acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
    gate_in = tl.load(gate_in_ptr + b * C + offs_n, mask=n_ok, other=0.0)
    hi = rho_h + SH * i
    wi = rho_w + SW * j
    offsets = ((b * H + hi[:, None].to(tl.int64)) * W + wi[:, None]) * C + offs_n[None, :]
    tl.store(dx_ptr + offsets, (acc * gate_in[None, :]).to(dx_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def weight_grad_kernel(
    g_ptr, x_ptr, raw_ptr, w_ptr, gate_out_ptr, gate_in_ptr, gate_tap_ptr,
    dw_ptr, d_out_ptr, d_in_ptr, d_tap_ptr,
    B, C, H, W, O, HO, WO,
    sgb, sgc, sgh, sgw,
    sxb, sxc, sxh, sxw,
    swo, swc, swh, sww,
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr,
    NEED_WEIGHT: tl.constexpr, NEED_OUT: tl.constexpr, NEED_IN: tl.constexpr, NEED_TAP: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, SAMPLES: tl.constexpr,
):
    c_tiles = (C + BLOCK_C - 1) // BLOCK_C
    pid_o = tl.program_id(0) // c_tiles
    pid_c = tl.program_id(0) % c_tiles
    tap = tl.program_id(1)
    r = tap // KW
    q = tap % KW
    first_sample = tl.program_id(2).to(tl.int64) * SAMPLES
    last_sample = tl.minimum(first_sample + SAMPLES, B)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_m = tl.arange(0, BLOCK_M)
    o_ok = offs_o < O
    c_ok = offs_c < C
    tile_ok = o_ok[:, None] & c_ok[None, :]
    w_offsets = offs_o[:, None] * swo + offs_c[None, :] * swc + r * swh + q * sww
    w0 = tl.load(w_ptr + w_offsets, mask=tile_ok, other=0.0).to(tl.float32)
    # The output gate's gradient is summed by one program per (O-tile, sample): the first C-tile's, first tap's.
    sums_out = (pid_c == 0) & (tap == 0)
    dw = tl.full((BLOCK_O, BLOCK_C), 0.0, tl.float32)
    for b in range(first_sample, last_sample):
        g_b = g_ptr + b * sgb
        x_b = x_ptr + b * sxb
        partial = tl.full((BLOCK_O, BLOCK_C), 0.0, tl.float32)  # P_b's tile: g_b^T X_b
        d_out = tl.full((BLOCK_O,), 0.0, tl.float32)
        for m0 in range(0, HO * WO, BLOCK_M):
            ms = m0 + offs_m
            m_ok = ms < HO * WO
            ho = ms // WO
            wo = ms % WO
            g_rows = g_b + ho.to(tl.int64) * sgh + wo.to(tl.int64) * sgw
            g = tl.load(g_rows[:, None] + offs_o[None, :] * sgc, mask=m_ok[:, None] & o_ok[None, :], other=0.0)
            if NEED_OUT:
                if sums_out:
                    raw = tl.load(raw_ptr + (b * HO * WO + ms[:, None]) * O + offs_o[None, :],
                                  mask=m_ok[:, None] & o_ok[None, :], other=0.0)
                    d_out += tl.reduce(g.to(tl.float32) * raw.to(tl.float32), 0, SUM_COMBINE)
            hi = ho * SH - PH + r * DH
            wi = wo * SW - PW + q * DW
            x_ok = m_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            x_rows = x_b + hi.to(tl.int64) * sxh + wi.to(tl.int64) * sxw
            x = tl.load(x_rows[:, None] + offs_c[None, :] * sxc, mask=x_ok[:, None] & c_ok[None, :], other=0.0)
            partial = tl.dot(tl.trans(g.to(DOT_DTYPE)), x.to(DOT_DTYPE), partial, input_precision=INPUT_PRECISION)
        if NEED_OUT:
            if sums_out:
                tl.store(d_out_ptr + b * O + offs_o, d_out, mask=o_ok)
        gate_out = tl.load(gate_out_ptr + b * O + offs_o, mask=o_ok, other=0.0)
        gate_in = tl.load(gate_in_ptr + b * C + offs_c, mask=c_ok, other=0.0)
        gate_tap = tl.load(gate_tap_ptr + b * (KH * KW) + tap)
        if NEED_WEIGHT:
            dw += partial * (gate_out[:, None] * gate_in[None, :]) * gate_tap
        if NEED_IN | NEED_TAP:
            # d/dA_b contracted with W0: the modulation's gradient, restricted to this tile.
            by_out = partial * w0 * gate_out[:, None]
            if NEED_IN:
                tl.atomic_add(d_in_ptr + b * C + offs_c, tl.reduce(by_out, 0, SUM_COMBINE) * gate_tap, mask=c_ok)
            if NEED_TAP:
                by_tile = tl.reduce(tl.reduce(by_out * gate_in[None, :], 1, SUM_COMBINE), 0, SUM_COMBINE)
                tl.atomic_add(d_tap_ptr + b * (KH * KW) + tap, by_tile)
    if NEED_WEIGHT:
        tl.atomic_add(dw_ptr + w_offsets, dw, mask=tile_ok)


# Tile sizes the autotuner tries on a GPU (keyed by the layer shape). Not measured yet: a spread of the usual
# implicit-GEMM tiles; the pruning below drops tiles far larger than the layer's channels.
_CONV_TILES = [
    # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
    (128, 128, 32, 8, 3),
    (128, 64, 32, 4, 4),
    (64, 128, 32, 4, 4),
    (64, 64, 32, 4, 4),
    (128, 64, 64, 8, 3),
    (64, 64, 64, 4, 3),
    (32, 64, 32, 4, 4),
]
_WEIGHT_TILES = [
    # (BLOCK_O, BLOCK_C, BLOCK_M, SAMPLES, warps, stages)
    (64, 64, 64, 1, 4, 3),
    (64, 64, 64, 4, 4, 3),
    (128, 64, 64, 2, 8, 3),
    (64, 128, 64, 2, 8, 3),
    (128, 128, 32, 4, 8, 3),
    (32, 64, 128, 1, 4, 3),
]
# Under the interpreter: one small configuration, so that the tests' tiny layers span several tiles and masks.
_INTERPRETER_CONV = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16}
_INTERPRETER_WEIGHT = {"BLOCK_O": 16, "BLOCK_C": 16, "BLOCK_M": 32, "SAMPLES": 2}

# Autotuning keys: the layer's shape (the argument dtypes are part of Triton's key anyway).
CONV_KEY = ["C", "H", "W", "O", "SH", "SW", "DH", "DW", "KH", "KW"]
WEIGHT_KEY = CONV_KEY + ["B"]


def _prune_by_width(width_of):
    """An ``early_config_prune`` that drops configurations whose channel tile exceeds the layer's channels rounded
    up to a power of two (at least 32): such tiles compute mostly on masked zeros. Keeps at least one."""

    def prune(configs, named_args, **kwargs):
        shape = {**named_args, **kwargs}  # the autotuner passes positional arguments apart from keywords
        kept = [c for c in configs if all(c.kwargs[name] <= max(32, triton.next_power_of_2(shape[arg]))
                                          for name, arg in width_of.items())]
        return kept or configs[-1:]

    return prune


def _with_globals(function, **names):
    """A copy of ``function`` that sees ``names`` among its module's globals (a snapshot of them)."""
    namespace = dict(function.__globals__, **names)
    copy = types.FunctionType(function.__code__, namespace, function.__name__, function.__defaults__,
                              function.__closure__)
    copy.__qualname__, copy.__module__, copy.__doc__ = function.__qualname__, function.__module__, function.__doc__
    return copy


@functools.cache
def build(interpret: bool) -> types.SimpleNamespace:
    """The three kernels decorated for one mode: interpreted with fixed tiles, or compiled with the autotuner.

    Cached per mode: Triton decides between compiling and interpreting when it decorates a function, from
    ``triton.knobs.runtime.interpret`` (the ``TRITON_INTERPRET`` variable), which is set here for the decoration;
    the kernels are copies that see this mode's ``SUM_COMBINE``. So the compiled kernels (CUDA tensors) and the
    interpreted ones (CPU tensors, in tests) work in one process, whatever the mode Triton was imported in.
    """
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = interpret
        combiner = tl.standard._sum_combine if interpret else triton.jit(sum_combine)
        forward, input_grad, weight_grad = (
            triton.jit(_with_globals(kernel, SUM_COMBINE=combiner))
            for kernel in (forward_kernel, input_grad_kernel, weight_grad_kernel)
        )
    if interpret:
        return types.SimpleNamespace(
            forward=forward, input_grad=input_grad, weight_grad=weight_grad,
            conv_config=_INTERPRETER_CONV, weight_config=_INTERPRETER_WEIGHT)
    conv_configs = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=warps, num_stages=stages)
        for m, n, k, warps, stages in _CONV_TILES
    ]
    weight_configs = [
        triton.Config({"BLOCK_O": o, "BLOCK_C": c, "BLOCK_M": m, "SAMPLES": s}, num_warps=warps, num_stages=stages)
        for o, c, m, s, warps, stages in _WEIGHT_TILES
    ]
    return types.SimpleNamespace(
        forward=triton.autotune(
            conv_configs, key=CONV_KEY,
            prune_configs_by={"early_config_prune": _prune_by_width({"BLOCK_N": "O", "BLOCK_K": "C"})},
        )(forward),
        input_grad=triton.autotune(
            conv_configs, key=CONV_KEY,
            prune_configs_by={"early_config_prune": _prune_by_width({"BLOCK_N": "C", "BLOCK_K": "O"})},
        )(input_grad),
        # The atomically summed outputs start from zero again before each configuration's timing runs.
        weight_grad=triton.autotune(
            weight_configs, key=WEIGHT_KEY, reset_to_zero=["dw_ptr", "d_in_ptr", "d_tap_ptr"],
            prune_configs_by={"early_config_prune": _prune_by_width({"BLOCK_O": "O", "BLOCK_C": "C"})},
        )(weight_grad),
        conv_config={}, weight_config={},
    )
