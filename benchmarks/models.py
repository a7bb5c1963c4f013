"""Whole-model training step: static ResNet vs PEDConv (fast path) vs PEDConv (the release's reference path).

One step is a forward, the loss (cross-entropy, plus 0.001 x the info-max loss for PEDConv models, as training
adds), a backward and an SGD (momentum) step. The variants take turns (interleaved, median of ``--iters``) so that
load from elsewhere on the machine hits them alike; peak memory is measured over one step (on CPU from the
profiler's allocation events, on GPU by torch.cuda.max_memory_allocated), on top of what the model and optimizer
already hold. Ratios are within one run:

    python benchmarks/models.py --arch resnet18 -b 16
    python benchmarks/models.py --arch resnet50 -b 16
    python benchmarks/models.py --arch resnet18 -b 16 --no-reference --profile   # where the extra time goes
    python benchmarks/models.py --arch resnet18 -b 16 --iters 1 --no-memory --saved   # where the extra memory goes

    python benchmarks/models.py --arch resnet18 -b 16 --no-reference --compile   # also under torch.compile

On a GPU the three variants are also measured under AMP (float16 autocast, GradScaler) with channels_last. With
``--compile`` the static and fast models are also measured compiled (``torch.compile``, default mode, with
:func:`pedconv.inductor_options` as the training engine passes them), and the first
compiled step (the compilation) is timed on its own. PEDConv's
``auto`` measures its paths in the first (warm-up) step; the run prints the path chosen for each layer and what the
measuring cost, in steps of the model. ``PEDCONV_AUTOTUNE=0`` runs the fixed rule instead.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmarks.pedconv_layer import median_times, peak_memory  # noqa: E402
from image_classification.allocator import add_malloc_argument, configure_malloc  # noqa: E402
from image_classification.models import ARCHITECTURES, build_model, set_pedconv_method  # noqa: E402
import pedconv  # noqa: E402
from pedconv import PEDConv2d, info_max_loss  # noqa: E402

INFO_MAX_WEIGHT = 1e-3


def build_variant(kind: str, arch: str, device, wmul: float, channels_last: bool):
    """kind: static, fast (PEDConv, method auto) or reference (PEDConv, method reference on every layer)."""
    torch.manual_seed(0)
    model = build_model(arch, dynamic=kind != "static", wmul=wmul)
    if kind == "reference":
        set_pedconv_method(model, "reference")
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return model.to(device=device, memory_format=memory_format).train()


def make_train_step(model, batch: int, image_size: int, device, amp: bool, channels_last: bool):
    """A closure running one training step of ``model`` on a fixed random batch."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, image_size, image_size, generator=generator).to(device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, model.arch["num_classes"], (batch,), generator=generator).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, init_scale=128.0, enabled=amp and amp_dtype is torch.float16)

    def step():
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            loss = F.cross_entropy(model(images), labels) + INFO_MAX_WEIGHT * info_max_loss(model)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return step


