"""The run's folder: a new one per run by default, and never a finished run's folder taken over by accident.

Without ``--workspace`` each run gets ``./runs/<arch>-<YYYYmmdd>-<HHMMSS>/`` (NVIDIA's default is ``./``, where a
second run overwrites the first one's checkpoints). A workspace that already holds a run's checkpoints is refused
unless the run continues it (``--resume``) or replaces it (``--overwrite``, which first removes those checkpoints,
so that nothing of the old run is mixed into the new one: a ``model_best.pth.tar`` that the new run never beats, or
numbered checkpoints it would count as its own). Reports are never lost: see ``dllog.Report``.
"""
from __future__ import annotations

import datetime
import glob
import os
import re
from typing import List, Optional

from errors import UserError

RUNS_FOLDER = "runs"
BEST_NAME = "model_best.pth.tar"
NUMBERED = re.compile(r"checkpoint_(\d{4,})\.pth\.tar$")


def default_workspace(arch: str, now: Optional[datetime.datetime] = None) -> str:
    """``runs/<arch>-<YYYYmmdd>-<HHMMSS>`` for a run starting ``now``."""
    now = now or datetime.datetime.now()
    return os.path.join(RUNS_FOLDER, f"{arch}-{now.strftime('%Y%m%d-%H%M%S')}")


def numbered_name(epoch: int) -> str:
    """NVIDIA's name for the checkpoint written after ``epoch`` (counted from 0): ``checkpoint_0000.pth.tar``."""
    return f"checkpoint_{epoch:04d}.pth.tar"


def numbered_checkpoints(workspace: str) -> List[str]:
    """The numbered checkpoints in ``workspace``, oldest epoch first."""
    found = [path for path in glob.glob(os.path.join(glob.escape(workspace), "checkpoint_*.pth.tar"))
             if NUMBERED.search(os.path.basename(path))]
    return sorted(found, key=lambda path: int(NUMBERED.search(os.path.basename(path)).group(1)))


def run_checkpoints(workspace: str, checkpoint_filename: str) -> List[str]:
    """The checkpoints a run writes that are present in ``workspace``."""
    names = [os.path.join(workspace, checkpoint_filename), os.path.join(workspace, BEST_NAME)]
    return [path for path in names if os.path.isfile(path)] + numbered_checkpoints(workspace)


def check_workspace(workspace: str, checkpoint_filename: str, *, resume: bool, overwrite: bool,
                    writes_checkpoints: bool) -> List[str]:
    """The old checkpoints to remove before this run starts ([] when none); a ValueError (one line) when the
    workspace holds a run's checkpoints and the run neither continues nor replaces it."""
    if resume or not writes_checkpoints:
        return []
    found = run_checkpoints(workspace, checkpoint_filename)
    if found and not overwrite:
        raise UserError(f"workspace {workspace} already holds a run's checkpoints "
                         f"({', '.join(os.path.basename(p) for p in found[:3])}{', ...' if len(found) > 3 else ''}): "
                         f"continue it with --resume {os.path.join(workspace, checkpoint_filename)}, replace it with "
                         f"--overwrite, or choose another --workspace")
    return found


def keep_last(workspace: str, keep: int) -> List[str]:
    """Remove all but the last ``keep`` numbered checkpoints (``keep`` < 0: keep all); returns the removed paths."""
    if keep < 0:
        return []
    numbered = numbered_checkpoints(workspace)
    removed = numbered[: len(numbered) - keep] if keep else numbered
    for path in removed:
        os.remove(path)
    return removed
