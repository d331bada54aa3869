"""Tier 1/3: URLs are refused wherever the project cannot use them, never taken for local
paths (caches on s3:// and msc:// are read: tests/test_object_storage.py)."""

import pytest
from helpers import slkd

from megatron_slkd.cache import open_cache
from megatron_slkd.errors import ConfigError
from megatron_slkd.training.config import load_config


@pytest.mark.parametrize(
    "args",
    [
        ["build-cache", "--data-prefix", "d", "--output", "gs://bucket/cache"],
        ["merge-cache", "a", "--output", "gs://b/c"],
        ["remap-cache", "http://b/a", "--data-prefix", "d", "--output", "o"],
        ["train", "--data-path", "d", "--kd-caches", "s3://bucket/d=c"],
        ["train", "--data-path", "d", "--checkpoint-dir", "s3://bucket/run"],
        ["train", "--data-path", "s3://bucket/d", "--kd-caches", "d=c"],
        ["verify-cache", "gs://bucket/cache"],
        ["verify-cache", "http://host/cache"],
    ],
)
def test_commands_refuse_urls_and_write_nothing(tmp_path, args):
    r = slkd(*args, check=False, cwd=tmp_path)
    assert r.returncode == 2 and "not supported" in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []  # no local "s3:" directory


def test_library_and_config_refuse_urls(tmp_path):
    with pytest.raises(ConfigError, match="gs://b/c: gs:// is not supported"):
        open_cache("gs://b/c")
    (tmp_path / "c.yaml").write_text("data:\n  path: [msc://p/data]\n")
    with pytest.raises(ConfigError, match="config data.path .*msc://p/data"):
        load_config(tmp_path / "c.yaml").validate()
    (tmp_path / "d.yaml").write_text("data:\n  path: [d]\nkd:\n  caches: {d: http://h/c}\n")
    with pytest.raises(ConfigError, match="http:// is not supported"):
        load_config(tmp_path / "d.yaml").validate()
    (tmp_path / "e.yaml").write_text("data:\n  path: [d]\nkd:\n  caches: {d: s3://b/c}\n")
    load_config(tmp_path / "e.yaml").validate()  # a cache on object storage is fine
