"""image_classification.allocator: glibc keeps freed memory (no page faults on reuse), the user's settings stand."""
import os
import subprocess
import sys

import pytest

from image_classification.allocator import USER_SETTINGS, user_malloc_settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Mallocs three 12 MiB blocks, writes them and frees them, eight times over; prints the page faults of the last six
# rounds. With glibc's defaults the freed heap top (36 MiB) exceeds the trim threshold (twice the largest block
# freed from mmap, 24 MiB), goes back to the system and faults in again each round; kept, the rounds reuse it.
FAULTS_SCRIPT = """
import ctypes, resource, sys
sys.path.insert(0, {root!r})
from image_classification.allocator import configure_malloc
print(configure_malloc(default_malloc={default!r}))
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
def round_(size=12 << 20):
    blocks = [libc.malloc(size) for _ in range(3)]
    for block in blocks:
        libc.memset(block, 1, size)
    for block in blocks:
        libc.free(block)
for _ in range(2):
    round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(6):
    round_()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")


def _faults(default: bool, env=None):
    environment = {k: v for k, v in os.environ.items() if k not in USER_SETTINGS}
    environment.update(OMP_NUM_THREADS="1", **(env or {}))
    result = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT.format(root=ROOT, default=default)],
                            capture_output=True, text=True, env=environment, timeout=120, check=True)
    mode, faults = result.stdout.splitlines()
    return mode, int(faults)


@linux_only
def test_keep_freed_memory_stops_refaulting():
    default_mode, default_faults = _faults(default=True)
    kept_mode, kept_faults = _faults(default=False)
    assert (default_mode, kept_mode) == ("default", "keeps freed memory")
    assert default_faults > 6 * 6000  # each round faults most of its 36 MiB (9216 pages) in again
    assert kept_faults < 1000


@linux_only
def test_user_setting_is_left_alone():
    mode, _ = _faults(default=False, env={"MALLOC_TRIM_THRESHOLD_": "1000000000"})
    assert mode == "default"


def test_user_malloc_settings(monkeypatch):
    for name in USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert user_malloc_settings() == ""
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libasan.so")  # not an allocator
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.rtld.nns=2")  # not malloc's
    assert user_malloc_settings() == ""
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert user_malloc_settings() == "LD_PRELOAD"
    monkeypatch.delenv("LD_PRELOAD")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0")
    assert user_malloc_settings() == "GLIBC_TUNABLES"
