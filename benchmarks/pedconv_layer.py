"""Per-layer cost of PEDConv against a static convolution, for every dynamic conv shape of ResNet-18/50.

For each distinct shape that the release makes dynamic (224x224 input), times forward + backward of ``nn.Conv2d``,
of ``PEDConv2d`` on its fast path (``auto``: measured on its first call, in the warm-up) and on the ``reference``
path (the release's per-sample kernels), in ``--iters`` turns after a warm-up (each turn times every variant once),
and measures the peak memory of one forward + backward. Each row names the path ``auto`` chose for the shape.
A shape's ratio is the median of its per-turn ratios; the totals weight each shape by how often it
occurs in the network (RATIO lines: static medians times the shapes' ratios). All within one run, on one machine:

    python benchmarks/pedconv_layer.py --batch-size 16                    # ResNet-18 and ResNet-50 shapes
    python benchmarks/pedconv_layer.py --arch resnet50 --methods grouped unfold:conv unfold:matmul  # forced paths
    PEDCONV_AUTOTUNE=0 python benchmarks/pedconv_layer.py     # auto = the fixed rule (no measuring)
    python benchmarks/pedconv_layer.py --device cuda --amp --channels-last -b 64 --methods triton grouped

The last measures the fused Triton kernels (``triton``) against cuDNN's static convolution and
the per-sample-kernel paths (``grouped``, and ``reference``, the release's), under AMP float16 (RATIO lines
``triton/static``, ``grouped/triton``, ``reference/triton``). The first turn of each shape includes Triton's
autotuning; the warm-up turns absorb it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import OrderedDict

import torch
import torch.nn as nn
import torchvision

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from image_classification.allocator import add_malloc_argument, configure_malloc  # noqa: E402
import pedconv  # noqa: E402
from pedconv import PEDConv2d  # noqa: E402
from pedconv.convert import default_predicate  # noqa: E402


def dynamic_conv_shapes(arch: str, image_size: int = 224):
    """OrderedDict (Cin, Cout, k, stride, padding, H) -> count, for the convs the release makes PEDConv."""
    model = getattr(torchvision.models, arch)(weights=None)
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    keep = default_predicate(convs[0][0])
    shapes: "OrderedDict[tuple, int]" = OrderedDict()

    def record(module, inputs, _output):
        key = (module.in_channels, module.out_channels, module.kernel_size[0], module.stride[0],
               module.padding[0], inputs[0].shape[-1])
        shapes[key] = shapes.get(key, 0) + 1

    handles = [m.register_forward_hook(record) for name, m in convs if keep(name, m)]
    with torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    for handle in handles:
        handle.remove()
    return shapes


def build_layer(kind: str, shape, device, dtype):
    cin, cout, k, stride, padding, _ = shape
    if kind == "static":
        layer = nn.Conv2d(cin, cout, k, stride, padding, bias=False)
    else:
        layer = PEDConv2d(cin, cout, k, stride, padding, method="auto" if kind == "fast" else kind)
    return layer.to(device=device, dtype=dtype).train()


def make_step(layer, shape, batch, device, dtype, channels_last, amp=False):
    cin, _, _, _, _, size = shape
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, cin, size, size, device=device, dtype=dtype).to(memory_format=memory_format)
    x.requires_grad_(True)
    grad = None

    def step():
        nonlocal grad
        with torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16,
                            enabled=amp):
            out = layer(x)
        if grad is None:
            grad = torch.randn_like(out)
        out.backward(grad)
        x.grad = None
        layer.zero_grad(set_to_none=True)

    return step


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_times(steps: dict, device, iters: int, warmup: int = 2) -> dict:
    """Seconds of each of ``iters`` steps of each entry; the steps take turns, so that load from elsewhere hits all
    alike and the i-th times of two entries are measured seconds apart. Every other turn runs them in reverse order,
    so that no entry always follows the same one (and inherits its cache and allocator state)."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {kind: [] for kind in steps}
    for turn in range(iters):
        for kind, step in (steps.items() if turn % 2 == 0 else reversed(steps.items())):
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[kind].append(time.perf_counter() - start)
    return times


def medians(times: dict) -> dict:
    """Each entry's median of the seconds :func:`step_times` measured."""
    return {kind: statistics.median(values) for kind, values in times.items()}


def median_times(steps: dict, device, iters: int, warmup: int = 2) -> dict:
    """Median seconds per step of each entry (see :func:`step_times`)."""
    return medians(step_times(steps, device, iters, warmup))


def paired_ratio(times: dict, kind: str, base: str) -> float:
    """Median over the turns of kind's time / base's time in the same turn.

    This machine slows down and speeds up in phases of seconds; a ratio of medians mixes phases when one comes or
    goes during a shape's turns, while each turn's pair is measured within a second.
    """
    return statistics.median(value / base_value for value, base_value in zip(times[kind], times[base]))


