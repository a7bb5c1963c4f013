"""ILSVRC2012 from its two official tars to a checked ImageFolder tree, in one command.

    python -m dataloading.prepare_imagenet --train-tar ILSVRC2012_img_train.tar \\
        --val-tar ILSVRC2012_img_val.tar --out /data/imagenet

writes ``train/<wnid>/<wnid>_<n>.JPEG`` and ``val/<wnid>/ILSVRC2012_val_<8 digits>.JPEG`` (either tar alone is
fine). The tars are read as streams, the training tar's 1,000 nested class tars straight from it, so nothing but
the images lands on disk; the validation labels (the wnid of each of the 50,000 validation images) ship in
``dataloading/data/ilsvrc2012_val_wnids.txt.gz``, so nothing is downloaded.

Checks:

* before starting: both tars are tars of the ILSVRC2012 layout (their first member), and the free space on the
  output's file system covers what is left to extract (the tars' size plus ``SPACE_MARGIN``);
* while extracting: every member has the layout (class tars ``<wnid>.tar`` of flat image files; validation images
  ``ILSVRC2012_val_<8 digits>.JPEG`` at the top, each with a label);
* afterwards, per split: the files in each class folder are exactly those of the tar, the totals are ILSVRC2012's
  (1,281,167 training images in 1,000 classes; 50,000 validation images, 50 per class), and every image passes
  ``dataloading.integrity``'s quick header check (the one the DALI backends run). One summary line reports it.

A subset (a partial tar, or ``--classes``) needs ``--allow-partial``: then only the classes found in the tars are
created, and in both splits (a class without validation images gets no training folder, and the other way round).

Idempotent and resumable: each image is written to ``.<name>.part`` and renamed, so a file under its final name is
complete; a rerun after an interruption skips the images already there (same size as in the tar) and writes the
rest. A split that passed its checks gets a marker in ``<out>/.prepare_imagenet/``; a rerun leaves such a split
alone without reading its tar (delete ``<out>/.prepare_imagenet/<split>.json`` to have it checked and completed
again).

Bad input (a missing file, not a tar, a tar of another layout, a validation image without a label, too little
space, a subset without ``--allow-partial``) stops with one ``error: ...`` line and exit status 2; what was
extracted until then stays, for the rerun.
"""
from __future__ import annotations

import gzip
import json
import logging
import os
import re
import shutil
import stat
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Dict, Iterable, List, Optional, Set, TextIO

from torchvision.datasets.folder import IMG_EXTENSIONS

from . import integrity
from .common import DataError, check_same_classes, list_image_folder

logger = logging.getLogger(__name__)

SPLITS = ("train", "val")
# ILSVRC2012's sizes: split -> (images, classes); the validation set also has VAL_PER_CLASS images in each class.
ILSVRC2012_COUNTS = {"train": (1_281_167, 1000), "val": (50_000, 1000)}
VAL_PER_CLASS = 50
VAL_LABELS = Path(__file__).resolve().parent / "data" / "ilsvrc2012_val_wnids.txt.gz"
WNID = re.compile(r"n\d{8}")
VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG")
# Extracted files take a little more room than their bytes in the tar (file-system blocks, directories).
SPACE_MARGIN = 0.02
STATE_FOLDER = ".prepare_imagenet"
PART_SUFFIX = ".part"
# Tar stream reads: tarfile copies the rest of its buffer on every read, so much larger buffers cost more than
# the system calls they save.
STREAM_BUFFER = 64 << 10
COPY_BUFFER = 1 << 20
# Progress: a redrawn line on a terminal at most this often; otherwise one log line per PROGRESS_LOG_SECONDS.
PROGRESS_REDRAW_SECONDS = 0.25
PROGRESS_LOG_SECONDS = 60.0
GB = 1e9


