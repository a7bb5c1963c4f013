"""Tiny ImageFolder trees of JPEGs for the data-loading tests and benchmark.

Each class gets a distinct dominant colour, so a test can tell from the pixels which class an
image came from (and so check that labels travel with their images), and a left-to-right
brightness ramp, so a horizontal flip or a misplaced crop is visible too.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from dataloading import IMAGENET_MEAN_255, IMAGENET_STD_255

# Well separated RGB colours; class k uses CLASS_COLOURS[k % len(CLASS_COLOURS)].
CLASS_COLOURS: Sequence[tuple[int, int, int]] = (
    (200, 40, 40),
    (40, 180, 60),
    (50, 60, 210),
    (210, 190, 40),
    (170, 50, 190),
    (40, 190, 200),
)


def synthetic_image(colour: tuple[int, int, int], width: int, height: int, rng: random.Random) -> Image.Image:
    """An RGB image: `colour`, a horizontal ramp (darker on the left), a few soft blobs."""
    x = np.linspace(0.55, 1.0, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0.9, 1.0, height, dtype=np.float32)[:, None, None]
    pixels = np.asarray(colour, dtype=np.float32)[None, None, :] * x * y
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(3):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        radius = rng.uniform(0.1, 0.3) * min(width, height)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * radius**2)).astype(np.float32)
        pixels += 40.0 * blob[:, :, None]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def write_jpeg(path: Path, colour: tuple[int, int, int], width: int, height: int, rng: random.Random) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    synthetic_image(colour, width, height, rng).save(path, format="JPEG", quality=90)
    return path


def make_image_folder(
    root: Path,
    class_counts: Mapping[str, int],
    *,
    size_range: tuple[int, int] = (40, 64),
    seed: int = 0,
) -> list[tuple[Path, int]]:
    """Write ``root/<class>/<class>_<i>.jpg`` for each class; returns (path, class index) pairs.

    Class indices follow sorted class names (ImageFolder's order). Widths and heights are drawn
    from `size_range`, so images differ in shape and aspect ratio.
    """
    rng = random.Random(seed)
    samples = []
    for index, name in enumerate(sorted(class_counts)):
        (root / name).mkdir(parents=True, exist_ok=True)  # also for a class of 0 images
        colour = CLASS_COLOURS[index % len(CLASS_COLOURS)]
        for i in range(class_counts[name]):
            width, height = rng.randint(*size_range), rng.randint(*size_range)
            path = write_jpeg(root / name / f"{name}_{i:04d}.jpg", colour, width, height, rng)
            samples.append((path, index))
    return samples


def make_dataset(
    root: Path,
    train_counts: Mapping[str, int],
    val_counts: Mapping[str, int] | None = None,
    **kwargs,
) -> Path:
    """An ImageFolder data root with ``train/`` and ``val/``; val defaults to the train counts."""
    make_image_folder(root / "train", train_counts, **kwargs)
    make_image_folder(root / "val", val_counts if val_counts is not None else train_counts,
                      seed=kwargs.get("seed", 0) + 1,
                      **{k: v for k, v in kwargs.items() if k != "seed"})
    return root


def write_truncated_jpeg(path: Path, keep_fraction: float = 0.4, seed: int = 0) -> Path:
    """A JPEG cut short, as left by an interrupted copy."""
    write_jpeg(path, (120, 120, 120), 64, 48, random.Random(seed))
    data = path.read_bytes()
    path.write_bytes(data[: max(4, int(len(data) * keep_fraction))])
    return path


def write_garbage_jpeg(path: Path, size: int = 2000, seed: int = 0) -> Path:
    """A file named .jpg that holds random bytes (not an image at all)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


def unnormalize(images: torch.Tensor) -> torch.Tensor:
    """Loader output back to 0-255 RGB."""
    mean = torch.tensor(IMAGENET_MEAN_255, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD_255, device=images.device).view(1, 3, 1, 1)
    return images * std + mean


def dominant_channel(images: torch.Tensor) -> torch.Tensor:
    """Index of the strongest colour channel per image: the class in the colour fixture."""
    return unnormalize(images).mean(dim=(2, 3)).argmax(dim=1)
