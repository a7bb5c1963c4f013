"""The ``synthetic`` backend: one fixed random batch on the device, for throughput runs.

It measures the model and the training step without any input pipeline: if a run is slower
with real data than with this backend, decoding is the bottleneck.
"""

from __future__ import annotations

import torch


class SyntheticLoader:
    """Yields the same (images, labels) batch `num_batches` times per pass (a finite epoch).

    Images are standard-normal float32, i.e. distributed like normalized data; labels are
    uniform over `num_classes`. Nothing is copied per step: each step gets the same tensors.
    """

    def __init__(self, *, batch_size: int, image_size: int, num_classes: int, num_batches: int,
                 memory_format: torch.memory_format, device: torch.device, seed: int, training: bool):
        generator = torch.Generator().manual_seed(seed)
        images = torch.randn((batch_size, 3, image_size, image_size), generator=generator)
        labels = torch.randint(0, num_classes, (batch_size,), generator=generator, dtype=torch.int64)
        self.images = images.to(device).contiguous(memory_format=memory_format)
        self.labels = labels.to(device)
        self.classes = tuple(f"synthetic_{index:04d}" for index in range(num_classes))
        self.batch_size = batch_size
        self.training = training
        self.device = device
        self.num_samples = batch_size * num_batches
        self._num_batches = num_batches

    def __len__(self) -> int:
        return self._num_batches

    def set_epoch(self, epoch: int) -> None:
        """Nothing to reshuffle."""

    def close(self) -> None:
        """Nothing runs in the background."""

    def __iter__(self):
        for _ in range(self._num_batches):
            yield self.images, self.labels
