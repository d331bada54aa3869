"""Tier 1: resume after a crash, corrupt and mismatched files, fuzzing."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from helpers import write_synthetic_cache
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_slkd.cache import ShardWriter, encoding_for, open_cache
from megatron_slkd.cache.format import HEADER_SIZE, VERSION, TokenHasher
from megatron_slkd.errors import (
    CacheCoverageError,
    CacheFormatError,
    CacheMismatchError,
    SlkdError,
)
from megatron_slkd.records import dump_record

_CHILD = textwrap.dedent(
    """
    import sys, numpy as np
    from megatron_slkd.cache import ShardWriter, encoding_for
    from megatron_slkd.cache.format import TokenHasher
    path, ndocs = sys.argv[1], int(sys.argv[2])
    enc = encoding_for("rs", 500, num_samples=50)
    tokens = lambda d: np.random.default_rng(10**6 + d).integers(0, 500, 20 + d % 37)
    h = TokenHasher()
    for d in range(ndocs):
        h.update(tokens(d))
    w = ShardWriter.open(path, encoding=enc, vocab_size=500, doc_start=0, doc_end=ndocs,
                         chunk_tokens=128,
                         content={"token_crc32": h.crc32, "token_xxh128": h.xxh128()})
    while w.next_document < ndocs:
        d = w.next_document
        rng = np.random.default_rng(d)
        n = 20 + d % 37
        counts = np.zeros((n, 4), np.int64); counts[:, 0] = 47; counts[:, 1:] = 1
        ids = np.stack([rng.choice(500, 4, replace=False) for _ in range(n)])
        w.add_document(tokens(d), ids, counts / 50, np.full(n, 4), counts)
        if d % 3 == 2:
            w.commit()
            print("committed", d, flush=True)
    print(w.finalize()["file_crc32"])
    """
)


def test_sigkill_then_resume_is_byte_identical(tmp_path):
    cmd = [sys.executable, "-c", _CHILD]
    clean, resumed = tmp_path / "clean.slkd", tmp_path / "resumed.slkd"
    subprocess.run([*cmd, str(clean), "3000"], check=True, capture_output=True)
    proc = subprocess.Popen([*cmd, str(resumed), "3000"], stdout=subprocess.PIPE, text=True)
    for _ in range(200):  # kill mid-shard, well after the first commits
        assert proc.stdout.readline().startswith("committed")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not resumed.exists() and (tmp_path / "resumed.slkd.partial").exists()
    subprocess.run([*cmd, str(resumed), "3000"], check=True, capture_output=True)
    assert resumed.read_bytes() == clean.read_bytes()
    assert not (tmp_path / "resumed.slkd.partial").exists()
    assert not (tmp_path / "resumed.slkd.tmp").exists()


def test_resume_drops_uncommitted_documents(tmp_path):
    enc = encoding_for("rs", 100, num_samples=4)
    h = TokenHasher()
    for _ in range(3):
        h.update(np.arange(3))
    kw = dict(encoding=enc, vocab_size=100, doc_start=10, doc_end=13,
              content={"token_crc32": h.crc32, "token_xxh128": h.xxh128()})  # fmt: skip
    w = ShardWriter.open(tmp_path / "s", **kw)
    one = (
        np.arange(3),
        np.ones((3, 1), np.int64),
        np.ones((3, 1)),
        np.ones(3, np.int64),
        np.full((3, 1), 4),
    )
    w.add_document(*one)
    w.commit()
    w.add_document(*one)  # never committed: lost in the "crash" below
    w.close()
    w = ShardWriter.open(tmp_path / "s", **kw)
    assert w.next_document == 11 and w.num_tokens == 3
    with pytest.raises(CacheMismatchError, match="other settings .doc_end: 13 here, 14 asked"):
        ShardWriter.open(tmp_path / "s", **{**kw, "doc_end": 14})
    w.add_document(*one)
    w.add_document(*one)
    with pytest.raises(ValueError, match="already written"):
        w.add_document(*one)
    assert w.finalize()["num_tokens"] == 9
    with pytest.raises(CacheMismatchError, match="already finished"):
        ShardWriter.open(tmp_path / "s", **kw)


def _shard(cache):
    return cache.path / cache.manifest.shards[1]["file"]


def test_truncated_shard(synthetic_cache):
    p = _shard(synthetic_cache)
    os.truncate(p, p.stat().st_size - 1)
    with pytest.raises(CacheFormatError, match=r"shard-00001.*truncated"):
        open_cache(synthetic_cache.path)
    os.truncate(p, 20)
    with pytest.raises(CacheFormatError, match="truncated header"):
        open_cache(synthetic_cache.path)


def test_wrong_magic_and_version(synthetic_cache):
    p = _shard(synthetic_cache)
    raw = bytearray(p.read_bytes())
    p.write_bytes(b"NOTSLKD!" + raw[8:])
    with pytest.raises(CacheFormatError, match="not a megatron-slkd shard"):
        open_cache(synthetic_cache.path)
    raw[8:12] = (VERSION + 1).to_bytes(4, "little")
    p.write_bytes(raw)
    with pytest.raises(CacheFormatError, match="version 3"):
        open_cache(synthetic_cache.path)


def test_crc_mismatch_is_reported_not_decoded(synthetic_cache):
    p = _shard(synthetic_cache)
    raw = bytearray(p.read_bytes())
    raw[-5] ^= 0x40  # an entry byte in the last chunk
    p.write_bytes(raw)
    reader = open_cache(synthetic_cache.path)  # the index is intact
    with pytest.raises(
        CacheFormatError, match=r"shard-00001.*CRC mismatch in chunk \d+ .*documents"
    ):
        reader.read_tokens(0, reader.num_tokens)
    raw[HEADER_SIZE + 3] ^= 1  # a document offset: caught at open
    p.write_bytes(raw)
    with pytest.raises(CacheFormatError, match="index CRC"):
        open_cache(synthetic_cache.path)


def test_missing_shard_and_coverage(synthetic_cache):
    manifest = synthetic_cache.path / "manifest.json"
    d = json.loads(manifest.read_text())
    shutil.move(_shard(synthetic_cache), synthetic_cache.path / "elsewhere")
    with pytest.raises(CacheFormatError, match=r"missing shard for documents 4\.\.7"):
        open_cache(synthetic_cache.path)
    d["shards"][1]["doc_start"] = 3
    manifest.write_text(dump_record(d))  # a consistent record of an inconsistent cache
    with pytest.raises(CacheCoverageError, match=r"overlap at documents 3\.\.3"):
        open_cache(synthetic_cache.path)
    d["shards"] = d["shards"][:1]
    manifest.write_text(dump_record(d))  # a consistent record of an inconsistent cache
    with pytest.raises(CacheCoverageError, match=r"documents 4\.\.7 have no shard"):
        open_cache(synthetic_cache.path)


def test_shard_from_another_cache(tmp_path):
    a = write_synthetic_cache(tmp_path / "a", [5, 6, 7, 8], seed=1)
    b = write_synthetic_cache(tmp_path / "b", [5, 6, 7, 8], seed=2)
    shutil.copy(_shard(b), _shard(a))
    with pytest.raises(CacheFormatError, match="does not belong|manifest"):
        open_cache(a.path)


@settings(
    max_examples=int(os.environ.get("SLKD_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_fuzzed_bytes_raise_only_library_errors(tmp_path_factory, data):
    base = tmp_path_factory.mktemp("fuzz")
    cache = write_synthetic_cache(base / "c", [9, 1, 30, 4, 70], num_shards=2, chunk_tokens=16)
    target = data.draw(st.sampled_from(["shard", "manifest"]))
    p = _shard(cache) if target == "shard" else cache.path / "manifest.json"
    raw = bytearray(p.read_bytes())
    if data.draw(st.booleans()):
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
    else:
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    p.write_bytes(bytes(raw))
    try:
        reader = open_cache(cache.path)
        full = reader.read_tokens(0, reader.num_tokens)
    except SlkdError:
        return
    # A flip that no check catches must be one that changes nothing read.
    clean = write_synthetic_cache(base / "ref", [9, 1, 30, 4, 70], num_shards=2, chunk_tokens=16)
    ref = open_cache(clean.path).read_tokens(0, reader.num_tokens)
    assert np.array_equal(full.ids, ref.ids) and np.array_equal(full.weights, ref.weights)


def test_damaged_records_are_typed_errors_naming_the_file(synthetic_cache, tmp_path):
    # Every JSON record the tools write carries a checksum: an edit that stays valid JSON,
    # a flipped byte and a truncation are each a CacheFormatError naming the file.
    manifest = synthetic_cache.path / "manifest.json"
    good = manifest.read_text()
    d = json.loads(good)
    d["teacher"]["name"] = "another teacher"  # free-form: no structural check would see it
    manifest.write_text(json.dumps(d))
    with pytest.raises(CacheFormatError, match=r"manifest\.json: checksum mismatch"):
        open_cache(synthetic_cache.path)
    manifest.write_text(good[: len(good) // 2])
    with pytest.raises(CacheFormatError, match=r"manifest\.json: damaged or truncated record"):
        open_cache(synthetic_cache.path)
    manifest.write_text(good)
    open_cache(synthetic_cache.path)
    # The writer's progress record.
    from megatron_slkd.cache import ShardWriter, encoding_for

    kw = dict(encoding=encoding_for("rs", 300, num_samples=50), vocab_size=300, doc_start=0,
              doc_end=2)  # fmt: skip
    w = ShardWriter.open(tmp_path / "s", **kw)
    w.close()
    progress = tmp_path / "s.partial" / "progress.json"
    raw = bytearray(progress.read_bytes())
    raw[raw.index(b'"docs": 0') + 8] = ord("5")
    progress.write_bytes(bytes(raw))
    with pytest.raises(CacheFormatError, match=r"progress\.json: checksum mismatch"):
        ShardWriter.open(tmp_path / "s", **kw)