def load_val_labels(path: Path = VAL_LABELS) -> List[str]:
    """The wnid of each validation image: element i - 1 is the class of ``ILSVRC2012_val_<i>.JPEG``."""
    with gzip.open(path, "rt", encoding="ascii") as stream:
        return [line.strip() for line in stream if line.strip() and not line.startswith("#")]


def val_label(name: str, labels: List[str], tar_path: str) -> str:
    """The wnid of a validation image by its file name; DataError when the name has no label."""
    match = VAL_NAME.fullmatch(name)
    number = int(match.group(1)) if match else 0
    if not 1 <= number <= len(labels):
        raise DataError(f"{tar_path}: no label for validation image {name} (labelled: ILSVRC2012_val_00000001.JPEG "
                        f"... ILSVRC2012_val_{len(labels):08d}.JPEG)")
    return labels[number - 1]


# --- reading the tars -----------------------------------------------------------------------------------------


class CountingReader:
    """A binary file object that counts the bytes read through it (the progress of a stream)."""

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        self.bytes_read = 0

    def read(self, size: int = -1) -> bytes:
        # read1: what one read of the file gives, without waiting for `size` bytes from a pipe (tarfile asks again).
        data = self.stream.read1(size)
        self.bytes_read += len(data)
        return data

    def close(self) -> None:
        self.stream.close()


def is_regular_file(path: str) -> bool:
    """False for a pipe or a device: those can be read once only and have no size."""
    return stat.S_ISREG(os.stat(path).st_mode)


def open_stream(path: str, reader: BinaryIO) -> tarfile.TarFile:
    try:
        return tarfile.open(fileobj=reader, mode="r|*", bufsize=STREAM_BUFFER)
    except tarfile.ReadError as error:
        raise DataError(f"{path}: not a tar file ({error})") from error


def member_name(member: tarfile.TarInfo) -> str:
    name = member.name
    while name.startswith("./"):
        name = name[2:]
    return name


def flat_image_name(name: str) -> bool:
    """A plain file name (no folder, not hidden) with an image extension: safe to write under a class folder."""
    return ("/" not in name and "\\" not in name and not name.startswith(".")
            and name.lower().endswith(IMG_EXTENSIONS))


def train_class(member: tarfile.TarInfo, path: str) -> str:
    """The wnid of a member of the training tar, which must be a class tar ``<wnid>.tar``."""
    name = member_name(member)
    if member.isfile() and name.endswith(".tar") and WNID.fullmatch(name[:-4]):
        return name[:-4]
    if VAL_NAME.fullmatch(name):
        hint = "; it looks like the validation tar (give it to --val-tar)"
    else:
        hint = " (a tar of another layout?)"
    raise DataError(f"{path}: member {member.name!r} is not a class tar <wnid>.tar: the ILSVRC2012 training tar "
                    f"holds 1,000 tars n01440764.tar ... n15075141.tar{hint}")


def val_image_name(member: tarfile.TarInfo, path: str) -> str:
    """The file name of a member of the validation tar, which must be an image at the top."""
    name = member_name(member)
    if member.isfile() and flat_image_name(name):
        return name
    if member.isfile() and name.endswith(".tar") and WNID.fullmatch(name[:-4]):
        hint = "; it looks like the training tar (give it to --train-tar)"
    else:
        hint = " (a tar of another layout?)"
    raise DataError(f"{path}: member {member.name!r} is not a validation image: the ILSVRC2012 validation tar holds "
                    f"50,000 images ILSVRC2012_val_<8 digits>.JPEG and no folders{hint}")


def check_first_member(split: str, path: str, labels: Optional[List[str]]) -> None:
    """Before any writing: the file is a tar and starts the way the split's ILSVRC2012 tar does."""
    with open(path, "rb") as raw:
        archive = open_stream(path, raw)
        try:
            member = archive.next()
        except tarfile.ReadError as error:
            raise DataError(f"{path}: not a tar file ({error})") from error
        if member is None:
            raise DataError(f"{path}: the tar is empty")
        if split == "train":
            train_class(member, path)
        else:
            val_label(val_image_name(member, path), labels, path)


