"""The training engine: :func:`run` wires a :class:`RunConfig` into a run (data, model, optimizer, checkpoints,
report, then the epochs) and returns its :class:`RunResult`. ``args`` in the steps below is the run's RunConfig."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import signal
import warnings
from typing import List, Optional

import numpy as np
import torch
import torch.nn as nn

import choices
import pedconv
from errors import UserError

from . import affinity, atomic_files, checkpoints, distributed, workspace
from .allocator import configure_malloc
from .cuda_settings import set_tf32
from .dllog import Report, metric_names, run_summary
from .ema import EMA
from .losses import Mixup, SoftTargetCrossEntropy
from .engine import RunConfig, RunResult
from .model_summary import format_summary, summarize
from .models import build_model, check_arch, default_config, disable_info_max, get_config, set_pedconv_method
from .optim import build_optimizer, lr_schedule
from .training import GracefulStop, Precision, Trainer, steps_per_pass

logger = logging.getLogger(__name__)


def _check_number(flag: str, value, valid: bool, what: str) -> None:
    """A UserError unless ``value`` is a finite number for which ``valid`` holds (NaN fails every comparison)."""
    if value is None:
        return
    if not (math.isfinite(value) and valid):
        raise UserError(f"{flag} must be {what}, got {value}")


def _check_numbers(args) -> None:
    """Numbers that would otherwise fail late (an epoch in, in the optimizer) or silently train nothing."""
    _check_number("--lr", args.lr, args.lr > 0, "a positive number")
    _check_number("--momentum", args.momentum, 0 <= args.momentum < 1, "in [0, 1)")
    _check_number("--epochs", args.epochs, args.epochs >= 1, "at least 1")
    _check_number("--end-lr", args.end_lr, args.end_lr >= 0, "a non-negative number")
    _check_number("--weight-decay", args.weight_decay, args.weight_decay >= 0, "a non-negative number")
    _check_number("--label-smoothing", args.label_smoothing, 0 <= args.label_smoothing < 1, "in [0, 1)")
    _check_number("--mixup", args.mixup, args.mixup >= 0, "a non-negative number")
    _check_number("--infomax-weight", args.infomax_weight, args.infomax_weight >= 0, "a non-negative number")
    _check_number("--use-ema", args.use_ema, args.use_ema is None or 0 < args.use_ema < 1, "in (0, 1)")
    _check_number("--wmul", args.wmul, args.wmul > 0, "a positive number")
    _check_number("--num-classes", args.num_classes, args.num_classes is None or args.num_classes >= 1, "at least 1")


def _check_args(args, context: distributed.Context) -> int:
    """Validate the arguments; return the gradient accumulation steps."""
    check_arch(args.arch)
    if args.batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    _check_numbers(args)
    if args.evaluate and args.training_only:
        raise UserError("--evaluate and --training-only exclude each other")
    if args.evaluate and args.resume:
        logger.info("--evaluate with --resume: evaluating the resumed weights")
    if args.data is not None and args.data_backend not in choices.SYNTHETIC_BACKENDS and not os.path.isdir(args.data):
        raise UserError(f"data folder {args.data} does not exist")
    if args.optimizer_batch_size in (-1, 0):
        return 1
    per_step = context.world_size * args.batch_size
    if args.optimizer_batch_size % per_step:
        raise UserError(f"--optimizer-batch-size {args.optimizer_batch_size} is not a multiple of world size x batch "
                        f"size ({context.world_size} x {args.batch_size} = {per_step})")
    return args.optimizer_batch_size // per_step


def _check_nvidia_flags(args) -> None:
    """NVIDIA DLE's flags that cannot apply here: one-line errors saying why (and what to use instead)."""
    if args.pretrained:
        raise UserError("--pretrained downloads NVIDIA's weights from NGC, and nothing is downloaded at run time here: "
                        "download the file yourself and pass --pretrained-from-file PATH")
    for flag, value in (("--trt", args.trt), ("--fused_se", args.fused_se)):
        if value is not None:
            raise UserError(f"{flag}: not applicable to these models (it configures NVIDIA's squeeze-and-excitation "
                            "layers, which these ResNets do not have)")
    if args.jit == "script" and args.compile:
        raise UserError("--jit script and --compile exclude each other: give one")
    if args.early_stopping_patience > 0 and args.training_only:
        raise UserError("--early-stopping-patience needs validation (a better top-1): drop --training-only")