def saved_by_layer(model, batch: int, image_size: int, device) -> dict:
    """Bytes that one training forward saves for the backward, by the conv layer that saved them (storage counted
    once, by the first layer to save it; what BatchNorm, ReLU... save is under "other")."""
    current, sizes, seen = ["other"], collections.Counter(), set()

    def leave(module, args, output):
        current.pop()

    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, PEDConv2d)):
            hooks.append(module.register_forward_pre_hook(lambda m, args, name=name: current.append(name)))
            hooks.append(module.register_forward_hook(leave))

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            sizes[current[-1]] += storage.nbytes()
        return tensor

    images = torch.randn(batch, 3, image_size, image_size, device=device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(images)
    for hook in hooks:
        hook.remove()
    return sizes


def print_saved_breakdown(arch, batch, image_size, device, wmul) -> None:
    """Saved-for-backward MiB of the static and the PEDConv model's convs, by stage and kernel size."""
    saved = {kind: saved_by_layer(build_variant(kind, arch, device, wmul, False), batch, image_size, device)
             for kind in ("static", "fast")}
    model = build_model(arch, dynamic=True, wmul=wmul)
    groups = collections.defaultdict(lambda: [0, 0.0, 0.0])
    for name, module in model.named_modules():
        if isinstance(module, PEDConv2d):
            key = (name.split(".")[0], "x".join(map(str, module.kernel_size)))
            groups[key][0] += 1
            groups[key][1] += saved["static"][name] / 2**20
            groups[key][2] += saved["fast"][name] / 2**20
    print("\n## saved for the backward by the layers PEDConv replaces (MiB, one forward)")
    for (stage, kernel), (count, static, fast) in sorted(groups.items()):
        print(f"{stage} {kernel:>3} x{count:<2}: static {static:7.1f}  fast {fast:7.1f}  extra {fast - static:7.1f}")
    totals = {kind: sum(sizes.values()) / 2**20 for kind, sizes in saved.items()}
    print(f"whole model: static {totals['static']:.1f}  fast {totals['fast']:.1f}  "
          f"extra {totals['fast'] - totals['static']:.1f}")


def record_inputs(model) -> dict:
    """Name -> (shape, channels_last, dtype) of each PEDConv layer's input, filled by the model's next forward."""
    inputs = {}

    def record(module, args, name):
        x = args[0]
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        inputs.setdefault(name, (tuple(x.shape), channels_last, x.dtype))

    for name, module in model.named_modules():
        if isinstance(module, PEDConv2d):
            module.register_forward_pre_hook(lambda m, args, name=name: record(m, args, name))
    return inputs


def print_paths(model, inputs: dict, device, amp: bool) -> None:
    """The path each PEDConv layer runs in training (auto: the measured choice)."""
    print("\n## PEDConv paths (training)")
    modules = dict(model.named_modules())
    for name, (shape, channels_last, dtype) in inputs.items():
        sample = torch.empty(shape, device=device, dtype=dtype)
        if channels_last:
            sample = sample.contiguous(memory_format=torch.channels_last)
        amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            path = modules[name].path_for(sample, training=True)
        print(f"{name:>20} {'x'.join(map(str, shape[1:])):>12}: {path}")


def profile_step(step, label: str, rows: int) -> None:
    """Print the operators that take the most (self) time in one step."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(f"\n## {label}: top operators by self CPU time (one step)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="resnet18", choices=ARCHITECTURES)
    parser.add_argument("-b", "--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--wmul", type=float, default=1.0)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--channels-last", action="store_true", help="also the plain variants in channels_last")
    parser.add_argument("--no-reference", action="store_true", help="skip the (slow) reference path")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument("--profile", action="store_true", help="print the top operators of static and fast steps")
    parser.add_argument("--profile-rows", type=int, default=15)
    parser.add_argument("--compile", action="store_true",
                        help="also the static and fast models under torch.compile, with the first (compiling) step timed")
    parser.add_argument("--saved", action="store_true",
                        help="print what the convs save for the backward, static vs fast, by stage and kernel")
    add_malloc_argument(parser)
    return parser


def variants(args, device, kinds) -> list:
    """(label, kind, amp, channels_last) of every measured variant; on a GPU also AMP with channels_last, as
    training runs there."""
    chosen = [(kind, kind, False, args.channels_last) for kind in kinds]
    if device.type == "cuda":
        chosen += [(f"{kind}+amp+nhwc", kind, True, True) for kind in kinds]
    if args.compile:
        chosen += [(f"{kind}+compile", kind, False, args.channels_last) for kind in ("static", "fast")]
    return chosen


def first_steps(steps: dict) -> dict:
    """Seconds of the first step of each compiled variant (the compilation, and PEDConv's measuring), run before
    the timed turns."""
    seconds = {}
    for label, step in steps.items():
        if label.endswith("+compile"):
            start = time.perf_counter()
            step()
            seconds[label] = time.perf_counter() - start
    return seconds


def print_ratios(times: dict, memory: dict, chosen: list, kinds: list) -> None:
    """Each PEDConv variant's time (and peak memory) over its static twin's; the reference path's over the fast."""
    for suffix in sorted({label[len(kind):] for label, kind, _, _ in chosen}):
        base = f"static{suffix}"
        for kind in kinds[1:]:
            label = f"{kind}{suffix}"
            if label not in times:
                continue
            text = f"RATIO time {label}/{base} = {times[label] / times[base]:.3f}"
            if memory:
                text += f"   memory {label}/{base} = {memory[label] / memory[base]:.3f}"
            print(text)
        if "reference" in kinds and f"reference{suffix}" in times:
            print(f"RATIO time reference{suffix}/fast{suffix} = "
                  f"{times[f'reference{suffix}'] / times[f'fast{suffix}']:.3f}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    malloc = configure_malloc(args.default_malloc)

    kinds = ["static", "fast"] + ([] if args.no_reference else ["reference"])
    chosen = variants(args, device, kinds)
    steps, fast_model, fast_inputs = {}, None, {}
    for label, kind, amp, channels_last in chosen:
        model = build_variant(kind, args.arch, device, args.wmul, channels_last)
        if label.endswith("+compile"):
            model = torch.compile(model, options=pedconv.inductor_options(model))  # as the training engine
        steps[label] = make_train_step(model, args.batch_size, args.image_size, device, amp, channels_last)
        if label == "fast":
            fast_model, fast_inputs = model, record_inputs(model)

    print(f"# {args.arch} x{args.wmul:g}, batch {args.batch_size}, {args.image_size}px, {device}, threads "
          f"{torch.get_num_threads()}, {'channels_last' if args.channels_last else 'nchw'}; malloc {malloc}; "
          f"training step (forward, loss, backward, SGD), median of {args.iters}, variants interleaved")
    compiling = first_steps(steps)
    for label, seconds in compiling.items():
        print(f"{label:>22}: first step {seconds:.1f} s")
    if len(compiling) == 2:
        print(f"RATIO first compiled step fast/static = {compiling['fast+compile'] / compiling['static+compile']:.3f}")
    times = median_times(steps, device, args.iters, args.warmup)
    memory = {} if args.no_memory else {label: peak_memory(step, device) for label, step in steps.items()}
    for label in steps:
        line = f"{label:>22}: {times[label] * 1e3:9.1f} ms/step"
        if memory:
            line += f"  peak {memory[label] / 2**20:8.1f} MiB"
        print(line)
    tuner = pedconv.autotune.TUNER
    print(f"autotune: {'on' if pedconv.is_autotune_enabled() else 'off (fixed rule)'}; {tuner.measured} key(s) "
          f"measured in {tuner.measure_seconds:.2f} s = {tuner.measure_seconds / times['fast']:.1f} fast steps "
          f"({100 * tuner.measure_seconds / (100 * times['fast']):.1f} % of a 100-step run)")
    print_ratios(times, memory, chosen, kinds)
    if fast_model is not None:
        print_paths(fast_model, fast_inputs, device, amp=False)
    if args.profile:
        for label in ("static", "fast"):
            profile_step(steps[label], label, args.profile_rows)
    if args.saved:
        print_saved_breakdown(args.arch, args.batch_size, args.image_size, device, args.wmul)


if __name__ == "__main__":
    main()
