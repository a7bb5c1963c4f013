"""Record the authors' release's PEDConv computation as small data files, for tests/test_release_reference.py.

The release is github.com/zejiangh/PEDConv at commit b4aa603757c8805f9e4317359a4d911d9f42caa5 ("Update
README.md", the newest commit when this file was written). Only its ``image_classification/resnet.py`` runs, on the
CPU: ``Variational_DYConv2d`` (one PEDConv layer), ``BasicBlock`` and ``Bottleneck`` (residual blocks). The
weights and inputs are float32 numbers; the release computes in float64 and the results are stored rounded to
float32, so that a test's float32 results differ from them by their own rounding only (two float32 computations
of a gate bias's gradient, which sums over the whole batch and map, differ by up to 1.5e-5 of its size).
None of its code is copied into this repository; this script imports it from a checkout given on the command line.

To rerun (writes tests/data/release_reference.pt; the tests read only that file):

    git clone https://github.com/zejiangh/PEDConv /tmp/PEDConv
    git -C /tmp/PEDConv checkout b4aa603757c8805f9e4317359a4d911d9f42caa5
    python tests/reference/make_release_reference.py /tmp/PEDConv

What is recorded, for each case (a 3x3 layer with as many input as output channels, so that swapped gates still
fit; a strided basic block with a 1x1 shortcut; a strided bottleneck block, whose 1x1 convs are PEDConv too):
- ``state_dict``: the module's weights under the release's own names. The gate generators' and decoders' Linears are
  redrawn from N(0, 0.5^2) (weights and biases) and the BatchNorms get random affine parameters and running
  statistics: at the release's initialization every gate is about 0.5, where swapped or misplaced gates would not
  show.
- ``input`` and ``grad_output`` (a fixed random tensor: the backward of ``(output * grad_output).sum()``).
- for each mode: ``output``; ``grads``, the gradients of every parameter (release names) and of the input
  (``"input"``) of ``(output * grad_output).sum() + sum of the layers' info-max losses``; ``info_max``, each
  layer's info-max loss (the release's ``IMLoss``) by module name; ``buffers``, the BatchNorm buffers after the
  forward. Modes:
    ``train``        training mode, noise off (the release's noise draw replaced by zeros, so z = mu exactly);
    ``train_noise``  training mode with the noise given in ``noise`` (per layer name, the release's three draws
                     ``inp``, ``oup``, ``k`` of N(0, 1), which the release scales by its fixed std 0.1); to keep
                     the file small, only the gradients of the input and of the gate generators and decoders
                     (``attn.*``) are kept;
    ``eval``         evaluation mode (no noise, no info-max loss: the decoders get no gradient).

The noise is injected through the release's ``Variational_Attn4d.to_var`` (the function its ``reparameterize``
passes each N(0, 1) draw through), so the release's own reparameterization and std are what runs.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn as nn

RELEASE_COMMIT = "b4aa603757c8805f9e4317359a4d911d9f42caa5"
RELEASE_URL = "https://github.com/zejiangh/PEDConv"
DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "data" / "release_reference.pt"
SEED = 20


def load_release_resnet(checkout: Path):
    """The release's image_classification/resnet.py as a stand-alone module (its package would shadow ours)."""
    path = checkout / "image_classification" / "resnet.py"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found: give the root of a checkout of {RELEASE_URL}")
    spec = importlib.util.spec_from_file_location("release_resnet", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def checkout_commit(checkout: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def spread_weights(module: nn.Module, generator: torch.Generator) -> None:
    """Gates spread over (0, 1) and BatchNorms away from identity, so that every wrong gate or statistic shows."""
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, nn.Linear):
                sub.weight.copy_(torch.randn(sub.weight.shape, generator=generator) * 0.5)
                sub.bias.copy_(torch.randn(sub.bias.shape, generator=generator) * 0.5)
            elif isinstance(sub, nn.BatchNorm2d):
                sub.weight.copy_(0.5 + torch.rand(sub.weight.shape, generator=generator))
                sub.bias.copy_(torch.randn(sub.bias.shape, generator=generator) * 0.2)
                sub.running_mean.copy_(torch.randn(sub.running_mean.shape, generator=generator) * 0.2)
                sub.running_var.copy_(0.5 + torch.rand(sub.running_var.shape, generator=generator))


def attention_modules(module: nn.Module, release) -> dict:
    """{name of the dynamic conv: its Variational_Attn4d}, names as in the state_dict ("" for a bare layer)."""
    return {name.removesuffix(".attn").removesuffix("attn"): sub for name, sub in module.named_modules()
            if isinstance(sub, release.Variational_Attn4d)}


def set_noise(module: nn.Module, release, noise) -> None:
    """Route the release's N(0, 1) draws through ``to_var``: zeros (noise None) or the given draws, in the order
    reparameterize makes them (input, output, tap logits)."""
    for name, attn in attention_modules(module, release).items():
        if noise is None:
            attn.to_var = lambda eps: torch.zeros_like(eps)
        else:
            draws = [noise[name]["inp"], noise[name]["oup"], noise[name]["k"]]
            calls = iter(range(3))

            def to_var(eps, draws=draws, calls=calls):
                draw = draws[next(calls)]
                assert draw.shape == eps.shape, (draw.shape, eps.shape)
                return draw.clone()

            attn.to_var = to_var


def run_mode(module, release, x, grad_output, training: bool, noise=None, keep=lambda name: True) -> dict:
    """One forward and backward in float64; the results are stored in float32 (see ``as_float32``)."""
    set_noise(module, release, noise)
    module.double().train(training)
    module.zero_grad(set_to_none=True)
    grad_output = grad_output.double()
    leaf = x.double().requires_grad_(True)
    output = module(leaf)
    attns = attention_modules(module, release)
    info_max = {name: attn.IMLoss.detach().clone() for name, attn in attns.items() if torch.is_tensor(attn.IMLoss)}
    loss = (output * grad_output).sum()
    for attn in attns.values():
        if torch.is_tensor(attn.IMLoss):
            loss = loss + attn.IMLoss
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in module.named_parameters()
             if p.grad is not None and keep(name)}
    grads["input"] = leaf.grad.detach().clone()
    buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
    module.float()
    return as_float32({"output": output.detach(), "grads": grads, "info_max": info_max, "buffers": buffers})


