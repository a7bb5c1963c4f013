"""The training and validation loops: AMP, gradient accumulation, DDP, mixup, info-max, EMA, metrics."""
from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn as nn

import pedconv
from errors import UserError

from .distributed import Context, all_reduce_sum
from .dllog import Report
from .ema import EMA
from .losses import Mixup
from .optim import set_lr

logger = logging.getLogger(__name__)


class GracefulStop:
    """Turns the first SIGTERM or SIGINT into a flag that the loop reads at its next logging step (every
    ``--print-freq`` steps, where the ranks agree on it; then it saves and exits); a second SIGINT interrupts at
    once."""

    def __init__(self):
        self.requested = False
        self.signum: Optional[int] = None  # the signal that asked to stop (the exit status is 128 + it)
        self._previous = {}

    def _handle(self, signum, _frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = self.signum or signum
        logger.warning("%s received: finishing the current step, then saving and exiting", signal.Signals(signum).name)

    def __enter__(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False


# NVIDIA's "never grows": a growth interval no run reaches.
NEVER_GROW = 1_000_000_000
# Steps without an overflow after which a dynamic loss scale doubles (NVIDIA's).
GROWTH_INTERVAL = 100


def loss_scaler(device_type: str, enabled: bool, static_loss_scale: float = 1.0,
                dynamic_loss_scale: bool = False) -> torch.amp.GradScaler:
    """The GradScaler of NVIDIA's ConvNets code: it starts at ``static_loss_scale`` (NVIDIA's default 1), halves on
    every overflow (that step is skipped), and grows x2 after 100 steps without one only with
    ``dynamic_loss_scale``; otherwise it never grows."""
    if not static_loss_scale > 0:
        raise UserError(f"--static-loss-scale must be positive, got {static_loss_scale}")
    return torch.amp.GradScaler(device_type, init_scale=static_loss_scale, growth_factor=2.0, backoff_factor=0.5,
                                growth_interval=GROWTH_INTERVAL if dynamic_loss_scale else NEVER_GROW,
                                enabled=enabled)


@dataclass
class Precision:
    """Autocast and loss scaling: float16 + GradScaler on CUDA, bfloat16 (no scaling) on the CPU."""

    enabled: bool
    device_type: str
    dtype: torch.dtype
    scaler: torch.amp.GradScaler

    @classmethod
    def create(cls, amp: bool, device: torch.device, static_loss_scale: float = 1.0, dynamic_loss_scale: bool = False):
        """Loss scaling as NVIDIA's (see :func:`loss_scaler`), on CUDA with ``amp`` only."""
        on_cuda = device.type == "cuda"
        dtype = torch.float16 if on_cuda else torch.bfloat16
        scaler = loss_scaler("cuda" if on_cuda else "cpu", amp and on_cuda, static_loss_scale, dynamic_loss_scale)
        return cls(amp, device.type, dtype, scaler)

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)

    def scale_on_device(self) -> Optional[torch.Tensor]:
        """The current loss scale as a device tensor (a copy: the scaler updates its own in place), read without a
        host synchronization; None without loss scaling."""
        if not self.scaler.is_enabled():
            return None
        scale = getattr(self.scaler, "_scale", None)
        if scale is None:  # before the first scale(): the initial scale
            return None
        return scale.detach().clone().reshape(())


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, topk=(1, 5)) -> List[torch.Tensor]:
    """Number of samples whose label is among the k highest logits, for each k (capped at the class count)."""
    maxk = min(max(topk), logits.shape[1])
    predicted = logits.topk(maxk, dim=1).indices
    hits = predicted.eq(labels.unsqueeze(1))
    return [hits[:, : min(k, maxk)].any(dim=1).sum() for k in topk]


@dataclass
class Averages:
    sums: Dict[str, float] = field(default_factory=dict)
    counts: Dict[str, int] = field(default_factory=dict)

    def add(self, values: Dict[str, float]) -> None:
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value)
            self.counts[name] = self.counts.get(name, 0) + 1

    def means(self) -> Dict[str, float]:
        return {name: self.sums[name] / self.counts[name] for name in self.sums}


@dataclass
class _Interval:
    """What the training steps since the last logging step left on the device and measured on the host."""

    start: float
    iterations: List[int] = field(default_factory=list)
    losses: List[torch.Tensor] = field(default_factory=list)
    infomax: List[torch.Tensor] = field(default_factory=list)
    scales: List[torch.Tensor] = field(default_factory=list)
    data_times: List[float] = field(default_factory=list)
    batches: List[int] = field(default_factory=list)

    def add(self, iteration, loss, infomax, scale, data_time, batch) -> None:
        self.iterations.append(iteration)
        self.losses.append(loss.reshape(()))
        if infomax is not None:
            self.infomax.append(infomax.reshape(()))
        if scale is not None:
            self.scales.append(scale)
        self.data_times.append(data_time)
        self.batches.append(batch)


