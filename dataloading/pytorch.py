"""The ``pytorch`` backend: torchvision ImageFolder, PIL transforms, a DataLoader of uint8 batches.

Workers decode and augment with PIL and collate uint8 N x 3 x H x W batches (no ToTensor); the
conversion to float and the normalization happen on the target device. On CUDA the batches are
pinned and a side stream uploads and normalizes the next batch while the current one is used.
"""

from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode

from .common import (
    CROP_PADDING,
    RANDOM_AREA,
    RANDOM_ASPECT_RATIO,
    DataError,
    ImageFolderListing,
    Normalizer,
    shard_range,
    train_batches_per_rank,
    val_batch_sizes,
    val_batches_per_rank,
)
from .options import LoaderOptions

logger = logging.getLogger(__name__)

# PIL's bilinear filter widens with the downscale factor, i.e. it is DALI's "triangular".
PIL_INTERPOLATION = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "triangular": InterpolationMode.BILINEAR,
}
# Grey fill for AutoAugment's geometric ops, as DALI's auto_augment uses by default.
AUTOAUGMENT_FILL = [128, 128, 128]
# A training sample that cannot be read is replaced by one of the next ones; give up after this
# many unreadable files in a row (the data set is then broken rather than holding a bad file).
MAX_SUBSTITUTE_TRIES = 16


def train_transform(image_size: int, interpolation: str, augmentation: str | None,
                    crop_area: tuple[float, float] = RANDOM_AREA) -> transforms.Compose:
    mode = PIL_INTERPOLATION[interpolation]
    steps = [
        transforms.RandomResizedCrop(image_size, scale=crop_area, ratio=RANDOM_ASPECT_RATIO,
                                     interpolation=mode),
        transforms.RandomHorizontalFlip(),
    ]
    if augmentation == "autoaugment":
        steps.append(transforms.AutoAugment(transforms.AutoAugmentPolicy.IMAGENET, interpolation=mode,
                                            fill=AUTOAUGMENT_FILL))
    return transforms.Compose(steps)


def val_transform(image_size: int, interpolation: str) -> transforms.Compose:
    return transforms.Compose([
        transforms.Resize(image_size + CROP_PADDING, interpolation=PIL_INTERPOLATION[interpolation]),
        transforms.CenterCrop(image_size),
    ])


class ListedImageFolder(datasets.ImageFolder):
    """ImageFolder over a listing made beforehand (same order), tolerant of unreadable files.

    An image PIL cannot read is named in a warning; in training it is replaced by the next
    readable sample (batches stay full), in validation the sample becomes None and the collate
    drops it (it is not counted).
    """

    def __init__(self, listing: ImageFolderListing, transform, *, substitute_unreadable: bool):
        self.listing = listing
        self.substitute_unreadable = substitute_unreadable
        super().__init__(str(listing.root), transform=transform)

    def find_classes(self, directory):
        classes = list(self.listing.classes)
        return classes, {name: index for index, name in enumerate(classes)}

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        return list(self.listing.samples)

    def _load(self, index: int):
        path, label = self.samples[index]
        try:
            image = self.loader(path)  # opens and converts to RGB, which decodes the whole file
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
            logger.warning("skipping unreadable image %s (%s: %s)", path, type(error).__name__, error)
            return None
        return self.transform(image), label

    def __getitem__(self, index: int):
        sample = self._load(index)
        if sample is not None or not self.substitute_unreadable:
            return sample
        for step in range(1, MAX_SUBSTITUTE_TRIES + 1):
            sample = self._load((index + step) % len(self.samples))
            if sample is not None:
                return sample
        raise DataError(f"{MAX_SUBSTITUTE_TRIES + 1} unreadable images in a row from {self.samples[index][0]}; "
                        "the data set looks damaged (--verify-data lists every unreadable image)")


class Uint8Collate:
    """PIL images -> one uint8 N x 3 x H x W tensor (in the requested memory format) + int64 labels.

    None samples (unreadable validation images) are dropped, so a batch may be smaller, even
    empty; its shape is then (0, 3, H, W).
    """

    def __init__(self, image_size: int, memory_format: torch.memory_format):
        self.image_size = image_size
        self.memory_format = memory_format

    def __call__(self, batch):
        batch = [sample for sample in batch if sample is not None]
        size = self.image_size
        images = torch.empty((len(batch), 3, size, size), dtype=torch.uint8,
                             memory_format=self.memory_format)
        # A view of the same memory with channels last, the order PIL's pixels come in.
        pixels_hwc = images.permute(0, 2, 3, 1).numpy()
        for index, (image, _) in enumerate(batch):
            pixels_hwc[index] = np.asarray(image)
        labels = torch.tensor([label for _, label in batch], dtype=torch.int64)
        return images, labels


