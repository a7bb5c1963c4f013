"""A training checkpoint to a bare state_dict (the model's weights only), as NVIDIA's checkpoint2model.py does.

    python checkpoint2model.py --checkpoint-path logs/checkpoint.pth.tar --weight-path resnet18_pedconv.pth
    python checkpoint2model.py --checkpoint-path logs/checkpoint.pth.tar --weight-path ema.pth --ema

Reads this project's checkpoints and the release's (or NVIDIA's) format; ``module.`` and ``_orig_mod.`` prefixes are
removed. ``--ema`` exports the exponential moving average of the weights (``state_dict_ema``, kept when training
with ``--use-ema``); a checkpoint without one is an error. The weights are checked to load into the architecture
the checkpoint describes before the file is written (atomically); weights holding NaN or infinite values are
refused, naming the first such tensor. The result loads with
``model.load_state_dict(torch.load(path))`` and is accepted by ``main.py --pretrained-weights``.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

import torch

from image_classification.atomic_files import atomic_output, check_output_folder
from image_classification.checkpoints import load_checkpoint, model_from_checkpoint, weights_of
from image_classification.tools import ToolParser, tool_main


def build_parser() -> ToolParser:
    parser = ToolParser(description="Export a checkpoint's model weights (or EMA weights) as a bare state_dict")
    parser.add_argument("--checkpoint-path", required=True, metavar="PATH", help="the training checkpoint")
    parser.add_argument("--weight-path", required=True, metavar="PATH", help="where to write the state_dict")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights (state_dict_ema)")
    return parser


@tool_main
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    check_output_folder(args.weight_path)
    checkpoint = load_checkpoint(args.checkpoint_path)
    state = weights_of(checkpoint, args.ema)
    if checkpoint.arch.get("name") is not None:
        model_from_checkpoint(checkpoint, ema=args.ema)  # the weights fit the architecture they claim
    with atomic_output(args.weight_path) as temporary:
        torch.save(dict(state), temporary)
    described = checkpoint.arch
    kind = "PEDConv " if described.get("dynamic") else ""
    print(f"{args.weight_path}: {'EMA ' if args.ema else ''}weights of {kind}{described.get('name') or 'a model'}"
          f" ({len(state)} tensors) from {args.checkpoint_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