def _model_config(args):
    """-c/--model-config (or the default for the model), its conv init replaced by NVIDIA's --conv_init if given."""
    if args.conv_init is None:
        return args.model_config
    name = args.model_config or default_config(args.dynamic)
    config = get_config(name)
    if args.model_config and config.conv_mode != args.conv_init:
        raise UserError(f"-c {args.model_config} initializes convs {config.conv_mode}, --conv_init says "
                        f"{args.conv_init}: give one of them")
    return dataclasses.replace(config, conv_mode=args.conv_init)


def _seed(seed: Optional[int], rank: int, deterministic: bool) -> None:
    if seed is not None:
        torch.manual_seed(seed + rank)
        random.seed(seed + rank)
        np.random.seed(seed + rank)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.backends.cudnn.benchmark = True


def _loaders(args, context, memory_format):
    from dataloading import LoaderOptions, get_loaders

    return get_loaders(LoaderOptions(
        args.data_backend, args.data, args.batch_size, workers=args.workers, image_size=args.image_size,
        interpolation=args.interpolation, augmentation=args.augmentation, crop_area=(args.crop_area_min, 1.0),
        memory_format=memory_format,
        device=context.device, rank=context.rank, world_size=context.world_size,
        seed=args.seed if args.seed is not None else 0, prefetch=args.prefetch, verify_data=args.verify_data,
        train=not args.evaluate, val=not args.training_only,
        synthetic_batches=args.prof if args.prof > 0 else 100, num_classes=args.num_classes or 1000,
    ))


def _initial_weights(args) -> Optional[checkpoints.Checkpoint]:
    """The checkpoint given by --resume or --pretrained-weights, read once; it may say the model is PEDConv. Weights
    holding NaN or infinite values are refused (evaluating or training them gives nothing)."""
    path = args.resume or args.pretrained_weights
    if not path:
        return None
    checkpoint = checkpoints.load_checkpoint(path)
    checkpoints.check_finite(checkpoint.state_dict, path)
    if args.use_ema and checkpoint.state_dict_ema:
        checkpoints.check_finite(checkpoint.state_dict_ema, path, "EMA weights")
    if checkpoint.arch.get("dynamic") and not args.dynamic:
        logger.info("%s holds a PEDConv model: building %s with --dynamic", path, args.arch)
        args.dynamic = True
    wmul = checkpoint.arch.get("wmul")
    if wmul is not None and wmul != args.wmul:
        logger.info("%s holds a model of width multiplier %g: building it so", path, wmul)
        args.wmul = wmul
    return checkpoint


def _choose_preprocessing(args, checkpoint: Optional[checkpoints.Checkpoint]) -> None:
    """--image-size and --interpolation: as given, else (evaluating or resuming) what the checkpoint records, else
    the architecture's defaults (bilinear, 224; efficientnet-b4: 380, as NVIDIA's main.py); a flag that differs
    from the checkpoint's record is obeyed with a warning."""
    given = {"image_size": args.image_size, "interpolation": args.interpolation}
    if checkpoint is not None and (args.evaluate or args.resume):
        chosen = checkpoints.checkpoint_preprocessing(checkpoint, **given)
    else:
        defaults = checkpoints.default_preprocessing(args.arch)
        chosen = {name: defaults[name] if value is None else value for name, value in given.items()}
    args.image_size, args.interpolation = chosen["image_size"], chosen["interpolation"]


def _resumed_classes(args, checkpoint: Optional[checkpoints.Checkpoint]) -> Optional[int]:
    """A resumed or evaluated checkpoint keeps its classifier (NVIDIA's weights have 1000 classes whatever the
    data folder holds); weights to fine-tune take the data's class count unless --num-classes says otherwise."""
    if checkpoint is None or not (args.resume or args.evaluate):
        return None
    return checkpoint.arch.get("num_classes")


def _build_model(args, num_classes: int, checkpoint: Optional[checkpoints.Checkpoint]) -> nn.Module:
    """The model ``args`` describe, with ``num_classes`` classes; with a checkpoint, its weights loaded (a static
    checkpoint starts a PEDConv model, unless resumed) by :func:`checkpoints.model_from_checkpoint`."""
    options = {"config": _model_config(args), "zero_init_last_bn": args.zero_init_last_bn}
    try:
        if checkpoint is None:
            model = build_model(args.arch, args.dynamic, num_classes, args.wmul, **options)
        else:
            model = checkpoints.model_from_checkpoint(checkpoint, args.arch, dynamic=args.dynamic,
                                                      num_classes=num_classes, wmul=args.wmul,
                                                      from_static=not args.resume, **options)
    except UserError:
        raise
    except ValueError as error:  # pedconv's own argument checks (it stays independent: plain ValueErrors)
        raise UserError(str(error)) from None
    if args.dynamic:
        set_pedconv_method(model, args.pedconv_method)
    return model


