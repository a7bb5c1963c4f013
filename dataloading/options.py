"""`LoaderOptions`: everything `get_loaders` and the backends are told, checked once when it is made."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

import choices

from .common import RANDOM_AREA, DataError, resolve_device

BACKENDS = choices.DATA_BACKENDS
BACKEND_ALIASES = choices.DATA_BACKEND_ALIASES
MEMORY_FORMATS = dict(zip(choices.MEMORY_FORMATS, (torch.contiguous_format, torch.channels_last)))
AUGMENTATIONS = (None, "autoaugment")


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


def interpolation_name(interpolation: str) -> str:
    if interpolation not in choices.INTERPOLATIONS:
        raise DataError(f"unknown interpolation {interpolation!r}; valid: {', '.join(choices.INTERPOLATIONS)}")
    return interpolation


def augmentation_name(augmentation: str | None) -> str | None:
    if augmentation in ("", "none", "None"):
        augmentation = None
    if augmentation not in AUGMENTATIONS:
        valid = ", ".join(str(a) for a in AUGMENTATIONS)
        raise DataError(f"unknown augmentation {augmentation!r}; valid: {valid}")
    return augmentation


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise DataError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class LoaderOptions:
    """What to load and how; see the `dataloading` package docstring for each field's meaning.

    Making one checks every field (DataError naming the bad one) and stores it in its canonical form: the backend
    alias resolved (``syntetic`` -> ``synthetic``), `data_root` a Path (or None), `memory_format` a
    torch.memory_format ("nchw"/"nhwc" accepted), `device` a torch.device (None: CUDA when available, else the
    CPU), `augmentation` None or a name, `crop_area` a tuple. The backends take the result as it is.
    `dataclasses.replace` checks the new fields the same way.
    """

    backend: str
    data_root: str | Path | None
    batch_size: int
    workers: int = 5
    image_size: int = 224
    interpolation: str = "bilinear"
    augmentation: str | None = None
    crop_area: tuple[float, float] = RANDOM_AREA
    memory_format: torch.memory_format | str = torch.contiguous_format
    device: torch.device | str | None = None
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    prefetch: int = 2
    verify_data: bool = False
    train: bool = True
    val: bool = True
    val_batch_size: int | None = None  # None: batch_size
    synthetic_batches: int = 100
    num_classes: int = 1000
    cache_dir: str | Path | None = None

    def __post_init__(self):
        canonical = dict(backend=backend_name(self.backend))
        _check_positive(batch_size=self.batch_size, val_batch_size=self.batch_size_for(training=False),
                        image_size=self.image_size, world_size=self.world_size,
                        synthetic_batches=self.synthetic_batches, num_classes=self.num_classes)
        if not isinstance(self.workers, int) or self.workers < 0:
            raise DataError(f"workers must be a non-negative integer, got {self.workers!r}")
        if not 0 <= self.rank < self.world_size:
            raise DataError(f"rank {self.rank} is outside 0..{self.world_size - 1} (world size {self.world_size})")
        canonical.update(interpolation=interpolation_name(self.interpolation),
                         augmentation=augmentation_name(self.augmentation),
                         memory_format=memory_format_of(self.memory_format),
                         device=resolve_device(self.device))
        if not (self.train or self.val):
            raise DataError("neither train nor val loader requested")
        if not 0.0 < self.crop_area[0] <= self.crop_area[1] <= 1.0:
            raise DataError(f"random crop area must satisfy 0 < min <= max <= 1, got {tuple(self.crop_area)}")
        canonical.update(crop_area=tuple(self.crop_area),
                         data_root=None if self.data_root is None else Path(self.data_root).expanduser())
        for name, value in canonical.items():
            object.__setattr__(self, name, value)  # frozen: set once, here

    def batch_size_for(self, training: bool) -> int:
        """The per-process batch size of the training or the validation loader."""
        if training or self.val_batch_size is None:
            return self.batch_size
        return self.val_batch_size

    @property
    def dali(self) -> bool:
        return self.backend.startswith("dali")
