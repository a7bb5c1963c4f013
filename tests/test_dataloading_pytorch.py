"""What only the `pytorch` data backend does, on the CPU (the CUDA prefetcher test runs only where CUDA is); the
contract every backend keeps is in test_dataloading_contract.py."""

import logging

import pytest
import torch

from dataloading import DataError, LoaderOptions, get_loaders
from tests.data_utils import make_dataset, write_garbage_jpeg, write_truncated_jpeg

IMAGE_SIZE = 32
MEMORY_FORMATS = [torch.contiguous_format, torch.channels_last]


def loaders_for(root, batch_size=4, **kwargs):
    options = dict(workers=0, image_size=IMAGE_SIZE, device="cpu", seed=3)
    options.update(kwargs)
    return get_loaders(LoaderOptions("pytorch", root, batch_size, **options))


def test_set_epoch_picks_a_passs_order(colour_data):
    train = loaders_for(colour_data, val=False).train
    epochs = [[labels.tolist() for _, labels in train] for _ in range(3)]
    train.set_epoch(1)
    assert [labels.tolist() for _, labels in train] == epochs[1]
    assert [labels.tolist() for _, labels in train] == epochs[2]  # then each pass takes the next epoch's order


def test_unreadable_images_are_skipped_with_a_warning(tmp_path, caplog):
    make_dataset(tmp_path, {"a": 6, "b": 6}, {"a": 3, "b": 3})
    truncated = write_truncated_jpeg(tmp_path / "train" / "a" / "zz_truncated.jpg")
    garbage = write_garbage_jpeg(tmp_path / "val" / "b" / "zz_garbage.jpg")
    with caplog.at_level(logging.WARNING, logger="dataloading"):
        loaders = loaders_for(tmp_path)
        assert len(loaders.train) == 13 // 4
        for _ in range(2):
            assert all(len(labels) == 4 for _, labels in loaders.train)  # replaced, batches stay full
        val_labels = [label for _, labels in loaders.val for label in labels.tolist()]
        # A training sample that cannot be read is replaced by the next readable one.
        dataset = loaders.train.dataset
        index = [path for path, _ in dataset.samples].index(str(truncated))
        image, label = dataset[index]
        assert image.size == (IMAGE_SIZE, IMAGE_SIZE) and label == 1  # the sample after it, class b
    assert sorted(val_labels) == [0, 0, 0, 1, 1, 1]  # the garbage file is not counted
    assert f"skipping unreadable image {garbage}" in caplog.text
    assert f"skipping unreadable image {truncated}" in caplog.text


def test_unreadable_images_do_not_stop_worker_processes(tmp_path):
    make_dataset(tmp_path, {"a": 6, "b": 6}, {"a": 3, "b": 3})
    write_truncated_jpeg(tmp_path / "train" / "a" / "a_0000.jpg")  # replaces a good one
    write_truncated_jpeg(tmp_path / "val" / "a" / "a_0001.jpg", keep_fraction=0.05)
    loaders = loaders_for(tmp_path, workers=2)
    for _ in range(2):
        assert [len(labels) for _, labels in loaders.train] == [4, 4, 4]
        assert sum(len(labels) for _, labels in loaders.val) == 5


@pytest.mark.parametrize("workers", [0, 2])
def test_a_run_of_unreadable_images_is_one_clear_error(tmp_path, workers):
    make_dataset(tmp_path, {"a": 2, "b": 2})
    for i in range(20):
        write_garbage_jpeg(tmp_path / "train" / "a" / f"bad_{i:02d}.jpg", seed=i)
    train = loaders_for(tmp_path, workers=workers, val=False).train
    with pytest.raises(DataError, match=r"^17 unreadable images in a row from .*bad_\d\d\.jpg; .*--verify-data") as error:
        list(train)
    assert "\n" not in str(error.value)  # also when it comes back from a worker process


def test_verify_data_drops_unreadable_images_before_the_run(tmp_path, caplog):
    make_dataset(tmp_path, {"a": 4, "b": 4}, {"a": 3, "b": 3})
    garbage = write_garbage_jpeg(tmp_path / "val" / "a" / "a_9999.jpg")
    with caplog.at_level(logging.WARNING, logger="dataloading"):
        loaders = loaders_for(tmp_path, verify_data=True)
    assert f"skipping unreadable val image {garbage}" in caplog.text
    assert loaders.val.num_samples == 6 and len(loaders.val.dataset) == 6


def test_cpu_loading_never_touches_cuda(colour_data, monkeypatch):
    def no_cuda(*args, **kwargs):
        raise AssertionError("CUDA used on the CPU path")

    monkeypatch.setattr(torch.cuda, "Stream", no_cuda)
    monkeypatch.setattr(torch.cuda, "current_stream", no_cuda)
    monkeypatch.setattr(torch.Tensor, "pin_memory", no_cuda)
    loaders = loaders_for(colour_data, workers=1)
    list(loaders.train)
    list(loaders.val)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (CUDA), which this machine lacks; the CPU path is tested")
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
def test_cuda_prefetcher_delivers_the_cpu_batches(colour_data, memory_format):
    cpu = loaders_for(colour_data, train=False, memory_format=memory_format).val
    gpu = loaders_for(colour_data, train=False, memory_format=memory_format, device="cuda", workers=2).val
    for (cpu_images, cpu_labels), (gpu_images, gpu_labels) in zip(cpu, gpu, strict=True):
        assert gpu_images.is_cuda and gpu_labels.is_cuda
        assert gpu_images.is_contiguous(memory_format=memory_format)
        torch.testing.assert_close(gpu_images.cpu(), cpu_images)
        assert torch.equal(gpu_labels.cpu(), cpu_labels)
