"""Shared fixtures (helpers live in tests/helpers.py)."""

import pytest
from helpers import write_synthetic_cache


def pytest_collection_modifyitems(config, items):
    """Files with long-running tests first: `make test` runs the files on two workers
    (pytest-xdist, ``--dist loadfile``) in this order, so the suite ends on short files
    on both instead of one long file alone."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)


@pytest.fixture
def synthetic_cache(tmp_path):
    lengths = [5, 1, 40, 17, 3, 90, 2, 33]
    return write_synthetic_cache(tmp_path / "cache", lengths)
