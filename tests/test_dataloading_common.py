"""Backend-independent parts of `dataloading`: options, folder checks, scans, synthetic data (the contract every
backend keeps is in test_dataloading_contract.py)."""

import dataclasses
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from dataloading import DataError, LoaderOptions, get_loaders, list_image_folder
from dataloading import integrity
from dataloading.common import shard_range, val_batch_sizes, val_batches_per_rank
from tests.data_utils import make_dataset, make_image_folder, write_garbage_jpeg, write_jpeg, write_truncated_jpeg

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytorch_loaders(root, **kwargs):
    return get_loaders(LoaderOptions("pytorch", root, 4, workers=0, image_size=32, device="cpu", **kwargs))


# --- options ---------------------------------------------------------------------------------

def test_unknown_backend_is_a_value_error_listing_the_valid_ones():
    with pytest.raises(ValueError, match="pytorch, dali-cpu, dali-gpu, synthetic"):
        LoaderOptions("dali", None, 4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(interpolation="nearest"), "interpolation"),
    (dict(augmentation="randaugment"), "augmentation"),
    (dict(rank=2, world_size=2), "rank 2"),
    (dict(memory_format="nchwc"), "memory format"),
    (dict(train=False, val=False), "neither"),
    (dict(crop_area=(0.5, 0.2)), "random crop area"),
    (dict(crop_area=(0.0, 1.0)), "random crop area"),
    (dict(val_batch_size=0), "val_batch_size must be a positive integer"),
    (dict(workers=-1), "workers must be a non-negative integer"),
])
def test_bad_options_raise_data_error_when_made(kwargs, message):
    with pytest.raises(DataError, match=message):
        LoaderOptions("synthetic", None, 4, device="cpu", **kwargs)


def test_batch_size_must_be_positive():
    with pytest.raises(DataError, match="batch_size"):
        LoaderOptions("synthetic", None, 0, device="cpu")


def test_options_hold_canonical_values_and_replace_checks_again():
    options = LoaderOptions("syntetic", "~/data", 4, memory_format="nhwc", device="cpu", crop_area=[0.35, 1.0],
                            augmentation="none")
    assert options.backend == "synthetic" and options.data_root == Path("~/data").expanduser()
    assert options.memory_format is torch.channels_last and options.device == torch.device("cpu")
    assert options.crop_area == (0.35, 1.0) and options.augmentation is None
    assert options.batch_size_for(training=True) == options.batch_size_for(training=False) == 4
    assert dataclasses.replace(options, val_batch_size=2).batch_size_for(training=False) == 2
    with pytest.raises(DataError, match="rank 1 is outside"):
        dataclasses.replace(options, rank=1)


def test_crop_area_reaches_the_pytorch_transform():
    from dataloading.pytorch import train_transform

    assert train_transform(32, "bilinear", None).transforms[0].scale == (0.08, 1.0)
    assert train_transform(32, "bilinear", None, (0.35, 1.0)).transforms[0].scale == (0.35, 1.0)


# --- synthetic -------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["synthetic", "syntetic"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_synthetic_batches(backend, memory_format):
    loaders = get_loaders(LoaderOptions(backend, None, 6, image_size=40, memory_format=memory_format, device="cpu",
                          synthetic_batches=3, num_classes=10))
    assert loaders.backend == "synthetic" and loaders.num_classes == 10
    for loader in (loaders.train, loaders.val):
        batches = list(loader)
        assert len(loader) == len(batches) == 3
        images, labels = batches[0]
        assert images.shape == (6, 3, 40, 40) and images.dtype == torch.float32
        assert images.is_contiguous(memory_format=memory_format)
        assert labels.shape == (6,) and labels.dtype == torch.int64
        assert 0 <= labels.min() and labels.max() < 10
        assert all(b[0] is images and b[1] is labels for b in batches)  # one fixed batch, no copies
        assert abs(images.mean().item()) < 0.1 and 0.9 < images.std().item() < 1.1  # like normalized data


def test_synthetic_needs_no_data_folder_and_can_build_val_only():
    loaders = get_loaders(LoaderOptions("synthetic", "/no/such/folder", 2, device="cpu", train=False))
    assert loaders.train is None and len(loaders.val) == 100


# --- folder listing --------------------------------------------------------------------------

def test_listing_has_imagefolders_classes_and_order(tmp_path):
    # Names whose sorted order is not the obvious one; a nested folder; stray files.
    make_image_folder(tmp_path / "train", {"b": 2, "B": 2, "a10": 1, "a9": 2})
    write_jpeg(tmp_path / "train" / "b" / "nested" / "x.JPEG", (1, 2, 3), 40, 40, random.Random(0))
    (tmp_path / "train" / "b" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "a9" / ".DS_Store").write_bytes(b"\0\0")
    (tmp_path / "train" / "README").write_text("a stray file next to the class folders")
    listing = list_image_folder(tmp_path, "train")
    reference = ImageFolder(str(tmp_path / "train"))
    assert list(listing.classes) == reference.classes == ["B", "a10", "a9", "b"]
    assert list(listing.samples) == reference.samples
    assert len(listing) == 8  # the .txt, .DS_Store and README are not images


def test_missing_data_root(tmp_path):
    with pytest.raises(DataError, match="data folder not found: .*nowhere"):
        get_loaders(LoaderOptions("pytorch", tmp_path / "nowhere", 4, device="cpu"))