def _preprocessing(args) -> dict:
    """How the checkpoint's model saw its images, for classify.py, export_onnx.py and evaluation."""
    from dataloading import IMAGENET_MEAN_255, IMAGENET_STD_255

    return {"image_size": args.image_size, "interpolation": args.interpolation,
            "mean": [float(v) for v in IMAGENET_MEAN_255], "std": [float(v) for v in IMAGENET_STD_255],
            "resize": "shorter side to image_size + 32, centre crop"}


def _forward_module(args, model: nn.Module) -> nn.Module:
    """The module that runs the forward passes: ``model`` itself, or (``--jit script``) its TorchScript version,
    which shares its parameters, so checkpoints and EMA keep reading ``model``."""
    if args.jit != "script":
        return model
    if args.dynamic:
        raise UserError("--jit script: PEDConv layers do not compile with TorchScript (their gates and fast paths "
                        "are Python); use --compile (torch.compile) or leave --jit out")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated", category=FutureWarning)
            scripted = torch.jit.script(model)
    except Exception as error:  # TorchScript raises many types for code it cannot compile
        raise UserError(f"--jit script: {args.arch} does not compile with TorchScript ("
                        f"{str(error).strip().splitlines()[0][:200]})") from None
    logger.info("--jit script: the model runs as TorchScript (which PyTorch deprecates; --compile is its successor)")
    return scripted


def _save(session: "_Session", epoch: int, is_best: bool, *, numbered: bool = True) -> None:
    """Write the checkpoints of ``epoch`` epochs done: NVIDIA's ``checkpoint_<epoch-1:04>.pth.tar`` (kept for the last
    ``--gather-checkpoints`` epochs), ``--checkpoint-filename`` and, on a new best top-1, ``model_best.pth.tar``."""
    args, trainer, ema, classes = session.args, session.trainer, session.ema, session.loaders.classes
    if not (args.save_checkpoints and session.context.is_main) or args.evaluate:
        return
    state = checkpoints.make_checkpoint(trainer.inner_model, epoch, trainer.optimizer, trainer.precision.scaler,
                                        session.best_top1, ema.module if ema is not None else None,
                                        checkpoints.capture_rng())
    if classes:
        state["classes"] = list(classes)  # class names in label order, for classify.py
    state["preprocessing"] = _preprocessing(args)
    path = os.path.join(args.workspace, args.checkpoint_filename)
    # The checkpoint is written last: a resumed run takes the best top-1 from it, so every best it records must
    # already have its model_best on disk (a kill between the two writes repeats the epoch, and with it the best).
    targets = [os.path.join(args.workspace, workspace.BEST_NAME)] if is_best else []
    if numbered and args.gather_checkpoints != 0:
        targets.append(os.path.join(args.workspace, workspace.numbered_name(epoch - 1)))
    for target in targets + [path]:
        try:
            checkpoints.save_checkpoint(state, target)
        except OSError as error:  # a full disk, a read-only or vanished folder: the previous file is kept
            raise UserError(f"cannot save checkpoint {target}: {error.strerror or error}") from None
    if numbered and args.gather_checkpoints != 0:
        workspace.keep_last(args.workspace, args.gather_checkpoints)
    logger.info("checkpoint saved: %s%s", path, " (new best)" if is_best else "")


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _banner(args, rank: int, world_size: int) -> None:
    """The run's first lines (rank 0), before any process group or data work; caps --workers at the usable cores."""
    cores = _usable_cores()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    on_cuda = args.device == "cuda" or (args.device == "auto" and gpus > 0)
    if world_size > 1 and not on_cuda and rank == 0:
        logger.info("no GPU on this machine: running %d CPU processes (gloo)%s", world_size,
                    "" if args.device == "cpu" else "; pass --device cpu to say so")
    if args.workers > cores:
        if rank == 0:
            logger.info("-j/--workers %d lowered to %d, the cores this process may use", args.workers, cores)
        args.workers = cores
    if rank != 0:
        return
    devices = f"{min(world_size, gpus) if world_size > 1 else 1} x cuda ({gpus} visible)" if on_cuda else "cpu"
    precision = ("amp (float16)" if on_cuda else "amp (bfloat16)") if args.amp else "fp32"
    data = "scikit-learn digits (demo)" if args.demo else args.data
    logger.info("run: %s%s x%g | device %s | precision %s | data %s via %s, %d workers | world size %d | "
                "workspace %s", args.arch, " PEDConv" if args.dynamic else "", args.wmul, devices, precision, data,
                args.data_backend, args.workers, world_size, os.path.abspath(args.workspace))


