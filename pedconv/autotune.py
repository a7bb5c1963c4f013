"""Measured choice of PEDConv's forward path, per layer shape and device (``method="auto"``).

Which exact path is fastest for a layer (per-sample kernels, shared-weight columns through the convolution library
or the BLAS, ...) depends on the processor, its caches and its libraries, so a rule fixed in advance cannot be right
everywhere. As cuDNN's benchmark mode does, the first call for a new key (device type and name, torch version, CPU
threads, dtype, memory format, channels, kernel, stride, padding, dilation, groups, rank, batch bucket (the next
power of two), input size, and whether gradients are needed) times each candidate path once on the call's own input,
forward and, for training keys, backward, runs the close ones a second time, and keeps the fastest: a few of the
layer's own steps, once per key and process (or machine, with the cache file). The fixed rule's path runs first; a
training candidate whose forward alone already takes as long as the best complete run skips its backward (see
``PRUNE_FACTOR``). Later calls with the key use it. Evaluation calls (no gradients)
are keyed separately and timed forward only. A path that raises while measured is dropped for that key with one
warning.

Control:

- :func:`set_autotune` (``True``/``False``; ``None``: back to the environment) and ``PEDCONV_AUTOTUNE=0|1``
  (default on). Off, under ``torch.use_deterministic_algorithms`` (``--deterministic``), while tracing or exporting,
  and under ``torch.func`` transforms, nothing is measured and the fixed rule (:func:`pedconv.choose_method`)
  decides. Under ``torch.compile`` the choice is made while the graph is traced (on random inputs of the layer's
  shape: the traced ones are fake) and becomes a constant of the graph.
- Choices persist in a cache file, ``$PEDCONV_AUTOTUNE_CACHE`` (empty: memory only) or
  ``$XDG_CACHE_HOME/pedconv/autotune.json`` (``~/.cache/...``). Keys hold the device name and the torch version, so
  one file serves several machines or installs; it is written atomically (temporary file, then rename). A file that
  cannot be read as this cache is ignored with a warning (and left alone: the choices stay in memory); an unwritable
  location keeps them in memory only, with one warning.
- Under DDP only rank 0 measures; :func:`share_choices` (the training engine calls it after the first step) sends
  its choices to every rank. Until then other ranks use the cache or the fixed rule.
- :func:`autotune_report` lists the choice, its origin and the timings per key.

The choices live in one process-wide table (as cuDNN's benchmark cache does): what was measured holds for every
layer of that shape in the process.
"""
from __future__ import annotations

import functools
import json
import os
import platform
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch

ENV_SWITCH = "PEDCONV_AUTOTUNE"
ENV_CACHE = "PEDCONV_AUTOTUNE_CACHE"
CACHE_FORMAT = "pedconv-autotune-1"
# Every candidate runs once, then those within this factor of the best first time run again (in reverse order, so
# that no candidate is always first after the caller's own work): the first runs pay for first touches of buffers
# and the libraries' plans, and the second decides.
SECOND_ROUND_FACTOR = 3.0
# A training candidate whose forward alone takes over this factor times the best complete run (forward and
# backward) so far stops there, unchosen: a backward costs about twice its forward or more (the input and the
# weight gradients), so such a candidate would take about three times the best. Without it, the hopeless candidates
# (per-sample kernels of a 7x7 layer: eight times slower) cost more to measure than all the others together.
PRUNE_FACTOR = 1.0


class _Pruned(Exception):
    """Raised between a candidate's forward and backward when the forward alone rules it out."""

    def __init__(self, seconds: float) -> None:
        super().__init__(seconds)
        self.seconds = seconds


class LayerSpec(NamedTuple):
    """What ``auto`` knows about one call: the key's fields, the fixed rule's path and the candidates."""

    device: str
    dtype: str
    channels_last: bool
    batch: int
    in_channels: int
    out_channels: int
    kernel: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    groups: int
    rank: int
    size: Tuple[int, int]
    training: bool
    fixed: str
    candidates: Tuple[str, ...]
    requires_grad: Tuple[bool, ...]


@dataclass
class Decision:
    path: str
    source: str  # measured, cache, rank 0
    times: Dict[str, float] = field(default_factory=dict)  # seconds per candidate (best of its runs)
    errors: Dict[str, str] = field(default_factory=dict)  # candidates dropped: the error
    pruned: Tuple[str, ...] = ()  # candidates stopped after their forward: their times are the forward's


