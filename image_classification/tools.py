"""What the command-line tools share (classify.py, checkpoint2model.py, export_onnx.py, the report and the
benchmarks): one-line errors, atomic output files, and a model built from a checkpoint or from an architecture.

Every tool's ``main(argv)`` is wrapped by :func:`tool_main`: bad input (a missing or unreadable file, a checkpoint
that is not one, an unknown architecture...) raised as :class:`ToolError`, ``CheckpointError`` or ``DataError``
becomes one ``error: ...`` line on stderr and exit status 2, without a traceback; any other exception is a bug and
keeps its traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import sys
from typing import Callable, Iterator, List, Optional, Sequence

import torch
import torch.nn as nn

from errors import EXIT_BAD_INPUT, UserError

from .checkpoints import Checkpoint, atomic_path, check_finite, load_model_state
from .models import ARCHITECTURES, build_model


class ToolError(UserError):
    """Bad input to a tool; the message (one line) is printed as ``error: <message>``."""


class ToolParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one ``error: ...`` line (and exit status 2), like the tools' own."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see {self.prog} --help)\n")


def one_line(message: str) -> str:
    """A multi-line message (a checkpoint mismatch lists keys on several lines) joined into one line."""
    return "; ".join(part.strip() for part in str(message).splitlines() if part.strip()).replace(":;", ":")


def tool_main(function: Callable[[Optional[Sequence[str]]], int]) -> Callable[[Optional[Sequence[str]]], int]:
    """Decorate a tool's ``main(argv) -> exit status``: bad input becomes one ``error:`` line and exit status 2."""
    @functools.wraps(function)
    def wrapper(argv: Optional[Sequence[str]] = None) -> int:
        try:
            return function(argv)
        except UserError as error:  # ToolError, CheckpointError, DataError...
            print(f"error: {one_line(error)}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except OSError as error:  # a file that cannot be read or written
            where = f"{error.filename}: " if error.filename else ""
            print(f"error: {where}{error.strerror or error}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            return 130

    return wrapper


def quiet_logging(level: int = logging.WARNING) -> None:
    """Route log records at ``level`` and above to stderr, so a tool's own output on stdout stays clean."""
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)


def check_output_folder(path: str) -> str:
    """The folder an output file goes to; a ToolError when it does not exist."""
    directory = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(directory):
        raise ToolError(f"{path}: the folder {directory} does not exist")
    return directory


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[str]:
    """:func:`checkpoints.atomic_path` after checking that the output folder exists (a ToolError if not)."""
    check_output_folder(path)
    with atomic_path(path) as temporary:
        yield temporary


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_output(path) as temporary:
        with open(temporary, "w", encoding="utf-8") as stream:
            stream.write(text)


def check_arch(name: str) -> str:
    if name not in ARCHITECTURES:
        raise ToolError(f"unknown architecture {name!r}; valid: {', '.join(ARCHITECTURES)}")
    return name


def weights_of(checkpoint: Checkpoint, ema: bool, allow_nonfinite: bool = False) -> dict:
    """The checkpoint's model weights, or its EMA weights with ``ema`` (an error if it has none). Weights holding
    NaN or infinite values are refused (a CheckpointError naming the first such tensor) unless ``allow_nonfinite``."""
    if not ema:
        state = checkpoint.state_dict
    elif not checkpoint.state_dict_ema:
        raise ToolError(f"{checkpoint.path}: --ema asked, but the checkpoint holds no EMA weights "
                        "(train with --use-ema DECAY)")
    else:
        state = checkpoint.state_dict_ema
    if not allow_nonfinite:
        check_finite(state, checkpoint.path, "EMA weights" if ema else "weights")
    return state


def model_from_checkpoint(checkpoint: Checkpoint, ema: bool = False, arch: Optional[str] = None,
                          allow_nonfinite: bool = False) -> nn.Module:
    """The model a checkpoint describes, in eval mode, with its (EMA) weights. ``arch``, when given, must agree.
    Weights holding NaN or infinite values are refused unless ``allow_nonfinite`` (see :func:`weights_of`)."""
    described = checkpoint.arch
    if arch is not None:
        check_arch(arch)
        if described.get("name") not in (None, arch):
            raise ToolError(f"{checkpoint.path} holds a {described['name']}, not a {arch}")
        described = dict(described, name=described.get("name") or arch)
    if described.get("name") is None or described.get("wmul") is None:
        raise ToolError(f"{checkpoint.path}: cannot tell the architecture from the checkpoint's keys "
                        f"(one of {', '.join(ARCHITECTURES)} is expected)")
    check_arch(described["name"])
    if described.get("num_classes") is None:
        raise ToolError(f"{checkpoint.path}: no classifier weights (fc.weight or classifier.1.weight) "
                        "in the checkpoint")
    model = build_model(described["name"], described["dynamic"], described["num_classes"], described["wmul"])
    load_model_state(model, weights_of(checkpoint, ema, allow_nonfinite))
    return model.eval()


def fresh_model(arch: str, dynamic: bool, num_classes: int, wmul: float, seed: int = 0) -> nn.Module:
    """A randomly initialized model (seeded), in eval mode: for exporting or timing without a checkpoint."""
    check_arch(arch)
    if wmul <= 0 or num_classes <= 0:
        raise ToolError(f"--wmul and --num-classes must be positive (got {wmul:g}, {num_classes})")
    torch.manual_seed(seed)
    return build_model(arch, dynamic, num_classes, wmul).eval()


def checkpoint_classes(checkpoint: Checkpoint) -> Optional[List[str]]:
    """The class names a checkpoint stores (its ``classes`` entry), or None."""
    classes = checkpoint.extra.get("classes")
    if isinstance(classes, (list, tuple)) and all(isinstance(name, str) for name in classes):
        return list(classes)
    return None


DEFAULT_PREPROCESSING = {"image_size": 224, "interpolation": "bilinear"}


def checkpoint_preprocessing(checkpoint: Checkpoint, **given) -> dict:
    """``image_size`` and ``interpolation`` for a checkpoint's model: a value given (not None) wins, with a warning
    when it differs from the one the checkpoint records (main.py stores how its images were prepared); otherwise
    the recorded value, else DLE's default (224, bilinear)."""
    stored = checkpoint.extra.get("preprocessing")
    stored = stored if isinstance(stored, dict) else {}
    chosen = {}
    for name, default in DEFAULT_PREPROCESSING.items():
        value, recorded = given.get(name), stored.get(name)
        if value is None:
            chosen[name] = recorded if recorded is not None else default
            continue
        if recorded is not None and value != recorded:
            logging.getLogger(__name__).warning(
                "--%s %s overrides the %s the checkpoint's model was trained with (%s): its predictions may be wrong",
                name.replace("_", "-"), value, name.replace("_", " "), recorded)
        chosen[name] = value
    return chosen


def autocast(device: torch.device, amp: bool):
    """The engine's mixed precision: float16 autocast on CUDA, bfloat16 on the CPU; nothing without ``amp``."""
    from .training import Precision

    return Precision.create(amp, device).autocast()
