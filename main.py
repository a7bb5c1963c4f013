"""Train and evaluate static and PEDConv ResNets on ImageNet-style data, with NVIDIA DLE's command line.

    python ./main.py /data/imagenet --data-backend pytorch --arch resnet18 --dynamic ...   # train
    python ./main.py /data/imagenet --arch resnet18 --evaluate --pretrained-weights ckpt  # evaluate
    python ./main.py                                                                     # the CPU demo

With no data path (and no data flag), a small PEDConv ResNet-18 trains on scikit-learn's digits (converted once to
JPEGs), on the CPU, in about 1.5 minutes on 2 idle cores, into runs/demo/ (a re-run replaces it); other flags still apply. Without
--workspace every run writes into a new runs/<arch>-<date>-<time>/. Exit status: 0 finished, 130 / 143 stopped by
Ctrl-C / SIGTERM (after saving), 2 bad input. Multi-process: run under multiproc.py or torchrun.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

import choices
from errors import EXIT_BAD_INPUT, UserError
from image_classification.affinity import MODES as AFFINITY_MODES
from image_classification.engine import RunConfig

logger = logging.getLogger("main")

DEMO_DEFAULTS = dict(
    data_backend="pytorch", arch="resnet18", dynamic=True, wmul=0.25, image_size=64, batch_size=32, epochs=8,
    lr=0.1, warmup=1, lr_schedule="cosine", label_smoothing=0.1, momentum=0.9, weight_decay=5e-5, workers=2,
    crop_area_min=0.35, print_freq=20, workspace=os.path.join("runs", "demo"), raport_file="raport.json", device="cpu",
    interpolation="bilinear",
)
DATA_GROUP = "data"


class HelpFormatter(argparse.HelpFormatter):
    """Every flag's help ends with its default ("off" for switches), as a person reading --help expects."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            default = "off" if isinstance(action, argparse._StoreTrueAction) else "on"
        elif action.default is None:
            return text
        else:
            default = "%(default)s"
        return f"{text} (default: {default})"