# --- writing --------------------------------------------------------------------------------------------------


def write_image(folder: Path, name: str, source: BinaryIO, size: int) -> bool:
    """Write one image as ``folder/name`` through a temporary ``.name.part``; skip it when it is already there
    with its size (a file under its final name is always complete). True when written."""
    target = folder / name
    try:
        if target.stat().st_size == size:
            return False
    except FileNotFoundError:
        pass
    # A fixed, non-image temporary name (unlike checkpoints.atomic_path's random one): a process killed mid-write
    # leaves a file that no loader lists and that the check after extraction finds and removes.
    temporary = folder / f".{name}{PART_SUFFIX}"
    try:
        with open(temporary, "wb") as output:
            shutil.copyfileobj(source, output, COPY_BUFFER)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return True


@dataclass
class Extracted:
    """What one split's tar held (after the class filter): image names per class, and what this run wrote."""

    split: str
    tar: str
    names: Dict[str, Set[str]] = field(default_factory=dict)
    written: int = 0
    skipped_classes: Set[str] = field(default_factory=set)

    @property
    def images(self) -> int:
        return sum(len(names) for names in self.names.values())

    def add(self, wnid: str, name: str, was_written: bool) -> None:
        self.names.setdefault(wnid, set()).add(name)
        self.written += was_written


class Progress:
    """Images, gigabytes and ETA of one tar: a line redrawn in place on a terminal, else a log line now and then."""

    def __init__(self, label: str, total_bytes: Optional[int], stream: Optional[TextIO] = None):
        self.label = label
        self.total_bytes = total_bytes or None
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = self.last = time.monotonic()
        self.drawn = False

    def text(self, images: int, bytes_read: int) -> str:
        elapsed = time.monotonic() - self.start
        rate = bytes_read / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.label}: {images:,} images", f"{bytes_read / GB:.1f}"]
        if self.total_bytes:
            fraction = min(1.0, bytes_read / self.total_bytes)
            parts[-1] += f" / {self.total_bytes / GB:.1f} GB ({100 * fraction:.0f} %)"
        else:
            parts[-1] += " GB"
        parts.append(f"{rate / 1e6:.0f} MB/s")
        if self.total_bytes and rate > 0:
            parts.append(f"ETA {duration(max(0.0, self.total_bytes - bytes_read) / rate)}")
        return ", ".join(parts)

    def update(self, images: int, bytes_read: int) -> None:
        now = time.monotonic()
        if now - self.last < (PROGRESS_REDRAW_SECONDS if self.terminal else PROGRESS_LOG_SECONDS):
            return
        self.last = now
        self.show(images, bytes_read)

    def show(self, images: int, bytes_read: int) -> None:
        if self.terminal:
            self.stream.write("\r\033[K" + self.text(images, bytes_read))
            self.stream.flush()
            self.drawn = True
        else:
            logger.info("%s", self.text(images, bytes_read))

    def close(self, images: int, bytes_read: int) -> None:
        self.show(images, bytes_read)
        if self.terminal:
            self.stream.write("\n")
            self.stream.flush()


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def extract_val(path: str, out: Path, labels: List[str], keep: Optional[Set[str]]) -> Extracted:
    """Stream the validation tar into ``out/val/<wnid>/``; images of classes outside `keep` are skipped."""
    result = Extracted("val", path)
    made: Set[str] = set()
    with open(path, "rb") as raw:
        reader = CountingReader(raw)
        progress = Progress("val", os.path.getsize(path) if is_regular_file(path) else None)
        archive = open_stream(path, reader)
        try:
            for member in archive:
                name = val_image_name(member, path)
                wnid = val_label(name, labels, path)
                if keep is not None and wnid not in keep:
                    result.skipped_classes.add(wnid)
                    continue
                folder = out / "val" / wnid
                if wnid not in made:
                    folder.mkdir(parents=True, exist_ok=True)
                    made.add(wnid)
                result.add(wnid, name, write_image(folder, name, archive.extractfile(member), member.size))
                progress.update(result.images, reader.bytes_read)
        except tarfile.ReadError as error:
            raise truncated(path, error, result, "") from error
        progress.close(result.images, reader.bytes_read)
    return result