def _prepare_workspace(args, context) -> None:
    """Refuse a workspace that holds a finished run's checkpoints unless --resume or --overwrite; with --overwrite
    (and for the demo) remove them first; only rank 0 removes anything (the folder is made by _check_outputs)."""
    if os.path.exists(args.workspace) and not os.path.isdir(args.workspace):
        raise UserError(f"--workspace {args.workspace} is a file, not a folder")
    if args.replace_demo:
        args.overwrite = True
    old = workspace.check_workspace(args.workspace, args.checkpoint_filename, resume=bool(args.resume),
                                    overwrite=args.overwrite,
                                    writes_checkpoints=args.save_checkpoints and not args.evaluate)
    if not context.is_main:
        return
    if args.replace_demo and old:
        logger.info("replacing the previous demo run in %s", args.workspace)
    elif old:
        logger.info("--overwrite: removing the previous run's checkpoints in %s (%d files)", args.workspace, len(old))
    for path in old:
        os.remove(path)
    if args.replace_demo and args.raport_file and os.path.exists(os.path.join(args.workspace, args.raport_file)):
        os.remove(os.path.join(args.workspace, args.raport_file))


def run(config: RunConfig) -> RunResult:
    """Train or evaluate as ``config`` says (``image_classification.run``); what the run gave (its ``status``: 0, or
    128 + the signal for a run stopped by one). Bad input raises a :class:`errors.UserError` naming it.

    ``config`` itself is left as it is: the run adjusts a copy (the checkpoint's architecture, the image size, the
    usable cores...), returned as ``RunResult.config``. On every way out (success, error, SIGTERM/SIGINT) the
    loaders' workers and pipelines are stopped first, then the ranks meet (after a success only: a failed rank would
    never arrive) and leave the process group."""
    args = dataclasses.replace(config)
    _banner(args, int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))
    context = distributed.init_from_environment(args.device)
    finished = False
    try:
        with contextlib.ExitStack() as closing:
            result = _run(args, context, closing)
        finished = True
        return result
    finally:
        distributed.shutdown(context, wait_for_all=finished)


def _check_outputs(args, context: distributed.Context, report_path: Optional[str]) -> None:
    """Create the workspace and check, before any work, that the report and the checkpoints can be written there
    (their folders, names and temporary names); remove temporary files left there by a killed save."""
    folder = args.workspace
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the workspace {folder}: {error.strerror or error}") from None
    if not context.is_main:
        return
    outputs = [("report", report_path)] if report_path else []
    if args.save_checkpoints and not args.evaluate:
        outputs.append(("checkpoint", os.path.join(folder, args.checkpoint_filename)))
    for what, path in outputs:
        try:
            atomic_files.check_writable(path)
        except OSError as error:
            raise UserError(f"cannot write the {what} {path}: {error.strerror or error}") from None
    folders = dict.fromkeys(os.path.dirname(os.path.abspath(path)) for _, path in outputs)
    for place in dict.fromkeys([os.path.abspath(folder), *folders]):
        removed = atomic_files.remove_stale_temporaries(place)
        if removed:
            logger.info("removed %d temporary file(s) left by an interrupted save: %s", len(removed),
                        ", ".join(removed))


@dataclasses.dataclass
class _Session:
    """What the steps of one run share once it is set up."""

    args: RunConfig
    context: distributed.Context
    loaders: object  # dataloading.Loaders
    report: Report
    report_path: Optional[str]
    trainer: Trainer
    ema: Optional[EMA]
    checkpoint: Optional[checkpoints.Checkpoint]
    accumulation: int
    keys: List[str]  # every metric of an epoch line and of the run summary
    start_epoch: int = 0
    best_top1: Optional[float] = None