def steps_per_pass(loader, prof: int) -> int:
    """The steps one pass over ``loader`` takes: all of them, or the first ``prof`` (``--prof``) when positive."""
    return len(loader) if prof <= 0 else min(len(loader), prof)


class Trainer:
    """One model's training and validation. ``model`` may be DDP-wrapped; ``ema`` follows the unwrapped one."""

    def __init__(self, model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer, precision: Precision,
                 context: Context, report: Report, *, accumulation: int = 1, infomax_weight: float = 0.0,
                 mixup: Optional[Mixup] = None, ema: Optional[EMA] = None, memory_format=torch.contiguous_format,
                 prof: int = -1, topk: int = 5, stop: Optional[GracefulStop] = None,
                 inner_model: Optional[nn.Module] = None, val_criterion: Optional[nn.Module] = None):
        self.model = model
        self.inner_model = inner_model if inner_model is not None else model
        self.criterion = criterion
        self.optimizer = optimizer
        self.precision = precision
        self.context = context
        self.report = report
        self.accumulation = accumulation
        self.infomax_weight = infomax_weight
        self.mixup = mixup
        self.ema = ema
        self.memory_format = memory_format
        self.prof = prof
        self.topk = topk
        self.stop = stop or GracefulStop()
        # val.loss is computed with this criterion on the hard labels (NVIDIA's: the training loss, label smoothing
        # included; plain cross-entropy with mixup); None: plain cross-entropy. val.cross_entropy is always plain.
        self.val_criterion = val_criterion
        self.last_train_iteration = 0  # validation steps are [epoch, last training iteration, val iteration]
        # PEDConv's measured paths are sent from rank 0 once for training and once for evaluation (share_choices)
        self._choices_shared = self._eval_choices_shared = False

    def _no_sync(self, sync: bool):
        if sync or not hasattr(self.model, "no_sync"):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def train_epoch(self, loader, epoch: int, lr: float) -> Dict[str, float]:
        """One pass over ``loader``; returns the epoch means. Stops early (``self.stop.requested``) at a logging step.

        The host never waits for the device inside a step: the loss, the info-max loss and the loss scale stay on
        the device, and every ``--print-freq`` steps (and at the last step) one all-reduce sums the interval's
        losses and the stop flags of all ranks, and one read brings them to the host. The report then gets each
        step's line, with the interval's mean compute time (per-step times need a synchronization per step).
        A non-finite loss stops the run at that logging step.
        """
        self.model.train()
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        averages = Averages()
        steps = steps_per_pass(loader, self.prof)
        interval = _Interval(time.perf_counter())
        end = interval.start
        for iteration, (images, labels) in enumerate(loader, start=1):
            data_time = time.perf_counter() - end
            last_of_group = iteration % self.accumulation == 0 or iteration == steps
            with self._no_sync(last_of_group):
                loss, infomax = self._forward_backward(images, labels)
            if last_of_group:
                self.precision.scaler.step(self.optimizer)
                self.precision.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                if self.ema is not None:
                    self.ema.update(self.inner_model)
            interval.add(iteration, loss, infomax, self.precision.scale_on_device(), data_time, images.shape[0])
            if self.context.distributed and not self._choices_shared:
                # The first step measured PEDConv's paths on rank 0 (other ranks took the fixed rule): from now on
                # every rank runs rank 0's choices.
                pedconv.share_choices()
                self._choices_shared = True
            last = iteration >= steps
            if last or iteration % self.report.print_freq == 0:
                if self._log_interval(interval, epoch, lr, averages):
                    self.stop.requested = True
                    break
                interval = _Interval(time.perf_counter())
            if last:
                break
            end = time.perf_counter()
        return averages.means()

    def _log_interval(self, interval: "_Interval", epoch: int, lr: float, averages: Averages) -> bool:
        """Reduce and read the interval's values (the step's only synchronization), write its report lines; return
        whether any rank was asked to stop."""
        if not interval.iterations:
            return False
        device = self.context.device
        losses = torch.stack(interval.losses).float()
        reduced = [losses]
        if interval.infomax:
            reduced.append(torch.stack(interval.infomax).float())
        reduced.append(torch.full((1,), float(self.stop.requested), device=device))
        values = torch.cat(reduced)
        if self.context.distributed:
            all_reduce_sum(values, self.context)
            values = values / self.context.world_size  # means; the stop flag only needs to be non-zero
        if interval.scales:
            values = torch.cat([values, torch.stack(interval.scales).float().to(device)])
        host = values.tolist()  # the one host synchronization of the interval
        count = len(interval.iterations)
        loss_values = host[:count]
        infomax_values = host[count:2 * count] if interval.infomax else None
        position = count * (2 if interval.infomax else 1)
        stop = host[position] > 0
        scale_values = host[position + 1:] if interval.scales else None
        for iteration, value in zip(interval.iterations, loss_values):
            if not math.isfinite(value):
                raise FloatingPointError(f"loss is {value} at epoch {epoch + 1}, iteration {iteration}")
        elapsed = time.perf_counter() - interval.start
        compute_time = max(elapsed - sum(interval.data_times), 0.0) / count
        world = self.context.world_size
        for index, iteration in enumerate(interval.iterations):
            batch = interval.batches[index] * world
            data_time = interval.data_times[index]
            metrics = {
                "train.loss": loss_values[index],
                "train.compute_ips": batch / max(compute_time, 1e-9),
                "train.total_ips": batch / max(compute_time + data_time, 1e-9),
                "train.lr": lr,
                "train.grad_scale": scale_values[index] if scale_values else self._initial_scale(),
                "train.data_time": data_time,
                "train.compute_time": compute_time,
            }
            if infomax_values is not None:
                metrics["train.infomax_loss"] = infomax_values[index]
            averages.add(metrics)
            self.last_train_iteration = iteration
            self.report.log((epoch, iteration), metrics)
        return stop

    def _initial_scale(self) -> float:
        return float(self.precision.scaler.get_scale()) if self.precision.scaler.is_enabled() else 1.0

    def _forward_backward(self, images: torch.Tensor, labels: torch.Tensor):
        images = images.contiguous(memory_format=self.memory_format)
        target = labels
        if self.mixup is not None:
            images, target = self.mixup(images, labels)
        with self.precision.autocast():
            logits = self.model(images)
            loss = self.criterion(logits, target)
            infomax = None
            if self.infomax_weight:
                infomax_loss = pedconv.info_max_loss(self.model)
                loss = loss + self.infomax_weight * infomax_loss
                infomax = infomax_loss.detach()
        self.precision.scaler.scale(loss / self.accumulation).backward()
        return loss.detach(), infomax

    @torch.no_grad()
    def validate(self, loader, epoch: int, model: Optional[nn.Module] = None, prefix: str = "val") -> Dict[str, float]:
        """Top-1/top-5/loss over the whole validation set, every image counted once over all ranks."""
        model = model if model is not None else self.model
        model.eval()
        # sums of the criterion's loss and of the cross-entropy, top-1 and top-k hits, images
        totals = torch.zeros(5, dtype=torch.float64, device=self.context.device)
        latencies, averages = [], Averages()
        steps = steps_per_pass(loader, self.prof)
        end = time.perf_counter()
        for iteration, (images, labels) in enumerate(loader, start=1):
            data_time = time.perf_counter() - end
            if images.shape[0]:
                images = images.contiguous(memory_format=self.memory_format)
                with self.precision.autocast():
                    logits = model(images)
                cross_entropy = nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
                loss = (self.val_criterion(logits.float(), labels) * images.shape[0]
                        if self.val_criterion is not None else cross_entropy)
                top1, topk = topk_correct(logits, labels, (1, self.topk))
                totals += torch.stack([loss.double(), cross_entropy.double(), top1.double(), topk.double(),
                                       torch.tensor(float(images.shape[0]), dtype=torch.float64, device=totals.device)])
                if self.context.device.type == "cuda":
                    torch.cuda.synchronize(self.context.device)
                compute_time = time.perf_counter() - end - data_time
                batch = images.shape[0]
                latencies.append(compute_time)
                metrics = {
                    f"{prefix}.top1": 100.0 * top1.item() / batch,
                    f"{prefix}.top5": 100.0 * topk.item() / batch,
                    f"{prefix}.loss": loss.item() / batch,
                    f"{prefix}.cross_entropy": cross_entropy.item() / batch,
                    f"{prefix}.compute_ips": batch * self.context.world_size / max(compute_time, 1e-9),
                    f"{prefix}.total_ips": batch * self.context.world_size / max(compute_time + data_time, 1e-9),
                    f"{prefix}.data_time": data_time,
                    f"{prefix}.compute_latency": compute_time,
                }
                averages.add({k: v for k, v in metrics.items() if "ips" in k or "time" in k or "latency" in k})
                self.report.log((epoch, self.last_train_iteration, iteration), metrics)
            if iteration >= steps:
                break
            end = time.perf_counter()
        all_reduce_sum(totals, self.context)
        if self.context.distributed and not self._eval_choices_shared:
            pedconv.share_choices()  # the evaluation keys (forward only) measured on rank 0
            self._eval_choices_shared = True
        images_seen = max(totals[4].item(), 1.0)
        results = averages.means()
        results.update({
            f"{prefix}.top1": 100.0 * totals[2].item() / images_seen,
            f"{prefix}.top5": 100.0 * totals[3].item() / images_seen,
            f"{prefix}.loss": totals[0].item() / images_seen,
            f"{prefix}.cross_entropy": totals[1].item() / images_seen,
            f"{prefix}.images": int(totals[4].item()),
        })
        if latencies:
            ordered = sorted(latencies)
            for percent in (100, 99, 95):
                index = min(len(ordered) - 1, max(0, math.ceil(percent / 100 * len(ordered)) - 1))
                results[f"{prefix}.compute_latency_at{percent}"] = ordered[index]
        return results

