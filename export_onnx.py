"""Export a static or PEDConv ResNet to ONNX with a dynamic batch axis, and check it against PyTorch.

    python export_onnx.py --pretrained-from-file runs/demo/model_best.pth.tar -o demo.onnx --check
    python export_onnx.py --arch resnet50 --dynamic -o pedconv_resnet50.onnx          # random weights
    python export_onnx.py --pretrained-from-file ckpt.pth.tar --ema -o ema.onnx       # the EMA weights

The graph's input ``input`` is float32 ``(batch, 3, image_size, image_size)``, normalized as in training; its output
``logits`` is ``(batch, classes)``; ``batch`` is a dynamic axis. While exporting, PEDConv layers compute with
batch-independent operations only (an unfold and a broadcast matrix product: no per-sample kernels folded into a
batch-sized group count), so one file serves every batch size, and the graph holds standard ONNX operators only.

Exporter: by default the TorchScript-based one (``torch.onnx.export(..., dynamo=False)``), which is quick and keeps
the batch axis; ``--dynamo`` uses the ``torch.export``-based one (needs ``onnxscript``; several minutes for a PEDConv
model on a small CPU). ``--check`` runs the file with onnxruntime at batch sizes 1 and 7 (``--check-batches``) and
prints the largest absolute difference from PyTorch's logits; beyond ``--tolerance`` it is an error. The file is
written atomically. A checkpoint whose weights hold NaN or infinite values is refused (the error names the first such
tensor) unless ``--allow-nonfinite`` is given, e.g. to debug the graph of a diverged model.
"""
from __future__ import annotations

import contextlib
import sys
import warnings
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn

from image_classification.atomic_files import atomic_output
from image_classification.checkpoints import (checkpoint_preprocessing, default_preprocessing, load_checkpoint,
                                              model_from_checkpoint)
from image_classification.models import build_model, check_arch
from image_classification.tools import ToolError, ToolParser, quiet_logging, tool_main

INPUT, OUTPUT, BATCH = "input", "logits", "batch"
DEFAULT_OPSET = 17