def _run(args, context: distributed.Context, closing: contextlib.ExitStack) -> RunResult:
    accumulation = _check_args(args, context)
    report_path = os.path.join(args.workspace, args.raport_file) if args.raport_file else None
    _prepare_workspace(args, context)
    _check_outputs(args, context, report_path)
    _prepare_process(args, context)
    from dataloading.options import MEMORY_FORMATS

    memory_format = MEMORY_FORMATS[args.memory_format]

    checkpoint = _initial_weights(args)
    _choose_preprocessing(args, checkpoint)
    loaders = _loaders(args, context, memory_format)
    closing.callback(loaders.close)
    num_classes = _num_classes(args, loaders.classes, checkpoint)
    model = _build_model(args, num_classes, checkpoint)
    model_summary = summarize(model, args.image_size)  # on the CPU, before the model moves
    model = model.to(context.device, memory_format=memory_format)
    report = _open_report(args, context, report_path, model_summary)
    session = _session(args, context, loaders, report, report_path, checkpoint, accumulation, model, num_classes,
                       memory_format)
    logger.info("%s; %d process(es) on %s; batch %d x %d, accumulation %d",
                format_summary(model_summary, f"{args.arch}{' (PEDConv)' if args.dynamic else ''} x{args.wmul:g}"),
                context.world_size, context.device, args.batch_size, context.world_size, accumulation)
    return _evaluate(session) if args.evaluate else _train(session)


def _prepare_process(args, context: distributed.Context) -> None:
    """The demo's data, NVIDIA's inapplicable flags, CPU affinity, the allocator or TF32, the seeds."""
    if args.demo:
        from .demo import prepare_digits

        args.data = prepare_digits()
        logger.info("demo: PEDConv ResNet-18 (wmul %.2f) on scikit-learn's digits at %s", args.wmul, args.data)
    _check_nvidia_flags(args)
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", context.world_size))
    affinity.set_affinity(args.gpu_affinity, context.local_rank, local_world_size, context.device)
    if context.device.type == "cpu":
        logger.info("malloc: %s", configure_malloc())
    else:
        set_tf32(args.tf32)
        logger.info("TF32 for float32 matrix products and convolutions: %s", "on" if args.tf32 else "off")
    _seed(args.seed, context.rank, args.deterministic)


def _num_classes(args, classes, checkpoint: Optional[checkpoints.Checkpoint]) -> int:
    """--num-classes (at least the data's class folders), else a resumed or evaluated checkpoint's, else the data's
    (1000 for synthetic data)."""
    if args.num_classes and classes and args.num_classes < len(classes):
        raise UserError(f"--num-classes {args.num_classes} is less than the {len(classes)} class folders in "
                        f"{args.data} (labels would reach {len(classes) - 1})")
    return args.num_classes or _resumed_classes(args, checkpoint) or (len(classes) if classes else 1000)


def _open_report(args, context: distributed.Context, report_path: Optional[str], model_summary) -> Report:
    """The DLLogger report (rank 0 writes it), its PARAMETER line written: the settings and the model's figures."""
    try:
        report = Report(report_path if context.is_main else None, args.print_freq, resume=bool(args.resume),
                        bars=context.is_main)
    except OSError as error:
        raise UserError(f"cannot write the report {report_path}: {error.strerror or error}") from None
    report.parameters({**args.parameters(), "model.params": model_summary.params,
                       "model.params_without_decoders": model_summary.params_without_decoders,
                       "model.macs": model_summary.macs, "model.pedconv_layers": model_summary.dynamic_layers})
    return report