def extract_train(path: str, out: Path, keep: Optional[Set[str]]) -> Extracted:
    """Stream the training tar into ``out/train/<wnid>/``, reading each nested class tar from the stream."""
    result = Extracted("train", path)
    with open(path, "rb") as raw:
        reader = CountingReader(raw)
        progress = Progress("train", os.path.getsize(path) if is_regular_file(path) else None)
        archive = open_stream(path, reader)
        member = None
        try:
            for member in archive:
                wnid = train_class(member, path)
                if keep is not None and wnid not in keep:
                    result.skipped_classes.add(wnid)
                    continue  # the stream skips the class tar's bytes on the next member
                folder = out / "train" / wnid
                folder.mkdir(parents=True, exist_ok=True)
                result.names.setdefault(wnid, set())
                images = tarfile.open(fileobj=archive.extractfile(member), mode="r|", bufsize=STREAM_BUFFER)
                for image in images:
                    name = member_name(image)
                    if not (image.isfile() and flat_image_name(name)):
                        raise DataError(f"{path}: {member.name} holds {image.name!r}, not an image file at its "
                                        "top (a class tar holds only <wnid>_<n>.JPEG files)")
                    written = write_image(folder, name, images.extractfile(image), image.size)
                    result.add(wnid, name, written)
                    progress.update(result.images, reader.bytes_read)
        except tarfile.ReadError as error:
            raise truncated(path, error, result, f" in {member.name}" if member is not None else "") from error
        progress.close(result.images, reader.bytes_read)
    return result


def truncated(path: str, error: Exception, result: Extracted, where: str) -> DataError:
    """A read error in the stream: the tar (or a class tar inside it) ends early or is not a tar there."""
    return DataError(f"{path}: truncated or damaged tar ({error}){where} after {result.images:,} images; those "
                     "stay extracted, and a rerun with a complete tar adds the rest")


# --- checks ---------------------------------------------------------------------------------------------------


def required_space(tars: Dict[str, str], out: Path, fraction: float) -> int:
    """Bytes still to be written: the tars' size (times `fraction` for a class subset) plus the margin, less the
    images already extracted (a resumed run)."""
    needed = 0
    for split, path in tars.items():
        if not is_regular_file(path):
            logger.warning("%s: size unknown (not a regular file); free space not checked for it", path)
            continue
        needed += max(0, int(os.path.getsize(path) * fraction * (1 + SPACE_MARGIN)) - folder_bytes(out / split))
    return needed


def folder_bytes(folder: Path) -> int:
    total = 0
    if not folder.is_dir():
        return 0
    for class_entry in os.scandir(folder):
        if class_entry.is_dir(follow_symlinks=False):
            for entry in os.scandir(class_entry.path):
                if entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
    return total


def existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_free_space(tars: Dict[str, str], out: Path, fraction: float) -> None:
    needed = required_space(tars, out, fraction)
    where = existing_ancestor(out)
    free = shutil.disk_usage(where).free
    if needed > free:
        raise DataError(f"not enough free space in {where}: {free / GB:.1f} GB free, about {needed / GB:.1f} GB "
                        f"needed (the tars' size + {100 * SPACE_MARGIN:.0f} %, less what is already extracted)")
    logger.info("free space in %s: %.1f GB, about %.1f GB needed", where, free / GB, needed / GB)


