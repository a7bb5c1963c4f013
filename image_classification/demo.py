"""The demo data set: scikit-learn's handwritten digits (shipped in its wheel), as an ImageFolder of JPEGs.

1,797 grayscale 8x8 images of the digits 0-9 are upscaled to 32x32, saved once as RGB JPEGs under
``<cache>/digits/{train,val}/<digit>/`` (every fifth image of each class goes to validation: 1,442 training and
355 validation images), and reused afterwards. Nothing is downloaded.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile

from dataloading.progress import progress

logger = logging.getLogger(__name__)

IMAGE_SIZE = 32
CLASSES = [str(digit) for digit in range(10)]


def default_cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "pedconv")


def prepare_digits(cache_dir: str = None) -> str:
    """The folder holding ``train/`` and ``val/`` of the digits JPEGs, building it on first use."""
    target = os.path.join(cache_dir or default_cache_dir(), "digits")
    if os.path.isfile(os.path.join(target, "COMPLETE")):
        return target
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise RuntimeError("the demo data set needs scikit-learn: pip install scikit-learn") from error
    import numpy as np
    from PIL import Image

    digits = load_digits()
    os.makedirs(os.path.dirname(target), exist_ok=True)
    # Build beside the target and rename, so an interrupted first run never leaves half a data set behind.
    staging = tempfile.mkdtemp(prefix=".digits-", dir=os.path.dirname(target))
    seen = {label: 0 for label in range(10)}
    pairs = progress(zip(digits.images, digits.target), len(digits.images), "preparing the demo data", "img")
    for index, (image, label) in enumerate(pairs):
        label = int(label)
        split = "val" if seen[label] % 5 == 4 else "train"
        seen[label] += 1
        folder = os.path.join(staging, split, CLASSES[label])
        os.makedirs(folder, exist_ok=True)
        pixels = (image * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        picture = Image.fromarray(pixels, mode="L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR).convert("RGB")
        picture.save(os.path.join(folder, f"{index:04d}.jpg"), quality=95)
    with open(os.path.join(staging, "COMPLETE"), "w") as marker:
        marker.write("sklearn.datasets.load_digits, 32x32 RGB JPEG\n")
    if os.path.exists(target):
        shutil.rmtree(target)
    os.replace(staging, target)
    logger.info("demo data set written to %s", target)
    return target
