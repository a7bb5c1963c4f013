"""Process-group setup from the environment (multiproc.py or torchrun) and small collective helpers."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

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


def select_device(requested: str, local_rank: int) -> torch.device:
    """``auto``: CUDA when present, else the CPU; ``cuda`` without a GPU is an error."""
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"unknown device {requested!r}; valid: auto, cpu, cuda")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA GPU is available; use --device cpu")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) on this node")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


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


def shutdown(context: Optional[Context]) -> None:
    if context is not None and context.distributed and dist.is_initialized():
        dist.destroy_process_group()