def _true_or_false(text: str) -> bool:
    """NVIDIA's True|False flags; unlike their type=bool, "False" means false."""
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="PEDConv / ResNet ImageNet training (NVIDIA DLE command line)",
                                     allow_abbrev=True, formatter_class=HelpFormatter)
    parser.add_argument("data", nargs="?", default=None, metavar="DIR",
                        help="folder with train/ and val/ (ImageFolder layout); omit it, and every flag of the data "
                             "group, to run the CPU demo")
    data = parser.add_argument_group(DATA_GROUP)
    data.add_argument("--data-backend", default="dali-cpu",
                      choices=choices.DATA_BACKENDS + tuple(choices.DATA_BACKEND_ALIASES),
                      help="input pipeline, NVIDIA's default (dali-cpu decodes on the CPU; pytorch needs no DALI)")
    data.add_argument("-j", "--workers", type=int, default=5,
                      help="DataLoader workers or DALI threads per process (lowered to the usable cores)")
    data.add_argument("--prefetch", type=int, default=2, help="batches prefetched per worker / DALI queue depth")
    data.add_argument("--image-size", type=int, default=None,
                      help="training and validation crop size (default: for --evaluate and --resume the checkpoint's, "
                           "else the architecture's: 224, efficientnet-b4 380)")
    data.add_argument("--interpolation", default=None, choices=choices.INTERPOLATIONS,
                      help="resize interpolation (default: for --evaluate and --resume the checkpoint's, else bilinear)")
    data.add_argument("--augmentation", default=None, choices=["autoaugment"],
                      help="add AutoAugment (ImageNet policy) (default: none)")
    data.add_argument("--crop-area-min", type=float, default=0.08,
                      help="smallest image-area fraction of a training random-resized crop (NVIDIA: 0.08)")
    data.add_argument("--verify-data", action="store_true", help="decode every image once first (cached); skip bad ones")
    data.add_argument("--num-classes", "--num_classes", type=int, default=None,
                      help="number of classes (default: the number of class folders; 1000 for synthetic data)")

    model = parser.add_argument_group("model")
    model.add_argument("-a", "--arch", default="resnet50",
                       help=", ".join(choices.ARCHITECTURES))
    model.add_argument("--dynamic", action="store_true", help="PEDConv in every residual block (as the authors' release)")
    model.add_argument("-c", "--model-config", default=None,
                       help="initialization: classic|fanout, fanin, grp-fanin, grp-fanout, release "
                            "(default: release for --dynamic, classic otherwise)")
    model.add_argument("--wmul", type=float, default=1.0, help="width multiplier (the release's)")
    model.add_argument("--zero-init-last-bn", action="store_true", help="start each block's last BatchNorm at 0")
    model.add_argument("--pedconv-method", default="auto", choices=choices.PEDCONV_METHODS,
                       help="PEDConv forward path (auto: measured fastest per layer shape, see PEDCONV_AUTOTUNE; "
                            "reference: the release's per-sample kernels)")
    model.add_argument("--pretrained-weights", "--pretrained-from-file", dest="pretrained_weights", default=None,
                       metavar="PATH", help="initial weights: a state_dict, the release's or this project's checkpoint")
    model.add_argument("--memory-format", default="nchw", choices=choices.MEMORY_FORMATS,
                       help="memory layout (nhwc: channels_last)")
    # NVIDIA's model parser (image_classification/models/resnet.py, model.py)
    model.add_argument("--conv_init", default=None, choices=["fan_in", "fan_out"],
                       help="Kaiming mode of the convs, replacing -c's (NVIDIA's default: fan_in)")
    model.add_argument("--last_bn_0_init", dest="zero_init_last_bn", type=_true_or_false, default=argparse.SUPPRESS,
                       metavar="True|False", help="NVIDIA's spelling of --zero-init-last-bn")
    model.add_argument("--pretrained", action="store_true",
                       help="NVIDIA's NGC download: not possible here; use --pretrained-from-file")
    model.add_argument("--trt", default=None, metavar="True|False", help="NVIDIA's SE-layer option: not applicable")
    model.add_argument("--fused_se", default=None, metavar="True|False",
                       help="NVIDIA's SE-layer option: not applicable")

    optim = parser.add_argument_group("optimization")
    optim.add_argument("--epochs", type=int, default=90, help="epochs of the whole schedule")
    optim.add_argument("--run-epochs", type=int, default=-1, help="stop after this many epochs in this run (-1: all)")
    optim.add_argument("-b", "--batch-size", type=int, default=256, help="batch size per process")
    optim.add_argument("--optimizer-batch-size", type=int, default=-1,
                       help="global batch per optimizer step; accumulation = it / (world size x batch size); "
                            "-1: world size x batch size")
    optim.add_argument("--optimizer", default="sgd", choices=["sgd", "rmsprop"], help="optimizer")
    optim.add_argument("--lr", "--learning-rate", type=float, default=0.1, help="learning rate for the optimizer batch")
    optim.add_argument("--lr-schedule", default="step", choices=choices.LR_SCHEDULES,
                       help="per-epoch schedule after the warmup (step: x0.1 at epochs 30, 60, 80)")
    optim.add_argument("--end-lr", type=float, default=0.0, help="final learning rate of the cosine schedule")
    optim.add_argument("--warmup", type=int, default=0, help="warmup epochs (linear)")
    optim.add_argument("--momentum", "--mom", dest="momentum", type=float, default=0.9, help="SGD momentum")
    optim.add_argument("--weight-decay", "--wd", dest="weight_decay", type=float, default=1e-4, help="weight decay")
    optim.add_argument("--bn-weight-decay", action="store_true", help="also decay BatchNorm parameters and biases")
    optim.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
    optim.add_argument("--rmsprop-alpha", type=float, default=0.9, help="RMSprop smoothing constant")
    optim.add_argument("--rmsprop-eps", type=float, default=1e-3, help="RMSprop epsilon")
    optim.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing")
    optim.add_argument("--mixup", type=float, default=0.0, help="mixup Beta(alpha, alpha); 0: off")
    optim.add_argument("--infomax-weight", type=float, default=0.001, help="weight of PEDConv's info-max loss")
    optim.add_argument("--use-ema", type=float, default=None, metavar="DECAY",
                       help="keep and validate an exponential moving average of the weights (default: off)")

    run = parser.add_argument_group("run")
    run.add_argument("--amp", action="store_true",
                     help="mixed precision: float16 autocast with loss scaling on CUDA, bfloat16 autocast (no loss "
                          "scaling) on the CPU")
    run.add_argument("--static-loss-scale", type=float, default=1.0, metavar="S",
                     help="AMP on CUDA: the loss scale to start from (NVIDIA's default: 1). It halves on a step whose "
                          "gradients overflow (the step is skipped) and, without --dynamic-loss-scale, never grows. "
                          "NVIDIA's AMP recipes pass 128")
    run.add_argument("--dynamic-loss-scale", action="store_true",
                     help="AMP on CUDA: also grow the loss scale, x2 after every 100 steps without an overflow "
                          "(starting from --static-loss-scale)")
    run.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                     help="CUDA: TensorFloat-32 for float32 matrix products and convolutions (NVIDIA's recipe; "
                          "Ampere and newer GPUs); --no-tf32 keeps full float32 precision")
    run.add_argument("--optimizer-impl", default="torch", choices=["torch", "apex"],
                     help="CUDA: torch's fused SGD (with the loss-scale check inside the kernel, no host "
                          "synchronization), or NVIDIA apex's FusedSGD (SGD only) where apex is installed and "
                          "benchmarks/gpu_check.py measured it faster; on the CPU always torch's")
    run.add_argument("--device", default="auto", choices=choices.DEVICES,
                     help="auto: CUDA when present, else the CPU")
    run.add_argument("--seed", type=int, default=None, help="seed (each rank adds its rank) (default: none)")
    run.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower)")
    run.add_argument("--prof", type=int, default=-1, help="stop each phase after this many iterations (-1: never)")
    run.add_argument("--evaluate", action="store_true", help="only validate (writes no checkpoint)")
    run.add_argument("--training-only", action="store_true", help="skip validation")
    run.add_argument("--resume", default=None, metavar="PATH",
                     help="continue from this checkpoint (and continue its report)")
    run.add_argument("--workspace", default=None, metavar="DIR",
                     help="folder for the report, checkpoints and rank logs "
                          "(default: a new runs/<arch>-<date>-<time>/ per run)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the run whose checkpoints are in --workspace (they are removed first)")
    run.add_argument("--raport-file", default="experiment_raport.json",
                     help="DLLogger JSON report, in the workspace; an existing one is renamed after its start time")
    run.add_argument("--checkpoint-filename", default="checkpoint.pth.tar",
                     help="the latest checkpoint, rewritten after every epoch")
    run.add_argument("--no-checkpoints", dest="save_checkpoints", action="store_false", help="write no checkpoints")
    run.add_argument("--gather-checkpoints", type=int, default=0, metavar="N",
                     help="also keep the last N epochs' checkpoints as checkpoint_<epoch>.pth.tar (epochs from 0; "
                          "-1: all)")
    run.add_argument("-p", "--print-freq", type=int, default=10,
                     help="report (and, without a terminal, print) one line every N iterations")
    run.add_argument("--topk", type=int, default=5, help="k of the top-k accuracy")
    run.add_argument("--early-stopping-patience", type=int, default=-1, metavar="N",
                     help="stop after N epochs without a better validation top-1 (-1: never)")
    run.add_argument("--gpu-affinity", default="none", choices=AFFINITY_MODES,
                     help="pin each process to CPUs near its device, from the NUMA layout in /sys (NVIDIA's modes)")
    run.add_argument("--jit", default="no", choices=["no", "script"], help="script: run the model as TorchScript "
                     "(static models only)")
    run.add_argument("--compile", action="store_true", help="run the model through torch.compile")
    run.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


