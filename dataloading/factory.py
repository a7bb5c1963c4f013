"""`get_loaders`: checks the arguments and the data, then builds the chosen backend's loaders."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import torch

import choices

from . import integrity
from .common import (
    RANDOM_AREA,
    DataError,
    ImageFolderListing,
    augmentation_name,
    check_same_classes,
    interpolation_name,
    list_image_folder,
    resolve_device,
    train_batches_per_rank,
)

logger = logging.getLogger(__name__)

BACKENDS = choices.DATA_BACKENDS
BACKEND_ALIASES = choices.DATA_BACKEND_ALIASES
MEMORY_FORMATS = dict(zip(choices.MEMORY_FORMATS, (torch.contiguous_format, torch.channels_last)))


class Loader(Protocol):
    """What every backend's train and val loader provides (see the package docstring)."""

    classes: tuple[str, ...]
    batch_size: int
    training: bool
    device: torch.device
    num_samples: int

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def set_epoch(self, epoch: int) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Loaders:
    """The loaders `get_loaders` built; `train` or `val` is None when it was not asked for."""

    train: Loader | None
    val: Loader | None
    classes: tuple[str, ...]
    backend: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def close(self) -> None:
        """Stop what the loaders run in the background (DataLoader worker processes, DALI pipelines and
        their threads) now, rather than whenever the garbage collector or the interpreter's exit gets to them."""
        for loader in (self.train, self.val):
            if loader is not None:
                loader.close()


def backend_name(backend: str) -> str:
    name = BACKEND_ALIASES.get(backend, backend)
    if name not in BACKENDS:
        raise DataError(f"unknown data backend {backend!r}; valid: {', '.join(BACKENDS)} "
                        f"(or {', '.join(BACKEND_ALIASES)})")
    return name


def memory_format_of(memory_format: torch.memory_format | str) -> torch.memory_format:
    if isinstance(memory_format, str):
        if memory_format not in MEMORY_FORMATS:
            raise DataError(f"unknown memory format {memory_format!r}; valid: {', '.join(MEMORY_FORMATS)}")
        return MEMORY_FORMATS[memory_format]
    if memory_format not in (torch.contiguous_format, torch.channels_last):
        raise DataError(f"unsupported memory format {memory_format}; use torch.contiguous_format or "
                        "torch.channels_last")
    return memory_format


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise DataError(f"{name} must be a positive integer, got {value!r}")


def _listing(data_root: Path, split: str, scan_level: str | None, cache_dir) -> ImageFolderListing:
    listing = list_image_folder(data_root, split)
    if scan_level is not None:
        listing = integrity.drop_unreadable(listing, split, scan_level, cache_dir=cache_dir)
        if len(listing) == 0:
            raise DataError(f"empty {split} data set: no readable images in {listing.root}")
    return listing


def get_loaders(
    backend: str,
    data_root: str | Path | None,
    batch_size: int,
    *,
    workers: int = 5,
    image_size: int = 224,
    interpolation: str = "bilinear",
    augmentation: str | None = None,
    crop_area: tuple[float, float] = RANDOM_AREA,
    memory_format: torch.memory_format | str = torch.contiguous_format,
    device: torch.device | str | None = None,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    prefetch: int = 2,
    verify_data: bool = False,
    train: bool = True,
    val: bool = True,
    val_batch_size: int | None = None,
    synthetic_batches: int = 100,
    num_classes: int = 1000,
    cache_dir: str | Path | None = None,
) -> Loaders:
    """Build the train and/or val loaders of one backend; see the package docstring."""
    name = backend_name(backend)
    val_batch_size = batch_size if val_batch_size is None else val_batch_size
    _check_positive(batch_size=batch_size, val_batch_size=val_batch_size, image_size=image_size,
                    world_size=world_size, synthetic_batches=synthetic_batches, num_classes=num_classes)
    if not isinstance(workers, int) or workers < 0:
        raise DataError(f"workers must be a non-negative integer, got {workers!r}")
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside 0..{world_size - 1} (world size {world_size})")
    interpolation = interpolation_name(interpolation)
    augmentation = augmentation_name(augmentation)
    memory_format = memory_format_of(memory_format)
    device = resolve_device(device)
    if not (train or val):
        raise DataError("neither train nor val loader requested")
    if not 0.0 < crop_area[0] <= crop_area[1] <= 1.0:
        raise DataError(f"random crop area must satisfy 0 < min <= max <= 1, got {tuple(crop_area)}")

    if name == "synthetic":
        from .synthetic import SyntheticLoader

        def synthetic(training: bool, size: int):
            return SyntheticLoader(batch_size=size, image_size=image_size, num_classes=num_classes,
                                   num_batches=synthetic_batches, memory_format=memory_format, device=device,
                                   seed=seed + rank, training=training)

        train_loader = synthetic(True, batch_size) if train else None
        val_loader = synthetic(False, val_batch_size) if val else None
        classes = (train_loader if train_loader is not None else val_loader).classes
        return Loaders(train_loader, val_loader, classes, name)

    if data_root is None:
        raise DataError(f"data backend {name!r} needs a data folder with train/ and val/")
    data_root = Path(data_root).expanduser()
    if not data_root.is_dir():
        raise DataError(f"data folder not found: {data_root}")
    dali_backend = name.startswith("dali")
    if dali_backend:
        from .dali import import_dali

        import_dali()  # fail on a missing DALI before spending time on listing the data
        if name == "dali-gpu" and device.type != "cuda":
            raise DataError("data backend 'dali-gpu' needs a CUDA GPU and none is in use; "
                            "use --data-backend dali-cpu or pytorch")
    # DALI's decoder would abort on a truncated file, so DALI always gets at least the quick scan;
    # PyTorch skips unreadable files as it meets them and only scans when asked to.
    scan_level = "full" if verify_data else ("quick" if dali_backend else None)
    train_listing = _listing(data_root, "train", scan_level, cache_dir) if train else None
    val_listing = _listing(data_root, "val", scan_level, cache_dir) if val else None
    if train_listing is not None and val_listing is not None:
        check_same_classes(train_listing, val_listing)
    if train_listing is not None and (len(train_listing) < world_size
                                      or train_batches_per_rank(len(train_listing), batch_size, world_size) == 0):
        raise DataError(f"training set too small: {len(train_listing)} images in {train_listing.root} "
                        f"make no full batch of {batch_size} on each of {world_size} ranks")

    options = dict(workers=workers, image_size=image_size, interpolation=interpolation, crop_area=tuple(crop_area),
                   memory_format=memory_format, device=device, rank=rank, world_size=world_size, seed=seed,
                   prefetch=prefetch)
    if dali_backend:
        from .dali import make_dali_loader

        def build(listing, training, size):
            return make_dali_loader(listing, training=training, gpu_decode=name == "dali-gpu", batch_size=size,
                                    augmentation=augmentation if training else None, **options)
    else:
        from .pytorch import PytorchLoader

        def build(listing, training, size):
            return PytorchLoader(listing, training=training, batch_size=size,
                                 augmentation=augmentation if training else None, **options)

    train_loader = build(train_listing, True, batch_size) if train_listing is not None else None
    val_loader = build(val_listing, False, val_batch_size) if val_listing is not None else None
    classes = (train_listing if train_listing is not None else val_listing).classes
    logger.info("data backend %s: %s", name, ", ".join(
        f"{split} {len(listing)} images, {len(loader)} batches per rank"
        for split, listing, loader in (("train", train_listing, train_loader), ("val", val_listing, val_loader))
        if loader is not None))
    return Loaders(train_loader, val_loader, classes, name)