def remove_stale_parts(folder: Path) -> int:
    """Delete the temporary files a killed run left in the class folders; returns how many."""
    removed = 0
    for class_entry in os.scandir(folder):
        if class_entry.is_dir(follow_symlinks=False):
            for entry in os.scandir(class_entry.path):
                if entry.name.startswith(".") and entry.name.endswith(PART_SUFFIX):
                    os.unlink(entry.path)
                    removed += 1
    return removed


@dataclass
class SplitCheck:
    split: str
    images: int
    classes: int
    unreadable: Dict[str, str]
    full: bool  # the ILSVRC2012 counts

    def describe(self) -> str:
        text = f"{self.split} {self.images:,} images in {self.classes:,} classes"
        if self.split == "val" and self.full:
            text += f" ({VAL_PER_CLASS} each)"
        return text


def check_split(out: Path, extracted: Extracted, allow_partial: bool) -> SplitCheck:
    """The split on disk against its tar, against ILSVRC2012's counts (unless partial) and the header check."""
    split = extracted.split
    if not extracted.names:
        raise DataError(f"{extracted.tar}: no images of the selected classes")
    stale = remove_stale_parts(out / split)
    if stale:
        logger.info("%s: removed %d temporary files that an interrupted run left", split, stale)
    listing = list_image_folder(out, split)
    on_disk: Dict[str, Set[str]] = {name: set() for name in listing.classes}
    for path, label in listing.samples:
        on_disk[listing.classes[label]].add(os.path.relpath(path, out / split / listing.classes[label]))
    extra_classes = sorted(set(on_disk) - set(extracted.names))
    if extra_classes:
        raise DataError(f"{out / split} has class folders that the tar (with this run's class selection) does not "
                        f"fill: {', '.join(extra_classes[:5])}{' ...' if len(extra_classes) > 5 else ''}; remove them "
                        "or prepare into a new folder")
    for wnid, names in sorted(extracted.names.items()):
        if on_disk.get(wnid) != names:
            missing = sorted(names - on_disk.get(wnid, set()))
            extra = sorted(on_disk.get(wnid, set()) - names)
            if missing:
                detail = f"{len(missing)} missing (e.g. {missing[0]})"
            else:
                detail = f"{len(extra)} not from the tar (e.g. {extra[0]})"
            raise DataError(f"{out / split / wnid}: the images differ from the tar's: {detail}")

    images, classes = len(listing), len(listing.classes)
    expected_images, expected_classes = ILSVRC2012_COUNTS[split]
    full = images == expected_images and classes == expected_classes
    if split == "val" and full:
        per_class = {wnid: len(names) for wnid, names in on_disk.items()}
        full = set(per_class.values()) == {VAL_PER_CLASS}
    if not full and not allow_partial:
        per_class = f" ({VAL_PER_CLASS} per class)" if split == "val" else ""
        raise DataError(f"{split}: {images:,} images in {classes:,} classes, ILSVRC2012 has {expected_images:,} in "
                        f"{expected_classes:,}{per_class}: a partial tar? --allow-partial accepts a subset")
    unreadable = integrity.find_unreadable(listing, "quick")
    return SplitCheck(split, images, classes, unreadable, full)


# --- state of the output folder ------------------------------------------------------------------------------


def marker_path(out: Path, split: str) -> Path:
    return out / STATE_FOLDER / f"{split}.json"


def read_marker(out: Path, split: str) -> Optional[dict]:
    try:
        content = json.loads(marker_path(out, split).read_text())
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) and content.get("split") == split else None


def write_marker(out: Path, check: SplitCheck, extracted: Extracted, classes: Iterable[str]) -> None:
    path = marker_path(out, check.split)
    path.parent.mkdir(parents=True, exist_ok=True)
    content = {"split": check.split, "images": check.images, "classes": sorted(classes), "tar": extracted.tar,
               "ilsvrc2012_counts": check.full, "prepared": time.strftime("%Y-%m-%dT%H:%M:%S")}
    temporary = path.with_name(path.name + PART_SUFFIX)
    temporary.write_text(json.dumps(content, indent=1))
    os.replace(temporary, path)


