"""Pieces every backend shares: the error type, ImageNet constants, the folder listing and sharding."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from errors import UserError

logger = logging.getLogger(__name__)

# ImageNet channel statistics on the 0-255 scale (RGB order).
IMAGENET_MEAN_255 = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD_255 = (0.229 * 255, 0.224 * 255, 0.225 * 255)

# Validation resizes the shorter side to image_size + CROP_PADDING, then takes a centre crop.
CROP_PADDING = 32

# RandomResizedCrop's ranges (relative area, aspect ratio), as in torchvision and DLE.
RANDOM_AREA = (0.08, 1.0)
RANDOM_ASPECT_RATIO = (3.0 / 4.0, 4.0 / 3.0)


class DataError(UserError):
    """A problem with the data or the data-loading configuration; its message is one line."""


@dataclass(frozen=True)
class ImageFolderListing:
    """One split of an ImageFolder tree: class names and (path, class index) pairs.

    The order is exactly torchvision ImageFolder's: classes are the sorted sub-folder names,
    files are found by a sorted ``os.walk`` of each class folder (following links) and kept when
    their extension is one of torchvision's image extensions (case-insensitive). Unlike
    ImageFolder, links are followed once: a folder reached again (a symlink loop, two links to
    one folder) and a file reached again (a link to a file already listed) are listed once, with
    a warning naming the class.
    """

    root: Path
    classes: tuple[str, ...]
    samples: tuple[tuple[str, int], ...]

    def __len__(self) -> int:
        return len(self.samples)

    def without(self, excluded: set[str]) -> "ImageFolderListing":
        """The same listing less the given paths (unreadable files)."""
        if not excluded:
            return self
        kept = tuple(sample for sample in self.samples if sample[0] not in excluded)
        return ImageFolderListing(self.root, self.classes, kept)


def list_image_folder(root: Path | str, split: str) -> ImageFolderListing:
    """List ``root/split`` in ImageFolder order; raise DataError when it cannot be used."""
    folder = Path(root).expanduser() / split
    if not folder.exists():
        raise DataError(f"{split} folder not found: {folder} (expected {folder}/<class>/<image>)")
    if not folder.is_dir():
        raise DataError(f"{split} path is not a folder: {folder}")
    try:
        classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    except OSError as error:
        raise DataError(f"cannot read {split} folder {folder}: {error.strerror or error}") from error
    if not classes:
        raise DataError(f"empty {split} data set: no class folders in {folder} (expected {folder}/<class>/<image>)")

    samples: list[tuple[str, int]] = []
    empty_classes: list[Path] = []
    for class_index, name in enumerate(classes):
        class_dir = folder / name
        count_before = len(samples)
        samples.extend((path, class_index) for path in _class_images(class_dir))
        if len(samples) == count_before:
            empty_classes.append(class_dir)
    if empty_classes:
        more = f" (and {len(empty_classes) - 1} more)" if len(empty_classes) > 1 else ""
        raise DataError(
            f"class folder has no images: {empty_classes[0]}{more}; "
            f"image extensions are {', '.join(IMG_EXTENSIONS)}"
        )
    return ImageFolderListing(folder, tuple(classes), tuple(samples))


def _class_images(class_dir: Path) -> list[str]:
    """The image files under one class folder in ``sorted(os.walk(followlinks=True))`` order, each real folder and
    file (by its path with links resolved) once; DataError when a folder cannot be read."""
    folders: list[tuple[str, list[str]]] = []
    seen: set[str] = set()
    repeated: list[str] = []
    pending = [str(class_dir)]
    while pending:
        dirpath = pending.pop()
        real = os.path.realpath(dirpath)
        if real in seen:
            repeated.append(dirpath)
            continue
        seen.add(real)
        try:
            with os.scandir(dirpath) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError as error:
            what = "class folder" if dirpath == str(class_dir) else f"folder in class {class_dir.name}:"
            raise DataError(f"cannot read {what} {dirpath}: {error.strerror or error}") from error
        files, subfolders = [], []
        for entry in entries:
            if entry.is_dir():  # follows links, as os.walk(followlinks=True)
                subfolders.append(entry.path)
            elif has_file_allowed_extension(entry.name, IMG_EXTENSIONS):
                target = os.path.realpath(entry.path) if entry.is_symlink() else os.path.join(real, entry.name)
                if target in seen:
                    repeated.append(entry.path)
                    continue
                seen.add(target)
                files.append(entry.path)
        folders.append((dirpath, files))
        pending.extend(reversed(subfolders))  # depth first in name order: the first path to a folder is kept
    if repeated:
        logger.warning("class folder %s reaches %d folder(s) or file(s) again through links (e.g. %s); each is "
                       "listed once", class_dir, len(repeated), repeated[0])
    return [path for _, files in sorted(folders) for path in files]


def check_same_classes(train: ImageFolderListing, val: ImageFolderListing) -> None:
    """Labels are class indices, so both splits must have the same class folders."""
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        detail = "; ".join(
            part
            for part in (
                f"only in train: {', '.join(only_train[:5])}" if only_train else "",
                f"only in val: {', '.join(only_val[:5])}" if only_val else "",
            )
            if part
        ) or "same names, different order"
        raise DataError(f"train and val class folders differ ({detail}): {train.root} vs {val.root}")


def shard_range(num_samples: int, rank: int, world_size: int) -> range:
    """This rank's contiguous part of the samples (DALI's file reader splits the same way)."""
    return range(num_samples * rank // world_size, num_samples * (rank + 1) // world_size)


def train_batches_per_rank(num_samples: int, batch_size: int, world_size: int) -> int:
    """Full batches per rank per epoch: the shards are padded to ceil(N / world), then the
    remainder smaller than a batch is dropped, so every rank yields the same count."""
    return math.ceil(num_samples / world_size) // batch_size


def val_batches_per_rank(num_samples: int, batch_size: int, world_size: int) -> int:
    """Validation batches per rank: enough for the largest shard, the same on every rank."""
    return max(1, math.ceil(math.ceil(num_samples / world_size) / batch_size))


def val_batch_sizes(shard_size: int, num_batches: int, batch_size: int) -> list[int]:
    """Split a shard into exactly `num_batches` batches of at most `batch_size`.

    Full batches first; when the shard is one sample short of needing the last batch (shards
    differ by at most one sample), the final full batch gives one sample to it, so no batch is
    empty unless the shard has fewer samples than batches.
    """
    sizes = []
    left = shard_size
    for index in range(num_batches):
        later = num_batches - index - 1
        size = max(0, min(batch_size, left - later))
        sizes.append(size)
        left -= size
    assert left == 0, (shard_size, num_batches, batch_size)
    return sizes


def resolve_device(device: torch.device | str | None) -> torch.device:
    """None means the current CUDA device when there is one, else the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DataError(f"device {device} requested but CUDA is not available; use device='cpu'")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


class Normalizer:
    """uint8 NCHW -> float32 normalized with the ImageNet mean/std, in the requested memory format.

    (x - mean) / std is computed as x * scale + shift: two in-place passes over float data.
    """

    def __init__(self, device: torch.device, memory_format: torch.memory_format):
        std = torch.tensor(IMAGENET_STD_255, dtype=torch.float32)
        mean = torch.tensor(IMAGENET_MEAN_255, dtype=torch.float32)
        self.scale = (1.0 / std).view(1, 3, 1, 1).to(device)
        self.shift = (-mean / std).view(1, 3, 1, 1).to(device)
        self.memory_format = memory_format

    def __call__(self, images_uint8: torch.Tensor) -> torch.Tensor:
        images = images_uint8.to(torch.float32, memory_format=self.memory_format)
        return images.mul_(self.scale).add_(self.shift)