def build_parser() -> ToolParser:
    parser = ToolParser(description="Export a static or PEDConv ResNet to ONNX with a dynamic batch axis")
    parser.add_argument("-o", "--output", required=True, metavar="FILE.onnx")
    source = parser.add_argument_group("model: a checkpoint, or an architecture with random weights")
    source.add_argument("--pretrained-from-file", "--pretrained-weights", "--checkpoint", dest="checkpoint",
                        default=None, metavar="PATH", help="this project's or the release's checkpoint, a state_dict")
    source.add_argument("--ema", action="store_true", help="export the checkpoint's EMA weights")
    source.add_argument("--allow-nonfinite", action="store_true",
                        help="export weights holding NaN or infinite values (refused otherwise)")
    source.add_argument("-a", "--arch", default=None, help="without a checkpoint: resnet18, resnet50, ...")
    source.add_argument("--dynamic", action="store_true", help="without a checkpoint: PEDConv layers")
    source.add_argument("--wmul", type=float, default=1.0, help="without a checkpoint: width multiplier")
    source.add_argument("--num-classes", type=int, default=1000, help="without a checkpoint: classes")
    parser.add_argument("--image-size", type=int, default=None,
                        help="height and width of the graph's input (default: the checkpoint's training size, else 224)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    parser.add_argument("--dynamo", action="store_true", help="use the torch.export-based exporter (onnxscript)")
    parser.add_argument("--check", action="store_true", help="compare onnxruntime with PyTorch after exporting")
    parser.add_argument("--check-batches", type=int, nargs="+", default=[1, 7], metavar="N")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest absolute logit difference allowed")
    return parser


@contextlib.contextmanager
def _quiet_exporter():
    """Silence what the exporter says about code it records correctly: the PEDConv layers' shape checks are
    constants of the graph (TracerWarning), and the notice that the TorchScript-based exporter is the older one."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        yield


def export(model: nn.Module, path: str, image_size: int, opset: int = DEFAULT_OPSET, dynamo: bool = False) -> None:
    """Write ``model`` (put in eval mode, on the CPU, float32) to ``path`` with a dynamic batch axis."""
    model = model.cpu().float().eval()
    example = torch.randn(2, 3, image_size, image_size)
    with atomic_output(path) as temporary, _quiet_exporter(), torch.no_grad():
        if dynamo:
            try:
                import onnxscript  # noqa: F401
            except ImportError:
                raise ToolError("--dynamo needs onnxscript: pip install onnxscript") from None
            torch.onnx.export(model, (example,), temporary, dynamo=True, opset_version=max(opset, 18),
                              input_names=[INPUT], output_names=[OUTPUT],
                              dynamic_shapes=({0: torch.export.Dim(BATCH)},), verbose=False)
        else:
            torch.onnx.export(model, (example,), temporary, dynamo=False, opset_version=opset,
                              input_names=[INPUT], output_names=[OUTPUT],
                              dynamic_axes={INPUT: {0: BATCH}, OUTPUT: {0: BATCH}})
        import onnx

        onnx.checker.check_model(temporary)


def compare(model: nn.Module, path: str, image_size: int, batches: Sequence[int] = (1, 7), seed: int = 0
            ) -> Dict[int, float]:
    """{batch size: largest absolute difference between onnxruntime's and PyTorch's logits} on random inputs."""
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    shape = session.get_inputs()[0].shape
    if not isinstance(shape[0], str):
        raise ToolError(f"{path}: the batch axis is fixed to {shape[0]}, not dynamic")
    model = model.cpu().float().eval()
    generator = torch.Generator().manual_seed(seed)
    differences = {}
    for batch in batches:
        images = torch.randn(batch, 3, image_size, image_size, generator=generator)
        with torch.no_grad():
            expected = model(images).numpy()
        (logits,) = session.run([OUTPUT], {INPUT: images.numpy()})
        if logits.shape != expected.shape:
            raise ToolError(f"{path}: onnxruntime gave logits of shape {logits.shape} for batch {batch}, "
                            f"PyTorch {expected.shape}")
        differences[batch] = float(abs(logits - expected).max())
    return differences


def _model(args) -> nn.Module:
    """The model to export; sets ``args.image_size`` from the checkpoint when not given."""
    if args.checkpoint:
        checkpoint = load_checkpoint(args.checkpoint)
        args.image_size = checkpoint_preprocessing(checkpoint, image_size=args.image_size)["image_size"]
        return model_from_checkpoint(checkpoint, ema=args.ema, arch=args.arch, allow_nonfinite=args.allow_nonfinite)
    args.image_size = args.image_size or default_preprocessing(args.arch)["image_size"]
    if not args.arch:
        raise ToolError("no model: give --pretrained-from-file PATH, or --arch NAME for random weights")
    if args.ema:
        raise ToolError("--ema needs --pretrained-from-file")
    check_arch(args.arch)
    if args.wmul <= 0 or args.num_classes <= 0:
        raise ToolError(f"--wmul and --num-classes must be positive (got {args.wmul:g}, {args.num_classes})")
    torch.manual_seed(0)  # random weights, the same on every export
    return build_model(args.arch, args.dynamic, args.num_classes, args.wmul)


@tool_main
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_logging()
    if (args.image_size is not None and args.image_size <= 0) or min(args.check_batches) <= 0:
        raise ToolError("--image-size and --check-batches must be positive")
    model = _model(args)
    export(model, args.output, args.image_size, args.opset, args.dynamo)
    kind = "PEDConv " if getattr(model, "arch", {}).get("dynamic") else ""
    print(f"{args.output}: {kind}{model.arch['name']} x{model.arch['wmul']:g}, input ({BATCH}, 3, {args.image_size}, "
          f"{args.image_size}), {'torch.export' if args.dynamo else 'TorchScript'} exporter, opset "
          f"{max(args.opset, 18) if args.dynamo else args.opset}")
    if args.check:
        differences = compare(model, args.output, args.image_size, args.check_batches)
        for batch, difference in differences.items():
            print(f"  batch {batch}: max |onnxruntime - PyTorch| = {difference:.3g}")
        worst = max(differences.values())
        if not worst <= args.tolerance:
            raise ToolError(f"{args.output}: onnxruntime differs from PyTorch by {worst:.3g} "
                            f"(more than --tolerance {args.tolerance:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