def read_class_list(value: str) -> Set[str]:
    """``--classes``: a file with one wnid per line (``#`` comments), or wnids separated by commas."""
    if os.path.isfile(value):
        text = Path(value).read_text()
        items = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    else:
        items = [item.strip() for item in value.split(",")]
    wnids = {item for item in items if item}
    bad = sorted(item for item in wnids if not WNID.fullmatch(item))
    if bad or not wnids:
        raise DataError(f"--classes {value}: not a list of WordNet ids such as n01440764"
                        f"{' (' + bad[0] + ')' if bad else ''}")
    return wnids


# --- the command ----------------------------------------------------------------------------------------------


def prepare(out: Path, train_tar: Optional[str], val_tar: Optional[str], allow_partial: bool = False,
            classes: Optional[Set[str]] = None) -> str:
    """Prepare `out` from the tars; returns the summary line. Raises DataError (one line) on bad input."""
    allow_partial = allow_partial or classes is not None
    tars = {split: path for split, path in (("val", val_tar), ("train", train_tar)) if path}
    check_paths(out, tars)
    markers = {split: read_marker(out, split) for split in SPLITS}
    done = {split: markers[split] for split in tars if markers[split] is not None}
    todo = {split: path for split, path in tars.items() if split not in done}
    for split, marker in done.items():
        logger.info("%s: already prepared in %s (%s images from %s), left alone", split, out / split,
                    f"{marker.get('images', 0):,}", marker.get("tar"))
    if not todo:
        return f"{out}: already prepared (" + ", ".join(
            f"{split} {done[split].get('images', 0):,} images in {len(done[split].get('classes', [])):,} classes"
            for split in SPLITS if split in done) + "), left alone"

    labels = load_val_labels() if "val" in todo else None
    for split, path in todo.items():
        if is_regular_file(path):
            check_first_member(split, path, labels)
    check_free_space(todo, out, len(classes) / ILSVRC2012_COUNTS["train"][1] if classes else 1.0)
    out.mkdir(parents=True, exist_ok=True)

    started = time.monotonic()
    keep = classes_to_keep(classes, markers, allow_partial)
    extracted = extract_splits(todo, out, labels, keep, allow_partial)
    checks = check_splits(out, extracted, allow_partial)
    os.sync()  # the images on disk before the markers that vouch for them
    for split, check in checks.items():
        write_marker(out, check, extracted[split], extracted[split].names)
    return result_line(out, checks, extracted, done, time.monotonic() - started)


def check_paths(out: Path, tars: Dict[str, str]) -> None:
    for split, path in tars.items():
        if not os.path.exists(path):
            raise DataError(f"--{split}-tar {path}: no such file")
        if os.path.isdir(path):
            raise DataError(f"--{split}-tar {path}: a folder, not a tar file")
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: exists and is not a folder")


def classes_to_keep(classes: Optional[Set[str]], markers: Dict[str, Optional[dict]],
                    allow_partial: bool) -> Optional[Set[str]]:
    """The classes to extract (None: all): `classes`, narrowed to those of a split prepared earlier."""
    keep = set(classes) if classes else None
    for marker in markers.values():  # a split prepared earlier decides the classes of the other
        if marker is not None and allow_partial:
            keep = set(marker.get("classes", [])) & keep if keep is not None else set(marker.get("classes", []))
    return keep


