"""Wires a parsed command line into a run: data, model, optimizer, checkpoints, report, then the epochs."""
from __future__ import annotations

import contextlib
import glob
import logging
import os
import random
import re
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

import pedconv

from . import checkpoints, distributed
from .allocator import configure_malloc
from .dllog import Report
from .ema import EMA
from .losses import Mixup, SoftTargetCrossEntropy
from .models import ARCHITECTURES, build_model, set_pedconv_method
from .optim import build_optimizer, lr_schedule
from .summary import format_summary, summarize
from .training import GracefulStop, Precision, Trainer

logger = logging.getLogger(__name__)


class UserError(Exception):
    """Bad input (arguments, data, checkpoints): main.py prints the one-line message and exits non-zero."""


def _check_args(args, context: distributed.Context) -> int:
    """Validate the arguments; return the gradient accumulation steps."""
    if args.arch not in ARCHITECTURES:
        raise UserError(f"unknown architecture {args.arch!r}; valid: {', '.join(ARCHITECTURES)}")
    if args.batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    if args.evaluate and args.training_only:
        raise UserError("--evaluate and --training-only exclude each other")
    if args.evaluate and args.resume:
        logger.info("--evaluate with --resume: evaluating the resumed weights")
    if args.data is not None and args.data_backend not in ("synthetic", "syntetic") and not os.path.isdir(args.data):
        raise UserError(f"data folder {args.data} does not exist")
    if args.optimizer_batch_size in (-1, 0):
        return 1
    per_step = context.world_size * args.batch_size
    if args.optimizer_batch_size % per_step:
        raise UserError(f"--optimizer-batch-size {args.optimizer_batch_size} is not a multiple of world size x batch "
                        f"size ({context.world_size} x {args.batch_size} = {per_step})")
    return args.optimizer_batch_size // per_step


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
    from dataloading import DataError, get_loaders

    try:
        return get_loaders(
            args.data_backend, args.data, args.batch_size, workers=args.workers, image_size=args.image_size,
            interpolation=args.interpolation, augmentation=args.augmentation, crop_area=(args.crop_area_min, 1.0),
            memory_format=memory_format,
            device=context.device, rank=context.rank, world_size=context.world_size,
            seed=args.seed if args.seed is not None else 0, prefetch=args.prefetch, verify_data=args.verify_data,
            train=not args.evaluate, val=not args.training_only,
            synthetic_batches=args.prof if args.prof > 0 else 100, num_classes=args.num_classes or 1000,
        )
    except DataError as error:
        raise UserError(str(error)) from None


def _initial_weights(args) -> Optional[checkpoints.Checkpoint]:
    """The checkpoint given by --resume or --pretrained-weights, read once; it may say the model is PEDConv."""
    path = args.resume or args.pretrained_weights
    if not path:
        return None
    try:
        checkpoint = checkpoints.load_checkpoint(path)
    except checkpoints.CheckpointError as error:
        raise UserError(str(error)) from None
    if checkpoint.arch.get("dynamic") and not args.dynamic:
        logger.info("%s holds a PEDConv model: building %s with --dynamic", path, args.arch)
        args.dynamic = True
    wmul = checkpoint.arch.get("wmul")
    if wmul is not None and wmul != args.wmul:
        logger.info("%s holds a model of width multiplier %g: building it so", path, wmul)
        args.wmul = wmul
    return checkpoint


def _build_model(args, num_classes: int, checkpoint: Optional[checkpoints.Checkpoint]) -> nn.Module:
    try:
        model = build_model(args.arch, args.dynamic, num_classes, args.wmul, config=args.model_config,
                            zero_init_last_bn=args.zero_init_last_bn)
    except ValueError as error:
        raise UserError(str(error)) from None
    if args.dynamic:
        set_pedconv_method(model, args.pedconv_method)
    if checkpoint is not None:
        try:
            checkpoints.load_model_state(model, checkpoint.state_dict)
        except checkpoints.CheckpointError as error:
            raise UserError(f"{checkpoint.path} does not fit {args.arch}"
                            f"{' (PEDConv)' if args.dynamic else ''}: {error}") from None
    return model


