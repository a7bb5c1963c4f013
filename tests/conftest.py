"""Fixtures shared by the test files."""
import pytest

from dataloading import integrity
from tests.data_utils import make_dataset


@pytest.fixture(autouse=True)
def scan_cache_in_tmp(tmp_path, monkeypatch):
    """Every test gets its own data-scan cache, so no test sees another's (or the user's) cached scans."""
    monkeypatch.setenv(integrity.CACHE_DIR_ENV, str(tmp_path / "scan-cache"))


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory):
    """18 training images in 3 classes (red, green, blue), 18 validation images."""
    return make_dataset(tmp_path_factory.mktemp("colours"), {"a": 7, "b": 6, "c": 5})
