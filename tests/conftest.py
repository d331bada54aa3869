"""Shared fixtures (helpers live in tests/helpers.py)."""

import importlib.metadata
import os
import signal
import tempfile
from pathlib import Path

import pytest
from helpers import MEGATRON_LM_DIR, write_synthetic_cache

from megatron_slkd.compat.megatron import tree_version


def pytest_configure(config):
    """Records of verdicts and teacher hashes go to a directory of this session, not the
    user's (subprocesses inherit it). Under ``SLKD_REQUIRE_MEGATRON_LM=1`` (CI) the session
    does not start without a Megatron-LM tree of the installed release, so the tests that
    run inside Megatron-LM cannot skip unseen."""
    if "SLKD_TEST_CACHE_HOME" not in os.environ:
        os.environ["SLKD_TEST_CACHE_HOME"] = tempfile.mkdtemp(prefix="slkd-cache-home-")
    os.environ["SLKD_CACHE_HOME"] = os.environ["SLKD_TEST_CACHE_HOME"]
    if os.environ.get("SLKD_REQUIRE_MEGATRON_LM") == "1":
        _check_megatron_lm_tree()


def _check_megatron_lm_tree():
    if not MEGATRON_LM_DIR:
        raise pytest.UsageError(
            "SLKD_REQUIRE_MEGATRON_LM=1 but MEGATRON_LM_DIR is not set "
            '(eval "$(bash .ci/megatron_lm.sh .venv/bin/python DIR)")'
        )
    tree = tree_version(str(Path(MEGATRON_LM_DIR) / "megatron"))
    installed = importlib.metadata.version("megatron-core")
    if tree is None or tree.split(".")[:2] != installed.split(".")[:2]:
        raise pytest.UsageError(
            f"MEGATRON_LM_DIR={MEGATRON_LM_DIR} holds megatron-core {tree}, the venv "
            f"{installed}: use the tree of the same release"
        )


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


@pytest.fixture(autouse=True)
def _preemption_signals_left_unblocked():
    """Fail the test that leaves SIGTERM or SIGUSR1 blocked (an in-process ``slkd train`` or
    ``build-cache`` keeps its preemption watch to the end of the process): every later
    subprocess of its worker would inherit the block, and signal tests elsewhere fail."""
    yield
    watched = {signal.SIGTERM, signal.SIGUSR1}
    blocked = signal.pthread_sigmask(signal.SIG_UNBLOCK, watched) & watched
    assert not blocked, f"the test left {sorted(s.name for s in blocked)} blocked"
