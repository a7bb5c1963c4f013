"""The ``synthetic`` backend: one fixed random batch on the device, for throughput runs.

It measures the model and the training step without any input pipeline: if a run is slower
with real data than with this backend, decoding is the bottleneck.
"""

from __future__ import annotations

import torch

from .options import LoaderOptions


class SyntheticLoader:
    """Yields the same (images, labels) batch `options.synthetic_batches` times per pass (a finite epoch).

    Images are standard-normal float32, i.e. distributed like normalized data; labels are
    uniform over `options.num_classes`. Nothing is copied per step: each step gets the same tensors.
    """

    def __init__(self, options: LoaderOptions, *, training: bool):
        batch_size, image_size = options.batch_size_for(training), options.image_size
        generator = torch.Generator().manual_seed(options.seed + options.rank)
        images = torch.randn((batch_size, 3, image_size, image_size), generator=generator)
        labels = torch.randint(0, options.num_classes, (batch_size,), generator=generator, dtype=torch.int64)
        self.images = images.to(options.device).contiguous(memory_format=options.memory_format)
        self.labels = labels.to(options.device)
        self.classes = tuple(f"synthetic_{index:04d}" for index in range(options.num_classes))
        self.batch_size = batch_size
        self.training = training
        self.device = options.device
        self.num_samples = batch_size * options.synthetic_batches
        self._num_batches = options.synthetic_batches

    def __len__(self) -> int:
        return self._num_batches

    def set_epoch(self, epoch: int) -> None:
        """Nothing to reshuffle."""

    def close(self) -> None:
        """Nothing runs in the background."""

    def __iter__(self):
        for _ in range(self._num_batches):
            yield self.images, self.labels