def _save(args, context, trainer: Trainer, epoch: int, best_top1: Optional[float], is_best: bool, ema,
          classes=None) -> None:
    if not (args.save_checkpoints and context.is_main) or args.evaluate:
        return
    state = checkpoints.make_checkpoint(trainer.model, epoch, trainer.optimizer, trainer.precision.scaler, best_top1,
                                        ema.module if ema is not None else None, checkpoints.capture_rng())
    if classes:
        state["classes"] = list(classes)  # class names in label order, for classify.py
    path = os.path.join(args.workspace, args.checkpoint_filename)
    checkpoints.save_checkpoint(state, path)
    if is_best:
        checkpoints.save_checkpoint(state, os.path.join(args.workspace, "model_best.pth.tar"))
    if args.gather_checkpoints > 0:
        checkpoints.save_checkpoint(state, os.path.join(args.workspace, f"checkpoint-{epoch}.pth.tar"))
        numbered = sorted(glob.glob(os.path.join(args.workspace, "checkpoint-*.pth.tar")),
                          key=lambda p: int(re.search(r"checkpoint-(\d+)", p).group(1)))
        for old in numbered[: -args.gather_checkpoints]:
            os.remove(old)
    logger.info("checkpoint saved: %s%s", path, " (new best)" if is_best else "")


def run(args) -> int:
    """Run the command line's job; on every way out (success, error, SIGTERM/SIGINT) the loaders' workers and
    pipelines are stopped first, then the ranks meet (after a success only: a failed rank would never arrive) and
    leave the process group."""
    try:
        context = distributed.init_from_environment(args.device)
    except ValueError as error:
        raise UserError(str(error)) from None
    finished = False
    try:
        with contextlib.ExitStack() as closing:
            status = _run(args, context, closing)
        finished = True
        return status
    finally:
        distributed.shutdown(context, wait_for_all=finished)