def extract_splits(todo: Dict[str, str], out: Path, labels: Optional[List[str]], keep: Optional[Set[str]],
                   allow_partial: bool) -> Dict[str, Extracted]:
    """Extract the splits to do, validation first: it is small, and with --allow-partial its classes decide the
    training classes (a validation class the training tar lacks is removed again)."""
    extracted: Dict[str, Extracted] = {}
    if "val" in todo:
        extracted["val"] = extract_val(todo["val"], out, labels, keep)
        if not extracted["val"].names:  # before reading the training tar for nothing
            raise DataError(f"{todo['val']}: no images of the selected classes")
    if "train" in todo:
        train_keep = keep
        if allow_partial and "val" in extracted:
            train_keep = set(extracted["val"].names) & keep if keep is not None else set(extracted["val"].names)
        extracted["train"] = extract_train(todo["train"], out, train_keep)
        if allow_partial and "val" in extracted:
            for wnid in sorted(set(extracted["val"].names) - set(extracted["train"].names)):
                shutil.rmtree(out / "val" / wnid)
                del extracted["val"].names[wnid]
                extracted["val"].skipped_classes.add(wnid)
    return extracted


def check_splits(out: Path, extracted: Dict[str, Extracted], allow_partial: bool) -> Dict[str, SplitCheck]:
    """Each extracted split checked (`check_split`), the two splits' classes against each other, and no image
    failing the header check."""
    checks = {split: check_split(out, result, allow_partial) for split, result in extracted.items()}
    if (out / "train").is_dir() and (out / "val").is_dir():
        check_same_classes(list_image_folder(out, "train"), list_image_folder(out, "val"))
    unreadable = {path: reason for check in checks.values() for path, reason in check.unreadable.items()}
    if unreadable:
        path, reason = next(iter(unreadable.items()))
        raise DataError(f"{len(unreadable):,} extracted images fail the header check, e.g. {path} ({reason}): "
                        "a damaged tar? (main.py skips such files with a warning)")
    return checks


def result_line(out: Path, checks: Dict[str, SplitCheck], extracted: Dict[str, Extracted], done: Dict[str, dict],
                seconds: float) -> str:
    """The one line `prepare` returns."""
    written = sum(result.written for result in extracted.values())
    skipped = sorted(set().union(*(result.skipped_classes for result in extracted.values())))
    parts = [check.describe() for split, check in sorted(checks.items(), key=lambda item: SPLITS.index(item[0]))]
    parts += [f"{split} as prepared before" for split in done]
    counts = ("ILSVRC2012's counts" if all(check.full for check in checks.values())
              else f"a subset (--allow-partial{f'; {len(skipped):,} classes left out' if skipped else ''})")
    return (f"prepared {out}: {'; '.join(parts)}; {counts}; every image passes the header check; "
            f"{written:,} images written in this run, {duration(seconds)}")


def build_parser():
    from image_classification.tools import ToolParser

    parser = ToolParser(prog="python -m dataloading.prepare_imagenet",
                        description="ILSVRC2012's training and validation tars to out/train/<wnid>/*.JPEG and "
                                    "out/val/<wnid>/*.JPEG, streamed, resumable and checked")
    parser.add_argument("--train-tar", metavar="TAR", help="ILSVRC2012_img_train.tar (1,000 nested class tars)")
    parser.add_argument("--val-tar", metavar="TAR", help="ILSVRC2012_img_val.tar (50,000 images)")
    parser.add_argument("--out", required=True, metavar="DIR", help="data folder for main.py (created if missing)")
    parser.add_argument("--allow-partial", action="store_true",
                        help="accept a subset of ILSVRC2012: only the classes present are created, in both splits")
    parser.add_argument("--classes", metavar="LIST", default=None,
                        help="only these classes: wnids separated by commas, or a file with one per line "
                             "(implies --allow-partial)")
    return parser


def main(argv=None) -> int:
    from image_classification.tools import tool_main

    @tool_main
    def run(argv) -> int:
        args = build_parser().parse_args(argv)
        if not args.train_tar and not args.val_tar:
            raise DataError("give --train-tar, --val-tar or both")
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
        classes = read_class_list(args.classes) if args.classes else None
        print(prepare(Path(args.out).expanduser(), args.train_tar, args.val_tar, args.allow_partial, classes))
        return 0

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
