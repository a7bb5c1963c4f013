"""Train and evaluate static and PEDConv ResNets on ImageNet-style data, with NVIDIA DLE's command line.

    python ./main.py /data/imagenet --data-backend pytorch --arch resnet18 --dynamic ...   # train
    python ./main.py /data/imagenet --arch resnet18 --evaluate --pretrained-weights ckpt  # evaluate
    python ./main.py                                                                     # the CPU demo

With no data path, a small PEDConv ResNet-18 trains on scikit-learn's digits (converted once to JPEGs), on the CPU,
in a few minutes; flags given on the command line still apply. Multi-process: run under multiproc.py or torchrun.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

logger = logging.getLogger("main")

DEMO_DEFAULTS = dict(
    data_backend="pytorch", arch="resnet18", dynamic=True, wmul=0.25, image_size=64, batch_size=32, epochs=8,
    lr=0.1, warmup=1, lr_schedule="cosine", label_smoothing=0.1, momentum=0.9, weight_decay=5e-5, workers=2,
    crop_area_min=0.35, print_freq=20, workspace="./logs/demo", raport_file="raport.json", device="cpu", interpolation="bilinear",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="PEDConv / ResNet ImageNet training (NVIDIA DLE command line)",
                                     allow_abbrev=True)
    parser.add_argument("data", nargs="?", default=None, metavar="DIR",
                        help="folder with train/ and val/ (ImageFolder layout); omit it to run the CPU demo")
    data = parser.add_argument_group("data")
    data.add_argument("--data-backend", default="pytorch",
                      choices=["pytorch", "dali-gpu", "dali-cpu", "synthetic", "syntetic"],
                      help="input pipeline (NVIDIA's default is dali-cpu; ours is pytorch, which needs no extra package)")
    data.add_argument("-j", "--workers", type=int, default=5, help="DataLoader workers or DALI threads per process")
    data.add_argument("--prefetch", type=int, default=2, help="batches prefetched per worker / DALI queue depth")
    data.add_argument("--image-size", type=int, default=224)
    data.add_argument("--interpolation", default="bilinear", choices=["bilinear", "bicubic", "triangular"])
    data.add_argument("--augmentation", default=None, choices=["autoaugment"], help="add AutoAugment (ImageNet policy)")
    data.add_argument("--crop-area-min", type=float, default=0.08,
                      help="smallest image-area fraction of a training random-resized crop (NVIDIA: 0.08)")
    data.add_argument("--verify-data", action="store_true", help="decode every image once first (cached); skip bad ones")
    data.add_argument("--num-classes", type=int, default=None, help="default: the number of class folders (1000 synthetic)")

    model = parser.add_argument_group("model")
    model.add_argument("-a", "--arch", default="resnet50", help="resnet18, resnet34, resnet50, resnet101, resnet152, resnet50d")
    model.add_argument("--dynamic", action="store_true", help="PEDConv in every residual block (as the authors' release)")
    model.add_argument("-c", "--model-config", default=None,
                       help="initialization: classic|fanout, fanin, grp-fanin, grp-fanout, release "
                            "(default: release for --dynamic, classic otherwise)")
    model.add_argument("--wmul", type=float, default=1.0, help="width multiplier (the release's)")
    model.add_argument("--zero-init-last-bn", action="store_true", help="start each block's last BatchNorm at 0")
    # The choices are pedconv.METHODS + pedconv.PATHS, spelled out: main.py imports no torch before parsing.
    model.add_argument("--pedconv-method", default="auto", choices=[
                           "auto", "grouped", "unfold", "taps", "reference", "grouped:chunks", "unfold:conv",
                           "unfold:matmul", "unfold:plain", "pointwise:per-sample", "pointwise:shared"],
                       help="PEDConv forward path (auto: measured fastest per layer shape, see PEDCONV_AUTOTUNE; "
                            "reference: the release's per-sample kernels)")
    model.add_argument("--pretrained-weights", "--pretrained-from-file", dest="pretrained_weights", default=None,
                       metavar="PATH", help="initial weights: a state_dict, the release's or this project's checkpoint")
    model.add_argument("--memory-format", default="nchw", choices=["nchw", "nhwc"])

    optim = parser.add_argument_group("optimization")
    optim.add_argument("--epochs", type=int, default=90)
    optim.add_argument("--run-epochs", type=int, default=-1, help="stop after this many epochs in this run (-1: all)")
    optim.add_argument("-b", "--batch-size", type=int, default=256, help="per process")
    optim.add_argument("--optimizer-batch-size", type=int, default=-1,
                       help="global batch per optimizer step; accumulation = it / (world size x batch size)")
    optim.add_argument("--optimizer", default="sgd", choices=["sgd", "rmsprop"])
    optim.add_argument("--lr", type=float, default=0.1, help="for the optimizer batch")
    optim.add_argument("--lr-schedule", default="step", choices=["step", "linear", "cosine"])
    optim.add_argument("--end-lr", type=float, default=0.0)
    optim.add_argument("--warmup", type=int, default=0, help="warmup epochs")
    optim.add_argument("--momentum", "--mom", dest="momentum", type=float, default=0.9)
    optim.add_argument("--weight-decay", "--wd", dest="weight_decay", type=float, default=1e-4)
    optim.add_argument("--bn-weight-decay", action="store_true", help="also decay BatchNorm parameters and biases")
    optim.add_argument("--nesterov", action="store_true")
    optim.add_argument("--rmsprop-alpha", type=float, default=0.9)
    optim.add_argument("--rmsprop-eps", type=float, default=1e-3)
    optim.add_argument("--label-smoothing", type=float, default=0.0)
    optim.add_argument("--mixup", type=float, default=0.0, help="mixup Beta(alpha, alpha); 0: off")
    optim.add_argument("--infomax-weight", type=float, default=0.001, help="weight of PEDConv's info-max loss")
    optim.add_argument("--use-ema", type=float, default=None, metavar="DECAY", help="keep and validate an EMA")

    run = parser.add_argument_group("run")
    run.add_argument("--amp", action="store_true", help="float16 + GradScaler on CUDA, bfloat16 autocast on CPU")
    run.add_argument("--static-loss-scale", type=float, default=1.0)
    run.add_argument("--dynamic-loss-scale", action="store_true")
    run.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    run.add_argument("--seed", type=int, default=None, help="seed (each rank adds its rank)")
    run.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower)")
    run.add_argument("--prof", type=int, default=-1, help="stop each phase after this many iterations")
    run.add_argument("--evaluate", action="store_true", help="only validate (writes no checkpoint)")
    run.add_argument("--training-only", action="store_true", help="skip validation")
    run.add_argument("--resume", default=None, metavar="PATH", help="continue from this checkpoint")
    run.add_argument("--workspace", default="./", help="folder for the report and checkpoints")
    run.add_argument("--raport-file", default="experiment_raport.json", help="DLLogger JSON report, in the workspace")
    run.add_argument("--checkpoint-filename", default="checkpoint.pth.tar")
    run.add_argument("--no-checkpoints", dest="save_checkpoints", action="store_false")
    run.add_argument("--gather-checkpoints", type=int, default=0, metavar="N",
                     help="also keep the last N epochs' checkpoints (checkpoint-<epoch>.pth.tar)")
    run.add_argument("-p", "--print-freq", type=int, default=10)
    run.add_argument("--topk", type=int, default=5)
    run.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.data is None:
        parser.set_defaults(**DEMO_DEFAULTS)
        args = parser.parse_args(argv)
        args.demo = True
    else:
        args.demo = False
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    from image_classification.runner import UserError, run

    try:
        return run(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    status = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from image_classification.distributed import exit_process

        exit_process(status)  # see exit_process: no interpreter shutdown beside the process group's threads
    sys.exit(status)