def test_train_and_val_classes_must_match(tmp_path):
    make_dataset(tmp_path, {"a": 4, "b": 4}, {"a": 2, "c": 2})
    with pytest.raises(DataError, match="only in train: b; only in val: c"):
        pytorch_loaders(tmp_path)


def test_training_set_smaller_than_a_batch_per_rank(tmp_path):
    make_dataset(tmp_path, {"a": 3, "b": 3})
    with pytest.raises(DataError, match="training set too small: 6 images"):
        pytorch_loaders(tmp_path, world_size=2, rank=1)


# --- sharding plan ---------------------------------------------------------------------------

@pytest.mark.parametrize("num_samples", [1, 2, 7, 8, 9, 16, 17, 33])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_val_plan_counts_each_sample_once_with_equal_batch_counts(num_samples, world_size, batch_size):
    num_batches = val_batches_per_rank(num_samples, batch_size, world_size)
    covered = []
    for rank in range(world_size):
        shard = shard_range(num_samples, rank, world_size)
        sizes = val_batch_sizes(len(shard), num_batches, batch_size)
        assert len(sizes) == num_batches and sum(sizes) == len(shard)
        assert all(0 <= size <= batch_size for size in sizes)
        if len(shard) >= num_batches:
            assert min(sizes) >= 1  # empty batches only where a rank has too few images
        covered.extend(shard)
    assert sorted(covered) == list(range(num_samples))


# --- unreadable-image scan -------------------------------------------------------------------

@pytest.fixture
def mixed_files(tmp_path):
    data = tmp_path / "data"
    good = write_jpeg(data / "c" / "good.jpg", (10, 200, 30), 48, 40, random.Random(1))
    padded = data / "c" / "padded.jpg"  # legal: bytes after the end marker
    padded.write_bytes(good.read_bytes() + b"\0" * 3000)
    png = data / "c" / "image.png"
    Image.new("RGB", (20, 20), (1, 2, 3)).save(png)
    truncated = write_truncated_jpeg(data / "c" / "truncated.jpg", 0.6)
    garbage = write_garbage_jpeg(data / "c" / "garbage.jpg")
    empty = data / "c" / "empty.jpg"
    empty.write_bytes(b"")
    return dict(good=good, padded=padded, png=png, truncated=truncated, garbage=garbage, empty=empty)


@pytest.mark.parametrize("level", ["quick", "full"])
def test_scan_finds_exactly_the_unreadable_files(tmp_path, mixed_files, level):
    listing = list_image_folder(tmp_path, "data")
    found = integrity.find_unreadable(listing, level, cache_dir=tmp_path / "cache")
    names = {Path(path).name for path in found}
    assert names == {"truncated.jpg", "garbage.jpg", "empty.jpg"}
    assert found[str(mixed_files["empty"])] == "empty file"


def test_scan_result_is_cached_until_the_folder_changes(tmp_path, mixed_files, monkeypatch):
    cache = tmp_path / "cache"
    listing = list_image_folder(tmp_path, "data")
    first = integrity.find_unreadable(listing, "quick", cache_dir=cache)
    assert len(list(cache.glob("quick-*.json"))) == 1
    calls = []
    monkeypatch.setattr(integrity, "quick_error", lambda path: calls.append(path))
    assert integrity.find_unreadable(listing, "quick", cache_dir=cache) == first
    assert calls == []  # answered from the cache
    # Repairing a file changes its size and mtime: the listing's key changes, the scan reruns.
    time.sleep(0.01)
    mixed_files["truncated"].write_bytes(mixed_files["good"].read_bytes())
    integrity.find_unreadable(list_image_folder(tmp_path, "data"), "quick", cache_dir=cache)
    assert len(calls) == len(listing)


def test_full_scan_cache_answers_quick_requests(tmp_path, mixed_files, monkeypatch):
    cache = tmp_path / "cache"
    listing = list_image_folder(tmp_path, "data")
    full = integrity.find_unreadable(listing, "full", cache_dir=cache)
    monkeypatch.setattr(integrity, "quick_error", lambda path: pytest.fail("should use the cache"))
    assert integrity.find_unreadable(listing, "quick", cache_dir=cache) == full
    content = json.loads(next(cache.glob("full-*.json")).read_text())
    assert content["files"] == len(listing) and len(content["unreadable"]) == 3


def test_unwritable_cache_dir_only_warns(tmp_path, mixed_files, caplog):
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("")
    listing = list_image_folder(tmp_path, "data")
    found = integrity.find_unreadable(listing, "quick", cache_dir=blocker / "cache")
    assert len(found) == 3
    assert "could not cache the data scan" in caplog.text


# --- optional DALI ---------------------------------------------------------------------------

def test_package_imports_and_reports_missing_dali_without_it(tmp_path):
    # Run where `nvidia.dali` cannot be imported (None in sys.modules blocks the import).
    code = (
        "import sys\n"
        "sys.modules['nvidia'] = None\n"
        "import dataloading\n"
        "assert not any(name.startswith('nvidia') and sys.modules[name] for name in sys.modules)\n"
        "loaders = dataloading.get_loaders(dataloading.LoaderOptions('synthetic', None, 2, device='cpu'))\n"
        "try:\n"
        f"    dataloading.get_loaders(dataloading.LoaderOptions('dali-cpu', {str(tmp_path)!r}, 2, device='cpu'))\n"
        "except dataloading.DataError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 0, result.stderr
    assert "pip install nvidia-dali-cuda130" in result.stdout
    assert len(result.stdout.strip().splitlines()) == 1
