"""The DALI backends: `dali-cpu` on the CPU (device_id=None); GPU checks run only where CUDA is."""

import logging

import pytest
import torch
from torchvision.datasets import ImageFolder

from dataloading import IMAGENET_STD_255, DataError, LoaderOptions, get_loaders, integrity
from dataloading.dali import dali_available
from tests.data_utils import dominant_channel, make_dataset, unnormalize, write_garbage_jpeg, write_truncated_jpeg

pytestmark = pytest.mark.skipif(not dali_available(),
                                reason="NVIDIA DALI not installed (pip install nvidia-dali-cuda120)")

IMAGE_SIZE = 32
MEMORY_FORMATS = [torch.contiguous_format, torch.channels_last]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (CUDA), which this machine lacks; the CPU path is tested")


def loaders_for(root, backend="dali-cpu", batch_size=4, **kwargs):
    options = dict(workers=1, image_size=IMAGE_SIZE, device="cpu", seed=3)
    options.update(kwargs)
    return get_loaders(LoaderOptions(backend, root, batch_size, **options))


def val_images(root, backend, **kwargs):
    val = loaders_for(root, backend, train=False, **kwargs).val
    images, labels = zip(*[(images.cpu().clone(), labels.cpu()) for images, labels in val])
    return torch.cat(images), torch.cat(labels)


def test_labels_follow_imagefolder_order_and_travel_with_their_images(colour_data):
    loaders = loaders_for(colour_data)
    assert list(loaders.classes) == ImageFolder(str(colour_data / "train")).classes == ["a", "b", "c"]
    for loader in (loaders.train, loaders.val):
        for images, labels in loader:
            assert torch.equal(dominant_channel(images), labels)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_validation_images_agree_with_the_pytorch_backend(colour_data, interpolation):
    dali_images, dali_labels = val_images(colour_data, "dali-cpu", interpolation=interpolation)
    torch_images, torch_labels = val_images(colour_data, "pytorch", workers=0, interpolation=interpolation)
    assert torch.equal(dali_labels, torch_labels)

    def mismatch(images):  # mean absolute difference, in normalized units (1 ~ 58 grey levels)
        return (images - torch_images).abs().mean().item()

    # Same decoder output, same resize sizes and crop offsets: only rounding differs (~0.0025).
    tolerance = 0.006
    assert mismatch(dali_images) < tolerance
    assert (dali_images - torch_images).abs().mean(dim=(1, 2, 3)).max() < 0.01  # every image
    assert (dali_images - torch_images).abs().max() < 0.06  # no pixel off by more than ~3 levels
    # The tolerance would catch a real mistake: these are what common bugs would give.
    std = torch.tensor(IMAGENET_STD_255).view(1, 3, 1, 1)
    assert mismatch(dali_images.flip(3)) > 10 * tolerance  # a stray horizontal flip
    assert mismatch(dali_images.flip(1)) > 10 * tolerance  # BGR instead of RGB
    assert mismatch(dali_images * std / 255) > 10 * tolerance  # std on the wrong scale
    assert mismatch(torch.roll(dali_images, 1, dims=3)) > 3 * tolerance  # a crop one pixel off


def test_training_drops_the_last_partial_batch_in_every_epoch(colour_data):
    train = loaders_for(colour_data).train
    assert len(train) == 18 // 4 and train.num_samples == 16
    epochs = [[labels.tolist() for _, labels in train] for _ in range(3)]
    for epoch in epochs:
        assert len(epoch) == 4 and all(len(batch) == 4 for batch in epoch)
    assert epochs[0] != epochs[1] != epochs[2]


def test_validation_yields_each_image_once_in_every_pass(colour_data):
    val = loaders_for(colour_data).val
    reference = [label for _, label in ImageFolder(str(colour_data / "val")).samples]
    for _ in range(2):
        batches = [labels.tolist() for _, labels in val]
        assert [len(batch) for batch in batches] == [4, 4, 4, 4, 2] and len(val) == 5
        assert sum(batches, []) == reference


def test_two_ranks_split_training_over_epochs(tmp_path):
    make_dataset(tmp_path, {f"img{i:02d}": 1 for i in range(16)})  # a label identifies an image
    ranks = [loaders_for(tmp_path, rank=rank, world_size=2, val=False) for rank in range(2)]
    orders = []
    for epoch in range(3):
        seen = [[label for _, labels in r.train for label in labels.tolist()] for r in ranks]
        assert len(ranks[0].train) == len(ranks[1].train) == 2
        assert len(seen[0]) == len(seen[1]) == 8
        assert sorted(seen[0] + seen[1]) == list(range(16))  # disjoint shards covering the set
        orders.append(seen)
    assert orders[0] != orders[1] != orders[2]  # reshuffled across the whole set each epoch


