"""Fixtures shared by the test files."""
import pytest

from dataloading import integrity
from tests.data_utils import make_dataset


@pytest.fixture(autouse=True)
def scan_cache_in_tmp(tmp_path, monkeypatch):
    """Every test gets its own data-scan cache, so no test sees another's (or the user's) cached scans."""
    monkeypatch.setenv(integrity.CACHE_DIR_ENV, str(tmp_path / "scan-cache"))


@pytest.fixture(autouse=True)
def fixed_pedconv_paths(monkeypatch):
    """PEDConv's ``auto`` takes the fixed rule in tests (their paths must not depend on timings; the autotune tests
    switch measuring on), and nothing reads or writes the user's autotune cache (also in spawned processes)."""
    from pedconv import autotune

    monkeypatch.setenv(autotune.ENV_SWITCH, "0")
    monkeypatch.setenv(autotune.ENV_CACHE, "")
    autotune.TUNER.reset()
    yield
    autotune.TUNER.reset()


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory):
    """18 training images in 3 classes (red, green, blue), 18 validation images."""
    return make_dataset(tmp_path_factory.mktemp("colours"), {"a": 7, "b": 6, "c": 5})
