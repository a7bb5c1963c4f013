"""The `pytorch` data backend on the CPU (the CUDA prefetcher test runs only where CUDA is)."""

import logging

import pytest
import torch
from torchvision.datasets import ImageFolder

from dataloading import DataError, LoaderOptions, get_loaders
from tests.data_utils import dominant_channel, make_dataset, write_garbage_jpeg, write_truncated_jpeg

IMAGE_SIZE = 32
MEMORY_FORMATS = [torch.contiguous_format, torch.channels_last]


def loaders_for(root, backend="pytorch", batch_size=4, **kwargs):
    options = dict(workers=0, image_size=IMAGE_SIZE, device="cpu", seed=3)
    options.update(kwargs)
    return get_loaders(LoaderOptions(backend, root, batch_size, **options))


def test_labels_follow_imagefolder_order_and_travel_with_their_images(colour_data):
    loaders = loaders_for(colour_data)
    assert list(loaders.classes) == ImageFolder(str(colour_data / "train")).classes == ["a", "b", "c"]
    assert loaders.train.classes == loaders.val.classes == loaders.classes
    for loader in (loaders.train, loaders.val):
        for images, labels in loader:
            assert torch.equal(dominant_channel(images), labels)


def test_training_drops_the_last_partial_batch_and_reshuffles_each_epoch(colour_data):
    train = loaders_for(colour_data).train
    assert len(train) == 18 // 4 and train.num_samples == 16
    epochs = [[labels.tolist() for _, labels in train] for _ in range(3)]
    for epoch in epochs:
        assert len(epoch) == 4 and all(len(batch) == 4 for batch in epoch)
    assert epochs[0] != epochs[1] != epochs[2]  # a new order every pass
    train.set_epoch(1)
    assert [labels.tolist() for _, labels in train] == epochs[1]  # set_epoch picks a pass's order


def test_validation_yields_each_image_once_in_order(colour_data):
    val = loaders_for(colour_data).val
    sizes = [len(labels) for _, labels in val]
    assert sizes == [4, 4, 4, 4, 2] and len(val) == 5 and val.num_samples == 18
    labels = torch.cat([labels for _, labels in val])
    assert labels.tolist() == [label for _, label in ImageFolder(str(colour_data / "val")).samples]
    first = torch.cat([images for images, _ in val])
    second = torch.cat([images for images, _ in val])
    assert torch.equal(first, second)  # no randomness in validation


def test_two_ranks_split_training(tmp_path):
    make_dataset(tmp_path, {f"img{i:02d}": 1 for i in range(16)})  # a label identifies an image
    ranks = [loaders_for(tmp_path, rank=rank, world_size=2, val=False) for rank in range(2)]
    orders = []
    for epoch in range(2):
        seen = [[label for _, labels in r.train for label in labels.tolist()] for r in ranks]
        assert len(ranks[0].train) == len(ranks[1].train) == 2
        assert len(seen[0]) == len(seen[1]) == 8
        assert sorted(seen[0] + seen[1]) == list(range(16))  # disjoint shards covering the set
        orders.append(seen)
    assert orders[0] != orders[1]  # reshuffled across the whole set each epoch


def test_two_ranks_with_uneven_shards_run_the_same_number_of_steps(tmp_path):
    make_dataset(tmp_path, {"a": 9, "b": 8}, {"a": 1, "b": 1})  # 17 training images
    ranks = [loaders_for(tmp_path, rank=rank, world_size=2, val=False) for rank in range(2)]
    for _ in range(2):
        assert [[len(labels) for _, labels in r.train] for r in ranks] == [[4, 4], [4, 4]]


def test_two_ranks_validate_each_image_once_with_equal_batch_counts(tmp_path):
    make_dataset(tmp_path, {"a": 8, "b": 8}, {"a": 5, "b": 4})
    per_rank = []
    for rank in range(2):
        val = loaders_for(tmp_path, rank=rank, world_size=2, train=False).val
        batches = [(images.shape[0], labels.tolist()) for images, labels in val]
        assert len(batches) == len(val) == 2  # ceil(ceil(9 / 2) / 4): the same on both ranks
        per_rank.append(batches)
    assert [size for size, _ in per_rank[0]] == [3, 1]  # 4 images in 2 batches
    assert [size for size, _ in per_rank[1]] == [4, 1]  # 5 images
    labels = [label for batches in per_rank for _, labels in batches for label in labels]
    assert sorted(labels) == [0] * 5 + [1] * 4


def test_autoaugment_runs(colour_data):
    train = loaders_for(colour_data, augmentation="autoaugment").train
    batches = list(train)
    assert len(batches) == 4
    assert all(images.shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE) and torch.isfinite(images).all()
               for images, _ in batches)


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
