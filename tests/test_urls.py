"""Tier 1/3: object-storage URLs are refused by every command, never taken for local paths."""

import pytest
from helpers import slkd

from megatron_slkd.cache import open_cache
from megatron_slkd.errors import CacheFormatError, ConfigError
from megatron_slkd.training.config import load_config


@pytest.mark.parametrize(
    "args",
    [
        ["build-cache", "--data-prefix", "d", "--output", "s3://bucket/cache"],
        ["verify-cache", "msc://profile/cache"],
        ["merge-cache", "a", "--output", "gs://b/c"],
        ["remap-cache", "s3://b/a", "--data-prefix", "d", "--output", "o"],
        ["train", "--data-path", "d", "--kd-caches", "d=s3://bucket/cache"],
    ],
)
def test_commands_refuse_urls_and_write_nothing(tmp_path, args):
    r = slkd(*args, check=False, cwd=tmp_path)
    assert r.returncode == 2 and "object-storage URLs are not supported yet" in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []  # no local "s3:" directory


def test_library_and_config_refuse_urls(tmp_path):
    with pytest.raises(CacheFormatError, match="s3://b/c: object-storage URLs"):
        open_cache("s3://b/c")
    (tmp_path / "c.yaml").write_text("data:\n  path: [msc://p/data]\n")
    with pytest.raises(ConfigError, match="config data.path .*msc://p/data"):
        load_config(tmp_path / "c.yaml").validate()
