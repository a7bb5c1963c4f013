"""Process-group setup from the environment (multiproc.py or torchrun) and small collective helpers."""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import NoReturn, Optional

import torch
import torch.distributed as dist

import choices
from errors import UserError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def select_device(requested: str = "auto", local_rank: Optional[int] = None) -> torch.device:
    """The device a ``--device`` value names (main.py and the tools): ``auto`` is CUDA when present, else the CPU;
    ``cuda`` without a GPU is a UserError. With ``local_rank`` (one process per GPU) CUDA is that GPU, made the
    current one; without, the current CUDA device. The choice itself is
    :func:`dataloading.common.resolve_device`'s (the data loaders resolve theirs with it too); this adds the flag's
    checks and the process's GPU."""
    from dataloading.common import resolve_device

    if requested not in choices.DEVICES:
        raise UserError(f"unknown device {requested!r}; valid: {', '.join(choices.DEVICES)}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA GPU is available; use --device cpu")
    if local_rank is not None and requested != "cpu" and torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) on this node")
        torch.cuda.set_device(local_rank)  # before any CUDA work: the current device, which resolve_device takes
    return resolve_device(None if requested == "auto" else requested)


def init_from_environment(requested_device: str = "auto") -> Context:
    """Read WORLD_SIZE / RANK / LOCAL_RANK; when WORLD_SIZE > 1 join the group (``env://``): nccl on CUDA,
    gloo on the CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(requested_device, local_rank)
    if world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method="env://", world_size=world_size, rank=rank)
        logger.info("process group: %s, rank %d of %d, local rank %d", backend, rank, world_size, local_rank)
    return Context(rank, world_size, local_rank, device)


def all_reduce_sum(values: torch.Tensor, context: Context) -> torch.Tensor:
    """Sum over ranks (a no-op on one process). gloo and nccl both take the tensor on the process's device."""
    if context.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def shutdown(context: Optional[Context], wait_for_all: bool = False) -> None:
    """Leave the process group. With `wait_for_all` (a run that finished on every rank), first meet the other
    ranks, so that no rank tears down while another still writes its report and checkpoints or communicates."""
    if context is None or not context.distributed or not dist.is_initialized():
        return
    if wait_for_all:
        dist.barrier(device_ids=[context.device.index] if context.device.type == "cuda" else None)
    dist.destroy_process_group()


def exit_with(status: int) -> NoReturn:
    """``sys.exit(status)``; a process that is one rank of several (WORLD_SIZE > 1) leaves through
    `exit_process` instead."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_process(status)
    sys.exit(status)


def exit_process(status: int) -> NoReturn:
    """End a process that joined a process group, without the interpreter's shutdown.

    DistributedDataParallel keeps its process group alive in C++ after ``destroy_process_group`` (the gloo
    worker and transport threads are still running afterwards), and those threads run on while the interpreter
    tears itself down. 2-process gloo runs died at that point with SIGABRT ("terminate called without an active
    exception", no Python frame) in 9 of 59 runs; a plain gloo group after a broadcast (no DDP) did too, in about
    1 of 5 runs of ``tests/test_autotune.py``'s two-rank test. Everything the run owns is closed by then (loaders, report,
    checkpoints, process group): flush the streams and leave without the interpreter's shutdown.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)
