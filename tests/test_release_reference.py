"""This project's PEDConv layer and residual blocks against the authors' release, run once on the CPU.

tests/data/release_reference.pt holds the release's outputs, gradients, info-max losses and BatchNorm buffers for
fixed inputs and weights (keyed by the release's names), in training mode without noise, in training mode with
given noise draws, and in eval mode; tests/reference/make_release_reference.py made it (commit and how to rerun it
in its docstring). Here the same weights load by name into PEDConv2d / BasicBlock / Bottleneck, every forward path
runs, and everything must agree to 1e-5 of the largest value (fp32).
"""
import functools
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from image_classification.models import BasicBlock, Bottleneck
from pedconv import PEDConv2d, info_max_loss

DATA = Path(__file__).resolve().parent / "data" / "release_reference.pt"
REFERENCE = torch.load(DATA, weights_only=True)
CASES = REFERENCE["cases"]
METHODS = ["auto", "grouped", "unfold", "taps", "reference"]
MODES = ["train", "train_noise", "eval"]
RELATIVE = 1e-5


def build(spec: dict, method: str, noise_std=None) -> nn.Module:
    """This project's twin of a recorded release module. noise_std None keeps PEDConv2d's default."""
    options = {"method": method} if noise_std is None else {"method": method, "noise_std": noise_std}
    conv = functools.partial(PEDConv2d, **options)
    if spec["kind"] == "layer":
        return conv(spec["in_channels"], spec["out_channels"], spec["kernel_size"], spec["stride"], spec["padding"])
    block = {"basic": BasicBlock, "bottleneck": Bottleneck}[spec["kind"]]
    return block(spec["in_channels"], spec["width"], spec["out_channels"], spec["stride"], conv)


def dynamic_layers(module: nn.Module) -> dict:
    """{name as in the reference's noise and info-max entries: layer}, in forward order ("" for a bare layer)."""
    return {name: layer for name, layer in module.named_modules() if isinstance(layer, PEDConv2d)}


def inject_noise(monkeypatch, case: dict) -> list:
    """Make the gate logits' N(0, 1) draws the recorded ones (input, output, tap logits of each layer, in order).

    PEDConv2d draws one randn_like of the concatenated logits per layer; the list returned records the calls, so a
    test can tell that the noise was drawn at all."""
    draws = [torch.cat([noise["inp"], noise["oup"], noise["k"]], dim=1) for noise in case["noise"].values()]
    calls = []

    def recorded_randn_like(tensor, *args, **kwargs):
        assert len(calls) < len(draws), "more noise draws than PEDConv layers"
        draw = draws[len(calls)]
        assert tensor.shape == draw.shape, f"noise of shape {tuple(tensor.shape)}, expected {tuple(draw.shape)}"
        calls.append(tuple(tensor.shape))
        return draw.to(dtype=tensor.dtype, device=tensor.device).clone()

    monkeypatch.setattr(torch, "randn_like", recorded_randn_like)
    return calls


def run(module: nn.Module, case: dict, training: bool):
    """Output, gradients (by name, and "input") and info-max losses (by layer) of (output * grad_output).sum() +
    info-max loss, as the reference script computes them."""
    module.train(training)
    x = case["input"].clone().requires_grad_(True)
    out = module(x)
    losses = {name: info_max_loss(layer) for name, layer in dynamic_layers(module).items()}
    total = (out * case["grad_output"]).sum() + info_max_loss(module)
    total.backward()
    grads = {name: p.grad for name, p in module.named_parameters()}
    grads["input"] = x.grad
    return out.detach(), grads, {name: loss.detach() for name, loss in losses.items()}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, scale=None) -> None:
    """Largest error within RELATIVE of the largest expected value (or of ``scale``)."""
    assert actual is not None, f"{what}: missing"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    scale = expected.abs().max().item() if scale is None else scale
    error = (actual.float() - expected).abs().max().item()
    assert error <= RELATIVE * max(scale, 1e-6), f"{what}: max error {error:.3g} (scale {scale:.3g})"