@functools.lru_cache(maxsize=None)
def device_name(device: str) -> str:
    """The processor's model name: the GPU's for CUDA, the CPU's (from /proc/cpuinfo where there is one) else."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device.index if device.index is not None else torch.cuda.current_device())
    if device.type == "cpu":
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
                for line in cpuinfo:
                    if line.lower().startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or platform.machine() or "cpu"
    return device.type


def batch_bucket(batch: int) -> int:
    """The next power of two: batches of similar size share a choice."""
    return 1 << max(batch - 1, 0).bit_length()


def layer_key(layer: LayerSpec) -> str:
    device_type = layer.device.split(":")[0]
    fields = [device_type, device_name(layer.device), f"torch {torch.__version__}"]
    if device_type == "cpu":
        fields.append(f"threads {torch.get_num_threads()}")
    pair = "{0[0]}x{0[1]}".format
    fields += [
        layer.dtype, "channels_last" if layer.channels_last else "contiguous",
        f"in {layer.in_channels}", f"out {layer.out_channels}", f"kernel {pair(layer.kernel)}",
        f"stride {pair(layer.stride)}", f"padding {pair(layer.padding)}", f"dilation {pair(layer.dilation)}",
        f"groups {layer.groups}", f"rank {layer.rank}", f"batch <={batch_bucket(layer.batch)}",
        f"size {pair(layer.size)}", "train" if layer.training else "eval",
    ]
    return " | ".join(fields)


def _env_enabled() -> bool:
    value = os.environ.get(ENV_SWITCH, "").strip().lower()
    if value in ("", "1", "true", "on", "yes"):
        return True
    if value in ("0", "false", "off", "no"):
        return False
    warnings.warn(f"{ENV_SWITCH}={value!r} is not 0 or 1: measuring PEDConv paths (the default)", stacklevel=3)
    return True


def default_cache_path() -> Optional[str]:
    """The cache file: ``$PEDCONV_AUTOTUNE_CACHE`` (empty: none), else ``$XDG_CACHE_HOME/pedconv/autotune.json``."""
    if ENV_CACHE in os.environ:
        return os.environ[ENV_CACHE] or None
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "pedconv", "autotune.json")


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


class Autotuner:
    """The table of choices, its cache file and the measuring."""

    def __init__(self) -> None:
        self.enabled: Optional[bool] = None  # None: from the environment
        self.decisions: Dict[str, Decision] = {}
        self.measured = 0  # keys measured in this process
        self.measure_seconds = 0.0
        self.cache_path: Optional[str] = None
        self._loaded = False
        self._writable = True
        self._warned: set = set()
        self._lock = threading.RLock()
        self.clock = time.perf_counter  # what measures (the tests give it a fake)

    # -- switches

    def is_enabled(self) -> bool:
        return self.enabled if self.enabled is not None else _env_enabled()

    def _may_measure(self) -> bool:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank() == 0
        return True

    # -- the choice

    def choose(self, layer: LayerSpec, run: Callable[[str, Callable[[], None]], None]) -> str:
        """The path for ``layer``: known, measured now, or the fixed rule's. ``run(path, after_forward)`` runs one
        candidate, forward and (training keys) backward, calling ``after_forward()`` in between: it raises to stop a
        candidate that the forward alone rules out."""
        if not self.is_enabled() or torch.are_deterministic_algorithms_enabled():
            return layer.fixed
        key = layer_key(layer)
        with self._lock:
            self._load()
            known = self.decisions.get(key)
            if known is not None and known.path in layer.candidates:
                return known.path
            if len(layer.candidates) < 2 or not self._may_measure():
                return layer.fixed
            decision = self._measure(key, layer, run)
            if decision is None:
                return layer.fixed
            self.decisions[key] = decision
            self._save()
            return decision.path

    def _measure(self, key: str, layer: LayerSpec, run: Callable[[str, Callable[[], None]], None]
                 ) -> Optional[Decision]:
        started = time.perf_counter()
        times: Dict[str, float] = {}
        errors: Dict[str, str] = {}
        pruned = []

        def timed(path: str, limit: float = float("inf")) -> float:
            _synchronize(layer.device)
            start = self.clock()

            def after_forward() -> None:
                _synchronize(layer.device)
                elapsed = self.clock() - start
                if elapsed > limit:
                    raise _Pruned(elapsed)

            run(path, after_forward)
            _synchronize(layer.device)
            return self.clock() - start

        # The fixed rule's path first: usually a good one, whose time lets the hopeless ones stop early.
        order = sorted(layer.candidates, key=lambda path: path != layer.fixed)
        for path in order:
            complete = [seconds for p, seconds in times.items() if p not in pruned]
            try:
                times[path] = timed(path, PRUNE_FACTOR * min(complete, default=float("inf")))
            except _Pruned as stop:
                times[path] = stop.seconds
                pruned.append(path)
            except Exception as error:  # a path that fails here must not fail training: dropped for this key
                errors[path] = f"{type(error).__name__}: {error}".splitlines()[0]
                self._warn_once((key, path), f"PEDConv path {path!r} failed while measured and is dropped for "
                                             f"{key}: {errors[path]}")
        if times:
            # The first run of a path pays for first touches (buffers, library plans): time the close ones again.
            best = min(seconds for path, seconds in times.items() if path not in pruned)
            close = [p for p, seconds in times.items() if seconds <= SECOND_ROUND_FACTOR * best and p not in pruned]
            for path in reversed(close):
                times[path] = min(times[path], timed(path))
        self.measured += 1
        self.measure_seconds += time.perf_counter() - started
        if not times:
            return None
        return Decision(min(times, key=times.get), "measured", times, errors, tuple(pruned))

    def _warn_once(self, what, message: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            warnings.warn(message, RuntimeWarning, stacklevel=2)

    # -- the cache file

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        self.cache_path = default_cache_path()
        entries = self._read(self.cache_path)
        if entries is None:
            return
        for key, entry in entries.items():
            self.decisions.setdefault(key, Decision(entry["path"], "cache",
                                                    {p: ms / 1e3 for p, ms in entry.get("times_ms", {}).items()},
                                                    pruned=tuple(entry.get("pruned", ()))))

    def _read(self, path: Optional[str]) -> Optional[dict]:
        """The entries of the cache file; None (and no more writing to it) if it is not a readable cache."""
        if path is None or not os.path.exists(path):
            return None
        try:
            with open(path, encoding="utf-8") as file:
                data = json.load(file)
            if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
                raise ValueError(f"not a {CACHE_FORMAT} file")
            entries = data["entries"]
            if not all(isinstance(key, str) and isinstance(entry, dict) and isinstance(entry.get("path"), str)
                       for key, entry in entries.items()):
                raise ValueError("malformed entries")
            return entries
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as error:
            self._writable = False
            self._warn_once(("read", path), f"PEDConv autotune cache {path} ignored ({error}); choices stay in "
                                            f"memory (delete the file to let pedconv rewrite it)")
            return None

    def _save(self) -> None:
        path = self.cache_path
        if path is None or not self._writable:
            return
        entries = self._read(path) or {}
        if not self._writable:
            return
        for key, decision in self.decisions.items():
            if decision.source in ("measured", "cache"):
                entries[key] = {"path": decision.path,
                                "times_ms": {p: round(s * 1e3, 4) for p, s in decision.times.items()},
                                "pruned": list(decision.pruned)}
        try:
            folder = os.path.dirname(os.path.abspath(path))
            os.makedirs(folder, exist_ok=True)
            handle, temporary = tempfile.mkstemp(prefix=".autotune-", suffix=".tmp", dir=folder)
            try:
                with os.fdopen(handle, "w", encoding="utf-8") as file:
                    json.dump({"format": CACHE_FORMAT, "entries": entries}, file, indent=1, sort_keys=True)
                os.replace(temporary, path)
            except BaseException:
                os.unlink(temporary)
                raise
        except OSError as error:
            self._writable = False
            self._warn_once(("write", path), f"PEDConv autotune cache {path} cannot be written ({error}); "
                                             f"choices stay in memory")

    # -- ranks

    def share(self, group=None) -> int:
        """Send rank 0's choices to every rank of ``group`` (a collective); returns how many were sent."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) <= 1:
            return 0
        with self._lock:
            rank = dist.get_rank(group)
            table = {key: (d.path, d.times) for key, d in self.decisions.items()} if rank == 0 else None
            payload = [table]
            dist.broadcast_object_list(payload, src=dist.get_global_rank(group, 0) if group is not None else 0,
                                       group=group)
            if rank != 0:
                for key, (path, times) in payload[0].items():
                    self.decisions[key] = Decision(path, "rank 0", times)
            return len(payload[0])

    # -- reporting

    def report(self) -> str:
        state = "on" if self.is_enabled() else "off"
        if torch.are_deterministic_algorithms_enabled():
            state += " (deterministic algorithms: the fixed rule decides)"
        lines = [f"PEDConv autotune: {state}; cache {self.cache_path or 'none (memory only)'}"
                 f"{'' if self._writable else ' (not written)'}; {self.measured} key(s) measured in this process, "
                 f"{self.measure_seconds:.2f} s"]
        for key, decision in sorted(self.decisions.items()):
            timings = ", ".join(f"{path} {seconds * 1e3:.2f} ms" + (" (forward)" if path in decision.pruned else "")
                                for path, seconds in sorted(decision.times.items(), key=lambda item: item[1]))
            line = f"  {key}: {decision.path} ({decision.source}; {timings or 'no timings'})"
            if decision.errors:
                line += "; dropped: " + ", ".join(f"{p} ({e})" for p, e in decision.errors.items())
            lines.append(line)
        return "\n".join(lines)

    def reset(self) -> None:
        """Forget every choice and the counters; the cache file is read again at the next choice."""
        with self._lock:
            self.__init__()


TUNER = Autotuner()


def choose(layer: LayerSpec, run: Callable[[str, Callable[[], None]], None]) -> str:
    return TUNER.choose(layer, run)


def set_autotune(enabled: Optional[bool]) -> None:
    """Measure PEDConv paths (``True``), use the fixed rule (``False``), or follow ``PEDCONV_AUTOTUNE`` (``None``)."""
    TUNER.enabled = None if enabled is None else bool(enabled)


def is_autotune_enabled() -> bool:
    return TUNER.is_enabled()


def autotune_report() -> str:
    """The choices made or loaded, per key: path, origin (measured, cache, rank 0) and the timings."""
    return TUNER.report()


def share_choices(group=None) -> int:
    """Under DDP: every rank takes rank 0's choices (a collective: all ranks call it). No-op on one process."""
    return TUNER.share(group)


def lookup(layer: LayerSpec) -> Optional[Decision]:
    """The decision recorded for ``layer``'s key, if any."""
    return TUNER.decisions.get(layer_key(layer))
