"""`get_loaders`: checks the data that the options name, then builds the chosen backend's loaders."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

import torch

from . import integrity
from .common import DataError, ImageFolderListing, check_same_classes, list_image_folder, train_batches_per_rank
from .options import LoaderOptions

logger = logging.getLogger(__name__)


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


def get_loaders(options: LoaderOptions) -> Loaders:
    """Build the train and/or val loaders of one backend, as `options` says; see the package docstring."""
    if options.backend == "synthetic":
        return _synthetic_loaders(options)
    _check_backend_can_run(options)
    train_listing, val_listing = _listings(options)
    build = _backend_loader(options)
    train_loader = build(train_listing, options, training=True) if train_listing is not None else None
    val_loader = build(val_listing, options, training=False) if val_listing is not None else None
    logger.info("data backend %s: %s", options.backend, ", ".join(
        f"{split} {len(listing)} images, {len(loader)} batches per rank"
        for split, listing, loader in (("train", train_listing, train_loader), ("val", val_listing, val_loader))
        if loader is not None))
    classes = (train_listing if train_listing is not None else val_listing).classes
    return Loaders(train_loader, val_loader, classes, options.backend)


def _synthetic_loaders(options: LoaderOptions) -> Loaders:
    from .synthetic import SyntheticLoader

    train_loader = SyntheticLoader(options, training=True) if options.train else None
    val_loader = SyntheticLoader(options, training=False) if options.val else None
    classes = (train_loader if train_loader is not None else val_loader).classes
    return Loaders(train_loader, val_loader, classes, options.backend)


def _check_backend_can_run(options: LoaderOptions) -> None:
    """The data folder exists; DALI is installed (checked before the time spent listing the data); dali-gpu has a
    GPU."""
    if options.data_root is None:
        raise DataError(f"data backend {options.backend!r} needs a data folder with train/ and val/")
    if not options.data_root.is_dir():
        raise DataError(f"data folder not found: {options.data_root}")
    if options.dali:
        from .dali import import_dali

        import_dali()
        if options.backend == "dali-gpu" and options.device.type != "cuda":
            raise DataError("data backend 'dali-gpu' needs a CUDA GPU and none is in use; "
                            "use --data-backend dali-cpu or pytorch")


def _listing(data_root: Path, split: str, scan_level: str | None, cache_dir) -> ImageFolderListing:
    listing = list_image_folder(data_root, split)
    if scan_level is not None:
        listing = integrity.drop_unreadable(listing, split, scan_level, cache_dir=cache_dir)
        if len(listing) == 0:
            raise DataError(f"empty {split} data set: no readable images in {listing.root}")
    return listing


def _listings(options: LoaderOptions) -> tuple[ImageFolderListing | None, ImageFolderListing | None]:
    """The train and val listings asked for, less unreadable files, checked against each other and the batch."""
    # DALI's decoder would abort on a truncated file, so DALI always gets at least the quick scan;
    # PyTorch skips unreadable files as it meets them and only scans when asked to.
    scan_level = "full" if options.verify_data else ("quick" if options.dali else None)
    root, cache_dir = options.data_root, options.cache_dir
    train = _listing(root, "train", scan_level, cache_dir) if options.train else None
    val = _listing(root, "val", scan_level, cache_dir) if options.val else None
    if train is not None and val is not None:
        check_same_classes(train, val)
    batch_size, world_size = options.batch_size, options.world_size
    if train is not None and (len(train) < world_size
                              or train_batches_per_rank(len(train), batch_size, world_size) == 0):
        raise DataError(f"training set too small: {len(train)} images in {train.root} "
                        f"make no full batch of {batch_size} on each of {world_size} ranks")
    return train, val


def _backend_loader(options: LoaderOptions) -> Callable[..., Loader]:
    """The backend's loader maker, called as ``make(listing, options, training=...)``."""
    if options.dali:
        from .dali import make_dali_loader

        return make_dali_loader
    from .pytorch import PytorchLoader

    return PytorchLoader
