"""Images per second of each data backend on ImageNet-like JPEGs (training crops).

    python benchmarks/dataloading.py --workers 2 --batch-size 64

Generates (once, then reuses) a folder of 500x375 JPEGs, builds each backend's training loader
on the CPU and times full passes over it after one warm-up pass. Prints images/s per backend
and the ratio dali-cpu / pytorch. Backends whose library is missing are skipped.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dataloading import DataError, LoaderOptions, get_loaders  # noqa: E402

DEFAULT_DATA = Path(tempfile.gettempdir()) / "pedconv-dataloading-bench"
IMAGE_WIDTH, IMAGE_HEIGHT = 500, 375  # a typical ImageNet photo
NUM_CLASSES = 8


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth colour fields, edges and fine texture: compresses like a photo (~80-120 KB at q90)."""
    coarse = rng.uniform(0, 255, size=(height // 25 + 2, width // 25 + 2, 3)).astype(np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
    for _ in range(6):  # a few sharp-edged shapes
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        x1, y1 = x0 + rng.integers(20, 200), y0 + rng.integers(20, 150)
        image[y0:y1, x0:x1] = 0.5 * image[y0:y1, x0:x1] + 0.5 * rng.uniform(0, 255, size=3)
    image += rng.normal(0, 12, size=image.shape)  # texture, as sensor noise and foliage give
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), "RGB")


def ensure_data(root: Path, num_images: int, seed: int = 0) -> Path:
    """`root/train/<class>/*.jpg` (and a small `val/`), written only if not there yet."""
    marker = root / f".complete-{num_images}"
    if marker.exists():
        return root
    rng = np.random.default_rng(seed)
    per_class = math.ceil(num_images / NUM_CLASSES)
    for split, count in (("train", per_class), ("val", max(1, per_class // 8))):
        for class_index in range(NUM_CLASSES):
            folder = root / split / f"n{class_index:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                width, height = (IMAGE_WIDTH, IMAGE_HEIGHT) if rng.random() < 0.75 else (IMAGE_HEIGHT, IMAGE_WIDTH)
                photo_like(rng, width, height).save(folder / f"img_{i:05d}.JPEG", quality=90)
    marker.touch()
    return root


def measure(backend: str, data: Path, args) -> float:
    loaders = get_loaders(LoaderOptions(backend, data, args.batch_size, workers=args.workers,
                                        image_size=args.image_size, augmentation=args.augmentation,
                                        device=args.device, prefetch=args.prefetch, val=False,
                                        synthetic_batches=max(1, args.images // args.batch_size), seed=args.seed))
    loader = loaders.train
    for _ in loader:  # warm-up: worker start-up, page cache, DALI's buffer allocation
        pass
    images = 0
    start = time.perf_counter()
    for _ in range(args.passes):
        for batch, _labels in loader:
            images += batch.shape[0]
    if batch.is_cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    del loaders, loader
    return images / elapsed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help=f"folder of JPEGs in ImageFolder layout; generated if missing (default {DEFAULT_DATA})")
    parser.add_argument("--images", type=int, default=512, help="training images to generate (default 512)")
    parser.add_argument("--backends", nargs="+", default=["pytorch", "dali-cpu", "synthetic"])
    parser.add_argument("--workers", "--threads", "-j", type=int, default=2,
                        help="DataLoader workers / DALI threads (default 2)")
    parser.add_argument("--batch-size", "-b", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--augmentation", default=None, choices=[None, "autoaugment"])
    parser.add_argument("--passes", type=int, default=3, help="timed passes over the data (default 3)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    data = ensure_data(args.data, args.images) if args.data == DEFAULT_DATA or not args.data.exists() else args.data
    print(f"data {data}, batch {args.batch_size}, workers/threads {args.workers}, {args.image_size}px crops, "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    results = {}
    for backend in args.backends:
        try:
            results[backend] = measure(backend, data, args)
        except DataError as error:
            print(f"{backend:10s} skipped: {error}")
            continue
        note = "  (one fixed batch, no input work: the ceiling)" if backend == "synthetic" else ""
        print(f"{backend:10s} {results[backend]:12.1f} images/s{note}")
    if "dali-cpu" in results and "pytorch" in results:
        print(f"ratio dali-cpu / pytorch: {results['dali-cpu'] / results['pytorch']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
