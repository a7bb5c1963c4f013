"""The ways to compute PEDConv, one module each (all exact against :mod:`.reference`); :mod:`pedconv.functional`
chooses among them.

- :mod:`.reference`: the release's computation (per-sample kernels, batch-folded grouped convolution).
- :mod:`.grouped`: the same with a hand-written backward, whole batch or chunks (``grouped``, ``grouped:chunks``).
- :mod:`.unfold`: shared weight on gated im2col columns (``unfold:conv``, ``unfold:matmul``, ``unfold:plain``).
- :mod:`.pointwise`: 1x1 layers (``pointwise:shared``, ``pointwise:per-sample``).
- :mod:`.taps`: per-tap shifted 1x1 convolutions (``taps``).
- :mod:`.common`: what they share.

The fused Triton kernels live in :mod:`pedconv.triton` (imported on first use).
"""
