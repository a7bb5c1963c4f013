"""Input pipelines for ImageNet-style classification: one factory, four backends.

    from dataloading import DataError, LoaderOptions, get_loaders

    options = LoaderOptions("dali-cpu", "/data/imagenet", 256, workers=5,
                            memory_format=torch.channels_last, device="cuda:0",
                            rank=rank, world_size=world_size, seed=seed)
    loaders = get_loaders(options)
    for epoch in range(epochs):
        loaders.train.set_epoch(epoch)
        for images, labels in loaders.train: ...
        for images, labels in loaders.val: ...

``LoaderOptions(backend, data_root, batch_size, workers=5, image_size=224,
interpolation="bilinear", augmentation=None, crop_area=(0.08, 1.0), memory_format=torch.contiguous_format,
device=None, rank=0, world_size=1, seed=0, prefetch=2, verify_data=False, train=True, val=True,
val_batch_size=None, synthetic_batches=100, num_classes=1000, cache_dir=None)`` is checked when it is made
(a bad value raises DataError naming it) and holds each value in its canonical form;
``get_loaders(options) -> Loaders`` checks the data it names and builds the loaders. The fields:

* `backend`: ``pytorch``, ``dali-cpu``, ``dali-gpu`` or ``synthetic`` (also spelled
  ``syntetic``); anything else raises DataError listing these.
* `data_root`: a folder with ``train/`` and ``val/`` in ImageFolder layout (``<split>/<class>/
  <image>``); only the splits asked for (`train`, `val`) must exist, so an evaluation-only run
  needs no ``train/``. Ignored by ``synthetic``.
* `batch_size` is per process (`val_batch_size`, default `batch_size`, for validation). `workers`
  is DataLoader worker processes (``pytorch``) or DALI threads. `prefetch` is batches prepared
  ahead per worker (``pytorch``) or DALI's queue depth.
* `interpolation`: ``bilinear``, ``bicubic`` or ``triangular`` (PIL's bilinear filter already
  widens when downscaling, so ``pytorch`` treats ``triangular`` as ``bilinear``).
* `augmentation`: None, or ``autoaugment`` for the ImageNet AutoAugment policy on top of
  random-resized crop and flip (training only; torchvision's on ``pytorch``, DALI's
  ``auto_aug`` on the DALI backends, which runs on the CPU as well as on the GPU).
* `crop_area`: the (min, max) fraction of the image area that a training random-resized crop keeps
  (default NVIDIA's (0.08, 1.0); ``main.py --crop-area-min``; the digits demo uses 0.35).
* `memory_format`: ``torch.contiguous_format`` or ``torch.channels_last`` (or "nchw"/"nhwc").
* `device`: where batches are delivered; None means CUDA when available, else the CPU.
* `rank`, `world_size`: the global rank and the number of processes. Pass the same `seed` on
  every rank: it seeds the shuffle (which must agree across ranks); augmentation randomness is
  seeded with `seed + rank`.
* `verify_data`: decode every image once with PIL before training and skip (with a warning
  naming it) each one that fails; the result is cached in `cache_dir` (default
  ``$PEDCONV_DATA_CACHE`` or ``~/.cache/pedconv/data-scans``), keyed by the listing with file
  sizes and modification times.
* `train`, `val`: which loaders to build (at least one).
* `synthetic_batches`, `num_classes`: the ``synthetic`` backend's batches per pass and label range.

Returns `Loaders(train, val, classes, backend)`; `train` or `val` is None when not asked for;
`classes` are the class folder names in ImageFolder order (label i is ``classes[i]``).

Each loader is an iterable of ``(images, labels)``:

* images: float32, N x 3 x H x W (H = W = `image_size`), normalized with the ImageNet mean and
  std, with channels_last strides when asked, on `device`; labels: int64, shape (N,), same device.
* ``len(loader)`` is the number of batches per pass, the same on every rank.
* ``loader.set_epoch(e)`` picks the shuffle of the next pass; without it every pass takes the
  next epoch's order. (DALI reshuffles by itself after each epoch and ignores `e`.)
* ``loader.classes``, ``loader.batch_size``, ``loader.num_samples`` (images this rank yields per
  pass), ``loader.training``, ``loader.device``.

Training yields only full batches: each rank's shard is padded to ceil(N / world_size) images
(repeating a few), and the remainder smaller than a batch is dropped, so
``len = ceil(N / world_size) // batch_size`` on every rank.

Validation counts every image exactly once: the images are split into contiguous shards, one
per rank, with no padding and no repeats; each rank yields ``ceil(ceil(N / world_size) /
batch_size)`` batches, full ones first, so the last batch (or the last two) can be smaller and,
only when a rank has fewer images than batches, empty (shape (0, 3, H, W)). Sum the per-image
results and divide by the summed batch sizes (all-reduced over ranks) to get exact accuracy.

Bad data raises DataError (a ValueError) with a one-line message naming the problem and the
path, before any batch is produced: missing ``train/``/``val/``, no class folders, a class folder
without images, different classes in train and val, a training set with no full batch. Files
without an image extension are ignored, as ImageFolder does. Unreadable images (truncated,
empty, not images) never stop a run: ``pytorch`` logs a warning naming the file and, in training,
uses the next readable sample instead (in validation it drops it); the DALI backends run a quick,
cached check of every file's header and end first (DALI's decoder would otherwise abort on such a
file) and skip what fails, with the same warning. Images whose header declares more pixels than
PIL's decompression-bomb limit are skipped on every backend (``integrity.max_image_pixels``). A
DALI decode failure that gets past the quick check is raised as DataError naming the file, which
the cached scan then holds, so the next run skips it. Symlinks are followed once (a loop or a
folder linked twice is listed once); a folder that cannot be read is a DataError.

Backends:

* ``pytorch``: torchvision ImageFolder, RandomResizedCrop + horizontal flip (+ AutoAugment) for
  training, resize to image_size + 32 and centre crop for validation; workers collate uint8
  batches, normalization runs on `device`; on CUDA, pinned memory and a side-stream prefetcher.
* ``dali-cpu``: DALI CPU operators (fused decode + random crop, resize, flip, AutoAugment,
  normalize); ``device_id=None`` on a machine without a GPU; with a CUDA `device` the uint8 crops
  are copied to the GPU for flip and normalization.
* ``dali-gpu``: nvJPEG ``mixed`` decoding and GPU operators; needs a CUDA `device`.
* ``synthetic``: one fixed random batch on `device`, yielded `synthetic_batches` times per pass
  (a finite epoch, default 100), for throughput runs without data.

Every batch is a new tensor on every backend except ``synthetic`` (DALI 2.4's iterator allocates
one per batch; checked on the CPU), so batches may be kept. Leaving a DALI pass early
(``break``) makes the next pass continue where it stopped: DALI cannot restart mid-epoch.
"""

from .common import IMAGENET_MEAN_255, IMAGENET_STD_255, DataError, ImageFolderListing, list_image_folder
from .factory import Loader, Loaders, get_loaders
from .options import BACKENDS, LoaderOptions

__all__ = [
    "BACKENDS",
    "DataError",
    "IMAGENET_MEAN_255",
    "IMAGENET_STD_255",
    "ImageFolderListing",
    "Loader",
    "LoaderOptions",
    "Loaders",
    "get_loaders",
    "list_image_folder",
]