def _run(args, context: distributed.Context, closing: contextlib.ExitStack) -> int:
    if args.demo:
        from .demo import prepare_digits

        args.data = prepare_digits()
        logger.info("demo: PEDConv ResNet-18 (wmul %.2f) on scikit-learn's digits at %s", args.wmul, args.data)
    accumulation = _check_args(args, context)
    if context.device.type == "cpu":
        logger.info("malloc: %s", configure_malloc())
    _seed(args.seed, context.rank, args.deterministic)
    os.makedirs(args.workspace, exist_ok=True)
    memory_format = torch.channels_last if args.memory_format == "nhwc" else torch.contiguous_format

    checkpoint = _initial_weights(args)
    loaders = _loaders(args, context, memory_format)
    closing.callback(loaders.close)
    num_classes = args.num_classes or (len(loaders.classes) if loaders.classes else 1000)
    model = _build_model(args, num_classes, checkpoint)
    summary = summarize(model, args.image_size)  # on the CPU, before the model moves
    model = model.to(context.device, memory_format=memory_format)

    report_path = os.path.join(args.workspace, args.raport_file) if args.raport_file else None
    report = Report(report_path if context.is_main else None, args.print_freq)
    report.parameters({**vars(args), "model.params": summary.params,
                       "model.params_without_decoders": summary.params_without_decoders,
                       "model.macs": summary.macs, "model.pedconv_layers": summary.dynamic_layers})
    precision = Precision.create(args.amp, context.device, args.static_loss_scale, args.dynamic_loss_scale)
    optimizer = build_optimizer(model, args.optimizer, args.lr, args.momentum, args.weight_decay, args.nesterov,
                                args.bn_weight_decay, args.rmsprop_alpha, args.rmsprop_eps)
    ema = EMA(model, args.use_ema) if args.use_ema else None

    start_epoch, best_top1 = 0, None
    if args.resume:
        start_epoch, best_top1 = _restore(checkpoint, optimizer, precision, ema, context)
        if ema is not None:
            ema.step = start_epoch * max(len(loaders.train) // accumulation, 1) if loaders.train else 0

    wrapped = model
    if context.distributed:
        device_ids = [context.device.index] if context.device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    mixup = Mixup(args.mixup, num_classes, args.label_smoothing) if args.mixup > 0 else None
    trainer = Trainer(wrapped, SoftTargetCrossEntropy(args.label_smoothing), optimizer, precision, context, report,
                      accumulation=accumulation, infomax_weight=args.infomax_weight if args.dynamic else 0.0,
                      mixup=mixup, ema=ema, memory_format=memory_format, prof=args.prof, topk=args.topk,
                      inner_model=model)
    logger.info("%s; %d process(es) on %s; batch %d x %d, accumulation %d",
                format_summary(summary, f"{args.arch}{' (PEDConv)' if args.dynamic else ''} x{args.wmul:g}"),
                context.world_size, context.device, args.batch_size, context.world_size, accumulation)

    if args.evaluate:
        results = trainer.validate(loaders.val, start_epoch)
        if ema is not None and checkpoint is not None and checkpoint.state_dict_ema:
            ema.module.load_state_dict(checkpoint.state_dict_ema)
            results.update(trainer.validate(loaders.val, start_epoch, ema.module, "val_ema"))
        report.log([start_epoch + 1], results)
        report.log([], _summary([results], []))
        report.close()
        logger.info("evaluation done: top-1 %.2f %%, top-5 %.2f %% on %d images; report: %s",
                    results["val.top1"], results["val.top5"], results["val.images"], report_path)
        return 0

    schedule = lr_schedule(args.lr_schedule, args.lr, args.warmup, args.epochs, args.end_lr)
    last_epoch = args.epochs if args.run_epochs < 0 else min(args.epochs, start_epoch + args.run_epochs)
    val_history, train_history = [], []
    with GracefulStop() as stop:
        trainer.stop = stop
        for epoch in range(start_epoch, last_epoch):
            loaders.train.set_epoch(epoch)
            train_results = trainer.train_epoch(loaders.train, epoch, schedule(epoch))
            if stop.requested:
                _save(args, context, trainer, epoch, best_top1, False, ema, loaders.classes)
                report.close()
                logger.info("stopped during epoch %d; resume with --resume %s", epoch + 1,
                            os.path.join(args.workspace, args.checkpoint_filename))
                return 0
            if epoch == start_epoch and args.dynamic:
                logger.debug("%s", pedconv.autotune_report())
            epoch_results = dict(train_results)
            train_history.append(train_results)
            is_best = False
            if not args.training_only:
                val_results = trainer.validate(loaders.val, epoch)
                if ema is not None:
                    val_results.update(trainer.validate(loaders.val, epoch, ema.module, "val_ema"))
                val_history.append(val_results)
                epoch_results.update(val_results)
                is_best = best_top1 is None or val_results["val.top1"] > best_top1
                best_top1 = val_results["val.top1"] if is_best else best_top1
            report.log([epoch + 1], epoch_results)
            _save(args, context, trainer, epoch + 1, best_top1, is_best, ema, loaders.classes)
    report.log([], _summary(val_history, train_history))
    report.close()
    if context.is_main:
        logger.info("done: best top-1 %s; report: %s; checkpoints in %s",
                    "n/a" if best_top1 is None else f"{best_top1:.2f} %", report_path, os.path.abspath(args.workspace))
    return 0


def _restore(checkpoint, optimizer, precision, ema, context):
    if checkpoint.optimizer is None:
        raise UserError(f"{checkpoint.path} has no optimizer state: not a training checkpoint (use --pretrained-weights)")
    optimizer.load_state_dict(checkpoint.optimizer)
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


def _summary(val_history, train_history) -> dict:
    """The run summary: best top-1 (and its top-5), lowest losses, mean throughput, last learning rate."""
    summary = {}
    if val_history:
        best = max(val_history, key=lambda r: r["val.top1"])
        summary.update({"val.top1": best["val.top1"], "val.top5": best["val.top5"],
                        "val.loss": min(r["val.loss"] for r in val_history)})
        for name in ("val.compute_ips", "val.total_ips", "val.compute_latency"):
            values = [r[name] for r in val_history if name in r]
            if values:
                summary[name] = sum(values) / len(values)
        if "val_ema.top1" in val_history[0]:
            summary["val_ema.top1"] = max(r["val_ema.top1"] for r in val_history)
    if train_history:
        summary["train.loss"] = min(r["train.loss"] for r in train_history if "train.loss" in r)
        for name in ("train.compute_ips", "train.total_ips"):
            summary[name] = sum(r[name] for r in train_history) / len(train_history)
        summary["train.lr"] = train_history[-1]["train.lr"]
    return summary