def as_float32(tree):
    if torch.is_tensor(tree):
        return tree.float() if tree.is_floating_point() else tree.clone()
    return {key: as_float32(value) for key, value in tree.items()}


def record(module, release, x_shape, generator) -> dict:
    spread_weights(module, generator)
    state = {name: t.detach().clone() for name, t in module.state_dict().items()}
    x = torch.randn(x_shape, generator=generator)
    with torch.no_grad():
        out_shape = module.eval()(x).shape
    grad_output = torch.randn(out_shape, generator=generator)
    noise = {}
    for name, attn in attention_modules(module, release).items():
        batch = x_shape[0]
        noise[name] = {"inp": torch.randn(batch, attn.fc_inp.out_features, generator=generator),
                       "oup": torch.randn(batch, attn.fc_oup.out_features, generator=generator),
                       "k": torch.randn(batch, attn.fc_k.out_features, generator=generator)}
    case = {"state_dict": state, "input": x, "grad_output": grad_output, "noise": noise}
    gate_parameters = lambda name: "attn." in name or name.startswith("attn.")  # noqa: E731
    for mode, training, mode_noise, keep in (("train", True, None, lambda name: True),
                                             ("train_noise", True, noise, gate_parameters),
                                             ("eval", False, None, lambda name: True)):
        module.float().load_state_dict(state)  # the BatchNorm running statistics start from the same values each time
        case[mode] = run_mode(module, release, x, grad_output, training, mode_noise, keep)
    return case


def build_cases(release) -> dict:
    """The modules recorded, with their constructor arguments (the tests build this project's twins from these)."""
    shortcut = nn.Sequential(nn.Conv2d(32, 32, 1, 2, bias=False), nn.BatchNorm2d(32))
    wide_shortcut = nn.Sequential(nn.Conv2d(32, 64, 1, 2, bias=False), nn.BatchNorm2d(64))
    return {
        "layer_3x3": ({"kind": "layer", "in_channels": 32, "out_channels": 32, "kernel_size": 3, "stride": 1,
                       "padding": 1}, release.Variational_DYConv2d(32, 32, 3, 1, 1), (3, 32, 6, 6)),
        # the release's BasicBlock(inplanes, planes, cfg=[width], stride, downsample)
        "basic_block": ({"kind": "basic", "in_channels": 32, "width": 32, "out_channels": 32, "stride": 2},
                        release.BasicBlock(32, 32, [32], 2, shortcut), (3, 32, 6, 6)),
        # the release's Bottleneck(inplanes, planes=out channels, cfg=[in, width, width], stride, downsample)
        "bottleneck_block": ({"kind": "bottleneck", "in_channels": 32, "width": 32, "out_channels": 64, "stride": 2},
                             release.Bottleneck(32, 64, [32, 32, 32], 2, wide_shortcut), (2, 32, 4, 4)),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path, help=f"root of a checkout of {RELEASE_URL} at {RELEASE_COMMIT}")
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    release = load_release_resnet(args.checkout)
    commit = checkout_commit(args.checkout)
    if commit not in (RELEASE_COMMIT, "unknown (not a git checkout)"):
        print(f"warning: the checkout is at {commit}, not {RELEASE_COMMIT}", file=sys.stderr)
    torch.manual_seed(SEED)  # the release's own initialization draws (all overwritten or recorded)
    generator = torch.Generator().manual_seed(SEED)
    cases = {}
    for name, (spec, module, x_shape) in build_cases(release).items():
        cases[name] = {"spec": spec, **record(module, release, x_shape, generator)}
    data = {"meta": {"release": RELEASE_URL, "commit": RELEASE_COMMIT, "checkout_commit": commit,
                     "torch": str(torch.__version__), "seed": SEED,
                     "script": "tests/reference/make_release_reference.py"},
            "cases": cases}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.output.with_name(args.output.name + ".tmp")
    torch.save(data, temporary)
    os.replace(temporary, args.output)
    print(f"wrote {args.output} ({args.output.stat().st_size} bytes): {', '.join(cases)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
