"""The contract every data backend keeps (the `dataloading` package docstring), checked on each backend alike.

`dali-gpu` runs where CUDA and DALI are; `synthetic` joins the checks that need no data folder. What only one
backend does (PyTorch's substitutes for unreadable images, DALI's decode-failure messages, ...) is tested in
test_dataloading_pytorch.py and test_dataloading_dali.py; argument checks and the listing in
test_dataloading_common.py.
"""

import pytest
import torch
from torchvision.datasets import ImageFolder

from dataloading import DataError, LoaderOptions, get_loaders
from dataloading.dali import dali_available
from tests.data_utils import (
    dominant_channel,
    make_dataset,
    make_image_folder,
    unnormalize,
    write_garbage_jpeg,
)

needs_dali = pytest.mark.skipif(not dali_available(),
                                reason="NVIDIA DALI not installed (pip install -r requirements.txt)")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs an NVIDIA GPU (CUDA), which this machine lacks; the CPU path is tested")

# Each backend's test settings: few workers (one DALI thread), batches on the CPU except where a GPU is required.
SETTINGS = {
    "pytorch": dict(workers=0, device="cpu"),
    "dali-cpu": dict(workers=1, device="cpu"),
    "dali-gpu": dict(workers=1, device="cuda"),
    "synthetic": dict(workers=0, device="cpu"),
}
FOLDER_BACKENDS = [
    "pytorch",
    pytest.param("dali-cpu", marks=needs_dali),
    pytest.param("dali-gpu", marks=[needs_dali, needs_cuda]),
]
ALL_BACKENDS = FOLDER_BACKENDS + ["synthetic"]
MEMORY_FORMATS = [torch.contiguous_format, torch.channels_last]
IMAGE_SIZE = 32


def loaders_for(backend, root, batch_size=4, **kwargs):
    options = dict(image_size=IMAGE_SIZE, seed=3, synthetic_batches=3, **SETTINGS[backend])
    options.update(kwargs)
    return get_loaders(LoaderOptions(backend, root, batch_size, **options))


def label_lists(loader):
    return [labels.tolist() for _, labels in loader]


# --- batches ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS, ids=["nchw", "nhwc"])
def test_batches_have_the_promised_shape_type_and_layout(colour_data, backend, memory_format):
    loaders = loaders_for(backend, colour_data, memory_format=memory_format)
    for loader in (loaders.train, loaders.val):
        images, labels = list(loader)[0]  # a whole pass, which also closes DALI's epoch
        assert images.shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE) and images.dtype == torch.float32
        assert images.device.type == labels.device.type == SETTINGS[backend]["device"]
        assert images.is_contiguous(memory_format=memory_format)
        if memory_format == torch.channels_last:
            assert not images.is_contiguous()
        assert labels.shape == (4,) and labels.dtype == torch.int64
        assert 0 <= labels.min() and labels.max() < loaders.num_classes
        assert images.mean().abs() < 2  # normalized
        if backend != "synthetic":  # decoded images: back within 0-255 with the ImageNet mean and std
            pixels = unnormalize(images)
            assert pixels.min() >= -0.5 and pixels.max() <= 255.5


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_each_loader_describes_the_batches_it_yields(colour_data, backend):
    loaders = loaders_for(backend, colour_data, val_batch_size=3)
    for loader, batch_size in ((loaders.train, 4), (loaders.val, 3)):
        sizes = [len(labels) for _, labels in loader]
        assert len(loader) == len(sizes) and loader.num_samples == sum(sizes)
        assert loader.batch_size == batch_size == max(sizes)
        assert loader.training is (loader is loaders.train)
        assert loader.device.type == SETTINGS[backend]["device"]
        assert loader.classes == loaders.classes and len(loaders.classes) == loaders.num_classes


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_an_unfinished_pass_can_be_closed_more_than_once(colour_data, backend):
    loaders = loaders_for(backend, colour_data)
    batches = iter(loaders.train)
    next(batches)  # as --prof or a stop request leaves a pass
    loaders.close()
    loaders.close()


@pytest.mark.parametrize("backend", FOLDER_BACKENDS)
def test_labels_follow_imagefolder_order_and_travel_with_their_images(colour_data, backend):
    loaders = loaders_for(backend, colour_data)
    assert list(loaders.classes) == ImageFolder(str(colour_data / "train")).classes == ["a", "b", "c"]
    for loader in (loaders.train, loaders.val):
        for images, labels in loader:
            assert torch.equal(dominant_channel(images), labels)


@pytest.mark.parametrize("backend", FOLDER_BACKENDS)
def test_autoaugment_runs(colour_data, backend):
    batches = list(loaders_for(backend, colour_data, augmentation="autoaugment").train)
    assert len(batches) == 4
    for images, _ in batches:
        assert images.shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE) and torch.isfinite(images).all()
        pixels = unnormalize(images)
        assert pixels.min() >= -0.5 and pixels.max() <= 255.5


# --- epochs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", FOLDER_BACKENDS)
def test_training_drops_the_last_partial_batch_and_reshuffles_each_epoch(colour_data, backend):
    train = loaders_for(backend, colour_data).train
    assert len(train) == 18 // 4 and train.num_samples == 16
    epochs = [label_lists(train) for _ in range(3)]
    for epoch in epochs:
        assert len(epoch) == 4 and all(len(batch) == 4 for batch in epoch)
    assert epochs[0] != epochs[1] != epochs[2]  # a new order every pass


