"""Top-k classes and probabilities of one or more images, from a checkpoint (this project's or the release's).

    python classify.py --pretrained-from-file runs/demo/model_best.pth.tar digit.jpg other.jpg
    python classify.py --pretrained-from-file model_best.pth.tar --class-names names.json --amp photo.jpg

The architecture (static or PEDConv, depth, width, classes) comes from the checkpoint; ``--arch``, if given, must
agree with it (NVIDIA's command passes it). Images are prepared as validation images are in training: the shorter
side resized to ``--image-size`` + 32, a centre crop of ``--image-size``, the ImageNet mean and std. The size and
interpolation default to those main.py recorded in the checkpoint (``preprocessing``); a flag that differs from
them is obeyed with a warning.

Class names: ``--class-names FILE`` if given (one name per line, a JSON list, or a JSON object whose keys are class
indices or the checkpoint's class names), else the checkpoint's ``classes`` (the training folders' names, saved by
main.py), else the class index. ``--amp`` runs float16 autocast on CUDA, bfloat16 on the CPU. ``--json`` prints one
JSON object per image instead of the table. Weights holding NaN or infinite values are refused (the error names the
first such tensor).
"""
from __future__ import annotations

import json
import os
import sys
from typing import List, Optional, Sequence

import torch

import choices
from image_classification.checkpoints import (checkpoint_classes, checkpoint_preprocessing, load_checkpoint,
                                              model_from_checkpoint)
from image_classification.distributed import select_device
from image_classification.tools import ToolError, ToolParser, quiet_logging, tool_main
from image_classification.training import Precision


def build_parser() -> ToolParser:
    parser = ToolParser(description="Top-k classes of images from a checkpoint")
    parser.add_argument("images", nargs="*", metavar="IMAGE", help="image files")
    parser.add_argument("--image", action="append", default=[], metavar="IMAGE",
                        help="an image file (NVIDIA's flag; may be repeated)")
    parser.add_argument("--pretrained-from-file", "--pretrained-weights", "--checkpoint", "--weights",
                        dest="checkpoint",
                        required=True, metavar="PATH", help="a checkpoint: this project's, the release's, a state_dict")
    parser.add_argument("-a", "--arch", default=None, help="checked against the checkpoint (optional)")
    parser.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    parser.add_argument("--class-names", default=None, metavar="FILE",
                        help="class names: one per line, a JSON list, or a JSON object {index or folder name: name}")
    parser.add_argument("--image-size", type=int, default=None,
                        help="crop size (default: the size the checkpoint's model was trained at, else 224)")
    parser.add_argument("--interpolation", default=None, choices=choices.INTERPOLATIONS,
                        help="resize interpolation (default: the checkpoint's, else bilinear)")
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("-b", "--batch-size", type=int, default=16, help="images per forward pass")
    parser.add_argument("--device", default="auto", choices=choices.DEVICES)
    parser.add_argument("--cpu", dest="device", action="store_const", const="cpu",
                        help="NVIDIA's spelling of --device cpu")
    parser.add_argument("--amp", action="store_true", help="float16 autocast on CUDA, bfloat16 on the CPU")
    parser.add_argument("--precision", choices=["FP32", "AMP"], default=None,
                        help="NVIDIA's spelling: AMP is --amp")
    parser.add_argument("--json", action="store_true", help="one JSON object per image")
    return parser


def read_class_names(path: str, num_classes: int, stored: Optional[List[str]]) -> List[str]:
    """Class names from a file (see the module docstring), checked against the model's class count."""
    if not os.path.isfile(path):
        raise ToolError(f"{path}: no such class-names file")
    try:
        with open(path, encoding="utf-8") as stream:
            text = stream.read()
    except (OSError, UnicodeDecodeError) as error:
        raise ToolError(f"{path}: cannot read: {error}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = [line.strip() for line in text.splitlines() if line.strip()]
    if isinstance(data, dict):
        names = []
        for index in range(num_classes):
            key = str(index) if str(index) in data else (stored[index] if stored and stored[index] in data else None)
            if key is None:
                raise ToolError(f"{path}: no name for class {index}"
                                + (f" ({stored[index]!r})" if stored else ""))
            names.append(str(data[key]))
        return names
    if not isinstance(data, list):
        raise ToolError(f"{path}: expected names one per line, a JSON list or a JSON object")
    if len(data) != num_classes:
        raise ToolError(f"{path}: {len(data)} class names for a model of {num_classes} classes")
    return [str(name) for name in data]


def load_images(paths: Sequence[str], image_size: int, interpolation: str) -> torch.Tensor:
    """The images as one normalized float32 batch, prepared as the validation loader prepares them."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from dataloading.common import Normalizer
    from dataloading.pytorch import val_transform

    transform = val_transform(image_size, interpolation)
    batch = []
    for path in paths:
        if not os.path.isfile(path):
            raise ToolError(f"{path}: no such image file")
        try:
            with Image.open(path) as image:
                picture = transform(image.convert("RGB"))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise ToolError(f"{path}: not a readable image ({error})") from None
        batch.append(torch.from_numpy(np.array(picture, dtype=np.uint8)).permute(2, 0, 1))
    return Normalizer(torch.device("cpu"), torch.contiguous_format)(torch.stack(batch))


@torch.no_grad()
def classify(model: torch.nn.Module, images: torch.Tensor, topk: int, device: torch.device, amp: bool):
    """(probabilities, class indices) of the ``topk`` most likely classes of each image, most likely first."""
    model = model.to(device).eval()
    with Precision.create(amp, device).autocast():
        logits = model(images.to(device))
    probabilities = torch.softmax(logits.float(), dim=1)
    return probabilities.topk(min(topk, probabilities.shape[1]), dim=1)


def print_result(path: str, probabilities: List[float], classes: List[int], names: List[str], as_json: bool) -> None:
    if as_json:
        top = [{"class": c, "name": names[c], "probability": p} for p, c in zip(probabilities, classes)]
        print(json.dumps({"image": path, "top": top}), flush=True)
        return
    print(path)
    for rank, (p, c) in enumerate(zip(probabilities, classes), start=1):
        print(f"  {rank}. {names[c]:<24} {100.0 * p:6.2f} %   (class {c})", flush=True)


@tool_main
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_logging()
    paths = list(args.images) + list(args.image)
    if not paths:
        raise ToolError("no image given (IMAGE arguments or --image)")
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise ToolError(f"{missing[0]}: no such image file" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if min(args.image_size or 1, args.topk, args.batch_size) <= 0:
        raise ToolError("--image-size, --topk and --batch-size must be positive")
    amp = args.amp or args.precision == "AMP"
    device = select_device(args.device)
    checkpoint = load_checkpoint(args.checkpoint)
    model = model_from_checkpoint(checkpoint, ema=args.ema, arch=args.arch)
    preprocessing = checkpoint_preprocessing(checkpoint, image_size=args.image_size, interpolation=args.interpolation)
    num_classes = checkpoint.arch["num_classes"]
    stored = checkpoint_classes(checkpoint)
    if stored is not None and len(stored) != num_classes:
        stored = None
    if args.class_names:
        names = read_class_names(args.class_names, num_classes, stored)
    else:
        names = stored or [str(index) for index in range(num_classes)]
    for start in range(0, len(paths), args.batch_size):
        chunk = paths[start:start + args.batch_size]
        images = load_images(chunk, preprocessing["image_size"], preprocessing["interpolation"])
        probabilities, indices = classify(model, images, args.topk, device, amp)
        for path, probs, classes in zip(chunk, probabilities.tolist(), indices.tolist()):
            print_result(path, probs, classes, names, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