def _session(args, context, loaders, report, report_path, checkpoint, accumulation, model, num_classes,
             memory_format) -> _Session:
    """Precision, optimizer, EMA, the resumed state and the trainer around ``model``."""
    precision = Precision.create(args.amp, context.device, args.static_loss_scale, args.dynamic_loss_scale)
    optimizer = build_optimizer(model, args.optimizer, args.lr, args.momentum, args.weight_decay, args.nesterov,
                                args.bn_weight_decay, args.rmsprop_alpha, args.rmsprop_eps,
                                device_type=context.device.type, implementation=args.optimizer_impl)
    if precision.scaler.is_enabled() and args.static_loss_scale == 1.0 and not args.dynamic_loss_scale:
        logger.warning("AMP: the loss scale starts at 1 and never grows (NVIDIA's default); NVIDIA's AMP recipes "
                       "pass --static-loss-scale 128, or add --dynamic-loss-scale")
    if args.dynamic and not args.infomax_weight:
        # After the optimizer is built, so that its parameter groups (and a resumed optimizer state) stay the same
        # whatever the weight; the frozen decoders simply get no gradient.
        disable_info_max(model)
    ema = EMA(model, args.use_ema) if args.use_ema else None

    start_epoch, best_top1 = 0, None
    if args.resume:
        start_epoch, best_top1 = _restore(checkpoint, model, optimizer, precision, ema, context)
        if ema is not None:
            ema.step = start_epoch * max(len(loaders.train) // accumulation, 1) if loaders.train else 0

    wrapped = _forward_module(args, model)
    if context.distributed:
        device_ids = [context.device.index] if context.device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(wrapped, device_ids=device_ids)
    if args.compile:
        # Compiles at the first step; checkpoints read the model inside.
        wrapped = torch.compile(wrapped, options=pedconv.inductor_options(model))
    mixup = Mixup(args.mixup, num_classes, args.label_smoothing) if args.mixup > 0 else None
    # val.loss as NVIDIA's: the training criterion on the hard labels, except with mixup (plain cross-entropy there)
    val_criterion = SoftTargetCrossEntropy(args.label_smoothing) if args.mixup <= 0 and args.label_smoothing else None
    trainer = Trainer(wrapped, SoftTargetCrossEntropy(args.label_smoothing), optimizer, precision, context, report,
                      accumulation=accumulation, infomax_weight=args.infomax_weight if args.dynamic else 0.0,
                      mixup=mixup, ema=ema, memory_format=memory_format, prof=args.prof, topk=args.topk,
                      inner_model=model, val_criterion=val_criterion)
    keys = metric_names(["val"] + (["val_ema"] if ema is not None else []))
    return _Session(args, context, loaders, report, report_path, trainer, ema, checkpoint, accumulation, keys,
                    start_epoch, best_top1)


def _validate(session: _Session, epoch: int) -> dict:
    """Validation metrics of ``epoch`` (and of the EMA weights, when kept)."""
    loaders, report, trainer, prof = session.loaders, session.report, session.trainer, session.args.prof
    results = trainer.validate(report.track(loaders.val, steps_per_pass(loaders.val, prof), f"val {epoch}"), epoch)
    if session.ema is not None:
        results.update(trainer.validate(report.track(loaders.val, steps_per_pass(loaders.val, prof),
                                                     f"val EMA {epoch}"), epoch, session.ema.module, "val_ema"))
    return results


def _evaluate(session: _Session) -> RunResult:
    """--evaluate: one validation pass, logged as epoch ``start_epoch`` and as the run summary."""
    ema, checkpoint, report = session.ema, session.checkpoint, session.report
    if ema is not None and checkpoint is not None and checkpoint.state_dict_ema:
        ema.module.load_state_dict(checkpoint.state_dict_ema)
    results = {**dict.fromkeys(session.keys), **_validate(session, session.start_epoch)}
    report.log([session.start_epoch], results)
    report.log([], run_summary([results], session.keys))
    report.close()
    logger.info("evaluation done: top-1 %.2f %%, top-5 %.2f %% on %d images; report: %s",
                results["val.top1"], results["val.top5"], results["val.images"], session.report_path)
    return _result(session, 0, results["val.top1"])


def _train(session: _Session) -> RunResult:
    """The epochs from ``start_epoch``: train, validate, log, save; early stopping; a signal saves and stops."""
    args, context, loaders, report, trainer = (session.args, session.context, session.loaders, session.report,
                                               session.trainer)
    schedule = lr_schedule(args.lr_schedule, args.lr, args.warmup, args.epochs, args.end_lr)
    last_epoch = args.epochs if args.run_epochs < 0 else min(args.epochs, session.start_epoch + args.run_epochs)
    history = []
    epochs_without_better_top1 = 0
    with GracefulStop() as stop:
        trainer.stop = stop
        for epoch in range(session.start_epoch, last_epoch):
            loaders.train.set_epoch(epoch)
            train_loader = report.track(loaders.train, steps_per_pass(loaders.train, args.prof), f"epoch {epoch}")
            train_results = trainer.train_epoch(train_loader, epoch, schedule(epoch))
            if stop.requested:
                return _stopped(session, epoch, stop.signum)
            if epoch == session.start_epoch and args.dynamic:
                logger.debug("%s", pedconv.autotune_report())
            epoch_results, is_best = _finish_epoch(session, epoch, train_results)
            history.append(epoch_results)
            epochs_without_better_top1 = 0 if is_best else epochs_without_better_top1 + 1
            if 0 < args.early_stopping_patience <= epochs_without_better_top1 and epoch + 1 < last_epoch:
                logger.info("early stopping after epoch %d: no better top-1 in %d epochs (--early-stopping-patience)",
                            epoch + 1, epochs_without_better_top1)
                break
    report.log([], run_summary(history, session.keys))
    report.close()
    if context.is_main:
        logger.info("done: best top-1 %s; report: %s; checkpoints in %s",
                    "n/a" if session.best_top1 is None else f"{session.best_top1:.2f} %", session.report_path,
                    os.path.abspath(args.workspace))
    return _result(session, 0, session.best_top1)


def _finish_epoch(session: _Session, epoch: int, train_results: dict):
    """Validate a trained epoch (unless --training-only), log its line, save its checkpoints; (its metrics, whether
    its top-1 is the best so far)."""
    args = session.args
    epoch_results = {**dict.fromkeys(session.keys), **train_results}
    is_best = False
    if not args.training_only:
        val_results = _validate(session, epoch)
        epoch_results.update(val_results)
        is_best = session.best_top1 is None or val_results["val.top1"] > session.best_top1
        session.best_top1 = val_results["val.top1"] if is_best else session.best_top1
    session.report.log([epoch], epoch_results)
    _save(session, epoch + 1, is_best)
    return epoch_results, is_best


def _stopped(session: _Session, epoch: int, signum: Optional[int]) -> RunResult:
    """A signal stopped ``epoch``: save where it is (not as a numbered epoch), close the report; exit 128 + signal."""
    args = session.args
    _save(session, epoch, False, numbered=False)
    session.report.close()
    status = 128 + (signum or signal.SIGTERM)
    logger.info("stopped during epoch %d (exit status %d); resume with --resume %s", epoch, status,
                os.path.join(args.workspace, args.checkpoint_filename))
    return _result(session, status, session.best_top1)


def _result(session: _Session, status: int, best_top1: Optional[float]) -> RunResult:
    args, report = session.args, session.report
    summary = dict(report.summary)
    throughput = summary.get("val.total_ips" if args.evaluate else "train.total_ips")
    writes = args.save_checkpoints and not args.evaluate and session.context.is_main
    return RunResult(status=status, best_top1=best_top1, epochs=dict(report.epochs), summary=summary,
                     throughput=throughput, report=session.report_path if session.context.is_main else None,
                     checkpoints=workspace.run_checkpoints(args.workspace, args.checkpoint_filename) if writes else [],
                     workspace=args.workspace, config=args)


def _restore(checkpoint, model, optimizer, precision, ema, context):
    if checkpoint.optimizer is None and checkpoint.epoch is None:
        raise UserError(f"{checkpoint.path} has no optimizer state: not a training checkpoint (use --pretrained-weights)")
    if checkpoint.optimizer is None:
        logger.info("%s holds no optimizer state: the optimizer starts afresh", checkpoint.path)
    elif checkpoint.format == "pedconv":
        optimizer.load_state_dict(checkpoint.optimizer)
    else:  # NVIDIA's or the release's: their own parameter groups and numbering
        kept = checkpoints.load_foreign_optimizer_state(optimizer, model, checkpoint)
        total = sum(len(group["params"]) for group in optimizer.param_groups)
        logger.info("%s: optimizer state of %d of %d parameters kept (matched by NVIDIA's parameter order)",
                    checkpoint.path, kept, total)
    if checkpoint.scaler and precision.scaler.is_enabled():
        precision.scaler.load_state_dict(checkpoint.scaler)
    if ema is not None and checkpoint.state_dict_ema:
        ema.module.load_state_dict(checkpoint.state_dict_ema)
    if checkpoint.rng and context.rank == 0:
        # The checkpoint holds rank 0's generators: a one-process run resumes exactly; other ranks keep seed + rank.
        checkpoints.restore_rng(checkpoint.rng)
    epoch = int(checkpoint.epoch or 0)
    logger.info("resumed from %s at epoch %d", checkpoint.path, epoch)
    return epoch, checkpoint.best_prec1