@pytest.mark.parametrize("backend", FOLDER_BACKENDS)
def test_validation_yields_each_image_once_in_order_in_every_pass(colour_data, backend):
    val = loaders_for(backend, colour_data).val
    reference = [label for _, label in ImageFolder(str(colour_data / "val")).samples]
    passes = []
    for _ in range(2):
        batches = list(val)
        assert [len(labels) for _, labels in batches] == [4, 4, 4, 4, 2] and len(val) == 5
        assert torch.cat([labels for _, labels in batches]).tolist() == reference
        passes.append(torch.cat([images for images, _ in batches]))
    assert val.num_samples == 18
    assert torch.equal(passes[0], passes[1])  # no randomness in validation


@pytest.mark.parametrize("backend", FOLDER_BACKENDS)
def test_the_seed_decides_the_training_order(colour_data, backend):
    def orders(seed):
        train = loaders_for(backend, colour_data, seed=seed, val=False).train
        return [label_lists(train) for _ in range(2)]

    first = orders(3)
    assert orders(3) == first  # a rerun (or a resumed run) sees the same order
    assert orders(4) != first


# --- several ranks ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", FOLDER_BACKENDS)
def test_two_ranks_split_training_over_epochs(tmp_path, backend):
    make_dataset(tmp_path, {f"img{i:02d}": 1 for i in range(16)})  # a label identifies an image
    ranks = [loaders_for(backend, tmp_path, rank=rank, world_size=2, val=False) for rank in range(2)]
    orders = []
    for epoch in range(3):
        seen = [[label for _, labels in r.train for label in labels.tolist()] for r in ranks]
        assert len(ranks[0].train) == len(ranks[1].train) == 2
        assert len(seen[0]) == len(seen[1]) == 8
        assert sorted(seen[0] + seen[1]) == list(range(16))  # disjoint shards covering the set
        orders.append(seen)
    assert orders[0] != orders[1] != orders[2]  # reshuffled across the whole set each epoch


@pytest.mark.parametrize("backend", FOLDER_BACKENDS)
def test_two_ranks_with_uneven_shards_run_the_same_steps_and_validate_each_image_once(tmp_path, backend):
    make_dataset(tmp_path, {"a": 9, "b": 8}, {"a": 5, "b": 4})  # 17 training images, 9 validation
    ranks = [loaders_for(backend, tmp_path, rank=rank, world_size=2) for rank in range(2)]
    for _ in range(2):
        steps = [[len(labels) for _, labels in r.train] for r in ranks]
        assert steps == [[4, 4], [4, 4]]  # shards of 8 and 9 padded to 9, remainder dropped
    val = [label_lists(r.val) for r in ranks]
    assert len(ranks[0].val) == len(ranks[1].val) == 2  # ceil(ceil(9 / 2) / 4): the same on both ranks
    assert [len(batch) for batch in val[0]] == [3, 1]  # 4 images in the 2 batches every rank runs
    assert [len(batch) for batch in val[1]] == [4, 1]
    assert sorted(sum(val[0] + val[1], [])) == [0] * 5 + [1] * 4  # each image counted once


# --- bad data --------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", FOLDER_BACKENDS)
@pytest.mark.parametrize("split", ["train", "val"])
def test_missing_split_folder(tmp_path, backend, split):
    make_image_folder(tmp_path / ("val" if split == "train" else "train"), {"a": 4, "b": 4})
    with pytest.raises(DataError, match=f"{split} folder not found: {tmp_path / split}"):
        loaders_for(backend, tmp_path)


@pytest.mark.parametrize("backend", FOLDER_BACKENDS)
def test_evaluation_only_needs_no_train_folder(tmp_path, backend):
    make_image_folder(tmp_path / "val", {"a": 3, "b": 2})
    loaders = loaders_for(backend, tmp_path, train=False)
    assert loaders.train is None and loaders.classes == ("a", "b")
    assert sum(len(labels) for _, labels in loaders.val) == 5


@pytest.mark.parametrize("backend", FOLDER_BACKENDS)
def test_empty_data_set(tmp_path, backend):
    make_image_folder(tmp_path / "val", {"a": 2})
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "stray.jpg.txt").write_text("")
    with pytest.raises(DataError, match=f"empty train data set: no class folders in {tmp_path / 'train'}"):
        loaders_for(backend, tmp_path)


@pytest.mark.parametrize("backend", FOLDER_BACKENDS)
def test_class_folder_without_images(tmp_path, backend):
    make_dataset(tmp_path, {"a": 4, "b": 4})
    (tmp_path / "train" / "c").mkdir()
    (tmp_path / "train" / "c" / "labels.csv").write_text("x")
    with pytest.raises(DataError, match=f"class folder has no images: {tmp_path / 'train' / 'c'}"):
        loaders_for(backend, tmp_path)


@pytest.mark.parametrize("backend", FOLDER_BACKENDS)
def test_all_images_unreadable_is_an_empty_data_set(tmp_path, backend):
    make_image_folder(tmp_path / "train", {"a": 4})
    write_garbage_jpeg(tmp_path / "val" / "a" / "bad.jpg")
    with pytest.raises(DataError, match="no readable images"):
        loaders_for(backend, tmp_path, verify_data=True)