def gradient_scales(grads: dict) -> dict:
    """The scale each gradient is compared at: its own largest value, except for a gate generator's parameters,
    which share the largest of their generator's. In training mode BatchNorm makes a block's output invariant to
    scaling a conv's output over the whole batch, so the gradient of a single gate logit's bias is a sum over the
    batch whose terms nearly cancel (float32 leaves up to 1.3e-5 of it, measured); it is compared at the size
    of its generator's gradients instead."""
    scales = {key: grad.abs().max().item() for key, grad in grads.items()}
    for key in grads:
        if ".attn." in f".{key}":
            generator = key[: key.index("attn.") + len("attn.")]
            scales[key] = max(scale for other, scale in scales.items() if other.startswith(generator))
    return scales


def load_twin(case: dict, method: str, mode: str) -> nn.Module:
    module = build(case["spec"], method, noise_std=0.0 if mode == "train" else None)
    module.load_state_dict(case["state_dict"], strict=True)  # the release's names, all of them
    return module


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(CASES))
def test_outputs_gradients_and_info_max_equal_the_releases(name, method, mode, monkeypatch):
    case = CASES[name]
    expected = case[mode]
    module = load_twin(case, method, mode)
    calls = inject_noise(monkeypatch, case) if mode == "train_noise" else []
    out, grads, losses = run(module, case, training=mode != "eval")
    if mode == "train_noise":
        assert len(calls) == len(case["noise"]), "the gate logits got no noise in training mode"
    assert_close(out, expected["output"], f"{name} {mode} output")
    scales = gradient_scales(expected["grads"])
    for key, grad in expected["grads"].items():
        assert_close(grads[key], grad, f"{name} {mode} gradient of {key}", scales[key])
    for key, grad in grads.items():
        if key not in expected["grads"] and mode != "train_noise":  # train_noise keeps only the gates' gradients
            assert grad is None or not grad.any(), f"{name} {mode}: {key} has a gradient, the release's has none"
    if mode == "eval":
        assert not expected["info_max"] and info_max_loss(module).item() == 0.0
    else:
        assert set(losses) == set(expected["info_max"])
        for layer, loss in expected["info_max"].items():
            assert_close(losses[layer], loss, f"{name} {mode} info-max loss of {layer or 'the layer'}")
    state = module.state_dict()
    for key, buffer in expected["buffers"].items():
        if buffer.dtype.is_floating_point:
            assert_close(state[key], buffer, f"{name} {mode} buffer {key}")
        else:
            assert torch.equal(state[key], buffer), f"{name} {mode} buffer {key}"


def test_the_reference_documents_its_source():
    meta = REFERENCE["meta"]
    assert meta["release"] == "https://github.com/zejiangh/PEDConv"
    assert meta["commit"] == meta["checkout_commit"] == "b4aa603757c8805f9e4317359a4d911d9f42caa5"
    assert (Path(__file__).resolve().parents[1] / meta["script"]).is_file()


def _relative_change(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def test_the_comparison_sees_swapped_gates():
    """The recorded weights spread the gates, so loading the release's input-gate head as the output gate (and the
    reverse) changes the layer's output far beyond the tolerance: the reference tests can catch a swap."""
    case = CASES["layer_3x3"]
    state = dict(case["state_dict"])
    for kind in ("weight", "bias"):
        state[f"attn.fc_inp.{kind}"], state[f"attn.fc_oup.{kind}"] = (state[f"attn.fc_oup.{kind}"],
                                                                      state[f"attn.fc_inp.{kind}"])
    module = build(case["spec"], "auto")
    module.load_state_dict(state)
    out, _, _ = run(module, case, training=False)
    assert _relative_change(out, case["eval"]["output"]) > 1000 * RELATIVE


@pytest.mark.parametrize("scale", [0.0, 2.0])
def test_the_comparison_sees_altered_noise(scale, monkeypatch):
    """Noise of another size (none, or twice the release's 0.1) moves the output far beyond the tolerance."""
    case = CASES["layer_3x3"]
    module = load_twin(case, "auto", "train_noise")
    module.noise_std = 0.1 * scale
    inject_noise(monkeypatch, case)
    out, _, losses = run(module, case, training=True)
    assert _relative_change(out, case["train_noise"]["output"]) > 100 * RELATIVE
    assert _relative_change(losses[""], case["train_noise"]["info_max"][""]) > 100 * RELATIVE