def test_two_ranks_with_uneven_shards_run_the_same_number_of_steps(tmp_path):
    make_dataset(tmp_path, {"a": 9, "b": 8}, {"a": 5, "b": 4})  # 17 training images, 9 validation
    ranks = [loaders_for(tmp_path, rank=rank, world_size=2) for rank in range(2)]
    for _ in range(2):
        steps = [[len(labels) for _, labels in r.train] for r in ranks]
        assert steps == [[4, 4], [4, 4]]  # shards of 8 and 9 padded to 9, remainder dropped
    val = [[labels.tolist() for _, labels in r.val] for r in ranks]
    assert [len(batch) for batch in val[0]] == [3, 1]  # 4 images in the 2 batches every rank runs
    assert [len(batch) for batch in val[1]] == [4, 1]
    assert sorted(sum(val[0] + val[1], [])) == [0] * 5 + [1] * 4  # each image counted once


def test_autoaugment_runs_on_the_cpu(colour_data):
    train = loaders_for(colour_data, augmentation="autoaugment").train
    batches = [(images.clone(), labels) for images, labels in train]
    assert len(batches) == 4
    for images, labels in batches:
        assert images.shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE) and torch.isfinite(images).all()
        pixels = unnormalize(images)
        assert pixels.min() >= -0.5 and pixels.max() <= 255.5


def test_unreadable_images_are_skipped_with_a_warning(tmp_path, caplog):
    make_dataset(tmp_path, {"a": 6, "b": 6}, {"a": 3, "b": 3})
    truncated = write_truncated_jpeg(tmp_path / "train" / "a" / "a_0002.jpg", keep_fraction=0.7)
    garbage = write_garbage_jpeg(tmp_path / "val" / "b" / "zz_garbage.jpg")
    empty = tmp_path / "val" / "a" / "empty.jpeg"
    empty.write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="dataloading"):
        loaders = loaders_for(tmp_path)
    for path in (truncated, garbage, empty):
        assert str(path) in caplog.text
    for _ in range(2):
        assert [len(labels) for _, labels in loaders.train] == [4, 4]  # 11 readable images
        assert sorted(label for _, labels in loaders.val for label in labels.tolist()) == [0, 0, 0, 1, 1, 1]
    assert list((tmp_path / "scan-cache").glob("quick-*.json"))  # the next run reads the cache


def test_a_decode_failure_past_the_scan_is_a_clear_error_not_a_crash(tmp_path, monkeypatch):
    make_dataset(tmp_path, {"a": 4, "b": 4}, {"a": 2, "b": 2})
    garbage = write_garbage_jpeg(tmp_path / "val" / "a" / "a_0000.jpg")
    monkeypatch.setattr(integrity, "quick_error", lambda path: None)  # pretend the scan missed it
    val = loaders_for(tmp_path, train=False).val
    with pytest.raises(DataError, match=f"DALI cannot decode val image {garbage} .*the next run skips it") as error:
        list(val)
    assert "\n" not in str(error.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU; the test checks the error a machine without one gives")
def test_dali_gpu_without_a_gpu_says_what_to_use_instead(colour_data):
    with pytest.raises(DataError, match="dali-gpu.*needs a CUDA GPU.*dali-cpu or pytorch") as error:
        loaders_for(colour_data, backend="dali-gpu", device=None)
    assert "\n" not in str(error.value)


@needs_cuda
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
def test_dali_cpu_hands_batches_to_the_gpu(colour_data, memory_format):
    loaders = loaders_for(colour_data, device="cuda", memory_format=memory_format)
    for loader in (loaders.train, loaders.val):
        for images, labels in loader:
            assert images.is_cuda and labels.is_cuda and labels.dtype == torch.int64
            assert images.is_contiguous(memory_format=memory_format)
            assert torch.equal(dominant_channel(images), labels)


@needs_cuda
def test_dali_gpu_matches_dali_cpu_validation(colour_data):
    gpu_images, gpu_labels = val_images(colour_data, "dali-gpu", device="cuda")
    cpu_images, cpu_labels = val_images(colour_data, "dali-cpu")
    assert torch.equal(gpu_labels, cpu_labels)
    assert (gpu_images - cpu_images).abs().mean() < 0.03
    train = loaders_for(colour_data, backend="dali-gpu", device="cuda", augmentation="autoaugment").train
    assert [len(labels) for _, labels in train] == [4, 4, 4, 4]