class ValBatchSampler(Sampler[list[int]]):
    """This rank's contiguous shard in order, split into the same number of batches on every rank.

    No sample is repeated, so each image is counted once over all ranks.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int):
        shard = shard_range(num_samples, rank, world_size)
        sizes = val_batch_sizes(len(shard), val_batches_per_rank(num_samples, batch_size, world_size),
                                batch_size)
        self.batches = []
        start = shard.start
        for size in sizes:
            self.batches.append(list(range(start, start + size)))
            start += size

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def cuda_prefetch(batches, device: torch.device, normalize: Normalizer):
    """Yield device batches; the next one is copied and normalized on a side stream meanwhile.

    Each batch's work is ordered by an event the consumer's stream waits for, and its tensors are
    marked as used on that stream so the caching allocator does not hand their memory out early.
    """
    stream = torch.cuda.Stream(device=device)
    consumer = torch.cuda.current_stream(device)
    stream.wait_stream(consumer)  # the normalization constants were made on the consumer's stream

    def upload(images: torch.Tensor, labels: torch.Tensor):
        with torch.cuda.stream(stream):
            images = normalize(images.to(device, non_blocking=True))
            labels = labels.to(device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(stream)
        return images, labels, ready

    def hand_over(images: torch.Tensor, labels: torch.Tensor, ready: torch.cuda.Event):
        consumer.wait_event(ready)
        images.record_stream(consumer)
        labels.record_stream(consumer)
        return images, labels

    pending = None
    for images, labels in batches:
        uploaded = upload(images, labels)
        if pending is not None:
            yield hand_over(*pending)
        pending = uploaded
    if pending is not None:
        yield hand_over(*pending)


class PytorchLoader:
    """Iterable of (images, labels) for one split; see the package docstring for the contract."""

    def __init__(self, listing: ImageFolderListing, options: LoaderOptions, *, training: bool):
        self.classes = listing.classes
        self.batch_size = options.batch_size_for(training)
        self.training = training
        self.device = device = options.device
        self._epoch = 0
        self._seed = options.seed + options.rank
        self._pass = None  # the generator of the pass in progress (see close)
        self._normalize = Normalizer(device, options.memory_format)
        if training:
            transform = train_transform(options.image_size, options.interpolation, options.augmentation,
                                        options.crop_area)
        else:
            transform = val_transform(options.image_size, options.interpolation)
        self.dataset = ListedImageFolder(listing, transform, substitute_unreadable=training)
        worker_options = {}
        if options.workers > 0:
            # Workers restart every pass: each pass then seeds its workers from (seed, rank, epoch) alone, so a
            # run resumed at epoch e augments exactly as an uninterrupted one (persistent workers would carry
            # their random state over from earlier epochs).
            worker_options = dict(prefetch_factor=max(1, options.prefetch), persistent_workers=False)
        self.loader = DataLoader(
            self.dataset,
            num_workers=options.workers,
            collate_fn=Uint8Collate(options.image_size, options.memory_format),
            pin_memory=device.type == "cuda",
            generator=torch.Generator(),  # reseeded at the start of every pass (see __iter__)
            **self._sampling(len(listing), options.seed, options.rank, options.world_size),
            **worker_options,
        )

    def _sampling(self, num_listed: int, seed: int, rank: int, world_size: int) -> dict:
        """The DataLoader's sampling options for this rank; sets `sampler` and `num_samples`."""
        batch_size = self.batch_size
        if self.training:
            # Also with one process: it gives a seeded, per-epoch order and pads to equal shards.
            self.sampler = DistributedSampler(self.dataset, num_replicas=world_size, rank=rank,
                                              shuffle=True, seed=seed, drop_last=False)
            self.num_samples = train_batches_per_rank(num_listed, batch_size, world_size) * batch_size
            return dict(sampler=self.sampler, batch_size=batch_size, drop_last=True)
        self.sampler = None
        self.num_samples = len(shard_range(num_listed, rank, world_size))
        return dict(batch_sampler=ValBatchSampler(num_listed, batch_size, rank, world_size))

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        """Choose the shuffling of the next pass (otherwise each pass takes the next epoch)."""
        self._epoch = epoch

    def __iter__(self):
        if self.sampler is not None:
            self.sampler.set_epoch(self._epoch)
        # Seeds the workers' random transforms for this pass: reproducible, different on each rank and epoch,
        # independent of earlier passes. (With workers=0 the transforms draw from torch's global generator,
        # which checkpoints save and restore.)
        self.loader.generator.manual_seed(self._seed * 100_003 + self._epoch)
        self._epoch += 1
        self.close()  # a pass left unfinished (e.g. by --prof) lets its workers go before new ones start
        if self.device.type == "cuda":
            self._pass = cuda_prefetch(self._uint8_batches(), self.device, self._normalize)
        else:
            self._pass = self._on_cpu()
        return self._pass

    def close(self) -> None:
        """End the current pass, if any: its DataLoader iterator, and with it the worker processes, goes now."""
        if self._pass is not None:
            self._pass.close()
            self._pass = None

    def _on_cpu(self):
        for images, labels in self._uint8_batches():
            yield self._normalize(images), labels

    def _uint8_batches(self):
        try:
            yield from self.loader
        except DataError as error:
            # A worker's exception comes back with its whole traceback as the message; keep the
            # one line that says what is wrong.
            message = str(error).strip().splitlines()[-1]
            raise DataError(message.split("DataError: ", 1)[-1]) from error