def peak_memory(step, device) -> int:
    """Peak bytes allocated during one step, on top of what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    current = peak = 0
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", nargs="+", default=["resnet18", "resnet50"],
                        choices=["resnet18", "resnet34", "resnet50", "resnet101"])
    parser.add_argument("-b", "--batch-size", type=int, default=16)
    parser.add_argument("--iters", type=int, default=9)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--amp", action="store_true",
                        help="run the layers under autocast (float16 on CUDA, bfloat16 on the CPU), weights float32")
    parser.add_argument("--methods", nargs="*", default=[],
                        choices=[m for m in pedconv.METHODS + pedconv.PATHS if m not in ("auto", "reference")],
                        help="also time these forced paths (to check the auto choice; triton: CUDA only)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument("--no-reference", action="store_true", help="skip the (slow) reference path")
    add_malloc_argument(parser)
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if "triton" in args.methods and device.type != "cuda":
        parser.error("--methods triton needs --device cuda (on the CPU the kernels run only under Triton's "
                     "interpreter, far too slow to time)")
    args.malloc = configure_malloc(args.default_malloc)
    torch.manual_seed(0)
    for arch in args.arch:
        benchmark_arch(arch, args, device, dtype)


def benchmark_arch(arch: str, args, device, dtype) -> None:
    """One table row per PEDConv layer shape of ``arch``, then the totals weighted by how often each shape occurs."""
    kinds = ["static", "fast"] + list(args.methods) + ([] if args.no_reference else ["reference"])
    _print_header(arch, args, device, kinds)
    totals = {kind: 0.0 for kind in kinds}
    scaled = {kind: 0.0 for kind in kinds}  # sum over shapes of count * static median * paired ratio to static
    mem_totals = {kind: 0 for kind in kinds}
    for shape, count in dynamic_conv_shapes(arch).items():
        step_seconds, memory, path = _measure_shape(shape, args, device, dtype, kinds)
        times = medians(step_seconds)
        ratios = {kind: paired_ratio(step_seconds, kind, "static") for kind in kinds}
        for kind in kinds:
            totals[kind] += count * times[kind]
            scaled[kind] += count * times["static"] * ratios[kind]
            mem_totals[kind] = max(mem_totals[kind], memory.get(kind, 0))
        print(_shape_line(shape, count, args, kinds, step_seconds, memory, path), flush=True)
    _print_totals(arch, args, kinds, totals, scaled, mem_totals)


def _print_header(arch: str, args, device, kinds) -> None:
    print(f"# {arch}, batch {args.batch_size}, {args.dtype}, {device}, threads {torch.get_num_threads()}, "
          f"{'channels_last' if args.channels_last else 'nchw'}{', autocast' if args.amp else ''}; "
          f"malloc {args.malloc}; forward+backward, "
          f"{args.iters} turns; times: medians; ratios: medians of the per-turn ratios")
    header = "cin cout k s size  n |" + "".join(f" {k:>10}" for k in kinds)
    header += " | fast/static ref/fast | auto's path    |"
    header += "" if args.no_memory else " MiB static  fast   ref | mem fast/static"
    print(header)


def _measure_shape(shape, args, device, dtype, kinds):
    """(per-turn step seconds of each kind, peak memory of each kind ({} with --no-memory), auto's path) of one
    layer shape."""
    layers = {kind: build_layer(kind, shape, device, dtype) for kind in kinds}
    steps = {kind: make_step(layers[kind], shape, args.batch_size, device, dtype, args.channels_last, args.amp)
             for kind in kinds}
    step_seconds = step_times(steps, device, args.iters)
    sample = torch.empty(args.batch_size, shape[0], shape[5], shape[5], device=device, dtype=dtype)
    path = layers["fast"].path_for(sample.to(memory_format=torch.channels_last) if args.channels_last else sample,
                                   training=True)
    memory = {} if args.no_memory else {kind: peak_memory(step, device) for kind, step in steps.items()}
    return step_seconds, memory, path


def _shape_line(shape, count: int, args, kinds, step_seconds: dict, memory: dict, path: str) -> str:
    times = medians(step_seconds)
    ratios = {kind: paired_ratio(step_seconds, kind, "static") for kind in kinds}
    cin, cout, k, stride, _, size = shape
    line = f"{cin:>3} {cout:>4} {k} {stride} {size:>4} {count:>2} |"
    line += "".join(f" {times[kind] * 1e3:>8.1f}ms" for kind in kinds)
    ref = ratios.get("reference")
    line += f" | {ratios['fast']:>11.2f} {ref / ratios['fast'] if ref else float('nan'):>8.2f} | {path:<14} |"
    if not args.no_memory:
        mib = {kind: memory[kind] / 2**20 for kind in kinds}
        line += f" {mib['static']:>10.1f} {mib['fast']:>5.1f} {mib.get('reference', float('nan')):>5.1f} |"
        line += f" {memory['fast'] / memory['static']:>15.2f}"
    for kind in args.methods:
        line += f" {kind}/static {ratios[kind]:.2f}"
    if "triton" in args.methods:
        line += "".join(f" {kind}/triton {paired_ratio(step_seconds, kind, 'triton'):.2f}"
                        for kind in ("grouped", "reference") if kind in step_seconds)
    return line


def _print_totals(arch: str, args, kinds, totals: dict, scaled: dict, mem_totals: dict) -> None:
    print("total of medians (weighted by occurrences):" + "".join(f" {kind}={totals[kind]:.3f}s" for kind in kinds))
    print(f"RATIO {arch} fast/static = {scaled['fast'] / scaled['static']:.3f}")
    if "reference" in scaled:
        print(f"RATIO {arch} reference/fast = {scaled['reference'] / scaled['fast']:.3f}")
    for kind in args.methods:
        print(f"RATIO {arch} {kind}/static = {scaled[kind] / scaled['static']:.3f}")
    tuner = pedconv.autotune.TUNER
    print(f"autotune: {'on' if pedconv.is_autotune_enabled() else 'off (fixed rule)'}, {tuner.measured} key(s) "
          f"measured so far in {tuner.measure_seconds:.2f} s")
    if "triton" in scaled:
        # the targets: triton/static at most 1.3, per-sample kernels / triton at least 2.
        for kind in ("grouped", "reference"):
            if kind in scaled:
                print(f"RATIO {arch} {kind}/triton = {scaled[kind] / scaled['triton']:.3f}")
    if not args.no_memory:
        print("largest per-layer peak memory: "
              + " ".join(f"{kind}={mem_totals[kind] / 2**20:.1f}MiB" for kind in kinds))


if __name__ == "__main__":
    main()
