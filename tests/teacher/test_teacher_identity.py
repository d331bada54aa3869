"""A teacher's identity covers every byte of its weight files, and costs a stat once known."""

import os

import pytest

from megatron_slkd import identity
from megatron_slkd.cache import Manifest
from megatron_slkd.errors import CacheMismatchError
from megatron_slkd.teacher.hf import checkpoint_hash
from megatron_slkd.training.data import check_one_teacher

SIZE = 70 << 20  # over the 64 MiB above which files were hashed in three 1 MiB blocks


def _teacher(path, flip_at=None):
    """A teacher directory: a config and a 70 MiB weight file (sparse, zeros), one byte
    set at ``flip_at``."""
    path.mkdir()
    (path / "config.json").write_text('{"model_type": "llama"}')
    with open(path / "model.safetensors", "wb") as f:
        f.truncate(SIZE)
        if flip_at is not None:
            f.seek(flip_at)
            f.write(b"\x01")
    return path


def test_one_byte_deep_inside_a_large_file_changes_the_identity(tmp_path):
    # 10 MiB in: outside the start, middle and end blocks the sampled hash read.
    a = _teacher(tmp_path / "a")
    b = _teacher(tmp_path / "b", flip_at=10 << 20)
    c = _teacher(tmp_path / "c", flip_at=int(SIZE * 0.3))
    ids = {checkpoint_hash(p) for p in (a, b, c)}
    assert len(ids) == 3 and all(i.startswith("sha256-tree:") for i in ids)
    # A single file is known by every byte too.
    assert checkpoint_hash(a / "model.safetensors") != checkpoint_hash(b / "model.safetensors")
    # A blend of caches of the two teachers is two teacher runs.
    def manifest(teacher_dir):
        return Manifest(dataset={}, tokenizer={"vocab_size": 8}, sampling={"method": "rs"},
                        teacher={"kind": "huggingface", "path": str(teacher_dir),
                                 "checkpoint_hash": checkpoint_hash(teacher_dir)},
                        encoding=None, shards=[])  # fmt: skip

    with pytest.raises(CacheMismatchError, match="2 teacher runs.*checkpoint_hash"):
        check_one_teacher({"x": manifest(a), "y": manifest(b)}, "--kd-allow-mixed-teachers")
    check_one_teacher({"x": manifest(a), "y": manifest(a)}, "--kd-allow-mixed-teachers")


def _counting(monkeypatch):
    read = []
    real = identity._sha256

    def counted(path):
        read.append(path)
        return real(path)

    monkeypatch.setattr(identity, "_sha256", counted)
    return read


def _settle(path):
    """Date every file's modification back past the settling time (a fresh file's hash is
    used but not recorded: a rewrite in the same clock tick would keep its time stamp)."""
    for f in [path, *path.rglob("*")] if path.is_dir() else [path]:
        st = f.stat()
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns - 10**10))


def test_hashes_are_read_once_and_kept_beside_the_teacher(tmp_path, monkeypatch):
    t = _teacher(tmp_path / "t", flip_at=5)
    read = _counting(monkeypatch)
    first = checkpoint_hash(t)
    assert len(read) == 2 and not (t / identity.HASH_RECORD_NAME).exists()  # too fresh
    _settle(t)
    assert checkpoint_hash(t) == first and len(read) == 4  # settled: read and recorded
    assert (t / identity.HASH_RECORD_NAME).is_file()
    assert checkpoint_hash(t) == first and len(read) == 4  # a stat per file, no read
    # Rewritten in place (same size, same bytes elsewhere): the stat differs, read again.
    with open(t / "model.safetensors", "r+b") as f:
        f.seek(SIZE // 2)
        f.write(b"\x02")
    changed = checkpoint_hash(t)
    assert changed != first and read[-1].endswith("model.safetensors") and len(read) == 5
    # The record itself is never part of the identity.
    (t / identity.HASH_RECORD_NAME).unlink()
    assert checkpoint_hash(t) == changed


def test_hashes_of_an_unwritable_teacher_go_to_the_users_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLKD_CACHE_HOME", str(tmp_path / "home"))
    t = _teacher(tmp_path / "t")
    _settle(t)
    real_access = os.access
    monkeypatch.setattr(identity.os, "access",
                        lambda p, mode: False if str(p) == str(t) else real_access(p, mode))
    read = _counting(monkeypatch)
    first = checkpoint_hash(t)
    assert not (t / identity.HASH_RECORD_NAME).exists()
    assert list((tmp_path / "home" / "hashes").glob("*.json"))
    assert checkpoint_hash(t) == first and len(read) == 2
