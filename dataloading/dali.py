"""The ``dali-cpu`` and ``dali-gpu`` backends: NVIDIA DALI pipelines behind the common interface.

``dali-cpu`` decodes and augments with DALI's CPU operators. Without a GPU (device 'cpu') the
pipeline runs with ``device_id=None`` and everything, normalization included, stays on the CPU.
With a CUDA device the uint8 crops are copied to the GPU, where flip and normalization run.

``dali-gpu`` decodes with nvJPEG (the ``mixed`` operator, buffers sized for full ImageNet
images) and runs all augmentation on the GPU; it needs a CUDA device.

Both use DALI's file reader on an explicit file list in ImageFolder order (so labels match the
``pytorch`` backend), sharded by global rank; AutoAugment uses ``nvidia.dali.auto_aug`` (the
ImageNet policy, on the CPU or the GPU alike). DALI is imported only when one of these backends
is asked for.

DALI's decoder stops the whole pipeline on a truncated or non-image file, so the file list is
first checked by a quick, cached scan (see ``integrity``); ``verify_data`` makes it a full decode.
A decode failure that gets past the quick scan ends the pass with a DataError naming the file,
which is added to the cached scan so that the next run (a resume) skips it. When DALI's message
does not name the file, the split is decoded with PIL to find it (the full scan, cached too).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import warnings
from types import SimpleNamespace

import torch

from .common import (
    CROP_PADDING,
    IMAGENET_MEAN_255,
    IMAGENET_STD_255,
    RANDOM_AREA,
    RANDOM_ASPECT_RATIO,
    DataError,
    ImageFolderListing,
    list_image_folder,
    shard_range,
    train_batches_per_rank,
    val_batch_sizes,
    val_batches_per_rank,
)
from .options import LoaderOptions

logger = logging.getLogger(__name__)

INSTALL_HINT = ("pip install nvidia-dali-cuda130 'cuda-toolkit[npp,nvjpeg]==13.0.3', as requirements.txt; "
                "for CUDA 12: requirements-dali-cuda120.txt")
READER_NAME = "Reader"
# The GPU decoder's buffers (dali-gpu). NVIDIA's ConvNets code asks for buffers that fit the largest ImageNet image
# (5980 x 6430) in every decoder thread: one device buffer (device_memory_padding) and two pinned host buffers
# (host_memory_padding) per thread and pipeline, plus a hardware-decoder batch preallocated at that size. With -j 8,
# a training and a validation pipeline and 8 ranks, that pins 2 x 134 MiB x 8 x 2 x 8 = 34 GiB of host memory on
# the node. Here the buffers are sized from a budget per rank and pipeline instead (see decoder_memory_hints): a
# thread that meets a larger image grows its buffer once, which costs an allocation, not a failure.
NVIDIA_DEVICE_MEMORY_PADDING = 211025920
NVIDIA_HOST_MEMORY_PADDING = 140544512
NVIDIA_PREALLOCATE_HINT = (5980, 6430)
# DALI's own defaults, the floor of the scaled sizes.
DALI_DEVICE_MEMORY_PADDING = 16 << 20
DALI_HOST_MEMORY_PADDING = 8 << 20
# Per rank and pipeline: pinned host memory for the decoder threads' buffers; device memory for their buffers, and
# as much again for the hardware decoder's preallocated batch.
HOST_MEMORY_BUDGET = 256 << 20
DEVICE_MEMORY_BUDGET = 512 << 20
# The share of a batch DALI sends to the A100/H100 hardware JPEG decoder (its default hw_decoder_load).
HW_DECODER_LOAD = 0.65
# Attempts to draw a crop inside the image before falling back to a centre crop (as DLE).
RANDOM_CROP_ATTEMPTS = 100
# Largest AutoAugment translation as a fraction of the image side, as torchvision's ImageNet
# policy (150 pixels of 331); DALI's default would be the whole side.
AUTOAUGMENT_MAX_TRANSLATE = 150.0 / 331.0
AUTOAUGMENT_FILL = 128


def decoder_memory_hints(threads: int, batch_size: int, training: bool = True) -> dict:
    """The ``mixed`` decoder's memory options for one pipeline of ``threads`` threads: NVIDIA's sizes where they fit
    the per-pipeline budgets (``HOST_MEMORY_BUDGET``, ``DEVICE_MEMORY_BUDGET``), else the budget shared by the
    threads (never below DALI's defaults). With -j 8 that is 16 MiB of pinned host memory per buffer, 256 MiB per
    pipeline, 512 MiB per rank with validation; 64 MiB of device memory per thread. The hardware decoder's batch is
    preallocated for square images of the side that fits the device budget (capped at NVIDIA's hint): at -b 64,
    about 2000 x 2000 pixels; larger images reallocate."""
    threads = max(1, threads)
    host = max(DALI_HOST_MEMORY_PADDING, min(NVIDIA_HOST_MEMORY_PADDING, HOST_MEMORY_BUDGET // (2 * threads)))
    device = max(DALI_DEVICE_MEMORY_PADDING, min(NVIDIA_DEVICE_MEMORY_PADDING, DEVICE_MEMORY_BUDGET // threads))
    hints = dict(device_memory_padding=device, host_memory_padding=host)
    if training:
        images = max(1.0, HW_DECODER_LOAD * batch_size)
        side = int((DEVICE_MEMORY_BUDGET / (images * 3)) ** 0.5)
        hints.update(preallocate_width_hint=min(side, NVIDIA_PREALLOCATE_HINT[0]),
                     preallocate_height_hint=min(side, NVIDIA_PREALLOCATE_HINT[1]))
    return hints


def import_dali():
    """The DALI modules this backend uses, or a DataError saying how to install DALI."""
    try:
        modules = SimpleNamespace(
            fn=importlib.import_module("nvidia.dali.fn"),
            types=importlib.import_module("nvidia.dali.types"),
            pipeline_def=importlib.import_module("nvidia.dali.pipeline").pipeline_def,
            auto_augment=importlib.import_module("nvidia.dali.auto_aug.auto_augment"),
            plugin=importlib.import_module("nvidia.dali.plugin.pytorch"),
            math=importlib.import_module("nvidia.dali.math"),
        )
    except ImportError as error:
        raise DataError(f"the DALI backends (main.py's default, dali-cpu, as NVIDIA's) need NVIDIA DALI ({INSTALL_HINT}),"
                        f" or pass --data-backend pytorch; import failed: {error}") from error
    return modules


def dali_available() -> bool:
    try:
        import_dali()
    except DataError:
        return False
    return True


def _interp_type(types, interpolation: str):
    return {
        "bilinear": types.INTERP_LINEAR,
        "bicubic": types.INTERP_CUBIC,
        "triangular": types.INTERP_TRIANGULAR,
    }[interpolation]


def _normalize(fn, types, images, *, layout: str, mirror=None, crop=None, crop_pos_x=None, crop_pos_y=None):
    """Crop (optional), flip (optional), convert to float, normalize with the ImageNet mean/std
    and set the layout, in one operator."""
    options = {}
    if crop is not None:
        options.update(crop=crop, crop_pos_x=crop_pos_x, crop_pos_y=crop_pos_y)
    return fn.crop_mirror_normalize(
        images,
        dtype=types.FLOAT,
        output_layout=layout,
        mean=list(IMAGENET_MEAN_255),
        std=list(IMAGENET_STD_255),
        mirror=mirror if mirror is not None else 0,
        **options,
    )


def _centre_crop_position(dali, length, crop: int):
    """Relative crop position that puts the crop where torchvision's CenterCrop does.

    torchvision starts the crop at round((length - crop) / 2) with Python's round, which rounds
    halves to even; DALI's centred crop rounds them up, a pixel off for half the odd margins.
    """
    margin = length - crop
    half = margin // 2
    start = half + (margin & 1) * (half & 1)  # an odd margin with an odd half rounds up to even
    types = dali.types
    return dali.fn.cast(start, dtype=types.FLOAT) / dali.fn.cast(dali.math.max(margin, 1),
                                                                       dtype=types.FLOAT)


def _auto_augment(dali, images, image_size: int):
    return dali.auto_augment.auto_augment(
        images,
        policy_name="image_net",
        shape=[image_size, image_size],
        max_translate_rel=AUTOAUGMENT_MAX_TRANSLATE,
        fill_value=AUTOAUGMENT_FILL,
    )


@contextlib.contextmanager
def _without_dalis_own_deprecations():
    """DALI's auto_aug module calls a deprecated alias of `equalize` itself. That warning is about
    DALI's code, not ours, and DALI resets the warning filters when it issues it, so it is dropped
    at display time, only while the pipeline graph is traced."""
    show = warnings.showwarning

    def show_others(message, category, *args, **kwargs):
        if issubclass(category, DeprecationWarning) and "experimental.equalize" in str(message):
            return
        show(message, category, *args, **kwargs)

    warnings.showwarning = show_others
    try:
        yield
    finally:
        warnings.showwarning = show


def build_train_pipeline(dali, files, labels, *, gpu_decode: bool, output_to_gpu: bool, batch_size: int,
                         threads: int, device_id, seed: int, shuffle_seed: int, prefetch: int, rank: int,
                         world_size: int, image_size: int, interpolation: str, augmentation: str | None,
                         layout: str, crop_area: tuple[float, float] = RANDOM_AREA):
    fn, types = dali.fn, dali.types

    @dali.pipeline_def(enable_conditionals=augmentation is not None)
    def pipeline():
        encoded, label = fn.readers.file(
            files=files,
            labels=labels,
            name=READER_NAME,
            shard_id=rank,
            num_shards=world_size,
            # A new global permutation each epoch (the same on every rank, so the shards stay
            # disjoint); shards padded to equal size, so every rank runs the same number of steps.
            shuffle_after_epoch=True,
            shuffle_after_epoch_seed=shuffle_seed,
            pad_last_batch=True,
        )
        crop_options = dict(
            output_type=types.RGB,
            random_area=list(crop_area),
            random_aspect_ratio=list(RANDOM_ASPECT_RATIO),
            num_attempts=RANDOM_CROP_ATTEMPTS,
            adjust_orientation=False,  # as PIL/ImageFolder, which ignore EXIF orientation
        )
        if gpu_decode:
            crop_options.update(decoder_memory_hints(threads, batch_size, training=True))
        # The fused operator decodes only the crop's region of interest: much less work on the CPU.
        images = fn.decoders.image_random_crop(encoded, device="mixed" if gpu_decode else "cpu", **crop_options)
        # No antialiasing on this resize, as NVIDIA's pipeline: faster, and the crop is random anyway.
        images = fn.resize(images, size=[image_size, image_size], interp_type=_interp_type(types, interpolation),
                           antialias=False)
        if augmentation == "autoaugment":
            images = _auto_augment(dali, images, image_size)
        if output_to_gpu and not gpu_decode:
            images = images.gpu()  # uint8 crops cross the bus: a quarter of the float32 bytes
        images = _normalize(fn, types, images, layout=layout, mirror=fn.random.coin_flip(probability=0.5))
        if output_to_gpu:
            label = label.gpu()
        return images, label

    with _without_dalis_own_deprecations():  # the graph is traced here, not at the decorator
        return pipeline(batch_size=batch_size, num_threads=threads, device_id=device_id, seed=seed,
                        prefetch_queue_depth=prefetch)


def build_val_pipeline(dali, files, labels, *, gpu_decode: bool, output_to_gpu: bool, batch_size: int,
                       threads: int, device_id, seed: int, prefetch: int, image_size: int, interpolation: str,
                       layout: str):
    fn, types = dali.fn, dali.types
    target_short = image_size + CROP_PADDING

    @dali.pipeline_def
    def pipeline():
        # This rank's shard is given as the file list, so the reader does not shard again.
        encoded, label = fn.readers.file(files=files, labels=labels, name=READER_NAME, pad_last_batch=True)
        decode_options = dict(output_type=types.RGB, adjust_orientation=False)
        if gpu_decode:
            decode_options.update(decoder_memory_hints(threads, batch_size, training=False))
        images = fn.decoders.image(encoded, device="mixed" if gpu_decode else "cpu", **decode_options)
        # torchvision's Resize(int): the shorter side becomes `target_short`, the longer one
        # floor(longer * target_short / shorter); computed here to get the same output sizes.
        shape = fn.peek_image_shape(encoded, adjust_orientation=False)
        height, width = shape[0], shape[1]
        shorter = dali.math.min(height, width)
        new_height = (height * target_short) // shorter
        new_width = (width * target_short) // shorter
        images = fn.resize(images, resize_x=fn.cast(new_width, dtype=types.FLOAT),
                           resize_y=fn.cast(new_height, dtype=types.FLOAT),
                           interp_type=_interp_type(types, interpolation), antialias=True)
        if output_to_gpu and not gpu_decode:
            images = images.gpu()
        images = _normalize(fn, types, images, layout=layout, crop=[image_size, image_size],
                            crop_pos_x=_centre_crop_position(dali, new_width, image_size),
                            crop_pos_y=_centre_crop_position(dali, new_height, image_size))
        if output_to_gpu:
            label = label.gpu()
        return images, label

    return pipeline(batch_size=batch_size, num_threads=threads, device_id=device_id, seed=seed,
                    prefetch_queue_depth=prefetch)


def _dali_failure_summary(error: Exception) -> str:
    """The line of DALI's multi-line report that says what went wrong (it follows "encountered:")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if "encountered:" in lines and lines.index("encountered:") + 1 < len(lines):
        return lines[lines.index("encountered:") + 1]
    useful = [line for line in lines if "no longer valid" not in line]
    return useful[-1] if useful else type(error).__name__


class DaliLoader:
    """Iterable of (images, labels) for one split over a DALI pipeline.

    Training yields `num_batches` full batches per pass. DALI's epoch may hold one more (the padded
    tail of the shard): it is read and dropped at the start of the next pass, which closes DALI's
    epoch. The batches come from one running DALI stream, so a pass that the consumer leaves early
    (``--prof``, a stop request) is continued by the next one: every pass yields the same number of
    batches, and no more than the unread tail is ever read in vain. (A DALI iterator ignores a reset
    before its epoch ends, so a fresh ``iter()`` would not start a new epoch.)

    Validation yields this rank's shard once per pass, from its start, split into the same number of
    batches as on every other rank. A pass left early is read to its end (and dropped) when the next
    pass starts, so that the next pass starts at the first image again.
    """

    def __init__(self, dali, pipeline, *, training: bool, classes, batch_size: int, num_batches: int,
                 shard_size: int, image_size: int, memory_format: torch.memory_format, device: torch.device,
                 split: str, listing: ImageFolderListing | None = None):
        self.classes = classes
        self._listing = listing  # the files, to name the one a decode failure was about
        self.batch_size = batch_size
        self.training = training
        self.device = device
        self.num_samples = num_batches * batch_size if training else shard_size
        self._num_batches = num_batches
        self._split = split
        self._image_size = image_size
        self._memory_format = memory_format
        self._channels_last = memory_format == torch.channels_last
        self._pipeline = pipeline
        self._iterator = None
        self._position = 0  # batches read from DALI's current epoch
        if pipeline is not None:
            plugin = dali.plugin
            policy = plugin.LastBatchPolicy.FILL if training else plugin.LastBatchPolicy.PARTIAL
            # prepare_first_batch=False: nothing runs until the first pass (cheap to construct).
            self._iterator = plugin.DALIGenericIterator(
                [pipeline], ["images", "labels"], reader_name=READER_NAME, last_batch_policy=policy,
                auto_reset=True, prepare_first_batch=False,
            )
        self._val_sizes = None if training else val_batch_sizes(shard_size, num_batches, batch_size)

    def __len__(self) -> int:
        return self._num_batches

    def set_epoch(self, epoch: int) -> None:
        """Accepted for the common interface; DALI reshuffles after each epoch by itself."""

    def close(self) -> None:
        """Release the iterator and the pipeline now, so that DALI's threads stop and its buffers are freed at a
        known point of the run, not during the interpreter's exit."""
        self._iterator = None
        self._pipeline = None

    def _convert(self, outputs) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = outputs[0]["images"], outputs[0]["labels"]
        if self._channels_last:
            images = images.permute(0, 3, 1, 2)  # NHWC memory seen as NCHW: channels_last strides
        return images, labels.view(-1).to(torch.int64)

    def _read(self):
        """The next batch of DALI's current epoch, or None at its end (the iterator then resets itself)."""
        try:
            outputs = next(self._iterator)
        except StopIteration:
            self._position = 0
            return None
        except RuntimeError as error:
            raise DataError(self._failure_message(error)) from error
        self._position += 1
        return self._convert(outputs)

    def _finish_dali_epoch(self) -> None:
        """Read (and drop) what is left of DALI's epoch, so that the next read starts a new one."""
        while self._position > 0 and self._read() is not None:
            pass

    def _failure_message(self, error: RuntimeError) -> str:
        summary = _dali_failure_summary(error)
        if "decoders." not in str(error) or self._listing is None:
            return (f"DALI failed reading {self._split} data: {summary}; "
                    "rerun with --verify-data to find and skip unreadable images")
        from .integrity import add_unreadable, find_unreadable

        # The cached scans are keyed by the listing a new run makes (before it drops unreadable files).
        root = self._listing.root
        listing = list_image_folder(root.parent, root.name)
        text = str(error)
        named = [path for path, _ in self._listing.samples if path in text]
        if named:
            path = max(named, key=len)
            unreadable = {path: f"DALI: {summary.replace(path, '').strip(' :')}"}
            add_unreadable(listing, unreadable)
        else:  # DALI does not say which image: decode them all with PIL (the full scan, cached)
            logger.warning("DALI could not decode a %s image (%s); decoding the %d images of %s with PIL to find it",
                           self._split, summary, len(listing), root)
            unreadable = find_unreadable(listing, "full")
        if not unreadable:
            return (f"DALI failed decoding a {self._split} image ({summary}), and PIL decodes every image of "
                    f"{root}; try --data-backend pytorch")
        path, reason = next(iter(unreadable.items()))
        more = f" (and {len(unreadable) - 1} more)" if len(unreadable) > 1 else ""
        return (f"DALI cannot decode {self._split} image {path}{more} ({reason}); the next run skips it "
                "(the scan is cached), as --verify-data does")

    def __iter__(self):
        if self.training:
            return self._train_epoch()
        return self._val_epoch()

    def _train_epoch(self):
        for _ in range(self._num_batches):
            if self._position >= self._num_batches:
                self._finish_dali_epoch()  # the padded remainder of the shard
            batch = self._read()
            if batch is None:  # DALI's epoch ended early (cannot happen with a padded shard): start the next
                batch = self._read()
            yield batch

    def _val_epoch(self):
        sizes = self._val_sizes
        position = 0
        if self._iterator is not None:
            self._finish_dali_epoch()  # a previous pass left early
            while True:
                batch = self._read()
                if batch is None:
                    break
                images, labels = batch
                # DALI gives ceil(shard / batch) batches; the common plan may split the last one.
                while len(images) > 0:
                    take = sizes[position] if position < len(sizes) else len(images)
                    yield images[:take], labels[:take]
                    images, labels = images[take:], labels[take:]
                    position += 1
        for _ in range(position, len(sizes)):  # this rank has fewer images than the others
            yield self._empty_batch()

    def _empty_batch(self):
        size = self._image_size
        images = torch.empty((0, 3, size, size), dtype=torch.float32, device=self.device,
                             memory_format=self._memory_format)
        return images, torch.empty((0,), dtype=torch.int64, device=self.device)


def make_dali_loader(listing: ImageFolderListing, options: LoaderOptions, *, training: bool) -> DaliLoader:
    dali = import_dali()
    device = options.device
    on_gpu = device.type == "cuda"
    gpu_decode = options.backend == "dali-gpu"  # get_loaders has checked that it has a GPU
    batch_size, rank, world_size = options.batch_size_for(training), options.rank, options.world_size
    split = "train" if training else "val"
    common = dict(
        gpu_decode=gpu_decode,
        output_to_gpu=on_gpu,
        batch_size=batch_size,
        threads=max(1, options.workers),
        device_id=device.index if on_gpu else None,
        seed=options.seed + rank,  # augmentation differs per rank; the shuffle seed is shared
        prefetch=max(1, options.prefetch),
        image_size=options.image_size,
        interpolation=options.interpolation,
        layout="HWC" if options.memory_format == torch.channels_last else "CHW",
    )
    files = [path for path, _ in listing.samples]
    labels = [label for _, label in listing.samples]
    if training:
        pipeline = build_train_pipeline(dali, files, labels, shuffle_seed=options.seed, rank=rank,
                                        world_size=world_size, augmentation=options.augmentation,
                                        crop_area=options.crop_area, **common)
        num_batches = train_batches_per_rank(len(files), batch_size, world_size)
        shard_size = num_batches * batch_size
    else:
        shard = shard_range(len(files), rank, world_size)
        shard_size = len(shard)
        num_batches = val_batches_per_rank(len(files), batch_size, world_size)
        pipeline = None
        if shard_size > 0:  # DALI's reader refuses an empty list; such a rank yields empty batches
            pipeline = build_val_pipeline(dali, files[shard.start:shard.stop], labels[shard.start:shard.stop],
                                          **common)
    logger.debug("DALI %s pipeline: %d batches of %d on rank %d/%d", split, num_batches, batch_size, rank,
                 world_size)
    return DaliLoader(dali, pipeline, training=training, classes=listing.classes, batch_size=batch_size,
                      num_batches=num_batches, shard_size=shard_size, image_size=options.image_size,
                      memory_format=options.memory_format, device=device, split=split, listing=listing)
