"""glibc malloc settings for training and benchmarking on the CPU: keep freed memory in the process.

PyTorch's CPU tensors come straight from malloc. With glibc's defaults, a freed block of a few MiB or more goes back
to the system (large blocks are mmap'ed and unmapped; the heap is trimmed once its free top exceeds twice the largest
such block), so the next step's tensors of the same size fault their pages in again and the kernel zeroes them. On
the 2-core CPU that was up to a third of a ResNet layer's step time (``sys`` time), more for the layers whose
backward frees several large temporaries at once (PEDConv's per-sample kernels), and it varied with the process's
allocation history. PyTorch's own CPU launcher (``python -m torch.backends.xeon.run_cpu``) avoids it by preloading
jemalloc or tcmalloc configured to keep freed memory; :func:`keep_freed_memory` does the same with glibc alone: a
fixed mmap threshold at glibc's ceiling (32 MiB) and no trimming. The process then holds on to its peak heap, as
PyTorch's CUDA caching allocator does on the GPU.
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_CEILING = 32 << 20  # HEAP_MAX_SIZE / 2 on 64-bit glibc: mallopt refuses more
NO_TRIMMING = -1  # "Setting M_TRIM_THRESHOLD to -1 disables trimming completely" (mallopt(3))


# Environment variables that choose the allocator's behaviour, and what their value must contain to count.
USER_SETTINGS = {"LD_PRELOAD": "malloc", "GLIBC_TUNABLES": "malloc", "MALLOC_TRIM_THRESHOLD_": "",
                 "MALLOC_MMAP_THRESHOLD_": "", "MALLOC_CONF": ""}


def user_malloc_settings() -> str:
    """The environment variable that already configures the allocator, or '' when there is none."""
    for name, marker in USER_SETTINGS.items():
        value = os.environ.get(name, "")
        if value and marker in value:
            return name
    return ""


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse (see the module docstring); True if it took.

    Does nothing (False) off Linux, where the C library has no ``mallopt`` (musl's ignores it), or when the
    environment already configures the allocator (``LD_PRELOAD`` of a *malloc library, ``GLIBC_TUNABLES`` with
    malloc settings, ``MALLOC_*`` variables): the user's choice stands.
    """
    if not sys.platform.startswith("linux"):
        return False
    setting = user_malloc_settings()
    if setting:
        logger.info("malloc: left as %s configures it", setting)
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_CEILING) == 1 and mallopt(M_TRIM_THRESHOLD, NO_TRIMMING) == 1


def add_malloc_argument(parser) -> None:
    """The benchmarks' ``--default-malloc`` flag."""
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave the C library's malloc as it is (by default it keeps freed memory, as CPU "
                             "training does: see image_classification/allocator.py)")


def configure_malloc(default_malloc: bool = False) -> str:
    """:func:`keep_freed_memory` unless ``default_malloc``; says what the allocator does, for the logs."""
    if default_malloc:
        return "default"
    return "keeps freed memory" if keep_freed_memory() else "default"