class UsageError(UserError):
    """A command line that cannot run; main() prints it as one line."""


def _given_dests(parser: argparse.ArgumentParser, argv, group_title: str) -> list:
    """The option strings of ``group_title``'s flags that ``argv`` gives (prefixes resolved as argparse does)."""
    group = next(g for g in parser._action_groups if g.title == group_title)
    probe = build_parser()
    for action in probe._actions:
        if action.dest in {a.dest for a in group._group_actions}:
            action.default = argparse.SUPPRESS
    given = vars(probe.parse_args(argv))
    return [next(s for s in a.option_strings if s.startswith("--")) for a in group._group_actions if a.dest in given]


def parse_args(argv=None) -> argparse.Namespace:
    """The command line; with no data folder and no data flag, the demo's settings (the flags given still apply).
    A data flag without a data folder is a UsageError."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.demo = args.data is None
    if args.demo:
        data_flags = _given_dests(parser, argv, DATA_GROUP)
        if data_flags:
            raise UsageError(f"{', '.join(data_flags)} given without a data folder: pass one (python main.py DIR ...;"
                             f" for --data-backend synthetic any name, e.g. 'synthetic'), or run the demo with "
                             f"'python main.py' and no data flag")
        parser.set_defaults(**DEMO_DEFAULTS)
        args = parser.parse_args(argv)
        args.demo = True
    # The demo's own workspace holds only the last demo: a re-run replaces it (a --resume continues it).
    args.replace_demo = args.demo and args.workspace == DEMO_DEFAULTS["workspace"] and not args.resume
    if args.workspace is None:
        from image_classification.workspace import default_workspace

        args.workspace = default_workspace(args.arch)
    return args


def _console():
    """On a terminal, log lines are written above the live progress bars instead of through them."""
    import contextlib

    from dataloading.progress import on_terminal

    if not on_terminal():
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()


def main(argv=None) -> int:
    """Exit status: 0 for a finished run (or evaluation), 130 / 143 for a run stopped by Ctrl-C / SIGTERM after
    saving its checkpoint, 2 for bad input."""
    try:
        args = parse_args(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return run_parsed(args)


def run_config(argv: Sequence[str] = (), **settings) -> RunConfig:
    """The engine's settings for a run in code (the benchmarks): main.py's defaults, ``settings`` (RunConfig field
    names: ``batch_size=64``) over them, then ``argv``'s flags over both (its first word is the data folder, as on
    the command line). A name that is no field is a TypeError; bad values are found by the run, as on the command
    line. ``image_classification.run(config)`` runs it."""
    parser = build_parser()
    parser.set_defaults(**settings)
    args = parser.parse_args(list(argv))
    args.demo = args.replace_demo = False
    if args.workspace is None:
        from image_classification.workspace import default_workspace

        args.workspace = default_workspace(args.arch)
    return RunConfig.from_args(args)


def run_parsed(args: argparse.Namespace) -> int:
    """Run parsed arguments (main.py's, or launch.py's recipe with the command line over it) through the engine,
    ``image_classification.run(RunConfig.from_args(args))``; the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    from image_classification.runner import run

    try:
        with _console():
            return run(RunConfig.from_args(args)).status
    except UserError as error:  # every specific bad-input error (DataError, CheckpointError...) derives from it
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    status = main()
    from image_classification.distributed import exit_with

    exit_with(status)  # a rank of several leaves without the interpreter's shutdown (see exit_process)
