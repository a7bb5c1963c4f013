"""What only the DALI backends do: `dali-cpu` on the CPU (device_id=None); GPU checks run only where CUDA is. The
contract every backend keeps is in test_dataloading_contract.py."""

import logging

import pytest
import torch

from dataloading import IMAGENET_STD_255, DataError, LoaderOptions, get_loaders, integrity
from dataloading.dali import dali_available
from tests.data_utils import dominant_channel, make_dataset, write_garbage_jpeg, write_truncated_jpeg

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
