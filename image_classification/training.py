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

from .distributed import Context, all_reduce_sum, reduce_step
from .dllog import Report
from .ema import EMA
from .losses import Mixup
from .optim import set_lr

logger = logging.getLogger(__name__)


class GracefulStop:
    """Turns the first SIGTERM or SIGINT into a flag that the loop reads after each step (then it saves and exits);
    a second SIGINT interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, _frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("%s received: finishing the current step, then saving and exiting", signal.Signals(signum).name)

    def __enter__(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False


@dataclass
class Precision:
    """Autocast and loss scaling: float16 + GradScaler on CUDA, bfloat16 (no scaling) on the CPU."""

    enabled: bool
    device_type: str
    dtype: torch.dtype
    scaler: torch.amp.GradScaler

    @classmethod
    def create(cls, amp: bool, device: torch.device, static_loss_scale: float = 1.0, dynamic_loss_scale: bool = False):
        """A loss scale given with ``--static-loss-scale`` (not 1) stays fixed unless ``--dynamic-loss-scale`` is
        also given (then it is the initial scale, grown every 100 good steps, as NVIDIA's); with neither, AMP
        scales dynamically from 2^16, since a fixed scale of 1 lets float16 gradients underflow."""
        on_cuda = device.type == "cuda"
        dtype = torch.float16 if on_cuda else torch.bfloat16
        fixed = static_loss_scale != 1.0 and not dynamic_loss_scale
        scaler = torch.amp.GradScaler(
            "cuda" if on_cuda else "cpu",
            init_scale=static_loss_scale if static_loss_scale != 1.0 else 2.0**16,
            growth_interval=1_000_000_000 if fixed else 100,
            enabled=amp and on_cuda,
        )
        return cls(amp, device.type, dtype, scaler)

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)


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


class Trainer:
    """One model's training and validation. ``model`` may be DDP-wrapped; ``ema`` follows the unwrapped one."""

    def __init__(self, model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer, precision: Precision,
                 context: Context, report: Report, *, accumulation: int = 1, infomax_weight: float = 0.0,
                 mixup: Optional[Mixup] = None, ema: Optional[EMA] = None, memory_format=torch.contiguous_format,
                 prof: int = -1, topk: int = 5, stop: Optional[GracefulStop] = None,
                 inner_model: Optional[nn.Module] = None):
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
        # PEDConv's measured paths are sent from rank 0 once for training and once for evaluation (share_choices)
        self._choices_shared = self._eval_choices_shared = False

    def _no_sync(self, sync: bool):
        if sync or not hasattr(self.model, "no_sync"):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def train_epoch(self, loader, epoch: int, lr: float) -> Dict[str, float]:
        """One pass over ``loader``; returns the epoch means. Stops early (``self.stop.requested``) after a step."""
        self.model.train()
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        world_batch = self.context.world_size
        averages = Averages()
        steps = len(loader) if self.prof <= 0 else min(len(loader), self.prof)
        end = time.perf_counter()
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
            # One collective per step on several ranks: the mean loss and whether any rank was asked to stop.
            loss_value, stop = reduce_step(loss, self.stop.requested, self.context)
            if self.context.distributed and not self._choices_shared:
                # The first step measured PEDConv's paths on rank 0 (other ranks took the fixed rule): from now on
                # every rank runs rank 0's choices.
                pedconv.share_choices()
                self._choices_shared = True
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss is {loss_value} at epoch {epoch + 1}, iteration {iteration}")
            iteration_time = time.perf_counter() - end
            batch = images.shape[0] * world_batch
            metrics = {
                "train.loss": loss_value,
                "train.compute_ips": batch / max(iteration_time - data_time, 1e-9),
                "train.total_ips": batch / max(iteration_time, 1e-9),
                "train.lr": lr,
                "train.grad_scale": float(self.precision.scaler.get_scale()) if self.precision.scaler.is_enabled() else 1.0,
                "train.data_time": data_time,
                "train.compute_time": iteration_time - data_time,
            }
            if infomax is not None:
                metrics["train.infomax_loss"] = infomax
            averages.add(metrics)
            self.report.log((epoch + 1, iteration), metrics)
            if stop:
                self.stop.requested = True
                break
            if iteration >= steps:
                break
            end = time.perf_counter()
        return averages.means()

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
                infomax = infomax_loss.item()
        self.precision.scaler.scale(loss / self.accumulation).backward()
        return loss.detach(), infomax

    @torch.no_grad()
    def validate(self, loader, epoch: int, model: Optional[nn.Module] = None, prefix: str = "val") -> Dict[str, float]:
        """Top-1/top-5/loss over the whole validation set, every image counted once over all ranks."""
        model = model if model is not None else self.model
        model.eval()
        totals = torch.zeros(4, dtype=torch.float64, device=self.context.device)  # loss sum, top-1, top-k, images
        latencies, averages = [], Averages()
        steps = len(loader) if self.prof <= 0 else min(len(loader), self.prof)
        end = time.perf_counter()
        for iteration, (images, labels) in enumerate(loader, start=1):
            data_time = time.perf_counter() - end
            if images.shape[0]:
                images = images.contiguous(memory_format=self.memory_format)
                with self.precision.autocast():
                    logits = model(images)
                loss = nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
                top1, topk = topk_correct(logits, labels, (1, self.topk))
                totals += torch.stack([loss.double(), top1.double(), topk.double(),
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
                    f"{prefix}.compute_ips": batch * self.context.world_size / max(compute_time, 1e-9),
                    f"{prefix}.total_ips": batch * self.context.world_size / max(compute_time + data_time, 1e-9),
                    f"{prefix}.data_time": data_time,
                    f"{prefix}.compute_latency": compute_time,
                }
                averages.add({k: v for k, v in metrics.items() if "ips" in k or "time" in k or "latency" in k})
                self.report.log((epoch + 1, 0, iteration), metrics)
            if iteration >= steps:
                break
            end = time.perf_counter()
        all_reduce_sum(totals, self.context)
        if self.context.distributed and not self._eval_choices_shared:
            pedconv.share_choices()  # the evaluation keys (forward only) measured on rank 0
            self._eval_choices_shared = True
        images_seen = max(totals[3].item(), 1.0)
        results = averages.means()
        results.update({
            f"{prefix}.top1": 100.0 * totals[1].item() / images_seen,
            f"{prefix}.top5": 100.0 * totals[2].item() / images_seen,
            f"{prefix}.loss": totals[0].item() / images_seen,
            f"{prefix}.images": int(totals[3].item()),
        })
        if latencies:
            ordered = sorted(latencies)
            for percent in (100, 99, 95):
                index = min(len(ordered) - 1, max(0, math.ceil(percent / 100 * len(ordered)) - 1))
                results[f"{prefix}.compute_latency_at{percent}"] = ordered[index]
        return results

