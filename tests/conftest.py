"""Shared fixtures (helpers live in tests/helpers.py)."""

import pytest
from helpers import write_synthetic_cache


@pytest.fixture
def synthetic_cache(tmp_path):
    lengths = [5, 1, 40, 17, 3, 90, 2, 33]
    return write_synthetic_cache(tmp_path / "cache", lengths)
