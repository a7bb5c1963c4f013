"""Files written whole or not at all: a temporary file beside the target, renamed over it when complete.

Checkpoints (:func:`checkpoints.save_checkpoint`), reports, tables and the tools' outputs are written this way, so
that a crash, a kill or a full disk never leaves a half-written file under the target's name. A temporary file left
by a killed writer is recognized by its name and removed by the next run (:func:`remove_stale_temporaries`).
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
from typing import Iterator, List

from errors import UserError

def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Temporary files are named ``.<name>.<pid>-<8 random characters>.tmp<extension>`` beside their target: hidden,
# recognizably this project's, and carrying the writer's process id, so that a later run can tell a file left by a
# killed save (its writer is gone) from one being written now (see remove_stale_temporaries).
TEMPORARY_NAME = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)-[a-z0-9_]{8}\.tmp(\.[A-Za-z0-9]+)?$")


def temporary_prefix_suffix(path: str):
    """(prefix, suffix) of the temporary files written for ``path`` (see TEMPORARY_NAME)."""
    return f".{os.path.basename(path)}.{os.getpid()}-", f".tmp{os.path.splitext(path)[1]}"


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path beside ``path`` (same extension); on success it gets the usual file mode (umask) and
    is renamed to ``path``, on failure it is removed: ``path`` is either the complete new file or what it was."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    prefix, suffix = temporary_prefix_suffix(path)
    handle, temporary = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=directory)
    os.close(handle)
    try:
        yield temporary
        os.chmod(temporary, 0o666 & ~current_umask())  # mkstemp makes the file private
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def check_writable(path: str) -> None:
    """Create ``path``'s folder if needed and create and remove one of its temporary files there: an OSError now
    (a file where a folder should be, no permission, a read-only file system, a name too long for the file system,
    counting the temporary name's decoration) instead of at the first save, an epoch later."""
    directory = os.path.dirname(os.path.abspath(os.fspath(path)))
    os.makedirs(directory, exist_ok=True)
    prefix, suffix = temporary_prefix_suffix(os.fspath(path))
    handle, temporary = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=directory)
    os.close(handle)
    os.unlink(temporary)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def remove_stale_temporaries(directory: str) -> List[str]:
    """Remove the temporary files that a killed save left in ``directory`` (not its subfolders): only names of
    :data:`TEMPORARY_NAME`'s pattern whose writing process no longer runs on this machine. Returns the paths
    removed; a file that cannot be removed is left (it is named by the caller's log, not an error)."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in sorted(names):
        match = TEMPORARY_NAME.match(name)
        if not match or _process_alive(int(match.group("pid"))):
            continue
        path = os.path.join(directory, name)
        try:
            if os.path.isfile(path) and not os.path.islink(path):
                os.unlink(path)
                removed.append(path)
        except OSError:
            continue
    return removed


def check_output_folder(path: str) -> str:
    """The folder an output file goes to; a UserError when it does not exist."""
    directory = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(directory):
        raise UserError(f"{path}: the folder {directory} does not exist")
    return directory


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[str]:
    """:func:`atomic_path` after checking that the output folder exists (a UserError if not)."""
    check_output_folder(path)
    with atomic_path(path) as temporary:
        yield temporary


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_output(path) as temporary:
        with open(temporary, "w", encoding="utf-8") as stream:
            stream.write(text)
